"""Saving without waiting: host copies of device tensors queued without a sync, and one worker thread that
writes the files in order once the copies have landed, so the training loop never waits for the disk."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class BackgroundSaver:
    """Runs save jobs in order on one worker thread, so training never waits for the disk.

    A job's exception is raised in the training thread at the next `submit` or `wait`.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ti-saver")
        self._jobs: list[Future] = []

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.append(self._pool.submit(job))
        while self._jobs and self._jobs[0].done():
            self._jobs.pop(0).result()

    def wait(self) -> None:
        """Block until every submitted job has finished; re-raise the first failure."""
        jobs, self._jobs = self._jobs, []
        failures = [error for job in jobs if (error := job.exception()) is not None]
        if failures:
            raise failures[0]

    def drain(self) -> None:
        """Block until every submitted job has finished, keeping quiet about failures: for when training
        already stops with an error of its own, which is the one the user should see."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.exception()


def host_copy(value):
    """A host copy of a tensor (or a dict/list/tuple of them) queued without waiting for the GPU.

    CUDA tensors go into pinned memory with non-blocking copies; call `copies_ready` before reading them.
    """
    if isinstance(value, torch.Tensor):
        if value.device.type != "cuda":
            return value.detach().clone()
        out = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        return out.copy_(value.detach(), non_blocking=True)
    if isinstance(value, dict):
        return {k: host_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(host_copy(v) for v in value)
    return value


def copies_ready(device: torch.device) -> Callable[[], None]:
    """A function that blocks until the host copies queued so far on `device` have landed."""
    if torch.device(device).type != "cuda":
        return lambda: None
    event = torch.cuda.Event()
    event.record()
    return event.synchronize
