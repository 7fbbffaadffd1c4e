"""Few-shot adaptation to a new task (paper 3.3 and 4.4.3; pha-method.md section 4).

1. Encode the k examples; score every known prototype by the mean cosine to their z; pick k_a.
2. A new prototype starts as a copy of k_a. Nothing that exists changes.
3. Train on the k examples:
   mode "prototype" (default for serving): two new vectors train, each with its own loss (summed, no
        lambda: they share no parameter). CE trains the prototype k_new, so H(k_new) generates adapters that
        solve the task; L_Pro (z against every known key and the new one as target) trains a separate routing
        key, which retrieval (Eq. 10) matches inputs against. A new task costs 2 x proto_dim floats and cannot
        change another task's outputs.
   mode "adapter": a per-task copy of the generated decoder adapters, initialised from H(k_a), trains with
        CE; the routing prototype trains beside it with L_Pro alone (it does not feed the adapters).
   mode "scratch": the baseline, a plain adapter trained from a fresh init (W_up = 0) with CE; routing as in
        "adapter".
The encoder and retriever are frozen, so h and z are computed once and each step runs only the decoder.
4. With label words, a label prior: offsets added to each label's log-likelihood, fitted on the k examples
   (fit_label_offsets). A prototype cannot always move the decoder onto words it never wrote (BoolQ's
   `true`/`false`: CE 4.5 on its own 16 examples, every held-out answer `false`); the offsets are one float
   per label, and measured at k = 16 (docs/results.md §4) lift BoolQ's prototype mode from 34.3% to the
   majority's level and CB's by ~6 points.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .adapters import AdapterWeights
from .calibration import RouteCalibration, Spread
from .collate import collate
from .inference import AdapterSet, prototype_adapters
from .label_prior import fit_label_offsets
from .losses import prototype_contrastive_loss, token_cross_entropy
from .model import PHAModel
from .retriever import cosine_scores, retrieve
from .scoring import AnswerSpace, candidate_ids, label_log_likelihoods, rank
from .tasks import Example

MODES = ("prototype", "adapter", "scratch")
# Learning rates per trained part: a single 128-d vector tolerates (and needs) a large step; adapter weights
# use the usual adapter rate.
PROTOTYPE_LR = 5e-2
ADAPTER_LR = 1e-3


@dataclass
class AdaptResult:
    prototype: np.ndarray  # the new task's prototype, the hypernetwork's input [proto_dim]
    key: np.ndarray  # its routing key in z space [proto_dim]
    adapters: AdapterSet | None  # explicit adapters ("adapter"/"scratch" modes); None: generate from prototype
    source_task: str
    source_score: float
    mode: str
    k: int
    steps: int
    final_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)
    spread: Spread | None = None  # the k examples' cosines to the key (calibration.py typicality)
    labels: tuple[str, ...] | None = None  # the label words the offsets are for (None: free generation)
    label_offsets: np.ndarray | None = None  # [len(labels)] log-likelihood offsets (fit_label_offsets)

    @property
    def answers(self) -> AnswerSpace | None:
        """The answer space the task is served with: its labels and their fitted offsets."""
        offsets = None if self.label_offsets is None else self.label_offsets.tolist()
        return AnswerSpace.of_labels(self.labels, offsets)


def _encode(model: PHAModel, examples: Sequence[Example]):
    """The batch, what the decoder reads (memory, mask) and z: all fixed during adaptation."""
    bb, cfg = model.backbone, model.config
    batch = collate(bb, examples, {examples[0].task: 0}, cfg.max_source_length, cfg.max_target_length, cfg.by_field)
    batch = batch.to(model.device)
    with torch.no_grad():
        hidden, mask = model.encode(batch.source)
        z = model.instance_vectors(hidden, mask)
    return batch, (hidden, mask), z


def choose_source(z: torch.Tensor, prototypes: torch.Tensor) -> tuple[int, float]:
    """Step 1: the prototype with the highest mean cosine to the examples' z."""
    scores = cosine_scores(z, prototypes).mean(dim=0)
    best = int(scores.argmax())
    return best, float(scores[best])


