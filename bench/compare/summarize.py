"""Turn the raw records of run_compare.sh / run_sdxl.sh into OUT/compare.json and a printed table of ratios.

Inputs in the work folder: runs.txt ("run rc t_start t_end gpu_mib_before" per run), <run>.steps (one line
per tqdm update, written by hook/sitecustomize.py), <run>.mem (nvidia-smi memory.used samples, MiB); in the
out folder <run>.log, whose first line is the command. A run is named after its tool, optionally with a
variant: `ours_low` is our trainer, `kohya_gc` Kohya's (the part before the first "_" picks the progress bar).
Ratios are taken for the pairs given with --pairs ("ours/kohya ours/diffusers" by default).
Standard library only, so it runs with any python3.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
from pathlib import Path

# The steady-state rate leaves out the first steps (first-step kernels, allocator and cuDNN warm-up, CUDA-graph
# capture); --warmup-steps changes it (the SDXL comparison: 3 updates of 8 accumulated samples).
WARMUP_STEPS = 10
SITES = ("ours", "kohya", "diffusers")  # site folders whose packages are listed (--site-names)
BAR_NAMES = {"kohya": "steps", "diffusers": "Steps"}  # the training bars' descriptions; ours: the token
# tqdm's closing numbers, e.g. "150/150 [00:21<00:00,  6.98it/s, loss=0.1]" or "2/2 [00:09<00:00,  4.51s/it]"
TQDM_RATE = re.compile(r"(\d+)/(\d+) \[[^\]]*?([\d.]+)(it/s|s/it)")
OURS_LINE = re.compile(r"\d+ steps in [\d.]+ s: ([\d.]+) steps/s[^\n]*")


def read_steps(path: Path, desc: str, total: int) -> tuple[str, list[tuple[float, int]]]:
    """The training progress bar: its description and (time, position) pairs.

    The bar named `desc` with `total` steps; failing that, the bar with `total` steps that moved most
    (loading and latent-caching bars have other totals)."""
    bars: dict[tuple[str, str], list[tuple[float, int]]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split(" ", 3)
            if len(parts) == 4:
                bars.setdefault((parts[3], parts[2]), []).append((float(parts[0]), int(parts[1])))
    wanted = [key for key in bars if key[1] == str(total)]
    if not wanted:
        return "", []
    best = (desc, str(total)) if (desc, str(total)) in bars else max(wanted, key=lambda k: len(bars[k]))
    return f"{best[0]} (total {best[1]})", bars[best]


def tool_reported_rate(log: str, name: str, total: int) -> str:
    """The tool's own closing speed figure, as it printed it."""
    if name == "ours":
        found = list(OURS_LINE.finditer(log))
        if found:
            return found[-1].group(0).strip()
    chunks = re.split(r"[\r\n]", log)
    rates = [m for chunk in chunks for m in TQDM_RATE.finditer(chunk) if m.group(2) == str(total)]
    if not rates:
        return ""
    last = rates[-1]
    value = float(last.group(3))
    per_s = value if last.group(4) == "it/s" else 1.0 / value
    return f"tqdm {last.group(1)}/{last.group(2)} at {last.group(3)}{last.group(4)} = {per_s:.3f} steps/s"


def summarize_tool(work: Path, out: Path, row: list[str], settings: dict, warmup: int = WARMUP_STEPS) -> dict:
    name, rc, t0, t1, base = row[0], int(row[1]), float(row[2]), float(row[3]), row[4]
    tool = name.split("_", 1)[0]
    # samples per optimizer step: the batch times gradient accumulation
    batch = int(settings["batch"]) * int(settings.get("grad_accum", 1))
    total = int(settings["steps"])
    desc, steps = read_steps(work / f"{name}.steps", BAR_NAMES.get(tool, settings["token"]), total)
    log_path = out / f"{name}.log"
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    result = {
        "rc": rc,
        "command": log.split("\n", 1)[0].removeprefix(f"== {name}: ") if log.startswith("== ") else "",
        "wall_s": round(t1 - t0, 2),
        "progress_bar": desc,
        "steps_done": steps[-1][1] if steps else 0,
        "tool_reported": tool_reported_rate(log, tool, total),
    }
    if steps:
        result["first_step_done_s"] = round(steps[0][0] - t0, 2)  # start-up + the first step
        result["after_last_step_s"] = round(t1 - steps[-1][0], 2)  # final save + teardown
    if len(steps) >= 2:
        k = min(warmup, len(steps) - 2)
        (ta, na), (tb, nb) = steps[k], steps[-1]
        rate = (nb - na) / (tb - ta)
        result["steady_steps_per_s"] = round(rate, 3)
        result["steady_samples_per_s"] = round(rate * batch, 2)
        result["steady_window"] = f"steps {na + 1}..{nb}"
        result["loop_s"] = round(steps[-1][0] - steps[0][0], 2)  # steps 2..N
    samples = memory_samples(work / f"{name}.mem")
    if samples:
        result["peak_gpu_mib"] = max(mib for _, mib in samples)
        result["gpu_mib_before"] = int(base) if base.isdigit() else None
        if steps:  # the set-up (loading, latent caching, capture) against the steps that follow it
            stepping = [mib for when, mib in samples if when is not None and when >= steps[0][0]]
            result["peak_gpu_mib_stepping"] = max(stepping) if stepping else None
    return result


