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
    """Eq. 10 for a batch: the best prototype per input, its cosine, and the margin to the runner-up.

    The one contract of routing, kept by the server's FAISS index too (service/routing.py): an empty table
    raises LookupError, and with a single prototype there is no runner-up, so the margin is NaN (None there).
    """

    indices: torch.Tensor  # [B, top_k] prototype rows, best first
    scores: torch.Tensor  # [B, top_k] cosine similarities
    margin: torch.Tensor  # [B] best minus second best (NaN when there is one prototype)


def cosine_scores(z: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """cos(k_i, z) for every input z [B, D] and key k_i [T, D]: the similarity of Eq. 10, [B, T]."""
    return F.normalize(z, dim=-1) @ F.normalize(keys, dim=-1).t()


def retrieve(
    z: torch.Tensor, prototypes: torch.Tensor, top_k: int = 2, allowed: torch.Tensor | None = None
) -> Retrieval:
    """k_a = argmax_i cos(k_i, z) for each z [B,D] over prototypes [T,D]; with `allowed` [B,T] (bool), row b
    only among the prototypes it allows (every row must allow one: source.candidates_by_fields)."""
    if prototypes.size(0) == 0:
        raise LookupError("no prototypes to retrieve from")
    cos = cosine_scores(z, prototypes)
    if allowed is not None:
        if not bool(allowed.any(dim=1).all()):
            raise LookupError("an input allows none of the prototypes")
        cos = cos.masked_fill(~allowed.to(cos.device), float("-inf"))
    k = min(max(top_k, 2), prototypes.size(0))  # the runner-up is always looked at, for the margin
    scores, indices = cos.topk(k, dim=-1)
    runner_up = scores[:, 1] if k > 1 else torch.full_like(scores[:, 0], float("nan"))
    runner_up = torch.where(torch.isinf(runner_up), torch.full_like(runner_up, float("nan")), runner_up)
    keep = max(1, min(top_k, k))
    return Retrieval(indices[:, :keep], scores[:, :keep], scores[:, 0] - runner_up)
