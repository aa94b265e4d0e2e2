"""Run a script as on a card of N GiB: a filler tensor takes the rest of the GPU's memory, so the script and
the CUDA driver see (and can use) only what such a card has beside the CUDA context.

    python3 bench/capped.py 12 train_textual_inversion.py --config presets/sdxl_face.toml ...
"""

import atexit
import runpy
import sys

import torch

card_gib, script = float(sys.argv[1]), sys.argv[2]
free, total = torch.cuda.mem_get_info()
filler = torch.empty(int(free - card_gib * 2**30 + (total - free)), dtype=torch.uint8, device="cuda")
free, _ = torch.cuda.mem_get_info()
print(f"{free / 2**30:.1f} GiB left free: a {card_gib:g} GiB card", flush=True)
atexit.register(  # the script's own peak: PyTorch's counters include the filler
    lambda: print(
        f"script's peak reserved: {(torch.cuda.max_memory_reserved() - filler.numel()) / 2**30:.2f} GiB"
    )
)
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