def adapt_task(
    model: PHAModel,
    examples: Sequence[Example],
    prototypes: np.ndarray,
    names: Sequence[str],
    mode: str = "prototype",
    steps: int = 200,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    other_keys: np.ndarray | None = None,
    labels: Sequence[str] | None = None,
) -> AdaptResult:
    """Adapt to the task of `examples` (all with the same `task`), against the known `prototypes` [N, p].

    `prototypes` are candidate sources (hypernetwork inputs) and routing competitors; `other_keys` [M, p] are
    further routing competitors only (earlier adapted tasks), so the new key also keeps clear of them.
    `labels`: the task's label words (every example's target among them): the label prior is fitted too.
    """
    if mode not in MODES:
        raise ValueError(f"unknown adaptation mode {mode!r}; choose one of {', '.join(MODES)}")
    if not model.config.routes_by_prototype:
        raise ValueError(f"variant {model.config.variant!r} has no prototypes to adapt from")
    if not examples or steps < 1:
        raise ValueError("adaptation needs at least one example and one step")
    started = time.perf_counter()
    torch.manual_seed(seed)
    model.eval()  # dropout off: k examples are too few for noise to help, and results must be reproducible
    batch, (hidden, mask), z = _encode(model, examples)
    known = torch.as_tensor(np.asarray(prototypes, dtype=np.float32), device=model.device)
    source, score = choose_source(z, known)
    new_proto = known[source].clone().requires_grad_(mode == "prototype")
    key = known[source].clone().requires_grad_(True)
    adapter_params = _initial_adapters(model, known[source], mode)
    params = [{"params": [key], "lr": PROTOTYPE_LR}]
    params.append(
        {"params": adapter_params, "lr": ADAPTER_LR} if adapter_params else {"params": [new_proto], "lr": PROTOTYPE_LR}
    )
    optimizer = torch.optim.Adam(params)
    rivals = known
    if other_keys is not None and len(other_keys):
        extra = torch.as_tensor(np.asarray(other_keys, dtype=np.float32), device=model.device).view(-1, known.size(1))
        rivals = torch.cat([known, extra])
    target = torch.full((len(examples),), rivals.size(0), device=model.device)
    losses = []
    for step in range(steps):
        layers = _layers(adapter_params) if adapter_params else model.adapters_from_condition(new_proto.view(1, -1))
        rows = torch.zeros(len(examples), dtype=torch.long, device=model.device)
        with model.decoder_context.use([w.index_select(rows) for w in layers]):
            logits, _ = model.backbone.decode(batch.decoder_input_ids, hidden, mask)
        ce = token_cross_entropy(logits, batch.labels)
        pro = prototype_contrastive_loss(z, torch.cat([rivals, key.view(1, -1)]), target, model.config.temperature)
        loss = ce + pro  # independent parts: CE reaches only the adapters' source, L_Pro only the key
        # Gradients for the new parts only: the model's own parameters are never touched (no .grad written).
        trained = [key, *(adapter_params or [new_proto])]
        for param, grad in zip(trained, torch.autograd.grad(loss, trained, allow_unused=True), strict=True):
            param.grad = grad
        optimizer.step()
        losses.append(float(ce.detach()))
        if progress is not None:
            progress(step + 1, float(ce))
    final = _layers(adapter_params) if adapter_params else None
    with torch.no_grad():  # the examples the key was fitted to: tighter than new rows, so MIN_SCALE floors it
        spread = Spread.of(cosine_scores(z, key.view(1, -1)).squeeze(1).tolist())
    offsets = None
    if labels:
        labels = tuple(labels)
        layers = final if final else model.adapters_from_condition(new_proto.detach().view(1, -1))
        rows = torch.zeros(len(examples), dtype=torch.long, device=model.device)
        with torch.no_grad():
            ids = candidate_ids(model.backbone, AnswerSpace(labels))
            loglik = label_log_likelihoods(
                model, hidden, mask, [w.index_select(rows) for w in layers], [ids] * len(examples)
            )
        offsets = fit_label_offsets(torch.stack(loglik), [labels.index(e.target) for e in examples])
    return AdaptResult(
        prototype=new_proto.detach().cpu().numpy().astype(np.float32),
        key=key.detach().cpu().numpy().astype(np.float32),
        adapters=AdapterSet([AdapterWeights(*(t.detach().cpu() for t in w.tensors())) for w in final])
        if final
        else None,
        source_task=names[source],
        source_score=score,
        mode=mode,
        k=len(examples),
        steps=steps,
        final_loss=losses[-1] if losses else math.nan,
        seconds=time.perf_counter() - started,
        losses=losses,
        spread=spread,
        labels=labels or None,
        label_offsets=offsets,
    )


