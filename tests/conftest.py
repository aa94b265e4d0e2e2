"""Shared fixtures. Every test runs offline: the hub is disabled and any non-local socket fails."""

from __future__ import annotations

import os
import socket

import pytest

import library  # noqa: F401  (before any test imports a dependency: it settles how they behave)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

_real_connect = socket.socket.connect


def _local_only_connect(sock, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1", "")):
        return _real_connect(sock, address)
    if sock.family == socket.AF_UNIX:
        return _real_connect(sock, address)
    raise RuntimeError(f"test tried to reach the network: {address!r}")


socket.socket.connect = _local_only_connect


@pytest.fixture(scope="session")
def tiny_sd1():
    """A tiny SD1-architecture model (shared, read-only: copy before changing it)."""
    from library.tiny import build_tiny_parts

    return build_tiny_parts("sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2():
    from library.tiny import build_tiny_parts

    return build_tiny_parts("sd2", seed=0)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; each in-process training run starts from a clean one."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: on a busy two-core machine more threads are many times slower.
    Modules of tiny-model tests use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
