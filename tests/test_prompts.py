"""A1111 prompt syntax, chunking and encoding with embeddings, checked against A1111's rules."""

from __future__ import annotations

import copy

import pytest
import torch

from library.errors import UserError
from library.parts import load_tokenizer
from library.prompts import parse_prompt_attention
from tests.helpers import OneEncoder

BOS, EOS = 49406, 49407
COMMA = 267
# Real CLIP ids (FACTS.md section 5: `a photo of a woman` -> 320 1125 539 320 2308).
WORD_IDS = {"a": 320, "photo": 1125, "of": 539, "woman": 2308}
WIDTH = 32  # tiny text encoder width


def words(count: int) -> list[str]:
    """`count` one-token words, cycling through WORD_IDS so chunk contents are not all alike."""
    cycle = list(WORD_IDS)
    return [cycle[i % len(cycle)] for i in range(count)]


def ids(word_list: list[str]) -> list[int]:
    return [WORD_IDS[w] if w != "," else COMMA for w in word_list]


def chunk(body: list[int], pad: int = EOS) -> list[int]:
    """Expected 77 ids: BOS, body, EOS, then padding."""
    return [BOS] + body + [EOS] + [pad] * (75 - len(body))


@pytest.fixture
def encoder(tiny_sd1):
    return OneEncoder(tiny_sd1.tokenizer, tiny_sd1.text_encoder)


@pytest.fixture(scope="module")
def shifted_text_encoder(tiny_sd1):
    """The tiny text encoder with a final layer-norm bias, like a trained CLIP.

    With the untrained bias of 0 every output token has mean 0, so the output's mean is ~0 and A1111's
    mean restoration divides by almost nothing; a trained CLIP's output mean is well away from 0.
    """
    text_encoder = copy.deepcopy(tiny_sd1.text_encoder)
    text_encoder.final_layer_norm.bias.data += 0.5
    return text_encoder


# ----- parse_prompt_attention: A1111's doctests and rules ---------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("normal text", [["normal text", 1.0]]),
        ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
        ("(unbalanced", [["unbalanced", 1.1]]),
        ("\\(literal\\]", [["(literal]", 1.0]]),
        ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ["a ", 1.0],
                ["house", 1.5730000000000004],
                [" ", 1.1],
                ["on", 1.0],
                [" a ", 1.1],
                ["hill", 0.55],
                [", sun, ", 1.1],
                ["sky", 1.4641000000000006],
                [".", 1.1],
            ],
        ),
        ("", [["", 1.0]]),
        ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
        ("(x: 1.3 )", [["x", 1.3]]),
        ("(x :1.3)", [["x ", 1.3]]),
        ("[x]", [["x", 1 / 1.1]]),
        ("[[x", [["x", 1 / 1.1 / 1.1]]),
        ("\\\\ and \\[x\\) stay", [["\\ and [x) stay", 1.0]]),
        ("(a)(b) [c][d]", [["ab", 1.1], [" ", 1.0], ["cd", 1 / 1.1]]),
        ("a: b", [["a: b", 1.0]]),
        ("(a:-0.5)", [["a", -0.5]]),
    ],
)
def test_parse_prompt_attention_matches_a1111(text, expected):
    assert parse_prompt_attention(text) == expected


def test_parse_bad_weight_is_user_error():
    with pytest.raises(UserError, match=r"\(word:1.2\)"):
        parse_prompt_attention("a (photo:1.2.3) of")


# ----- chunking ---------------------------------------------------------------------------------


def test_empty_prompt_is_one_padded_chunk(encoder):
    [only] = encoder.tokenize_line("")
    assert list(only.tokens) == [BOS] + [EOS] * 76
    assert list(only.multipliers) == [1.0] * 77
    assert only.fixes == ()


def test_long_prompt_without_comma_splits_at_75(encoder):
    prompt_words = words(120)
    chunks = encoder.tokenize_line(" ".join(prompt_words))
    assert [list(c.tokens) for c in chunks] == [chunk(ids(prompt_words[:75])), chunk(ids(prompt_words[75:]))]


