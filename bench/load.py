"""Load: POST /predict at and above the server's concurrency limit for a fixed time, against a real server.

    python bench/load.py --output load.json                       # the demo model: 60 + 20 + 60 s
    python bench/load.py --checkpoint DIR --limit 4 --warmup 4 --at 4 --above 8   # what tests/reliability runs

Starts `pha serve` on a free loopback port with PHA_MAX_CONCURRENT_REQUESTS=--limit, then drives it with async
httpx clients that send one request after another (no pause, no retry delay), in three phases:

    warm-up   --over x --limit clients, --warmup s   caches, allocator pools and connections filled (RSS
              climbs for about a minute on the demo model, then stays flat: hence 60 s by default)
    at        --limit clients, --at s         exactly the limit: every request should be admitted
    above     --over x --limit clients, --above s   the excess must be answered 429 with Retry-After, at once

The mix: one routed text per request (every task), lists of 2-4 texts pinned to a task, and 5 % invalid requests
(empty text, unknown task, max_new_tokens 0) that must get 422 or 429, never 200 and never 5xx.
Reported per phase: status counts, 429s without Retry-After, transport errors, requests/s, p50/p99 latency of
the 200s; the server's RSS (VmRSS of its pid) after the warm-up, at the end, at most, over the second half of the
measured phases, and every 5 s (sampled every 0.5 s); and the server's own counts (5xx answers, requests refused
for overload, in-flight requests left).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/load.py`: the checkout's packages

from bench.machine import write_json  # noqa: E402
from bench.serve import fill, machine, percentile  # noqa: E402
from pha_core.tasks import TASKS  # noqa: E402
from tests.support.processes import ApiServer, rss_kib  # noqa: E402

INVALID = ({"inputs": ""}, {"inputs": "sentence: fine", "task": "no-such-task"}, {"inputs": "x", "max_new_tokens": 0})


def request_mix(tasks: list[str], max_new_tokens: int, seed: int = 0) -> list[tuple[dict, bool]]:
    """(body, valid) pairs: routed single texts, pinned lists, and 1 in 20 invalid."""
    rng = random.Random(seed)
    templates = {t: TASKS[t].template for t in tasks if t in TASKS}
    mix: list[tuple[dict, bool]] = []
    for k in range(200):
        task = rng.choice(sorted(templates))
        if k % 20 == 19:
            mix.append((INVALID[k % len(INVALID)], False))
        elif k % 3 == 2:
            texts = [fill(templates[task], k + i) for i in range(rng.randint(2, 4))]
            mix.append(({"inputs": texts, "task": task, "max_new_tokens": max_new_tokens}, True))
        else:
            mix.append(({"inputs": fill(templates[task], k), "max_new_tokens": max_new_tokens}, True))
    return mix


async def drive(base: str, clients: int, seconds: float, mix: list[tuple[dict, bool]]) -> dict:
    """`clients` loops sending requests back to back for `seconds`; returns what they saw."""
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    problems: list[str] = []  # anything that must not happen: 5xx, transport errors, 429 without Retry-After...
    no_retry_after = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

        async def loop(w: int, stop_at: float) -> None:
            nonlocal no_retry_after
            i = w
            while time.perf_counter() < stop_at:
                body, valid = mix[i % len(mix)]
                i += clients
                start = time.perf_counter()
                try:
                    response = await client.post("/predict", json=body)
                except httpx.HTTPError as exc:
                    problems.append(f"transport: {type(exc).__name__}: {exc}")
                    statuses["transport_error"] += 1
                    continue
                elapsed = time.perf_counter() - start
                code = response.status_code
                statuses[str(code)] += 1
                if code == 200:
                    latencies.append(elapsed)
                    texts = body["inputs"] if isinstance(body["inputs"], list) else [body["inputs"]]
                    if not valid or len(response.json()["predictions"]) != len(texts):
                        problems.append(f"200 for {body}: {response.text[:200]}")
                elif code == 429:
                    if not response.headers.get("retry-after", "").isdigit():
                        no_retry_after += 1
                elif code == 422 and not valid:
                    pass
                else:
                    problems.append(f"{code} for {body}: {response.text[:200]}")

        started = time.perf_counter()
        await asyncio.gather(*(loop(w, started + seconds) for w in range(clients)))
        elapsed = time.perf_counter() - started
    ms = sorted(x * 1000 for x in latencies)
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "ok_per_s": round(len(ms) / elapsed, 1),
        "p50_ms": round(percentile(ms, 50), 1) if ms else None,
        "p99_ms": round(percentile(ms, 99), 1) if ms else None,
        "max_ms": round(ms[-1], 1) if ms else None,
        "no_retry_after": no_retry_after,
        "problems": problems[:20],
        "problem_count": len(problems),
    }


def server_counts(base: str) -> dict:
    """From the server's /metrics and /readyz: answers by status class, overload refusals, what is left in flight."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    by_class: Counter[str] = Counter()
    overload = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pha_request_duration_seconds_count" and s.labels.get("route") == "/predict":
                by_class[s.labels["status"][0] + "xx"] += int(s.value)
            if s.name == "pha_requests_rejected_total" and s.labels.get("reason") == "overload":
                overload = s.value
    ready = httpx.get(f"{base}/readyz", timeout=10).json()
    return {
        "predict_answers": dict(sorted(by_class.items())),
        "overload_refused": int(overload),
        "in_flight_after": ready["in_flight"],
        "queued_after": ready["queued"],
    }


