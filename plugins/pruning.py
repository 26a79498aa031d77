"""Magnitude pruning: structured (channels/neurons physically removed) or unstructured (weights zeroed).

Structured pruning uses Torch-Pruning's dependency graph, so every layer that consumes a removed channel
(BatchNorm, the next conv, a Linear after a flatten, residual adds) shrinks consistently and the smaller
dense model is faster on ordinary kernels. Unstructured pruning zeroes the smallest weights globally; it
changes accuracy and sparsity figures but no dense kernel runs faster for it (pytorch #36214), which the
trial notes say.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from optagent import inputs as ins
from optagent.errors import TrialFailed
from optagent.hookspecs import hookimpl
from optagent.plugins._util import classifier_layers, example_batch, layer_width, prunable_weights
from optagent.strategy import Param, Params, SpaceContext, Stage, Strategy, TrialContext, categorical, real

if TYPE_CHECKING:
    import torch

METHODS = ("none", "unstructured", "structured")
# unstructured sparsity saves no time on dense kernels: it is searched only when an objective rewards it
SPARSITY_OBJECTIVES = frozenset({"nonzero_params", "sparsity"})
UNSTRUCTURED_NOTE = ("unstructured pruning only zeroes weights: dense kernels run no faster, so expect no "
                     "latency gain (use structured pruning for speed)")


def _round_to(model: torch.nn.Module, ignored: list[torch.nn.Module]) -> int | None:
    """Keep channel counts multiples of 8 (friendlier to vectorised kernels) when layers are wide enough.

    On narrow layers rounding would swallow the requested fraction, so it is skipped there.
    """
    widths = [layer_width(m) for m, _ in prunable_weights(model) if m not in ignored]
    return 8 if widths and min(widths) >= 32 else None


def prune_structured(model: torch.nn.Module, amount: float, example: torch.Tensor) -> torch.nn.Module:
    """Remove `amount` of every prunable layer's output channels by L1 magnitude (Torch-Pruning)."""
    import torch
    import torch_pruning as tp

    ignored = classifier_layers(model, example)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        shape_before = _shapes(ins.call(model, example))
    try:
        with torch.enable_grad():  # the dependency graph is traced through autograd
            pruner = tp.pruner.MetaPruner(
                model, example, importance=tp.importance.MagnitudeImportance(p=1),
                pruning_ratio=amount, ignored_layers=ignored, round_to=_round_to(model, ignored),
            )
            pruner.step()
    except Exception as exc:
        raise TrialFailed(f"structured pruning could not trace {type(model).__name__}: {type(exc).__name__}: "
                          f"{exc}; try unstructured pruning or exclude the pruning strategy") from exc
    finally:
        model.train(was_training)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        shape_after = _shapes(ins.call(model.eval(), example))
    model.train(was_training)
    if shape_after != shape_before:
        raise TrialFailed(f"structured pruning changed the output shape from {shape_before} to {shape_after}: "
                          "the final layer could not be identified; use unstructured pruning for this model")
    return model


def _shapes(value: object) -> object:
    """The shape(s) of a model output: a tensor, or tensors nested in tuples/lists/dicts."""
    import torch

    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, tuple | list):
        return [_shapes(v) for v in value]
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    return None


def prune_unstructured(model: torch.nn.Module, amount: float) -> torch.nn.Module:
    """Zero the `amount` smallest-|w| weights across all Linear/Conv layers, then make it permanent."""
    from torch.nn.utils import prune

    targets = prunable_weights(model)
    if not targets:
        raise TrialFailed(f"{type(model).__name__} has no Linear or Conv layers to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in targets:
        prune.remove(module, name)  # drop the mask hooks: a plain dense tensor with zeros remains
    return model


class PruningStrategy(Strategy):
    name = "pruning"
    stage = Stage.COMPRESS
    description = ("Magnitude pruning: structured removes channels/neurons (Torch-Pruning dependency graph) "
                   "and makes the model smaller and faster; unstructured zeroes weights (no speedup).")

    def search_space(self, ctx: SpaceContext) -> list[Param]:
        sparse = any(o.metric in SPARSITY_OBJECTIVES for o in ctx.objectives)
        methods = [m for m in METHODS if m != "unstructured" or sparse]
        return [
            categorical("method", methods, help="none, structured (channels removed) or, when an objective rewards "
                                                "sparsity, unstructured (global L1, zeros)"),
            real("amount", 0.1, 0.7, step=0.05, when={"method": methods[1:]},
                 help="fraction of weights (unstructured) or of each layer's channels (structured) removed"),
        ]

    def off_params(self, ctx: SpaceContext) -> Params:
        return {"method": "none"}

    def apply(self, model: torch.nn.Module, params: Params, trial: TrialContext) -> torch.nn.Module:
        method = params.get("method", "none")
        if method == "none":
            return model
        if method not in METHODS:
            raise TrialFailed(f"pruning method {method!r} is unknown; use one of {', '.join(METHODS)}")
        amount = float(params["amount"])
        before = sum(p.numel() for p in model.parameters())
        if method == "structured":
            model = prune_structured(model, amount, example_batch(trial, model, 1))
            after = sum(p.numel() for p in model.parameters())
            trial.notes.append(f"structured pruning removed {1 - after / max(before, 1):.0%} of parameters "
                               f"({before:,} -> {after:,})")
        else:
            model = prune_unstructured(model, amount)
            trial.notes.append(UNSTRUCTURED_NOTE)
        return model


@hookimpl
def optagent_register_strategies(register: Callable[[Strategy], None]) -> None:
    register(PruningStrategy())
