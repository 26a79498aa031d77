"""Recovery fine-tuning with a searched optimizer and learning-rate schedule.

Runs after compression (pruning) and before quantization, on the model file's train split. Training is
deterministic under the trial seed (seeded shuffling and `torch.manual_seed`), and weights that are exactly
zero when training starts (unstructured pruning) stay zero: their masks are re-applied after every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from optagent import inputs as ins
from optagent.errors import TrialFailed
from optagent.hookspecs import hookimpl
from optagent.plugins._util import model_device, to_device, zero_masks
from optagent.plugins.pruning import offered_methods
from optagent.strategy import (
    Param,
    Params,
    SpaceContext,
    Stage,
    Strategy,
    TrialContext,
    categorical,
    integer,
    real,
)

if TYPE_CHECKING:
    import torch

MAX_EPOCHS = 3  # trials on a 2-core CPU: recovery, not training from scratch
MAX_STEPS = 600  # optimizer steps per trial at most, whatever the train split's size (a note says when it cuts)
REPORT_SAMPLES = 256  # eval samples behind each early-stopping report
REPORTS_PER_EPOCH = 2  # on epochs of more than LONG_EPOCH steps, also report halfway
LONG_EPOCH = 200
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine", "onecycle")
# Each optimizer gets its own learning-rate range: a good SGD rate wrecks a model under Adam.
LR_RANGES = {"sgd": (1e-3, 1e-1), "adam": (1e-5, 1e-2)}
SGD_MOMENTUM = 0.9
EPOCH_CHOICES = tuple(range(1, MAX_EPOCHS + 1))


def lr_factor(schedule: str, warmup: float, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step `i` (for LambdaLR).

    A linear warmup over the first `warmup` fraction of steps, then: constant; step (x0.1 at 50% and
    75% of the remaining steps); or cosine decay to zero.
    """
    warm = int(round(warmup * total_steps))

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / (warm + 1)
        t = (i - warm) / max(total_steps - warm, 1)
        if schedule == "step":
            return 0.01 if t >= 0.75 else 0.1 if t >= 0.5 else 1.0
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        return 1.0

    return factor


class FinetuneStrategy(Strategy):
    name = "finetune"
    stage = Stage.FINETUNE
    description = ("Recovery fine-tuning after compression: epochs, optimizer (SGD/Adam), learning rate, "
                   "schedule (constant/step/cosine/one-cycle) and warmup. Pruned weights stay pruned.")

    def search_space(self, ctx: SpaceContext) -> list[Param]:
        on = {"epochs": EPOCH_CHOICES}
        # fine-tuning a model nothing compressed only trains the baseline further (and at a high rate loses
        # accuracy): with pruning in the job it is searched only in trials that prune
        when = {"pruning.method": [m for m in offered_methods(ctx) if m != "none"]} if "pruning" in ctx.searched \
            else None
        return [
            integer("epochs", 0, MAX_EPOCHS, when=when, help="passes over the train split; 0 = no fine-tuning"),
            categorical("optimizer", OPTIMIZERS, when=on, help="SGD (momentum 0.9) or Adam"),
            real("sgd_lr", *LR_RANGES["sgd"], log=True, when={"optimizer": ["sgd"]}, help="peak SGD learning rate"),
            real("adam_lr", *LR_RANGES["adam"], log=True, when={"optimizer": ["adam"]},
                 help="peak Adam learning rate"),
            categorical("schedule", SCHEDULES, when=on, help="learning-rate schedule over all steps"),
            real("warmup", 0.0, 0.3, step=0.05, when={"schedule": ["constant", "step", "cosine"]},
                 help="fraction of steps with a linear warmup (one-cycle has its own 30% ramp)"),
        ]

    def off_params(self, ctx: SpaceContext) -> Params:
        return {} if "pruning" in ctx.searched else {"epochs": 0}

    def is_off(self, params: Params, ctx: SpaceContext) -> bool:
        return not params.get("epochs")

    def apply(self, model: torch.nn.Module, params: Params, trial: TrialContext) -> torch.nn.Module:
        epochs = int(params.get("epochs", 0))
        if epochs <= 0:
            return model
        return train(model, trial, epochs=epochs, optimizer=params["optimizer"],
                     lr=float(params[f"{params['optimizer']}_lr"]), schedule=params["schedule"],
                     warmup=float(params.get("warmup", 0.0)))


