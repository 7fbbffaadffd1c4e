"""Security: no change without the key, no way out of the registry folder, nothing from Redis unpickled or
evaluated, bounded bodies and generation settings, and an API key compared in constant time and never logged.

Every test also checks its positive control (the key works, the payload is live, the logs are written), so a
test that sees nothing cannot pass by seeing nothing.
"""

from __future__ import annotations

import ast
import http.client
import inspect
import json
import pickle
import time
import uuid
from pathlib import Path

import pytest
import redis
from reliability_helpers import AUTH, KEY, adapt_body, register_task, stream_state, tree_digest

from pha_core.inference import AdapterSet
from tests.support.app import metric, running_app
from tests.support.jobs import wait_job
from tests.support.polling import wait_for
from tests.support.processes import ApiServer, WorkerProcess
from tests.support.redis_server import PrivateRedis, needs_redis_server

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[2]
TEXT = "sentence: a fine film"


class Tripwire:
    """Unpickling this creates `path`: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def settings_for(tmp_path: Path, redis_url: str, **extra: object) -> dict:
    return dict(redis_url=redis_url, api_key=KEY, registry_dir=str(tmp_path / "registry"), **extra)


def system_state(client, tmp_path: Path, db: redis.Redis) -> dict:
    """Everything a mutation could change: registry files, job stream and records, the catalogue."""
    return {
        "registry": tree_digest(tmp_path / "registry"),
        "stream": stream_state(db, "pha:jobs", "pha-workers"),
        "job_records": sorted(db.scan_iter(match="pha:job:*")),
        "catalog": client.get("/prototypes").json(),
    }


# ------------------------------------------------------------------------------------ keys and mutations
BAD_CREDENTIALS = {
    "no header": {},
    "wrong key": {"Authorization": "Bearer wrong"},
    "key plus a character": {"Authorization": f"Bearer {KEY}x"},
    "key minus a character": {"Authorization": f"Bearer {KEY[:-1]}"},
    "key in upper case": {"Authorization": f"Bearer {KEY.upper()}"},
    "basic scheme": {"Authorization": f"Basic {KEY}"},
    "no scheme": {"Authorization": KEY},
    "empty bearer": {"Authorization": "Bearer "},
    "other header": {"X-API-Key": KEY},
}


def mutations(task: str) -> list[tuple[str, str, dict | None]]:
    return [
        ("POST", "/adapt", adapt_body(task, 5)),
        ("POST", "/adapt", {**adapt_body("good", 5), "replace": True}),
        ("POST", f"/adapt?api_key={KEY}", adapt_body(task, 5)),
        ("DELETE", "/prototypes/good", None),
        ("DELETE", f"/prototypes/good?api_key={KEY}", None),
    ]


def test_mutations_without_the_right_key_change_nothing(tiny_checkpoint, tmp_path, private_redis):
    db = redis.Redis.from_url(private_redis.url)
    settings = settings_for(tmp_path, private_redis.url, registry_poll_seconds=0.1)
    with running_app(tiny_checkpoint, **settings) as client:
        register_task(tmp_path / "registry", "good", client.get("/readyz").json()["model"])
        wait_for(lambda: client.get("/prototypes/good").status_code == 200, 10, "good served")
        before = system_state(client, tmp_path, db)
        answers = []
        for label, headers in BAD_CREDENTIALS.items():
            for method, path, body in mutations("intruder"):
                response = client.request(method, path, json=body, headers=headers)
                answers.append((label, method, path, response.status_code))
                assert response.status_code == 401, (label, method, path, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
        time.sleep(0.3)  # past a registry poll, in case anything had been written
        after = system_state(client, tmp_path, db)
        refused = metric(client, "pha_requests_rejected_total", reason="auth")
        # Positive control: the same requests with the key do change things.
        assert client.delete("/prototypes/good", headers=AUTH).status_code == 200
        assert client.post("/adapt", json=adapt_body("intruder", 5), headers=AUTH).status_code == 202
        changed = system_state(client, tmp_path, db)
    with running_app(tiny_checkpoint, **{**settings, "api_key": ""}) as keyless:  # no key configured: all 403
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer"}, AUTH):
            assert keyless.post("/adapt", json=adapt_body("intruder", 5), headers=headers).status_code == 403
            assert keyless.delete("/prototypes/good", headers=headers).status_code == 403
    print(f"AUTH refused={len(answers)} (401 each) counted={refused:.0f} state_unchanged={after == before}")
    assert after == before
    assert refused == len(answers)
    assert changed["registry"] != before["registry"] and changed["stream"]["length"] == 1


def test_the_key_is_compared_in_constant_time(tiny_checkpoint, tmp_path, monkeypatch):
    import service.deps as deps

    calls = []
    real = deps.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    with running_app(tiny_checkpoint, api_key=KEY, registry_dir=str(tmp_path / "registry")) as client:
        assert client.delete("/prototypes/nothing", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.delete("/prototypes/nothing", headers=AUTH).status_code == 404  # past the key check
    assert calls == [(b"wrong", KEY.encode()), (KEY.encode(), KEY.encode())]
    # And no other comparison of the key anywhere: only deps.py reads it, and only compare_digest compares it.
    readers = [p for p in (ROOT / "service").rglob("*.py") if "api_key.get_secret_value" in p.read_text()]
    assert readers == [ROOT / "service" / "deps.py"]
    tree = ast.parse(inspect.getsource(deps.require_api_key))
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            assert not names & {"configured", "token"}, ast.unparse(node)


# ------------------------------------------------------------------ a real server: raw paths and its logs
@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """`pha serve` with DEBUG logs (every line it can write), a private Redis and an adapted task "good"."""
    needs_redis_server()
    folder = tmp_path_factory.mktemp("server")
    with PrivateRedis(folder / "redis", appendonly=False) as private:
        settings = {
            "PHA_CHECKPOINT": str(tiny_checkpoint),
            "PHA_REDIS_URL": private.url,
            "PHA_API_KEY": KEY,
            "PHA_REGISTRY_DIR": str(folder / "registry"),
            "PHA_REGISTRY_POLL_SECONDS": "0.2",
            "PHA_LOG_LEVEL": "DEBUG",
        }
        with ApiServer(settings, folder / "api.log") as api:
            model = api.wait_ready()["model"]
            register_task(folder / "registry", "good", model)
            with api.client() as c:
                wait_for(lambda: c.get("/prototypes/good").status_code == 200, 10, "good served")
            api.folder, api.redis_url = folder, private.url
            yield api


def raw(server: ApiServer, method: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """A request sent as written: no client-side normalisation of `..` or of percent-encoding."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.slow
def test_task_names_cannot_escape_the_registry_folder(server):
    folder = server.folder
    outside = folder / "outside.safetensors"
    outside.write_bytes(b"must survive")
    before = tree_digest(folder / "registry")
    escapes = [
        "/prototypes/..",
        "/prototypes/../outside.safetensors",
        "/prototypes/../../outside.safetensors",
        "/prototypes/%2e%2e",
        "/prototypes/%2e%2e%2f%2e%2e%2foutside.safetensors",
        "/prototypes/..%2F..%2Foutside.safetensors",
        "/prototypes/%2e%2e%2fmanifest.json",
        "/prototypes/" + str(outside).replace("/", "%2F"),
        "/prototypes/%2F" + str(outside).lstrip("/").replace("/", "%2F"),
        "/prototypes/good%2F..%2F..%2Foutside.safetensors",
        "/prototypes/..%5C..%5Coutside.safetensors",
        "/prototypes/%252e%252e%252foutside.safetensors",
        "/prototypes/registry.sqlite3",
        "/prototypes/..%2Fregistry%2Fregistry.sqlite3",
        "/prototypes/good%00",
        "/prototypes/good%2500",
        "/prototypes/.good",
        "/prototypes/GOOD",
        "/prototypes/good/",
        "/prototypes/" + "a" * 4000,
    ]
    statuses = {}
    for path in escapes:
        for method in ("DELETE", "GET"):
            status, body = raw(server, method, path, {"Authorization": AUTH["Authorization"]})
            statuses[f"{method} {path[:60]}"] = status
            assert status < 500 and status not in (200, 201, 202), (method, path, status, body[:300])
            assert b"must survive" not in body
    names = ["..", "../x", "/abs/path", "a/../../b", "..%2fx", "%2e%2e", "good/../x", "c:\\x", "x\x00y", "Good", "."]
    names += ["tasks/good", "a" * 65, "x y", "\u2024\u2024"]
    with server.client() as c:
        for name in names:
            response = c.post("/adapt", json=adapt_body("x", 5) | {"task": name}, headers=AUTH)
            assert response.status_code == 422 and "invalid task name" in response.json()["detail"], (name, response)
        assert c.get("/prototypes/good").status_code == 200
    assert outside.read_bytes() == b"must survive" and tree_digest(folder / "registry") == before
    assert stream_state(redis.Redis.from_url(server.redis_url), "pha:jobs", "pha-workers")["length"] == 0
    tried = 2 * len(escapes) + len(names)
    print(f"PATHS escapes_tried={tried} statuses={sorted(set(statuses.values()))} changed=0")


