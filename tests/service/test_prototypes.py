"""GET /prototypes and GET /prototypes/{name}."""

from __future__ import annotations

import pytest

from pha_core.tasks import TASKS
from tests.support.app import running_app


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    with running_app(tiny_checkpoint) as client:
        yield client


def test_lists_trained_tasks_with_templates_and_labels(client):
    body = client.get("/prototypes").json()
    assert body["version"] == 1
    by_name = {p["name"]: p for p in body["prototypes"]}
    assert list(by_name) == ["sst2", "rte", "mnli"]  # the checkpoint's task order
    for name, p in by_name.items():
        assert p["source"] == "trained"
        assert p["template"] == TASKS[name].template
        assert p["labels"] == list(TASKS[name].labels)
        assert p["version"] == 1 and p["created"] and len(p["prototype_version"]) == 16
        assert p["vector"] is None


def test_one_prototype_optionally_with_its_vector(client):
    plain = client.get("/prototypes/rte").json()
    assert plain["name"] == "rte" and plain["vector"] is None
    full = client.get("/prototypes/rte", params={"include_vector": "true"}).json()
    assert len(full["vector"]) == 16
    expected = client.app.state.pha.engine.trained_prototypes()[1]
    assert full["vector"] == pytest.approx(expected.tolist())


def test_unknown_prototype_is_404_listing_known(client):
    response = client.get("/prototypes/nope")
    assert response.status_code == 404
    assert "mnli, rte, sst2" in response.json()["detail"]


def test_bad_include_vector_is_422(client):
    response = client.get("/prototypes/rte", params={"include_vector": "maybe"})
    assert response.status_code == 422 and "include_vector" in response.json()["detail"]


def test_a_query_parameter_given_twice_is_422_not_the_last_value(client):
    for url in ("/prototypes?offset=0&offset=1", "/prototypes/sst2?include_vector=true&include_vector=false"):
        response = client.get(url)
        assert response.status_code == 422, url
        assert "given more than once" in response.json()["detail"]
    assert client.get("/prototypes?offset=0&limit=1").status_code == 200


def test_the_list_comes_in_pages(tiny_checkpoint):
    with running_app(tiny_checkpoint) as client:
        first = client.get("/prototypes", params={"limit": 2}).json()
        assert len(first["prototypes"]) == 2 and first["total"] == 3 and first["next_offset"] == 2
        last = client.get("/prototypes", params={"limit": 2, "offset": 2}).json()
        assert [p["name"] for p in last["prototypes"]] == ["mnli"] and last["next_offset"] is None
        everything = client.get("/prototypes").json()
        assert [p["name"] for p in everything["prototypes"]] == ["sst2", "rte", "mnli"]
        assert client.get("/prototypes", params={"limit": 0}).status_code == 422


def test_a_page_past_the_end_is_empty_and_an_absurd_offset_is_refused(tiny_checkpoint):
    """Found by the fuzzer: an offset past sys.maxsize ended in a 500."""
    with running_app(tiny_checkpoint) as client:
        past = client.get("/prototypes", params={"offset": 50}).json()
        assert past["prototypes"] == [] and past["total"] == 3 and past["next_offset"] is None
        huge = client.get("/prototypes", params={"offset": 604000249098628497408})
        assert huge.status_code == 422 and "offset" in huge.text
