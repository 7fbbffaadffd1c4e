"""Fuzz: schemathesis over the service's OpenAPI, every operation, with the API key, against a real server.

    python bench/fuzz.py --output bench/results/fuzz_demo.json            # demo model, 300 examples per operation
    python bench/fuzz.py --checkpoint DIR --max-examples 25                # what tests/reliability runs

Starts a private redis-server, `pha serve` (PHA_API_KEY set, a registry in a temporary folder) and one
`pha worker`, so that /adapt jobs really run and DELETE finds real adapted tasks; then runs
`schemathesis run <server>/openapi.json -H "Authorization: Bearer <key>"` with every phase (examples, coverage,
fuzzing, stateful) and every check except `positive_data_acceptance`, which expects any schema-valid request to
succeed: the service also refuses what a static schema cannot say (unknown task names, inputs over the token
limit, limits set by PHA_* settings, duplicated examples), with 422 and a message.

Reported: test cases generated and failures (from schemathesis' JSON report), and from the server itself the
answers by status class (5xx must be 0), whether it is still ready, and whether the worker is still running.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/fuzz.py`: the checkout's packages

from bench.machine import write_json  # noqa: E402
from tests.support.processes import ApiServer, WorkerProcess  # noqa: E402
from tests.support.redis_server import PrivateRedis  # noqa: E402

EXCLUDED_CHECKS = ("positive_data_acceptance",)


def answers_by_class(base: str) -> dict[str, int]:
    by_class: Counter[str] = Counter()
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "pha_request_duration_seconds_count":
                by_class[s.labels["status"][0] + "xx"] += int(s.value)
    return dict(sorted(by_class.items()))


def schemathesis_run(base: str, key: str, max_examples: int, seed: int, workdir: Path, max_time: int | None) -> dict:
    report = workdir / "schemathesis.json"
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json"]
    cmd += ["--header", f"Authorization: Bearer {key}", "--max-examples", str(max_examples), "--seed", str(seed)]
    cmd += ["--workers", "1", "--exclude-checks", ",".join(EXCLUDED_CHECKS), "--continue-on-failure"]
    cmd += ["--request-timeout", "30", "--report", "json", "--report-json-path", str(report)]
    cmd += ["--suppress-health-check", "too_slow,filter_too_much"]
    if max_time:
        cmd += ["--max-time", str(max_time)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, timeout=3600)
    seconds = time.perf_counter() - started
    (workdir / "schemathesis.out").write_text(done.stdout + done.stderr)
    data = json.loads(report.read_text())
    return {
        "exit_code": done.returncode,
        "seconds": round(seconds, 1),
        "operations_tested": data["operations"]["tested"],
        "operations_total": data["operations"]["total"],
        "test_cases": data["test_cases"]["generated"],
        "cases_with_failures": data["test_cases"]["with_failures"],
        "failures": [{k: f[k] for k in ("code", "title", "count", "operations")} for f in data["failures"]],
        "errors": data["errors"],
        "phases": {name: p["status"] for name, p in data["phases"].items()},
        "output_tail": (done.stdout + done.stderr)[-6000:] if done.returncode else "",
    }


def run(checkpoint: str, max_examples: int, seed: int, workdir: Path, max_time: int | None = None) -> dict:
    key = secrets.token_urlsafe(24)
    with PrivateRedis(workdir / "redis", appendonly=False) as redis_server:
        settings = {
            "PHA_CHECKPOINT": checkpoint,
            "PHA_REDIS_URL": redis_server.url,
            "PHA_API_KEY": key,
            "PHA_REGISTRY_DIR": str(workdir / "registry"),
            "PHA_REGISTRY_POLL_SECONDS": "0.5",
            "PHA_MAX_ADAPT_STEPS": "20",  # fuzzed jobs stay short
            "PHA_LOG_LEVEL": "WARNING",
        }
        worker_settings = {**settings, "PHA_WORKER_NAME": "fuzz-worker", "PHA_TORCH_THREADS": "1"}
        worker = WorkerProcess(worker_settings, workdir / "worker.log").start()
        try:
            with ApiServer(settings, workdir / "api.log") as server:
                result = schemathesis_run(server.base, key, max_examples, seed, workdir, max_time)
                result["server_answers"] = answers_by_class(server.base)
                result["server_ready_after"] = httpx.get(f"{server.base}/readyz", timeout=10).status_code == 200
                result["worker_alive_after"] = worker.alive()
                result["key_in_logs"] = any(key in p.read_text(errors="replace") for p in workdir.glob("*.log"))
        finally:
            worker.stop()
    result["max_examples"], result["seed"] = max_examples, seed
    return result


def check(result: dict) -> list[str]:
    failed = []
    if result["failures"] or result["errors"] or result["exit_code"] != 0:
        failed.append(f"schemathesis: {result['failures'] or result['errors'] or result['output_tail']}")
    if result["server_answers"].get("5xx"):
        failed.append(f"the server answered 5xx {result['server_answers']['5xx']} times")
    if result["operations_tested"] != result["operations_total"]:
        failed.append(f"only {result['operations_tested']} of {result['operations_total']} operations tested")
    if not result["server_ready_after"]:
        failed.append("the server is not ready after the run")
    if not result["worker_alive_after"]:
        failed.append("the worker died during the run")
    if result["key_in_logs"]:
        failed.append("the API key appears in a log")
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="PHA checkpoint directory (default: the demo checkpoint)")
    p.add_argument("--max-examples", type=int, default=300, help="test cases per operation and phase (300)")
    p.add_argument("--max-time", type=int, help="time budget of the schemathesis run, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, help="write the figures as JSON here too")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pha-fuzz-"))
    result = run(args.checkpoint, args.max_examples, args.seed, workdir, args.max_time)
    write_json(args.output, {k: v for k, v in result.items() if k != "output_tail"})
    failed = check(result)
    for line in failed:
        print("FAIL:", line, file=sys.stderr)
    print(f"logs and schemathesis output: {workdir}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