@pytest.mark.slow
def test_the_api_key_never_appears_in_logs(server):
    wrong = "wrong-" + uuid.uuid4().hex
    with server.client() as c:
        accepted = c.post("/adapt", json=adapt_body("logged", 5), headers=AUTH)
        assert accepted.status_code == 202
        assert c.get(f"/jobs/{accepted.json()['job_id']}").status_code == 200
        assert c.delete("/prototypes/nothing", headers=AUTH).status_code == 404
        wrong_auth = {"Authorization": f"Bearer {wrong}"}
        assert c.post("/adapt", json=adapt_body("logged", 5), headers=wrong_auth).status_code == 401
        assert c.delete("/prototypes/good", headers=wrong_auth).status_code == 401
        assert c.post("/predict", json={"inputs": f"sentence: {KEY}"}).status_code == 200  # a key pasted as text
        invalid = c.post("/predict", json={"inputs": KEY, "max_new_tokens": KEY})
        assert invalid.status_code == 422 and KEY not in invalid.text  # the error does not echo the input either
    time.sleep(0.3)
    log = server.log.read_text(errors="replace")
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    refused = [entry for entry in lines if entry.get("status") == 401 and entry.get("rejected") == "auth"]
    print(f"LOGS lines={len(lines)} auth_refusals={len(refused)} key_found={KEY in log} wrong_found={wrong in log}")
    assert len(refused) == 2 and len(lines) > 10  # the requests were logged, at DEBUG
    assert KEY not in log and wrong not in log


