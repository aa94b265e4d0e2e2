"""Shared library of the textual-inversion toolkit: one focused module per job."""