def test_exactly_75_tokens_fit_one_chunk_and_76_need_two(encoder):
    assert len(encoder.tokenize_line(" ".join(words(75)))) == 1
    first, second = encoder.tokenize_line(" ".join(words(76)))
    assert list(second.tokens) == chunk(ids(words(76)[75:]))


def test_comma_within_20_tokens_of_the_boundary_starts_the_next_chunk(encoder):
    prompt_words = words(70) + [","] + words(49)  # comma at position 70: 5 tokens before the boundary
    chunks = encoder.tokenize_line(" ".join(prompt_words))
    assert [list(c.tokens) for c in chunks] == [chunk(ids(prompt_words[:71])), chunk(ids(prompt_words[71:]))]


def test_comma_too_far_from_the_boundary_or_backtrack_off_cuts_at_75(tiny_sd1):
    far = words(50) + [","] + words(69)  # 25 tokens before the boundary: beyond the 20-token window
    near = words(70) + [","] + words(49)
    plain = OneEncoder(tiny_sd1.tokenizer, tiny_sd1.text_encoder)
    off = OneEncoder(tiny_sd1.tokenizer, tiny_sd1.text_encoder, comma_backtrack=0)
    for encoder, prompt_words in ((plain, far), (off, near)):
        chunks = encoder.tokenize_line(" ".join(prompt_words))
        expected = [chunk(ids(prompt_words[:75])), chunk(ids(prompt_words[75:]))]
        assert [list(c.tokens) for c in chunks] == expected


def test_break_starts_a_new_chunk(encoder):
    chunks = encoder.tokenize_line("a photo BREAK of a woman")
    assert [list(c.tokens) for c in chunks] == [chunk([320, 1125]), chunk([539, 320, 2308])]


def test_multipliers_follow_the_weights(encoder):
    [only] = encoder.tokenize_line("a (photo:1.5) [of] woman")
    assert list(only.multipliers[:6]) == [1.0, 1.0, 1.5, 1 / 1.1, 1.0, 1.0]


def test_sd2_pads_with_its_pad_id_after_the_first_eos(tiny_sd2):
    tokenizer = load_tokenizer("sd2")
    encoder = OneEncoder(tokenizer, tiny_sd2.text_encoder, family="sd2")
    seen = []
    hook = tiny_sd2.text_encoder.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].tolist())
    )
    try:
        with torch.no_grad():
            encoder.encode(["a photo"])
            prompt_words = words(80)
            encoder.encode([" ".join(prompt_words)])
    finally:
        hook.remove()
    assert seen[0] == [chunk([320, 1125], pad=0)]  # what the OpenCLIP encoder reads: 0 after the end token
    assert seen[1] == [chunk(ids(prompt_words[:75]), 0), chunk(ids(prompt_words[75:]), 0)]
    [only] = encoder.tokenize_line("a photo")
    assert list(only.ids(0)) == chunk([320, 1125], pad=0) and only.end == 3


# ----- embeddings in prompts --------------------------------------------------------------------


def test_longest_embedding_name_wins_and_fills_its_slots(encoder):
    encoder.set_embedding("fr3nchl4dy", torch.zeros(2, WIDTH))
    encoder.set_embedding("fr3nchl4dy-20", torch.zeros(3, WIDTH))
    [only] = encoder.tokenize_line("a fr3nchl4dy-20 photo of (fr3nchl4dy:1.2)")
    assert only.fixes == ((1, "fr3nchl4dy-20"), (6, "fr3nchl4dy"))  # offsets count from after BOS
    assert list(only.tokens[:12]) == [BOS, 320, 0, 0, 0, 1125, 539, 0, 0, EOS, EOS, EOS]
    assert list(only.multipliers[:10]) == [1.0] * 7 + [1.2, 1.2, 1.0]


def test_embedding_that_would_straddle_the_boundary_moves_to_the_next_chunk(encoder):
    encoder.set_embedding("myemb", torch.zeros(3, WIDTH))
    prompt_words = words(73)
    first, second = encoder.tokenize_line(" ".join(prompt_words) + " myemb of")
    assert list(first.tokens) == chunk(ids(prompt_words))
    assert first.fixes == ()
    assert list(second.tokens) == chunk([0, 0, 0, 539])
    assert second.fixes == ((0, "myemb"),)


