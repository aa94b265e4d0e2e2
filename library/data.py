"""Training data: the images of library/kohya_dataset.py with their latents cached, served as deterministic
batches of (latents, prompt from the template and caption, loss weights).

Randomness: the sample at (global step, position in the global batch) is a pure function of
(seed, step, position). Epoch e is a permutation, seeded with (seed, e), of every image repeated `repeats`
times; global batches run through these epochs in order, across epoch boundaries. Template line, tag
shuffle/dropout, flip and latent draw of a sample come from a generator seeded with (seed, step, position),
so resuming at any step, or splitting a global batch across processes, gives identical samples.

With aspect-ratio buckets (library/buckets.py) every global batch holds pictures of one bucket, so of one
latent shape. Epoch e then shuffles, with a generator seeded with (seed, e), each bucket's images repeated
`repeats` times, cuts each bucket's order into batches, and shuffles the batches of all buckets together;
step s is batch s mod (batches per epoch) of epoch s // (batches per epoch). A bucket whose count does not
fill its last batch fills it by wrapping around to the start of its own order for that epoch (a bucket
smaller than a batch repeats its order), so every image is shown `repeats` times per epoch and a few of
them once more; `epoch_length` counts those fillers too.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from library.buckets import Crop, crop_for
from library.captions import fill_template, load_template, process_tags
from library.errors import UserError
from library.images import alpha_loss_weight, attention_map_for, attention_weight, encode_images, image_size
from library.kohya_dataset import ImageRecord
from library.tables import DatasetConfig as DataSettings  # the [dataset] table of a preset

# Sub-streams of the seed, so that permutations, per-sample draws and cached draws never share numbers.
_STREAM_EPOCH, _STREAM_SAMPLE, _STREAM_CACHE = 1, 2, 3
# Latent caching encodes at most this many pixels at once: 8 pictures at 512², 2 at 1024². SDXL's VAE took
# about 6 GiB more (float32) for 8 pictures at 1024² at once, more than a 16 GB card has to spare.
VAE_BATCH_PIXELS = 8 * 512 * 512


@dataclass
class Batch:
    """Part of one global batch, ready for the UNet."""

    latents: torch.Tensor  # [B, 4, h, w] float32, on the cache device, already scaled
    prompts: list[str]
    loss_weights: torch.Tensor | None  # [B, 1, h, w] (min 0, mean 1 per image) or None
    sample_ids: list[int]  # index of each sample's ImageRecord
    flipped: list[bool] = field(default_factory=list)
    # SDXL's size conditioning per sample: (original height, width, crop top, crop left, target height, width)
    sizes: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)


class _Sample(NamedTuple):
    latent: torch.Tensor
    prompt: str
    index: int
    flipped: bool
    weight: torch.Tensor | None
    size: tuple[int, int, int, int, int, int]


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed that depends only on (seed, *parts), stable across processes and machines."""
    words = np.random.SeedSequence([seed % 2**64, *parts]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class TrainingData:
    """Cached latents plus captions, serving samples as a pure function of (seed, step, position).

    `batch_size` is the global batch size (all processes and accumulation micro-batches together): step s
    consumes samples s * batch_size ... (s + 1) * batch_size - 1 of the epoch stream. With data parallel,
    process r of n asks for `batch(step, r * b, b)` with b = batch_size // n; every process caches all
    images, since any image can land at any position.

    Per-image options (resolution, buckets, flip_aug, tag shuffle/dropout, keep_tokens) come from the
    records, so that dataset-TOML subsets keep their own values; `settings` supplies template,
    latent_sampling and alpha_loss_weight; `attention_maps` reads DreamArtist's `<stem>_att` maps as loss
    weights (times the alpha weight where both are on). `resolution` is the base training size (previews render at it);
    `crops[i]` says where record i's picture is cut (its bucket), known from the start for bucketed records
    and after `cache_latents` for the others.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        settings: DataSettings,
        *,
        name: str,
        seed: int,
        batch_size: int,
        attention_maps: bool = False,
    ):
        if not records:
            raise UserError("no training images found")
        if batch_size < 1:
            raise UserError(f"batch_size {batch_size} must be at least 1")
        distinct = len({record.path for record in records})
        if batch_size > distinct:
            raise UserError(
                f"batch_size {batch_size} is larger than the {distinct} distinct training images; "
                "lower batch_size or add images"
            )
        sizes = sorted({record.resolution for record in records})
        if len(sizes) > 1:
            raise UserError(f"datasets use different resolutions {sizes}; set one resolution for all of them")
        self.records = list(records)
        self.settings, self.name, self.seed, self.batch_size = settings, name, seed, batch_size
        self.attention_maps = attention_maps  # DreamArtist's <stem>_att maps weight the loss
        if attention_maps and not any(attention_map_for(record.path) for record in self.records):
            folders = sorted({str(record.path.parent) for record in self.records})
            raise UserError(
                f"dreamartist.attention_maps is on but no training image in {', '.join(folders)} has an "
                "attention map (<image>_att.png beside <image>.png); add maps or set it to false"
            )
        self.template_lines = load_template(settings.template)
        self.resolution = sizes[0]
        self.bucketed = any(record.buckets is not None for record in self.records)
        self.crops: list[Crop | None] = _bucket_crops(self.records)
        # Epoch stream before shuffling: record i appears repeats_i times.
        self._stream = np.repeat(np.arange(len(self.records)), [r.repeats for r in self.records])
        self.buckets: dict[tuple[int, int], list[int]] = {}  # (width, height) -> record indices
        for index, record in enumerate(self.records):
            target = self.crops[index].target if self.crops[index] else record.resolution
            self.buckets.setdefault(target, []).append(index)
        self.buckets = dict(sorted(self.buckets.items()))
        # Each bucket's epoch stream before shuffling, and the batches an epoch has with buckets.
        self._bucket_streams = [
            np.repeat(indices, [self.records[i].repeats for i in indices])
            for indices in self.buckets.values()
        ]
        self._batches_per_epoch = sum(-(-len(stream) // batch_size) for stream in self._bucket_streams)
        self._epochs: dict[int, np.ndarray] = {}
        # (record index, flipped) -> (cached latent: the sample for "once" or the mean, std for "random"),
        # scaled, on the cache device; views into one tensor per bucket.
        self._latents: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._weights: list[torch.Tensor | None] = []

    def check_the_name_is_trained(self) -> None:
        """Some training prompt must hold the trigger word: through `[name]` in a template line, or in a
        caption (Kohya's way: class tokens such as `sks woman`). Else training would move nothing."""
        if any("[name]" in line for line in self.template_lines):
            return
        word = self.name.lower()
        if any(word in f"{r.caption_prefix} {r.caption} {r.caption_suffix}".lower() for r in self.records):
            return
        raise UserError(
            f"no training prompt holds the trigger word {self.name!r}: the template {self.settings.template!r} "
            "has no [name] and no caption contains the word; put [name] in the template (e.g. "
            'dataset.template="a photo of [name], [filewords]") or the word in the captions'
        )

    @property
    def num_images(self) -> int:
        """Number of image records (an image listed in two subsets counts twice)."""
        return len(self.records)

    @property
    def epoch_length(self) -> int:
        """Samples per epoch: every image times its repeats (with buckets, plus the samples that fill each
        bucket's last batch)."""
        return self._batches_per_epoch * self.batch_size if self.bucketed else len(self._stream)

    def cache_latents(
        self,
        vae: torch.nn.Module,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        batch_size: int = 8,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Encode every image (and its mirror image when flip_aug is on) with the VAE and keep the latents.

        The VAE must already sit on `device` in `dtype`. Latents are scaled by the VAE's scaling_factor and
        stored in float32 on `device`. `progress(done, total)` is called after each VAE batch. Images are
        encoded bucket by bucket (one picture size per VAE batch), at most `batch_size` and at most
        `VAE_BATCH_PIXELS` pixels at once.
        """
        total = sum(1 + record.flip_aug for record in self.records)
        done = 0
        self._latents, self._weights = {}, [None] * len(self.records)
        for target, indices in self.buckets.items():
            # Without buckets this is one call over all records, with the seed it always had.
            seed = derive_seed(self.seed, _STREAM_CACHE, *(target if self.bucketed else ()))
            records = [self.records[i] for i in indices]
            cuts = [self.crops[i] or record.resolution for i, record in zip(indices, records, strict=True)]
            report = progress and functools.partial(_progress_from, progress, done, total)
            at_once = max(1, min(batch_size, VAE_BATCH_PIXELS // (target[0] * target[1])))
            cache = encode_images(
                [(record.path, cut, record.flip_aug) for record, cut in zip(records, cuts, strict=True)],
                vae,
                device=device,
                dtype=dtype,
                batch_size=at_once,
                method=self.settings.latent_sampling,
                seed=seed,
                want_alpha=self.settings.alpha_loss_weight,
                attention_maps=self.attention_maps,
                progress=report,
            )
            done += len(cache.slots)
            for (position, flipped), slot in cache.slots.items():
                std = None if cache.std is None else cache.std[slot]
                self._latents[(indices[position], flipped)] = (cache.mean[slot], std)
            for position, index in enumerate(indices):
                record, alpha = self.records[index], cache.alphas[position]
                if self.crops[index] is None:  # no buckets: the size is known now that the image was read
                    self.crops[index] = crop_for(cache.original_sizes[position], record.resolution, None)
                # A uniform alpha (a fully opaque RGBA file) gives no weight (None): it weighs 1 everywhere.
                weight = None if alpha is None else alpha_loss_weight(alpha, cache.latent_size)
                grey = cache.attention[position]
                if grey is not None:  # an image without an attention map weighs 1 (times its alpha)
                    attention = attention_weight(grey, cache.latent_size)
                    weight = attention if weight is None else weight * attention
                self._weights[index] = None if weight is None else weight.to(device)

    def batch(self, step: int, start: int, size: int) -> Batch:
        """Samples at positions [start, start + size) of the global batch of `step` (0-based)."""
        if not self._latents:
            raise RuntimeError("TrainingData.batch() needs cache_latents() first")
        if step < 0 or start < 0 or size < 1 or start + size > self.batch_size:
            raise ValueError(
                f"positions [{start}, {start + size}) of step {step} lie outside the global batch "
                f"of {self.batch_size}"
            )
        samples = [self._sample(step, position) for position in range(start, start + size)]
        latents = torch.stack([sample.latent for sample in samples])
        weights = None
        if any(weight is not None for weight in self._weights):
            # Images without alpha weigh 1 everywhere, so the batch keeps one shape.
            ones = torch.ones_like(latents[0, :1])
            weights = torch.stack([ones if s.weight is None else s.weight for s in samples])
        return Batch(
            latents=latents,
            prompts=[sample.prompt for sample in samples],
            loss_weights=weights,
            sample_ids=[sample.index for sample in samples],
            flipped=[sample.flipped for sample in samples],
            sizes=[sample.size for sample in samples],
        )

    def summary(self) -> str:
        """One line for the training log."""
        folders = len({record.path.parent for record in self.records})
        width, height = self.resolution
        line = (
            f"{self.num_images} images in {folders} folder(s), {self.epoch_length} samples per epoch, "
            f"{width}x{height}, latent sampling {self.settings.latent_sampling}"
        )
        if not self.bucketed:
            return line
        counts = ", ".join(
            f"{w}x{h}: {len(indices)} image{'s' * (len(indices) > 1)}"
            for (w, h), indices in self.buckets.items()
        )
        return f"{line}, {len(self.buckets)} bucket(s) {counts}"

    def record_at(self, step: int, position: int) -> int:
        """Index of the record drawn at (step, position)."""
        if self.bucketed:
            epoch, batch = divmod(step, self._batches_per_epoch)
            return int(self._epoch(epoch)[batch, position])
        epoch, offset = divmod(step * self.batch_size + position, self.epoch_length)
        return int(self._epoch(epoch)[offset])

    def _epoch(self, epoch: int) -> np.ndarray:
        """The record indices of an epoch in order: [samples], or with buckets [batches, batch_size]."""
        if epoch not in self._epochs:
            if len(self._epochs) > 4:  # a batch touches at most two epochs; keep memory flat
                self._epochs.clear()
            rng = np.random.default_rng(derive_seed(self.seed, _STREAM_EPOCH, epoch))
            if not self.bucketed:
                self._epochs[epoch] = self._stream[rng.permutation(self.epoch_length)]
            else:
                batches = []
                for stream in self._bucket_streams:
                    order = stream[rng.permutation(len(stream))]
                    count = -(-len(order) // self.batch_size)
                    # np.resize repeats the order cyclically: the last batch wraps around to its start.
                    batches.append(np.resize(order, count * self.batch_size).reshape(count, self.batch_size))
                joined = np.concatenate(batches)
                self._epochs[epoch] = joined[rng.permutation(len(joined))]
        return self._epochs[epoch]

    def _sample(self, step: int, position: int) -> _Sample:
        index = self.record_at(step, position)
        record = self.records[index]
        sample_seed = derive_seed(self.seed, _STREAM_SAMPLE, step, position)
        rng = random.Random(sample_seed)
        flipped = record.flip_aug and rng.random() < 0.5
        line = rng.choice(self.template_lines)
        caption = process_tags(
            record.caption,
            rng,
            shuffle=record.shuffle_tags,
            keep_tokens=record.keep_tokens,
            dropout=record.tag_dropout,
        )
        caption = " ".join(part for part in (record.caption_prefix, caption, record.caption_suffix) if part)
        latent, std = self._latents[(index, flipped)]
        if std is not None:
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(sample_seed))
            latent = latent + std * noise.to(latent.device)
        weight = self._weights[index]
        if weight is not None and flipped:
            weight = weight.flip(-1)
        size = self.crops[index].size_ids(flipped)
        return _Sample(latent, fill_template(line, self.name, caption), index, flipped, weight, size)


def _bucket_crops(records: Sequence[ImageRecord]) -> list[Crop | None]:
    """Where each bucketed record's picture is cut (None for records without buckets): its bucket depends
    on the image's size, read from the file's header (once per file)."""
    sizes: dict = {}
    crops = []
    for record in records:
        if record.buckets is None:
            crops.append(None)
            continue
        if record.path not in sizes:
            sizes[record.path] = image_size(record.path)
        try:
            crops.append(crop_for(sizes[record.path], record.resolution, record.buckets))
        except UserError as error:
            raise UserError(f"{record.path}: {error}") from None
    return crops


def _progress_from(progress: Callable[[int, int], None], before: int, total: int, done: int, _: int) -> None:
    """A bucket's VAE progress as progress over all images."""
    progress(before + done, total)
