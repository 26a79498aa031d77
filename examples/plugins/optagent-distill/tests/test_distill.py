"""optagent-distill passes optagent's conformance suite, and its loss does what the README says."""

from __future__ import annotations

import pytest
import torch
from optagent_distill import NO_FINETUNE_NOTE, DistillStrategy, distillation_loss

from optagent import Strategy
from optagent.testing import StrategyConformance, apply_strategy, default_model_file, make_trial


class TestDistillConformance(StrategyConformance):
    @pytest.fixture
    def strategy(self) -> Strategy:
        return DistillStrategy()


ON = {"enabled": "on", "temperature": 4.0, "alpha": 0.5}


@pytest.fixture
def model_path(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return default_model_file(tmp_path_factory.getbasetemp() / "optagent-conformance")


def test_the_soft_term_vanishes_when_student_matches_teacher() -> None:
    logits = torch.randn(5, 3)
    assert distillation_loss(logits, logits, 4.0).abs().item() < 1e-6
    assert distillation_loss(logits, torch.randn(5, 3), 4.0).item() > 0


def test_configure_installs_a_loss_mixing_labels_and_teacher(model_path) -> None:  # noqa: ANN001
    trial = make_trial(model_path, {"finetune": {"epochs": 1}, "distill": ON})
    DistillStrategy().configure(dict(ON), trial)
    assert trial.loss_fn is not None
    inputs, targets = next(iter(trial.model_file.loader("train", 16)))
    student = trial.model_file.load_model()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    outputs = student(inputs)
    loss = trial.loss_fn(outputs, targets, inputs)
    loss.backward()  # gradients flow into the student only
    assert all(p.grad is None for p in trial.baseline.parameters())
    with torch.no_grad():
        teacher = trial.baseline(inputs)
        task = torch.nn.functional.cross_entropy(outputs, targets)
        expected = 0.5 * task + 0.5 * distillation_loss(outputs, teacher, 4.0)
    assert torch.allclose(loss.detach(), expected, atol=1e-6)


def test_on_without_finetune_epochs_is_noted_and_changes_nothing(model_path) -> None:  # noqa: ANN001
    trial = make_trial(model_path, {"finetune": {"epochs": 0}, "distill": ON})
    model, trial = apply_strategy(DistillStrategy(), ON, trial)  # configure, then apply, as a worker does
    assert trial.loss_fn is None
    assert NO_FINETUNE_NOTE in trial.notes
    example = trial.model_file.example_input()
    assert torch.equal(model(example), trial.baseline(example))
