"""Length buckets: how a batch of inputs of different lengths is cut into padded encoder calls.

One call costs its rows x its longest row in padded tokens, plus a fixed cost of its own: the ops of one pass
(a training pass with its backward is ~800 small ops; an inference pass a few per layer) and the lower
efficiency of small matrix products. Few calls pad much (a mixed GLUE batch padded to its longest row is ~3x
its real tokens); many calls pay the fixed cost many times. With the inputs sorted by length, the cheapest cut
is a contiguous partition of the sorted order, found exactly by dynamic programming: best[j], the cost of the
j shortest inputs, is min over i < j of best[i] + cost(inputs i..j-1 as one call).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The fixed cost of one call, in padded tokens. Chosen by measurement on the 2-core CPU (docs/results.md §0):
# a training bucket (forward + backward of the encoder with its adapters, the hypernetwork, the decoder) costs
# about as much as 256 more padded tokens; an inference call of the encoder alone about 32.
TRAIN_CALL_COST = 256
INFERENCE_CALL_COST = 32


def length_buckets(
    lengths: Sequence[int],
    token_budget: int,
    rows: Sequence[int] | None = None,
    call_cost: int = TRAIN_CALL_COST,
) -> list[list[int]]:
    """Indices grouped by length, each group's encoder rows x its longest length <= token_budget (at least one
    example), the groups chosen to minimise padded tokens + call_cost per group.

    An example is `rows[i]` encoder rows (its fields, when they are encoded apart; default 1) of at most
    `lengths[i]` tokens. Groups come shortest first, each in ascending length. `token_budget` <= 0 means one
    group holding everything, in the original order.
    """
    if token_budget <= 0 or not lengths:
        return [list(range(len(lengths)))] if lengths else []
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    width = np.array([lengths[i] for i in order], dtype=np.int64)
    counts = np.array([1 if rows is None else rows[i] for i in order], dtype=np.int64)
    before = np.concatenate([[0], np.cumsum(counts)])  # encoder rows of the i shortest examples
    n = len(order)
    best = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        # The group i..j-1 is padded to width[j - 1], its longest (sorted ascending).
        padded = (before[j] - before[:j]) * width[j - 1]
        cost = best[:j] + padded + call_cost
        cost[:-1][padded[:-1] > token_budget] = np.inf  # over budget, unless the group is one example
        start[j] = int(np.argmin(cost))
        best[j] = cost[start[j]]
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[start[j] : j])
        j = int(start[j])
    return groups[::-1]
