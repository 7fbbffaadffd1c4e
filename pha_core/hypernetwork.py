"""From a task prototype to the weights of every decoder adapter (paper Eq. 8, "project network" and H).

For decoder layer m and condition vector k (a task prototype, or z in the no-prototype ablation):
    I_m = C([k; e_m]) = LN(Linear(hidden -> d_I)(ReLU(Linear(2*proto_dim -> hidden)([k; e_m]))))
    W_down, b_down, W_up, b_up = H(I_m)      (four linear heads)
The layer embeddings e_m let one hypernetwork serve every layer.

Also here: `TaskAdapterTable`, the "Adapter" baseline's plain per-task adapter weights, which produces the same
per-layer `AdapterWeights` as the hypernetwork so the rest of the model cannot tell them apart.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapters import AdapterWeights


class ProjectNetwork(nn.Module):
    """C: [k; e_m] -> I_m."""

    def __init__(self, proto_dim: int, hidden: int, hyper_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * proto_dim, hidden), nn.ReLU(), nn.Linear(hidden, hyper_dim), nn.LayerNorm(hyper_dim)
        )

    def forward(self, cond: torch.Tensor, layer_emb: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([cond, layer_emb], dim=-1))


class HyperNetwork(nn.Module):
    """H: I -> (W_down [d,b], b_down [b], W_up [b,d], b_up [d]).

    Hyperfan-in init (Chang et al., 2020): with I of unit variance (it leaves a LayerNorm), a head weight of
    variance 1/(d_I * fan_in) gives generated weights of variance 1/fan_in, a normal init for the adapter. The
    up head is scaled by `up_scale` (1e-2) so fresh adapters add almost nothing to the backbone.
    """

    def __init__(self, hyper_dim: int, d_model: int, bottleneck: int, up_scale: float) -> None:
        super().__init__()
        self.d_model, self.bottleneck = d_model, bottleneck
        self.w_down = nn.Linear(hyper_dim, d_model * bottleneck)
        self.b_down = nn.Linear(hyper_dim, bottleneck)
        self.w_up = nn.Linear(hyper_dim, bottleneck * d_model)
        self.b_up = nn.Linear(hyper_dim, d_model)
        _hyperfan_in(self.w_down, hyper_dim, fan_in=d_model, scale=1.0)
        _hyperfan_in(self.w_up, hyper_dim, fan_in=bottleneck, scale=up_scale)
        for head in (self.b_down, self.b_up):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, i: torch.Tensor) -> AdapterWeights:
        """i [N, d_I] -> AdapterWeights with leading dim N."""
        n, d, b = i.size(0), self.d_model, self.bottleneck
        return AdapterWeights(self.w_down(i).view(n, d, b), self.b_down(i), self.w_up(i).view(n, b, d), self.b_up(i))


def _hyperfan_in(head: nn.Linear, hyper_dim: int, fan_in: int, scale: float) -> None:
    nn.init.normal_(head.weight, std=scale / math.sqrt(hyper_dim * fan_in))
    nn.init.zeros_(head.bias)


class AdapterGenerator(nn.Module):
    """Layer embeddings e_m + project network C + hypernetwork H, for `n_layers` adapter layers."""

    def __init__(
        self,
        n_layers: int,
        proto_dim: int,
        project_hidden: int,
        hyper_dim: int,
        d_model: int,
        bottleneck: int,
        up_scale: float,
    ) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.layer_embeddings = nn.Embedding(n_layers, proto_dim)
        self.project = ProjectNetwork(proto_dim, project_hidden, hyper_dim)
        self.hyper = HyperNetwork(hyper_dim, d_model, bottleneck, up_scale)

    def forward(self, cond: torch.Tensor) -> list[AdapterWeights]:
        """cond [N, proto_dim] -> one AdapterWeights (leading dim N) per layer, all layers in one pass."""
        n, m = cond.size(0), self.n_layers
        layers = self.layer_embeddings.weight
        i = self.project(cond.unsqueeze(1).expand(n, m, -1), layers.unsqueeze(0).expand(n, m, -1))
        w = self.hyper(i.reshape(n * m, -1))
        return [AdapterWeights(*(t.view(n, m, *t.shape[1:])[:, layer] for t in w.tensors())) for layer in range(m)]


class TaskAdapterTable(nn.Module):
    """The Adapter baseline: per-task, per-layer adapter weights, looked up by task id."""

    def __init__(self, n_tasks: int, n_layers: int, d_model: int, bottleneck: int) -> None:
        super().__init__()
        self.w_down = nn.Parameter(torch.randn(n_tasks, n_layers, d_model, bottleneck) / math.sqrt(d_model))
        self.b_down = nn.Parameter(torch.zeros(n_tasks, n_layers, bottleneck))
        self.w_up = nn.Parameter(torch.zeros(n_tasks, n_layers, bottleneck, d_model))
        self.b_up = nn.Parameter(torch.zeros(n_tasks, n_layers, d_model))

    def forward(self, task_ids: torch.Tensor) -> list[AdapterWeights]:
        tensors = [t.index_select(0, task_ids) for t in (self.w_down, self.b_down, self.w_up, self.b_up)]
        return [AdapterWeights(*(t[:, layer] for t in tensors)) for layer in range(self.w_down.size(1))]
