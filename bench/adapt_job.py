"""Wall time of one /adapt job end to end: HTTP in, worker, registry, every replica routing to the new task.

    python bench/adapt_job.py --task cb --k 16 --steps 200 --output bench/results/adapt_job_cpu.json

Starts Redis (private port), `pha serve` and `pha worker` as processes (demo model unless --checkpoint), posts
k real examples of a task the model never saw, and reports: time to 202, queue wait, adaptation, registration,
time until GET /prototypes/{task} answers (the replica follows the registry), and the first routed prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pha_core.data import data_dir_from_env, load_splits, low_data  # noqa: E402

KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(stack: ExitStack, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = stack.enter_context(log.open("w"))
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT)
    stack.callback(lambda: (proc.terminate(), proc.wait(timeout=30)))
    return proc


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server at {url} not ready after {timeout} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="cb")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--mode", default="prototype")
    p.add_argument("--checkpoint", default="")
    p.add_argument("--output")
    args = p.parse_args()
    splits = load_splits([args.task], data_dir_from_env())[args.task]
    shots = [{"input": e.input, "target": e.target} for e in low_data(splits["train"], n=args.k, seed=0)]
    probe = splits["test"][0].input
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        redis_port, api_port = free_port(), free_port()
        start(
            stack,
            ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
            {},
            Path(tmp) / "redis.log",
        )
        env = {
            "PHA_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "PHA_REGISTRY_DIR": f"{tmp}/registry",
            "PHA_API_KEY": KEY,
            "PHA_CHECKPOINT": args.checkpoint,
            "PHA_TRUNCATE_INPUTS": "true",
            "PHA_REGISTRY_POLL_SECONDS": "2",
            "HF_HUB_OFFLINE": "1",
            "PHA_LOG_LEVEL": "WARNING",
        }
        start(
            stack, [sys.executable, "-m", "pha_core.cli", "serve", "--port", str(api_port)], env, Path(tmp) / "api.log"
        )
        start(stack, [sys.executable, "-m", "pha_core.cli", "worker"], env, Path(tmp) / "worker.log")
        url = f"http://127.0.0.1:{api_port}"
        wait_ready(url)
        time.sleep(3)  # let the worker finish loading the model too: its start-up is not the job's time
        body = {"task": args.task, "examples": shots, "steps": args.steps, "mode": args.mode}
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/adapt", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        accepted = time.perf_counter() - t0
        r.raise_for_status()
        job_id = r.json()["job_id"]
        while (job := httpx.get(f"{url}/jobs/{job_id}").json())["state"] not in ("succeeded", "failed"):
            time.sleep(0.1)
        finished = time.perf_counter() - t0
        while httpx.get(f"{url}/prototypes/{args.task}").status_code != 200:
            time.sleep(0.05)
        visible = time.perf_counter() - t0
        pred = httpx.post(f"{url}/predict", json={"inputs": probe}).json()["predictions"][0]
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "args": vars(args),
        "state": job["state"],
        "error": job.get("error"),
        "seconds": {
            "accepted_202": round(accepted, 3),
            "job_succeeded": round(finished, 2),
            "served_by_api": round(visible, 2),
            "queue_wait": round(job["started"] - job["created"], 2) if job.get("started") else None,
            "adaptation": round(job["result"]["adapt_seconds"], 2) if job.get("result") else None,
        },
        "result": job.get("result"),
        "first_prediction": pred,
        "command": " ".join(sys.argv),
    }
    print(json.dumps(report, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0 if job["state"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
