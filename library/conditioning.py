"""Prompts into what the UNet reads, for any model family, with any number of embeddings in any prompt.

`Conditioner.encode(prompts)` gives a `Conditioning`: the per-token context (each text encoder's chosen
hidden state, side by side: 768 wide for SD 1.x, 2048 for SDXL) and, where the family has one, the pooled
vector (SDXL: bigG's projected final state at the end token). A1111's rules hold for every encoder
(library/prompts.py): chunks of 75 tokens, emphasis on the encoder's output with its mean restored, and
each embedding's block for that encoder written over its placeholder slots. library/denoiser.py hands
it to the UNet.

The pooled vector is read at the end token of the first chunk, as A1111, Forge and ComfyUI read it when
they splice an embedding into a prompt: never at the new word's slots (FACTS §9, the EOS trap).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.errors import UserError
from library.families import Family
from library.prompts import PromptChunk, PromptTokenizer, to_device


@dataclass(frozen=True)
class Conditioning:
    """What a batch of prompts tells the UNet."""

    context: torch.Tensor  # [B, 77 * k, context width]
    pooled: torch.Tensor | None = None  # [B, pooled width] (SDXL)

    def to(self, dtype: torch.dtype) -> Conditioning:
        return Conditioning(self.context.to(dtype), None if self.pooled is None else self.pooled.to(dtype))

    def select(self, index) -> Conditioning:
        """Rows of the batch (an index, a slice or an index tensor)."""
        return Conditioning(self.context[index], None if self.pooled is None else self.pooled[index])

    def expand(self, n: int) -> Conditioning:
        """One prompt's conditioning for `n` images."""
        if self.context.shape[0] == n:
            return self
        if self.context.shape[0] != 1:
            raise ValueError(f"a conditioning of batch {self.context.shape[0]} cannot serve {n} images")
        pooled = None if self.pooled is None else self.pooled.expand(n, -1)
        return Conditioning(self.context.expand(n, *self.context.shape[1:]), pooled)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Conditioning(torch.cat([p.context for p in parts]), pooled)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors as positional arguments (what a captured CUDA graph takes)."""
        return (self.context,) if self.pooled is None else (self.context, self.pooled)


class Conditioner:
    """Encodes prompts as A1111 does, with the embeddings of a set placed by their token ids.

    `clip_skip` 0 reads each encoder's hidden state as the family does (SD 1.x/2.x: the last, after the
    final LayerNorm; SDXL: the penultimate, without it); n >= 1 reads the n-th from the end (A1111's "CLIP
    skip", ComfyUI's "CLIP Set Last Layer" -n), with the final LayerNorm where the family applies one.
    """

    def __init__(
        self, family: Family, tokenizer, text_encoders: dict, *, clip_skip: int = 0, comma_backtrack=20
    ):
        layers = min(encoder.config.num_hidden_layers for encoder in text_encoders.values())
        if not 0 <= clip_skip <= layers:
            raise UserError(
                f"clip_skip must be 0 (the model's own) to {layers} for this model, got {clip_skip}"
            )
        self.family = family
        self.text_encoders = text_encoders
        self.clip_skip = clip_skip
        self.tokens = PromptTokenizer(tokenizer, comma_backtrack=comma_backtrack)
        self._blocks: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def of(cls, parts, *, clip_skip: int = 0) -> Conditioner:
        """The conditioner of a loaded model (library/parts.SDParts)."""
        return cls(parts.family, parts.tokenizer, parts.text_encoders, clip_skip=clip_skip)

    # ----- embeddings -------------------------------------------------------------------------------

    @property
    def embedding_names(self) -> list[str]:
        return self.tokens.names

    def set_embedding(self, name: str, blocks: dict[str, torch.Tensor]) -> None:
        """Register (or replace) embedding `name`: one block [n, width] per text encoder of the family.

        The tensors are kept by reference, so trained parameters receive gradients from `encode` and their
        updates show in the next call.
        """
        for key, encoder in self.text_encoders.items():
            width = encoder.get_input_embeddings().embedding_dim
            block = blocks.get(key)
            if block is None or block.ndim != 2 or block.shape[1] != width:
                found = {k: tuple(v.shape) for k, v in blocks.items()}
                raise UserError(
                    f"embedding {name!r} has vectors {found}, but this {self.family.title} model needs {key} "
                    f"[n, {width}]; use an embedding made for this model family"
                )
        counts = {block.shape[0] for block in blocks.values()}
        if len(counts) != 1:
            raise UserError(
                f"embedding {name!r}: its blocks have different numbers of vectors {sorted(counts)}"
            )
        self.tokens.add_name(name, counts.pop())
        self._blocks[name] = {key: blocks[key] for key in self.text_encoders}

    def remove_embedding(self, name: str) -> None:
        """Forget embedding `name`; its name is plain text in prompts again."""
        self.tokens.remove_name(name)
        del self._blocks[name]

    def tokenize_line(self, text: str) -> list[PromptChunk]:
        return self.tokens.tokenize_line(text)

    # ----- encoding ---------------------------------------------------------------------------------

    def encode(self, prompts: list[str]) -> Conditioning:
        """Encode prompts; shorter prompts are padded with empty chunks to the longest one's."""
        return self._encode_groups([prompts])[0]

    def encode_pair(self, prompts: list[str], negatives: list[str]) -> tuple[Conditioning, Conditioning]:
        """Encode prompts and negative prompts padded to the same length, as classifier-free guidance needs.
        Each side keeps its own emphasis normalisation, as when A1111 encodes them separately."""
        cond, uncond = self._encode_groups([prompts, negatives])
        return cond, uncond

    def _encode_groups(self, groups: list[list[str]]) -> list[Conditioning]:
        """Encode several batches in one call per encoder; chunks are normalised per batch and index."""
        if any(len(group) == 0 for group in groups):
            raise ValueError("encode needs at least one prompt")
        chunk_lists = [[self.tokens.tokenize_line(prompt) for prompt in group] for group in groups]
        count = max(len(chunks) for group in chunk_lists for chunks in group)
        # Rows are ordered group, chunk index, prompt: each (group, index) block is A1111's chunk batch.
        rows = [
            chunks[i] if i < len(chunks) else self.tokens.empty_chunk
            for group in chunk_lists
            for i in range(count)
            for chunks in group
        ]
        states, pooled = [], None
        for spec in self.family.text_encoders:
            state, pooled_here = self._run_encoder(spec, rows)
            states.append(state)
            pooled = pooled_here if spec.pooled else pooled
        outputs, start = [], 0
        for group in groups:
            size = len(group) * count
            pieces = []
            for state in states:
                block = state[start : start + size].view(count, len(group), *state.shape[1:])
                block = _apply_emphasis(block, rows[start : start + size])
                pieces.append(
                    block.transpose(0, 1).reshape(len(group), count * state.shape[1], state.shape[2])
                )
            first_chunks = None if pooled is None else pooled[start : start + len(group)]  # chunk index 0
            outputs.append(Conditioning(torch.cat(pieces, dim=-1), first_chunks))
            start += size
        return outputs

    def _run_encoder(self, spec, rows: list[PromptChunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One encoder on the chunks, the embeddings' blocks in their slots -> (state [R, 77, width],
        pooled [R, projection width] or None)."""
        encoder = self.text_encoders[spec.key]
        token_embedding = encoder.get_input_embeddings()
        device = token_embedding.weight.device
        input_ids = to_device([row.ids(spec.pad_id) for row in rows], torch.long, device)
        hook = self._fix_hook(spec.key, rows, device)
        # The hook lives only for this call, so the text encoder behaves normally everywhere else.
        handle = token_embedding.register_forward_hook(hook) if hook is not None else None
        layer = self.clip_skip or spec.layer
        try:
            output = encoder(input_ids=input_ids, output_hidden_states=layer > 1 or not spec.final_norm)
        finally:
            if handle is not None:
                handle.remove()
        # transformers 4.x nests the layers in `text_model`; 5.x puts them on the model itself.
        final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
        if layer == 1 and spec.final_norm:
            state = output.last_hidden_state
        else:
            state = output.hidden_states[-layer]
            state = final_norm(state) if spec.final_norm else state
        pooled = None
        if spec.pooled:  # the final state after the norm, at each chunk's end token, projected
            ends = to_device([row.end for row in rows], torch.long, device)
            at_end = output.last_hidden_state[torch.arange(len(rows), device=device), ends]
            pooled = encoder.text_projection(at_end)
        return state, pooled

    def _fix_hook(self, key: str, rows: list[PromptChunk], device: torch.device):
        """A forward hook that writes the embeddings' `key` blocks over their placeholder slots, or None."""
        row_index: list[int] = []
        slot_index: list[int] = []
        pieces: list[torch.Tensor] = []
        for row, chunk in enumerate(rows):
            for offset, name in chunk.fixes:
                vectors = self._blocks[name][key]
                count = vectors.shape[0]
                row_index += [row] * count
                slot_index += range(offset + 1, offset + 1 + count)  # +1 skips BOS
                pieces.append(vectors)
        if not pieces:
            return None
        rows_at = to_device(row_index, torch.long, device)
        slots_at = to_device(slot_index, torch.long, device)

        def write_vectors(module, inputs, output: torch.Tensor) -> torch.Tensor:
            values = torch.cat([piece.to(device=output.device, dtype=output.dtype) for piece in pieces])
            # Out-of-place index_put: autograd carries the gradient to the vectors, not to the table.
            return output.index_put((rows_at, slots_at), values)

        return write_vectors


def _apply_emphasis(z: torch.Tensor, rows: list[PromptChunk]) -> torch.Tensor:
    """A1111 "Original" emphasis on z [k, B, 77, dim]: weight each token, then restore each chunk batch's mean."""
    if all(weight == 1.0 for row in rows for weight in row.multipliers):
        return z  # multiplying by ones and rescaling by 1 changes nothing
    multipliers = to_device([row.multipliers for row in rows], torch.float32, z.device)
    z32 = z.float()
    original_mean = z32.mean(dim=(1, 2, 3), keepdim=True)
    weighted = z32 * multipliers.view(z.shape[:3]).unsqueeze(-1)
    ratio = original_mean / weighted.mean(dim=(1, 2, 3), keepdim=True)
    # A weighted mean of exactly zero would give inf (A1111 then returns inf/NaN): leave it unscaled.
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
    return (weighted * ratio).to(z.dtype)
