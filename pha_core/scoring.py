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

Every (row, candidate) pair is one row of a single decoder pass (chunked to bound memory), and the LM head runs
once per distinct (row, prefix); rows of a batch may belong to different tasks, each with its own candidates
and adapters.
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
    The decoder runs over every (row, candidate) pair, but the LM head (the 30,522-word projection: most of the
    cost) runs once per distinct (row, prefix): the distribution of the next token depends on nothing else, so
    positions that candidates of a row share (the first token of every label; STS-B's bins "3.0" ... "3.8"
    share "3" and ".") are projected once: 39 head rows instead of 104 for STS-B's 26 bins. Exact.
    """
    bb = model.backbone
    scores = [torch.empty(len(c), dtype=torch.float32) for c in candidates]
    for rows in _row_chunks(candidates):
        pairs = [(row, c, ids) for row in rows for c, ids in enumerate(candidates[row])]
        index = torch.tensor([row for row, _, _ in pairs], device=encoder_hidden.device)
        width = max(len(ids) for _, _, ids in pairs)
        dec_in = torch.full((len(pairs), width), bb.pad_token_id, dtype=torch.long)
        for i, (_, _, ids) in enumerate(pairs):
            dec_in[i, 0] = bb.decoder_start_token_id
            dec_in[i, 1 : len(ids)] = torch.tensor(ids[:-1])
        chunk_adapters = None if adapters is None else [w.index_select(index) for w in adapters]
        with model.decoder_context.use(chunk_adapters):
            states = bb.decode_states(
                dec_in.to(encoder_hidden.device),
                encoder_hidden.index_select(0, index),
                attention_mask.index_select(0, index),
            )
        # One head row per distinct (row, prefix); every scored token points at its row.
        distinct: dict[tuple, int] = {}
        at, heads, tokens = [], [], []
        for i, (row, _, ids) in enumerate(pairs):
            for t, token in enumerate(ids):
                key = (row, *ids[:t])
                if key not in distinct:
                    distinct[key] = len(heads)
                    heads.append(i * width + t)
                at.append(distinct[key])
                tokens.append(token)
        logits = bb.lm_head(states.reshape(-1, states.size(-1))[torch.tensor(heads, device=states.device)]).float()
        # log p(token) = logit - logsumexp(logits): no second [positions, vocab] tensor as log_softmax makes.
        where = torch.tensor(at, device=logits.device)
        token_logp = logits[where, torch.tensor(tokens, device=logits.device)] - logits.logsumexp(dim=-1)[where]
        token_logp = token_logp.cpu()
        k = 0
        for row, c, ids in pairs:
            scores[row][c] = token_logp[k : k + len(ids)].sum()
            k += len(ids)
    return scores


def _row_chunks(candidates: Sequence[Sequence[Sequence[int]]]) -> list[list[int]]:
    """Rows grouped so that a group holds about MAX_PAIRS (row, candidate) pairs; a row is never split (its
    candidates share head rows)."""
    chunks: list[list[int]] = [[]]
    pairs = 0
    for row, cands in enumerate(candidates):
        if chunks[-1] and pairs + len(cands) > MAX_PAIRS:
            chunks.append([])
            pairs = 0
        chunks[-1].append(row)
        pairs += len(cands)
    return [c for c in chunks if c]


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
