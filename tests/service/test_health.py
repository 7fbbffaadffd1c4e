"""Probes, metrics, request ids and /docs."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.app import metric, running_app
from tests.support.ports import free_port

EXPECTED_METRICS = {
    "pha_request_duration_seconds",
    "pha_phase_duration_seconds",
    "pha_adapter_cache_lookups",
    "pha_redis_errors",
    "pha_route_score",
    "pha_batch_size",
    "pha_requests_in_flight",
    "pha_model_busy_seconds",
}


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    with running_app(tiny_checkpoint) as client:
        client.post("/predict", json={"inputs": "sentence: fine"})
        yield client


def test_readyz_reports_model_index_and_redis(client):
    response = client.get("/readyz")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "ready"
    assert body["tasks"] == 3 and body["can_route"] is True and body["redis"] == "disabled"
    assert len(body["model"]) == 12 and body["warmup_seconds"] > 0
    assert body["runtime"]["torch_threads"] >= 1


def test_livez_and_readyz_with_a_dead_redis(tiny_checkpoint):
    """Liveness never touches Redis; readiness stays 200 and says degraded."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with running_app(tiny_checkpoint, redis_url=dead, redis_timeout_seconds=0.2) as client:
        start = time.perf_counter()
        assert client.get("/livez").json() == {"status": "alive"}
        assert time.perf_counter() - start < 0.15
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["redis"] == "degraded"
        assert client.post("/predict", json={"inputs": "sentence: fine"}).status_code == 200


def test_metrics_exposition(client):
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert set(families) >= EXPECTED_METRICS
    phases = {s.labels["phase"] for s in families["pha_phase_duration_seconds"].samples if "phase" in s.labels}
    assert phases == {"queue", "encode_route", "adapter", "generate"}
    tiers = {s.labels["tier"] for s in families["pha_adapter_cache_lookups"].samples}
    assert tiers == {"l1", "redis", "regenerated"}
    # No label may grow with the number of tasks.
    labels = {k for f in families.values() for s in f.samples for k in s.labels}
    assert "task" not in labels and "name" not in labels
    requests = [s for s in families["pha_request_duration_seconds"].samples if s.name.endswith("_count")]
    assert any(s.labels == {"route": "/predict", "status": "200"} and s.value >= 1 for s in requests)


def test_model_thread_busy_time_is_exported(client):
    """pha_model_busy_seconds_total counts the model thread's time in calls (its rate is the utilisation)."""
    before = metric(client, "pha_model_busy_seconds_total")
    client.portal.call(client.app.state.pha.runner, time.sleep, 0.2)
    after = metric(client, "pha_model_busy_seconds_total")
    assert 0.2 <= after - before < 5
    client.post("/predict", json={"inputs": "sentence: fine"})
    assert metric(client, "pha_model_busy_seconds_total") > after


def test_two_apps_do_not_share_metrics(client, tiny_checkpoint):
    with running_app(tiny_checkpoint) as other:
        text = other.get("/metrics").text
        assert 'pha_request_duration_seconds_count{route="/predict",status="200"}' not in text


def test_request_id_is_echoed_or_made(client):
    given = client.get("/livez", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = client.get("/livez", headers={"X-Request-ID": "bad id\twith spaces"})
    assert made.headers["x-request-id"] != "bad id\twith spaces" and len(made.headers["x-request-id"]) == 32
    error = client.post("/predict", json={"inputs": ""}, headers={"X-Request-ID": "req-9"})
    assert error.headers["x-request-id"] == "req-9" and error.json()["request_id"] == "req-9"


def test_docs_and_openapi_examples(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/prototypes", "/prototypes/{name}", "/livez", "/readyz", "/metrics"} <= set(spec["paths"])
    request_schema = spec["components"]["schemas"]["PredictRequest"]
    assert request_schema["examples"] and "backbone_only" not in request_schema["properties"]
    assert spec["components"]["schemas"]["PredictResponse"]["examples"]


def test_warm_up_generates_the_trained_tasks_adapters_only(tiny_checkpoint, tmp_path):
    """A replica restarting on a registry of adapted tasks serves them (caught up) without making their adapters
    at start-up: those come on first use, so a start costs the same with 40 tasks or a million."""
    import numpy as np

    from pha_core.adapt import AdaptedTensors
    from service.registry import RegisteredTask, SqliteRegistry

    with running_app(tiny_checkpoint, registry_dir=str(tmp_path)) as client:
        model, dim = (
            client.get("/readyz").json()["model"],
            len(client.get("/prototypes/rte?include_vector=true").json()["vector"]),
        )
    store = SqliteRegistry.in_folder(tmp_path)
    rng = np.random.default_rng(0)
    store.register_many(
        [
            (
                RegisteredTask(name=f"task-{i}", mode="prototype", job_id=f"job-{i}", model_version=model),
                AdaptedTensors(rng.standard_normal(dim), rng.standard_normal(dim), None).to_bytes(),
            )
            for i in range(40)
        ]
    )
    store.close()

    def regenerated(client) -> float:
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        samples = families["pha_adapter_cache_lookups"].samples
        return sum(s.value for s in samples if s.labels.get("tier") == "regenerated" and s.name.endswith("_total"))

    with running_app(tiny_checkpoint, registry_dir=str(tmp_path)) as client:
        assert client.get("/readyz").json()["tasks"] == 3 + 40
        assert regenerated(client) == 3, "the three trained tasks' adapters, none of the 40 adapted ones"
        assert client.post("/predict", json={"inputs": "sentence: fine", "task": "task-7"}).status_code == 200
        assert regenerated(client) == 4, "an adapted task's adapters are made on its first request"


def test_a_bf16_server_says_so_and_keeps_the_model_version(client, tiny_checkpoint):
    with running_app(tiny_checkpoint, precision="bf16") as half:
        body = half.get("/readyz").json()
        assert body["runtime"]["precision"] == "bf16" and client.get("/readyz").json()["runtime"]["precision"] == "fp32"
        assert body["model"] == client.get("/readyz").json()["model"]  # one adapter cache serves both
        p = half.post("/predict", json={"inputs": "sentence: fine", "task": "sst2"}).json()["predictions"][0]
        assert p["output"] in p["probabilities"] and sum(p["probabilities"].values()) == pytest.approx(1.0)
