"""The textual-inversion toolkit's library: one focused module per job (README, "Layout").

Importing it settles how the heavy dependencies behave, before any of them loads (so it stays cheap: no
torch here):
- nothing reaches the Hugging Face hub: models, configs and tokenizers come from files only;
- `train.compile` keeps its kernels in ~/.cache/ti-toolkit/torchinductor, which outlives /tmp (merely
  importing torch's inductor sets a /tmp default, so this must come first; the variable still overrides);
- dependency messages that tell our users nothing are silenced: the libraries' own progress bars (ours
  show progress), bitsandbytes' notice about 4-bit CPU kernels (we never run 4-bit models; it appears on
  CPUs with AVX512-BF16 whenever diffusers imports bitsandbytes), and diffusers' warning on every
  `.to(dtype)` of a model (its check is always true).
"""

import logging
import os
from pathlib import Path

COMPILE_CACHE = Path.home() / ".cache" / "ti-toolkit" / "torchinductor"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(COMPILE_CACHE))


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _DropMessages("Failed to load CPU gemm_4bit_forward")
)
logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropMessages("There are modules in"))
