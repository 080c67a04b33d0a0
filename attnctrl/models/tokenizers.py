"""Offline tokenizers for the tiny models.

* :func:`clip_tokenizer` is the real CLIP BPE tokenizer of every Stable Diffusion text encoder, built from the
  vendored vocabulary in ``assets/tokenizers`` (token ids match real SD: "a photo of a cat" ->
  ``[49406, 320, 1125, 539, 320, 2368, 49407]``).
* :func:`t5_tokenizer` is a small SentencePiece-style Unigram tokenizer with T5's special tokens (``<pad>`` = 0,
  ``</s>`` = 1, ``<unk>`` = 2) whose pieces are English words and sub-words taken from the CLIP vocabulary. It is
  not the real T5 vocabulary (that file is not available offline), but it tokenises prompts into words the same way
  (``"▁dark"``, ``"▁knight"``), which is what word -> token lookups and tests need.
"""

from __future__ import annotations

import gzip
import math
import string
from functools import lru_cache
from importlib import resources

__all__ = ["clip_tokenizer", "t5_tokenizer", "clip_vocabulary"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[list[str], list[tuple[str, str]]]:
    """The CLIP vocabulary (49408 tokens) and its 48894 BPE merges, read from the vendored file."""
    data = resources.files("attnctrl").joinpath("assets/tokenizers/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return vocab, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP tokenizer (SD 1.x pads with ``<|endoftext|>``; SD 2.x and SDXL's second tokenizer with ``!``)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(
        vocab={v: i for i, v in enumerate(vocab)}, merges=list(merges), model_max_length=77, pad_token=pad_token
    )


@lru_cache(maxsize=1)
def _t5_pieces() -> list[tuple[str, float]]:
    vocab, _ = clip_vocabulary()
    body = vocab[512:-2]  # skip byte characters and specials
    words = [v[:-4] for v in body if v.endswith("</w>") and v[:-4].isascii() and v[:-4].isalpha()][:6000]
    subwords = [v for v in body if not v.endswith("</w>") and v.isascii() and v.isalpha() and len(v) > 1][:3000]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(c, -18.0) for c in string.ascii_letters + string.digits + string.punctuation]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for w in ("a", "i"):
        add("▁" + w, -2.0)
        add("▁" + w.upper(), -2.5)
    for rank, w in enumerate(words):
        add("▁" + w, -math.log(rank + 2))
        add("▁" + w.capitalize(), -math.log(rank + 2) - 1.0)
    for rank, w in enumerate(subwords):
        add(w, -math.log(rank + 2) - 6.0)
    return pieces


def t5_tokenizer(model_max_length: int = 512):
    """A T5-style Unigram tokenizer over English words (see the module docstring)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(_t5_pieces()), extra_ids=0, model_max_length=model_max_length)
