"""The content check: markers stripped, k-NN typicality as a conformal p-value, banks that round-trip."""

from __future__ import annotations

import numpy as np
import pytest

from pha_core.calibration import LEVELS
from pha_core.content import BANK_ROWS, FILE, ContentBank, K, TaskBank, content_text, fit_content_bank


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _cloud(rng: np.random.Generator, center: np.ndarray, n: int, spread: float = 0.3) -> np.ndarray:
    return _unit(center + spread * rng.standard_normal((n, center.size)))


def test_content_text_drops_the_field_markers_and_keeps_the_words():
    assert content_text("premise: A man sleeps. hypothesis: Nobody sleeps.") == "A man sleeps. Nobody sleeps."
    assert content_text("sentence:   a  film") == "a film"
    assert content_text("no markers here: just text") == "no markers here: just text"


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


@pytest.mark.parametrize("kind", ["minilm", "t5"])
def test_content_vectors_read_the_frozen_encoders_first_layers_on_either_backbone(kind):
    import torch

    from pha_core.content import content_vectors
    from pha_core.model import PHAModel
    from tests.support.tiny import tiny_config

    torch.manual_seed(0)
    model = PHAModel(tiny_config(kind)).eval()
    texts = ["sentence: a fine film", "premise: a man sleeps. hypothesis: nobody sleeps."]
    vectors = content_vectors(model, texts)
    assert vectors.shape == (2, model.backbone.d_model) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    # the markers are not read: the same words without them give the same vector
    assert np.allclose(content_vectors(model, ["a fine film"]), vectors[:1], atol=1e-6)
    # the shallow view is the full encoder's state at that depth, adapters off, and adds no parameters
    ids = model.backbone.tokenize(["a fine film"], 16)
    with torch.inference_mode(), model.adapter_switch.off():
        shallow = model.backbone.encode_first_layers(ids["input_ids"], ids["attention_mask"], 1)
        full = model.backbone.frozen_encoder()(**ids, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(shallow, full, atol=1e-6)
    assert len(model.state_dict()) == len(PHAModel(tiny_config(kind)).state_dict())
