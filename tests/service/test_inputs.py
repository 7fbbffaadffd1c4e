"""/predict inputs beyond plain text: structured fields, the route object, per-request truncation."""

from __future__ import annotations

import pytest

from tests.support.app import predictions

RTE = "sentence1: The cat sat on the mat. sentence2: A cat is sitting."
MNLI = {"premise": "A man plays a guitar on stage.", "hypothesis": "A person makes music."}


@pytest.fixture(scope="module")
def client(tiny_client):
    return tiny_client


def test_fields_are_formatted_with_the_tasks_template(client):
    (fields,) = predictions(client, inputs=MNLI, task="mnli")
    (text,) = predictions(client, inputs=f"premise: {MNLI['premise']} hypothesis: {MNLI['hypothesis']}", task="mnli")
    assert fields["output"] == text["output"] and fields["probabilities"] == text["probabilities"]


def test_fields_narrow_routing_to_the_tasks_that_take_them(client):
    # The tiny model's tasks: sst2 (sentence), rte (sentence1, sentence2), mnli (premise, hypothesis).
    for item, task in ((MNLI, "mnli"), ({"sentence": "a fine film"}, "sst2")):
        (p,) = predictions(client, inputs=[item])
        assert p["task"] == task and p["route"] == {
            "task": task,
            "routed": True,
            "cosine": p["score"],
            "margin": None,  # the only candidate
            "candidates": 1,
            "low_confidence": p["low_confidence"],
            "confidence": None,  # the tiny model has no calibration
            "typicality": None,
            "fits": True,
            "reason": None,
        }


def test_text_routes_among_the_tasks_written_so_and_pinned_has_no_cosine(client):
    (routed,) = predictions(client, inputs=RTE)  # only rte's template is sentence1/sentence2 among the tiny tasks
    assert routed["route"]["candidates"] == 1 and routed["route"]["cosine"] == routed["score"]
    assert routed["task"] == "rte" and routed["route"]["fits"] is True
    (pinned,) = predictions(client, inputs=RTE, task="rte")
    assert pinned["route"] == {
        "task": "rte",
        "routed": False,
        "cosine": None,
        "margin": None,
        "candidates": None,
        "low_confidence": False,
        "confidence": None,
        "typicality": None,
        "fits": True,
        "reason": None,
    }


def test_text_written_as_no_template_fits_no_task_but_can_be_pinned(client):
    (p,) = predictions(client, inputs="hello world")
    assert p["output"] is None and p["probabilities"] is None
    assert p["route"]["fits"] is False and p["route"]["task"] is None and p["route"]["candidates"] == 0
    assert "template" in p["route"]["reason"] and p["low_confidence"] is True
    (pinned,) = predictions(client, inputs="hello world", task="sst2")  # naming the task skips routing
    assert pinned["output"] in ("negative", "positive") and pinned["route"]["fits"] is True


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"inputs": {"premise": "a"}}, "no task takes exactly those"),
        ({"inputs": MNLI, "task": "rte"}, "task 'rte' takes ['sentence1', 'sentence2']"),
        ({"inputs": {"premise": "a", "hypothesis": "  "}}, "inputs.hypothesis is empty"),
        ({"inputs": {"premise": 3, "hypothesis": "b"}}, "inputs.premise must be a string"),
        ({"inputs": [{"bad name": "x"}]}, "field names are identifiers"),
        ({"inputs": {}}, "empty object"),
    ],
)
def test_bad_fields_get_a_422_that_says_what_to_change(client, body, says):
    response = client.post("/predict", json=body)
    assert response.status_code == 422 and says in response.text, response.text


def test_truncate_cuts_what_is_over_the_window_and_says_how_much(client):
    window = client.app.state.pha.engine.config.max_source_length
    long = "sentence: " + "very " * (window + 20) + "good"
    assert client.post("/predict", json={"inputs": long}).status_code == 422
    cut, whole = predictions(client, inputs=[long, "sentence: short"], truncate=True)
    tokens = client.app.state.pha.engine.count_tokens([long])[0]
    assert cut["truncated"]["tokens"] == tokens - window
    assert cut["truncated"]["characters"] >= 5 * 20 and whole["truncated"] is None