def train(model: torch.nn.Module, trial: TrialContext, *, epochs: int, optimizer: str, lr: float,
          schedule: str, warmup: float = 0.0) -> torch.nn.Module:
    """Fine-tune `model` in place on the train split; returns it in eval mode."""
    import torch

    if optimizer not in OPTIMIZERS or schedule not in SCHEDULES:
        raise TrialFailed(f"finetune: unknown optimizer {optimizer!r} or schedule {schedule!r}")
    torch.manual_seed(trial.seed)
    device = model_device(model, trial.device)
    loader = trial.model_file.loader("train", trial.train_batch_size, shuffle=True, seed=trial.seed)
    total = min(epochs * len(loader), MAX_STEPS)
    if total == 0:
        return model
    if total < epochs * len(loader):
        trial.notes.append(f"finetune: capped at {MAX_STEPS} steps ({total / len(loader):.2f} of {epochs} epochs)")
    report = _reporter(trial, total, len(loader))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrialFailed("finetune: the model has no trainable parameters")
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)
    else:
        opt = torch.optim.Adam(params, lr=lr)
    sched: torch.optim.lr_scheduler.LRScheduler
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.3)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(schedule, warmup, total))
    masks = zero_masks(model)
    loss_of = trial.loss_fn

    report(model, 0)
    model.train()
    step = 0
    try:
        with torch.enable_grad():  # the pipeline may run under no_grad
            for inputs, targets in _batches(loader, total):
                step += 1
                with trial.compute():  # one step at a time: a trial timing on this host gets in between
                    inputs, targets = to_device(inputs, device), to_device(targets, device)
                    opt.zero_grad(set_to_none=True)
                    outputs = ins.call(model, inputs)
                    loss = (loss_of(outputs, targets, inputs) if loss_of is not None
                            else trial.model_file.loss(outputs, targets))
                    if not torch.isfinite(loss):
                        raise TrialFailed(f"finetune diverged (loss {loss.item()}) with {optimizer} "
                                          f"lr={lr:.2g}; the search will try other rates")
                    loss.backward()
                    opt.step()
                    sched.step()
                    with torch.no_grad():
                        for param, keep in masks:
                            param.mul_(keep)
                report(model, step)
    finally:
        model.eval()
    return model


def _batches(loader: Any, total: int) -> Iterator[Any]:
    """`total` batches: passes over the loader (reshuffled each pass), the last one cut short."""
    step = 0
    while True:
        for batch in loader:
            if step >= total:
                return
            step += 1
            yield batch


def _reporter(trial: TrialContext, total: int, per_epoch: int) -> Callable[[torch.nn.Module, int], None]:
    """Reports the constraint metric (on a slice of the eval split) at step 0, each epoch's end, halfway
    through long epochs and the last step, for early stopping (optagent.trial.early_stop)."""
    constraint, spec = trial.constraint, trial.settings.get("pruner") or {}
    if constraint is None or constraint.bound is None or spec.get("kind", "none") == "none":
        return lambda model, step: None
    from optagent.trial.early_stop import checker

    trial.should_stop = checker(spec, constraint, total)
    every = per_epoch // REPORTS_PER_EPOCH if per_epoch > LONG_EPOCH else per_epoch

    def report(model: torch.nn.Module, step: int) -> None:
        if step != 0 and step != total and step % max(every, 1):
            return
        with trial.compute():
            value = trial.model_file.evaluate(model.eval(), limit=REPORT_SAMPLES)[constraint.metric]
        model.train()
        trial.report(step, value)

    return report


@hookimpl
def optagent_register_strategies(register: Callable[[Strategy], None]) -> None:
    register(FinetuneStrategy())
