"""Inference for serving: the tensor side of a request, behind plain-Python types.

The service never touches tensors. It asks an `Engine` to
  1. `encode` texts (tokenize, encoder with its shared adapters, retriever z as float32 numpy),
  2. route z to a task (routing.PrototypeIndex) and fetch each task's `AdapterSet` (cached as bytes),
  3. `generate` with one adapter set per example: a mixed-task batch is one forward pass.
Adapter sets serialise to safetensors bytes (never pickle), so a cache can hold them safely. An engine runs at
one precision (precision.py: float32, or the backbone in bf16 as the model was trained); its adapter sets and
model version are the same at either.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .adapters import AdapterWeights
from .content import content_layer, content_vectors
from .model import PHAModel
from .precision import autocast, serve_in
from .scoring import AnswerSpace, Scored, candidate_ids, mean_of_readings, rank, second_readings
from .source import Tokens, tokenize

# Answer spaces whose token ids are kept (a few label words each); beyond it the cache starts again.
MAX_CACHED_SPACES = 100_000


class AdapterSet:
    """One task's decoder adapters: an `AdapterWeights` per decoder layer, leading dim 1."""

    def __init__(self, layers: list[AdapterWeights]) -> None:
        self.layers = layers

    def to_bytes(self) -> bytes:
        tensors = {
            f"{i}.{name}": t.detach().cpu().contiguous()
            for i, w in enumerate(self.layers)
            for name, t in zip(("w_down", "b_down", "w_up", "b_up"), w.tensors(), strict=True)
        }
        return st_save(tensors)

    @classmethod
    def from_bytes(cls, data: bytes, n_layers: int) -> AdapterSet:
        """Parse safetensors bytes; raises ValueError when they are not a complete adapter set."""
        try:
            tensors = st_load(data)
            layers = [
                AdapterWeights(*(tensors[f"{i}.{name}"] for name in ("w_down", "b_down", "w_up", "b_up")))
                for i in range(n_layers)
            ]
        except Exception as exc:  # safetensors raises its own types for corrupt bytes
            raise ValueError(f"not a valid adapter set: {exc}") from exc
        return cls(layers)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.layers for t in w.tensors())


