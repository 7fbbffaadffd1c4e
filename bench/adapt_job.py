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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/adapt_job.py`: the checkout's packages

from pha_core.data import data_dir_from_env, load_splits, low_data  # noqa: E402
from tests.support.jobs import wait_job  # noqa: E402
from tests.support.polling import wait_for  # noqa: E402
from tests.support.processes import ApiServer, WorkerProcess  # noqa: E402
from tests.support.redis_server import PrivateRedis  # noqa: E402

KEY = "bench-key"
JOB_TIMEOUT_S = 3600  # the job of a slow machine; a dead worker fails the wait at once


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
    with tempfile.TemporaryDirectory() as tmp, PrivateRedis(Path(tmp) / "redis", appendonly=False) as redis_server:
        env = {
            "PHA_REDIS_URL": redis_server.url,
            "PHA_REGISTRY_DIR": f"{tmp}/registry",
            "PHA_API_KEY": KEY,
            "PHA_CHECKPOINT": args.checkpoint,
            "PHA_TRUNCATE_INPUTS": "true",
            "PHA_REGISTRY_POLL_SECONDS": "2",
            "PHA_LOG_LEVEL": "WARNING",
        }
        with ApiServer(env, Path(tmp) / "api.log") as api, WorkerProcess(env, Path(tmp) / "worker.log") as worker:
            report = time_one_job(api, worker, args, shots, probe)
    print(json.dumps(report, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0 if report["state"] == "succeeded" else 1


def time_one_job(api: ApiServer, worker: WorkerProcess, args: argparse.Namespace, shots: list[dict], probe: str):
    """POST /adapt, then the times until the job succeeded and until the API serves the new task."""
    time.sleep(3)  # let the worker finish loading the model too: its start-up is not the job's time
    body = {"task": args.task, "examples": shots, "steps": args.steps, "mode": args.mode}
    with api.client() as client:
        t0 = time.perf_counter()
        r = client.post("/adapt", json=body, headers={"Authorization": f"Bearer {KEY}"})
        accepted = time.perf_counter() - t0
        r.raise_for_status()
        job = wait_job(client, r.json()["job_id"], timeout=JOB_TIMEOUT_S, worker=worker)
        finished = time.perf_counter() - t0
        wait_for(lambda: client.get(f"/prototypes/{args.task}").status_code == 200, JOB_TIMEOUT_S, "the task served")
        visible = time.perf_counter() - t0
        pred = client.post("/predict", json={"inputs": probe}).json()["predictions"][0]
    return {
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


if __name__ == "__main__":
    sys.exit(main())
