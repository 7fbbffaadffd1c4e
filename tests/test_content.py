"""The content check: vectors from the serving pass, k-NN typicality as a conformal p-value, banks that round-trip."""

from __future__ import annotations

import numpy as np
import pytest

from pha_core.calibration import LEVELS
from pha_core.content import BANK_ROWS, FILE, ContentBank, K, TaskBank, fit_content_bank


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _cloud(rng: np.random.Generator, center: np.ndarray, n: int, spread: float = 0.3) -> np.ndarray:
    return _unit(center + spread * rng.standard_normal((n, center.size)))


def test_typicality_is_about_uniform_for_the_tasks_own_rows_and_zero_far_away():
    rng = np.random.default_rng(0)
    center = _unit(rng.standard_normal((1, 32)))[0]
    texts = {"a": [f"t{i}" for i in range(BANK_ROWS + 400)]}
    vectors = dict(zip(texts["a"], _cloud(rng, center, len(texts["a"])), strict=True))
    bank = fit_content_bank(
        lambda rows: np.stack([vectors[r] for r in rows]), {"a": texts["a"][:BANK_ROWS]}, {"a": texts["a"][-400:]}
    )
    assert bank.banks["a"].vectors.shape == (BANK_ROWS, 32) and "a" in bank and "b" not in bank
    fresh = bank.typicality("a", _cloud(rng, center, 2000))
    assert abs(float(np.mean(fresh < 0.1)) - 0.1) < 0.04 and abs(float(np.mean(fresh < 0.5)) - 0.5) < 0.06
    far = bank.typicality("a", _cloud(rng, -center, 50))
    assert float(far.max()) == 0.0
    assert bank.typicality("b", far) is None  # no bank: the content check does not apply


def test_the_score_is_the_cosine_to_the_kth_nearest_bank_row():
    vectors = np.eye(K + 2, dtype=np.float32)
    bank = TaskBank(vectors=vectors, quantiles=np.linspace(0, 1, len(LEVELS)))
    query = _unit(np.arange(K + 2, 0, -1, dtype=np.float32)[None, :])  # nearest row 0, then 1, ...
    assert np.isclose(bank.scores(query)[0], query[0, K - 1])


def test_banks_round_trip_and_bad_files_are_named(tmp_path):
    rng = np.random.default_rng(1)
    bank = ContentBank({"sst2": TaskBank(_cloud(rng, np.ones(8), 20), np.sort(rng.random(len(LEVELS))))})
    path = bank.save(tmp_path)
    assert path.name == FILE and not list(tmp_path.glob(".*tmp*"))
    again = ContentBank.load(tmp_path)
    query = _cloud(rng, np.ones(8), 5)
    assert np.allclose(again.typicality("sst2", query), bank.typicality("sst2", query), atol=1e-3)
    assert ContentBank.load(tmp_path / "nowhere") is None
    path.write_bytes(b"not a bank")
    with pytest.raises(ValueError, match=f"{FILE}.*pha calibrate"):
        ContentBank.load(tmp_path)


def test_a_bank_needs_training_and_held_out_rows():
    with pytest.raises(ValueError, match="needs training and held-out rows"):
        fit_content_bank(lambda rows: np.ones((len(rows), 4)), {"a": ["x"]}, {"a": []})


def test_a_bank_of_other_vectors_is_refused_with_what_to_do(tmp_path):
    import json

    bank = ContentBank({"sst2": TaskBank(np.eye(4, dtype=np.float32), np.sort(np.linspace(0, 1, len(LEVELS))))})
    path = bank.save(tmp_path)
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["meta"] = np.array(json.dumps({"k": K, "levels": list(LEVELS)}))  # a bank of an older version
    with path.open("wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ValueError, match="other content vectors.*pha calibrate"):
        ContentBank.load(tmp_path)


@pytest.mark.parametrize("kind", ["minilm", "t5"])
@pytest.mark.parametrize("encoding", ["joint", "fields"])
def test_content_vectors_are_the_serving_pass_states_at_the_content_layer(kind, encoding):
    import torch

    from pha_core.content import content_layer, embed_texts
    from pha_core.inference import Engine
    from pha_core.model import PHAModel
    from tests.support.tiny import tiny_config

    torch.manual_seed(0)
    model = PHAModel(tiny_config(kind, encoding=encoding)).eval()
    for adapter in model.encoder_adapters:  # adapters that change the states: the check reads them
        torch.nn.init.normal_(adapter.up.weight, std=0.1)
    texts = ["sentence: a fine film", "premise: a man sleeps. hypothesis: nobody sleeps at all today."]
    vectors = embed_texts(model, texts)
    assert vectors.shape == (2, model.backbone.d_model) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    # what serving computes from its one pass, whatever else is in the batch
    served = Engine(model).encode(texts)
    assert np.allclose(served.content, vectors, atol=1e-5)
    assert np.allclose(embed_texts(model, texts[:1]), vectors[:1], atol=1e-5)
    # the mean over the text's tokens of the encoder's states at that layer, adapters on (joint: one row)
    if encoding == "joint":
        ids = model.backbone.tokenize(texts[:1], 32)
        with torch.inference_mode():
            out = model.backbone.frozen_encoder()(**ids, output_hidden_states=True)
            with model.adapter_switch.off():
                plain = model.backbone.frozen_encoder()(**ids, output_hidden_states=True)
        layer = content_layer(model)
        expect = torch.nn.functional.normalize(out.hidden_states[layer][0].mean(0), dim=0).numpy()
        assert np.allclose(vectors[0], expect, atol=1e-5)
        unadapted = torch.nn.functional.normalize(plain.hidden_states[layer][0].mean(0), dim=0).numpy()
        assert not np.allclose(vectors[0], unadapted, atol=1e-3)
