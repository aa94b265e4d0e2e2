"""A1111 prompt syntax and prompt encoding with textual-inversion embeddings.

Follows AUTOMATIC1111's rules (FACTS.md section 4) so that a prompt gives the same conditioning here as
in the web UI:
- `(x)`, `[x]`, `(x:1.3)`, escapes and `BREAK` are parsed exactly as A1111's `parse_prompt_attention`;
- prompts are cut into chunks of 75 tokens (+ BOS/EOS), backing up to a comma within the last 20 tokens;
- an embedding is found by its name's token ids (longest name first) and its vectors replace the input
  token embeddings of as many placeholder slots;
- weights multiply the text encoder's output, which is then rescaled to its original mean.

Deliberate differences from A1111: when a comma backtrack moves the tail of a chunk into the next one,
embeddings in that tail move with their placeholder slots (A1111 leaves them behind, writing their
vectors over padding); a weight that is not a number, `(x:.)`, is a UserError instead of a crash; if
the weighted output's mean is exactly zero the mean is not restored (A1111 would return inf/NaN).
Prompt editing (`[a:b:0.5]`) and `AND` are not part of this module.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from library.errors import UserError

CHUNK_LENGTH = 75  # prompt tokens per chunk; BOS and EOS make it 77
ROUND_MULTIPLIER = 1.1  # `(x)`
SQUARE_MULTIPLIER = 1 / 1.1  # `[x]`
EMBEDDING_PLACEHOLDER_ID = 0  # A1111 puts token id 0 in the slots an embedding's vectors fill
_TOKENIZE_CACHE_SIZE = 4096  # captions repeat every epoch; distinct ones rarely exceed this

# One token of A1111's attention syntax per match; group 1 is the number of a `:weight)` closer.
_RE_ATTENTION = re.compile(
    r"""
      \\[()\[\]\\]              # escaped bracket or backslash: a literal character
    | \\                        # a lone backslash: kept as text
    | [(\[]                     # opening bracket
    | :\s*([+-]?[.\d]+)\s*\)    # `:1.3)` closes a round bracket with an explicit weight
    | [)\]]                     # closing bracket
    | [^\\()\[\]:]+             # plain text
    | :                         # a colon that is not part of a weight
    """,
    re.VERBOSE,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
BREAK = ["BREAK", -1]  # how parse_prompt_attention marks a chunk break, as A1111 does


def parse_prompt_attention(text: str, where: str = "") -> list[list]:
    """Split a prompt into `[[text, weight], ...]` exactly as A1111 does.

    `(x)` multiplies by 1.1, `[x]` divides by 1.1, `(x:1.3)` multiplies by 1.3, nesting multiplies,
    `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters, unclosed brackets close at the end, runs of
    equal weight merge, `BREAK` becomes `["BREAK", -1]`, and an empty prompt gives `[["", 1.0]]`.
    A weight that is not a number is a UserError naming `where` (a file or key), else the prompt.
    """
    result: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for item in result[start:]:
            item[1] *= multiplier

    for match in _RE_ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            result.append([piece[1:], 1.0])
        elif piece == "(":
            open_round.append(len(result))
        elif piece == "[":
            open_square.append(len(result))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), _parse_weight(weight, where or f"prompt {text!r}"))
        elif piece == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_RE_BREAK.split(piece)):
                if i > 0:
                    result.append(list(BREAK))
                result.append([part, 1.0])

    # Unclosed brackets close at the end, round ones first (the order fixes the float rounding).
    for start in open_round:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        multiply_from(start, SQUARE_MULTIPLIER)

    if not result:
        return [["", 1.0]]
    return _merge_equal_weights(result)


def _parse_weight(weight: str, where: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise UserError(
            f"{where}: {weight!r} is not a number; write an attention weight like (word:1.2), or \\( \\) "
            "for literal brackets"
        ) from None


def check_attention(text: str, where: str) -> None:
    """Fail now, naming `where`, on an attention weight that is not a number: a caption, template or
    preview prompt is otherwise parsed first at the step (maybe hours later) that draws it."""
    parse_prompt_attention(text, where)


def _merge_equal_weights(items: list[list]) -> list[list]:
    merged = [items[0]]
    for text, weight in items[1:]:
        if merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return merged


@dataclass(frozen=True)
class PromptChunk:
    """One 77-token window of a prompt, as the text encoders see it.

    `tokens` holds BOS, 75 prompt ids and EOS, padded with EOS (CLIP's way; `ids` gives an encoder that
    pads with another id its own); `multipliers` the attention weight of each token. Each fix
    `(offset, name)` says that embedding `name` fills `tokens[offset + 1 : offset + 1 + n]` (offset counts
    from after BOS, as in A1111).
    """

    tokens: tuple[int, ...]
    multipliers: tuple[float, ...]
    fixes: tuple[tuple[int, str], ...] = ()

    @functools.cached_property
    def end(self) -> int:
        """Where the first end token stands: the pooled output of SDXL's bigG is read there."""
        eos = self.tokens[-1]
        return self.tokens.index(eos)

    def ids(self, pad: int) -> tuple[int, ...]:
        """The tokens with everything after the first end token set to `pad` (OpenCLIP pads with 0)."""
        end = self.end
        return self.tokens[: end + 1] + (pad,) * (len(self.tokens) - end - 1)


class _ChunkBuilder:
    """Collects the 75-token bodies of one prompt's chunks, following A1111's tokenize_line."""

    def __init__(self, bos: int, eos: int, comma_backtrack: int):
        self.bos, self.eos = bos, eos
        self.comma_backtrack = comma_backtrack
        self.chunks: list[PromptChunk] = []
        self._start_body()

    def _start_body(self) -> None:
        self.tokens: list[int] = []
        self.multipliers: list[float] = []
        self.fixes: list[tuple[int, str]] = []
        self.last_comma = -1

    @property
    def full(self) -> bool:
        return len(self.tokens) == CHUNK_LENGTH

    def next_chunk(self) -> None:
        """Pad the current body, wrap it in BOS/EOS and start a new one."""
        missing = CHUNK_LENGTH - len(self.tokens)
        tokens = [self.bos] + self.tokens + [self.eos] * (missing + 1)
        multipliers = [1.0] + self.multipliers + [1.0] * (missing + 1)
        self.chunks.append(PromptChunk(tuple(tokens), tuple(multipliers), tuple(self.fixes)))
        self._start_body()

    def wants_backtrack(self) -> bool:
        """True when the body is full and a comma lies within the last `comma_backtrack` tokens."""
        return (
            self.comma_backtrack > 0
            and self.full
            and self.last_comma != -1
            and len(self.tokens) - self.last_comma <= self.comma_backtrack
        )

    def backtrack_to_comma(self) -> None:
        """End the chunk right after its last comma; the tokens after it open the next chunk."""
        cut = self.last_comma + 1
        tokens, multipliers = self.tokens[cut:], self.multipliers[cut:]
        # Placeholders never straddle the cut (it follows a real comma token), so fixes move whole.
        moved = [(offset - cut, name) for offset, name in self.fixes if offset >= cut]
        self.tokens, self.multipliers = self.tokens[:cut], self.multipliers[:cut]
        self.fixes = [(offset, name) for offset, name in self.fixes if offset < cut]
        self.next_chunk()
        self.tokens, self.multipliers, self.fixes = tokens, multipliers, moved

    def add_token(self, token: int, weight: float) -> None:
        self.tokens.append(token)
        self.multipliers.append(weight)

    def add_embedding(self, name: str, num_vectors: int, weight: float) -> None:
        """Reserve placeholder slots for an embedding; it never straddles two chunks."""
        if len(self.tokens) + num_vectors > CHUNK_LENGTH:
            self.next_chunk()
        self.fixes.append((len(self.tokens), name))
        self.tokens += [EMBEDDING_PLACEHOLDER_ID] * num_vectors
        self.multipliers += [weight] * num_vectors

    def finish(self) -> tuple[PromptChunk, ...]:
        if self.tokens or not self.chunks:
            self.next_chunk()
        return tuple(self.chunks)


class PromptTokenizer:
    """Cuts prompts into A1111's 77-token chunks, with the embeddings it knows placed by their token ids.

    It knows each embedding's name and vector count; the vectors themselves live in the conditioner
    (library/conditioning.py), which turns the chunks into what the UNet reads.
    """

    def __init__(self, tokenizer, *, comma_backtrack: int = 20):
        if comma_backtrack < 0:
            raise UserError(
                f"comma_backtrack must be 0 (off) or a positive token count, got {comma_backtrack}"
            )
        self.tokenizer = tokenizer
        self.comma_backtrack = comma_backtrack
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self._comma = tokenizer.get_vocab().get(",</w>")
        self._counts: dict[str, int] = {}  # name -> number of vectors
        self._name_ids: dict[str, tuple[int, ...]] = {}
        # first token id -> [(ids, name)], longest first, so `name-20` wins over `name`
        self._lookup: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        self._tokenize_cached = functools.lru_cache(maxsize=_TOKENIZE_CACHE_SIZE)(self._tokenize_uncached)
        self.empty_chunk = self._new_builder().finish()[0]

    # ----- embeddings -------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Names of the embeddings it knows, in the order they were added."""
        return list(self._counts)

    def add_name(self, name: str, num_vectors: int) -> None:
        """Know (or update) embedding `name` of `num_vectors` vectors."""
        if not 1 <= num_vectors <= CHUNK_LENGTH:
            raise UserError(
                f"embedding {name!r} has {num_vectors} vectors; it needs 1 to {CHUNK_LENGTH} to fit a prompt"
            )
        ids = tuple(self._tokenize([name])[0])
        if not ids:
            raise UserError(
                f"embedding name {name!r} has no tokens; give it a name made of letters or digits"
            )
        for other, other_ids in self._name_ids.items():
            if other != name and other_ids == ids:
                raise UserError(
                    f"embedding names {name!r} and {other!r} read as the same tokens in a prompt; rename one"
                )
        self._counts[name] = num_vectors
        self._name_ids[name] = ids
        self._rebuild_lookup()

    def remove_name(self, name: str) -> None:
        """Forget embedding `name`; its name is plain text in prompts again."""
        if name not in self._counts:
            raise UserError(f"no embedding named {name!r}; registered: {self.names}")
        del self._counts[name]
        del self._name_ids[name]
        self._rebuild_lookup()

    def _rebuild_lookup(self) -> None:
        self._lookup = {}
        for name, ids in self._name_ids.items():
            self._lookup.setdefault(ids[0], []).append((ids, name))
        for candidates in self._lookup.values():
            candidates.sort(key=lambda entry: len(entry[0]), reverse=True)
        self._tokenize_cached.cache_clear()

    def _embedding_at(self, tokens: list[int], position: int) -> tuple[str, int] | None:
        """The longest embedding name whose ids start at `position`, and how many ids it spans."""
        for ids, name in self._lookup.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return name, len(ids)
        return None

    # ----- tokenization -----------------------------------------------------------------------------

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: prompts longer than 77 tokens are expected here, they get chunked.
        return self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    def _new_builder(self) -> _ChunkBuilder:
        return _ChunkBuilder(self.bos, self.eos, self.comma_backtrack)

    def tokenize_line(self, text: str) -> list[PromptChunk]:
        """Cut one prompt into 77-token chunks, with weights and embedding placements (cached per text)."""
        return list(self._tokenize_cached(text))

    def _tokenize_uncached(self, text: str) -> tuple[PromptChunk, ...]:
        parsed = parse_prompt_attention(text)
        builder = self._new_builder()
        for tokens, (piece, weight) in zip(
            self._tokenize([piece for piece, _ in parsed]), parsed, strict=True
        ):
            if piece == BREAK[0] and weight == BREAK[1]:
                builder.next_chunk()
                continue
            position = 0
            while position < len(tokens):
                if tokens[position] == self._comma:
                    builder.last_comma = len(builder.tokens)
                elif builder.wants_backtrack():
                    builder.backtrack_to_comma()
                if builder.full:
                    builder.next_chunk()
                found = self._embedding_at(tokens, position)
                if found is None:
                    builder.add_token(tokens[position], weight)
                    position += 1
                else:
                    name, span = found
                    builder.add_embedding(name, self._counts[name], weight)
                    position += span
        return builder.finish()


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of host data on `device` without stalling the GPU queue.

    `torch.tensor(..., device="cuda")` copies from pageable memory, which waits for all queued GPU work: in a
    training step that serialises Python's kernel launches with the GPU. A pinned, non-blocking copy does not.
    """
    tensor = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
