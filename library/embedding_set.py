"""The embeddings one run trains, together: named, each with one block of vectors per text encoder of the
model's family (SD 1.x: `clip_l` [n, 768]; SDXL: `clip_l` [n, 768] and `clip_g` [n, 1280]).

One optimizer updates them all, a parameter group per embedding, so each may have its own learning-rate
factor; gradients are clipped per embedding. A plain run is a set of one; a cast of characters, or
DreamArtist's `NAME` and `NAME-neg`, are sets of several.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from library.embeddings import Embedding, init_vectors, load_embedding
from library.errors import UserError
from library.prompts import CHUNK_LENGTH


@dataclass
class TrainedEmbedding:
    """One embedding of the set: its trigger word, its vector blocks and its learning-rate factor."""

    name: str
    blocks: dict[str, torch.nn.Parameter]  # by text-encoder key, in the family's order
    lr_factor: float = 1.0

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.blocks.values())

    @property
    def num_vectors(self) -> int:
        return next(iter(self.blocks.values())).shape[0]

    def describe(self) -> str:
        """Its name and shapes as a message shows them: "d3mo 1 x 768", "face clip_l 2 x 768, clip_g 2 x 1280"."""
        shapes = [(key, " x ".join(map(str, block.shape))) for key, block in self.blocks.items()]
        if len(shapes) == 1:
            return f"{self.name} {shapes[0][1]}"
        return f"{self.name} " + ", ".join(f"{key} {shape}" for key, shape in shapes)


def starting_blocks(parts, init_text: str, num_vectors: int, rule: str) -> dict[str, torch.Tensor]:
    """New vectors for every text encoder, each copied from rows of that encoder's own token table."""
    return {
        key: init_vectors(parts.tokenizer, encoder, init_text, num_vectors, rule)
        for key, encoder in parts.text_encoders.items()
    }


def blocks_from_file(parts, path, embedding: Embedding | None = None) -> dict[str, torch.Tensor]:
    """The vectors of an embedding file (or of an `Embedding` read from `path`) as this model's blocks; a
    file made for another family, of more vectors than a prompt holds, or not finite is a UserError."""
    embedding = embedding or load_embedding(path)
    blocks = parts.family.blocks(embedding.vectors, str(path), parts.widths)
    if embedding.num_vectors > CHUNK_LENGTH:
        raise UserError(
            f"{path}: {embedding.num_vectors} vectors, more than the {CHUNK_LENGTH} a prompt chunk holds; "
            "use an embedding of fewer vectors"
        )
    if not all(torch.isfinite(block).all() for block in blocks.values()):
        raise UserError(f"{path}: the embedding holds NaN or infinite numbers; start from another file")
    return {key: block.float() for key, block in blocks.items()}


class EmbeddingSet:
    """The embeddings a run trains, in order (the first is the run's primary: its name names the run)."""

    def __init__(self, members: list[TrainedEmbedding]) -> None:
        if not members:
            raise ValueError("an embedding set needs at least one embedding")
        self.members = members

    @classmethod
    def of(cls, named_blocks: list[tuple[str, dict[str, torch.Tensor], float]], device) -> EmbeddingSet:
        """Trainable float32 parameters on `device` from (name, blocks, lr factor)."""
        return cls(
            [
                TrainedEmbedding(
                    name,
                    {k: torch.nn.Parameter(v.to(device, torch.float32)) for k, v in blocks.items()},
                    factor,
                )
                for name, blocks, factor in named_blocks
            ]
        )

    def __iter__(self) -> Iterator[TrainedEmbedding]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def names(self) -> list[str]:
        return [member.name for member in self.members]

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for member in self.members for p in member.parameters]

    def param_groups(self) -> list[dict]:
        """One optimizer parameter group per embedding (the learning rate is set at every step)."""
        return [{"params": member.parameters} for member in self.members]

    def register(self, conditioner) -> None:
        """Make every embedding of the set known to a conditioner, by reference (it sees each update)."""
        for member in self.members:
            conditioner.set_embedding(member.name, member.blocks)

    def snapshot(self) -> list[torch.Tensor]:
        """Device copies of every parameter (no sync), to go back to."""
        return [p.detach().clone() for p in self.parameters]

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        for parameter, saved in zip(self.parameters, snapshot, strict=True):
            parameter.data.copy_(saved)

    @staticmethod
    def finite(tensors: list[torch.Tensor]) -> torch.Tensor:
        """A 0-dim bool on the device: every number finite (read it later, with other values, in one sync)."""
        return torch.stack([torch.isfinite(t).all() for t in tensors]).all()
