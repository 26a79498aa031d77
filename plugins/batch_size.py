"""Batch sizes: the training batch for recovery fine-tuning and, when it is meaningful, the serving batch.

The inference batch is searched only when an objective is per sample (``throughput`` or
``latency_per_sample_ms``). Against per-call latency a smaller batch always wins and against accuracy the
batch is irrelevant, so there it stays at the model file's default (the example input's first dimension).
The training batch is searched only in trials that fine-tune (``finetune.epochs`` > 0); elsewhere it would
change nothing and only dilute the sampler's statistics. The strategy changes no weights: it publishes its
choices in `configure` for fine-tuning and measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from optagent.hookspecs import hookimpl
from optagent.plugins.finetune import EPOCH_CHOICES
from optagent.strategy import Param, Params, SpaceContext, Stage, Strategy, TrialContext, categorical

if TYPE_CHECKING:
    import torch

TRAIN_CHOICES = (32, 64, 128)
DEFAULT_TRAIN = 64
INFER_CHOICES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PER_SAMPLE_OBJECTIVES = frozenset({"throughput", "latency_per_sample_ms"})


def searches_infer(ctx: SpaceContext) -> bool:
    return any(o.metric in PER_SAMPLE_OBJECTIVES for o in ctx.objectives)


def infer_choices(default: int) -> tuple[int, ...]:
    """Powers of two from 1 to 256, plus the model file's default batch if it is not one of them."""
    return tuple(sorted({*INFER_CHOICES, max(int(default), 1)}))


class BatchSizeStrategy(Strategy):
    name = "batch_size"
    stage = Stage.DEPLOY
    description = ("Training batch size for recovery fine-tuning, and the serving batch size when an objective "
                   "is per sample (throughput, latency_per_sample_ms).")

    def search_space(self, ctx: SpaceContext) -> list[Param]:
        space = [categorical("train", TRAIN_CHOICES, when={"finetune.epochs": EPOCH_CHOICES},
                             help="batch size of recovery fine-tuning (searched when fine-tuning runs)")]
        if searches_infer(ctx):
            space.append(categorical("infer", infer_choices(ctx.default_batch_size),
                                     help="batch size the model is served and measured at"))
        return space

    def off_params(self, ctx: SpaceContext) -> Params:
        off: Params = {}  # the off point does not fine-tune, so `train` is inactive there
        if searches_infer(ctx):
            off["infer"] = max(int(ctx.default_batch_size), 1)
        return off

    def configure(self, params: Params, trial: TrialContext) -> None:
        trial.settings["train_batch_size"] = int(params.get("train", DEFAULT_TRAIN))
        if "infer" in params:
            trial.settings["infer_batch_size"] = int(params["infer"])

    def apply(self, model: torch.nn.Module, params: Params, trial: TrialContext) -> torch.nn.Module:
        return model  # the choices act through trial.settings (see configure)


@hookimpl
def optagent_register_strategies(register: Callable[[Strategy], None]) -> None:
    register(BatchSizeStrategy())
