"""Generate candidate images of a made-up character: A1111 txt2img with Prompt S/R axes (recipe step 1).

One run renders, for every combination of the Prompt S/R axes, `batch_count` batches of `batch_size`
images. Seeds follow A1111: a seed of -1 is drawn once and recorded, and image i of a combination
(i = batch * batch_size + position) uses seed + i. Every combination uses the same seeds, as A1111's
X/Y/Z plot does when "Keep -1 for seeds" is off, so the cells of a grid differ only by their prompt.

The output folder holds the PNGs (`00000-<seed>.png`, A1111's naming, each with A1111 infotext),
`manifest.json` (the resolved settings and, per image, its prompt, negative prompt, seed and axis
values: enough to render any image again, see `reproduce`), `manifest.csv` for spreadsheets,
`config.toml` (the resolved config, with the drawn seed) and `grids/`.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import tomli_w
import torch
from tqdm.auto import tqdm

from library.conditioning import Conditioner
from library.config import dump_config, load_config
from library.embeddings import SUFFIXES as EMBEDDING_SUFFIXES
from library.embeddings import load_embedding
from library.errors import UserError
from library.files import atomic_write, ensure_folder
from library.generation_files import (
    PlannedImage,
    RunWriter,
    planned_images,
    read_manifest,
    write_manifest,
)
from library.grid import apply_prompt_sr, prompt_sr_values
from library.infotext import format_infotext, infotext_params
from library.models import load_parts
from library.pick import check_pick_config, run_pick
from library.prompts import check_attention
from library.sampling import decode_images, resolve_seed, sample_latents
from library.shards import Shards
from library.tables import GenerateConfig, GenerateSettings, ModelConfig, SamplerSettings

CONFIG_FILE = "config.toml"


# --------------------------------------------------------------------------------------------------
# Planning (no model needed: checked before anything is loaded or written)


def parse_axes(settings: GenerateSettings) -> list[list[str]]:
    """The value lists of the Prompt S/R axes; each first value must occur in the prompt or the negative."""
    axes = []
    for number, text in enumerate(settings.axes, start=1):
        values = prompt_sr_values(text)
        if values[0] not in settings.prompt and values[0] not in settings.negative_prompt:
            raise UserError(
                f"generate.axes[{number}]: the first value {values[0]!r} occurs neither in generate.prompt nor "
                "in generate.negative_prompt; write the axis so that its first value is the text to replace"
            )
        axes.append(values)
    return axes


def check_settings(settings: GenerateSettings) -> SamplerSettings:
    """The sampler settings of every batch ([generate] checks its own ranges and sampler name)."""
    return SamplerSettings.of(settings)


def plan_images(settings: GenerateSettings, seed: int) -> list[PlannedImage]:
    """Every image of the run in rendering order: combinations (first axis fastest), batches, positions."""
    axes = parse_axes(settings)
    per_combination = settings.batch_count * settings.batch_size
    # itertools.product varies its last argument fastest; reversing makes the first axis (X) the fastest.
    combos = [tuple(reversed(c)) for c in itertools.product(*reversed(axes))] if axes else [()]
    plan = []
    for combination, values in enumerate(combos):
        prompt, negative = settings.prompt, settings.negative_prompt
        for axis, value in zip(axes, values, strict=True):
            prompt = apply_prompt_sr(prompt, axis, value, must_occur=False)
            negative = apply_prompt_sr(negative, axis, value, must_occur=False)
        for i in range(per_combination):
            index = combination * per_combination + i
            plan.append(
                PlannedImage(
                    file=f"{index:05d}-{seed + i}.png",
                    prompt=prompt,
                    negative_prompt=negative,
                    seed=seed + i,
                    axis_values=tuple(values),
                    combination=combination,
                    batch=i // settings.batch_size,
                    position=i % settings.batch_size,
                )
            )
    return plan


# Auto generate.gpu_batch_size: at most GPU_PIXELS, and half the free GPU memory at GIB_PER_512 an image of
# 512² (SD1.5, fp16, CUDA graphs, on an H200: 6.3 GiB at 4 images, 10.4 at 16; 4.85 images/s at 4, 5.63 at 16).
GPU_PIXELS = 16 * 512 * 512
GIB_PER_512 = 0.35


def gpu_batch_size(settings: GenerateSettings, device: torch.device) -> int:
    """generate.gpu_batch_size, or the auto number for this size (and, on a GPU, its free memory)."""
    if settings.gpu_batch_size:
        return settings.gpu_batch_size
    pixels = settings.width * settings.height
    fits = GPU_PIXELS // pixels
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fits = min(fits, int(free / 2 / (GIB_PER_512 * 2**30 * pixels / 512**2)))
    images = settings.batch_count * settings.batch_size  # of a combination
    fits = max(1, min(fits, images))
    # Batches of one size where that costs at most half of them: each size is a CUDA graph of its own memory.
    even = max(d for d in range(1, fits + 1) if images % d == 0)
    return even if 2 * even >= fits else fits


def _batches(plan: list[PlannedImage], settings: GenerateSettings) -> list[list[PlannedImage]]:
    """The GPU batches: each combination's images in order, gpu_batch_size at a time (a run recorded before
    that key, 0, was rendered batch_size at a time)."""
    size = settings.gpu_batch_size or settings.batch_size
    combinations: dict[int, list[PlannedImage]] = {}
    for image in plan:
        combinations.setdefault(image.combination, []).append(image)
    return [images[i : i + size] for images in combinations.values() for i in range(0, len(images), size)]


# --------------------------------------------------------------------------------------------------
# The model


class Renderer:
    """A loaded model with its conditioner and embeddings, rendering one batch at a time."""

    def __init__(
        self,
        model: ModelConfig,
        settings: GenerateSettings,
        log: Callable[[str], None] = print,
        device: torch.device | None = None,
    ):
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision = settings.mixed_precision if self.device.type == "cuda" else "no"
        self.parts = load_parts(model, precision=precision, device=self.device)
        self.conditioner = Conditioner.of(self.parts, clip_skip=settings.clip_skip)
        self.embedding_hashes = load_embeddings(self.conditioner, self.parts, settings.embeddings, log)

    def used_embeddings(self, prompt: str, negative: str) -> str | None:
        """A1111's "TI hashes" value for the embeddings a prompt pair uses (civitai links them by it)."""
        names = []
        for text in (prompt, negative):
            for chunk in self.conditioner.tokenize_line(text):
                names.extend(name for _, name in chunk.fixes if name not in names)
        pairs = [f"{name.replace(':', '').replace(',', '')}: {self.embedding_hashes[name]}" for name in names]
        return ", ".join(pairs) or None

    def render(
        self,
        batch: list[PlannedImage],
        settings: SamplerSettings,
        progress: Callable[[int, int], None],
    ):
        """Render one GPU batch (one prompt pair, consecutive seeds); out of GPU memory is a UserError."""
        try:
            with torch.inference_mode():
                cond, uncond = self.conditioner.encode_pair(
                    [image.prompt for image in batch], [image.negative_prompt for image in batch]
                )
            seeds = [image.seed for image in batch]
            latents = sample_latents(self.parts, cond, uncond, seeds, settings, progress=progress)
            return decode_images(self.parts.vae, latents)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            size = f"({settings.width}x{settings.height})"
            if len(batch) == 1:
                raise UserError(
                    f"out of GPU memory denoising one image {size}; try a smaller generate.width and height"
                ) from None
            raise UserError(
                f"out of GPU memory denoising {len(batch)} images at once {size}; "
                f"try generate.gpu_batch_size={len(batch) // 2} (the same images, fewer at a time)"
            ) from None


