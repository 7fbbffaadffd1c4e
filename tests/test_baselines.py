"""The majority and frozen-probe rows of the results tables (bench/baselines.py), on the real encoder."""

import numpy as np
import pytest

from bench.baselines import SentenceEncoder, features, majority, probe
from pha_core.tasks import Example, get_task

pytestmark = pytest.mark.pretrained


def _row(task: str, target: str, **values: str) -> Example:
    spec = get_task(task)
    return Example(spec.format(values), target, task, fields=spec.values(values))


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


def test_embeddings_are_unit_vectors_and_pair_features_follow_the_fields(encoder):
    single = [_row("sst2", "positive", sentence="a warm, funny film")]
    pair = [_row("stsb", "4.0", sentence1="a dog runs", sentence2="a dog is running")]
    u = features(encoder, single)
    assert u.shape == (1, 384) and np.linalg.norm(u[0]) == pytest.approx(1.0, abs=1e-5)
    x = features(encoder, pair)
    assert x.shape == (1, 4 * 384)
    a, b = x[0, :384], x[0, 384:768]
    assert np.allclose(x[0, 768:1152], np.abs(a - b)) and np.allclose(x[0, 1152:], a * b)
    assert float((a * b).sum()) > 0.7  # paraphrases: the cosine the encoder was trained to give


def test_majority_is_the_commonest_label_and_the_mean_score():
    rows = [_row("sst2", t, sentence=str(i)) for i, t in enumerate(["positive", "negative", "positive"])]
    assert majority(rows, rows[:2]) == ["positive", "positive"]
    scores = [_row("stsb", t, sentence1="a", sentence2=str(i)) for i, t in enumerate(["1.0", "3.0"])]
    assert majority(scores, scores) == ["2.000", "2.000"]


def test_probe_learns_sentiment_from_a_few_shots(encoder):
    good = ["a wonderful, moving film", "great acting and a lovely story", "i loved every minute", "a joy to watch"]
    bad = ["a dull, tedious mess", "terrible acting and a boring plot", "i hated every minute", "painful to watch"]
    train = [_row("sst2", "positive", sentence=s) for s in good] + [_row("sst2", "negative", sentence=s) for s in bad]
    test = [_row("sst2", "positive", sentence="a delightful triumph"), _row("sst2", "negative", sentence="awful")]
    assert probe(encoder, train, test) == ["positive", "negative"]


def test_probe_needs_the_fields():
    with pytest.raises(ValueError, match="fields"):
        features(None, [Example("sentence: x", "positive", "sst2")])
