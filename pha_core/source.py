"""What the decoder reads: the encoder's states of an input, its fields encoded apart (PHAConfig.encoding).

The default backbone's encoder, all-MiniLM-L6-v2, was trained as a bi-encoder: one sentence in, one mean-pooled
embedding out, compared with another sentence's by cosine. Fed the two fields of a pair task as one sequence
(``premise: ... hypothesis: ...``), it gives states that a classifier reads far worse: a logistic regression on
the mean-pooled states of the joint sequence scores 42.2 on the GLUE average at 100 examples per task, on the
fields' embeddings apart 57.6 (STS-B 0.23 vs 0.82; bench/baselines.py, docs/results.md §0).

With encoding "fields" every field is encoded on its own ([CLS] field [SEP], the encoder's shared adapters
on), and the decoder cross-attends to one memory per input:

    [ u_1 ... u_S, |u_{S-1} - u_S|, u_{S-1} * u_S ;  tokens of field 1 ; ... ; tokens of field S ]

u_i is field i's mean-pooled, L2-normalised state (the sentence embedding the encoder was trained to give); the
pair features (only for S >= 2) are those of the last two fields, the pair every known task compares (WiC's
two sentences after its word, WSC's two spans after its text). Each of these "field tokens" gets a learnt
embedding of its slot. Encoding "joint", the default, gives the decoder the states of the whole text, as the
paper does: measured on the demo recipe, PHA read the joint text better (0.649 vs 0.567 GLUE average, task
given; docs/results.md §2), though a linear probe reads the fields apart better.

Fields are found in the text itself, at the field markers of the task table's templates (``premise:``,
``sentence2:`` ...; tasks.FIELD_MARKERS), so a template string from a file, the HF copy or a request splits the
same way. A marker must start the text or follow whitespace; a text without markers is one field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from .buckets import INFERENCE_CALL_COST, length_buckets
from .retriever import masked_mean
from .tasks import FIELD_MARKERS, template_pattern

# Fields one input may have (the task table's most is 3: WiC, WSC); markers after the 4th stay inside it.
MAX_FIELDS = 4
# Field tokens per input: one u per field, then |u - v| and u * v.
FIELD_SLOTS = MAX_FIELDS + 2
# Scale of the field tokens: the token states of MiniLM's last layer have norms of about 8 (4-12, measured on
# NLI rows), so a unit u is scaled to 8 and so is |u - v|; the entries of u * v are ~1/d each, so that token is
# scaled by a further sqrt(d) to reach the same size. The decoder's cross-attention sees all at one scale.
TOKEN_NORM = 8.0

_SPLIT = re.compile(r"(?:^|(?<=\s))(?=(?:" + "|".join(re.escape(m) for m in FIELD_MARKERS) + r")\s)")


def split_fields(text: str) -> list[str]:
    """The fields of a formatted input, each with its marker (``premise: A man ...``); at least one."""
    parts = [p.strip() for p in _SPLIT.split(text)]
    parts = [p for p in parts if p] or [text]
    if len(parts) > MAX_FIELDS:
        parts = parts[: MAX_FIELDS - 1] + [" ".join(parts[MAX_FIELDS - 1 :])]
    return parts


def candidates_by_template(texts: list[str], templates: list[str | None]) -> torch.Tensor:
    """[B, T] bool: whether text b is written as task t's template is (a task without a template takes any
    text): the routing candidates of every input, as the server narrows them (tasks.template_pattern)."""
    fits = {t: template_pattern(t) if t else None for t in dict.fromkeys(templates)}  # one pattern per template
    rows = [[fits[t] is None or fits[t].fullmatch(text) is not None for t in templates] for text in texts]
    return torch.tensor(rows, dtype=torch.bool).view(len(texts), len(templates))


@dataclass
class Source:
    """A batch's encoder input: every field of every input as one row, and where its states go.

    segment_ids/segment_mask: [N, L] tokens of the N fields (all inputs' fields, in order);
    owner: [N] the input each field belongs to; token_index/token_mask: [B, T] for each input, the flat
    positions (into N * L) of its fields' real tokens, concatenated; field_index/field_mask: [B, MAX_FIELDS]
    each input's fields (as rows of N); pair_index: [B, 2] its last two fields; has_pair: [B] whether it has 2+.
    """

    segment_ids: torch.Tensor
    segment_mask: torch.Tensor
    owner: torch.Tensor
    token_index: torch.Tensor
    token_mask: torch.Tensor
    field_index: torch.Tensor
    field_mask: torch.Tensor
    pair_index: torch.Tensor
    has_pair: torch.Tensor

    def __len__(self) -> int:
        return self.token_index.size(0)

    def to(self, device: torch.device | str) -> Source:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass(frozen=True)
class Tokens:
    """One input tokenised ahead of its batch (the server does it once, off the model thread, where it checks
    the input's length): the uncut token ids of each piece the model encodes (the whole text, or each field when
    it encodes them apart), and `count`, the whole text's tokens, specials included."""

    pieces: tuple[tuple[int, ...], ...]
    count: int


def tokenize(backbone, texts: list[str], by_field: bool) -> list[Tokens]:
    """`texts` as `Tokens`: what `source_of_tokens` assembles into the batch `make_source` would give."""
    pieces = [split_fields(t) if by_field else [t] for t in texts]
    ids = iter(backbone.token_ids([p for ps in pieces for p in ps]))
    per_text = [tuple(tuple(next(ids)) for _ in ps) for ps in pieces]
    counts = backbone.count_tokens(texts) if by_field else [len(p[0]) for p in per_text]
    return [Tokens(p, n) for p, n in zip(per_text, counts, strict=True)]


def make_source(backbone, texts: list[str], max_length: int, by_field: bool) -> Source:
    """Tokenise `texts` (each field apart when `by_field`, each field cut at `max_length` tokens)."""
    pieces = [split_fields(t) if by_field else [t] for t in texts]
    enc = backbone.tokenize([p for ps in pieces for p in ps], max_length)
    return _assemble([len(ps) for ps in pieces], enc["input_ids"], enc["attention_mask"])


def source_of_tokens(backbone, tokens: list[Tokens], max_length: int) -> Source:
    """`make_source` of inputs tokenised already (`tokenize`): the same tensors, no tokenizer call."""
    enc = backbone.pad_ids([p for t in tokens for p in t.pieces], max_length)
    return _assemble([len(t.pieces) for t in tokens], enc["input_ids"], enc["attention_mask"])


def _assemble(n_pieces: list[int], ids: torch.Tensor, mask: torch.Tensor) -> Source:
    """A Source from the padded tokens of every piece ([N, L], inputs' pieces in order; input i has n_pieces[i])."""
    width, lengths = ids.size(1), mask.sum(1).tolist()
    owner, tokens, slots, pairs = [], [], [], []
    row = 0
    for i, n in enumerate(n_pieces):
        rows = list(range(row, row + n))
        row += n
        owner += [i] * n
        tokens.append(torch.cat([torch.arange(lengths[r]) + r * width for r in rows]))
        slots.append(rows)
        pairs.append(rows[-2:] if len(rows) >= 2 else [rows[0], rows[0]])
    token_index, token_mask = _padded(tokens)
    field_index, field_mask = _padded([torch.tensor(s) for s in slots], width=MAX_FIELDS)
    return Source(
        segment_ids=ids,
        segment_mask=mask,
        owner=torch.tensor(owner),
        token_index=token_index,
        token_mask=token_mask,
        field_index=field_index,
        field_mask=field_mask,
        pair_index=torch.tensor(pairs),
        has_pair=torch.tensor([n >= 2 for n in n_pieces]),
    )


def _padded(rows: list[torch.Tensor], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one [len(rows), width] index tensor (0 where padded) and its mask."""
    width = width or max(len(r) for r in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        index[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return index, mask


class FieldTokens(nn.Module):
    """The memory of encoding "fields": field tokens (with slot embeddings), then every field's token states."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        # Which slot a field token fills (u_1 ... u_MAX_FIELDS, |u - v|, u * v); BERT's embedding init scale.
        self.slots = nn.Embedding(FIELD_SLOTS, d_model)
        nn.init.normal_(self.slots.weight, std=0.02)
        self.product_scale = TOKEN_NORM * math.sqrt(d_model)

    def forward(self, hidden: torch.Tensor, source: Source) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, L, d] field states -> memory [B, MAX_FIELDS + 2 + T, d] and its mask."""
        u = nn.functional.normalize(masked_mean(hidden, source.segment_mask).float(), dim=-1)
        a, b = u[source.pair_index[:, 0]], u[source.pair_index[:, 1]]
        per_field = u[source.field_index] * TOKEN_NORM
        pair = torch.stack([(a - b).abs() * TOKEN_NORM, a * b * self.product_scale], dim=1)
        features = torch.cat([per_field, pair], dim=1) + self.slots.weight
        pair_mask = source.has_pair.long().unsqueeze(1).expand(-1, 2)
        tokens = hidden.reshape(-1, hidden.size(-1))[source.token_index]
        slot_mask = torch.cat([source.field_mask, pair_mask], dim=1)
        used = slot_mask.any(0)  # slots no input of the batch fills (e.g. all single-field) cost nothing
        memory = torch.cat([features[:, used].to(hidden.dtype), tokens], dim=1)
        mask = torch.cat([slot_mask[:, used], source.token_mask], dim=1)
        return memory, mask


def encode_by_length(encode, source: Source, token_budget: int = 2048):
    """`encode(ids, mask)` over the source's rows in length-sorted chunks, each cut to its own longest row.

    A serving batch mixes tasks (real GLUE rows of 10 to 250 tokens), and the fields of one input differ in
    length (an RTE premise ~50 tokens, its hypothesis ~10): one padded call spends most of the encoder on
    padding. The chunks are the cut buckets.py finds cheapest for an inference call (at most `token_budget`
    padded tokens each). `encode` returns states [n, l, d], or a tuple of them (backbone.encode_with_layer);
    so does this, each [N, L, d] in the source's row order. What stands at padded positions is masked everywhere.
    """
    ids, mask = source.segment_ids, source.segment_mask
    lengths = mask.sum(1).tolist()
    if ids.size(0) <= 1:
        return encode(ids, mask)
    chunks = length_buckets(lengths, token_budget, call_cost=INFERENCE_CALL_COST)
    if len(chunks) == 1:
        return encode(ids, mask)
    outputs, rows, several = [], [], False
    for chunk in chunks:
        index = torch.tensor(chunk, device=ids.device)
        width = max(lengths[i] for i in chunk)
        out = encode(ids[index, :width], mask[index, :width])
        several = isinstance(out, tuple)
        outputs.append(out if several else (out,))
        rows.append(index)
    merged = []
    for k, last in enumerate(outputs[-1]):
        states = last.new_zeros(ids.size(0), ids.size(1), last.size(-1))
        for index, out in zip(rows, outputs, strict=True):
            states[index, : out[k].size(1)] = out[k]
        merged.append(states)
    return tuple(merged) if several else merged[0]


def joint_memory(hidden: torch.Tensor, source: Source) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory of encoding "joint": each input is one row of the source, read as it is."""
    if source.segment_ids.size(0) != len(source):
        raise ValueError("a model with encoding 'joint' needs sources made with by_field=False")
    return hidden, source.segment_mask