def _embedding_files(paths: Iterable[str]) -> list[Path]:
    files = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():  # A1111 reads its embeddings folder recursively
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES
            )
            files.extend(p for p in found if not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"generate.embeddings: {path} is neither a file nor a folder; check the path")
    return files


def load_embeddings(
    conditioner: Conditioner, parts, paths: Iterable[str], log: Callable[[str], None]
) -> dict[str, str]:
    """Register every embedding file (keyword = file stem); returns name -> A1111 short hash.

    As in A1111, embeddings made for another kind of model are skipped with a message. The short hash is
    the first 12 hex digits of the file's SHA-256, which A1111 writes as "TI hashes".
    """
    hashes = {}
    device = parts.text_encoder.device
    for file in _embedding_files(paths):
        embedding = load_embedding(file)
        try:
            blocks = parts.family.blocks(embedding.vectors, str(file), parts.widths)
        except UserError as error:
            log(f"skipped embedding {str(error).split('; use')[0]}")
            continue
        try:
            conditioner.set_embedding(embedding.name, {k: v.to(device) for k, v in blocks.items()})
        except UserError as error:
            raise UserError(f"{file}: {error}") from None
        hashes[embedding.name] = hashlib.sha256(file.read_bytes()).hexdigest()[:12]
    return hashes


