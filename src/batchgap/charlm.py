"""The char-lm study's materials: a generated character corpus and a tiny causal transformer (GPT).

**Corpus** (:func:`corpus`, :func:`load`): sentences of a seeded probabilistic grammar over a small English
lexicon (determiners, adjectives, nouns, verbs, prepositions; number agreement between subject and verb,
optional adjectives, prepositional phrases and relative clauses), drawn with ``random.Random(seed)`` (Python's
Mersenne Twister: the same text on every platform and release), joined into one stream and cut into
non-overlapping windows of ``context + 1`` characters. The vocabulary is the fixed alphabet :data:`ALPHABET`
(28 symbols: space, a-z and the full stop), so a token id never depends on
which sentences were drawn. Nothing is downloaded and no file is read; the text is generated in well under a
second. ``load`` returns the data loader form the study machinery reads for dict batches:
``{"train": {"input_ids", "labels"}, "test": {...}}`` with ``labels = input_ids`` (the causal-LM objective
scores position t against token t + 1). Train and test windows come from disjoint sentence streams (seeds
``seed`` and ``seed + 1``).

**Model** (:func:`tiny_gpt`, :class:`TinyGPT`): token and learned position embeddings, ``layers`` pre-norm
blocks (causal multi-head self-attention through ``torch.nn.functional.scaled_dot_product_attention`` with
``is_causal=True``, then a GELU MLP of 4 x width), a final LayerNorm and a linear head to the vocabulary (not
tied). Written out in torch rather than a ``transformers`` GPT-2 built from ``GPT2Config``: the same
architecture family, but the study runs without the optional ``transformers`` extra, imports in milliseconds
(a study's ``--jobs`` workers each import it), and every tensor it computes is in this file. It calls
``model(input_ids=...)`` and returns the logits ``(batch, positions, vocabulary)``, as the Hugging Face
objective (``huggingface-causal-lm``) reads them.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

ALPHABET = " abcdefghijklmnopqrstuvwxyz."  # id = position; 28 symbols

LEXICON = {
    "det_s": ["the", "a", "one", "this", "that"],
    "det_p": ["the", "some", "two", "these", "many"],
    "adj": ["small", "red", "old", "quiet", "bright", "happy", "cold", "green", "tall", "slow"],
    "noun_s": ["cat", "dog", "bird", "child", "farmer", "river", "tree", "house", "teacher", "horse"],
    "noun_p": ["cats", "dogs", "birds", "children", "farmers", "rivers", "trees", "houses", "teachers", "horses"],
    "verb_s": ["sees", "likes", "follows", "finds", "watches", "hears", "meets", "keeps"],
    "verb_p": ["see", "like", "follow", "find", "watch", "hear", "meet", "keep"],
    "iverb_s": ["sleeps", "runs", "sings", "waits", "falls"],
    "iverb_p": ["sleep", "run", "sing", "wait", "fall"],
    "prep": ["near", "under", "behind", "with", "over"],
}


def _noun_phrase(rng: random.Random, plural: bool, depth: int) -> list[str]:
    words = [rng.choice(LEXICON["det_p" if plural else "det_s"])]
    while rng.random() < 0.4 and len(words) < 3:  # zero, one or two adjectives
        words.append(rng.choice(LEXICON["adj"]))
    words.append(rng.choice(LEXICON["noun_p" if plural else "noun_s"]))
    if depth < 2 and rng.random() < 0.25:  # a prepositional phrase
        words += [rng.choice(LEXICON["prep"])] + _noun_phrase(rng, rng.random() < 0.5, depth + 1)
    elif depth < 1 and rng.random() < 0.15:  # a relative clause, agreeing with this noun
        words += ["that"] + _verb_phrase(rng, plural, depth + 1)
    return words


def _verb_phrase(rng: random.Random, plural: bool, depth: int) -> list[str]:
    if rng.random() < 0.3:
        return [rng.choice(LEXICON["iverb_p" if plural else "iverb_s"])]
    return [rng.choice(LEXICON["verb_p" if plural else "verb_s"])] + _noun_phrase(rng, rng.random() < 0.5, depth)


def sentence(rng: random.Random) -> str:
    """One sentence: a noun phrase, a verb phrase agreeing with it in number, a full stop."""
    plural = rng.random() < 0.5
    return " ".join(_noun_phrase(rng, plural, 0) + _verb_phrase(rng, plural, 0)) + "."


def corpus(n_chars: int, seed: int) -> str:
    """At least ``n_chars`` characters of sentences drawn with ``random.Random(seed)``, separated by spaces."""
    rng, parts, total = random.Random(seed), [], 0
    while total < n_chars:
        parts.append(sentence(rng))
        total += len(parts[-1]) + 1
    return " ".join(parts)


def encode(text: str) -> torch.Tensor:
    """Token ids (int64) of ``text`` in :data:`ALPHABET`."""
    index = {c: i for i, c in enumerate(ALPHABET)}
    return torch.tensor([index[c] for c in text], dtype=torch.int64)


def decode(ids) -> str:
    """The text of token ids."""
    return "".join(ALPHABET[int(i)] for i in ids)


def windows(n: int, context: int, seed: int) -> torch.Tensor:
    """``(n, context + 1)`` token ids: consecutive, non-overlapping windows of the corpus of ``seed``."""
    ids = encode(corpus(n * (context + 1), seed))
    return ids[: n * (context + 1)].reshape(n, context + 1)


def load(n_train: int = 1024, n_test: int = 256, context: int = 64, seed: int = 0) -> dict:
    """The char-lm data in the dict-batch loader form: ``{"train": {"input_ids", "labels"}, "test": ...}``, each
    ``(n, context + 1)``; the causal-LM objective predicts ``context`` tokens per window. Deterministic."""
    out = {}
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        ids = windows(n, context, s)
        out[split] = {"input_ids": ids, "labels": ids.clone()}
    return out


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (scaled_dot_product_attention) and a GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, w = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(w, dim=-1)
        q, k, v = (z.view(b, t, self.heads, w // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, w))
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


class TinyGPT(nn.Module):
    """A causal character language model: ``model(input_ids=(batch, positions))`` -> logits (batch, positions,
    vocabulary)."""

    def __init__(self, vocab: int, context: int, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.context = context
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)
        for name, p in self.named_parameters():  # GPT-2's initialization: N(0, 0.02), residual projections scaled
            if p.dim() > 1:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.context:
            raise ValueError(f"{t} positions, more than the model's context of {self.context}")
        h = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def tiny_gpt(input_shape, num_classes: int, width: int = 64, layers: int = 2, heads: int = 4) -> TinyGPT:
    """The study's model factory (``[model] name = "batchgap.charlm:tiny_gpt"``): ``input_shape`` = (window,),
    ``num_classes`` = the vocabulary."""
    return TinyGPT(num_classes, input_shape[0], width, layers, heads)
