"""`pha report`: the paper's pictures for a checkpoint, as PNG.

prototype_heatmap.png   mean cosine between each task's held-out instances z and every prototype (Fig. 5):
                        a strong diagonal means retrieval finds the right task.
retrieval_projection.png  2-D PCA of held-out inputs with and without the retriever (Fig. 4): left, the
                        mean-pooled encoder features G reads; right, z = G(.), coloured by task.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint, read_meta
from .data import data_dir_from_env, load_splits
from .model import PHAModel
from .retriever import masked_mean
from .tasks import Example


@torch.inference_mode()
def features(model: PHAModel, examples: list[Example], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(mean-pooled encoder features, retriever z) for the examples."""
    pooled, zs = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        hidden, mask = model.encode(model.source([e.input for e in chunk]))
        pooled.append(masked_mean(hidden, mask).float().cpu().numpy())
        zs.append(model.instance_vectors(hidden, mask).float().cpu().numpy())
    return np.concatenate(pooled), np.concatenate(zs)


def similarity_matrix(z: np.ndarray, labels: list[int], prototypes: np.ndarray) -> np.ndarray:
    """[task of the instances, prototype] mean cosine."""
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    pn = prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)
    cos = zn @ pn.T
    labels_arr = np.asarray(labels)
    return np.stack([cos[labels_arr == t].mean(axis=0) for t in range(prototypes.shape[0])])


def pca_2d(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def make_report(checkpoint: str | Path, output: Path, max_eval: int = 100, data_dir: str | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = load_checkpoint(checkpoint)
    if not model.config.routes_by_prototype:
        raise ValueError(f"variant {model.config.variant!r} has no prototypes to picture")
    seed = read_meta(checkpoint).get("recipe", {}).get("seed", 42)
    splits = load_splits(
        model.tasks, Path(data_dir) if data_dir else data_dir_from_env(), seed=seed, n_train=1, max_eval=max_eval
    )
    examples = [e for t in model.tasks for e in splits[t]["test"]]
    labels = [model.tasks.index(e.task) for e in examples]
    pooled, z = features(model, examples)
    prototypes = model.prototypes.weight.detach().float().cpu().numpy()
    output.mkdir(parents=True, exist_ok=True)

    sim = similarity_matrix(z, labels, prototypes)
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    im = ax.imshow(sim, cmap="viridis", vmin=min(0.0, float(sim.min())), vmax=1.0)
    ax.set_xticks(range(len(model.tasks)), model.tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(model.tasks)), model.tasks)
    ax.set_xlabel("prototype k_i")
    ax.set_ylabel("held-out instances of task")
    for (i, j), value in np.ndenumerate(sim):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k")
    ax.set_title(f"Prototype-instance cosine ({max_eval} test rows per task)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    heatmap = output / "prototype_heatmap.png"
    fig.savefig(heatmap, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, data, title in (
        (axes[0], pooled, "without retriever: mean-pooled encoder"),
        (axes[1], z, "with retriever: z = G(mean-pooled encoder)"),
    ):
        xy = pca_2d(data / np.linalg.norm(data, axis=1, keepdims=True))
        for t, name in enumerate(model.tasks):
            pts = xy[np.asarray(labels) == t]
            ax.scatter(pts[:, 0], pts[:, 1], s=8, alpha=0.7, label=name)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle("Held-out inputs, PCA of L2-normalised vectors")
    fig.tight_layout()
    projection = output / "retrieval_projection.png"
    fig.savefig(projection, dpi=120)
    plt.close(fig)
    return [heatmap, projection]
