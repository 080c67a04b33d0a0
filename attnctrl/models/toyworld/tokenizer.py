"""The toyworld tokenizer: a standard ``CLIPTokenizer`` whose tiny BPE turns every toyworld word into one token."""

from __future__ import annotations

from collections import Counter

from .world import VOCABULARY

__all__ = ["MAX_TOKENS", "toy_tokenizer"]

MAX_TOKENS = 32


def _learn_merges(words) -> list[tuple[str, str]]:
    """Byte-pair merges that turn every word of ``words`` into one ``word</w>`` token (deterministic BPE)."""
    seqs = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges = []
    while True:
        counts: Counter = Counter()
        for s in seqs.values():
            counts.update(zip(s, s[1:]))
        if not counts:
            return merges
        best = max(counts.values())
        pair = min(p for p, c in counts.items() if c == best)
        merges.append(pair)
        joined = pair[0] + pair[1]
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == pair:
                    out.append(joined)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out


def toy_tokenizer(model_max_length: int = MAX_TOKENS):
    """A ``CLIPTokenizer`` whose BPE turns each toyworld word into one token (unknown words fall back to bytes)."""
    from transformers import CLIPTokenizer

    from ..tokenizers import _bytes_to_unicode

    base = list(_bytes_to_unicode().values())
    merges = _learn_merges(VOCABULARY)
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = list(dict.fromkeys(vocab))
    tok = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges, model_max_length=model_max_length,
                        pad_token="<|endoftext|>")
    for word in VOCABULARY:
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:  # pragma: no cover - guarded by the tests
            raise RuntimeError(f"toy tokenizer splits {word!r} into {tok.convert_ids_to_tokens(ids)}")
    return tok
