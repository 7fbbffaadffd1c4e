"""Rank classification: score every answer a task allows under the decoder, in one batched pass, and pick.

Greedy decoding can write anything, including words no task has (a wrong route or a collapsed model answers
with another task's label). For a task with label words the decoder instead scores each label's whole token
sequence (its words, then EOS):

    log p(label | x) = sum_t log softmax_{w in next(label_<t)}(decoder(x, label_<t))[label_t]

where next(prefix) are the words the task's candidates put after that prefix: the decoder's output layer is
projected onto those words only and normalised among them (for single-word labels, the softmax of the first
word's logits over the labels' first words; EOS then scores 0). That is the distribution over the answers the
task allows, and it reads a handful of the output layer's 30,522 rows instead of all of them (47 MB per call
for MiniLM: most of a small batch's scoring time). P(label | x) = softmax over the labels of those
log-likelihoods. The answer is the most probable label (always a valid one) and comes with every label's
probability.

STS-B has no label words: its targets are scores rounded to 0.2 ("3.8"), so its answer space is the 26 bins
0.0 ... 5.0, and the answer is the expectation over the bins (sum_b P(b) * b), a real number: Pearson rewards a
graded answer, the argmax bin throws that information away (docs/results.md measures both). Its two sentences
are read in both orders and the answer is the mean of the two readings (`BOTH_ORDERS`): the similarity of A
and B is that of B and A, and a cross-encoder's two readings differ, so their mean has less noise.

A token that only one candidate puts after its prefix scores log 1 = 0 (EOS after a whole label, the "." of a
bin), so the decoder runs only as far as the candidates branch (_Plan): one step a row for GLUE's label words,
which differ in their first token; for STS-B's bins, which branch after the start and after "d." ("5." has one
bin), five sequences of 3 tokens (start, digit, ".") a row instead of 26 of 4. Those
sequences are the rows of a decoder pass (chunked to bound memory) that start from their row's cache
(cross-attention keys and values made once per row), and the output layer runs once per branching (row,
prefix); rows of a batch may belong to different tasks, each with its own candidates and adapters. A backbone
that reads its memory without projecting it (MiniLM: `start_states`, `folded_states`) needs no row cache: the
rows whose labels differ in their first word take one pass, the others as few as the memory bound allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from .adapters import AdapterWeights
from .backbones import select_cache_rows
from .buckets import length_buckets
from .tasks import fill_template, get_task, template_fields, template_pattern

# STS-B targets are rounded to 0.2 (tasks._stsb_target), so these are every target it can have.
STSB_BINS: tuple[str, ...] = tuple(f"{i / 5:.1f}" for i in range(26))
# Tasks whose answer is the mean of the readings with the two fields in either order (one more encoder and
# decoder pass for their rows). On the demo (bench/both_orders.py, docs/results.md section 2): STS-B validation
# 0.853 -> 0.858, test 0.841 -> 0.856. MRPC and QQP are symmetric too but lost on validation (0.839 -> 0.827,
# 0.799 -> 0.798), so they read one order.
BOTH_ORDERS: tuple[str, ...] = ("stsb",)
# (input, candidate) pairs times the source tokens they read, per decoder pass. Each pass holds the row cache's
# cross-attention keys and values copied per pair ([pairs, source tokens, 2 x d] a layer): a bound keeps that
# transient small enough for the allocator to reuse instead of growing the process (the load test measured RSS
# growth under traffic of 14.5 MiB with 1024 pairs a pass, 8.2 with 128). 32 pairs of 256 tokens (the source
# window) is 8192: 25 MB for MiniLM's 2-layer decoder, 75 MB for 6 layers. Counted in tokens, not pairs, so that
# short rows with many candidates share a pass: 16 STS-B rows (26 bins each, ~30 tokens) took 16 passes under a
# bound of 32 pairs, and take 2 under this one.
MAX_PAIR_TOKENS = 32 * 256
# What one decoder pass costs beyond its cross-attention projections, in source tokens of them: a small batch's
# pass costs what streaming its weights costs (~3 ms for MiniLM's 6 layers on 2 CPU cores), ~100 tokens of
# cross-attention projections. Below it, one decoder pass over the pairs beats two passes (start token per row,
# then the pairs from its cache) where the row cache would save fewer tokens (candidates beyond the first,
# times the longest source row); and it is what cutting a batch into one more pass costs (_row_chunks).
SHARED_CACHE_MIN_TOKENS = 96
# What a label temperature may be. Outside it the probabilities are one-hot or uniform to three decimals (label
# log-likelihoods span a few tens of nats), and a tiny T would overflow them to inf/NaN.
TEMPERATURE_BOUNDS = (0.01, 100.0)


@dataclass(frozen=True)
class AnswerSpace:
    """What a task's answer can be: label words, or numeric bins whose expectation is the answer."""

    words: tuple[str, ...]
    regression: bool = False
    # Added to each word's log-likelihood before the softmax: the task's label prior, fitted on held-out rows
    # or an adapted task's k examples (label_prior.py); None: none.
    offsets: tuple[float, ...] | None = None
    # Divides the (offset) log-likelihoods before the softmax: > 1 softens over-confident probabilities. Fitted
    # after the offsets on the same held-out rows (label_prior.py), so it never changes which label wins.
    temperature: float = 1.0
    # A two-field template whose texts are also read with the fields swapped, the answer being the mean of the
    # two readings' probabilities (BOTH_ORDERS); None: the text as it is written only.
    both_orders: str | None = None

    def __post_init__(self) -> None:
        if not self.words:
            raise ValueError("an answer space needs at least one candidate")
        if len(set(self.words)) != len(self.words):
            raise ValueError(f"candidates must be distinct, got {list(self.words)}")
        if self.offsets is not None and len(self.offsets) != len(self.words):
            raise ValueError(f"{len(self.offsets)} label offsets for {len(self.words)} labels")
        if self.offsets is not None and not all(math.isfinite(x) for x in self.offsets):
            raise ValueError("label offsets must be finite numbers")
        low, high = TEMPERATURE_BOUNDS
        if not low <= self.temperature <= high:  # NaN fails this too
            raise ValueError(f"label temperature must be a number in [{low}, {high}], got {self.temperature!r}")
        if self.regression:
            [float(w) for w in self.words]  # every bin must be a number
        if self.both_orders is not None and len(template_fields(self.both_orders)) != 2:
            raise ValueError(f"both orders need a template of two fields, got {self.both_orders!r}")

    @classmethod
    def of_task(cls, name: str, offsets: Sequence[float] | None = None, temperature: float = 1.0) -> AnswerSpace | None:
        """The answer space of a known task (STS-B: its 0.2 bins), with its fitted label prior and temperature
        (label_prior.py) when it has them; None for tasks without a space."""
        spec = get_task(name)
        if spec.labels is not None:
            space = cls.of_labels(spec.labels, offsets, temperature)
        elif name == "stsb":
            space = cls(STSB_BINS, regression=True)
        else:
            return None
        return replace(space, both_orders=spec.template) if name in BOTH_ORDERS else space

    @classmethod
    def of_labels(
        cls, labels: Sequence[str] | None, offsets: Sequence[float] | None = None, temperature: float = 1.0
    ) -> AnswerSpace | None:
        if not labels:
            return None
        try:
            values = None if offsets is None else tuple(float(x) for x in offsets)
            scale = float(temperature)
        except (TypeError, ValueError):
            raise ValueError("label offsets and temperature must be finite numbers") from None
        return cls(tuple(labels), offsets=values, temperature=scale)


