"""Examples -> tensors: source tokens, decoder inputs (start token + shifted target) and labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .backbones import Backbone
from .tasks import Example


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    decoder_input_ids: torch.Tensor
    labels: torch.Tensor  # -100 where there is no target token
    task_ids: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            *(
                t.to(device)
                for t in (
                    self.input_ids,
                    self.attention_mask,
                    self.decoder_input_ids,
                    self.labels,
                    self.task_ids,
                )
            )
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "decoder_input_ids": self.decoder_input_ids,
            "labels": self.labels,
            "task_ids": self.task_ids,
        }


def collate(
    backbone: Backbone,
    examples: Sequence[Example],
    task_index: dict[str, int],
    max_source_length: int,
    max_target_length: int,
) -> Batch:
    source = backbone.tokenize([e.input for e in examples], max_source_length)
    targets = [backbone.target_ids(e.target)[:max_target_length] for e in examples]
    width = max(len(t) for t in targets)
    labels = torch.full((len(targets), width), -100, dtype=torch.long)
    decoder_inputs = torch.full((len(targets), width), backbone.pad_token_id, dtype=torch.long)
    for row, ids in enumerate(targets):
        labels[row, : len(ids)] = torch.tensor(ids)
        decoder_inputs[row, 0] = backbone.decoder_start_token_id
        decoder_inputs[row, 1 : len(ids)] = torch.tensor(ids[:-1])
    task_ids = torch.tensor([task_index[e.task] for e in examples], dtype=torch.long)
    return Batch(source["input_ids"], source["attention_mask"], decoder_inputs, labels, task_ids)