def _initial_adapters(model: PHAModel, source_proto: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """Trainable adapter tensors, 4 per decoder layer, each with a leading dim of 1 ([] in prototype mode)."""
    if mode == "prototype":
        return []
    if mode == "adapter":
        with torch.no_grad():
            layers = model.adapters_from_condition(source_proto.view(1, -1))
        return [t.detach().clone().requires_grad_(True) for w in layers for t in w.tensors()]
    d, b = model.backbone.d_model, model.config.bottleneck
    fresh = []
    for _ in range(model.n_decoder_layers):
        fresh += [torch.randn(1, d, b) / math.sqrt(d), torch.zeros(1, b), torch.zeros(1, b, d), torch.zeros(1, d)]
    return [t.to(model.device).requires_grad_(True) for t in fresh]


def _layers(flat: list[torch.Tensor]) -> list[AdapterWeights]:
    return [AdapterWeights(*flat[i : i + 4]) for i in range(0, len(flat), 4)]


@dataclass
class AdaptedTensors:
    """What the registry stores for an adapted task, parsed back (see `to_bytes`)."""

    prototype: np.ndarray
    key: np.ndarray
    adapters: AdapterSet | None

    @classmethod
    def of(cls, result: AdaptResult) -> AdaptedTensors:
        return cls(result.prototype, result.key, result.adapters)

    def to_bytes(self) -> bytes:
        """safetensors: `prototype`, `key` (float16: 2 bytes a number keeps a prototype-mode task under 1 KB
        in the registry; the checkpoints store their weights so too), and `adapters.<layer>.<name>` for explicit
        adapters."""
        tensors = {
            "prototype": torch.as_tensor(np.asarray(self.prototype, dtype=np.float32)).half(),
            "key": torch.as_tensor(np.asarray(self.key, dtype=np.float32)).half(),
        }
        if self.adapters is not None:
            parsed = st_load(self.adapters.to_bytes())
            tensors.update({f"adapters.{name}": t for name, t in parsed.items()})
        return st_save({k: v.contiguous() for k, v in tensors.items()})

    @classmethod
    def from_bytes(cls, data: bytes, n_layers: int) -> AdaptedTensors:
        """Parse `to_bytes` output. `prototype` and `key` come back as stored (float16 unless written otherwise):
        a replica keeps them so, at 2 bytes a number."""
        try:
            vectors = _vectors_only(data)
            if vectors is not None:  # a prototype-mode task: no torch, no adapters (a replica reads a million)
                return cls(*vectors, None)
            tensors = st_load(data)
            adapters = None
            if any(name.startswith("adapters.") for name in tensors):
                inner = {k.removeprefix("adapters."): v for k, v in tensors.items() if k.startswith("adapters.")}
                adapters = AdapterSet.from_bytes(st_save(inner), n_layers)
            return cls(tensors["prototype"].numpy(), tensors["key"].numpy(), adapters)
        except Exception as exc:  # safetensors raises its own types for corrupt bytes
            raise ValueError(f"not a valid adapted-task file: {exc}") from exc


_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32}


@functools.lru_cache(maxsize=16)
def _layout(header: bytes) -> tuple[tuple[str, object, int, int], ...] | None:
    """The (name, dtype, start, count) of a safetensors header holding exactly `prototype` and `key` (1-d),
    else None. Cached: every prototype-mode task of one model has the same header."""
    meta = json.loads(header)
    names = sorted(k for k in meta if k != "__metadata__")
    if names != ["key", "prototype"]:
        return None
    out = []
    for name in names:
        info = meta[name]
        dtype = _NUMPY_DTYPES.get(info["dtype"])
        if dtype is None or len(info["shape"]) != 1:
            return None
        start, stop = info["data_offsets"]
        if stop - start != info["shape"][0] * np.dtype(dtype).itemsize:
            raise ValueError(f"tensor {name!r} has {stop - start} bytes for shape {info['shape']}")
        out.append((name, np.dtype(dtype), start, info["shape"][0]))
    return tuple(out)