@dataclass(frozen=True)
class Scored:
    """One input's answer: the text it gives, and the probability of every candidate (None: generated)."""

    output: str
    probabilities: dict[str, float] | None


def candidate_ids(backbone, space: AnswerSpace) -> list[list[int]]:
    """Token ids of every candidate, each ending with EOS (what the decoder was trained to emit)."""
    return [backbone.target_ids(word) for word in space.words]


@dataclass(frozen=True)
class _Plan:
    """What one row's candidates need from the decoder (module docstring).

    A token whose prefix only one candidate continues has log-probability 0 (it is normalised among one word),
    so the decoder need only reach the prefixes where candidates branch: GLUE's label words all differ in their
    first token, so their whole likelihood is read off the start token's state (one decoder step a row, where
    teacher forcing every label took its length in steps per label); STS-B's 26 bins need five sequences.
    """

    sequences: tuple[tuple[int, ...], ...]  # decoder inputs after the start token; none a prefix of another
    heads: tuple[tuple[int, int], ...]  # per branching prefix: (sequence holding it, position of its state)
    followers: tuple[tuple[int, ...], ...]  # per branching prefix: the words candidates put after it
    steps: tuple[tuple[tuple[int, int], ...], ...]  # per candidate: its (branching prefix, token) pairs

    @classmethod
    def of(cls, candidates: Sequence[Sequence[int]]) -> _Plan:
        after: dict[tuple[int, ...], set[int]] = {}
        for ids in candidates:
            for t, token in enumerate(ids):
                after.setdefault(tuple(ids[:t]), set()).add(token)
        branching = {prefix: i for i, prefix in enumerate(p for p, words in after.items() if len(words) > 1)}
        steps = tuple(
            tuple((branching[tuple(ids[:t])], token) for t, token in enumerate(ids) if tuple(ids[:t]) in branching)
            for ids in candidates
        )

        # each candidate's tokens up to its last branching prefix, longest first; one that another extends is
        # decoded as part of it (the decoder is causal: a state depends on its prefix only)
        def last_branch(ids: Sequence[int]) -> int | None:
            return max((t for t in range(len(ids)) if tuple(ids[:t]) in branching), default=None)

        reach = {tuple(ids[:t]) for ids in candidates if (t := last_branch(ids)) is not None}
        sequences: list[tuple[int, ...]] = []
        for r in sorted(reach, key=len, reverse=True):
            if not any(seq[: len(r)] == r for seq in sequences):
                sequences.append(r)
        heads = tuple(
            (next(i for i, seq in enumerate(sequences) if seq[: len(prefix)] == prefix), len(prefix))
            for prefix in branching
        )
        followers = tuple(tuple(sorted(after[prefix])) for prefix in branching)
        return cls(tuple(sequences), heads, followers, steps)


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
    The decoder runs over each row's distinct prefixes up to where its candidates last branch (_Plan), and the
    output layer once per branching prefix, onto the words that may follow it (module docstring): the
    distribution of the next token depends on nothing else. Rows sharing one candidate list share its plan.
    """
    by_list: dict[int, _Plan] = {}  # rows of one task share their candidate list (and its plan)
    for c in candidates:
        if id(c) not in by_list:
            by_list[id(c)] = _Plan.of(c)
    plans = [by_list[id(c)] for c in candidates]
    scores = [torch.zeros(len(c), dtype=torch.float32) for c in candidates]
    spans = _memory_spans(attention_mask)
    for rows in _passes(plans, spans, model.backbone.reads_memory_unprojected):
        seqs = [(row, seq) for row in rows for seq in plans[row].sequences]
        width = 1 + max(len(seq) for _, seq in seqs)
        # Only as much of the memory as these rows use: a batch's memory is as wide as its longest input.
        span = int(spans[rows].max())
        hidden, mask = encoder_hidden[:, :span], attention_mask[:, :span]
        states = _sequence_states(model, hidden, mask, adapters, rows, seqs, width)
        _add_log_probs(model.backbone, states.reshape(-1, states.size(-1)), width, rows, plans, scores)
    return scores


def _add_log_probs(bb, states: torch.Tensor, width: int, rows: list[int], plans: list[_Plan], scores) -> None:
    """Each candidate's score of `rows`: its tokens' log-probabilities at its row's branching prefixes, each
    state projected onto the words that may follow it and normalised among them (`states` [seqs * width, d])."""
    at, follows, head_of, words = [], [], [], set()
    first_seq = 0
    for row in rows:
        plan = plans[row]
        head_of.append(len(at))
        at += [(first_seq + seq) * width + position for seq, position in plan.heads]
        follows += plan.followers
        words.update(*plan.followers)
        first_seq += len(plan.sequences)
    column = {word: j for j, word in enumerate(sorted(words))}
    allowed = torch.zeros(len(at), len(column), dtype=torch.bool)
    for h, after in enumerate(follows):
        allowed[h, [column[w] for w in after]] = True
    device = states.device
    logits = bb.lm_head(states[torch.tensor(at, device=device)], torch.tensor(list(column), device=device)).float()
    logits = logits.masked_fill(~allowed.to(device), float("-inf"))
    log_probs = (logits - logits.logsumexp(dim=-1, keepdim=True)).cpu()
    # every scored token of every candidate of these rows at once: (head, word) -> its candidate's total
    heads, cols, owner, owners = [], [], [], []
    for row, base in zip(rows, head_of, strict=True):
        for c, steps in enumerate(plans[row].steps):
            heads += [base + h for h, _ in steps]
            cols += [column[t] for _, t in steps]
            owner += [len(owners)] * len(steps)
            owners.append((row, c))
    totals = torch.zeros(len(owners)).index_add_(0, torch.tensor(owner), log_probs[heads, cols])
    for (row, c), total in zip(owners, totals.tolist(), strict=True):
        scores[row][c] = total


def _sequence_states(model, encoder_hidden, attention_mask, adapters, rows, seqs, width) -> torch.Tensor:
    """Decoder states [seqs, width, d] of every (row, sequence) after the start token, teacher-forced.

    Every sequence starts with the decoder's start token, so that first step runs once per row, and its cache
    (self-attention of the start token, cross-attention keys and values of the row's encoder states) is then
    copied to the row's sequences, which decode the rest of their tokens from it. The cross-attention
    projections of the encoder states -- most of a scoring pass's matmuls -- are made once per row, not once per
    sequence. Exact: the same attention over the same keys. Where that saves less than a second pass costs
    (SHARED_CACHE_MIN_TOKENS), one pass instead. Where there is nothing after the start token (width 1: a row's
    label words differ in their first word, every GLUE task but STS-B), the backbone's `start_states`, which
    need not project the memory at all; a backbone that reads its memory unprojected takes every sequence in one
    pass of `folded_states` instead of the row cache.
    """
    bb, device = model.backbone, encoder_hidden.device
    if width > 1 and bb.reads_memory_unprojected:  # each sequence reads its row's memory itself: no cache
        pairs = _index([row for row, _ in seqs], device, encoder_hidden.size(0))
        with model.decoder_context.use(_select(adapters, pairs)):
            dec_in = _decoder_inputs(bb, seqs, width).to(device)
            return bb.folded_states(dec_in, _take(encoder_hidden, pairs), _take(attention_mask, pairs))
    local = {row: i for i, row in enumerate(rows)}
    seq_local = _index([local[row] for row, _ in seqs], device)
    row_index = _index(rows, device, encoder_hidden.size(0))
    hidden, mask = _take(encoder_hidden, row_index), _take(attention_mask, row_index)
    row_adapters = _select(adapters, row_index)
    if width == 1:  # one empty sequence a row (none is a prefix of another): the rows' own order
        with model.decoder_context.use(row_adapters):
            return bb.start_states(hidden, mask)
    if (len(seqs) - len(rows)) * int(mask.sum(1).max()) < SHARED_CACHE_MIN_TOKENS:
        return _one_pass_states(model, hidden, mask, row_adapters, seq_local, seqs, width)
    start = torch.full((len(rows), 1), bb.decoder_start_token_id, dtype=torch.long, device=device)
    with model.decoder_context.use(row_adapters):
        first, cache = bb.decode_states(start, hidden, mask, use_cache=True)
    first = _take(first, seq_local)
    rest_in = _decoder_inputs(bb, seqs, width)[:, 1:]  # the start token is in the cache
    if seq_local is not None:
        select_cache_rows(cache, seq_local)
    with model.decoder_context.use(_select(row_adapters, seq_local)):
        rest, _ = bb.decode_states(rest_in.to(device), _take(hidden, seq_local), _take(mask, seq_local), cache, True)
    return torch.cat([first, rest], dim=1)


def _index(rows: list[int], device: torch.device, n: int | None = None) -> torch.Tensor | None:
    """`rows` as an index tensor, or None where taking them would change nothing: 0, 1, ..., n - 1 in order
    (`n`: the rows there are; default len(rows)). A serving batch of one row, or of one label sequence a row, then
    copies no encoder states and no adapter weights (at 16 rows those are megabytes a pass)."""
    if rows == list(range(len(rows) if n is None else n)):
        return None
    return torch.tensor(rows, device=device)


def _take(tensor: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return tensor if index is None else tensor.index_select(0, index)


def _select(adapters: list[AdapterWeights] | None, index: torch.Tensor | None) -> list[AdapterWeights] | None:
    """Adapter weights of the rows `index` names (repeats allowed; None: all, as they are)."""
    return adapters if adapters is None or index is None else [w.index_select(index) for w in adapters]


def _one_pass_states(model, hidden, mask, adapters, seq_local, seqs, width) -> torch.Tensor:
    """The same states from one decoder pass over every sequence, start token included (each sequence projects
    its row's encoder states for cross-attention itself)."""
    dec_in = _decoder_inputs(model.backbone, seqs, width)
    with model.decoder_context.use(_select(adapters, seq_local)):
        states, _ = model.backbone.decode_states(
            dec_in.to(hidden.device), _take(hidden, seq_local), _take(mask, seq_local)
        )
    return states


def _decoder_inputs(bb, seqs, width: int) -> torch.Tensor:
    """Teacher-forced decoder inputs [seqs, width]: the start token, then each sequence; padded after (the
    decoder is causal: padding changes no state before it)."""
    dec_in = torch.full((len(seqs), width), bb.pad_token_id, dtype=torch.long)
    dec_in[:, 0] = bb.decoder_start_token_id
    for i, (_, seq) in enumerate(seqs):
        dec_in[i, 1 : 1 + len(seq)] = torch.tensor(seq, dtype=torch.long)
    return dec_in


def _memory_spans(mask: torch.Tensor) -> torch.Tensor:
    """[B] how far into the memory each row reaches: its last real position + 1 (at least 1)."""
    positions = torch.arange(1, mask.size(1) + 1, device=mask.device)
    return (mask.bool() * positions).amax(dim=1).clamp_min(1).cpu()


def _passes(plans: Sequence[_Plan], spans: torch.Tensor, unprojected: bool) -> list[list[int]]:
    """The rows of each decoder pass, cut by width (_row_chunks). Where the backbone reads the memory
    `unprojected`, a memory state costs ~1/10 of a projected one and each extra pass streams the decoder's
    weights again: the rows that need the start token's state alone (their candidates differ in their first
    word) share one pass, and the others as few passes as MAX_PAIR_TOKENS allows."""
    if not unprojected:
        return _row_chunks([len(plan.sequences) for plan in plans], spans)
    first_only = [row for row, plan in enumerate(plans) if plan.sequences == ((),)]
    longer = [0 if plan.sequences == ((),) else len(plan.sequences) for plan in plans]
    return ([first_only] if first_only else []) + _row_chunks(longer, spans, call_cost=MAX_PAIR_TOKENS)


def _row_chunks(
    sequences: Sequence[int], spans: torch.Tensor, call_cost: int = SHARED_CACHE_MIN_TOKENS
) -> list[list[int]]:
    """Rows grouped by how much memory they read (spans [B]) into decoder passes, each cut to its own widest
    row: a mixed serving batch has inputs of 10 to 250 tokens, and every sequence's cross-attention (and the
    cached keys and values copied to it) reads the whole width of its pass. The groups are the cheapest cut
    (buckets.py) of sequences x width, with a pass's own cost of `call_cost` tokens and at most
    MAX_PAIR_TOKENS a pass; a row is never split (its sequences share head rows), and a row with none (a single
    candidate: probability 1) joins no group."""
    rows = [r for r in range(len(sequences)) if sequences[r]]
    widths = [int(spans[r]) for r in rows]
    counts = [sequences[r] for r in rows]
    groups = length_buckets(widths, MAX_PAIR_TOKENS, counts, call_cost=call_cost)
    return [[rows[i] for i in group] for group in groups]


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
    if space.offsets is not None:
        loglik = loglik + torch.tensor(space.offsets, dtype=loglik.dtype)
    probs = torch.softmax(loglik.double() / space.temperature, dim=0)
    return _from_table(space, {word: float(p) for word, p in zip(space.words, probs.tolist(), strict=True)})


def _from_table(space: AnswerSpace, table: dict[str, float]) -> Scored:
    """The answer a table of probabilities gives: the expectation over numeric bins, else the likeliest word."""
    if space.regression:
        value = sum(float(word) * p for word, p in table.items())
        return Scored(f"{value:.3f}", table)
    return Scored(max(space.words, key=table.__getitem__), table)


def other_order(space: AnswerSpace | None, text: str) -> str | None:
    """`text` with its two fields swapped, when `space` reads both orders and `text` is written with its template
    (and the swap changes it); None otherwise."""
    if space is None or space.both_orders is None:
        return None
    found = template_pattern(space.both_orders).fullmatch(text)
    if found is None:
        return None
    first, second = template_fields(space.both_orders)
    swapped = fill_template(space.both_orders, {first: found.group(2), second: found.group(1)})
    return None if swapped == text else swapped


def second_readings(spaces: Sequence[AnswerSpace | None], texts: Sequence[str]) -> tuple[list[int], list[str]]:
    """The rows whose space reads both orders (BOTH_ORDERS), and their texts in the other order."""
    rows, swapped = [], []
    for i, (space, text) in enumerate(zip(spaces, texts, strict=True)):
        other = other_order(space, text)
        if other is not None:
            rows.append(i)
            swapped.append(other)
    return rows, swapped


def mean_of_readings(
    spaces: Sequence[AnswerSpace | None], answers: Sequence[Scored], rows: list[int], seconds: Sequence[Scored]
) -> list[Scored]:
    """`answers`, with row rows[j] answered by the mean of its two readings' probabilities (seconds[j] the other
    order's): the one rule of the second reading, in evaluation and serving alike."""
    out = list(answers)
    for i, second in zip(rows, seconds, strict=True):
        first, space = out[i], spaces[i]
        out[i] = _from_table(space, {w: (first.probabilities[w] + second.probabilities[w]) / 2 for w in space.words})
    return out


def read_both_orders(
    spaces: Sequence[AnswerSpace | None],
    texts: Sequence[str],
    answers: Sequence[Scored],
    read: Callable[[list[int], list[str]], list[Scored]],
) -> list[Scored]:
    """`answers` (each row read as written), with the rows whose space reads both orders answered by the mean of
    both readings. `read(rows, texts)` answers `texts` as the rows `rows` would be answered (their adapters,
    their spaces): the caller's encoder. (The server's engine scores both readings in one pass instead.)"""
    rows, swapped = second_readings(spaces, texts)
    return mean_of_readings(spaces, answers, rows, read(rows, swapped) if rows else [])
