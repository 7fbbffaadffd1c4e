"""Compose without Docker: run docker-compose.yml's services as local processes and push one request through each.

    python bench/compose_local.py [--compose docker-compose.yml] [--timeout 180] [--workdir DIR]

What it takes from the compose file (and from the Dockerfile each service is built from): the commands, the PHA_*
environment (image ENV first, then the service's `environment`), the volumes and the health checks. What it
changes, because there is no container: named volumes become folders under a temporary directory, bind mounts
resolve to their host folders, every environment value that names a path inside a mount is rewritten to the host
path, `redis://<service>:port` points at the local redis-server on a private loopback port, and `pha serve` binds
127.0.0.1 on a free port. `pha` runs as `python -m pha_cli` with this interpreter.

Then: Redis answers PING; the API's /livez, /readyz and /metrics answer; one POST /predict is served; and, when the
worker exists (service/worker.py and POST /adapt), one /adapt job runs through the worker to `succeeded` and the
new task is listed and served. Everything is stopped at the end. Exit code 0 when all that ran passed; an adapt
step that cannot run yet is reported as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import secrets
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/compose_local.py`: the checkout's packages

from tests.support.deployfiles import (  # noqa: E402
    compose_environment,
    compose_volumes,
    expand_args,
    interpolate,
    read_dockerfile,
)
from tests.support.ports import free_port  # noqa: E402
from tests.support.processes import PHA, Child, environ_without_pha  # noqa: E402
from tests.support.redis_server import wait_until_redis_answers  # noqa: E402

# Image ENV names that matter to the process (PATH and the like belong to the image, not to this machine).
IMAGE_ENV_PREFIXES = ("PHA_", "HF_", "TRANSFORMERS_", "PYTHON")
ADAPT_EXAMPLES = [
    ("review: a warm, funny and beautifully acted film", "positive"),
    ("review: a tedious mess that wastes a fine cast", "negative"),
    ("review: one of the best things I have seen this year", "positive"),
    ("review: dull, predictable and far too long", "negative"),
    ("review: the story is moving and the music is lovely", "positive"),
    ("review: I wanted my two hours back", "negative"),
]


@dataclass
class LocalCompose:
    """The services of a compose file as local processes (see the module docstring for what is remapped)."""

    compose_file: Path
    workdir: Path
    variables: dict[str, str] = field(default_factory=dict)  # what .env / the shell would give compose
    procs: dict[str, Child] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.doc = interpolate(yaml.safe_load(self.compose_file.read_text()), env=self.variables)
        self.services: dict[str, dict[str, Any]] = self.doc["services"]
        self.ports = {name: free_port() for name in self.services}

    # ----------------------------------------------------------------------------------------- translation

    def _service_with(self, first_word: str, subcommand: str | None = None) -> str:
        for name, svc in self.services.items():
            cmd = svc.get("command") or []
            if cmd and cmd[0] == first_word and (subcommand is None or cmd[1:2] == [subcommand]):
                return name
        raise KeyError(f"no service runs {first_word} {subcommand or ''} in {self.compose_file}")

    def _mounts(self, svc: dict[str, Any]) -> dict[str, Path]:
        """Container path -> host path of each volume of the service."""
        out = {}
        for source, target, _ro in compose_volumes(svc):
            if source.startswith((".", "/", "~")):
                host = (self.compose_file.parent / Path(source).expanduser()).resolve()
            else:  # a named volume: one folder per name, shared by the services that mount it
                host = self.workdir / "volumes" / source
            host.mkdir(parents=True, exist_ok=True)
            out[target] = host
        return out

    def _remap(self, value: str, mounts: dict[str, Path]) -> str:
        url = urlparse(value)
        if url.scheme in ("redis", "rediss") and url.hostname in self.services:
            netloc = url.netloc.replace(f"{url.hostname}:{url.port}" if url.port else url.hostname, "", 1)
            return url._replace(netloc=f"{netloc}127.0.0.1:{self.ports[url.hostname]}").geturl()
        for target in sorted(mounts, key=len, reverse=True):
            if value == target or value.startswith(target.rstrip("/") + "/"):
                return str(mounts[target]) + value[len(target.rstrip("/")) :]
        return value

    def environment(self, name: str) -> dict[str, str]:
        svc = self.services[name]
        env = environ_without_pha()
        dockerfile = (svc.get("build") or {}).get("dockerfile")
        if dockerfile:
            df = read_dockerfile(self.compose_file.parent / dockerfile)
            env.update({k: expand_args(v, df.args) for k, v in df.env.items() if k.startswith(IMAGE_ENV_PREFIXES)})
        env.update(compose_environment(svc))
        mounts = self._mounts(svc)
        return {k: self._remap(v, mounts) if k.startswith("PHA_") else v for k, v in env.items()}

    def argv(self, name: str) -> list[str]:
        cmd = list(self.services[name]["command"])
        if cmd[0] == "pha":
            cmd = [*PHA, *cmd[1:]]
            if "--host" in cmd:
                cmd[cmd.index("--host") + 1] = "127.0.0.1"
            if "--port" in cmd:
                cmd[cmd.index("--port") + 1] = str(self.ports[name])
        elif cmd[0] == "redis-server":
            data = self._mounts(self.services[name]).get("/data", self.workdir / name)
            cmd = [shutil.which("redis-server") or "redis-server", *cmd[1:]]
            cmd += ["--port", str(self.ports[name]), "--bind", "127.0.0.1", "--dir", str(data)]
        return cmd

    # ----------------------------------------------------------------------------------------- running

    @property
    def redis(self) -> str:
        return self._service_with("redis-server")

    @property
    def api(self) -> str:
        return self._service_with("pha", "serve")

    @property
    def worker(self) -> str:
        return self._service_with("pha", "worker")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[self.api]}"

    def start(self, name: str) -> Child:
        proc = Child(self.argv(name), self.environment(name), self.workdir / "logs" / f"{name}.log")
        self.procs[name] = proc
        return proc.start()

    def start_all(self, timeout: float) -> dict[str, Any]:
        """Redis, then the API and (where it exists yet) the worker; returns /readyz once the API is ready."""
        self.start(self.redis)
        self.wait_redis()
        self.start(self.api)
        if importlib.util.find_spec("service.worker") is not None:
            self.start(self.worker)
        return self.wait_ready(timeout)

    def wait_redis(self, timeout: float = 20.0) -> None:
        wait_until_redis_answers(self.ports[self.redis], self.procs[self.redis], timeout)

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self._check_alive(self.api)
            try:
                status, body = self.request("GET", "/readyz")
                if status == 200:
                    return body
                last = body
            except OSError as exc:
                last = exc
            time.sleep(0.5)
        raise TimeoutError(f"/readyz not 200 after {timeout:.0f}s (last: {last}):\n{self.procs[self.api].log_tail()}")

    def _check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if not proc.alive():
            raise RuntimeError(f"{name} exited with {proc.process.returncode}:\n{proc.log_tail()}")

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 60
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=dict(headers or {}))
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw, status = resp.read(), resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def stop(self) -> dict[str, int | None]:
        """Stop in reverse start order (worker and API before Redis); returns each exit code."""
        return {name: proc.stop(timeout=20) for name, proc in reversed(list(self.procs.items()))}


def adapt_unavailable(stack: LocalCompose) -> str | None:
    """Why the adapt step cannot run yet, or None when it can."""
    if importlib.util.find_spec("service.worker") is None:
        return "service/worker.py does not exist yet (`pha worker` is being implemented)"
    _, openapi = stack.request("GET", "/openapi.json")
    if "/adapt" not in (openapi.get("paths", {}) if isinstance(openapi, dict) else {}):
        return "the API has no POST /adapt yet"
    return None


def check_health(stack: LocalCompose) -> dict[str, Any]:
    status, live = stack.request("GET", "/livez")
    assert status == 200, f"/livez: {status} {live}"
    status, ready = stack.request("GET", "/readyz")
    assert status == 200, f"/readyz: {status} {ready}"
    assert ready.get("redis") == "ok", f"/readyz: the API does not reach the stack's Redis: {ready}"
    status, metrics = stack.request("GET", "/metrics")
    assert status == 200 and "pha_" in metrics, f"/metrics: {status}"
    return ready


def check_predict(stack: LocalCompose) -> dict[str, Any]:
    texts = [
        "sentence: a gripping, beautifully acted film.",
        # MNLI's genres (not a caption pair: the demo's content check turns those away as unlike MNLI's texts)
        "premise: The agency said the new rules will take effect next year, after a period of public comment. "
        "hypothesis: The rules are already in force.",
    ]
    status, body = stack.request("POST", "/predict", {"inputs": texts})
    assert status == 200, f"/predict: {status} {body}"
    preds = body["predictions"]
    assert len(preds) == len(texts) and all(isinstance(p["output"], str) and p["task"] for p in preds), body
    return body


def check_adapt(stack: LocalCompose, api_key: str, timeout: float) -> dict[str, Any]:
    task = f"smoke_{secrets.token_hex(3)}"
    body = {"task": task, "examples": [{"input": i, "target": t} for i, t in ADAPT_EXAMPLES], "steps": 10, "seed": 0}
    status, refused = stack.request("POST", "/adapt", body)
    assert status in (401, 403), f"/adapt without the key must be refused, got {status} {refused}"
    auth = {"Authorization": f"Bearer {api_key}"}
    status, job = stack.request("POST", "/adapt", body, headers=auth)
    assert status == 202, f"/adapt: {status} {job}"
    job_id = job["job_id"]
    deadline = time.monotonic() + timeout
    while True:
        stack._check_alive(stack.worker)
        status, state = stack.request("GET", f"/jobs/{job_id}")
        assert status == 200, f"/jobs/{job_id}: {status} {state}"
        if state["state"] in ("succeeded", "failed"):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"job {job_id} still {state['state']} after {timeout:.0f}s:\n{stack.procs[stack.worker].log_tail()}"
            )
        time.sleep(0.5)
    assert state["state"] == "succeeded", f"job failed: {state}\n{stack.procs[stack.worker].log_tail()}"
    # the registry notice reaches the API: the new task is listed, then served when pinned
    deadline = time.monotonic() + 30
    while True:
        status, listed = stack.request("GET", "/prototypes")
        if status == 200 and task in {p["name"] for p in listed["prototypes"]}:
            break
        assert time.monotonic() < deadline, f"{task} not in /prototypes: {listed}"
        time.sleep(0.5)
    status, pred = stack.request("POST", "/predict", {"inputs": ADAPT_EXAMPLES[0][0], "task": task})
    assert status == 200 and pred["predictions"][0]["task"] == task, f"/predict task={task}: {status} {pred}"
    return {"job": state, "prediction": pred["predictions"][0]}


def run(compose_file: Path, workdir: Path, timeout: float = 180.0) -> dict[str, Any]:
    """Start, check, stop. Returns what each step gave; raises on the first failure (after stopping)."""
    api_key = secrets.token_urlsafe(24)
    stack = LocalCompose(compose_file, workdir, variables={"PHA_API_KEY": api_key})
    report: dict[str, Any] = {"workdir": str(workdir), "ports": stack.ports}
    t0 = time.monotonic()
    try:
        report["ready"] = stack.start_all(timeout)
        report["ready_seconds"] = round(time.monotonic() - t0, 1)
        check_health(stack)
        report["predict"] = check_predict(stack)
        skip = adapt_unavailable(stack)
        report["adapt"] = {"skipped": skip} if skip else check_adapt(stack, api_key, timeout)
    finally:
        report["exit_codes"] = stack.stop()
        report["seconds"] = round(time.monotonic() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compose", type=Path, default=ROOT / "docker-compose.yml")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds for /readyz and for the adapt job")
    parser.add_argument("--workdir", type=Path, help="keep volumes and logs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not shutil.which("redis-server"):
        print("compose_local: redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pha-compose-") as tmp:
        workdir = args.workdir or Path(tmp)
        try:
            report = run(args.compose.resolve(), workdir, args.timeout)
        except (AssertionError, RuntimeError, TimeoutError) as exc:
            print(f"compose_local: FAILED: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(report, indent=2, default=str))
    if "skipped" in report["adapt"]:
        print(f"compose_local: adapt SKIPPED: {report['adapt']['skipped']}", file=sys.stderr)
    print(f"compose_local: OK in {report['seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
