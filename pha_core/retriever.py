"""The instance-dense retriever G and prototype retrieval (paper Eq. 2 and Eq. 10).

G maps an input to z in the prototypes' space: an MLP on the attention-mask mean of the encoder's last hidden
state. The mean is NOT detached: L_IR and L_Pro train the shared encoder adapters too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens: hidden [B,T,d], mask [B,T] -> [B,d]."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class InstanceDenseRetriever(nn.Module):
    """G: Linear(d -> hidden), ReLU, Linear(hidden -> proto_dim)."""

    def __init__(self, d_model: int, hidden: int, proto_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, proto_dim))

    def forward(self, encoder_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(masked_mean(encoder_hidden, mask))


class Retrieval(NamedTuple):
    """Eq. 10 for a batch: the best prototype per input, its cosine, and the margin to the runner-up."""

    indices: torch.Tensor  # [B, top_k] prototype rows, best first
    scores: torch.Tensor  # [B, top_k] cosine similarities
    margin: torch.Tensor  # [B] best minus second best (best minus -1 when there is one prototype)


def retrieve(z: torch.Tensor, prototypes: torch.Tensor, top_k: int = 2) -> Retrieval:
    """k_a = argmax_i cos(k_i, z) for each z [B,D] over prototypes [T,D]."""
    if prototypes.size(0) == 0:
        raise ValueError("no prototypes to retrieve from")
    cos = F.normalize(z, dim=-1) @ F.normalize(prototypes, dim=-1).t()
    k = min(top_k, prototypes.size(0))
    scores, indices = cos.topk(max(k, 1), dim=-1)
    runner_up = scores[:, 1] if k > 1 else torch.full_like(scores[:, 0], -1.0)
    return Retrieval(indices, scores, scores[:, 0] - runner_up)
