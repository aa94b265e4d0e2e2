"""Every config table of the three scripts, with its defaults (the only place they live) and its ranges.

Each table is a frozen dataclass; a TOML table maps to one, a key to a field (library/config.py reads and
checks them). Comments say what a value means and why the default is what it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from library.buckets import BucketSettings, check_buckets
from library.captions import check_caption_extension
from library.config import Table, above, as_size, at_least, between, check_name, image_side
from library.errors import UserError

# A1111's names of the samplers we have (library/sampling.py maps each to its diffusers scheduler).
Sampler = Literal["DPM++ 2M Karras", "DPM++ 2M", "Euler a", "Euler", "DDIM"]
Precision = Literal["no", "fp16", "bf16"]
FamilyName = Literal["auto", "sd1", "sd2", "sd2-v", "sdxl"]

# --------------------------------------------------------------------------------------------------
# Tables shared by the scripts


@dataclass(frozen=True)
class ModelFiles(Table):
    """What [model] tables share: the files beside the checkpoint and the family."""

    vae: str = ""  # optional separate VAE file or folder, as A1111's "SD VAE" setting
    family: FamilyName = "auto"  # override only for files the detection gets wrong
    config_dir: str = ""  # optional diffusers-format config folder overriding the built-in configs


@dataclass(frozen=True)
class ModelConfig(ModelFiles):
    """[model]: the checkpoint to train on (or render with)."""

    # A single-file checkpoint (.safetensors / .ckpt) as A1111 uses, or a diffusers folder; "builtin:toy" is
    # the toy model built into the project (a try-out that learns on a CPU). Required: no default.
    checkpoint: str = ""


@dataclass(frozen=True)
class SamplerSettings(Table):
    """How a picture is sampled: the knobs of A1111's txt2img tab (declared once, for every table)."""

    steps: int = at_least(1, 20)
    cfg_scale: float = at_least(0, 7.0)
    sampler: Sampler = "DPM++ 2M Karras"
    width: int = image_side(0, zero="the training resolution")
    height: int = image_side(0, zero="the training resolution")

    @classmethod
    def of(cls, table: SamplerSettings, size: tuple[int, int] = (512, 512)) -> SamplerSettings:
        """The sampler settings of any table that holds them, a width or height of 0 taking `size`."""
        return cls(
            steps=table.steps,
            cfg_scale=table.cfg_scale,
            sampler=table.sampler,
            width=table.width or size[0],
            height=table.height or size[1],
        )


@dataclass(frozen=True)
class SamplingConfig(SamplerSettings):
    """[preview] and [render]: what is rendered, and how (A1111's txt2img settings)."""

    prompt: str = ""  # "" = a prompt drawn from the training template, as A1111 does
    negative_prompt: str = ""
    seed: int = at_least(-1, 12345678)  # -1 = a new random seed each time
    batch_size: int = at_least(1, 1)


# --------------------------------------------------------------------------------------------------
# train_textual_inversion.py


@dataclass(frozen=True)
class EmbeddingConfig(Table):
    """[embedding]: the new word being learned."""

    name: str = ""  # trigger word = file stem of the saved embedding, e.g. "fr3nchl4dy"
    init_text: str = "*"  # word(s) whose token vectors start the embedding ("" = zeros)
    num_vectors: int = between(1, 75, 1)  # tokens it takes in a prompt (a chunk holds 75)
    init_rule: Literal["a1111", "kohya"] = "a1111"  # how init tokens fill the vectors (FACTS §2)
    init_from: str = ""  # start from an existing embedding file instead of init_text

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name:
            check_name(self.name, "embedding.name")


