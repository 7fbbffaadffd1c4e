"""The bundled demo over HTTP: long inputs within its 256-token window, answers with label probabilities."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.app import running_app

pytestmark = pytest.mark.pretrained

DEMO = Path(__file__).resolve().parents[2] / "pha_core" / "assets" / "demo"
# An RTE-style row of ~230 tokens: over the old 128-token window, inside the demo's 256.
PREMISE = " ".join(["The committee met on Tuesday to discuss the budget of the new regional hospital."] * 13)
LONG_RTE = f"sentence1: {PREMISE} sentence2: The committee discussed a hospital budget."


@pytest.fixture(scope="module")
def client():
    with running_app(DEMO) as client:
        yield client


def test_inputs_up_to_256_tokens_are_served(client):
    n = client.app.state.pha.engine.count_tokens([LONG_RTE])[0]
    assert 128 < n <= 256, n
    assert client.app.state.pha.predictor.limits.max_input_tokens == 256  # /predict and /adapt share it
    response = client.post("/predict", json={"inputs": LONG_RTE, "task": "rte"})
    assert response.status_code == 200, response.text
    answer = response.json()["predictions"][0]
    assert answer["output"] in ("entailment", "not_entailment")
    assert set(answer["probabilities"]) == {"entailment", "not_entailment"}
    assert answer["probabilities"][answer["output"]] >= 0.5
    too_long = client.post("/predict", json={"inputs": LONG_RTE + " more" * 60, "task": "rte"})
    assert too_long.status_code == 422 and "256" in too_long.json()["detail"]


def test_routed_answers_are_labels_of_the_routed_task(client):
    texts = [
        "sentence: a gripping, beautifully acted film",
        "question1: how do I learn python? question2: what is the best way to learn python?",
        "premise: The tank was full. hypothesis: The tank was empty.",
    ]
    predictions = client.post("/predict", json={"inputs": texts}).json()["predictions"]
    prototypes = {p["name"]: p for p in client.get("/prototypes").json()["prototypes"]}
    for p in predictions:
        labels = prototypes[p["task"]]["labels"]
        assert p["output"] in labels and set(p["probabilities"]) == set(labels)
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.data
def test_server_routing_agrees_with_evaluation_routing(client, data_dir):
    """The FAISS index of the server and Eq. 10 as `pha eval` computes it pick the same task, same cosine."""
    import torch

    from pha_core.data import load_splits
    from pha_core.evaluate import predict_examples
    from pha_core.source import candidates_by_template

    state = client.app.state.pha
    model = state.engine.model
    splits = load_splits(model.tasks, data_dir, n_train=1, max_eval=12)
    rows = [e for task in model.tasks for e in splits[task]["test"]]
    evaluated = predict_examples(model, rows)["routes"]
    texts = [e.input for e in rows]
    encoded = state.engine.encode(texts)
    # The server's path: candidates by template (catalogue), then FAISS / exact search among them.
    served = state.pipeline._search_groups(encoded.z, [state.catalog.tasks_fitting(t) for t in texts])
    assert [r.task for r in served] == evaluated
    templates = [state.catalog.get(t).template for t in model.tasks]
    allowed = candidates_by_template(texts, templates)
    expected = model.retrieve(torch.as_tensor(encoded.z), allowed=allowed)
    assert [r.score for r in served] == pytest.approx(expected.scores[:, 0].tolist(), abs=1e-5)
    margins = [float("nan") if r.margin is None else r.margin for r in served]
    assert margins == pytest.approx(expected.margin.tolist(), abs=1e-5, nan_ok=True)
    # And over HTTP: what /predict reports is that route.
    body = client.post("/predict", json={"inputs": [e.input for e in rows[:4]]}).json()["predictions"]
    assert [p["route"]["task"] for p in body] == evaluated[:4]


def test_inputs_of_no_task_are_answered_no_task_fits_and_task_rows_are_served(client):
    """The demo ships its route calibration; inputs written as no template fit no task, a review does."""
    assert client.app.state.pha.pipeline.policy.calibration is not None
    texts = ["hello world", "def f(x): return x+1", "sentence: a gripping, beautifully acted film"]
    hello, code, review = client.post("/predict", json={"inputs": texts}).json()["predictions"]
    for p in (hello, code):
        assert p["output"] is None and p["route"]["fits"] is False and p["route"]["candidates"] == 0
    assert review["output"] == "positive" and review["route"]["fits"] is True
    assert review["route"]["typicality"] > 0.02 and 0.5 < review["route"]["confidence"] <= 1.0


def test_the_demo_turns_away_texts_of_no_tasks_kind_written_in_a_tasks_template(client):
    """The shipped content bank: gibberish, code and Romanian in SST-2's template fit no task (the route cosine
    alone let them through); a movie review in it still does."""
    assert client.app.state.pha.pipeline.policy.content is not None
    texts = [
        "sentence: asdkjh qwe zxcv poiu lkjhg",
        "sentence: def f(x): return x + 1",
        "sentence: Guvernul a aprobat ieri un nou proiect de lege privind educatia.",
        "sentence: a gripping, beautifully acted film",
    ]
    *others, review = client.post("/predict", json={"inputs": texts}).json()["predictions"]
    for p in others:
        assert p["output"] is None and p["route"]["fits"] is False, p
    assert review["output"] == "positive" and review["route"]["fits"] is True


def test_the_demo_serves_its_trained_tasks_with_their_fitted_label_prior(client):
    """label_prior.json (fitted on validation rows by `pha calibrate`) reaches each trained task's answers and
    its export; STS-B's bins have none."""
    from pha_core.label_prior import LabelPrior

    prior = LabelPrior.load(DEMO)
    assert prior is not None and set(prior.offsets) == {"cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte"}
    catalog = client.app.state.pha.catalog
    assert catalog.get("qqp").answers.offsets == pytest.approx(prior.of("qqp"))
    assert catalog.get("stsb").answers.offsets is None
    exported = client.get("/prototypes/mnli").json()
    assert exported["label_offsets"] == pytest.approx(list(prior.of("mnli")))
    # ... and each label task's fitted temperature (the demo's decoder is over-confident: T > 1 on every one).
    assert set(prior.temperatures) == set(prior.offsets) and min(prior.temperatures.values()) > 1.0
    assert catalog.get("cola").answers.temperature == pytest.approx(prior.temperature_of("cola"))
    assert exported["label_temperature"] == pytest.approx(prior.temperature_of("mnli"))
    assert catalog.get("stsb").answers.temperature == 1.0