def test_comma_backtrack_carries_embeddings_with_their_slots(encoder):
    # Deliberately unlike A1111, which leaves the fix behind in the first chunk.
    encoder.set_embedding("myemb", torch.zeros(2, WIDTH))
    prompt_words = words(70) + [","]
    first, second = encoder.tokenize_line(" ".join(prompt_words) + " myemb a photo of woman")
    assert list(first.tokens) == chunk(ids(prompt_words))
    assert first.fixes == ()
    assert list(second.tokens) == chunk([0, 0, 320, 1125, 539, 2308])
    assert second.fixes == ((0, "myemb"),)


def test_tokenization_cache_follows_embedding_changes(encoder):
    prompt = "a photo of myemb"
    assert encoder.tokenize_line(prompt)[0].fixes == ()
    encoder.set_embedding("myemb", torch.zeros(1, WIDTH))
    assert encoder.tokenize_line(prompt)[0].fixes == ((3, "myemb"),)
    assert encoder.embedding_names == ["myemb"]
    encoder.remove_embedding("myemb")
    assert encoder.tokenize_line(prompt)[0].fixes == ()
    assert encoder.embedding_names == []


@pytest.mark.parametrize(
    "name, vectors, message",
    [
        ("wide", torch.zeros(2, WIDTH + 1), "needs clip_l \\[n, 32\\]"),
        ("many", torch.zeros(76, WIDTH), "1 to 75"),
        ("   ", torch.zeros(1, WIDTH), "no tokens"),
        ("MyEmb", torch.zeros(1, WIDTH), "same tokens"),
    ],
)
def test_bad_embeddings_are_user_errors(encoder, name, vectors, message):
    encoder.set_embedding("myemb", torch.zeros(1, WIDTH))
    with pytest.raises(UserError, match=message):
        encoder.set_embedding(name, vectors)


def test_bad_settings_are_user_errors(tiny_sd1):
    with pytest.raises(UserError, match="clip_skip"):
        OneEncoder(tiny_sd1.tokenizer, tiny_sd1.text_encoder, clip_skip=3)  # the tiny encoder has 2 layers
    encoder = OneEncoder(tiny_sd1.tokenizer, tiny_sd1.text_encoder)
    with pytest.raises(UserError, match="nosuch"):
        encoder.remove_embedding("nosuch")


# ----- encoding ---------------------------------------------------------------------------------


def reference_encoding(text_encoder, rows: list[list[int]], vectors_at: dict, clip_skip: int = 1):
    """Encode with the embedding vectors added as real rows of a grown token table (the Kohya way).

    `vectors_at` maps (row, first slot) to a [n, dim] tensor that replaces the ids at those slots.
    """
    grown = copy.deepcopy(text_encoder)
    table = grown.get_input_embeddings().weight.detach()
    new_table = torch.cat([table] + [v.detach() for v in vectors_at.values()])
    grown.set_input_embeddings(torch.nn.Embedding.from_pretrained(new_table))
    input_ids = torch.tensor(rows)
    next_id = table.shape[0]
    for (row, slot), vectors in vectors_at.items():
        input_ids[row, slot : slot + len(vectors)] = torch.arange(next_id, next_id + len(vectors))
        next_id += len(vectors)
    with torch.no_grad():
        output = grown(input_ids=input_ids, output_hidden_states=True)
        if clip_skip == 1:
            return output.last_hidden_state
        return grown.final_layer_norm(output.hidden_states[-clip_skip])


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_encode_equals_the_text_encoder_with_vectors_substituted(tiny_sd1, clip_skip):
    encoder = OneEncoder(tiny_sd1.tokenizer, tiny_sd1.text_encoder, clip_skip=clip_skip)
    first, second = torch.randn(2, WIDTH), torch.randn(3, WIDTH)
    encoder.set_embedding("firstemb", first)
    encoder.set_embedding("secondemb", second)
    prompts = ["a photo of firstemb", "secondemb, a woman firstemb"]
    with torch.no_grad():
        z = encoder.encode(prompts)
    rows = [chunk([320, 1125, 539, 0, 0]), chunk([0, 0, 0, COMMA, 320, 2308, 0, 0])]
    expected = reference_encoding(
        tiny_sd1.text_encoder, rows, {(0, 4): first, (1, 1): second, (1, 7): first}, clip_skip
    )
    assert z.shape == (2, 77, WIDTH)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)


