"""Pre-training the warm-started decoder to read its frozen encoder (T5-style span corruption, then distillation).

PHA assumes a pre-trained encoder-decoder whose decoder already knows how to read the encoder (T5); only the PHA
parts then learn from the labelled examples. No such checkpoint exists for an encoder-only model like
all-MiniLM-L6-v2, so `pha pretrain` makes one, once, from unlabelled text:

    encoder (frozen, no adapters) reads the text with ~15% of its tokens cut out in spans of mean length 3,
    each span replaced by one [MASK];
    decoder (trained) writes the spans back: "[MASK] span_1 [MASK] span_2 ... [SEP]".

That is T5's objective (Raffel et al. 2020, 15% noise, mean span 3) with BERT's [MASK] as the only sentinel,
so it works for every BERT-family tokenizer; spans come back in order, so one sentinel is enough. The text is
the *training* splits' inputs of the tasks below, formatted with their field names (what the encoder reads in
PHA training) and never a validation or test row; MNLI (its stand-in train split is carved from
dev_matched) and BoolQ (only a validation file exists) are left out so no later split can meet a pre-training row.

A second stage (session 23, what the shipped decoder went through) teaches the decoder what the encoder knows,
without a label; two options, 0 by default, which is T5's recipe alone:

- similarity rows (`similarity_share` of each batch): a two-field training row (sentence pair, question and
  answer, premise and hypothesis), half the time with its second field swapped for another row's, written in
  its task's template as PHA reads it; the target is the frozen encoder's own cosine of the two fields embedded
  apart (mean-pooled, as sentence-transformers pools), clipped to [0, 1] and written on STS-B's 0-5 scale in
  steps of 0.2 ("3.8"). The encoder was trained to make that cosine good; the decoder reads the pair jointly
  and, without this, meets the skill only through a task's labelled rows;
- the start-state readout (`embedding_weight`): a linear map, trained alongside and then dropped, from the
  decoder's state after its start token (the state rank scoring reads labels from) to the encoder's mean-pooled
  embedding of the text it read (loss 1 - cosine): that state must carry the sentence embedding, which a
  linear probe on the frozen encoder shows to be what a few labelled rows can be read from. With
  `readout_fields` (session 24) a similarity row's state reads out the probe's own features of the pair
  instead, [u, v, |u-v|, u*v] of the two fields embedded apart (the map is 4x wider; 1 - cosine per block,
  averaged): the joint text's mean is the weak representation of a pair.

The result is only the decoder's tensors (fp16, ~10 MB for 2 layers), written as `decoder.safetensors` with
`pretrain.json` (recipe, loss history, encoder fingerprint) beside it; `BackboneConfig.decoder_init` loads it.
Resumable (`--resume`), deterministic per (seed, step), unchanged on a GPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import get_linear_schedule_with_warmup

from .buckets import length_buckets
from .config import BackboneConfig
from .files import write_atomic
from .losses import token_cross_entropy
from .precision import autocast, resolve_precision
from .recipes import PretrainConfig
from .retriever import masked_mean
from .runtime import resolve_device

DECODER_FILE = "decoder.safetensors"
PRETRAIN_META = "pretrain.json"
TRAINER_FILE = "pretrain_state.pt"
ASSETS = Path(__file__).resolve().parent / "assets" / "decoders"
# The split seed of every recipe in this project: the train split of seed 42 holds no validation/test row.
SPLIT_SEED = 42


class PretrainError(ValueError):
    """A decoder file that is missing or does not fit the backbone; the message says what to change."""


def decoder_slug(encoder: str, layers: int) -> str:
    return f"{Path(encoder).name}-d{layers}"


def shipped_decoder(encoder: str, layers: int) -> Path | None:
    """The pre-trained decoder the package ships for this encoder and depth, if any."""
    path = ASSETS / decoder_slug(encoder, layers) / DECODER_FILE
    return path if path.is_file() else None


def embedding_fingerprint(embedding: torch.Tensor) -> str:
    """Short hash of the encoder's word embeddings: a decoder only fits the encoder it was trained on."""
    return hashlib.sha256(embedding.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def resolve_decoder_file(cfg: BackboneConfig) -> Path:
    """The file `cfg.decoder_init` names ("pretrained" -> the shipped one)."""
    if cfg.decoder_init == "pretrained":
        path = shipped_decoder(cfg.name, cfg.decoder_layers)
        if path is None:
            raise PretrainError(
                f"no pre-trained decoder ships for {cfg.name!r} with {cfg.decoder_layers} layers: build one with "
                f"`pha pretrain --encoder {cfg.name} --decoder-layers {cfg.decoder_layers}` and pass its "
                "decoder.safetensors as decoder_init, or set decoder_init to 'warm_start'"
            )
        return path
    path = Path(str(cfg.decoder_init))
    if path.is_dir():
        path = path / DECODER_FILE
    if not path.is_file():
        raise PretrainError(f"decoder_init {cfg.decoder_init!r}: no such file; give a decoder.safetensors path")
    return path


def read_decoder(path: Path, fingerprint: str) -> dict[str, torch.Tensor]:
    """The decoder tensors of a `pha pretrain` file, refused when made for another encoder."""
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as fh:  # the safetensors header carries the metadata
            header_len = int.from_bytes(fh.read(8), "little")
            meta = json.loads(fh.read(header_len)).get("__metadata__", {})
    except Exception as exc:  # safetensors raises its own types for corrupt files
        raise PretrainError(f"cannot read decoder file {path}: {exc}") from exc
    if meta.get("encoder_fingerprint") != fingerprint:
        raise PretrainError(
            f"decoder file {path} was pre-trained on another encoder (fingerprint "
            f"{meta.get('encoder_fingerprint')!r}, this encoder {fingerprint!r}); rebuild it with `pha pretrain`"
        )
    return tensors


# --------------------------------------------------------------------------------------------- objective
def _partition(total: int, parts: int, rng: random.Random) -> list[int]:
    """`total` split into `parts` positive integers, uniformly at random."""
    cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def span_corruption(
    ids: Sequence[int], rng: random.Random, mask_id: int, noise_density: float = 0.15, mean_span: float = 3.0
) -> tuple[list[int], list[int]]:
    """T5's span corruption of token ids (no specials): (source with [MASK] per span, target of the spans).

    Kept and noise spans alternate, starting with a kept one (as in T5's random_spans_noise_mask).
    """
    n = len(ids)
    if n < 2:
        return list(ids), []
    n_noise = min(n - 1, max(1, round(n * noise_density)))
    n_spans = max(1, min(n_noise, n - n_noise, round(n_noise / mean_span)))
    noise = _partition(n_noise, n_spans, rng)
    keep = _partition(n - n_noise, n_spans, rng)
    source: list[int] = []
    target: list[int] = []
    pos = 0
    for k, m in zip(keep, noise, strict=True):
        source += ids[pos : pos + k]
        pos += k
        source.append(mask_id)
        target += [mask_id, *ids[pos : pos + m]]
        pos += m
    return source, target


def pretrain_pairs(cfg: PretrainConfig) -> list[tuple[str, str, str]]:
    """(template, first field, second field) of every two-field training row of `cfg.tasks` (split seed 42)."""
    from .data import data_dir_from_env, load_splits
    from .tasks import TASKS

    data_dir = Path(cfg.data_dir) if cfg.data_dir else data_dir_from_env()
    splits = load_splits(cfg.tasks, data_dir, seed=SPLIT_SEED)
    return [
        (TASKS[task].template, *e.fields)
        for task in cfg.tasks
        for e in splits[task]["train"]
        if len(e.fields) == 2 and all(e.fields)
    ]


# What the frozen probe reads of a pair (bench/baselines.py), in its order: the start-state readout's blocks.
PAIR_BLOCKS = ("u", "v", "|u-v|", "u*v")


def pair_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[n, 4, d]: PAIR_BLOCKS of the fields' embeddings u, v [n, d]."""
    return torch.stack([u, v, (u - v).abs(), u * v], dim=1)


def similarity_target(cosine: float) -> str:
    """The encoder's cosine of two fields as a similarity word: clipped to [0, 1], on STS-B's 0-5 scale."""
    from .tasks import TASKS

    return TASKS["stsb"].target(round(5.0 * min(1.0, max(0.0, cosine)), 6))


def pretrain_texts(cfg: PretrainConfig) -> list[str]:
    """The lines of `cfg.text_file`, or the training splits' inputs of `cfg.tasks` (split seed 42)."""
    from .data import data_dir_from_env, load_splits

    if cfg.text_file:
        path = Path(cfg.text_file)
        if not path.is_file():
            raise PretrainError(f"text_file {cfg.text_file!r} not found; give a UTF-8 file with one text per line")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    data_dir = Path(cfg.data_dir) if cfg.data_dir else data_dir_from_env()
    splits = load_splits(cfg.tasks, data_dir, seed=SPLIT_SEED)
    return [e.input for task in cfg.tasks for e in splits[task]["train"]]


# ----------------------------------------------------------------------------------------------- trainer
class Pretrainer:
    """Trains the decoder of a MiniLM backbone by span corruption; resumable, rank-free (one process)."""

    def __init__(self, cfg: PretrainConfig, resume: bool = False, progress: bool = True) -> None:
        from .backbones import MiniLMBackbone, _quiet_transformers

        self.cfg, self.progress = cfg, progress
        self.device = torch.device(resolve_device(cfg.device))
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.output = Path(cfg.output)
        with _quiet_transformers():
            self.backbone = MiniLMBackbone(cfg.backbone())
        self.backbone.set_trainable("all")
        self.backbone.to(self.device)
        # The encoder is frozen and never sees a gradient here: no dropout (27% of a CPU step was its random
        # masks) and, in bf16, weights cast once rather than by autocast on every call.
        self.fingerprint = embedding_fingerprint(self.backbone.word_embeddings())  # of the float32 weights
        self.encoder_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.backbone.encoder.to(self.encoder_dtype)
        self.backbone.train()
        self.backbone.encoder.eval()
        tok = self.backbone.tokenizer
        if tok.mask_token_id is None:
            raise PretrainError(f"tokenizer of {cfg.encoder!r} has no mask token; span corruption needs one")
        texts = pretrain_texts(cfg)
        if not texts:
            raise PretrainError(f"no training text in {cfg.text_file or cfg.tasks}")
        body = cfg.max_source_length - 2  # room for [CLS] and [SEP]
        self.rows = [ids[:body] for ids in tok(texts, add_special_tokens=False, truncation=False).input_ids if ids]
        self.pairs: dict[str, list[tuple[str, str]]] = {}  # template -> its rows' (first, second) fields
        if cfg.similarity_share > 0:
            if cfg.text_file:
                raise PretrainError("similarity rows need the tasks' two-field rows: drop text_file or the share")
            for template, first, second in pretrain_pairs(cfg):
                self.pairs.setdefault(template, []).append((first, second))
            if not self.pairs:
                raise PretrainError(f"no two-field training rows in {cfg.tasks} for similarity rows")
        # A template is drawn in proportion to its rows, then one of its rows.
        self.templates = sorted(self.pairs)
        self.template_weights = [len(self.pairs[t]) for t in self.templates]
        self.n_similarity = round(cfg.batch_size * cfg.similarity_share)
        # The start-state readout (embedding_weight > 0): a linear map from the decoder's state after its start
        # token, the state rank scoring reads, to the encoder's mean-pooled embedding of what it read. Trained
        # with the decoder and dropped after: it only asks that state to carry the sentence embedding.
        self.width = width = self.backbone.encoder.config.hidden_size
        blocks = len(PAIR_BLOCKS) if cfg.readout_fields else 1
        self.readout = torch.nn.Linear(width, blocks * width).to(self.device) if cfg.embedding_weight > 0 else None
        self.params = [p for p in self.backbone.parameters() if p.requires_grad]
        self.params += list(self.readout.parameters()) if self.readout is not None else []
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, cfg.warmup_steps, cfg.steps)
        self.step = 0
        self.history: list[dict[str, float]] = []
        state_file = self.output / TRAINER_FILE
        if resume and state_file.is_file():
            self._restore(torch.load(state_file, weights_only=True))

    # ------------------------------------------------------------------------------------ batches
    def batch(self, step: int) -> list[tuple[list[int], list[int]]]:
        """The (source, target) pairs of `step`: a pure function of (seed, step), so resuming replays nothing."""
        rng = random.Random(f"pha-pretrain:{self.cfg.seed}:{step}")  # noqa: S311 (seeded corruption)
        tok = self.backbone.tokenizer
        pairs = []
        n_spans = self.cfg.batch_size - self.n_similarity
        for i in rng.sample(range(len(self.rows)), min(n_spans, len(self.rows))):
            source, target = span_corruption(
                self.rows[i], rng, tok.mask_token_id, self.cfg.noise_density, self.cfg.mean_span
            )
            pairs.append(([tok.cls_token_id, *source, tok.sep_token_id], [*target, self.backbone.eos_token_id]))
        return pairs

    def similarity_rows(self, step: int) -> list[tuple[str, str, str]]:
        """`step`'s (template, first, second) rows; half of them with the second field of another row of the same
        template, so the targets span the scale (a task's own pairs are mostly related)."""
        if not self.pairs:
            return []
        rng = random.Random(f"pha-pretrain-similarity:{self.cfg.seed}:{step}")  # noqa: S311
        rows = []
        for template in rng.choices(self.templates, weights=self.template_weights, k=self.n_similarity):
            first, second = rng.choice(self.pairs[template])
            if rng.random() < 0.5:
                second = rng.choice(self.pairs[template])[1]
            rows.append((template, first, second))
        return rows

    @torch.no_grad()
    def teacher_fields(self, firsts: list[str], seconds: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen encoder's embeddings u, v of each two fields, embedded apart, mean-pooled and L2-normalised
        (its own use), [n, d] each."""
        tok = self.backbone.tokenizer
        enc = tok(
            firsts + seconds, padding=True, truncation=True, max_length=self.cfg.max_source_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.backbone.encode(enc["input_ids"], enc["attention_mask"]).float()
        pooled = torch.nn.functional.normalize(masked_mean(hidden, enc["attention_mask"]), dim=-1)
        return pooled[: len(firsts)], pooled[len(firsts) :]

    def similarity_batch(self, step: int) -> tuple[list[tuple[list[int], list[int]]], torch.Tensor | None]:
        """(source, target) ids of `step`'s similarity rows (the joint text, the encoder's similarity word) and,
        with `readout_fields`, each row's readout target [n, 4, d]: PAIR_BLOCKS of its fields' u, v."""
        from .tasks import fill_template, template_fields

        rows = self.similarity_rows(step)
        if not rows:
            return [], None
        tok = self.backbone.tokenizer
        u, v = self.teacher_fields([r[1] for r in rows], [r[2] for r in rows])
        cosines = (u * v).sum(-1).tolist()
        texts = [fill_template(t, dict(zip(template_fields(t), (a, b), strict=True))) for t, a, b in rows]
        sources = tok(texts, truncation=True, max_length=self.cfg.max_source_length).input_ids
        targets = tok([similarity_target(c) for c in cosines], add_special_tokens=False).input_ids
        pairs = [(s, [*t, self.backbone.eos_token_id]) for s, t in zip(sources, targets, strict=True)]
        return pairs, (pair_features(u, v) if self.cfg.readout_fields else None)

    def _tensors(self, pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        bb = self.backbone
        width = max(len(s) for s, _ in pairs)
        t_width = max(len(t) for _, t in pairs)
        ids = torch.full((len(pairs), width), bb.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        labels = torch.full((len(pairs), t_width), -100, dtype=torch.long)
        dec_in = torch.full((len(pairs), t_width), bb.pad_token_id, dtype=torch.long)
        for row, (source, target) in enumerate(pairs):
            ids[row, : len(source)] = torch.tensor(source)
            mask[row, : len(source)] = 1
            labels[row, : len(target)] = torch.tensor(target)
            dec_in[row, 0] = bb.decoder_start_token_id
            dec_in[row, 1 : len(target)] = torch.tensor(target[:-1])
        tensors = {"ids": ids, "mask": mask, "labels": labels, "dec_in": dec_in}
        return {k: v.to(self.device) for k, v in tensors.items()}

    # --------------------------------------------------------------------------------------- step
    def _losses(
        self, pairs: list[tuple[list[int], list[int]]], features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | float, int, torch.Tensor | float]:
        """Summed token CE of the decoder writing each target from its source, the number of tokens, and the
        summed start-state readout loss (0 without a readout): 1 - cosine to the mean of the encoder states read,
        or, given `features` [n, blocks, d], the mean over blocks of 1 - cosine to each."""
        ce_sum, n_tokens, readout_sum = 0.0, 0, 0.0
        for bucket in length_buckets([len(s) for s, _ in pairs], self.cfg.token_budget):
            t = self._tensors([pairs[i] for i in bucket])
            with torch.no_grad():  # the encoder is frozen: no graph, no backward through it
                hidden = self.backbone.encode(t["ids"], t["mask"]).float()
            states, _ = self.backbone.decode_states(t["dec_in"], hidden, t["mask"])
            ce_sum = ce_sum + token_cross_entropy(self.backbone.lm_head(states), t["labels"], reduction="sum")
            n_tokens += int((t["labels"] != -100).sum())
            if self.readout is None:
                continue
            guess = self.readout(states[:, 0].float()).view(len(bucket), -1, self.width)
            if features is None:  # block 0: the sentence embedding of what it read
                target, guess = masked_mean(hidden, t["mask"]).unsqueeze(1), guess[:, :1]
            else:
                target = features[torch.tensor(bucket, device=features.device)]
            cosine = torch.nn.functional.cosine_similarity(guess, target, dim=-1)  # [rows, blocks]
            readout_sum = readout_sum + (1 - cosine).mean(-1).sum()
        return ce_sum, n_tokens, readout_sum

    def train_step(self, step: int) -> dict[str, float]:
        with autocast(self.precision, self.device):
            spans = self.batch(step)
            span_ce, span_tokens, span_readout = self._losses(spans)
            similarity, features = self.similarity_batch(step)
            sim_ce, sim_tokens, sim_readout = self._losses(similarity, features) if similarity else (0.0, 0, 0.0)
        n_tokens = span_tokens + sim_tokens
        loss = (span_ce + sim_ce) / max(1, n_tokens)
        readout = (span_readout + sim_readout) / (len(spans) + len(similarity))
        (loss + self.cfg.embedding_weight * readout).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        row = {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "target_tokens": n_tokens}
        if self.readout is not None:
            row["readout_loss"] = float(torch.as_tensor(readout).detach())
        if similarity:
            row["span_loss"] = float(torch.as_tensor(span_ce).detach()) / max(1, span_tokens)
            row["similarity_loss"] = float(torch.as_tensor(sim_ce).detach()) / max(1, sim_tokens)
        return row

    def run(self, until: int | None = None) -> dict[str, Any]:
        """Train to `cfg.steps` (or stop after step `until`, saved, as an interrupted run would be)."""
        from tqdm.auto import tqdm

        stop = self.cfg.steps if until is None else min(until, self.cfg.steps)
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not self.progress, desc="pha pretrain")
        window: list[dict[str, float]] = []
        started, seen = time.perf_counter(), 0
        while self.step < stop:
            window.append(self.train_step(self.step))
            self.step += 1
            seen += self.cfg.batch_size
            bar.update(1)
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                row = {k: sum(r[k] for r in window) / len(window) for k in window[0]}
                row.update(step=self.step, lr=self.scheduler.get_last_lr()[0])
                row["examples_per_s"] = seen / (time.perf_counter() - started)
                self.history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", ex_s=f"{row['examples_per_s']:.1f}")
                window = []
            if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < stop:
                self.save()
        bar.close()
        self.save()
        return {"history": self.history, "seconds": time.perf_counter() - started}

    # -------------------------------------------------------------------------------------- files
    def decoder_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.backbone.decoder_state().items()}

    def save(self) -> None:
        """Decoder (fp16) + pretrain.json + resumable state, each written atomically."""
        self.output.mkdir(parents=True, exist_ok=True)
        fingerprint = self.fingerprint
        tensors = {k: v.half() for k, v in self.decoder_tensors().items()}
        meta = {"encoder_fingerprint": fingerprint, "encoder": Path(self.cfg.encoder).name}
        meta.update(decoder_layers=str(self.cfg.decoder_layers), steps_done=str(self.step))
        write_atomic(self.output / DECODER_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        recent = self.history[-max(1, len(self.history) // 10) :]
        summary = {
            "recipe": asdict(self.cfg) | {"output": Path(self.cfg.output).name, "data_dir": None} | self._start(),
            "steps_done": self.step,
            "rows": len(self.rows),
            "similarity_pairs": sum(len(rows) for rows in self.pairs.values()),
            "encoder_fingerprint": fingerprint,
            "precision": self.precision,
            "first_loss": self.history[0]["loss"] if self.history else math.nan,
            "last_loss": sum(r["loss"] for r in recent) / len(recent) if recent else math.nan,
            "history": self.history,
        }
        write_atomic(self.output / PRETRAIN_META, lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "decoder": self.decoder_tensors(),  # float32, so a resumed run continues exactly
            "history": json.dumps(self.history),
            "rng": torch.get_rng_state(),  # decoder dropout: a resumed run draws the masks it would have
        }
        if self.readout is not None:
            state["readout"] = self.readout.state_dict()
        write_atomic(self.output / TRAINER_FILE, lambda tmp: torch.save(state, tmp))

    def _start(self) -> dict[str, str | None]:
        """Where the decoder started, without the machine's folders (pretrain.json ships)."""
        start = self.cfg.init_from
        return {"init_from": f"{Path(start).parent.name}/{Path(start).name}" if start else None}

    def _restore(self, state: dict[str, Any]) -> None:
        self.backbone.load_decoder_state(state["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        if self.readout is not None:
            self.readout.load_state_dict(state["readout"])
        self.history = json.loads(state["history"])
        if "rng" in state:  # states written before the RNG was saved resume with a fresh dropout stream
            torch.set_rng_state(state["rng"])
