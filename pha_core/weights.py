"""Weights in the layout inference reads fastest: copies made from parameters, kept until the parameters change.

At inference a request served alone multiplies one row by each of the decoder's weights, once. The weights are
out of cache by then (the encoder's 88 MB of float32 weights streamed through it just before), so the time of
such a product is the time to read its weight from memory, and how fast torch's CPU kernels read depends on
the weight's layout and type more than on the arithmetic. `Derived` keeps such copies; `DecoderLinear` is the
decoder projection that uses them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

T = TypeVar("T")


class Derived:
    """Tensors made from parameters for inference (a state no input changes, a weight in another layout), made
    again when one of their parameters changes: an in-place update (an optimiser step) bumps a tensor's version,
    and moving or casting the model makes new tensors. They carry no gradient: callers use them with grad off."""

    def __init__(self) -> None:
        self._made: dict[object, tuple[tuple, Any]] = {}

    def get(self, key: object, sources: Sequence[torch.Tensor], make: Callable[[], T]) -> T:
        device = sources[0].device.type
        stamp = (torch.is_autocast_enabled(device), *((t.data_ptr(), t._version, t.dtype) for t in sources))
        made = self._made.get(key)
        if made is None or made[0] != stamp:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors: usable outside inference mode too
                made = (stamp, make())
            self._made[key] = made
        return made[1]


class DecoderLinear(nn.Linear):
    """A decoder projection (same parameters, same state-dict keys as the `nn.Linear` it replaces) that reads
    its weight, at inference on the CPU, in the layout measured fastest for the rows it multiplies.

    - One row (the answer step of a request served alone): a float16 copy of the weight, half the bytes to
      read. torch's float16 product of one row accumulates in float32; the input and output are rounded to
      float16 (11 significant bits). The demo stores its decoder in float16, so its weights are exactly these.
      Measured: the demo's one-row answer step 2.95 -> 2.25 ms; the answers' probabilities move by at most
      3.4e-4 (docs/serving.md, session 26). Float16 products of 4 rows and more are 2-6x slower than float32
      on this CPU (no native float16 arithmetic), so only one row takes it.
    - More rows, when the layer widens (the FFN's first projection, [4d, d]): the weight stored transposed.
      MKL's product of a few rows with the weight as stored streams it ~2.7x slower when it is not in cache
      (MiniLM's 1536 x 384 weight: 263 vs 98 us for one row; 16 rows and more: the same within 5%; session 25).
    - Anything else, and always outside inference mode or under autocast: `nn.Linear` itself.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._derived = Derived()

    @classmethod
    def replacing(cls, linear: nn.Linear) -> DecoderLinear:
        """A DecoderLinear holding `linear`'s own parameters (tied, not copied)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not self._reads_copies(weight):
            return F.linear(x, weight, self.bias)
        rows = x.numel() // self.in_features
        if rows == 1:
            half = self._derived.get("half", [weight], lambda: weight.half())
            out = F.linear(x.half(), half).float()
            return out if self.bias is None else out + self.bias
        if self.out_features > self.in_features:
            flat = x.reshape(rows, self.in_features)
            transposed = self._derived.get("t", [weight], lambda: weight.t().contiguous())
            out = flat @ transposed if self.bias is None else torch.addmm(self.bias, flat, transposed)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, weight, self.bias)

    @staticmethod
    def _reads_copies(weight: torch.Tensor) -> bool:
        """Inference mode (serving, evaluation: never training, and not the `Derived` copies' own making, which
        runs outside it), float32 weights on the CPU, no autocast (bf16 serving stores the weights in bf16)."""
        return (
            torch.is_inference_mode_enabled()
            and weight.dtype == torch.float32
            and weight.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")
        )


def use_decoder_linears(module: nn.Module) -> None:
    """Every `nn.Linear` under `module` becomes a `DecoderLinear` on the same parameters."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, DecoderLinear.replacing(child))
