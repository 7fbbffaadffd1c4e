"""Length buckets: one batch cut by length gives the same loss as the batch padded whole."""

import random

import pytest
import torch

from pha_core.collate import collate, collate_buckets, length_buckets
from pha_core.model import PHAModel
from pha_core.tasks import Example
from tests.support.tiny import tiny_config


def test_buckets_cover_every_row_once_within_budget():
    rng = random.Random(0)
    lengths = [rng.randint(3, 200) for _ in range(100)]
    buckets = length_buckets(lengths, 1024)
    assert sorted(i for b in buckets for i in b) == list(range(100))
    for b in buckets:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 1024
    assert length_buckets(lengths, 0) == [list(range(100))]
    assert length_buckets([], 512) == []
    assert length_buckets([900], 512) == [[0]]  # a row longer than the budget still gets its own bucket


@pytest.mark.parametrize("encoding", ["joint", "fields"])
def test_bucketed_loss_equals_the_whole_batch(encoding):
    torch.manual_seed(0)
    model = PHAModel(tiny_config(encoding=encoding)).eval()  # eval: no dropout, so both passes see the same network
    examples = (
        [Example("sentence: " + "very " * n + "good", "positive", "sst2") for n in (1, 2, 30)]
        + [Example("sentence1: " + "a b " * n + ". sentence2: c", "entailment", "rte") for n in (1, 12, 40)]
        + [Example("premise: x. hypothesis: y " * n, "neutral", "mnli") for n in (1, 5)]
    )
    index = {t: i for i, t in enumerate(model.tasks)}
    with torch.no_grad():
        by_field = model.config.by_field
        whole = model(collate(model.backbone, examples, index, 256, 8, by_field=by_field))
        buckets = collate_buckets(model.backbone, examples, index, 256, 8, token_budget=64, by_field=by_field)
        parts = model(buckets)
    assert len(buckets) > 2
    for name in ("total", "ce", "ir", "pro"):
        assert float(getattr(parts, name)) == pytest.approx(float(getattr(whole, name)), rel=1e-4, abs=1e-5)
