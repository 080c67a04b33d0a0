"""Words -> token indices, for CLIP (BPE, ``<|startoftext|>`` at index 0) and T5 (SentencePiece) tokenizers.

Users name words; methods need the positions of their tokens in the text sequence the attention layers see. A word
(or phrase) is tokenised on its own and searched as a contiguous run in the tokenised prompt, so "sunglasses" that
splits into two BPE pieces yields both indices, and "red hat" yields the indices of "red" and "hat". Every
occurrence is returned. A word that is not in the prompt, or lies past the tokenizer's maximum length (77 for
CLIP: later tokens are cut off by the pipeline), raises :class:`TokenLookupError` showing the tokenised prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import TokenLookupError

__all__ = ["token_indices", "find_token_indices", "readable_tokens"]


def readable_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """Token strings without BPE/SentencePiece markers (``cat</w>`` -> ``cat``, ``▁cat`` -> ``cat``)."""
    out = []
    for tok in tokenizer.convert_ids_to_tokens(list(ids)):
        tok = tok or ""
        out.append(tok.replace("</w>", "").replace("▁", "") or tok)
    return out


def _word_ids(tokenizer, word: str) -> list[list[int]]:
    variants = dict.fromkeys([word, word.strip(), word.strip().lower(), word.strip().capitalize()])
    out = []
    for v in variants:
        if not v:
            continue
        ids = tokenizer(v, add_special_tokens=False).input_ids
        # SentencePiece may emit a bare "▁" piece before a word it cannot start with; drop it for the search
        pieces = tokenizer.convert_ids_to_tokens(ids)
        while ids and pieces and pieces[0] == "▁":
            ids, pieces = ids[1:], pieces[1:]
        if ids and ids not in out:
            out.append(ids)
    return out


def _special_ids(tokenizer) -> set[int]:
    return {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}


def find_token_indices(tokenizer, ids: Sequence[int], word: str, max_length: int | None = None) -> list[int]:
    """Indices in the token-id sequence ``ids`` of every occurrence of ``word`` (see the module docstring)."""
    if not isinstance(word, str) or not word.strip():
        raise TokenLookupError(f"expected a non-empty word, got {word!r}")
    ids = [int(i) for i in ids]
    specials = _special_ids(tokenizer)
    # ignore padding/eos runs at the end so "!" padding (SD 2.x) never matches
    end = len(ids)
    while end > 0 and ids[end - 1] in specials:
        end -= 1
    found: list[int] = []
    for pattern in _word_ids(tokenizer, word):
        n = len(pattern)
        for start in range(0, end - n + 1):
            if ids[start : start + n] == pattern:
                found.extend(range(start, start + n))
        if found:
            break
    shown = " | ".join(readable_tokens(tokenizer, ids[:end]))
    if not found:
        raise TokenLookupError(f"the word {word!r} is not in the prompt; its tokens are: {shown}")
    limit = max_length or getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < 100_000 and max(found) >= limit:
        raise TokenLookupError(
            f"the word {word!r} is at token {max(found)}, past the tokenizer's {limit}-token limit, so the model "
            f"never sees it; shorten the prompt (tokens: {shown})"
        )
    return sorted(set(found))


def token_indices(tokenizer, prompt: str, words: str | Sequence[str]) -> list[int] | list[list[int]]:
    """Token indices of ``words`` in ``prompt`` as the pipeline tokenises it (special tokens included).

    One word -> a list of indices; a list of words -> one list per word.
    """
    ids = tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids
    if isinstance(words, str):
        return find_token_indices(tokenizer, ids, words)
    return [find_token_indices(tokenizer, ids, w) for w in words]
