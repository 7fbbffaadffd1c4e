"""PUT /prototypes/{name}: a task exported from one deployment (GET ...?include_vector=true) imported by another."""

from __future__ import annotations

import math

import pytest

from tests.support.app import running_app

KEY = "import-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MNLI = {"premise": "A man plays a guitar on stage.", "hypothesis": "A person makes music."}


@pytest.fixture()
def client(tiny_checkpoint, tmp_path):
    with running_app(tiny_checkpoint, api_key=KEY, registry_dir=str(tmp_path / "registry")) as client:
        yield client


def _export(client, name: str) -> dict:
    info = client.get(f"/prototypes/{name}", params={"include_vector": "true"}).json()
    model = client.get("/readyz").json()["model"]
    return {"vector": info["vector"], "labels": info["labels"], "template": info["template"], "model": model}


def test_an_exported_task_imports_under_a_new_name_and_answers_like_the_original(client):
    body = _export(client, "mnli")
    response = client.put("/prototypes/nli-copy", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    info = response.json()
    assert info["name"] == "nli-copy" and info["source"] == "adapted" and info["template"] == body["template"]
    assert "nli-copy" in [p["name"] for p in client.get("/prototypes").json()["prototypes"]]
    original = client.post("/predict", json={"inputs": MNLI, "task": "mnli"}).json()["predictions"][0]
    copy = client.post("/predict", json={"inputs": MNLI, "task": "nli-copy"}).json()["predictions"][0]
    assert copy["output"] == original["output"]
    assert copy["probabilities"] == pytest.approx(original["probabilities"], abs=1e-5)
    # Structured inputs now have two tasks taking premise/hypothesis.
    routed = client.post("/predict", json={"inputs": MNLI}).json()["predictions"][0]
    assert routed["route"]["candidates"] == 2 and routed["task"] in ("mnli", "nli-copy")
    again = client.put("/prototypes/nli-copy", json=body, headers=AUTH)
    assert again.status_code == 409 and "replace" in again.json()["detail"]
    assert client.put("/prototypes/nli-copy", json={**body, "replace": True}, headers=AUTH).status_code == 200
    assert client.delete("/prototypes/nli-copy", headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    ("change", "status", "says"),
    [
        ({"vector": [1.0, 2.0]}, 422, "must be 16 finite numbers"),
        ({"vector": [0.0] * 16}, 422, "not all zero"),
        ({"model": "0123456789ab"}, 409, "made for model"),
        ({"labels": ["yes", "yes"]}, 422, "distinct"),
        ({"template": "no placeholders"}, 422, "placeholders"),
        ({"template": "broken {"}, 422, "placeholders"),
        ({"spread": [0.8, 0.0]}, 422, "must be > 0"),
        ({"spread": [0.8]}, 422, "at least 2"),
        ({"label_offsets": [0.5]}, 422, "one per label"),
        ({"label_temperature": 0}, 422, "greater than or equal to 0.01"),
        ({"label_temperature": 1e6}, 422, "less than or equal to 100"),
        ({"labels": None, "label_temperature": 2.0}, 422, "label_temperature needs labels"),
    ],
)
def test_bad_imports_are_refused_and_nothing_is_registered(client, change, status, says):
    response = client.put("/prototypes/bad", json={**_export(client, "rte"), **change}, headers=AUTH)
    assert response.status_code == status and says in response.json()["detail"], response.text
    assert client.get("/prototypes/bad").status_code == 404


def test_import_needs_the_key_and_cannot_overwrite_a_trained_task(client):
    body = _export(client, "rte")
    assert client.put("/prototypes/x", json=body).status_code == 401
    conflict = client.put("/prototypes/rte", json={**body, "replace": True}, headers=AUTH)
    assert conflict.status_code == 409 and "trained task" in conflict.json()["detail"]


def test_an_imported_spread_is_kept_and_exported(client):
    body = {**_export(client, "mnli"), "spread": [0.84, 0.007]}
    assert client.put("/prototypes/nli-spread", json=body, headers=AUTH).status_code == 201
    exported = client.get("/prototypes/nli-spread", params={"include_vector": "true"}).json()
    assert exported["spread"] == pytest.approx([0.84, 0.007])
    # The tiny model has no calibration: the spread is kept but no route is turned away for it.
    routed = client.post("/predict", json={"inputs": MNLI}).json()["predictions"][0]
    assert routed["route"]["typicality"] is None and routed["route"]["fits"] is True


def test_imported_label_offsets_shift_the_probabilities_and_are_exported(client):
    body = _export(client, "mnli")
    offsets = [3.0, 0.0, -3.0]  # in the order of labels: the first label made e^3 more likely against the second
    assert client.put("/prototypes/nli-prior", json={**body, "label_offsets": offsets}, headers=AUTH).status_code == 201
    exported = client.get("/prototypes/nli-prior").json()
    assert exported["label_offsets"] == pytest.approx(offsets)
    plain = client.post("/predict", json={"inputs": MNLI, "task": "mnli"}).json()["predictions"][0]["probabilities"]
    shifted = client.post("/predict", json={"inputs": MNLI, "task": "nli-prior"}).json()["predictions"][0]
    first, second = body["labels"][0], body["labels"][1]
    ratio = (shifted["probabilities"][first] / shifted["probabilities"][second]) / (plain[first] / plain[second])
    assert ratio == pytest.approx(2.718281828**3, rel=1e-3)


def test_an_imported_label_temperature_softens_the_probabilities_and_is_exported(client):
    body = _export(client, "mnli")
    assert client.get("/prototypes/mnli").json()["label_temperature"] == 1.0  # the tiny model has no fitted prior
    assert client.put("/prototypes/nli-soft", json={**body, "label_temperature": 2.0}, headers=AUTH).status_code == 201
    assert client.get("/prototypes/nli-soft").json()["label_temperature"] == 2.0
    plain = client.post("/predict", json={"inputs": MNLI, "task": "mnli"}).json()["predictions"][0]
    soft = client.post("/predict", json={"inputs": MNLI, "task": "nli-soft"}).json()["predictions"][0]
    assert soft["output"] == plain["output"]  # a temperature never changes the winning label
    first, second = body["labels"][0], body["labels"][1]
    # log(p1/p2) is divided by T: the log-odds of any two labels halve.
    log_odds = math.log(plain["probabilities"][first] / plain["probabilities"][second])
    soft_odds = math.log(soft["probabilities"][first] / soft["probabilities"][second])
    assert soft_odds == pytest.approx(log_odds / 2, rel=1e-3, abs=1e-6)