# --------------------------------------------------------------------------------------------------
# Running


def _prepare_folder(folder: Path, key: str, shards: Shards | None = None) -> None:
    """Check that `folder` is new or empty (in every process, before any creates it), then create it."""
    if folder.is_file():
        raise UserError(f"{folder} is a file; choose a new folder for {key}")
    if folder.is_dir() and any(folder.iterdir()):
        raise UserError(
            f"{folder} already exists and is not empty; choose a new {key} (nothing is overwritten)"
        )
    shards = shards or Shards()
    shards.wait()
    if shards.main:
        ensure_folder(folder)


def _recorded_config(manifest: dict, where: str | Path, overrides: list[str] = ()) -> GenerateConfig:
    """The manifest's resolved config, read back through the typed loader, with `model.*` overrides."""
    for item in overrides:
        if not item.strip().startswith("model."):
            raise UserError(
                f"override {item!r}: a reproduction keeps the recorded settings; only model.* (e.g. "
                "model.checkpoint=/new/path.safetensors for a moved file) can be changed"
            )
    recorded = manifest.get("config")
    try:
        text = tomli_w.dumps(recorded) if isinstance(recorded, dict) else None
    except (TypeError, ValueError):
        text = None
    if text is None:
        raise UserError(
            f"{where}: 'config' is not the run's resolved config; use the manifest.json the run wrote"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFIG_FILE
        atomic_write(path, text)
        try:
            return load_config(GenerateConfig, path, overrides)
        except UserError as error:
            raise UserError(f"{where}: the recorded config does not load: {error}") from None


def _check_recorded_run(manifest: dict, settings: GenerateSettings, plan: list[PlannedImage], where) -> None:
    """The manifest's image list must be the run its own config describes (count, names, prompts, seeds,
    places in the batches), so a crafted list can neither add files nor make a run of any other size."""
    check_settings(settings)
    axes = parse_axes(settings)
    if manifest.get("axes", axes) != axes:
        raise UserError(
            f"{where}: its 'axes' differ from its config's generate.axes; use the manifest the run wrote"
        )
    expected = math.prod(len(values) for values in axes) * settings.batch_count * settings.batch_size
    if len(plan) != expected:  # checked before plan_images builds the config's list
        raise UserError(
            f"{where}: lists {len(plan)} images, but its config makes {expected}; use the manifest the run wrote"
        )
    for recorded, planned in zip(plan, plan_images(settings, settings.seed), strict=True):
        if recorded != planned:
            raise UserError(
                f"{where}: image {recorded.file} differs from what its config renders (prompt, seed or "
                "batch); use the manifest.json the run wrote"
            )


def _render_plan(
    renderer: Renderer,
    plan: list[PlannedImage],
    settings: GenerateSettings,
    writer: RunWriter,
    *,
    keep: set[str] | None = None,
    show_progress: bool = True,
    overviews: bool = True,
) -> None:
    """Render `plan` batch by batch and hand each image to `writer`; with `keep`, only those files.

    The progress bar counts sampling steps of all batches, so its ETA is right from the first batch on.
    """
    sample = check_settings(settings)
    batches = _batches(plan, settings)
    bar = tqdm(total=len(batches) * sample.steps, unit="step", disable=not show_progress, dynamic_ncols=True)
    done = 0
    try:
        for batch in batches:
            base = bar.n
            images = renderer.render(
                batch, sample, lambda step, _, base=base: bar.update(base + step - bar.n)
            )
            for planned, image in zip(batch, images, strict=True):
                if keep is None or planned.file in keep:
                    extra = {"TI hashes": renderer.used_embeddings(planned.prompt, planned.negative_prompt)}
                    params = infotext_params(
                        sample, planned.seed, renderer.parts, extra, clip_skip=settings.clip_skip
                    )
                    writer.add(
                        planned, image, format_infotext(planned.prompt, planned.negative_prompt, params)
                    )
                    done += 1
            bar.set_postfix(images=done)
    finally:
        bar.close()
    writer.finish(overviews=overviews)


def run_generate(
    config: GenerateConfig, *, log: Callable[[str], None] = print, show_progress: bool = True
) -> Path:
    """Render the whole run of `config` into generate.output_dir, with grids, manifest, flags and
    review.html; returns the folder.

    Everything that can be checked (settings, axes, [pick], the output folder) is checked before the model
    loads, so a typo fails in a second and writes nothing. Under a launch of several processes each renders
    its share of the axis combinations (whole batches, so each image is the one one process renders) and
    writes its images and their grids; the first process writes the record, the overviews and the flags.
    """
    settings = config.generate
    check_settings(settings)
    axes = parse_axes(settings)
    shards = Shards.of_launch()
    seed = shards.gather([resolve_seed(settings.seed)])[0]  # a random seed: the first process's, for all
    config = replace(config, generate=replace(settings, seed=seed))  # the record reproduces the run
    plan = plan_images(config.generate, seed)
    for image in plan:  # a weight that is not a number fails now, not after the folder is written
        check_attention(image.prompt, "generate.prompt")
        check_attention(image.negative_prompt, "generate.negative_prompt")
    folder = Path(settings.output_dir)
    check_pick_config(config.pick)
    log = log if shards.main else (lambda *_: None)
    _prepare_folder(folder, "generate.output_dir", shards)
    renderer = Renderer(config.model, config.generate, log, device=shards.device())
    gpu_batch = min(shards.gather([gpu_batch_size(settings, shards.device())]))  # one number for all
    config = replace(config, generate=replace(config.generate, gpu_batch_size=gpu_batch))  # recorded
    model_info = {
        "checkpoint_name": renderer.parts.checkpoint_name,
        "checkpoint_hash": renderer.parts.checkpoint_hash,
    }
    if shards.main:
        atomic_write(folder / CONFIG_FILE, dump_config(config))
        write_manifest(folder, config, axes, model_info, plan)
    combos = len(plan) // (settings.batch_count * settings.batch_size)
    log(
        f"rendering {len(plan)} images ({combos} axis combinations x {settings.batch_count} batches x "
        f"{settings.batch_size}; {gpu_batch} at a time), seed {seed}, into {folder}"
        + (f", {shards.count} processes" if shards.count > 1 else "")
    )
    shards.wait()  # the folder exists
    writer = RunWriter(folder, config, axes, pick=config.pick, grids=settings.grids)
    mine = [image for image in plan if shards.mine(image.combination)]
    _render_plan(
        renderer, mine, config.generate, writer, show_progress=show_progress and shards.main, overviews=False
    )
    measured = dict(shards.gather(list(writer.measured.items())))
    firsts = shards.gather(writer.firsts())
    if shards.main:
        writer.write_overviews(firsts)
        run_pick(folder, config.pick, log, measured=measured)
    shards.wait()
    return folder


def reproduce(
    manifest_path: str | Path,
    output_dir: str | Path,
    *,
    files: Iterable[str] = (),
    overrides: list[str] = (),
    log: Callable[[str], None] = print,
    show_progress: bool = True,
) -> Path:
    """Render the images of a manifest again (all, or only `files`) into a new folder.

    Each image is rendered in the same GPU batch as before (its batch-mates are rendered and discarded), so
    on the same machine and model the pixels are identical. `overrides` may change only [model] keys.
    """
    if not output_dir:
        raise UserError("--reproduce needs --output DIR, a new folder for the images")
    manifest = read_manifest(manifest_path)
    config = _recorded_config(manifest, manifest_path, overrides)
    plan = planned_images(manifest, manifest_path)
    _check_recorded_run(manifest, config.generate, plan, manifest_path)
    wanted = set(files) or {image.file for image in plan}
    unknown = wanted - {image.file for image in plan}
    if unknown:
        raise UserError(f"{manifest_path}: no image named {sorted(unknown)[0]!r} in the manifest")
    batches = [b for b in _batches(plan, config.generate) if any(image.file in wanted for image in b)]
    folder = Path(output_dir)
    _prepare_folder(folder, "--output folder")
    renderer = Renderer(config.model, config.generate, log)
    model = manifest.get("model")
    recorded = model.get("checkpoint_hash") if isinstance(model, dict) else None
    current = renderer.parts.checkpoint_hash
    if isinstance(recorded, str) and recorded and current and recorded != current:
        log(f"note: the manifest was made with model hash {recorded}; this model's is {current}")
    atomic_write(folder / CONFIG_FILE, dump_config(config))
    log(f"rendering {len(wanted)} images again into {folder}")
    writer = RunWriter(folder, config, parse_axes(config.generate))
    plan = [image for batch in batches for image in batch]
    _render_plan(renderer, plan, config.generate, writer, keep=wanted, show_progress=show_progress)
    return folder
