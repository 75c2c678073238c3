"""A tiny frozen text encoder for the toy world, built by code (no files, no network).

The tokenizer is a real `transformers.CLIPTokenizer` whose BPE vocabulary and merges are learnt in
memory from the grammar's words (`world.vocabulary()`), so every grammar word is exactly one token
(e.g. "a red circle" -> [bos, a, red, circle, eos, pad...]); any other word falls back to characters.
The encoder is a randomly initialised `CLIPTextModel` (hidden 32, 2 layers, 4 heads) with a fixed seed:
it is never trained, the denoiser learns to read its features. Same seed -> same weights, in any process.
Its token embeddings are drawn with std `TOKEN_EMBED_STD` = 1 instead of CLIP's 0.02: with CLIP's init,
"a red circle" and "a blue circle" encoded to vectors with cosine similarity ~0.94 at every position, and
the denoiser was slow to tell them apart.
"""

from __future__ import annotations

import string
from collections import Counter

import torch

from diffalign.toy.world import vocabulary

TOY_MAX_LENGTH = 16
TOY_HIDDEN = 32
TOKEN_EMBED_STD = 1.0
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe_from_words(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Deterministic BPE 'training' on a word list (each word once), until every word is one token.

    Applying the learnt merges in rank order reproduces the training segmentation, so each word
    encodes to its single token."""
    chars = list(string.ascii_lowercase + string.digits)
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for c in chars:
        for piece in (c, c + "</w>"):
            vocab.setdefault(piece, len(vocab))
    seqs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for s in seqs for p in zip(s, s[1:], strict=False))
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, ties lexicographic
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        new = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new.append(tuple(out))
        seqs = new
    return vocab, merges


def build_tokenizer(max_length: int = TOY_MAX_LENGTH):
    """A CLIPTokenizer over the toy grammar's words (one token per grammar word)."""
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_from_words(vocabulary())
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=max_length,
    )


def build_text_encoder(tokenizer=None, hidden: int = TOY_HIDDEN, seed: int = 0):
    """The frozen random CLIPTextModel (hidden 32, 2 layers, 4 heads), eval mode, no grad.

    Initialised under a forked RNG seeded with `seed`, so it neither depends on nor disturbs the
    caller's global torch RNG."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tokenizer or build_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb.copy_(torch.randn(emb.shape) * TOKEN_EMBED_STD)
    model.eval().requires_grad_(False)
    return model


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """[N, max_length, hidden] last hidden states (the denoiser's cross-attention input)."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids).last_hidden_state