@dataclass(frozen=True)
class DatasetConfig(Table):
    """[dataset]: where the images and captions come from (FACTS §3)."""

    image_dir: str = ""  # a Kohya parent folder (`100_name class/`) or a flat folder of images
    dataset_config: str = ""  # a Kohya dataset TOML; when set, folder names are not parsed
    # Square side, or [width, height]; multiples of 8. 0 = the model's own: SD 1.x/2.x 512, SD 2.x-v 768, SDXL
    # 1024 (training reads it from the model before anything loads, and records it in the run's config.toml).
    resolution: int | tuple[int, int] = 0
    caption_extension: str = ".txt"
    template: str = "subject_filewords"  # stock template name, a file path, or an inline "...[name]..." line
    shuffle_tags: bool = False
    keep_tokens: int = at_least(0, 0)  # tags kept in place at the front when shuffling / dropping
    tag_dropout: float = field(
        default=0.0, metadata={"test": lambda v: 0 <= v < 1, "problem": "must be at least 0 and below 1"}
    )
    flip_aug: bool = False
    alpha_loss_weight: bool = False  # PNG alpha channel weights the loss
    latent_sampling: Literal["once", "deterministic", "random"] = "once"
    filename_word_regex: str = ""
    filename_join_string: str = " "
    # Aspect-ratio buckets, as Kohya's keys (library/buckets.py): each image is cut to the bucket nearest its
    # aspect ratio instead of a centre square; buckets are multiples of bucket_reso_steps with an area of at
    # most resolution², sides in [min_bucket_reso, max_bucket_reso]. Off: every image is cut to resolution.
    enable_bucket: bool = False
    min_bucket_reso: int = at_least(8, 256)
    max_bucket_reso: int = at_least(8, 1024)
    bucket_reso_steps: int = field(
        default=64,
        metadata={
            "test": lambda v: v >= 8 and v % 8 == 0,
            "problem": "must be a positive multiple of 8 (the VAE's factor); Kohya uses 64, or 32 for SDXL",
        },
    )
    bucket_no_upscale: bool = False  # small images keep their size: a bucket no larger than the image

    def __post_init__(self) -> None:
        super().__post_init__()
        check_caption_extension(self.caption_extension, "dataset.caption_extension")
        if self.resolution != 0:  # else checked once the model's own size is known (training.setup)
            as_size(self.resolution)
            self.bucket_settings()

    @property
    def size(self) -> tuple[int, int]:
        """(width, height); a resolution of 0 not yet resolved to the model's own counts as SD 1.x's 512."""
        return as_size(self.resolution or 512)

    def bucket_settings(self) -> tuple[BucketSettings | None, list[str]]:
        """The checked bucket settings (None when enable_bucket is off) and notes on adjusted values."""
        if not self.enable_bucket:
            return None, []
        return check_buckets(
            self.size, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps,
            self.bucket_no_upscale, where="dataset.",
        )  # fmt: skip


@dataclass(frozen=True)
class TrainSettings(Table):
    """[train]: the optimisation itself."""

    max_steps: int = at_least(1, 1000)  # optimizer updates
    batch_size: int = at_least(1, 1)  # per process
    gradient_accumulation_steps: int = at_least(1, 1)
    # A number, or an A1111 schedule string such as "0.05:10, 0.02:20, 0.005" (FACTS §2).
    lr: float | str = above(0, 0.005)
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"  # shape for a plain number
    lr_warmup_steps: int = at_least(0, 0)
    optimizer: Literal["adamw", "adamw8bit", "lion", "prodigy"] = "adamw"
    weight_decay: float = at_least(0, 0.0)
    clip_grad_mode: Literal["off", "value", "norm"] = "off"
    clip_grad_value: float | str = above(0, 0.1)  # a number or a schedule string, like lr
    mixed_precision: Precision = "no"
    gradient_checkpointing: bool = False
    # For 8 GB cards: gradient checkpointing, and the VAE leaves the GPU once the latents are cached.
    low_memory: bool = False
    # CUDA: replay the UNet's forward and backward as CUDA graphs (captured at the first step of each batch
    # shape); same results, far fewer kernel launches. Off with low_memory or gradient checkpointing.
    cuda_graphs: bool = True
    compile: bool = (
        False  # torch.compile the UNet (with cuda_graphs: mode "reduce-overhead"); slow first step
    )
    # 0 = the model's own text-encoder layer (SD 1.x: the last; SD 2.x and SDXL: the penultimate); n = the
    # n-th from the end, as A1111's "CLIP skip", Kohya's --clip_skip and ComfyUI's "CLIP Set Last Layer" -n.
    # Train with what you will render with: 2 for NovelAI-derived anime SD 1.x models; on SDXL (Pony,
    # Illustrious) 2 is what the model reads anyway.
    clip_skip: int = at_least(0, 0)
    noise_offset: float = at_least(0, 0.0)
    min_snr_gamma: float = at_least(0, 0.0)  # 0 = off; 5 is the usual value
    seed: int = at_least(0, 42)

    def __post_init__(self) -> None:
        super().__post_init__()
        from library.schedules import build_schedule  # a leaf module: no import cost, no circle

        # Schedule strings are read now, so a typo fails before the model loads.
        build_schedule(self.lr, self.max_steps, self.lr_scheduler, self.lr_warmup_steps, what="train.lr")
        if self.clip_grad_mode != "off":
            build_schedule(self.clip_grad_value, self.max_steps, what="train.clip_grad_value")


