"""Evaluation: per-task metrics with the task given and with the task retrieved (Eq. 10), and routing accuracy.

Each batch is encoded once; the decoder then runs with the gold task's adapters ("given") and, when the model
can route, with the retrieved prototype's adapters ("retrieved"), among the tasks whose templates the input is
written with (as the server routes: source.candidates_by_template). Routing accuracy is the share of held-out
inputs whose nearest prototype is their own task's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .label_prior import LabelPrior
from .metrics import score, task_metrics
from .model import PHAModel
from .scoring import AnswerSpace, rank, read_both_orders
from .source import candidates_by_template
from .tasks import Example, templates_of

DECODINGS = ("rank", "greedy")


@torch.inference_mode()
def predict_examples(
    model: PHAModel,
    examples: Sequence[Example],
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    decoding: str = "rank",
    prior: LabelPrior | None = None,
) -> dict[str, list]:
    """Outputs with the gold task ("given"), with the retrieved task ("retrieved"), and the retrieved names.

    decoding "rank" (the default) answers within each task's answer space (scoring.py: label words, STS-B's
    bins), so every output is valid for the task that answers it; "greedy" writes freely. A row routed to
    another task answers within that task's space, as the server does. `prior`: the label tasks' fitted
    offsets and temperatures (label_prior.py), as the server applies them; None: the decoder's probabilities as
    they are. Tasks read in both field orders (scoring.BOTH_ORDERS) are, as the server reads them.
    """
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
    model.eval()
    bb, cfg = model.backbone, model.config
    new_tokens = max_new_tokens or cfg.max_target_length
    ids_of: dict = {}

    def answers(texts: list[str], hidden, mask, task_ids, adapters, tasks: list[str]) -> list[str]:
        spaces = [prior.space_of(t) if prior else AnswerSpace.of_task(t) for t in tasks]
        if decoding == "greedy" or any(s is None for s in spaces):
            return [bb.decode_text(row) for row in model.greedy_decode(hidden, mask, adapters, new_tokens)]

        def read(rows: list[int], swapped: list[str]):
            index = torch.tensor(rows, device=model.device)
            h, m = model.encode(model.source(swapped), task_ids.index_select(0, index))
            part = [w.index_select(index) for w in adapters]
            return rank(model, h, m, part, [spaces[i] for i in rows], ids_of)

        scored = rank(model, hidden, mask, adapters, spaces, ids_of)
        return [s.output for s in read_both_orders(spaces, texts, scored, read)]

    templates = templates_of(model.tasks)
    given, retrieved, routes = [], [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        texts = [e.input for e in chunk]
        gold = model.task_ids([e.task for e in chunk])
        hidden, mask = model.encode(model.source(texts), gold)
        z = model.instance_vectors(hidden, mask) if model.retriever is not None else None
        given += answers(texts, hidden, mask, gold, model.decoder_adapters(gold, z), [e.task for e in chunk])
        if cfg.routes_by_prototype:
            allowed = candidates_by_template(texts, templates)
            picked = model.retrieve(z, top_k=1, allowed=allowed.to(model.device)).indices[:, 0]
            names = [model.tasks[i] for i in picked.tolist()]
            routes += names
            if torch.equal(picked, gold):
                retrieved += given[-len(chunk) :]
            else:
                retrieved += answers(texts, hidden, mask, picked, model.decoder_adapters(picked, z), names)
    return {"given": given, "retrieved": retrieved, "routes": routes}


def evaluate(
    model: PHAModel,
    splits: dict[str, Sequence[Example]],
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    decoding: str = "rank",
    prior: LabelPrior | None = None,
) -> dict:
    """Metrics per task (given / retrieved), averages (one figure per task) and routing accuracy."""
    results: dict[str, dict] = {}
    for task, examples in splits.items():
        if not examples:
            raise ValueError(f"no {task} examples to evaluate")
        out = predict_examples(model, examples, batch_size, max_new_tokens, decoding, prior)
        targets = [e.target for e in examples]
        entry: dict = {"n": len(examples), "given": task_metrics(task, out["given"], targets)}
        entry["given"]["score"] = score(task, entry["given"])
        # 1 means a constant predictor on this task (for STS-B, expectations over bins are rarely equal).
        entry["given_distinct"] = len(set(out["given"]))
        if out["retrieved"]:
            entry["retrieved"] = task_metrics(task, out["retrieved"], targets)
            entry["retrieved"]["score"] = score(task, entry["retrieved"])
            entry["routing_accuracy"] = sum(r == task for r in out["routes"]) / len(examples)
            entry["routed_to"] = {name: out["routes"].count(name) for name in sorted(set(out["routes"]))}
        entry["samples"] = [
            {"input": e.input[:120], "target": e.target, "output": o}
            for e, o in zip(examples[:3], out["given"][:3], strict=False)
        ]
        results[task] = entry
    average = {"given": _mean([r["given"]["score"] for r in results.values()])}
    if all("retrieved" in r for r in results.values()):
        average["retrieved"] = _mean([r["retrieved"]["score"] for r in results.values()])
        total = sum(r["n"] for r in results.values())
        average["routing_accuracy"] = sum(r["routing_accuracy"] * r["n"] for r in results.values()) / total
    return {"tasks": results, "average": average, "label_prior": prior is not None}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def format_table(report: dict) -> str:
    """A plain-text table of an `evaluate` report, for the terminal."""
    lines = [f"{'task':<8} {'n':>5}  {'given':>7}  {'retrieved':>9}  {'routing':>7}  metrics (given)"]
    for task, r in report["tasks"].items():
        retrieved = f"{r['retrieved']['score']:9.3f}" if "retrieved" in r else f"{'-':>9}"
        routing = f"{r['routing_accuracy']:7.3f}" if "routing_accuracy" in r else f"{'-':>7}"
        metrics = ", ".join(f"{k}={v:.3f}" for k, v in r["given"].items() if k != "score")
        lines.append(f"{task:<8} {r['n']:>5}  {r['given']['score']:7.3f}  {retrieved}  {routing}  {metrics}")
    avg = report["average"]
    lines.append(
        f"{'average':<8} {'':>5}  {avg['given']:7.3f}  "
        + (f"{avg['retrieved']:9.3f}  {avg['routing_accuracy']:7.3f}" if "retrieved" in avg else "")
    )
    return "\n".join(lines)