# -------------------------------------------------------------------------- nothing from Redis is unpickled
def test_a_pickle_in_the_adapter_cache_is_rejected_and_regenerated(tiny_checkpoint, tmp_path, private_redis):
    db = redis.Redis.from_url(private_redis.url)
    tripwire = tmp_path / "unpickled"
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Tripwire(live)))  # the payload is live: unpickling it does create the file
    assert live.exists()
    with running_app(tiny_checkpoint, redis_url=private_redis.url):
        pass  # warm-up stores the three trained tasks' adapters
    keys = sorted(db.scan_iter(match="pha:adapter:*"))
    assert len(keys) == 3
    payloads = [pickle.dumps(Tripwire(tripwire)), b"__import__('os').system('touch " + bytes(tripwire) + b"')", b""]
    for key, payload in zip(keys, payloads, strict=True):
        db.set(key, payload)
    with running_app(tiny_checkpoint, redis_url=private_redis.url) as client:
        tiers = {t: metric(client, "pha_adapter_cache_lookups_total", tier=t) for t in ("redis", "regenerated")}
        assert client.post("/predict", json={"inputs": TEXT}).status_code == 200
    print(f"PICKLE payloads={len(payloads)} tiers={tiers} executed={tripwire.exists()}")
    assert not tripwire.exists()
    assert tiers == {"redis": 0, "regenerated": 3}
    for key in keys:  # overwritten with real adapters
        AdapterSet.from_bytes(db.get(key), n_layers=1)


