"""Magnitude pruning: structured (channels/neurons physically removed) or unstructured (weights zeroed).

Structured pruning uses Torch-Pruning's dependency graph, so every layer that consumes a removed channel
(BatchNorm, the next conv, a Linear after a flatten, residual adds) shrinks consistently and the smaller
dense model is faster on ordinary kernels. Unstructured pruning zeroes the smallest weights globally; it
changes accuracy and sparsity figures but no dense kernel runs faster for it (pytorch #36214), which the
trial notes say.

Transformers (the baseline trial's `model_info["transformer"]`, or attention found in the model) are pruned
differently: a flat channel cut narrows the hidden size and cuts inside heads, which breaks them. Their
space searches `heads`, the fraction of attention heads removed from every layer (whole heads), and `ffn`,
the fraction of FFN channels removed, with at least one of them non-zero; the hidden size never changes.
Channels are ranked by their measured contribution on calibration batches (l2 magnitude without data).
See `_transformer_prune` for how, and why; a model the recipe cannot prune safely fails the trial with the
reason instead of producing a broken model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from optagent import inputs as ins
from optagent.errors import TrialFailed
from optagent.hookspecs import hookimpl
from optagent.plugins._util import (
    classifier_layers,
    example_batch,
    layer_width,
    model_device,
    prunable_weights,
    to_device,
)
from optagent.strategy import Param, Params, SpaceContext, Stage, Strategy, TrialContext, categorical, real

if TYPE_CHECKING:
    import torch

METHODS = ("none", "unstructured", "structured")
# unstructured sparsity saves no time on dense kernels: it is searched only when an objective rewards it
SPARSITY_OBJECTIVES = frozenset({"nonzero_params", "sparsity"})


def offered_methods(ctx: SpaceContext) -> list[str]:
    """The pruning methods searched: unstructured only when an objective rewards sparsity."""
    sparse = any(o.metric in SPARSITY_OBJECTIVES for o in ctx.objectives)
    return [m for m in METHODS if m != "unstructured" or sparse]


UNSTRUCTURED_NOTE = ("unstructured pruning only zeroes weights: dense kernels run no faster, so expect no "
                     "latency gain (use structured pruning for speed)")
FFN_STEP, FFN_MAX = 0.125, 0.75  # fraction of FFN channels removed from every layer
MAX_HEAD_FRACTION = 0.5  # at most half of every layer's heads
CALIBRATION_SAMPLES = 256  # behind the contribution importance: enough to rank channels, a few forward passes
CALIBRATION_BATCH = 32


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


def gqa_prunable(group: int) -> bool:
    """Whether Torch-Pruning 1.6 removes heads correctly under grouped-query attention with `group` query heads
    per key/value head. Tried on Llama layouts: 4, 8 and 16 work; 2 never finishes building its groups
    (declined by a guard), 3, 5, 6 and 7 fail in its importance reshape."""
    return group >= 4 and group & (group - 1) == 0


def removable_heads(heads: int, kv_heads: int) -> list[int]:
    """The head counts a trial may remove from every layer, 0 included: whole heads, at most half of them;
    under grouped-query attention the same number from every key/value group (a multiple of kv_heads)."""
    kv_heads = kv_heads or heads
    if heads < 2 or heads % kv_heads:
        return [0]
    step = 1 if kv_heads == heads else kv_heads
    if step > 1 and not gqa_prunable(heads // kv_heads):
        return [0]
    return list(range(0, int(heads * MAX_HEAD_FRACTION) + 1, step))


def head_fractions(heads: int, kv_heads: int) -> list[float]:
    """`removable_heads` as fractions of the layer's heads (what the space searches: comparable across models).

    Categorical rather than a stepped float: a step of 1/12 is not exact in decimal, and Optuna then rewrites
    the range with a warning."""
    return [round(n / heads, 4) for n in removable_heads(heads, kv_heads)]


def _transformer_space(info: dict[str, Any]) -> list[Param]:
    """`heads` then `ffn`; `ffn` has a second variant without 0 for trials that remove no head, so no point
    of the space leaves the model unchanged (the off point is method `none`)."""
    fractions = head_fractions(int(info.get("heads") or 0), int(info.get("kv_heads") or 0))
    on = {"method": ["structured"]}
    ffn_help = "fraction of every FFN's intermediate channels removed"
    if len(fractions) < 2:
        return [real("ffn", FFN_STEP, FFN_MAX, step=FFN_STEP, when=on, help=ffn_help)]
    return [
        categorical("heads", fractions, when=on,
                    help="fraction of every attention layer's heads removed (whole heads)"),
        real("ffn", 0.0, FFN_MAX, step=FFN_STEP, when={"heads": fractions[1:]}, help=ffn_help),
        real("ffn", FFN_STEP, FFN_MAX, step=FFN_STEP, when={"heads": [0.0]}, variant="alone",
             help=ffn_help + " (at least some: no head is removed)"),
    ]


def prune_transformer(model: torch.nn.Module, heads: float, ffn: float, trial: TrialContext) -> torch.nn.Module:
    """Remove the fraction `heads` of every attention layer's heads and `ffn` of every FFN's channels.

    The model is left as it was if pruning is declined (the pruning works on a copy); a decline is a
    TrialFailed whose reason says what to change.
    """
    from optagent.plugins._attention import PruningDeclined, find_attention
    from optagent.plugins._transformer_prune import prune_transformer as prune

    what = type(model).__name__
    try:
        specs = find_attention(model)
    except PruningDeclined as exc:
        raise TrialFailed(f"structured pruning cannot prune {what}: {exc}; use unstructured pruning or leave "
                          "pruning out of --strategies") from exc
    if not specs:
        raise TrialFailed(f"structured pruning found no attention layer in {what} (no q/k/v or fused qkv "
                          "projection by a known name); leave pruning out of --strategies for this model")
    total, kv = specs[0].heads, specs[0].kv_heads
    removed = int(round(heads * total))
    if removed not in removable_heads(total, kv):
        raise TrialFailed(f"structured pruning cannot remove {removed} of {total} heads per layer "
                          f"({kv} key/value heads): allowed are {removable_heads(total, kv)}; prune FFN "
                          "channels only (heads 0)")
    batches, importance = _calibration(model, trial)
    try:
        result = prune(model, example_batch(trial, model, 1), heads_removed=removed, ffn=ffn, importance=importance,
                       calibration=batches)
    except PruningDeclined as exc:
        fix = "prune FFN channels only (heads 0)" if removed else "leave pruning out of --strategies for this model"
        raise TrialFailed(f"structured pruning of {what} declined: {exc}; {fix}") from exc
    (h0, h1), (p0, p1) = result.heads, result.params
    parts = [f"{h0 - h1} of {h0} attention heads" if h1 != h0 else "",
             f"{result.ffn[0] - result.ffn[1]} of {result.ffn[0]} FFN channels" if result.ffn else ""]
    trial.notes.append(f"structured pruning removed {' and '.join(p for p in parts if p)} in each of "
                       f"{result.layers} layers; "
                       f"parameters {p0:,} -> {p1:,} (-{1 - p1 / max(p0, 1):.0%}); importance: {importance}"
                       + (f" on {sum(ins.batch_size(b) for b in batches)} calibration samples" if batches else ""))
    return result.model


def _calibration(model: torch.nn.Module, trial: TrialContext) -> tuple[list[Any], str]:
    """Calibration batches for the contribution importance, or none and "l2" when the model file has no data
    to give (the reason goes into the notes)."""
    device = model_device(model, trial.device)
    try:
        loader = trial.model_file.loader("calibration", CALIBRATION_BATCH, limit=CALIBRATION_SAMPLES)
        batches = [to_device(inputs, device) for inputs, _targets in loader]
    except Exception as exc:
        trial.notes.append(f"pruning ranks channels by l2 magnitude: no calibration batches ({type(exc).__name__}: "
                           f"{exc})")
        return [], "l2"
    return (batches, "contribution") if batches else ([], "l2")


def _has_attention(model: torch.nn.Module) -> bool:
    """Attention found in a model the baseline trial did not report as a transformer (no HF config)."""
    from optagent.plugins._attention import PruningDeclined, find_attention

    try:
        return bool(find_attention(model))
    except PruningDeclined:
        return True  # attention-like but unusual: the transformer path declines it with the reason


class PruningStrategy(Strategy):
    name = "pruning"
    stage = Stage.COMPRESS
    description = ("Magnitude pruning: structured removes channels/neurons (Torch-Pruning dependency graph) "
                   "and makes the model smaller and faster; unstructured zeroes weights (no speedup).")

    def search_space(self, ctx: SpaceContext) -> list[Param]:
        sparse = any(o.metric in SPARSITY_OBJECTIVES for o in ctx.objectives)
        methods = offered_methods(ctx)
        method = categorical("method", methods, help="none, structured (channels removed) or, when an objective "
                                                     "rewards sparsity, unstructured (global L1, zeros)")
        transformer = ctx.model_info.get("transformer")
        if transformer:
            amount = [real("amount", 0.1, 0.7, step=0.05, when={"method": ["unstructured"]},
                           help="fraction of weights zeroed")] if sparse else []
            return [method, *amount, *_transformer_space(transformer)]
        return [
            method,
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
        if method == "structured" and ("heads" in params or "ffn" in params):
            return prune_transformer(model, float(params.get("heads", 0.0)), float(params.get("ffn", 0.0)), trial)
        amount = float(params["amount"])
        before = sum(p.numel() for p in model.parameters())
        if method == "structured" and _has_attention(model):
            # a transformer the baseline trial did not recognise (no config): channel pruning would break it
            trial.notes.append(f"pruning found attention layers: `amount` {amount} prunes FFN channels only")
            return prune_transformer(model, 0.0, amount, trial)
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