async def run_phases(server: ApiServer, limit: int, over: int, warmup: float, at: float, above: float) -> dict:
    tasks = [p["name"] for p in httpx.get(f"{server.base}/prototypes", timeout=10).json()["prototypes"]]
    mix = request_mix(tasks, max_new_tokens=4)
    rss_start = rss_kib(server.pid)
    warm = await drive(server.base, over * limit, warmup, mix)  # both paths, admitted and refused, warmed up
    rss_warm = rss_kib(server.pid)
    samples = [rss_warm]

    async def sample() -> None:
        while True:
            await asyncio.sleep(0.5)
            samples.append(rss_kib(server.pid))

    sampler = asyncio.create_task(sample())
    try:
        at_limit = await drive(server.base, limit, at, mix)
        above_limit = await drive(server.base, over * limit, above, mix)
    finally:
        sampler.cancel()
    await asyncio.sleep(0.2)  # let the last responses' bookkeeping finish before reading the server's counters
    rss_end = rss_kib(server.pid)
    middle = samples[len(samples) // 2]
    return {
        "limit": limit,
        "phases": {"warmup": warm, "at_limit": at_limit, "above_limit": above_limit},
        "rss_mib": {
            "start": round(rss_start / 1024, 1),
            "after_warmup": round(rss_warm / 1024, 1),
            "end": round(rss_end / 1024, 1),
            "max": round(max(samples) / 1024, 1),
            "growth_after_warmup": round((rss_end - rss_warm) / 1024, 1),
            "growth_second_half": round((rss_end - middle) / 1024, 1),  # a leak keeps growing; warm-up does not
            "timeline": [round(x / 1024, 1) for x in samples[::10]],  # every 5 s
            "samples": len(samples),
        },
        "server": server_counts(server.base),
    }


def run(
    checkpoint: str,
    limit: int,
    over: int,
    warmup: float,
    at: float,
    above: float,
    log: Path,
    extra: dict[str, str] | None = None,
) -> dict:
    settings = {
        "PHA_CHECKPOINT": checkpoint,
        "PHA_MAX_CONCURRENT_REQUESTS": str(limit),
        "PHA_RETRY_AFTER_SECONDS": "1",
        "PHA_LOG_LEVEL": "WARNING",
        **(extra or {}),
    }
    with ApiServer(settings, log) as server:
        figures = asyncio.run(run_phases(server, limit, over, warmup, at, above))
        figures["model"] = httpx.get(f"{server.base}/readyz", timeout=10).json()["model_source"]
    figures["machine"] = machine()
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="PHA checkpoint directory (default: the demo checkpoint)")
    p.add_argument("--limit", type=int, default=8, help="PHA_MAX_CONCURRENT_REQUESTS (8)")
    p.add_argument("--over", type=int, default=4, help="clients above the limit, as a multiple of it (4)")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds of warm-up before RSS is taken (60)")
    p.add_argument("--at", type=float, default=20.0, help="seconds at the limit (20)")
    p.add_argument("--above", type=float, default=60.0, help="seconds above the limit (60)")
    p.add_argument("--max-rss-growth-mib", type=float, default=64.0, help="exit 1 above this growth (64)")
    p.add_argument("--output", type=Path, help="write the figures as JSON here too")
    args = p.parse_args(argv)
    log = Path(tempfile.mkdtemp(prefix="pha-load-")) / "server.log"
    figures = run(args.checkpoint, args.limit, args.over, args.warmup, args.at, args.above, log)
    write_json(args.output, figures)
    failed = check(figures, args.max_rss_growth_mib)
    for line in failed:
        print("FAIL:", line, file=sys.stderr)
    print(f"server log: {log}", file=sys.stderr)
    return 1 if failed else 0


def check(figures: dict, max_rss_growth_mib: float) -> list[str]:
    """What a run must show; an empty list when it holds."""
    failed = []
    phases = figures["phases"]
    for name, phase in phases.items():
        if phase["problem_count"]:
            failed.append(f"{name}: {phase['problem_count']} bad answers, e.g. {phase['problems'][:3]}")
        if phase["no_retry_after"]:
            failed.append(f"{name}: {phase['no_retry_after']} answers 429 without a Retry-After header")
    if not phases["above_limit"]["statuses"].get("429"):
        failed.append("above the limit, no request was refused with 429")
    server = figures["server"]
    if server["predict_answers"].get("5xx"):
        failed.append(f"the server answered 5xx {server['predict_answers']['5xx']} times")
    client_429 = sum(p["statuses"].get("429", 0) for p in phases.values())
    if server["overload_refused"] != client_429:
        failed.append(f"server counted {server['overload_refused']} overload refusals, clients saw {client_429}")
    if server["in_flight_after"] or server["queued_after"]:
        failed.append(f"left in flight: {server['in_flight_after']} requests, {server['queued_after']} texts")
    growth = figures["rss_mib"]["growth_after_warmup"]
    if growth > max_rss_growth_mib:
        failed.append(f"RSS grew by {growth} MiB after the warm-up (bound {max_rss_growth_mib} MiB)")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
