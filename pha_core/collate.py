"""Examples -> tensors: source tokens, decoder inputs (start token + shifted target) and labels.

A training batch mixes tasks whose inputs differ ~15x in length (SST-2 ~15 tokens, RTE ~70, up to 256), so
padding a batch of 64 to its longest row spends most of the encoder on padding. `collate_buckets` cuts one
batch into length-sorted buckets of at most `token_budget` padded tokens each (buckets.py: the cut that pads
least for what a bucket costs); the model sums the loss over
the buckets of one batch, so the losses (and L_IR over the whole batch) are those of the unbucketed batch.
Measured on the GLUE mix (bench/train_speed.py): see docs/results.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .backbones import Backbone
from .buckets import length_buckets
from .source import Source, make_source, split_fields
from .tasks import Example


@dataclass
class Batch:
    source: Source  # the encoder input (source.py)
    decoder_input_ids: torch.Tensor
    labels: torch.Tensor  # -100 where there is no target token
    task_ids: torch.Tensor
    weights: torch.Tensor | None = None  # per-example CE weight [B] (label_weights); None: all 1

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.source.to(device),
            *(t.to(device) for t in (self.decoder_input_ids, self.labels, self.task_ids)),
            None if self.weights is None else self.weights.to(device),
        )


def label_weights(train_sets: Mapping[str, Sequence[Example]], classification: Callable[[str], bool]) -> dict:
    """(task, target) -> weight that makes each label of a classification task weigh the same in CE:
    n / (labels x count), so a task's mean weight over its sample is 1. Regression tasks are left out (1)."""
    weights: dict[tuple[str, str], float] = {}
    for task, examples in train_sets.items():
        if not classification(task) or not examples:
            continue
        counts = Counter(e.target for e in examples)
        for target, count in counts.items():
            weights[task, target] = len(examples) / (len(counts) * count)
    return weights


def collate_buckets(
    backbone: Backbone,
    examples: Sequence[Example],
    task_index: dict[str, int],
    max_source_length: int,
    max_target_length: int,
    token_budget: int,
    by_field: bool = False,
    weights: Mapping[tuple[str, str], float] | None = None,
) -> list[Batch]:
    """`collate` per length bucket (see the module docstring); with `by_field`, an example's length is that of
    its longest field and it counts one encoder row per field."""
    pieces = [split_fields(e.input) if by_field else [e.input] for e in examples]
    counts = iter(backbone.count_tokens([p for ps in pieces for p in ps]))
    lengths = [min(max(next(counts) for _ in ps), max_source_length) for ps in pieces]
    rows = [len(ps) for ps in pieces]
    return [
        collate(
            backbone, [examples[i] for i in bucket], task_index, max_source_length, max_target_length, by_field, weights
        )
        for bucket in length_buckets(lengths, token_budget, rows)
    ]


def collate(
    backbone: Backbone,
    examples: Sequence[Example],
    task_index: dict[str, int],
    max_source_length: int,
    max_target_length: int,
    by_field: bool = False,
    weights: Mapping[tuple[str, str], float] | None = None,
) -> Batch:
    """Tensors of `examples`; `by_field`: each input's fields tokenised apart (PHAConfig.by_field); `weights`:
    per-(task, target) CE weights (label_weights; None: unweighted)."""
    source = make_source(backbone, [e.input for e in examples], max_source_length, by_field)
    targets = [backbone.target_ids(e.target)[:max_target_length] for e in examples]
    width = max(len(t) for t in targets)
    labels = torch.full((len(targets), width), -100, dtype=torch.long)
    decoder_inputs = torch.full((len(targets), width), backbone.pad_token_id, dtype=torch.long)
    for row, ids in enumerate(targets):
        labels[row, : len(ids)] = torch.tensor(ids)
        decoder_inputs[row, 0] = backbone.decoder_start_token_id
        decoder_inputs[row, 1 : len(ids)] = torch.tensor(ids[:-1])
    task_ids = torch.tensor([task_index[e.task] for e in examples], dtype=torch.long)
    row_weights = None
    if weights:
        row_weights = torch.tensor([weights.get((e.task, e.target), 1.0) for e in examples], dtype=torch.float32)
    return Batch(source, decoder_inputs, labels, task_ids, row_weights)
