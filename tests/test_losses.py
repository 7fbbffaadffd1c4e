"""L_IR, L_Pro and the CE average on hand-made tensors with values worked out by hand."""

import math

import pytest
import torch

from pha_core.losses import instance_contrastive_loss, prototype_contrastive_loss, token_cross_entropy


def test_prototype_loss_known_value():
    z = torch.tensor([[1.0, 0.0]])
    prototypes = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # norms differ: only the cosine counts
    loss = prototype_contrastive_loss(z, prototypes, torch.tensor([0]), temperature=0.5)
    # logits = [1/0.5, 0/0.5] = [2, 0]  ->  -log(e^2 / (e^2 + 1)) = log(1 + e^-2)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2)), rel=1e-5)


def test_prototype_loss_is_never_negative_and_wrong_task_costs_more():
    z = torch.tensor([[1.0, 0.2], [0.1, 1.0]])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    right = prototype_contrastive_loss(z, prototypes, torch.tensor([0, 1]), 0.1)
    wrong = prototype_contrastive_loss(z, prototypes, torch.tensor([1, 0]), 0.1)
    assert 0 <= right.item() < wrong.item()


def test_instance_loss_known_value():
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    tasks = torch.tensor([0, 0, 1])
    loss = instance_contrastive_loss(z, tasks, temperature=1.0)
    # anchors 0 and 1: positive cosine 1, the other candidate cosine 0 -> -log(e / (e + 1)) each;
    # anchor 2 has no positive and drops out.
    assert loss.item() == pytest.approx(math.log(1 + math.e) - 1, rel=1e-5)


def test_instance_loss_without_positives_is_zero():
    z = torch.randn(3, 4)
    assert instance_contrastive_loss(z, torch.tensor([0, 1, 2]), 0.1).item() == 0.0


def test_instance_loss_prefers_clustered_tasks():
    clustered = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    tasks = torch.tensor([0, 0, 1, 1])
    assert instance_contrastive_loss(clustered, tasks, 0.1) < instance_contrastive_loss(mixed, tasks, 0.1)


def test_instance_loss_gradients_reach_z():
    z = torch.randn(4, 8, requires_grad=True)
    instance_contrastive_loss(z, torch.tensor([0, 0, 1, 1]), 0.1).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_cross_entropy_is_averaged_over_target_tokens():
    logits = torch.zeros(2, 3, 5)  # uniform: every token costs log 5
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    assert token_cross_entropy(logits, labels).item() == pytest.approx(math.log(5))
