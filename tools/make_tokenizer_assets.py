"""Build the CLIP tokenizer folders in library/assets from OpenAI's BPE merges file.

The merges file (bpe_simple_vocab_16e6.txt.gz) ships inside the open-clip-torch wheel on PyPI.
Run once; the output is committed, so nothing fetches a tokenizer at run time:

    pip download --no-deps open_clip_torch -d /tmp/oc && unzip /tmp/oc/*.whl -d /tmp/oc
    python tools/make_tokenizer_assets.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz
"""

import gzip
import json
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "library" / "assets"
# CLIP keeps the first 49152 - 256 - 2 merges of the file, giving a 49,408-entry vocabulary.
NUM_MERGES = 49152 - 256 - 2


def byte_characters() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP BPE uses for raw bytes, in vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    codes = {}
    for b in range(256):
        if b in printable:
            codes[b] = b
        else:
            codes[b] = 256 + extra
            extra += 1
    # Vocabulary order is the printable bytes first, then the remapped ones.
    order = printable + [b for b in range(256) if b not in printable]
    chars = [chr(codes[b]) for b in order]
    return chars


def main(bpe_path: str) -> None:
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    chars = byte_characters()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    for family, pad in (("sd1", "<|endoftext|>"), ("sd2", "!")):
        out = ASSETS / f"tokenizer_{family}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        special = {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": pad,
        }
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        config = dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
