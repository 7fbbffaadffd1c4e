"""POST /predict end to end: routed and pinned, lists, mixed-task micro-batches, the low-score policy."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.app import metric, model_thread_busy, running_app, wait_for_metric
from tests.support.polling import wait_for

SST2 = "sentence: a gripping and beautiful film"
RTE = "sentence1: The cat sat on the mat. sentence2: A cat is sitting."
MNLI = "premise: A man plays a guitar on stage. hypothesis: A person makes music."
TASKS = ("sst2", "rte", "mnli")


@pytest.fixture(scope="module")
def client(tiny_client):
    return tiny_client


def predict(client, **body):
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_routed_prediction_names_task_score_and_margin(client):
    body = predict(client, inputs=RTE)
    assert body["model"] == client.get("/readyz").json()["model"]
    (p,) = body["predictions"]
    assert p["routed"] is True and p["task"] in TASKS
    # Each tiny task has its own template, so a text written as rte's has one candidate and no runner-up.
    assert -1.0 <= p["score"] <= 1.0 and p["margin"] is None and p["route"]["candidates"] == 1
    assert isinstance(p["output"], str) and p["low_confidence"] is False


def test_pinned_task_skips_retrieval(client):
    (p,) = predict(client, inputs=RTE, task="mnli")["predictions"]
    assert p["task"] == "mnli" and p["routed"] is False
    assert p["score"] is None and p["margin"] is None


def test_pinned_answer_is_the_tasks_answer(client):
    """A routed answer must equal the pinned answer of the task it was routed to (same adapters)."""
    routed = predict(client, inputs=MNLI)["predictions"][0]
    pinned = predict(client, inputs=MNLI, task=routed["task"])["predictions"][0]
    assert routed["output"] == pinned["output"]


def test_list_answers_equal_single_answers_in_order(client):
    texts = [SST2, RTE, MNLI, SST2]
    listed = predict(client, inputs=texts)["predictions"]
    singles = [predict(client, inputs=t)["predictions"][0] for t in texts]
    assert [p["output"] for p in listed] == [p["output"] for p in singles]
    assert [p["task"] for p in listed] == [p["task"] for p in singles]


def test_max_new_tokens_bounds_generated_output_not_labels(client):
    state = client.app.state.pha
    state.catalog.upsert("free_text", state.engine.trained_prototypes()[0])  # no label words: generates
    try:
        one = predict(client, inputs=SST2, task="free_text", max_new_tokens=1)["predictions"][0]
        many = predict(client, inputs=SST2, task="free_text", max_new_tokens=12)["predictions"][0]
    finally:
        state.catalog.remove("free_text")
    assert " " not in one["output"] and len(one["output"]) < len(many["output"])
    assert one["probabilities"] is None
    # A task with label words answers with a whole label (rank classification), whatever the token bound.
    labelled = predict(client, inputs=SST2, task="sst2", max_new_tokens=1)["predictions"][0]
    assert labelled["output"] in ("negative", "positive")
    assert set(labelled["probabilities"]) == {"negative", "positive"}
    assert sum(labelled["probabilities"].values()) == pytest.approx(1.0)


def test_mixed_task_batch_equals_one_at_a_time(tiny_checkpoint, redis_url):
    with running_app(tiny_checkpoint, redis_url=redis_url, max_wait_ms=50) as client:
        jobs = [(text, task) for text in (SST2, MNLI) for task in TASKS]
        singles = [predict(client, inputs=text, task=task)["predictions"][0]["output"] for text, task in jobs]
        batches_before = metric(client, "pha_batch_size_count")
        # With the model thread busy, the concurrent requests of different tasks queue up and are batched.
        with ThreadPoolExecutor(len(jobs)) as pool, model_thread_busy(client):
            futures = [pool.submit(predict, client, inputs=text, task=task) for text, task in jobs]
            wait_for_metric(client, "pha_requests_in_flight", len(jobs))
        mixed = [f.result()["predictions"][0]["output"] for f in futures]
        batches = metric(client, "pha_batch_size_count") - batches_before
    assert batches <= 3, "the concurrent requests were not batched together"
    assert mixed == singles
    # The check above can only catch mixed-up adapters if tasks answer differently.
    assert len({singles[0], singles[1], singles[2]}) > 1


def test_low_score_is_flagged(tiny_checkpoint):
    with running_app(tiny_checkpoint, min_route_score=0.999, low_score_action="flag") as client:
        (p,) = predict(client, inputs=RTE)["predictions"]
        assert p["low_confidence"] is True and p["score"] < 0.999
        assert metric(client, "pha_low_confidence_routes_total") >= 1


def test_low_score_is_refused_and_pinned_still_served(tiny_checkpoint):
    with running_app(tiny_checkpoint, min_route_score=0.999, low_score_action="refuse") as client:
        response = client.post("/predict", json={"inputs": [SST2, RTE]})
        assert response.status_code == 422
        assert "0.999" in response.json()["detail"] and "scored" in response.json()["detail"]
        (p,) = predict(client, inputs=RTE, task="rte")["predictions"]
        assert p["task"] == "rte"


def test_model_that_cannot_route_requires_a_task(tiny_no_retriever_checkpoint):
    with running_app(tiny_no_retriever_checkpoint) as client:
        response = client.post("/predict", json={"inputs": SST2})
        assert response.status_code == 422
        assert "task is required" in response.json()["detail"] and "sst2" in response.json()["detail"]
        assert predict(client, inputs=SST2, task="sst2")["predictions"][0]["task"] == "sst2"
        assert client.get("/readyz").json()["can_route"] is False


def test_backbone_only_switch(tiny_checkpoint):
    with running_app(tiny_checkpoint, allow_backbone_only=True) as client:
        (p,) = predict(client, inputs=SST2, backbone_only=True)["predictions"]
        assert p["task"] is None and p["routed"] is False
        adapted = predict(client, inputs=SST2, task="sst2")["predictions"][0]
        assert adapted["task"] == "sst2"


def batches_so_far(client) -> float:
    (family,) = client.app.state.pha.metrics.batch_size.collect()
    return next(s.value for s in family.samples if s.name.endswith("_count"))


def test_next_batch_is_collected_while_the_last_answer_runs(client, monkeypatch):
    """The batcher's hand-off on the real pipeline: once a batch's answer call is queued, the next batch is
    collected (its encode queues behind the answer) instead of waiting for the answer and the responses."""
    engine = client.app.state.pha.engine
    answer = engine.answer
    answering = threading.Event()
    seen: list[bool] = []

    def held_answer(*args, **kwargs):
        if not seen:  # the first answer waits (up to 5 s) for the second request's batch to be collected
            answering.set()
            try:
                wait_for(lambda: batches_so_far(client) >= start + 2, 5, "the second batch", interval=0.005)
                seen.append(True)
            except AssertionError:
                seen.append(False)
        return answer(*args, **kwargs)

    monkeypatch.setattr(engine, "answer", held_answer)
    start = batches_so_far(client)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(predict, client, inputs=SST2, task="sst2")
        assert answering.wait(10)
        second = pool.submit(predict, client, inputs=RTE, task="rte")
        assert first.result()["predictions"][0]["task"] == "sst2"
        assert second.result()["predictions"][0]["task"] == "rte"
    assert seen == [True], "the second batch was collected only after the first batch's answer had returned"


def test_texts_are_tokenised_once_when_checked_not_again_on_the_model_thread(client, monkeypatch):
    model = client.app.state.pha.engine.model

    def tokenising_again(texts):
        raise AssertionError(f"the encoder pass tokenised {texts!r} again")

    monkeypatch.setattr(model, "source", tokenising_again)
    routed = predict(client, inputs=[SST2, RTE])["predictions"]
    assert [p["route"]["task"] for p in routed] == ["sst2", "rte"]
    long = "sentence: " + "a gripping film " * 200
    (cut,) = predict(client, inputs=long, truncate=True)["predictions"]
    assert cut["truncated"]["tokens"] > 0