def memory_samples(path: Path) -> list[tuple[float | None, int]]:
    """(unix time or None, MiB) per line of nvidia-smi's "timestamp, memory.used" (or a bare MiB) log."""
    samples = []
    for line in path.read_text().splitlines() if path.exists() else []:
        *stamp, mib = [part.strip() for part in line.split(",")]
        if not mib.isdigit():
            continue
        try:
            when = datetime.datetime.strptime(stamp[0], "%Y/%m/%d %H:%M:%S.%f").timestamp() if stamp else None
        except ValueError:
            when = None
        samples.append((when, int(mib)))
    return samples


def site_versions(sites: Path, names) -> dict:
    versions = {}
    for site in names:
        folder = sites / f"site_{site}"
        versions[site] = sorted(p.name[: -len(".dist-info")] for p in folder.glob("*.dist-info"))
    return versions


def machine() -> dict:
    info = {}
    try:
        info["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = "none"
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def ratio(a, b):
    return round(a / b, 3) if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def _cell(value) -> str:
    return "-" if value is None else str(value)


def table(tools: dict, ratios: dict) -> str:
    """The figures of every run side by side, then one column per ratio pair "a/b"."""
    rows = [
        ("steady steps/s", "steady_steps_per_s"),
        ("steady samples/s", "steady_samples_per_s"),
        ("wall, launch to exit (s)", "wall_s"),
        ("first step done at (s)", "first_step_done_s"),
        ("peak GPU memory (MiB)", "peak_gpu_mib"),
        ("  after the first step (MiB)", "peak_gpu_mib_stepping"),
    ]
    names = list(tools)
    lines = [f"{'':28}" + "".join(f"{n:>12}" for n in names) + "".join(f"{pair:>18}" for pair in ratios)]
    for label, key in rows:
        cells = "".join(f"{_cell(tools[n].get(key)):>12}" for n in names)
        cells += "".join(f"{_cell(ratios[pair].get(key)):>18}" for pair in ratios)
        lines.append(f"{label:28}{cells}")
    lines.append("")
    for n in names:
        lines.append(
            f"{n}: rc={tools[n]['rc']}, {tools[n]['steps_done']} steps; its own figure: {tools[n]['tool_reported']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for flag in ("--work", "--out", "--sites", "--settings", "--kohya", "--ckpt"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--example", default="", help="diffusers' example folder (SD1.5 comparison)")
    parser.add_argument("--pairs", default="ours/kohya ours/diffusers", help='ratios to take: "a/b c/d"')
    parser.add_argument("--site-names", default=" ".join(SITES), help="site_<name> folders to list")
    parser.add_argument("--inputs", default="", help="more inputs to record, as key=value words")
    parser.add_argument("--note", default="", help="a line on how the settings were chosen")
    parser.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, help="steps left out of steady")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    settings = dict(item.split("=", 1) for item in args.settings.split())
    runs = [line.split() for line in (work / "runs.txt").read_text().splitlines() if line.strip()]
    tools = {row[0]: summarize_tool(work, out, row, settings, args.warmup_steps) for row in runs}
    ratios = {}
    keys = (
        "steady_steps_per_s",
        "wall_s",
        "first_step_done_s",
        "peak_gpu_mib",
        "peak_gpu_mib_stepping",
    )  # samples/s: as steps/s
    for pair in args.pairs.split():
        a, b = pair.split("/")
        if a in tools and b in tools:
            both_ran = tools[a]["rc"] == 0 and tools[b]["rc"] == 0
            ratios[pair] = {k: ratio(tools[a].get(k), tools[b].get(k)) if both_ran else None for k in keys}
    inputs = {"kohya_dir": args.kohya, "checkpoint": args.ckpt}
    if args.example:
        inputs["diffusers_example_dir"] = args.example
    inputs.update(item.split("=", 1) for item in args.inputs.split())
    report = {
        "settings": settings,
        **({"settings_note": args.note} if args.note else {}),
        "machine": machine(),
        "inputs": inputs,
        "site_packages": site_versions(Path(args.sites), args.site_names.split()),
        "tools": tools,
        "ratios": ratios,
        "notes": (
            f"steady = steps after the first {args.warmup_steps} (or all but the first when fewer ran), timed from "
            "each tool's tqdm updates; wall = accelerate launch to exit; peak GPU memory = max of nvidia-smi "
            'memory.used sampled every 200 ms (whole device, CUDA context included); "after the first step" is '
            "that peak from the first step's end on, without the set-up (loading, latent caching, capture)."
        ),
    }
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(tools, ratios)
    (out / "compare.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
