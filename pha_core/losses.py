"""The two contrastive losses of PHA (paper Eq. 3-7) and the total objective (Eq. 9).

Both work on L2-normalised vectors with a temperature tau (0.1 in the paper):
  L_IR  (instance-instance): supervised contrastive over the mixed-task batch. For an anchor i, the positives
        P(i) are the other examples of its task; every other example is in the denominator:
            l_i = -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p/tau) / sum_{a != i} exp(z_i.z_a/tau) )
        Anchors without a positive in the batch drop out; a batch with none gives 0.
  L_Pro (prototype-instance): each z is classified among all task prototypes by cosine/tau with the standard
        softmax cross-entropy, target = its own task. (The reference code left the positive out of the
        denominator, so its loss could go negative; this is the standard form.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def instance_contrastive_loss(z: torch.Tensor, task_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_IR on z [B, D] with task labels [B]."""
    z = F.normalize(z, dim=-1)
    logits = z @ z.t() / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (task_ids.unsqueeze(0) == task_ids.unsqueeze(1)) & ~self_mask
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    if not has_pos.any():
        return z.new_zeros(())
    pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
    return -(pos_log_prob[has_pos] / n_pos[has_pos]).mean()


def prototype_contrastive_loss(
    z: torch.Tensor, prototypes: torch.Tensor, task_ids: torch.Tensor, temperature: float
) -> torch.Tensor:
    """L_Pro: cross-entropy of cos(z, k_j)/tau over prototypes [T, D], target = the example's task."""
    logits = F.normalize(z, dim=-1) @ F.normalize(prototypes, dim=-1).t() / temperature
    return F.cross_entropy(logits, task_ids)


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """CE over the target tokens. The objective averages it over the batch's target tokens (summing it
    weakens lambda ~500x); "sum" lets a bucketed batch add its buckets up before dividing once."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=ignore_index, reduction=reduction
    )


@dataclass
class LossParts:
    """The parts of Eq. 9: total = ce + lam * (ir + pro)."""

    total: torch.Tensor
    ce: torch.Tensor
    ir: torch.Tensor
    pro: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "ce", "ir", "pro")}
