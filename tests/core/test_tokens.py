"""Word -> token-index lookup on the real CLIP vocabulary and on the T5-style tokenizer."""

from __future__ import annotations

import pytest

from attnctrl.core import TokenLookupError, token_indices
from attnctrl.models.tokenizers import clip_tokenizer, t5_tokenizer

CLIP = clip_tokenizer()
T5 = t5_tokenizer()


def test_clip_ids_are_the_real_sd_ids():
    assert CLIP("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_clip_word_lookup():
    prompt = "A photo of a cat wearing sunglasses, and a red hat."
    assert token_indices(CLIP, prompt, "cat") == [5]
    assert token_indices(CLIP, prompt, "Cat") == [5]
    assert token_indices(CLIP, prompt, "a") == [1, 4, 10]  # every occurrence
    assert token_indices(CLIP, prompt, "red hat") == [11, 12]
    assert token_indices(CLIP, prompt, ["cat", "hat"]) == [[5], [12]]
    multi = token_indices(CLIP, "a photorealistic dog", "photorealistic")
    assert len(multi) >= 1 and multi[0] == 2


def test_t5_word_lookup():
    prompt = "A dark knight riding a horse"
    assert token_indices(T5, prompt, "knight") == [2]
    assert token_indices(T5, prompt, "dark knight") == [1, 2]
    assert T5.convert_ids_to_tokens(T5(prompt).input_ids)[-1] == "</s>"


def test_missing_word_shows_the_tokens():
    with pytest.raises(TokenLookupError) as e:
        token_indices(CLIP, "a photo of a cat", "dog")
    assert "a | photo | of | a | cat" in str(e.value)
    with pytest.raises(TokenLookupError, match="not in the prompt"):
        token_indices(T5, "a cat", "dog")
    with pytest.raises(TokenLookupError, match="non-empty"):
        token_indices(CLIP, "a cat", " ")


def test_word_past_the_77_token_limit():
    prompt = "a " * 80 + "cat"
    with pytest.raises(TokenLookupError, match="77-token limit"):
        token_indices(CLIP, prompt, "cat")


def test_sd2_padding_never_matches():
    tok = clip_tokenizer(pad_token="!")
    ids = tok("a cat", padding="max_length", max_length=77).input_ids
    from attnctrl.core import find_token_indices

    with pytest.raises(TokenLookupError):
        find_token_indices(tok, ids, "!")
