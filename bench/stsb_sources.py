"""Where STS-B's rows are routed, by the corpus each pair comes from (the backbone issue's routed floor).

    python bench/stsb_sources.py --output bench/results/stsb_sources_demo_cpu.json

STS-B pools pairs from several sources (the `filename` column of its TSV files: MSRpar, MSRvid, headlines,
images, answers-forums, track5.en-en). MSRpar's pairs were drawn from the Microsoft Research Paraphrase Corpus,
the corpus MRPC's pairs come from, and both tasks read `sentence1: ... sentence2: ...`, so for those rows no
router that reads the text has anything to tell the two tasks apart with. This script routes the STS-B rows of
the validation and test splits (split seed 42, --max-eval per split: the rows docs/results.md section 2 uses)
as `pha eval` does (pha_core.evaluate.predict_examples, Eq. 10 among the tasks whose template fits) and reports,
per source: rows, where they were routed; and STS-B's score with the task given, routed, routed on the rows
of the sources other than MSRpar, and routed as it would be if every row of those other sources went to STS-B
(MSRpar's rows routed as they are: the most a router that cannot tell MSRpar from MRPC could give). A row
routed to another task answers in that task's label words, which the STS-B metric reads as -1.0
(pha_core/metrics.py, T5's rule): a few such rows weigh heavily on a correlation.
Not a test.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import write_result  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "pha_core" / "assets" / "demo"
SHARED_CORPUS = "MSRpar"  # STS-B's pairs from the corpus MRPC is drawn from


def sources(data_dir: Path) -> dict[tuple[str, str], str]:
    """(sentence1, sentence2) -> the source corpus, from STS-B's train and dev files."""
    found: dict[tuple[str, str], str] = {}
    for name in ("train.tsv", "dev.tsv"):
        with open(data_dir / "STS-B" / name, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                found.setdefault((row["sentence1"].strip(), row["sentence2"].strip()), row["filename"])
    return found


def stsb_score(outputs: list[str], targets: list[str]) -> float:
    from pha_core.metrics import score, task_metrics

    return round(score("stsb", task_metrics("stsb", outputs, targets)), 4)


def report(rows, out: dict, corpus_of: dict[tuple[str, str], str]) -> dict:
    names = [corpus_of.get(tuple(e.fields), "unknown") for e in rows]
    targets = [e.target for e in rows]
    by_source: dict[str, Counter] = defaultdict(Counter)
    for name, route in zip(names, out["routes"], strict=True):
        by_source[name][route] += 1
    other = [i for i, name in enumerate(names) if name != SHARED_CORPUS]

    def without_shared(values: list[str]) -> list[str]:
        return [values[i] for i in other]

    # The most a router could give without telling MSRpar from MRPC: every other row answered by STS-B.
    bound = [out["retrieved"][i] if name == SHARED_CORPUS else out["given"][i] for i, name in enumerate(names)]

    return {
        "rows": len(rows),
        "routes_by_source": {name: dict(counts.most_common()) for name, counts in sorted(by_source.items())},
        "routed_to_stsb": round(out["routes"].count("stsb") / len(rows), 4),
        "given": stsb_score(out["given"], targets),
        "routed": stsb_score(out["retrieved"], targets),
        "routed_if_every_other_source_routed_right": stsb_score(bound, targets),
        f"routed_without_{SHARED_CORPUS}": stsb_score(without_shared(out["retrieved"]), without_shared(targets)),
        f"given_without_{SHARED_CORPUS}": stsb_score(without_shared(out["given"]), without_shared(targets)),
        f"routed_to_stsb_without_{SHARED_CORPUS}": round(
            sum(out["routes"][i] == "stsb" for i in other) / max(len(other), 1), 4
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=str(DEMO))
    parser.add_argument("--data-dir", default=None, help="default: $PHA_DATA_DIR")
    parser.add_argument("--max-eval", type=int, default=500)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    from pha_core.checkpoint import load_checkpoint
    from pha_core.data import data_dir_from_env, load_splits
    from pha_core.evaluate import predict_examples
    from pha_core.label_prior import LabelPrior

    data_dir = Path(args.data_dir) if args.data_dir else data_dir_from_env()
    model = load_checkpoint(args.checkpoint)
    prior = LabelPrior.load(args.checkpoint)  # as `pha eval` serves test rows (STS-B's bins take no offsets)
    corpus_of = sources(data_dir)
    splits = load_splits(["stsb"], data_dir, max_eval=args.max_eval)["stsb"]
    result = {"checkpoint": Path(args.checkpoint).name, "max_eval": args.max_eval}
    for split in ("validation", "test"):
        rows = splits[split]
        result[split] = report(rows, predict_examples(model, rows, prior=prior), corpus_of)
        r = result[split]
        print(f"{split}: given {r['given']:.3f}, routed {r['routed']:.3f} ({r['routed_to_stsb']:.3f} to STS-B)")
        for name, counts in r["routes_by_source"].items():
            print(f"  {name:<16} {sum(counts.values()):>4} rows  {counts}")
        print(
            f"  without {SHARED_CORPUS}: given {r[f'given_without_{SHARED_CORPUS}']:.3f}, routed "
            f"{r[f'routed_without_{SHARED_CORPUS}']:.3f} "
            f"({r[f'routed_to_stsb_without_{SHARED_CORPUS}']:.3f} to STS-B); "
            f"routed if every other source were routed right: {r['routed_if_every_other_source_routed_right']:.3f}"
        )
    if args.output:
        write_result(args.output, result)
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
