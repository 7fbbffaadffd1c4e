"""The PHA model (paper section 3), top to bottom.

    input x --encoder (frozen, + task-shared adapters on every FFN)--> h   (each field apart: source.py)
    z   = G(mean(h))                                   instance-dense retriever (retriever.py)
    k_t = prototypes[t]  (training: gold task t; serving: t = argmax_i cos(k_i, z), Eq. 10)
    for each decoder layer m: adapter_m = H(C([k_t; e_m]))     (hypernetwork.py)
    y   = decoder (frozen, + adapter_m in parallel with every FFN) reading h
    loss = CE(y) + lam * (L_IR(z) + L_Pro(z, k))          (losses.py)

Every example of a batch carries its own task, so one batch mixes tasks: generated weights are gathered per
example and applied with batched matmuls (adapters.py). The ablations and baselines (variants.py) change only
which parts exist, where the adapter weights come from and which losses run; the model reads them once, here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .adapters import WRAPPERS, Adapter, AdapterContext, AdapterSwitch, AdapterWeights, GeneratedAdapter
from .backbones import Backbone, build_backbone, select_cache_rows
from .collate import Batch
from .config import PHAConfig
from .hypernetwork import AdapterGenerator, TaskAdapterTable
from .losses import (
    LossParts,
    instance_contrastive_loss,
    prototype_contrastive_loss,
    token_cross_entropy,
)
from .retriever import InstanceDenseRetriever, Retrieval, retrieve
from .source import FieldTokens, Source, Tokens, encode_by_length, joint_memory, make_source, source_of_tokens


class PHAModel(nn.Module):
    def __init__(self, config: PHAConfig, backbone: Backbone | None = None) -> None:
        super().__init__()
        if not config.tasks:
            raise ValueError("a PHA model needs at least one task (config.tasks is empty)")
        self.config = config
        method = self.method = config.method
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone)
        self.backbone.set_trainable(config.backbone.decoder_trainable)
        d, b, p = self.backbone.d_model, config.bottleneck, config.proto_dim
        n_tasks = len(config.tasks)
        enc_sites = self.backbone.encoder_ffn_sites()
        dec_sites = self.backbone.decoder_ffn_sites()
        self.n_encoder_layers, self.n_decoder_layers = len(enc_sites), len(dec_sites)

        # Per-call adapter weights live in context variables owned by this model, never in module state.
        self.encoder_context = AdapterContext(f"pha-encoder-{id(self)}")
        self.decoder_context = AdapterContext(f"pha-decoder-{id(self)}")
        self.adapter_switch = AdapterSwitch(f"pha-adapters-on-{id(self)}")

        # What the decoder reads besides the token states: the fields' pooled embeddings (source.py).
        self.field_tokens = FieldTokens(d) if config.by_field else None
        # Task-shared encoder adapters (Hyperformer generates them per task instead).
        shared_encoder = method.encoder_adapters == "shared"
        self.encoder_adapters = nn.ModuleList(Adapter(d, b) for _ in enc_sites) if shared_encoder else None
        # Instance-dense retriever G.
        self.retriever = InstanceDenseRetriever(d, config.retriever_hidden, p) if method.retriever else None
        # Task prototypes k_i: trainable rows, NOT running means of z.
        self.prototypes = nn.Embedding(n_tasks, p) if method.prototypes else None
        if self.prototypes is not None:
            nn.init.normal_(self.prototypes.weight)
        # The hypernetwork H(C(.)) makes the decoder adapters (and, for Hyperformer, the encoder's too).
        n_generated = self.n_decoder_layers + (0 if shared_encoder else self.n_encoder_layers)
        self.generator = (
            None
            if method.decoder_source == "table"
            else AdapterGenerator(
                n_generated, p, config.project_hidden, config.hyper_dim, d, b, config.hyper_up_init_scale
            )
        )
        self.task_adapters = (
            TaskAdapterTable(n_tasks, self.n_decoder_layers, d, b) if method.decoder_source == "table" else None
        )
        self._insert_adapters(enc_sites, dec_sites)

    def _insert_adapters(self, enc_sites, dec_sites) -> None:
        """Put a parallel adapter beside every FFN sublayer of the backbone."""
        if self.encoder_adapters is not None:
            enc_adapters = list(self.encoder_adapters)
        else:
            enc_adapters = [GeneratedAdapter(self.encoder_context, i) for i in range(len(enc_sites))]
        dec_adapters = [GeneratedAdapter(self.decoder_context, i) for i in range(len(dec_sites))]
        for site, adapter in zip(enc_sites + dec_sites, enc_adapters + dec_adapters, strict=True):
            wrapped = WRAPPERS[site.style](getattr(site.parent, site.attr), adapter, self.adapter_switch)
            setattr(site.parent, site.attr, wrapped)

    # ----------------------------------------------------------------------------------------- tasks
    @property
    def tasks(self) -> list[str]:
        return list(self.config.tasks)

    def task_ids(self, names: list[str]) -> torch.Tensor:
        index = {name: i for i, name in enumerate(self.config.tasks)}
        unknown = sorted({n for n in names if n not in index})
        if unknown:
            raise KeyError(f"unknown task(s) {unknown}; this model knows {self.config.tasks}")
        return torch.tensor([index[n] for n in names], dtype=torch.long, device=self.device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ----------------------------------------------------------------------------------- encoder + G
    def source(self, texts: list[str]) -> Source:
        """Tokenised encoder input of `texts`, cut into fields when this model encodes them apart."""
        return make_source(self.backbone, texts, self.config.max_source_length, self.config.by_field).to(self.device)

    def source_of(self, tokens: list[Tokens]) -> Source:
        """`source` of inputs tokenised already (source.tokenize)."""
        return source_of_tokens(self.backbone, tokens, self.config.max_source_length).to(self.device)

    def encode(self, source: Source, task_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the decoder reads, (memory [B, T, d], mask [B, T]): encoder states with the encoder adapters
        (per task only for the Hyperformer baseline), assembled per input as `config.encoding` says."""
        memory, mask, _ = self._encode(source, task_ids, None)
        return memory, mask

    def encode_keeping(self, source: Source, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`encode`, and the encoder's states after its first `layer` layers [N, L, d] (in source rows), from the
        same pass: the serving-time content check reads them (content.py) at no extra encoder cost."""
        return self._encode(source, None, layer)

    def _encode(self, source: Source, task_ids: torch.Tensor | None, layer: int | None):
        enc_weights = None
        if self.method.encoder_adapters == "generated":
            if task_ids is None:
                raise ValueError(f"the {self.method.name} variant needs the task of every input")
            enc_weights = [w.index_select(source.owner) for w in self._generated_weights(task_ids)]
            enc_weights = enc_weights[: self.n_encoder_layers]
        bb = self.backbone
        run = bb.encode if layer is None else (lambda ids, mask: bb.encode_with_layer(ids, mask, layer))
        with self.encoder_context.use(enc_weights):
            # One call for per-row encoder adapters, and for joint training batches (length buckets already,
            # collate.collate_buckets). Inference batches mix lengths (a serving batch mixes tasks: real GLUE rows
            # of 10 to 250 tokens): one pass with the padding taken out where the backbone can (encode_packed),
            # else length-sorted chunks that pad far less; so do training batches of fields.
            if enc_weights is not None or (self.field_tokens is None and self.training):
                out = run(source.segment_ids, source.segment_mask)
            elif bb.packs_rows and not bb.training:
                out = bb.encode_packed(source.segment_ids, source.segment_mask, layer)
            else:
                out = encode_by_length(run, source)
        hidden, kept = out if layer is not None else (out, None)
        if self.field_tokens is None:
            return (*joint_memory(hidden, source), kept)
        return (*self.field_tokens(hidden, source), kept)

    def instance_vectors(self, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """z = G(mean(h)) (Eq. 2)."""
        if self.retriever is None:
            raise ValueError(f"variant {self.config.variant!r} has no retriever")
        return self.retriever(encoder_hidden, attention_mask)

    def retrieve(self, z: torch.Tensor, top_k: int = 2, allowed: torch.Tensor | None = None) -> Retrieval:
        """Eq. 10: the nearest trained prototype of each z (among those `allowed` [B, T]), with score and margin."""
        if not self.config.routes_by_prototype:
            raise ValueError(f"variant {self.config.variant!r} cannot route by prototype")
        return retrieve(z, self.prototypes.weight, top_k, allowed)

    # ------------------------------------------------------------------------- adapter weights
    def adapters_from_condition(self, cond: torch.Tensor) -> list[AdapterWeights]:
        """Decoder adapter weights for condition vectors [N, proto_dim] (prototypes, or z when ablated)."""
        return self.generator(cond)[-self.n_decoder_layers :]

    def _generated_weights(self, task_ids: torch.Tensor) -> list[AdapterWeights]:
        """All generated layers for a batch of task ids, made once per distinct task, then gathered."""
        unique, inverse = torch.unique(task_ids, return_inverse=True)
        per_task = self.generator(self.prototypes(unique))
        return [w.index_select(inverse) for w in per_task]

    def decoder_adapters(
        self, task_ids: torch.Tensor | None = None, z: torch.Tensor | None = None
    ) -> list[AdapterWeights]:
        """Per-example decoder adapter weights, from wherever this variant takes them."""
        if self.method.decoder_source == "table":
            return self.task_adapters(task_ids)
        if self.method.decoder_source == "instance":
            return self.adapters_from_condition(z)
        return self._generated_weights(task_ids)[-self.n_decoder_layers :]

    # ----------------------------------------------------------------------------------- training
    def forward(self, batch: Batch | Sequence[Batch]) -> LossParts:
        """Eq. 9 on one mixed-task batch, with the gold task feeding the hypernetwork.

        The batch may come as length buckets (collate.collate_buckets): each bucket runs through encoder and
        decoder on its own, then CE is averaged over every target token of the batch and both contrastive
        losses see all of its z at once, exactly as for the unbucketed batch.
        """
        buckets = [batch] if isinstance(batch, Batch) else list(batch)
        ce_sum, n_tokens, zs, task_ids = 0.0, 0, [], []
        for b in buckets:
            h, mask = self.encode(b.source, b.task_ids)
            z = self.instance_vectors(h, mask) if self.retriever is not None else None
            with self.decoder_context.use(self.decoder_adapters(b.task_ids, z)):
                states, _ = self.backbone.decode_states(b.decoder_input_ids, h, mask)
            # The LM head (30k words for MiniLM) and its softmax run on target tokens only, not on padding:
            # the same loss, and ~15% of a CPU step less (bench/train_speed.py).
            targets = b.labels != -100
            token_ce = token_cross_entropy(self.backbone.lm_head(states[targets]), b.labels[targets], reduction="none")
            if b.weights is not None:  # each target token weighs what its example does (collate.label_weights)
                token_ce = token_ce * b.weights.unsqueeze(1).expand_as(b.labels)[targets]
            ce_sum = ce_sum + token_ce.sum()
            n_tokens += int(targets.sum())
            zs.append(z)
            task_ids.append(b.task_ids)
        ce = ce_sum / max(1, n_tokens)
        tasks = torch.cat(task_ids)
        z = torch.cat(zs) if self.retriever is not None else None
        zero = ce.new_zeros(())
        ir = instance_contrastive_loss(z, tasks, self.config.temperature) if z is not None else zero
        pro = (
            prototype_contrastive_loss(z, self.prototypes.weight, tasks, self.config.temperature)
            if self.method.prototype_loss
            else zero
        )
        return LossParts(ce + self.config.lam * (ir + pro), ce, ir, pro)

    # --------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def greedy_decode(
        self,
        encoder_hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        adapters: list[AdapterWeights] | None,
        max_new_tokens: int,
    ) -> list[list[int]]:
        """Greedy decoding with a KV cache; one adapter set per example. Returns token ids without EOS.

        Rows that have emitted EOS leave the batch (their cache, encoder states and adapters are dropped), so
        a mixed-task batch whose label words differ in length costs what its tokens cost, not the longest
        row's length times the batch: the LM head over the vocabulary dominates a decoder step.
        """
        bb = self.backbone
        rows = list(range(encoder_hidden.size(0)))  # original index of each row still decoding
        outputs: list[list[int]] = [[] for _ in rows]
        current = torch.full((len(rows), 1), bb.decoder_start_token_id, dtype=torch.long, device=self.device)
        cache = None
        for _ in range(max_new_tokens):
            with self.decoder_context.use(adapters):
                logits, cache = bb.decode(current, encoder_hidden, attention_mask, cache=cache, use_cache=True)
            token = logits[:, -1].argmax(dim=-1)
            finished = token == bb.eos_token_id
            for row, value, end in zip(rows, token.tolist(), finished.tolist(), strict=True):
                if not end:
                    outputs[row].append(value)
            if bool(finished.all()):
                break
            if bool(finished.any()):
                keep = (~finished).nonzero().squeeze(1)
                rows = [rows[i] for i in keep.tolist()]
                token, encoder_hidden, attention_mask = token[keep], encoder_hidden[keep], attention_mask[keep]
                adapters = None if adapters is None else [w.index_select(keep) for w in adapters]
                select_cache_rows(cache, keep)
            current = token.unsqueeze(1)
        return outputs

    def train(self, mode: bool = True) -> PHAModel:
        """Train mode for the parts that learn; the frozen encoder keeps running as at inference.

        Dropout inside a frozen encoder only adds noise to what the adapters see (the adapters themselves
        have none) and cost 25% of a CPU training step (its random masks): it stays off.
        """
        super().train(mode)
        self.backbone.frozen_encoder().eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the tensors training changes: what a checkpoint stores."""
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}
