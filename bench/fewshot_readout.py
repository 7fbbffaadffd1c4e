"""Do PHA's own states carry an unseen task better than the frozen probe's features? A few-shot readout test.

    python bench/fewshot_readout.py --tasks cb boolq --k 16 --seeds 0 1 2 \
        --output bench/results/fewshot_readout_k16_cpu.json

The few-shot floors (CB >= 64, BoolQ >= 68.7 at k = 16) are met by neither adaptation mode, while a logistic
regression on the frozen encoder's embeddings (the probe) gets CB 69. This asks whether the probe's learner on
PHA's representations would do better than both, i.e. whether a "readout" adaptation mode is worth building.
On the same k shots (bench/adapt.py's draws) and held-out rows, the same cross-validated logistic regression
(bench/baselines.py's grid and folds) is fitted on:
- `memory_mean`: the memory the decoder reads (encoder with the shared adapters), mean-pooled, L2-normalised;
- `decoder_source`: the decoder's last state at the start token (what label scoring projects onto the label
  words) with the adapters generated from the source prototype (the trained task nearest to the shots' z);
- `decoder_all`: that state under every trained task's adapters, concatenated;
- `probe`: the frozen probe itself (pair tasks: [u, v, |u-v|, u*v] of the fields embedded apart).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baselines import SentenceEncoder, fit_predict, probe  # noqa: E402
from bench.machine import write_result  # noqa: E402
from pha_core.adapt import _encode, choose_source  # noqa: E402
from pha_core.checkpoint import load_checkpoint  # noqa: E402
from pha_core.data import data_dir_from_env, load_splits, low_data  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "pha_core" / "assets" / "demo"
BATCH = 32


@torch.no_grad()
def pha_features(model, examples, source: int) -> dict[str, np.ndarray]:
    """The three PHA representations of `examples` (module docstring), [n, dim] each."""
    prototypes = model.prototypes.weight.detach()
    parts: dict[str, list[torch.Tensor]] = {"memory_mean": [], "decoder_source": [], "decoder_all": []}
    for start in range(0, len(examples), BATCH):
        chunk = examples[start : start + BATCH]
        batch, (hidden, mask), _ = _encode(model, chunk)
        first = batch.decoder_input_ids[:, :1]  # the start token
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        parts["memory_mean"].append((hidden * weights).sum(1) / weights.sum(1))
        rows = torch.zeros(len(chunk), dtype=torch.long, device=hidden.device)
        states = []
        for t in range(prototypes.size(0)):
            layers = model.adapters_from_condition(prototypes[t].view(1, -1))
            with model.decoder_context.use([w.index_select(rows) for w in layers]):
                state, _ = model.backbone.decode_states(first, hidden, mask)
            states.append(state[:, 0])
        parts["decoder_source"].append(states[source])
        parts["decoder_all"].append(torch.cat(states, dim=1))
    out = {name: torch.cat(chunks).float() for name, chunks in parts.items()}
    for name in ("memory_mean", "decoder_source"):
        out[name] = torch.nn.functional.normalize(out[name], dim=-1)
    return {name: value.cpu().numpy() for name, value in out.items()}


def accuracy(predictions: list[str], gold: np.ndarray) -> float:
    return float((np.array(predictions) == gold).mean())


def mean_spread(values: list[float]) -> list[float]:
    """[mean, sample standard deviation] in percent (spread 0 for one seed)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return [round(100 * statistics.mean(values), 1), round(100 * spread, 1)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEMO))
    p.add_argument("--tasks", nargs="+", default=["cb", "boolq"])
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-eval", type=int, default=300)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    model = load_checkpoint(args.checkpoint).eval()
    splits = load_splits(args.tasks, data_dir_from_env(), max_eval=args.max_eval)
    encoder = SentenceEncoder()
    runs = []
    for task in args.tasks:
        heldout = (splits[task]["test"] + splits[task]["validation"])[: args.max_eval]  # as bench/adapt.py
        gold = np.array([e.target for e in heldout])
        for seed in args.seeds:
            shots = low_data(splits[task]["train"], n=args.k, seed=seed)
            targets = [e.target for e in shots]
            with torch.no_grad():
                _, _, z = _encode(model, shots)
            source, _ = choose_source(z, model.prototypes.weight.detach())
            train, test = pha_features(model, shots, source), pha_features(model, heldout, source)
            scores = {
                name: accuracy(fit_predict(train[name], targets, test[name], False, max_iter=3000), gold)
                for name in train
            }
            scores["probe"] = accuracy(probe(encoder, shots, heldout), gold)
            runs.append({"task": task, "k": args.k, "seed": seed, "source": model.tasks[source], **scores})
            print(task, seed, runs[-1], flush=True)
    names = ["memory_mean", "decoder_source", "decoder_all", "probe"]
    summary = {}
    for task in args.tasks:
        rows = [r for r in runs if r["task"] == task]
        summary[task] = {n: mean_spread([r[n] for r in rows]) for n in names}
        print(task, " ".join(f"{n} {m:.1f} ± {s:.1f}" for n, (m, s) in summary[task].items()), flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "checkpoint")}
    settings["checkpoint"] = Path(args.checkpoint).name
    write_result(args.output, {"settings": settings, "runs": runs, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