def _vectors_only(data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """(prototype, key) straight from the bytes of a file without adapters; None when it has more."""
    size = _header_size(data)
    layout = _layout(bytes(data[8 : 8 + size]))
    if layout is None:
        return None
    parts = {}
    for name, dtype, start, count in layout:
        if 8 + size + start + count * dtype.itemsize > len(data):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        # A copy: a view would keep the whole file (and its buffer objects) alive for as long as the vector.
        parts[name] = np.frombuffer(data, dtype=dtype, count=count, offset=8 + size + start).copy()
    return parts["prototype"], parts["key"]


def vectors_of_many(files: Sequence[bytes | None]) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """`_vectors_only` for many files at once (a replica catching up reads a million, a page at a time): the
    files with the first file's header and length are sliced as one [n, bytes] array, ~1 us a file where one by
    one costs ~5 us of Python. (prototype, key) per file, as row views of one [n, dim] array per tensor (a page
    of them lives as long as any of its rows: at most a page's vectors over what the entries hold); None for a
    missing file (None or empty: a removal) and for the files read otherwise (`AdaptedTensors.from_bytes`:
    other layouts, adapters, corrupt bytes)."""
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(files)
    present = [i for i, data in enumerate(files) if data]
    if not present:
        return out
    first = files[present[0]]
    try:
        size = _header_size(first)
        layout = _layout(bytes(first[8 : 8 + size]))
    except ValueError:
        return out
    if layout is None:
        return out
    head, length = first[: 8 + size], len(first)
    rows = [i for i in present if len(files[i]) == length and files[i].startswith(head)]
    block = np.frombuffer(b"".join([files[i] for i in rows]), np.uint8).reshape(len(rows), length)
    parts = {}
    for name, dtype, start, count in layout:
        begin, end = 8 + size + start, 8 + size + start + count * dtype.itemsize
        if end > length:
            return out
        parts[name] = np.ascontiguousarray(block[:, begin:end]).view(dtype)
    for j, i in enumerate(rows):
        out[i] = (parts["prototype"][j], parts["key"][j])
    return out


def _header_size(data: bytes) -> int:
    """The length of a safetensors file's JSON header, checked against the file's."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("header runs past the end of the file")
    return size


def adapted_adapters(model: PHAModel, result: AdaptResult) -> AdapterSet:
    """The decoder adapters an adapted task is served with: its own (adapter mode) or its prototype's."""
    return result.adapters if result.adapters is not None else prototype_adapters(model, result.prototype)


@torch.no_grad()
def score_adapted(
    model: PHAModel,
    result: AdaptResult,
    heldout: Sequence[Example],
    prototypes: np.ndarray,
    batch_size: int = 64,
    space: AnswerSpace | None = None,
    calibration: RouteCalibration | None = None,
    min_typicality: float = 0.02,
) -> dict[str, float]:
    """Held-out quality of an adapted task: its metrics (exact match for tasks not in the task table) and the
    share of held-out inputs that retrieval routes to the new prototype rather than to a known one; with the
    model's `calibration`, also the share routed to it AND typical of it (what the server answers: "fits_new").

    Answers are ranked within `space` (default: the known task's labels, as the server answers; scoring.py),
    or generated greedily when there is none.
    """
    from .metrics import task_metrics
    from .tasks import TASKS

    task = heldout[0].task
    if space is None:  # what the server answers with: the task's registered labels and prior, else its table's
        space = result.answers
    if space is None and task in TASKS:
        space = AnswerSpace.of_task(task)

    adapters = adapted_adapters(model, result)
    table = torch.cat(
        [torch.as_tensor(np.asarray(prototypes, dtype=np.float32)), torch.as_tensor(result.key).view(1, -1)]
    ).to(model.device)
    outputs, routed, fits = [], 0, 0
    for start in range(0, len(heldout), batch_size):
        chunk = list(heldout[start : start + batch_size])
        _, (hidden, mask), z = _encode(model, chunk)
        to_new = retrieve_rows(z, table) == table.size(0) - 1
        routed += int(to_new.sum())
        if calibration is not None and result.spread is not None:
            cosines = cosine_scores(z, table[-1:]).squeeze(1).tolist()
            typical = [calibration.typicality(result.spread, c) >= min_typicality for c in cosines]
            fits += sum(bool(t) and bool(n) for t, n in zip(typical, to_new.tolist(), strict=True))
        layers = [
            AdapterWeights(*(t.to(model.device).expand(len(chunk), *t.shape[1:]) for t in w.tensors()))
            for w in adapters.layers
        ]
        if space is not None:
            outputs += [s.output for s in rank(model, hidden, mask, layers, [space] * len(chunk))]
        else:
            ids = model.greedy_decode(hidden, mask, layers, model.config.max_target_length)
            outputs += [model.backbone.decode_text(row) for row in ids]
    targets = [e.target for e in heldout]
    if task in TASKS:
        metrics = task_metrics(task, outputs, targets)
    else:
        metrics = {"exact_match": sum(o == t for o, t in zip(outputs, targets, strict=True)) / len(targets)}
    fitted = {"fits_new": fits / len(heldout)} if calibration is not None and result.spread is not None else {}
    return {**metrics, "routed_to_new": routed / len(heldout), **fitted, "n": len(heldout)}


def retrieve_rows(z: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The routed row of each z (Eq. 10 over `table`)."""
    return retrieve(z, table, top_k=1).indices[:, 0]
