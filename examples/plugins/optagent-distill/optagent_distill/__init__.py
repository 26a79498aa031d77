"""Knowledge distillation for optagent (a third-party plugin, installed separately).

During recovery fine-tuning the compressed model (the student) learns from the trained baseline (the
teacher, `TrialContext.baseline`) as well as from the labels (Hinton et al., 2015):

    loss = (1 - alpha) * task_loss(student, labels) + alpha * T^2 * KL(p_teacher || p_student)
    p = softmax(logits / T)

The teacher runs in inference mode on the same input batch. T (temperature) and alpha (weight of the
distillation term) are searched. The strategy changes no weights itself: in `configure` it installs the
loss on `trial.loss_fn`, which optagent's built-in `finetune` strategy uses. Without fine-tuning epochs
there is nothing to distill, and the trial notes say so.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import optagent
from optagent import SpaceContext, Stage, Strategy, TrialContext, categorical, real

if TYPE_CHECKING:
    import torch

try:
    __version__ = version("optagent-distill")
except PackageNotFoundError:  # imported from a source tree without installing
    __version__ = "0.0.0"

__all__ = ["DistillStrategy", "distillation_loss", "optagent_register_strategies"]

NO_FINETUNE_NOTE = ("distill is on but recovery fine-tuning is off (finetune.epochs = 0 or the finetune strategy "
                    "is not in the job): nothing to distill, the model is unchanged")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch.

    The T^2 factor keeps the gradient scale of the soft term independent of T.
    """
    import torch.nn.functional as F

    t = float(temperature)
    log_student = F.log_softmax(student / t, dim=-1)
    log_teacher = F.log_softmax(teacher / t, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * (t * t)


def make_loss(teacher: torch.nn.Module, task_loss: Callable[..., torch.Tensor], temperature: float,
              alpha: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss finetune calls as loss_fn(outputs, targets, inputs).

    `task_loss(outputs, targets, inputs)` is the loss the trial had before (another plugin's, or the
    model file's own `loss`, cross-entropy by default).
    """
    import torch

    def loss(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(f"distill needs the model to return one logits tensor, got {type(outputs).__name__}")
        with torch.inference_mode():
            soft_targets = teacher(inputs)
        soft_targets = soft_targets.clone()  # an ordinary tensor, usable in the autograd graph
        return ((1.0 - alpha) * task_loss(outputs, targets, inputs)
                + alpha * distillation_loss(outputs, soft_targets, temperature))

    return loss


class DistillStrategy(Strategy):
    name = "distill"
    stage = Stage.FINETUNE
    description = ("Knowledge distillation during recovery fine-tuning: the compressed model learns from the "
                   "baseline's softened outputs (searched temperature and loss weight).")

    def search_space(self, ctx: SpaceContext) -> list[optagent.Param]:
        on = {"enabled": ["on"]}
        return [
            categorical("enabled", ("off", "on"), help="learn from the baseline (teacher) while fine-tuning"),
            real("temperature", 1.0, 8.0, step=0.5, when=on, help="softmax temperature T of both models"),
            real("alpha", 0.1, 0.9, step=0.1, when=on, help="weight of the distillation term (1 - alpha: labels)"),
        ]

    def off_params(self, ctx: SpaceContext) -> dict[str, Any]:
        return {"enabled": "off"}

    def configure(self, params: dict[str, Any], trial: TrialContext) -> None:
        if params.get("enabled") != "on":
            return
        epochs = int((trial.params.get("finetune") or {}).get("epochs", 0))
        if epochs <= 0:
            trial.notes.append(NO_FINETUNE_NOTE)
            return
        model_file = trial.model_file
        base: Callable[..., Any] = trial.loss_fn or (lambda out, tgt, _inputs: model_file.loss(out, tgt))
        trial.baseline.eval()
        trial.loss_fn = make_loss(trial.baseline, base, float(params["temperature"]), float(params["alpha"]))
        trial.notes.append(f"distilled from the baseline (T={params['temperature']}, alpha={params['alpha']})")

    def apply(self, model: torch.nn.Module, params: dict[str, Any], trial: TrialContext) -> torch.nn.Module:
        return model  # acts through trial.loss_fn (see configure); finetune does the training


@optagent.hookimpl
def optagent_register_strategies(register: Callable[[Strategy], None]) -> None:
    register(DistillStrategy())
