"""Rows of mixed lengths as one matrix of their real tokens: an encoder pass without padding.

A serving batch mixes tasks (GLUE rows of 10 to 250 tokens): padded to its longest row it is ~3x its real tokens.
The position-wise steps of a transformer layer (projections, FFN, adapters, layer norms: most of its work) do not
care which row a token belongs to, so they run on the real tokens alone, one [N, d] matrix. Attention mixes the
positions of one row: it runs per group of rows of similar length (buckets.length_buckets), each group padded
to its own longest row only. Rows are packed in that grouped order, so a group's tokens are one contiguous slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .buckets import INFERENCE_CALL_COST, length_buckets

# At most this many padded tokens in one attention group (rows x its longest row), the budget of an inference
# encoder call (source.encode_by_length); each group costs as much as INFERENCE_CALL_COST more padded tokens. On
# the bench's mixed batches of 16, one group padded to the longest row spent 26% of the pass in attention
# (torch profiler; docs/serving.md, session 25).
ATTENTION_GROUP_TOKENS = 2048


@dataclass(frozen=True)
class Group:
    """Rows of similar length whose tokens are rows first..last - 1 of the packed matrix, padded to `width` for
    attention."""

    first: int
    last: int
    rows: int
    width: int
    where: torch.Tensor | None  # positions of the group's real tokens in its [rows x width] grid; None: no padding
    keys: torch.Tensor | None  # [rows, 1, 1, width]: which keys each row attends to; None: no padding


class Packing:
    """How rows [B, L] with `mask` (1 = real token, real tokens first in each row) pack into [N, ...]."""

    def __init__(self, mask: torch.Tensor) -> None:
        rows, width = mask.shape
        self.shape = (rows, width)
        if bool(mask.all()):  # no padding (one request at a time: one row): nothing to take out or group
            self.where: torch.Tensor | None = None
            self.groups = [Group(0, rows * width, rows, width, None, None)]
            return
        lengths = mask.sum(1).tolist()
        groups = length_buckets(lengths, ATTENTION_GROUP_TOKENS, call_cost=INFERENCE_CALL_COST)
        order = torch.tensor([i for group in groups for i in group], device=mask.device)
        real = mask.bool()[order]  # rows in packed order
        packed = real.flatten().nonzero().squeeze(1)  # real tokens, in packed row order, as row * width + column
        # Where each packed token sits in the caller's [B, L] layout.
        self.where = order[packed // width] * width + packed % width
        self.groups = []
        first = 0
        for group in groups:
            self.groups.append(_group(first, [lengths[i] for i in group], mask.device))
            first = self.groups[-1].last

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> the real tokens [N, ...], in packed order."""
        flat = t.reshape(self.shape[0] * self.shape[1], *t.shape[2:])
        return flat if self.where is None else flat[self.where]

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, L, ...] in the caller's row order, zero at padding."""
        grid = t if self.where is None else _scatter(t, self.where, self.shape[0] * self.shape[1])
        return grid.view(*self.shape, *t.shape[1:])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Each row's tokens attending to its own: q, k, v [N, heads, size] -> [N, heads, size]."""
        out = []
        for g in self.groups:
            parts = [self._grid(t[g.first : g.last], g) for t in (q, k, v)]
            context = F.scaled_dot_product_attention(*parts, attn_mask=g.keys, scale=scale).transpose(1, 2)
            context = context.reshape(g.rows * g.width, *context.shape[2:])
            out.append(context if g.where is None else context[g.where])
        return out[0] if len(out) == 1 else torch.cat(out)

    @staticmethod
    def _grid(t: torch.Tensor, g: Group) -> torch.Tensor:
        """A group's tokens [n, heads, size] as [rows, heads, width, size] (zero at padding)."""
        grid = t if g.where is None else _scatter(t, g.where, g.rows * g.width)
        return grid.view(g.rows, g.width, *t.shape[1:]).transpose(1, 2)


def _group(first: int, sizes: list[int], device: torch.device) -> Group:
    """The group of rows with these token counts whose tokens start at packed row `first`."""
    width = max(sizes)
    if min(sizes) == width:  # no padding in the group
        return Group(first, first + sum(sizes), len(sizes), width, None, None)
    keys = torch.arange(width, device=device)[None, :] < torch.tensor(sizes, device=device)[:, None]
    return Group(
        first, first + sum(sizes), len(sizes), width, keys.flatten().nonzero().squeeze(1), keys[:, None, None, :]
    )


def _scatter(t: torch.Tensor, where: torch.Tensor, size: int) -> torch.Tensor:
    """[n, ...] placed at rows `where` of a zero [size, ...]."""
    out = t.new_zeros(size, *t.shape[1:])
    out[where] = t
    return out