@pytest.mark.slow
def test_poison_job_entries_are_discarded_without_being_evaluated(tiny_checkpoint, tmp_path, private_redis):
    db = redis.Redis.from_url(private_redis.url)
    tripwire = tmp_path / "evaluated"
    bait = f"__import__('os').system('touch {tripwire}')"
    recorded = uuid.uuid4().hex
    db.hset(f"pha:job:{recorded}", mapping={"state": '"queued"', "task": json.dumps(bait), "attempts": "0"})
    db.xgroup_create("pha:jobs", "pha-workers", id="0", mkstream=True)
    poison = [
        {"job_id": recorded, "payload": pickle.dumps(Tripwire(tripwire))},
        {"job_id": uuid.uuid4().hex, "payload": bait},
        {"job_id": uuid.uuid4().hex, "payload": "[1, 2]"},
        {"job_id": "../../etc", "payload": "{}"},
        {"payload": "{}"},
    ]
    for fields in poison:
        db.xadd("pha:jobs", fields)
    settings = settings_for(tmp_path, private_redis.url)
    env = {f"PHA_{k.upper()}": str(v) for k, v in settings.items()}
    env |= {"PHA_CHECKPOINT": str(tiny_checkpoint), "PHA_TORCH_THREADS": "1"}
    with running_app(tiny_checkpoint, **settings) as client, WorkerProcess(env, tmp_path / "worker.log") as worker:
        good = client.post("/adapt", json=adapt_body("after-poison", 5), headers=AUTH).json()["job_id"]
        done = wait_job(client, good, timeout=120, worker=worker)
        poisoned = client.get(f"/jobs/{recorded}").json()
        alive = worker.alive()
    print(f"POISON entries={len(poison)} good_job={done['state']} worker_alive={alive} executed={tripwire.exists()}")
    assert not tripwire.exists()
    assert done["state"] == "succeeded" and alive, worker.log_tail()
    assert poisoned["state"] == "failed" and "unreadable job entry" in poisoned["error"] and poisoned["task"] == bait
    assert stream_state(db, "pha:jobs", "pha-workers") == {"length": len(poison) + 1, "pending": 0, "lag": 0}


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def unsafe_calls(path: Path) -> list[str]:
    """Calls that can run code from data: (un)pickling modules, eval/exec, torch.load without weights_only=True,
    numpy.load with allow_pickle, yaml.load without a safe loader."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where} imports {m}" for m in modules if m.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if func in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"):
            found.append(f"{where} calls {func}")
        if func.split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where} calls {func}")
        if func.endswith("torch.load") and keywords.get("weights_only") != "True":
            found.append(f"{where} calls torch.load without weights_only=True")
        if func in ("np.load", "numpy.load") and keywords.get("allow_pickle", "False") != "False":
            found.append(f"{where} calls {func} with allow_pickle")
        yaml_load = func in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load")
        if yaml_load and "Safe" not in keywords.get("Loader", ""):
            found.append(f"{where} calls {func} without a safe loader")
        if func.endswith("read_pickle"):
            found.append(f"{where} calls {func}")
    return found


def test_no_code_path_unpickles_or_evaluates_data():
    files = sorted((ROOT / "service").rglob("*.py")) + sorted((ROOT / "pha_core").rglob("*.py"))
    found = [problem for path in files for problem in unsafe_calls(path)]
    probe = ROOT / "tests" / "reliability" / "test_security.py"  # this file does unpickle (the tripwire)
    print(f"SCAN files={len(files)} unsafe_calls={found}")
    assert len(files) > 40 and found == []
    assert any("pickle" in problem for problem in unsafe_calls(probe))  # the scan does see them


# --------------------------------------------------------------------------------- bounded bodies and settings
def test_bodies_and_generation_settings_are_bounded(tiny_checkpoint, tmp_path, private_redis):
    limits = dict(max_body_bytes=300_000, max_new_tokens=8, max_adapt_examples=8, max_adapt_steps=50)
    db = redis.Redis.from_url(private_redis.url)
    ok = adapt_body("bounded", 5)
    refused = [
        ("/adapt", {**ok, "steps": 51}, 422),
        ("/adapt", {**ok, "steps": 0}, 422),
        ("/adapt", {**ok, "steps": -5}, 422),
        ("/adapt", {**ok, "steps": 5.5}, 422),
        ("/adapt", {**ok, "steps": "5"}, 422),
        ("/adapt", {**ok, "steps": True}, 422),
        ("/adapt", {**ok, "seed": -1}, 422),
        ("/adapt", {**ok, "seed": 2**31}, 422),
        ("/adapt", adapt_body("bounded", 5, k=9), 422),
        ("/adapt", {**ok, "heldout": adapt_body("held", 5, k=81)["examples"]}, 422),
        ("/adapt", {**ok, "examples": [{"input": "premise: " + "word " * 2000, "target": "yes"}]}, 422),
        ("/predict", {"inputs": TEXT, "max_new_tokens": 9}, 422),
        ("/predict", {"inputs": TEXT, "max_new_tokens": 10**12}, 422),
        ("/predict", {"inputs": TEXT, "max_new_tokens": -1}, 422),
        ("/predict", {"inputs": ["x"] * 65}, 422),
        ("/predict", {"inputs": "word " * 50_000}, 422),
    ]
    raw_bodies = [
        ("/adapt", b'{"task": "x", "examples": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
        ("/predict", b'{"inputs": "x", "max_new_tokens": ' + b"9" * 5000 + b"}", 400),
        ("/adapt", b'{"task": "' + b"x" * 400_000 + b'"}', 413),
        ("/predict", b'{"inputs": "' + b"x" * 400_000 + b'"}', 413),
    ]
    with running_app(tiny_checkpoint, **settings_for(tmp_path, private_redis.url, **limits)) as client:
        slowest = 0.0
        for path, body, status in refused:
            start = time.perf_counter()
            response = client.post(path, json=body, headers=AUTH)
            slowest = max(slowest, time.perf_counter() - start)
            assert response.status_code == status, (path, str(body)[:120], response.text[:300])
        for path, content, status in raw_bodies:
            start = time.perf_counter()
            response = client.post(path, content=content, headers={**AUTH, "content-type": "application/json"})
            slowest = max(slowest, time.perf_counter() - start)
            assert response.status_code == status, (path, response.text[:300])

        def chunks():
            for _ in range(400):
                yield b"x" * 1000

        streamed = client.post("/adapt", content=chunks(), headers={**AUTH, "content-type": "application/json"})
        at_limit = client.post("/predict", json={"inputs": [TEXT] * 64, "max_new_tokens": 8})
        assert streamed.status_code == 413 and at_limit.status_code == 200
        assert db.exists("pha:jobs") == 0  # nothing was queued
    print(f"BOUNDS refused={len(refused) + len(raw_bodies) + 1} slowest_refusal={slowest * 1000:.0f} ms")
    assert slowest < 2.0