@dataclass(frozen=True)
class SaveConfig(Table):
    """[save]: what is written, where, and how often."""

    output_dir: str = "output"
    save_every_steps: int = at_least(0, 500)  # 0 = only the final embedding
    # .pt (A1111's own format), .safetensors (Kohya's), .png / .webp (A1111's image embeddings)
    formats: tuple[Literal["pt", "safetensors", "png", "webp"], ...] = ("pt", "safetensors")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.formats:
            raise UserError(
                "save.formats is empty: list at least one, e.g. save.formats=['pt', 'safetensors']"
            )
        if not self.output_dir.strip():
            raise UserError("save.output_dir is empty: name the run folder, e.g. save.output_dir=output/face")

    save_optimizer_state: bool = True
    embed_in_png: bool = False  # also write A1111 PNG embeddings beside the previews


@dataclass(frozen=True)
class PreviewConfig(SamplingConfig):
    """[preview]: images rendered during training with the current vectors."""

    every_steps: int = at_least(0, 0)  # 0 = no previews
    # Kohya's --sample_prompts: a text file, one prompt per line with its own options
    # (`... --n negative --w 512 --h 512 --d seed --s steps --l cfg --ss sampler`); "" = the prompt above
    prompts_file: str = ""


@dataclass(frozen=True)
class EmbeddingEntry(Table):
    """[[embeddings]]: one of several embeddings a run trains together (a cast of characters), each on its
    own images. A key left out comes from [embedding] or [dataset]."""

    name: str = ""  # its trigger word
    image_dir: str = ""  # its images ("" = dataset.image_dir)
    dataset_config: str = ""  # or a Kohya dataset TOML ("" = dataset.dataset_config)
    template: str = ""  # "" = dataset.template
    init_text: str | None = None  # None = embedding.init_text ("" = zeros)
    num_vectors: int = between(0, 75, 0)  # 0 = embedding.num_vectors
    init_from: str = ""  # start from this embedding file instead of init_text
    lr_factor: float = above(0, 1.0)  # its learning rate is train.lr times this


@dataclass(frozen=True)
class DreamArtistConfig(Table):
    """[dreamartist]: DreamArtist's APT (library/dreamartist.py, FACTS §10): a positive embedding NAME and a
    negative NAME-neg trained together, with classifier-free guidance inside the training step."""

    enabled: bool = False
    # false = only NAME is trained; the training CFG then guides against the empty prompt
    negative: bool = True
    neg_num_vectors: int = between(1, 75, 6)  # DreamArtist: 3 positive, 6 negative vectors
    neg_init_text: str = (
        "*"  # the negative starts from these words, plus a tiny random offset (as DreamArtist)
    )
    neg_lr_factor: float = above(0, 1.0)  # the negative's learning rate is train.lr times this, at every step
    # Training CFG: a number, or "low-high:curve" (curve ln, cos or cos2): low at t = 0, high at t = 999.
    cfg_scale: float | str = 3.0
    reconstruction_loss: bool = False  # L1 of the decoded x̂0 against the image (needs the VAE on the device)
    reconstruction_weight: float = at_least(0, 1.0)
    # DreamArtist's per-image attention maps: <image>_att.png, grey 50 % = loss weight 1, white = 5, black = 0
    attention_maps: bool = False
    # EMA of the vectors after every update; 0 = off (0.97 is DreamArtist's suggestion). "overwrite" = the live
    # vectors become the average every ema_every updates (DreamArtist); "copy" = saved apart as NAME-ema.
    ema_rate: float = field(
        default=0.0,
        metadata={"test": lambda v: 0 <= v < 1, "problem": "must be at least 0 and below 1 (0 = off)"},
    )
    ema_mode: Literal["overwrite", "copy"] = "overwrite"
    ema_every: int = at_least(1, 25)

    def __post_init__(self) -> None:
        super().__post_init__()
        from library.dreamartist import parse_cfg_scale  # checked now, before anything loads

        parse_cfg_scale(self.cfg_scale)


