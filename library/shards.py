"""The processes of a multi-process launch (`accelerate launch --num_processes N`, torchrun): which share of
the work is this process's, its device, and the few points where the processes meet. A plain `python`
run is a launch of one process, and costs nothing here (accelerate is imported only for several).

Rendering splits by whole units (a generation's axis combination, a sweep's cell), so every image is
rendered in the batch it has in one process; every file is written by exactly one process, and what
needs all of them (grids, manifests, scores, reports) by the first process after the others are done.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shards:
    index: int = 0
    count: int = 1

    @classmethod
    def of_launch(cls) -> Shards:
        """This process's place in the launch (WORLD_SIZE and RANK, as accelerate and torchrun set them)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # on the CPU: gloo
        return cls(state.process_index, state.num_processes)

    @property
    def main(self) -> bool:
        return self.index == 0

    def device(self) -> torch.device:
        """Each process's own GPU (LOCAL_RANK), else the CPU."""
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if self.count == 1:
            return torch.device("cuda")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    def mine(self, number: int) -> bool:
        """Is unit `number` (of a list every process builds alike) this process's to do?"""
        return number % self.count == self.index

    def gather(self, values: Sequence) -> list:
        """Every process's `values` one after another, in process order, on every process."""
        if self.count == 1:
            return list(values)
        from accelerate.utils import gather_object

        return gather_object(list(values))

    def wait(self) -> None:
        if self.count > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()
