"""Rank classification: score every answer a task allows under the decoder, in one batched pass, and pick.

Greedy decoding can write anything, including words no task has (a wrong route or a collapsed model answers
with another task's label). For a task with label words the decoder instead scores each label's whole token
sequence (its words, then EOS):

    log p(label | x) = sum_t log softmax(decoder(x, label_<t))[label_t]

over the full vocabulary, so the scores are the model's own sequence probabilities, and
P(label | x, one of the labels) = softmax over the labels of those log-likelihoods. The answer is the most
probable label (always a valid one) and comes with every label's probability.

STS-B has no label words: its targets are scores rounded to 0.2 ("3.8"), so its answer space is the 26 bins
0.0 ... 5.0, and the answer is the expectation over the bins (sum_b P(b) * b), a real number: Pearson rewards a
graded answer, the argmax bin throws that information away (docs/results.md measures both).

Every (row, candidate) pair is one row of a single decoder pass (chunked to bound memory); rows of a batch may
belong to different tasks, each with its own candidates and adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .adapters import AdapterWeights
from .tasks import get_task

# STS-B targets are rounded to 0.2 (tasks._stsb_target), so these are every target it can have.
STSB_BINS: tuple[str, ...] = tuple(f"{i / 5:.1f}" for i in range(26))
# (input, candidate) rows per decoder pass. Each pass holds logits of [rows, label tokens, 30,522 words] (32 rows x
# 4 tokens = 16 MB in float32): a bound keeps that transient small enough for the allocator to reuse instead of
# growing the process (the load test measured RSS growth under traffic of 14.5 MiB with 1024, 8.2 with 128).
MAX_PAIRS = 32


@dataclass(frozen=True)
class AnswerSpace:
    """What a task's answer can be: label words, or numeric bins whose expectation is the answer."""

    words: tuple[str, ...]
    regression: bool = False

    def __post_init__(self) -> None:
        if not self.words:
            raise ValueError("an answer space needs at least one candidate")
        if len(set(self.words)) != len(self.words):
            raise ValueError(f"candidates must be distinct, got {list(self.words)}")
        if self.regression:
            [float(w) for w in self.words]  # every bin must be a number

    @classmethod
    def of_task(cls, name: str) -> AnswerSpace | None:
        """The answer space of a known task (STS-B: its 0.2 bins); None for tasks without one."""
        spec = get_task(name)
        if spec.labels is not None:
            return cls(tuple(spec.labels))
        return cls(STSB_BINS, regression=True) if name == "stsb" else None

    @classmethod
    def of_labels(cls, labels: Sequence[str] | None) -> AnswerSpace | None:
        return cls(tuple(labels)) if labels else None


@dataclass(frozen=True)
class Scored:
    """One input's answer: the text it gives, and the probability of every candidate (None: generated)."""

    output: str
    probabilities: dict[str, float] | None


def candidate_ids(backbone, space: AnswerSpace) -> list[list[int]]:
    """Token ids of every candidate, each ending with EOS (what the decoder was trained to emit)."""
    return [backbone.target_ids(word) for word in space.words]


@torch.no_grad()
def label_log_likelihoods(
    model,
    encoder_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    adapters: list[AdapterWeights] | None,
    candidates: Sequence[Sequence[Sequence[int]]],
) -> list[torch.Tensor]:
    """Sum of token log-probabilities of every candidate of every row: a [C_i] tensor per row i.

    `candidates[i]` are row i's candidate token sequences (with EOS); `adapters` hold one adapter set per row.
    """
    bb = model.backbone
    pairs = [(row, ids) for row, cands in enumerate(candidates) for ids in cands]
    scores = torch.empty(len(pairs), dtype=torch.float32)
    for start in range(0, len(pairs), MAX_PAIRS):
        chunk = pairs[start : start + MAX_PAIRS]
        rows = torch.tensor([row for row, _ in chunk], device=encoder_hidden.device)
        width = max(len(ids) for _, ids in chunk)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        dec_in = torch.full((len(chunk), width), bb.pad_token_id, dtype=torch.long)
        for i, (_, ids) in enumerate(chunk):
            labels[i, : len(ids)] = torch.tensor(ids)
            dec_in[i, 0] = bb.decoder_start_token_id
            dec_in[i, 1 : len(ids)] = torch.tensor(ids[:-1])
        labels, dec_in = labels.to(encoder_hidden.device), dec_in.to(encoder_hidden.device)
        chunk_adapters = None if adapters is None else [w.index_select(rows) for w in adapters]
        with model.decoder_context.use(chunk_adapters):
            logits, _ = bb.decode(dec_in, encoder_hidden.index_select(0, rows), attention_mask.index_select(0, rows))
        logits = logits.float()
        # log p(token) = logit - logsumexp(logits): no second [rows, tokens, vocab] tensor as log_softmax makes.
        token_logp = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
        scores[start : start + len(chunk)] = token_logp.masked_fill(labels == -100, 0.0).sum(dim=1).cpu()
    out, at = [], 0
    for cands in candidates:
        out.append(scores[at : at + len(cands)])
        at += len(cands)
    return out


def rank(
    model,
    encoder_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    adapters: list[AdapterWeights] | None,
    spaces: Sequence[AnswerSpace],
    ids_of: dict[AnswerSpace, list[list[int]]] | None = None,
) -> list[Scored]:
    """The answer of every row within its own answer space (`spaces[i]`); `ids_of` caches token ids."""
    cache = {} if ids_of is None else ids_of
    for space in spaces:
        if space not in cache:
            cache[space] = candidate_ids(model.backbone, space)
    loglik = label_log_likelihoods(model, encoder_hidden, attention_mask, adapters, [cache[s] for s in spaces])
    return [answer(space, scores) for space, scores in zip(spaces, loglik, strict=True)]


def answer(space: AnswerSpace, loglik: torch.Tensor) -> Scored:
    """Label probabilities from sequence log-likelihoods, and the answer they give."""
    probs = torch.softmax(loglik.double(), dim=0)
    table = {word: float(p) for word, p in zip(space.words, probs.tolist(), strict=True)}
    if space.regression:
        value = sum(float(word) * p for word, p in table.items())
        return Scored(f"{value:.3f}", table)
    return Scored(space.words[int(probs.argmax())], table)
