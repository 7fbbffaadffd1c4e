"""Could another router on the same features route better than Eq. 10? (the backbone issue's routed floor)

    python bench/router_probe.py --output bench/results/router_probe_demo_cpu.json

On a checkpoint (default: the bundled demo), embeds --n-train rows of each task's training sample and its test
rows (split seed 42, --max-eval per task: the rows docs/results.md section 2 uses) once, as the served pass
does, and routes the test rows (each among the tasks whose template it is written in, as the server does) by:
- Eq. 10: z = G(mean(h)), the nearest trained prototype by cosine (what `pha eval` and the server do);
- a logistic regression on G's input mean(h) (the encoder's states with the shared adapters, mean-pooled),
  C chosen by 5-fold cross-validation on the training rows: the strongest linear router on what G reads;
- a logistic regression on z (C likewise): whether the prototypes are the best keys for G's output;
- 10-nearest-neighbour vote over the training rows' mean(h) by cosine.
Reports routing accuracy per task and over all rows, with the machine. Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine, write_result  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "pha_core" / "assets" / "demo"
K_NEIGHBOURS = 10


def features(model, examples, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(mean(h), z) of every example, as float32 arrays."""
    import torch

    from pha_core.retriever import masked_mean

    pooled, zs = [], []
    with torch.inference_mode():
        for start in range(0, len(examples), batch):
            hidden, mask = model.encode(model.source([e.input for e in examples[start : start + batch]]))
            pooled.append(masked_mean(hidden, mask).float())
            zs.append(model.instance_vectors(hidden, mask).float())
    return torch.cat(pooled).numpy(), torch.cat(zs).numpy()


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fitted_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """Decision scores of a logistic regression with C chosen by 5-fold CV."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV

    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")  # an attribute rename, not ours
    probe = LogisticRegressionCV(Cs=[0.1, 1.0, 10.0], cv=5, max_iter=3000).fit(train_x, train_y)
    return probe.decision_function(test_x)


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_tasks: int) -> np.ndarray:
    """Votes of each test row's K nearest training rows (cosine), per task."""
    sims = unit(test_x) @ unit(train_x).T
    nearest = np.argsort(-sims, axis=1)[:, :K_NEIGHBOURS]
    votes = np.zeros((len(test_x), n_tasks))
    for row, neighbours in enumerate(nearest):
        np.add.at(votes[row], train_y[neighbours], 1.0)
    return votes  # a tie goes to the first allowed task in the checkpoint's order


def accuracy(scores: np.ndarray, allowed: np.ndarray, gold: np.ndarray, tasks: list[str]) -> dict:
    picked = np.where(allowed, scores, -np.inf).argmax(axis=1)
    per_task = {t: round(float(np.mean(picked[gold == i] == i)), 3) for i, t in enumerate(tasks)}
    return {"all": round(float(np.mean(picked == gold)), 4), "per_task": per_task}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEMO))
    p.add_argument("--n-train", type=int, default=1500, help="training rows per task the fitted routers see")
    p.add_argument("--max-eval", type=int, default=500, help="test rows per task (split seed 42)")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pha_core.checkpoint import load_checkpoint
    from pha_core.data import data_dir_from_env, load_splits
    from pha_core.retriever import cosine_scores
    from pha_core.source import candidates_by_template
    from pha_core.tasks import templates_of
    from pha_core.train import recipe_of

    model = load_checkpoint(args.checkpoint).eval()
    tasks = model.tasks
    recipe = recipe_of(args.checkpoint)
    splits = load_splits(
        tasks,
        data_dir_from_env(),
        seed=recipe.get("split_seed", 42),
        n_train=args.n_train,
        max_eval=args.max_eval,
        sample_seed=recipe.get("seed", 42),
    )
    train = [e for t in tasks for e in splits[t]["train"]]
    test = [e for t in tasks for e in splits[t]["test"]]
    train_y = np.array([tasks.index(e.task) for e in train])
    gold = np.array([tasks.index(e.task) for e in test])
    allowed = candidates_by_template([e.input for e in test], templates_of(tasks)).numpy()
    train_h, train_z = features(model, train)
    test_h, test_z = features(model, test)

    import torch

    eq10 = cosine_scores(torch.from_numpy(test_z), model.prototypes.weight.detach().float()).numpy()
    routers = {
        "eq10_prototypes": eq10,
        "logreg_on_mean_h": fitted_scores(train_h, train_y, test_h),
        "logreg_on_z": fitted_scores(train_z, train_y, test_z),
        f"knn{K_NEIGHBOURS}_on_mean_h": knn_scores(train_h, train_y, test_h, len(tasks)),
    }
    result = {
        "machine": machine(),
        "checkpoint": Path(args.checkpoint).name,
        "n_train": args.n_train,
        "max_eval": args.max_eval,
        "routing_accuracy": {name: accuracy(s, allowed, gold, tasks) for name, s in routers.items()},
    }
    print(f"{'router':<22} {'all':>6}  " + " ".join(f"{t:>6}" for t in tasks))
    for name, acc in result["routing_accuracy"].items():
        print(f"{name:<22} {acc['all']:6.3f}  " + " ".join(f"{acc['per_task'][t]:6.3f}" for t in tasks))
    write_result(args.output, result)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
