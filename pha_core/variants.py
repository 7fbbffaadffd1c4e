"""The method and the variants it is measured against (paper Table 3 and its baselines), one object each.

A variant says which parts a model has and where its adapter weights come from; `PHAModel` reads it once,
when it is built, so the model's code is the paper's and no method is a string comparison inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Where the decoder adapters of an input come from:
#   "prototype"  H(C([k_t; e_m])) from the prototype of the input's task (the paper; Eq. 5-8)
#   "instance"   H(C([z; e_m])) from the input's own retriever output z (no prototypes)
#   "table"      one plain adapter per task and layer, looked up (no hypernetwork)
DecoderSource = Literal["prototype", "instance", "table"]


@dataclass(frozen=True)
class Variant:
    name: str
    summary: str
    retriever: bool  # an instance-dense retriever G (and the instance contrastive loss L_IR)
    prototypes: bool  # a trainable vector per task (PHA's prototypes k_i; Hyperformer's task embeddings)
    prototype_loss: bool  # L_Pro pulls z towards its task's prototype: prototypes live in z's space
    decoder_source: DecoderSource
    encoder_adapters: Literal["shared", "generated"]  # one set for all tasks, or generated per task

    @property
    def routes(self) -> bool:
        """Whether a request without a task can go to the nearest prototype (Eq. 10): only when L_Pro put the
        prototypes in the space of z."""
        return self.retriever and self.prototype_loss

    @property
    def served_from_vector(self) -> bool:
        """Whether a task's whole adaptation is its vector: decoder adapters made from it, encoder shared
        (what the service stores, caches and moves between deployments)."""
        return self.prototypes and self.decoder_source == "prototype" and self.encoder_adapters == "shared"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("pha", "the paper's method: prototypes -> hypernetwork, retriever G, L_IR + L_Pro",
                retriever=True, prototypes=True, prototype_loss=True, decoder_source="prototype",
                encoder_adapters="shared"),
        Variant("no_prototype", "ablation: the hypernetwork reads z itself (no prototypes, no L_Pro)",
                retriever=True, prototypes=False, prototype_loss=False, decoder_source="instance",
                encoder_adapters="shared"),
        Variant("no_retriever", "ablation: no G and no contrastive losses; task vectors learnt by CE alone "
                "(tasks must be named at inference)",
                retriever=False, prototypes=True, prototype_loss=False, decoder_source="prototype",
                encoder_adapters="shared"),
        Variant("hyperformer", "baseline: a task embedding generates the adapters of encoder AND decoder "
                "(Hyperformer++), no contrastive losses",
                retriever=False, prototypes=True, prototype_loss=False, decoder_source="prototype",
                encoder_adapters="generated"),
        Variant("adapter", "baseline: one plain adapter per task on every decoder FFN (no hypernetwork), "
                "shared encoder adapters as PHA has",
                retriever=False, prototypes=False, prototype_loss=False, decoder_source="table",
                encoder_adapters="shared"),
    )
}  # fmt: skip