@dataclass(frozen=True)
class EmbeddingPlan:
    """One embedding of a run, resolved: what it is, what it learns from, how fast."""

    embedding: EmbeddingConfig
    dataset: DatasetConfig
    lr_factor: float = 1.0
    own_images: bool = True  # False: it learns from the images of another embedding (DreamArtist's NAME-neg)


@dataclass(frozen=True)
class TrainConfig(Table):
    """The whole configuration of train_textual_inversion.py."""

    model: ModelConfig = field(default_factory=ModelConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    # Several embeddings in one run, each on its own images (one optimizer; every batch holds train.batch_size
    # samples of each, so each one's steps and saves count as if it were trained alone). Empty = the one
    # embedding of [embedding] on [dataset].
    embeddings: tuple[EmbeddingEntry, ...] = ()
    train: TrainSettings = field(default_factory=TrainSettings)
    save: SaveConfig = field(default_factory=SaveConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    dreamartist: DreamArtistConfig = field(default_factory=DreamArtistConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.plans()  # a cast that cannot be resolved fails now, before anything loads

    def plans(self) -> list[EmbeddingPlan]:
        """The embeddings this run trains, each with its own dataset and learning-rate factor (DreamArtist's
        NAME-neg after NAME, learning from NAME's images)."""
        da = self.dreamartist
        if da.enabled:
            if self.embeddings:
                raise UserError(
                    "dreamartist.enabled trains one pair NAME / NAME-neg: use [embedding], not [[embeddings]]"
                )
            plans = [EmbeddingPlan(self.embedding, self.dataset)]
            if da.negative and self.embedding.name:
                negative = dataclasses.replace(
                    self.embedding,
                    name=f"{self.embedding.name}-neg",
                    init_text=da.neg_init_text,
                    num_vectors=da.neg_num_vectors,
                    init_from="",
                )
                plans.append(EmbeddingPlan(negative, self.dataset, da.neg_lr_factor, own_images=False))
            return plans
        if not self.embeddings:
            return [EmbeddingPlan(self.embedding, self.dataset)]
        if self.embedding.name:
            raise UserError(
                f"embedding.name = {self.embedding.name!r} and [[embeddings]] both name embeddings; list every "
                "one in [[embeddings]] and leave embedding.name empty ([embedding] then holds their defaults)"
            )
        plans, seen = [], set()
        for number, entry in enumerate(self.embeddings, start=1):
            where = f"embeddings[{number}]" + (f" {entry.name!r}" if entry.name else "")
            if not entry.name:
                raise UserError(f"{where}: has no name; give each embedding its trigger word (name = ...)")
            check_name(entry.name, f"{where} name")
            if entry.name.lower() in seen:  # CLIP lowercases prompts: two names differing in case collide
                raise UserError(f"{where}: the name is given twice; give each embedding its own name")
            seen.add(entry.name.lower())
            embedding = dataclasses.replace(
                self.embedding,
                name=entry.name,
                init_text=self.embedding.init_text if entry.init_text is None else entry.init_text,
                num_vectors=entry.num_vectors or self.embedding.num_vectors,
                init_from=entry.init_from,
            )
            own_images = bool(entry.image_dir or entry.dataset_config)
            dataset = dataclasses.replace(
                self.dataset,
                image_dir=entry.image_dir if own_images else self.dataset.image_dir,
                dataset_config=entry.dataset_config if own_images else self.dataset.dataset_config,
                template=entry.template or self.dataset.template,
            )
            plans.append(EmbeddingPlan(embedding, dataset, entry.lr_factor))
        return plans


# --------------------------------------------------------------------------------------------------
# sweep_validate.py


@dataclass(frozen=True)
class SweepRunConfig(Table):
    """[run]: the training run whose saved steps are compared."""

    folder: str = ""  # run folder holding embeddings/NAME-N.pt|.safetensors (and config.toml, loss.csv)
    name: str = (
        ""  # trigger word; "" = embedding.name of the run's config.toml, or the one NAME in embeddings/
    )


@dataclass(frozen=True)
class SweepModelConfig(ModelFiles):
    """[model]: the checkpoints to render on; they are loaded one at a time."""

    # Checkpoint files or diffusers folders; "run:checkpoint" = the one the run was trained on (its config.toml).
    checkpoints: tuple[str, ...] = ("run:checkpoint",)


@dataclass(frozen=True)
class SweepAxis(Table):
    """[x], [y], [z]: one axis of A1111's X/Y/Z plot (X = columns, Y = rows, Z = grids side by side)."""

    type: Literal[
        "none", "prompt_sr", "step", "checkpoint", "cfg_scale", "seed", "sampler", "steps", "size"
    ] = "none"
    # Comma-separated as in A1111 (CSV quotes allowed), a single number, or a TOML list (one value per item).
    # Steps: "every 20" = every saved step divisible by 20, "20-140 (+20)" ranges; a checkpoint axis with no
    # values takes model.checkpoints.
    values: str | int | float | tuple[str | int | float, ...] = ""


@dataclass(frozen=True)
class SweepSettings(Table):
    """[sweep]: where the sweep writes and how it renders."""

    output_dir: str = ""  # "" = <run folder>/validation
    grid_margin: int = at_least(0, 16)  # blank pixels between grid cells
    images_per_batch: int = at_least(
        1, 16
    )  # images per UNet call; all cells of one checkpoint are batched together
    mixed_precision: Precision = "fp16"  # on CUDA (the VAE decodes in fp32 under fp16); CPU renders fp32


@dataclass(frozen=True)
class FineConfig(Table):
    """[fine]: coarse-to-fine, a second pass every few steps over one interval of the coarse sweep."""

    interval: str = ""  # "" = off; "40-80" = saved steps 40..80; "auto" = the interval the scores point to
    every: int = at_least(1, 5)  # render every 5th step inside the interval
    coarse: bool = True  # false = skip the coarse pass (you looked at it already; needs an explicit interval)


@dataclass(frozen=True)
class ScoringConfig(Table):
    """[scoring]: CLIP scores that back the choice of a step (off when `model` is empty)."""

    # A local CLIP folder (transformers layout) or its weights file, never downloaded; "builtin:toy" = the
    # toy world's scorer (for runs on the builtin:toy model).
    model: str = ""
    reference_dir: str = ""  # the training images; "" = the run's dataset from its config.toml
    class_word: str = "person"  # replaces the trigger word when prompt adherence is measured
    # An image passes when its likeness to the training images reaches this fraction of the training images'
    # likeness to each other (1.0 = as alike as the training photos are among themselves).
    likeness_bar: float = 0.8
    collapse_ratio: float = at_least(
        0, 0.5
    )  # flag "one look" when seed variety falls below this share of step 1's
    adherence_drop: float = at_least(
        0, 0.1
    )  # flag when adherence falls this fraction below the best earlier step's


@dataclass(frozen=True)
class ExportConfig(Table):
    """[export]: where --export STEP writes NAME.pt / NAME.safetensors (e.g. A1111's embeddings/ folder)."""

    folder: str = ""
    formats: tuple[Literal["pt", "safetensors", "png", "webp"], ...] = ("pt", "safetensors")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.formats:
            raise UserError(
                "export.formats is empty: list at least one, e.g. export.formats=['pt', 'safetensors']"
            )


@dataclass(frozen=True)
class SweepConfig(Table):
    """The whole configuration of sweep_validate.py."""

    run: SweepRunConfig = field(default_factory=SweepRunConfig)
    model: SweepModelConfig = field(default_factory=SweepModelConfig)
    render: SamplingConfig = field(
        default_factory=SamplingConfig
    )  # prompt, seed, batch_size = images per cell
    x: SweepAxis = field(default_factory=SweepAxis)
    y: SweepAxis = field(default_factory=SweepAxis)
    z: SweepAxis = field(default_factory=SweepAxis)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    fine: FineConfig = field(default_factory=FineConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# --------------------------------------------------------------------------------------------------
# generate_dataset.py


@dataclass(frozen=True)
class GenerateSettings(SamplingConfig):
    """[generate]: txt2img as A1111 does it, with any number of Prompt S/R axes (FACTS §4).

    `prompt` and `negative_prompt` take A1111's syntax: (word:1.2), [word], BREAK, prompts over 75 tokens,
    embeddings by file stem. `batch_size` is A1111's (a grid row per batch); `gpu_batch_size` images of one
    combination are denoised together; `seed` -1 is drawn once and recorded, and image i of every
    combination uses seed + i, whatever the batches.
    """

    seed: int = at_least(-1, -1)
    width: int = image_side(512)
    height: int = image_side(512)
    # Prompt S/R axes: each a comma-separated list (CSV quotes allowed) whose first value occurs in the prompt
    # or the negative prompt. Axis 1 = grid columns (X), 2 = rows (Y), 3 = grids side by side (Z); further
    # axes give one overview per combination of their values. Every combination gets all the images.
    axes: tuple[str, ...] = ()
    batch_count: int = at_least(1, 1)  # batches per axis combination
    # Images of one combination denoised together (each has its own seed: any grouping gives the same images,
    # up to the last bits of GPU arithmetic; --reproduce keeps the recorded number).
    # 0 = as many as fit 16 at 512² (4 at 1024²) and half the GPU's free memory; the run records its number.
    gpu_batch_size: int = at_least(0, 0)
    # 0 = the model's own text-encoder layer (SD 1.x: the last; SDXL: the penultimate); n = the n-th from
    # the end, as A1111's "CLIP skip" and ComfyUI's "CLIP Set Last Layer" -n
    clip_skip: int = at_least(0, 0)
    embeddings: tuple[str, ...] = ()  # embedding files or folders (A1111's embeddings/); keyword = file stem
    # On CUDA: fp16 runs the UNet and text encoder in fp16 and decodes in fp32 (SD's VAE overflows in fp16);
    # bf16 runs everything in bf16. The CPU always renders in fp32.
    mixed_precision: Precision = "fp16"
    output_dir: str = "output/generated"
    grids: bool = True  # a grid per axis combination, and the X/Y/Z overview of the first seed
    grid_margin: int = at_least(0, 0)  # blank pixels between grid cells


@dataclass(frozen=True)
class PhotosConfig(Table):
    """[photos]: real photos → square head-and-shoulders crops, resized; optional flips and captions."""

    input_dir: str = ""
    output_dir: str = ""
    size: int = image_side(512)  # side of the square output images
    # Side of the crop as a multiple of the detected face's side: 2.5 takes in the hair, neck and shoulders.
    face_scale: float = at_least(1, 2.5)
    face_offset: float = 0.15  # crop centre sits this many face heights below the face centre (shoulders)
    flip: bool = False  # also write mirrored copies (A1111 never flips at train time)
    # "" = keep an existing <stem>.txt caption; else a template where [filewords] is that caption (or the
    # file name without leading numbers, as A1111 reads it), e.g. "a photo of a woman, [filewords]".
    caption: str = ""
    caption_extension: str = ".txt"


@dataclass(frozen=True)
class PickConfig(Table):
    """[pick]: automatic flags shown on the review page with their reasons; nothing is ever deleted."""

    faces: bool = True  # flag images with no face or several faces (OpenCV's Haar cascades)
    # Flag an image whose 64-bit perceptual hash is at most this many bits from an earlier one's; -1 = off.
    duplicate_distance: int = between(-1, 64, 5)
    # Sharpness in % (the share of edge steepness a 1-pixel blur takes away, measured at the picture's own
    # size, at most 1024 px; crisp pictures score about 50-90, clearly blurred ones under 30) below which
    # an image is flagged blurry; 0 = off.
    blur_threshold: float = between(0, 100, 40.0)
    background: str = ""  # the plain background colour asked for ("gray", "#808080"); "" = no check
    background_tolerance: float = at_least(
        0, 60.0
    )  # RGB distance from that colour still counted as background
    background_fraction: float = between(
        0, 1, 0.6
    )  # share of the image's top and side borders that must be that colour


@dataclass(frozen=True)
class SelectConfig(Table):
    """[select]: the kept images of a review, written into a Kohya folder `<repeats>_<name> <class>`."""

    output_dir: str = ""  # the Kohya parent folder; train with dataset.image_dir = this folder
    name: str = ""  # trigger word, e.g. "fr3nchl4dy"
    class_tokens: str = ""  # e.g. "woman"
    repeats: int = at_least(1, 100)
    # [name], [class], and [filewords] = the image's own caption (a .txt beside it) or its Prompt S/R values.
    caption: str = "[name] [class], [filewords]"
    caption_extension: str = ".txt"


@dataclass(frozen=True)
class GenerateConfig(Table):
    """The whole configuration of generate_dataset.py (each subcommand reads its own tables)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    photos: PhotosConfig = field(default_factory=PhotosConfig)
    pick: PickConfig = field(default_factory=PickConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
