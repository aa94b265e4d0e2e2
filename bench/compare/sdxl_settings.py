"""The SDXL comparison's settings, read from our preset, as shell assignments for run_sdxl.sh.

    eval "$(python3 bench/compare/sdxl_settings.py presets/sdxl_face.toml)"

Kohya gets the preset's own values (trigger word, init word, vectors, resolution, aspect-ratio buckets, batch,
gradient accumulation, learning rate and its schedule, seed, gradient checkpointing, CLIP skip), so both tools
train the same way. Should the
preset be missing, presets/face.toml stands in with `model.family=sdxl dataset.resolution=1024` (and the run
records that). A preset value Kohya cannot take is overridden for ours too, and said in NOTE: an A1111 lr
schedule string (then the first rate, constant), an optimizer other than AdamW. Standard library only.
"""

from __future__ import annotations

import shlex
import sys
import tomllib
from pathlib import Path

FALLBACK = "presets/face.toml"
FALLBACK_OVERRIDES = ["model.family=sdxl", "dataset.resolution=1024"]


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def settings(preset: str) -> dict[str, str]:
    used, ours, notes = preset, [], []
    if not Path(preset).is_file():
        used, ours = FALLBACK, list(FALLBACK_OVERRIDES)
        notes.append(f"{preset} missing: {FALLBACK} with {' '.join(FALLBACK_OVERRIDES)}")
    data = tomllib.loads(Path(used).read_text(encoding="utf-8"))
    if data.get("embeddings"):
        raise SystemExit(f"{used}: [[embeddings]] (several embeddings) has no Kohya equivalent")
    emb, ds, tr = data.get("embedding", {}), data.get("dataset", {}), data.get("train", {})
    resolution = 1024 if used == FALLBACK else ds.get("resolution", 512)
    width, height = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    lr = _number(tr.get("lr", 0.005))
    if lr is None:  # "0.05:10, 0.02:20, 0.005": Kohya has no such schedules
        lr = float(str(tr["lr"]).split(",")[0].split(":")[0])
        ours.append(f"train.lr={lr}")
        notes.append(f"lr schedule {tr['lr']!r} replaced by constant {lr} for both")
    optimizer = tr.get("optimizer", "adamw")
    if optimizer != "adamw":
        ours.append("train.optimizer=adamw")
        notes.append(f"optimizer {optimizer} replaced by adamw for both")
    scheduler = tr.get("lr_scheduler", "constant")
    warmup = int(tr.get("lr_warmup_steps", 0))
    if warmup:  # Kohya: constant_with_warmup for a constant rate after warm-up
        scheduler = "constant_with_warmup" if scheduler == "constant" else scheduler
    clip_skip = int(tr.get("clip_skip", 0))  # 0: SDXL's own penultimate layers, Kohya's default too
    name = emb.get("name", "")
    if not name:
        raise SystemExit(f"{used}: embedding.name is empty: the trigger word is needed for Kohya's folder")
    return {
        "PRESET_USED": used,
        "OURS_EXTRA": " ".join(ours),
        "NOTE": "; ".join(notes),
        "TOKEN": name,
        "INIT": str(emb.get("init_text", "*")),
        "VECTORS": str(emb.get("num_vectors", 1)),
        "WIDTH": str(width),
        "HEIGHT": str(height),
        "BATCH": str(tr.get("batch_size", 1)),
        "GRAD_ACCUM": str(tr.get("gradient_accumulation_steps", 1)),
        "LR": repr(lr),
        "LR_SCHEDULER": scheduler,
        "WARMUP": str(warmup),
        "SEED": str(tr.get("seed", 42)),
        "PRESET_GC": "1" if tr.get("gradient_checkpointing", False) else "0",
        "CLIP_SKIP": str(clip_skip),
        # Kohya's own keys, the same names in our [dataset] (library/tables.py defaults when left out)
        "ENABLE_BUCKET": "1" if ds.get("enable_bucket", False) else "0",
        "MIN_BUCKET_RESO": str(ds.get("min_bucket_reso", 256)),
        "MAX_BUCKET_RESO": str(ds.get("max_bucket_reso", 1024)),
        "BUCKET_RESO_STEPS": str(ds.get("bucket_reso_steps", 64)),
        "BUCKET_NO_UPSCALE": "1" if ds.get("bucket_no_upscale", False) else "0",
    }


if __name__ == "__main__":
    for key, value in settings(sys.argv[1]).items():
        print(f"{key}={shlex.quote(value)}")