def test_encode_pads_shorter_prompts_with_empty_chunks(encoder):
    long_prompt = " ".join(words(100))
    with torch.no_grad():
        z = encoder.encode(["a photo", long_prompt])
        empty = encoder.encode([""])
        short = encoder.encode(["a photo"])
        alone = encoder.encode([long_prompt])
    assert z.shape == (2, 154, WIDTH)
    torch.testing.assert_close(z[0, :77], short[0])
    torch.testing.assert_close(z[0, 77:], empty[0])
    torch.testing.assert_close(z[1], alone[0])


def test_encode_pair_pads_cond_and_uncond_to_one_length(encoder):
    long_prompt = " ".join(words(160))  # three chunks
    with torch.no_grad():
        cond, uncond = encoder.encode_pair(["a photo", "of a woman"], [long_prompt, ""])
        empty = encoder.encode([""])
        long_alone = encoder.encode([long_prompt])
    assert cond.shape == uncond.shape == (2, 231, WIDTH)
    torch.testing.assert_close(uncond[0], long_alone[0])
    for i in range(3):
        torch.testing.assert_close(uncond[1, 77 * i : 77 * (i + 1)], empty[0])


def test_gradient_reaches_the_parameter_and_not_the_token_table(tiny_sd1):
    text_encoder = copy.deepcopy(tiny_sd1.text_encoder)
    encoder = OneEncoder(tiny_sd1.tokenizer, text_encoder)
    vectors = torch.nn.Parameter(torch.randn(2, WIDTH))
    encoder.set_embedding("myemb", vectors)
    before = encoder.encode(["a photo of myemb"]).detach()
    encoder.encode(["a photo of myemb", "myemb"]).square().mean().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert text_encoder.get_input_embeddings().weight.grad is None
    assert not text_encoder.get_input_embeddings()._forward_hooks  # the hook is gone after encode
    # The parameter is used by reference: an optimizer step changes the next encoding.
    torch.optim.SGD([vectors], lr=1.0).step()
    after = encoder.encode(["a photo of myemb"]).detach()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after[0, :4], before[0, :4])  # tokens before the embedding (causal attention)


def test_emphasis_restores_the_mean_and_scales_the_weighted_token(tiny_sd1, shifted_text_encoder):
    encoder = OneEncoder(tiny_sd1.tokenizer, shifted_text_encoder)
    with torch.no_grad():
        plain = encoder.encode(["a photo of woman"])
        weighted = encoder.encode(["a (photo:1.5) of woman"])
    multipliers = torch.ones(77)
    multipliers[2] = 1.5  # BOS, a, photo
    scaled = plain * multipliers[None, :, None]
    expected = scaled * (plain.mean() / scaled.mean())
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    relative = (weighted[0, 2] / plain[0, 2]) / (weighted[0, 1] / plain[0, 1])
    torch.testing.assert_close(relative, torch.full((WIDTH,), 1.5))


def test_encode_with_bf16_text_encoder_and_under_autocast(tiny_sd1, shifted_text_encoder):
    vectors = torch.nn.Parameter(torch.randn(2, WIDTH))
    bf16 = OneEncoder(tiny_sd1.tokenizer, copy.deepcopy(tiny_sd1.text_encoder).to(torch.bfloat16))
    bf16.set_embedding("myemb", vectors)
    z = bf16.encode(["a (photo:1.2) of myemb"])
    assert z.dtype == torch.bfloat16
    z.float().sum().backward()
    assert vectors.grad is not None and vectors.grad.dtype == torch.float32

    encoder = OneEncoder(tiny_sd1.tokenizer, shifted_text_encoder)
    encoder.set_embedding("myemb", vectors)
    with torch.no_grad():
        full = encoder.encode(["a (photo:1.2) of myemb"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = encoder.encode(["a (photo:1.2) of myemb"])
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.float(), full, rtol=0.05, atol=0.05)  # bf16 keeps ~3 digits
