"""Length buckets: one batch cut by length gives the same loss as the batch padded whole."""

import pytest
import torch

from pha_core.collate import collate, collate_buckets, label_weights
from pha_core.model import PHAModel
from pha_core.tasks import Example
from tests.support.tiny import tiny_config


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


def test_label_weights_make_each_label_of_a_task_weigh_the_same():
    rows = {
        "cola": [Example("sentence: a", "acceptable", "cola")] * 7
        + [Example("sentence: b", "unacceptable", "cola")] * 3,
        "stsb": [Example("sentence1: a sentence2: b", "2.4", "stsb")] * 4,
    }
    weights = label_weights(rows, lambda task: task == "cola")
    assert weights[("cola", "acceptable")] * 7 == pytest.approx(weights[("cola", "unacceptable")] * 3)
    assert sum(weights[("cola", e.target)] for e in rows["cola"]) == pytest.approx(10)  # mean weight 1
    assert ("stsb", "2.4") not in weights  # regression: unweighted


def test_weighted_loss_is_the_weighted_mean_of_the_examples():
    torch.manual_seed(0)
    model = PHAModel(tiny_config()).eval()
    index = {t: i for i, t in enumerate(model.tasks)}
    a, b = Example("sentence: good", "positive", "sst2"), Example("sentence: bad", "negative", "sst2")
    with torch.no_grad():
        ce_a, ce_b = (float(model(collate(model.backbone, [e], index, 64, 8)).ce) for e in (a, b))
        weights = {("sst2", "positive"): 1.5, ("sst2", "negative"): 0.5}
        both = float(model(collate(model.backbone, [a, b], index, 64, 8, weights=weights)).ce)
    # Every target token weighs what its example does; the sum is divided by the number of target tokens.
    n_a = len(model.backbone.target_ids("positive"))
    n_b = len(model.backbone.target_ids("negative"))
    assert both == pytest.approx((1.5 * ce_a * n_a + 0.5 * ce_b * n_b) / (n_a + n_b), rel=1e-4)
