"""Adapters (paper Eq. 8) and how they sit beside a backbone's FFN sublayers.

An adapter is `A(h) = ReLU(h W_down + b_down) W_up + b_up`. It runs in parallel with the FFN it sits beside:
    pre-LN backbones (T5):   y = x + FFN(LN(x)) + A(LN(x))
    post-LN backbones (BERT): y = LN(x + FFN(x) + A(x))
A has no residual of its own, so an adapter whose output is zero leaves the backbone exactly as it was.

Encoder adapters are ordinary shared parameters. Decoder adapters are generated per example: their weights come
in as a batch, one set per example, through an `AdapterContext`: a context variable owned by the model, so two
threads running the same model with different tasks never see each other's weights (no global "active adapter").
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn


@dataclass
class AdapterWeights:
    """One adapter layer's weights for a batch: W_down [B,d,b], b_down [B,b], W_up [B,b,d], b_up [B,d]."""

    w_down: torch.Tensor
    b_down: torch.Tensor
    w_up: torch.Tensor
    b_up: torch.Tensor

    def index_select(self, rows: torch.Tensor) -> AdapterWeights:
        return AdapterWeights(*(t.index_select(0, rows) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.w_down, self.b_down, self.w_up, self.b_up)


def batched_adapter(h: torch.Tensor, w: AdapterWeights) -> torch.Tensor:
    """A(h) with one adapter per example: h [B,T,d] -> [B,T,d], two batched matmuls."""
    hidden = torch.relu(torch.baddbmm(w.b_down.unsqueeze(1), h, w.w_down))
    return torch.baddbmm(w.b_up.unsqueeze(1), hidden, w.w_up)


class Adapter(nn.Module):
    """A shared adapter (the task-shared encoder adapters). W_up starts at zero: the backbone is unchanged."""

    def __init__(self, d_model: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.normal_(self.down.weight, std=1.0 / math.sqrt(d_model))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(h)))


class AdapterContext:
    """Per-call decoder adapter weights, one `AdapterWeights` per decoder layer.

    Backed by a `contextvars.ContextVar`, so the weights are visible only to the thread (or task) that set them.
    """

    def __init__(self, name: str) -> None:
        self._weights: contextvars.ContextVar[Sequence[AdapterWeights] | None] = contextvars.ContextVar(
            name, default=None
        )

    @contextlib.contextmanager
    def use(self, weights: Sequence[AdapterWeights] | None) -> Iterator[None]:
        token = self._weights.set(weights)
        try:
            yield
        finally:
            self._weights.reset(token)

    def layer(self, index: int) -> AdapterWeights | None:
        weights = self._weights.get()
        return None if weights is None else weights[index]


class AdapterSwitch:
    """Turns every adapter of one model off for the current thread/task: the plain backbone, for baselines."""

    def __init__(self, name: str) -> None:
        self._on: contextvars.ContextVar[bool] = contextvars.ContextVar(name, default=True)

    @property
    def on(self) -> bool:
        return self._on.get()

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        token = self._on.set(False)
        try:
            yield
        finally:
            self._on.reset(token)


class GeneratedAdapter(nn.Module):
    """Slot for a generated adapter: reads layer `index`'s per-example weights from the context."""

    def __init__(self, context: AdapterContext, index: int) -> None:
        super().__init__()
        self.context = context
        self.index = index

    def forward(self, h: torch.Tensor) -> torch.Tensor | None:
        weights = self.context.layer(self.index)
        return None if weights is None else batched_adapter(h, weights)


class PreLNParallelFFN(nn.Module):
    """Wraps a pre-LN FFN (T5's DenseReluDense, which already receives LN(x)): FFN(h) + A(h)."""

    def __init__(self, ffn: nn.Module, adapter: nn.Module, switch: AdapterSwitch) -> None:
        super().__init__()
        self.ffn = ffn
        # A tuple, so the adapter is not registered twice: its owner is the PHA model (`encoder_adapters`).
        self.adapter = (adapter,)
        self.switch = switch

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.ffn(h)
        delta = self.adapter[0](h) if self.switch.on else None
        return out if delta is None else out + delta


class PostLNParallelFFN(nn.Module):
    """Wraps BERT's FFN output block: LN(x + dropout(dense(intermediate)) + A(x))."""

    def __init__(self, output: nn.Module, adapter: nn.Module, switch: AdapterSwitch) -> None:
        super().__init__()
        self.ffn_output = output
        self.adapter = (adapter,)  # not registered here; see PreLNParallelFFN
        self.switch = switch

    def forward(self, intermediate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.ffn_output
        hidden = out.dropout(out.dense(intermediate)) + x
        delta = self.adapter[0](x) if self.switch.on else None
        if delta is not None:
            hidden = hidden + delta
        return out.LayerNorm(hidden)


# Read-only: which wrapper a backbone's FFN style needs.
WRAPPERS: Mapping[str, type[nn.Module]] = MappingProxyType({"pre_ln": PreLNParallelFFN, "post_ln": PostLNParallelFFN})
