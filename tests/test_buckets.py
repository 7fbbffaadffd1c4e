import itertools
import random

import pytest

from pha_core.buckets import length_buckets


def cost(groups, lengths, rows, call_cost):
    return sum(sum(rows[i] for i in g) * max(lengths[i] for i in g) + call_cost for g in groups)


def cheapest_by_brute_force(lengths, rows, budget, call_cost):
    """Every contiguous cut of the sorted order, within the budget: the cheapest cost."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    best = None
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        groups, current = [], [order[0]]
        for i, cut in zip(order[1:], cuts, strict=True):
            if cut:
                groups.append(current)
                current = []
            current.append(i)
        groups.append(current)
        fits = all(len(g) == 1 or sum(rows[i] for i in g) * max(lengths[i] for i in g) <= budget for g in groups)
        if fits:
            value = cost(groups, lengths, rows, call_cost)
            best = value if best is None else min(best, value)
    return best


def test_buckets_cover_every_row_once_within_budget():
    rng = random.Random(0)
    lengths = [rng.randint(3, 200) for _ in range(100)]
    buckets = length_buckets(lengths, 1024)
    assert sorted(i for b in buckets for i in b) == list(range(100))
    for b in buckets:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 1024
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
    assert length_buckets(lengths, 0) == [list(range(100))]
    assert length_buckets([], 512) == []
    assert length_buckets([900], 512) == [[0]]  # a row longer than the budget still gets its own bucket


@pytest.mark.parametrize("seed", range(6))
def test_the_cut_is_the_cheapest_contiguous_one(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 11)
    lengths = [rng.choice([rng.randint(5, 30), rng.randint(30, 250)]) for _ in range(n)]
    rows = [rng.randint(1, 3) for _ in range(n)]
    call_cost = rng.choice([0, 32, 256])
    budget = rng.choice([300, 1000, 4096])
    groups = length_buckets(lengths, budget, rows, call_cost=call_cost)
    assert sorted(i for g in groups for i in g) == list(range(n))
    assert cost(groups, lengths, rows, call_cost) == cheapest_by_brute_force(lengths, rows, budget, call_cost)


def test_call_cost_trades_padding_for_calls():
    lengths = [10] * 8 + [200]
    assert length_buckets(lengths, 4096, call_cost=0) == [list(range(8)), [8]]  # padding 8 x 190 is dearer
    assert length_buckets(lengths, 4096, call_cost=10_000) == [list(range(9))]  # one call is cheaper