def test_stsb_is_answered_in_both_orders_of_its_sentences(client):
    """/predict answers an STS-B pair (as a string or as fields) with the mean of the two orders' readings, so
    the score of (A, B) is that of (B, A); each reading alone is the engine's one-order answer."""
    engine = client.app.state.pha.engine
    a, b = "A man is playing a guitar on stage.", "A woman is slicing an onion."
    texts = [f"sentence1: {a} sentence2: {b}", f"sentence1: {b} sentence2: {a}"]
    prototype = engine.trained_prototypes()[engine.tasks.index("stsb")]
    adapters = engine.adapters_for_prototype(prototype)
    space = client.app.state.pha.catalog.get("stsb").answers
    readings = engine.answer(engine.encode(texts), [adapters] * 2, [space] * 2, 4)
    one, other = (float(r.output) for r in readings)
    assert one != other  # the two orders read differently
    forward = client.post("/predict", json={"inputs": texts[0], "task": "stsb"}).json()["predictions"][0]
    backward = client.post("/predict", json={"inputs": {"sentence1": b, "sentence2": a}, "task": "stsb"})
    assert float(forward["output"]) == pytest.approx((one + other) / 2, abs=2e-3)
    assert backward.json()["predictions"][0]["output"] == forward["output"]
    assert set(forward["probabilities"]) == set(space.words)


def test_stsb_is_answered_in_one_order_where_the_deployment_says_so():
    """PHA_BOTH_ORDERS=false: an STS-B pair is answered as written, (A, B) and (B, A) each their own reading."""
    with running_app(DEMO, both_orders=False) as client:
        engine = client.app.state.pha.engine
        texts = [
            "sentence1: A man is playing a guitar. sentence2: A woman slices an onion.",
            "sentence1: A woman slices an onion. sentence2: A man is playing a guitar.",
        ]
        adapters = engine.adapters_for_prototype(engine.trained_prototypes()[engine.tasks.index("stsb")])
        space = client.app.state.pha.catalog.get("stsb").answers
        readings = [r.output for r in engine.answer(engine.encode(texts), [adapters] * 2, [space] * 2, 4)]
        served = client.post("/predict", json={"inputs": texts, "task": "stsb"}).json()["predictions"]
        assert [p["output"] for p in served] == readings and readings[0] != readings[1]