@dataclass
class Encoded:
    """An encoded batch. `z` is the retriever's output (None for variants without a retriever); `content` the
    unit content vectors of the same pass (content.py; None with the adapters off)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    z: np.ndarray | None
    content: np.ndarray | None = None

    def __len__(self) -> int:
        return self.hidden.size(0)

    def select(self, rows: list[int]) -> Encoded:
        """The encoded inputs at `rows`, in that order."""
        index = torch.tensor(rows, dtype=torch.long, device=self.hidden.device)
        z = None if self.z is None else self.z[rows]
        content = None if self.content is None else self.content[rows]
        return Encoded(self.hidden.index_select(0, index), self.mask.index_select(0, index), z, content)


@torch.inference_mode()
def prototype_adapters(model: PHAModel, prototype: np.ndarray | torch.Tensor) -> AdapterSet:
    """H(C([k; e_m])) for every decoder layer: the adapters a task is served with, from its prototype."""
    cond = torch.as_tensor(np.asarray(prototype, dtype=np.float32), device=model.device).view(1, -1)
    return AdapterSet(model.adapters_from_condition(cond))


class Engine:
    """Thread-safe inference over one `PHAModel` (eval mode, no grad)."""

    def __init__(self, model: PHAModel, model_version: str | None = None, precision: str = "fp32") -> None:
        self.model = model.eval()
        self.config = model.config
        self.backbone = model.backbone
        self.model_version = model_version or fingerprint(model)  # of the weights as stored, at any precision
        self.precision = serve_in(model, precision)
        # Torch modules are safe to call from several threads in eval mode, but the tokenizer is not always:
        # guard the one shared Rust tokenizer.
        self._tokenizer_lock = threading.Lock()
        # Token ids of every answer space seen (label words of the trained and adapted tasks): a few per task.
        self._ids_of: dict[AnswerSpace, list[list[int]]] = {}

    # -------------------------------------------------------------------------------- metadata
    @property
    def tasks(self) -> list[str]:
        return self.model.tasks

    @property
    def can_route(self) -> bool:
        return self.config.routes_by_prototype

    def trained_prototypes(self) -> np.ndarray:
        """The trained prototype table [T, proto_dim] in `tasks` order."""
        if self.model.prototypes is None:
            raise ValueError(f"variant {self.config.variant!r} has no prototypes")
        return self.model.prototypes.weight.detach().float().cpu().numpy().copy()

    def count_tokens(self, texts: list[str]) -> list[int]:
        with self._tokenizer_lock:
            return self.backbone.count_tokens(texts)

    def tokenize(self, texts: list[str]) -> list[Tokens]:
        """`texts` tokenised for `encode(..., tokens=)`, with each one's token count: a caller that checks
        lengths tokenises once, off the model thread."""
        with self._tokenizer_lock:
            return tokenize(self.backbone, texts, self.config.by_field)

    def truncate(self, texts: list[str], limit: int) -> list[tuple[str, int, int]]:
        """Each text cut to at most `limit` tokens (special tokens included), at a token's end:
        (text, tokens dropped, characters dropped). Texts within the limit come back unchanged."""
        with self._tokenizer_lock:
            enc = self.backbone.tokenizer(
                texts, truncation=False, return_offsets_mapping=True, return_special_tokens_mask=True
            )
        out = []
        for text, offsets, special in zip(texts, enc["offset_mapping"], enc["special_tokens_mask"], strict=True):
            if len(offsets) <= limit:
                out.append((text, 0, 0))
                continue
            content = [end for (_, end), is_special in zip(offsets, special, strict=True) if not is_special]
            keep = limit - sum(special)
            end = content[keep - 1] if keep > 0 else 0
            out.append((text[:end], len(offsets) - limit, len(text) - end))
        return out

    def can_represent(self, text: str) -> bool:
        """Whether a target text survives tokenize -> decode unchanged (e.g. no unknown characters)."""
        with self._tokenizer_lock:
            ids = self.backbone.target_ids(text)[:-1]
        return self.backbone.decode_text(ids) == text.strip()

    # ------------------------------------------------------------------------------ the pipeline
    def _precision(self):
        """Every pass of the model under the engine's precision (autocast in bf16; nothing in float32)."""
        return autocast(self.precision, self.model.device)

    @torch.inference_mode()
    def encode(self, texts: list[str], adapters_on: bool = True, tokens: list[Tokens] | None = None) -> Encoded:
        """The encoder pass over `texts` (`tokens`: the same texts tokenised already by `tokenize`)."""
        if tokens is not None:
            source = self.model.source_of(tokens)
        else:
            with self._tokenizer_lock:
                source = self.model.source(texts)
        with self._precision():
            return self._encode(source, adapters_on)

    def _encode(self, source, adapters_on: bool) -> Encoded:
        if not adapters_on:
            with self.model.adapter_switch.off():
                hidden, mask = self.model.encode(source)
                return Encoded(hidden, mask, None)
        hidden, mask, states = self.model.encode_keeping(source, content_layer(self.model))
        z = None
        if self.model.retriever is not None:
            z = self.model.instance_vectors(hidden, mask).float().cpu().numpy()
        return Encoded(hidden, mask, z, content_vectors(states, source))

    def adapters_for_prototype(self, prototype: np.ndarray) -> AdapterSet:
        return prototype_adapters(self.model, prototype)

    def _gather(self, adapter_sets: list[AdapterSet]) -> list[AdapterWeights]:
        """Per-row adapter weights of a batch (the same set object may repeat: it is gathered once). Rows that
        each have a set of their own, in order, need no index; one row (one request at a time) takes its set's
        tensors as they are: no copy."""
        unique: dict[int, int] = {}
        order = [unique.setdefault(id(s), len(unique)) for s in adapter_sets]
        distinct = list({id(s): s for s in adapter_sets}.values())
        device = self.model.device
        rows = None if order == list(range(len(distinct))) else torch.tensor(order, device=device)
        layers = []
        for m in range(self.model.n_decoder_layers):
            columns = zip(*(s.layers[m].tensors() for s in distinct), strict=True)
            stacked = AdapterWeights(*((p[0] if len(p) == 1 else torch.cat(p)).to(device) for p in columns))
            layers.append(stacked if rows is None else stacked.index_select(rows))
        return layers

    @torch.inference_mode()
    def generate(self, encoded: Encoded, adapter_sets: list[AdapterSet], max_new_tokens: int) -> list[str]:
        """Greedy outputs, one adapter set per example."""
        with self._precision():
            ids = self.model.greedy_decode(
                encoded.hidden, encoded.mask, self._gather(_one_set_each(encoded, adapter_sets)), max_new_tokens
            )
        return [self.backbone.decode_text(row) for row in ids]

    @torch.inference_mode()
    def answer(
        self,
        encoded: Encoded,
        adapter_sets: list[AdapterSet],
        spaces: list[AnswerSpace | None],
        max_new_tokens: int,
        texts: list[str] | None = None,
    ) -> list[Scored]:
        """Each example's answer: rank classification within its answer space (scoring.py) where it has one,
        greedy generation (no probabilities) where it has none. One decoder pass for each of the two kinds.
        `texts` (the encoded inputs): spaces that read both field orders (STS-B) read them, the other order
        encoded here and scored in the same pass as the batch; None: as written."""
        _one_set_each(encoded, adapter_sets)
        if len(spaces) != len(encoded):
            raise ValueError(f"{len(encoded)} inputs but {len(spaces)} answer spaces")
        with self._tokenizer_lock:
            for space in {s for s in spaces if s is not None and s not in self._ids_of}:
                if len(self._ids_of) >= MAX_CACHED_SPACES:
                    self._ids_of.clear()
                self._ids_of[space] = candidate_ids(self.backbone, space)
        rows, swapped = second_readings(spaces, texts) if texts is not None else ([], [])
        hidden, mask = encoded.hidden, encoded.mask
        if rows:  # the other order of those rows, as extra rows of the same pass (their adapters, their spaces)
            hidden, mask = _stacked((hidden, mask), self._encode_plain(swapped))
        every = list(range(len(encoded))) + rows
        layers = self._gather([adapter_sets[i] for i in every])
        scored = self._score(hidden, mask, layers, [spaces[i] for i in every], max_new_tokens)
        return mean_of_readings(spaces, scored[: len(encoded)], rows, scored[len(encoded) :])

    def _score(self, hidden, mask, layers, spaces: list[AnswerSpace | None], max_new_tokens: int) -> list[Scored]:
        """Rank-classified rows in one pass, generated rows in another."""
        results: list[Scored] = [None] * len(spaces)  # type: ignore[list-item]
        ranked = [i for i, s in enumerate(spaces) if s is not None]
        free = [i for i, s in enumerate(spaces) if s is None]
        for rows, scorer in ((ranked, self._rank), (free, self._generate_scored)):
            if not rows:
                continue
            h, m, part = hidden, mask, layers
            if len(rows) < len(spaces):  # both kinds in one batch (rare): each its own rows
                index = torch.tensor(rows, device=self.model.device)
                h, m = hidden.index_select(0, index), mask.index_select(0, index)
                part = [w.index_select(index) for w in layers]
            with self._precision():
                for i, one in zip(rows, scorer(h, m, part, [spaces[i] for i in rows], max_new_tokens), strict=True):
                    results[i] = one
        return results

    def _encode_plain(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's memory of `texts` (no retriever, no content states): for a second reading."""
        with self._tokenizer_lock:
            source = self.model.source(texts)
        with self._precision():
            return self.model.encode(source)

    def _rank(self, hidden, mask, layers, spaces, _max_new_tokens) -> list[Scored]:
        return rank(self.model, hidden, mask, layers, spaces, self._ids_of)

    def _generate_scored(self, hidden, mask, layers, _spaces, max_new_tokens) -> list[Scored]:
        ids = self.model.greedy_decode(hidden, mask, layers, max_new_tokens)
        return [Scored(self.backbone.decode_text(row), None) for row in ids]

    @torch.inference_mode()
    def generate_plain(self, encoded: Encoded, max_new_tokens: int) -> list[str]:
        """The backbone without any adapter: the baseline the service benchmark compares against."""
        with self.model.adapter_switch.off(), self._precision():
            ids = self.model.greedy_decode(encoded.hidden, encoded.mask, None, max_new_tokens)
        return [self.backbone.decode_text(row) for row in ids]


def _one_set_each(encoded: Encoded, adapter_sets: list[AdapterSet]) -> list[AdapterSet]:
    """`adapter_sets`, checked to hold one set per encoded input."""
    if len(adapter_sets) != len(encoded):
        raise ValueError(f"{len(encoded)} inputs but {len(adapter_sets)} adapter sets")
    return adapter_sets


def _stacked(*parts: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Memories [B_i, T_i, d] and masks [B_i, T_i] as one batch, padded to the longest T (mask 0 there)."""
    width = max(h.size(1) for h, _ in parts)
    hidden = torch.cat([nn.functional.pad(h, (0, 0, 0, width - h.size(1))) for h, _ in parts])
    mask = torch.cat([nn.functional.pad(m, (0, width - m.size(1))) for _, m in parts])
    return hidden, mask


def fingerprint(model: PHAModel) -> str:
    """Model version: a hash of the config and every trained tensor (changes whenever the model does)."""
    digest = hashlib.sha256(model.config.to_json().encode())
    for name, tensor in sorted(model.trainable_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]
