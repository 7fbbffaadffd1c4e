"""Soak: the long variants of tests/reliability, in one run (not in CI: minutes, not seconds).

    python bench/soak.py --output bench/results/reliability_soak.json          # about 9 minutes on 2 cores
    python bench/soak.py --kill-rounds 50 --load-above 600 --fuzz-seconds 1800  # longer

1. Load: bench/load.py on the demo model (PHA_MAX_CONCURRENT_REQUESTS=--load-limit, 4x as many clients above it).
2. Fuzz: bench/fuzz.py on the demo model for --fuzz-seconds (schemathesis repeats its fuzzing until then).
3. Faults and security: tests/reliability/test_faults.py and test_security.py under pytest with raised bounds
   (PHA_SOAK_KILL_ROUNDS, PHA_SOAK_REDIS_OUTAGE_SECONDS): worker SIGKILLs, a longer Redis outage, the API killed
   mid-job, corrupt registry files, and the security checks. Their figure lines are collected.

Exit status 1 when any part fails; the JSON holds every figure and each part's verdict.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/soak.py`: the checkout's packages

from bench import fuzz, load  # noqa: E402
from bench.machine import write_json  # noqa: E402
from bench.serve import machine  # noqa: E402
from tests.support.processes import REPO, child_env  # noqa: E402

FIGURE_PREFIXES = ("KILL ", "REDIS ", "API-RESTART ", "REGISTRY ", "AUTH ", "PATHS ", "LOGS ", "PICKLE ", "POISON ")
FIGURE_PREFIXES += ("SCAN ", "BOUNDS ")


def faults(kill_rounds: int, outage_s: int, workdir: Path) -> dict:
    env = child_env({"PHA_SOAK_KILL_ROUNDS": str(kill_rounds), "PHA_SOAK_REDIS_OUTAGE_SECONDS": str(outage_s)})
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--basetemp", str(workdir)]
    cmd += ["tests/reliability/test_faults.py", "tests/reliability/test_security.py"]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    output = done.stdout + done.stderr
    (workdir / "pytest.out").write_text(output)
    figures = [line.strip() for line in output.splitlines() if line.strip().lstrip(".").startswith(FIGURE_PREFIXES)]
    summary = [line for line in output.splitlines() if re.match(r"^=* ?\d+ (passed|failed)", line)][-1:]
    return {
        "kill_rounds": kill_rounds,
        "redis_outage_seconds": outage_s,
        "exit_code": done.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "figures": [f.lstrip(".") for f in figures],
        "pytest": summary[0].strip() if summary else output[-2000:],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="model of the load and fuzz runs (default: the demo checkpoint)")
    p.add_argument("--load-limit", type=int, default=8)
    p.add_argument("--load-warmup", type=float, default=60.0, help="seconds before RSS is taken as the base (60)")
    p.add_argument("--load-at", type=float, default=20.0, help="seconds at the limit (20)")
    p.add_argument("--load-above", type=float, default=60.0, help="seconds above the limit (60)")
    p.add_argument("--max-rss-growth-mib", type=float, default=32.0, help="after the warm-up (32)")
    p.add_argument("--fuzz-examples", type=int, default=300, help="examples per operation and phase (300)")
    p.add_argument("--fuzz-seconds", type=int, default=120, help="schemathesis time budget: it repeats (120)")
    p.add_argument("--kill-rounds", type=int, default=20)
    p.add_argument("--redis-outage", type=int, default=10, help="seconds Redis stays down (10)")
    p.add_argument("--skip", nargs="*", default=[], choices=["load", "fuzz", "faults"])
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pha-soak-"))
    report: dict = {"machine": machine(), "workdir": str(workdir)}
    failed: list[str] = []
    if "load" not in args.skip:
        print("soak: load ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        figures = load.run(
            args.checkpoint,
            args.load_limit,
            4,
            args.load_warmup,
            args.load_at,
            args.load_above,
            workdir / "load" / "api.log",
        )
        figures["seconds"] = round(time.perf_counter() - started, 1)
        problems = load.check(figures, args.max_rss_growth_mib)
        report["load"] = {**figures, "verdict": problems or "ok"}
        failed += [f"load: {x}" for x in problems]
    if "fuzz" not in args.skip:
        print("soak: fuzz ...", file=sys.stderr, flush=True)
        (workdir / "fuzz").mkdir()
        result = fuzz.run(args.checkpoint, args.fuzz_examples, 0, workdir / "fuzz", args.fuzz_seconds)
        problems = fuzz.check(result)
        report["fuzz"] = {**{k: v for k, v in result.items() if k != "output_tail"}, "verdict": problems or "ok"}
        failed += [f"fuzz: {x}" for x in problems]
    if "faults" not in args.skip:
        print("soak: faults and security ...", file=sys.stderr, flush=True)
        (workdir / "faults").mkdir()
        result = faults(args.kill_rounds, args.redis_outage, workdir / "faults")
        report["faults"] = {**result, "verdict": "ok" if result["exit_code"] == 0 else "failed"}
        if result["exit_code"]:
            failed.append(f"faults: pytest exited {result['exit_code']}: {result['pytest']}")
    report["failed"] = failed
    write_json(args.output, report)
    for line in failed:
        print("FAIL:", line, file=sys.stderr)
    print(f"logs: {workdir}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
