"""Calibrated routing, measured through the HTTP app: in-task rows routed, out-of-distribution inputs turned away.

    python bench/routing.py --output bench/results/routing_demo_cpu.json

Sends, with no task named, the GLUE test rows (split seed 42, --max-eval per task: the rows docs/results.md
section 2 uses) and the out-of-distribution set of bench/ood.py to `POST /predict` of the app on a checkpoint
(default: the bundled demo, with the calibration `pha calibrate` fitted on its validation rows), and reports:
- GLUE rows: the share routed (route.fits), routing accuracy among those and over all rows, per task, and how
  well `route.confidence` is calibrated (expected calibration error, 10 bins);
- OOD inputs: the share answered "no task fits", per category and shape (raw / written as a template), for the
  "dev" half (where the threshold was chosen) and the "test" half (the figure to quote);
- the same at other thresholds (`--typicality`), recomputed from the typicality each response carries.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine, write_result  # noqa: E402
from bench.ood import ood_set  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "pha_core" / "assets" / "demo"


def ask(client, texts: list[str], batch: int) -> list[dict]:
    out = []
    for start in range(0, len(texts), batch):
        response = client.post("/predict", json={"inputs": texts[start : start + batch], "truncate": True})
        response.raise_for_status()
        out += response.json()["predictions"]
    return out


def kept(p: dict, threshold: float | None) -> bool:
    """Whether the server would route this prediction at `threshold` (None: as it answered)."""
    route = p["route"]
    if threshold is None or route["task"] is None or route["typicality"] is None:
        return route["fits"]
    return route["typicality"] >= threshold


def expected_calibration_error(confidences: list[float], correct: list[bool], bins: int = 10) -> float:
    groups: dict[int, list[tuple[float, bool]]] = defaultdict(list)
    for c, ok in zip(confidences, correct, strict=True):
        groups[min(int(c * bins), bins - 1)].append((c, ok))
    n = len(confidences)
    return sum(
        len(g) / n * abs(sum(c for c, _ in g) / len(g) - sum(ok for _, ok in g) / len(g)) for g in groups.values()
    )


def in_task_report(predictions: list[dict], tasks: list[str], threshold: float | None) -> dict:
    routed = [kept(p, threshold) for p in predictions]
    right = [p["route"]["task"] == t for p, t in zip(predictions, tasks, strict=True)]
    per_task = {}
    for task in dict.fromkeys(tasks):
        rows = [i for i, t in enumerate(tasks) if t == task]
        per_task[task] = {
            "routed": sum(routed[i] for i in rows) / len(rows),
            "accuracy": sum(right[i] for i in rows) / len(rows),
        }
    kept_rows = [i for i, r in enumerate(routed) if r]
    return {
        "rows": len(tasks),
        "routed": len(kept_rows) / len(tasks),
        "accuracy_all": sum(right) / len(tasks),
        "accuracy_routed": sum(right[i] for i in kept_rows) / max(1, len(kept_rows)),
        "per_task": per_task,
    }


def ood_report(predictions: list[dict], items, threshold: float | None) -> dict:
    report = {}
    for half in ("dev", "test"):
        rows = [i for i, item in enumerate(items) if item.half == half]
        refused = {i: not kept(predictions[i], threshold) for i in rows}
        by: dict[str, list[bool]] = defaultdict(list)
        for i in rows:
            by[f"{items[i].category}/{items[i].shape}"].append(refused[i])
        accepted_to = Counter(predictions[i]["route"]["task"] for i in rows if not refused[i])
        report[half] = {
            "rows": len(rows),
            "no_task_fits": sum(refused.values()) / len(rows),
            "by_category": {k: round(sum(v) / len(v), 3) for k, v in sorted(by.items())},
            "accepted_by_task": dict(accepted_to.most_common()),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEMO))
    p.add_argument("--max-eval", type=int, default=500, help="GLUE test rows per task (split seed 42)")
    p.add_argument("--batch", type=int, default=32, help="texts per request")
    p.add_argument("--typicality", type=float, nargs="*", default=[0.005, 0.01, 0.02, 0.03, 0.05])
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32", help="the app's PHA_PRECISION")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from fastapi.testclient import TestClient

    from pha_core.data import data_dir_from_env, load_splits
    from service.main import create_app
    from service.settings import Settings

    data_dir = data_dir_from_env()
    settings = Settings(checkpoint=args.checkpoint, redis_url="", log_level="WARNING", precision=args.precision)
    started = time.perf_counter()
    with TestClient(create_app(settings)) as client:
        tasks = client.app.state.pha.engine.tasks
        splits = load_splits(tasks, data_dir, seed=42, max_eval=args.max_eval)
        rows = [(e.input, t) for t in tasks for e in splits[t]["test"]]
        glue = ask(client, [text for text, _ in rows], args.batch)
        items = ood_set(data_dir)
        ood = ask(client, [item.text for item in items], args.batch)
        threshold = client.app.state.pha.pipeline.policy.min_typicality
    seconds = time.perf_counter() - started
    gold = [t for _, t in rows]
    result = {
        "machine": machine(),
        "checkpoint": Path(args.checkpoint).name,
        "served_threshold": threshold,
        "precision": args.precision,
        "seconds": round(seconds, 1),
        "served": {"glue_test": in_task_report(glue, gold, None), "ood": ood_report(ood, items, None)},
        "sweep": {
            str(t): {"glue_test": in_task_report(glue, gold, t), "ood": ood_report(ood, items, t)}
            for t in args.typicality
        },
    }
    confident = [(p["route"]["confidence"], p["route"]["task"] == t) for p, t in zip(glue, gold, strict=True)]
    confident = [(c, ok) for c, ok in confident if c is not None]
    if confident:
        result["confidence"] = {
            "rows_with_confidence": len(confident),
            "ece": expected_calibration_error([c for c, _ in confident], [ok for _, ok in confident]),
            "mean_confidence": sum(c for c, _ in confident) / len(confident),
            "accuracy": sum(ok for _, ok in confident) / len(confident),
        }
    write_result(args.output, result)
    served = result["served"]
    glue_served, ood_served = served["glue_test"], served["ood"]
    print(
        f"threshold {threshold}: GLUE test routed {glue_served['routed']:.3f}, accuracy among routed "
        f"{glue_served['accuracy_routed']:.3f} (all rows {glue_served['accuracy_all']:.3f}); OOD no-task-fits "
        f"dev {ood_served['dev']['no_task_fits']:.3f} test {ood_served['test']['no_task_fits']:.3f}"
    )
    for t, r in result["sweep"].items():
        print(
            f"  typicality >= {t}: routed {r['glue_test']['routed']:.3f} acc {r['glue_test']['accuracy_routed']:.3f}; "
            f"OOD refused dev {r['ood']['dev']['no_task_fits']:.3f} test {r['ood']['test']['no_task_fits']:.3f}"
        )
    print("OOD test by category:", served["ood"]["test"]["by_category"])
    if "confidence" in result:
        print("confidence:", {k: round(v, 4) for k, v in result["confidence"].items()})
    print(f"machine: {result['machine']}; {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
