"""Structured pruning of transformers: whole attention heads, then FFN channels, the hidden size untouched.

Imported lazily by `optagent.plugins.pruning` (it imports torch; Torch-Pruning is imported when pruning
runs). Pruning a whole model with one flat Torch-Pruning call breaks a transformer: it narrows the
residual stream (so a pooler off the traced path no longer fits) and cuts inside heads (so `view(...,
heads, head_size)` fails). Here the hidden size is frozen (see `_attention.frozen_layers`) and two passes
each leave exactly one kind of group prunable:

- pass A removes the same number of whole heads from every attention layer with Torch-Pruning's
  `num_heads` / `prune_num_heads` (head size kept, so rotary embeddings and reshapes still fit). Under
  grouped-query attention Torch-Pruning removes the same number of query heads from every key/value
  group; a fused qkv projection (GPT-2's `c_attn`) is cut by hand because Torch-Pruning 1.6 maps its
  indices through `split()` wrongly;
- pass B removes FFN intermediate channels (up/gate -> down) from every layer by the same fraction.

The result is checked against the original with the removed channels zeroed (exact up to rounding), and
anything unexpected raises `PruningDeclined`. The model passed in is never modified: pruning works on a
deep copy, which is returned.

Importance: "contribution" is data-aware and forward-only: a channel's (or head's) size at the layer that
consumes it, ||X_j|| * ||W[:, j]||, measured on calibration batches. On MiniLM it kept fidelity 0.02-0.15
cosine better than L1/L2 magnitude before fine-tuning. "l2" (group L2 norm) is the data-free fallback.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optagent import inputs as ins
from optagent.plugins._attention import (
    AttentionSpec,
    PruningDeclined,
    configs,
    conv1d_as_linear,
    find_attention,
    fix_attention_attributes,
    float_leaves,
    frozen_layers,
    hidden_size,
    loose_parameters,
    max_difference,
    set_ffn_width,
)

IMPORTANCES = ("contribution", "l2")
FFN_ROUND_TO = 8  # FFN widths stay multiples of 8: friendlier to vectorised kernels
TOLERANCE = 1e-3  # relative difference to the masked original above which the mapping is wrong (seen: <1e-6)


@dataclass
class Pruned:
    """The pruned copy and what was removed (per attention layer and FFN; pruning is uniform per layer)."""

    model: nn.Module
    layers: int
    heads: tuple[int, int]  # query heads per layer, before -> after
    kv_heads: tuple[int, int]
    ffn: tuple[int, int] | None  # FFN width per layer, before -> after (None: FFN not pruned)
    params: tuple[int, int]
    importance: str
    difference: float  # relative, against the original with the removed channels zeroed


def prune_transformer(model: nn.Module, example: Any, *, heads_removed: int = 0, ffn: float = 0.0,
                      importance: str = "contribution", calibration: Sequence[Any] = ()) -> Pruned:
    """Remove `heads_removed` query heads from every attention layer and the fraction `ffn` of every FFN's
    channels, on a copy of `model`. `example` is one input batch (optagent.inputs form) for tracing and
    the final check; `calibration` holds input batches for the contribution importance."""
    if importance not in IMPORTANCES:
        raise ValueError(f"importance {importance!r} is not one of {IMPORTANCES}")
    if importance == "contribution" and not calibration:
        raise ValueError("contribution importance needs calibration batches")
    original, model = model, copy.deepcopy(model)
    model.eval()
    params_before = _count(model)
    specs_before = find_attention(model)
    if not specs_before:
        raise PruningDeclined("no attention layer was found (no q/k/v or fused qkv projections)")
    heads0, kv0 = specs_before[0].heads, specs_before[0].kv_heads
    if any((s.heads, s.kv_heads) != (heads0, kv0) for s in specs_before):
        raise PruningDeclined("attention layers differ in their head counts")
    _check_heads(heads0, kv0, heads_removed)
    ffn_widths: dict[str, tuple[int, int]] = {}
    with conv1d_as_linear(model), _no_kv_cache(model), _group_size_guard(model), warnings.catch_warnings():
        # Torch-Pruning warns about the norms' weights it treats as unwrapped parameters; they are ignored
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        specs = find_attention(model)
        frozen = frozen_layers(model)
        hidden = {n: p.shape for m in frozen for n, p in m.named_parameters(prefix=str(id(m)))}
        if heads_removed:
            fused = [s for s in specs if s.fused is not None]
            separate = [s for s in specs if s.fused is None]
            with _declining("attention heads"):
                if fused:
                    _prune_fused_heads(model, fused, heads_removed, example, frozen, importance, calibration)
                    fix_attention_attributes(model, fused)
                if separate:
                    _prune_heads(model, separate, heads_removed, example, frozen, importance, calibration)
        layout = fix_attention_attributes(model, specs)  # pass B traces again: shapes must agree first
        if ffn > 0:
            with _declining("FFN channels"):
                ffn_widths = _prune_ffn(model, specs, ffn, example, frozen, importance, calibration)
            if not ffn_widths:
                raise PruningDeclined("no FFN channel group was found (a Linear whose outputs only another Linear "
                                      "consumes, outside attention)")
        if any(p.shape != hidden[n] for m in frozen for n, p in m.named_parameters(prefix=str(id(m)))):
            raise PruningDeclined("pruning changed the hidden size")
    if any(h.heads != heads0 - heads_removed for h in layout):
        raise PruningDeclined(f"Torch-Pruning left {sorted({h.heads for h in layout})} heads per layer where "
                              f"{heads0 - heads_removed} were asked for")
    widths = {after for _, after in ffn_widths.values()}
    if len(widths) > 1:
        raise PruningDeclined(f"FFN layers were pruned to different widths {sorted(widths)}")
    if widths:
        set_ffn_width(model, next(iter(widths)))
    difference = max_difference(original, model, example)
    if not difference <= TOLERANCE:
        raise PruningDeclined(f"the pruned model differs from the original with the same channels zeroed "
                              f"({difference:.1e}): this architecture's head or channel mapping is not the one "
                              "assumed")
    ffn_summary = next(iter(ffn_widths.values())) if ffn_widths else None
    return Pruned(model, len(layout), (heads0, layout[0].heads), (kv0, layout[0].kv_heads), ffn_summary,
                  (params_before, _count(model)), importance, difference)


def _check_heads(heads: int, kv_heads: int, removed: int) -> None:
    """Whole heads, at least one left, and under GQA the same number removed from every key/value group."""
    if removed < 0 or removed >= heads:
        raise PruningDeclined(f"cannot remove {removed} of {heads} heads per layer")
    if kv_heads != heads and removed:
        group = heads // kv_heads
        if removed % kv_heads or removed // kv_heads >= group:
            raise PruningDeclined(f"grouped-query attention ({heads} query heads sharing {kv_heads} key/value heads) "
                                  f"can only lose a multiple of {kv_heads} heads, fewer than {heads}; "
                                  f"{removed} asked for")


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _scalar(output: Any) -> Any:
    """Torch-Pruning's output_transform: one scalar reached from every floating output (HF returns several)."""
    leaves = [t.float().sum() for t in float_leaves(output) if t.requires_grad]
    return sum(leaves[1:], leaves[0]) if leaves else output


def _forward(model: nn.Module, example: Any) -> Any:
    return ins.call(model, example)


@contextlib.contextmanager
def _declining(what: str) -> Iterator[None]:
    """Torch-Pruning's own failures (its GQA index mapping fails for some group sizes) as PruningDeclined."""
    try:
        yield
    except PruningDeclined:
        raise
    except Exception as exc:
        line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise PruningDeclined(f"Torch-Pruning failed to remove {what}: {type(exc).__name__}: {line[:200]}") from exc


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Tracing with a KV cache breaks Torch-Pruning's concat index mapping; the outputs do not need it."""
    saved = [(c, c.use_cache) for c in configs(model) if getattr(c, "use_cache", None) is not None]
    for config, _ in saved:
        config.use_cache = False
    try:
        yield
    finally:
        for config, value in saved:
            config.use_cache = value


@contextlib.contextmanager
def _group_size_guard(model: nn.Module) -> Iterator[None]:
    """Torch-Pruning 1.6 can grow a dependency group forever (seen: Llama with 4 query / 2 key-value heads,
    pass A): bound the group's size so that a hang becomes PruningDeclined within seconds. Real groups stay
    far below the bound."""
    from torch_pruning.dependency import group as tp_group

    limit = 2000 + 20 * sum(1 for _ in model.modules())
    add_dep = tp_group.Group.add_dep

    def bounded(group: Any, dep: Any, idxs: Any) -> Any:
        if len(group._group) > limit:
            raise PruningDeclined(f"Torch-Pruning's dependency group grew past {limit} entries (a known "
                                  "non-terminating case of Torch-Pruning 1.6)")
        return add_dep(group, dep, idxs)

    tp_group.Group.add_dep = bounded
    try:
        yield
    finally:
        tp_group.Group.add_dep = add_dep


class ContributionImportance:
    """||X_j||_2 * ||W[:, j]||_2 at the layer that consumes channel j: the size of the channel's actual
    contribution (Wanda's per-weight score, summed per channel). Call `collect` on calibration batches first.

    Groups without a measured consumer fall back to group L2 magnitude.
    """

    def __init__(self) -> None:
        import torch_pruning as tp

        self._base = tp.importance.GroupMagnitudeImportance(p=2)
        self.squares: dict[nn.Module, torch.Tensor] = {}

    @torch.no_grad()
    def collect(self, model: nn.Module, batches: Sequence[Any]) -> None:
        """Sum of squares of every Linear layer's input features over `batches`."""
        self.squares = {}

        def hook(layer: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            self.squares[layer] = self.squares.get(layer, 0) + (x * x).sum(0)

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
        try:
            for batch in batches:
                ins.call(model, batch)
        finally:
            for handle in handles:
                handle.remove()

    def consumer_scores(self, layer: nn.Module, idxs: Sequence[int]) -> torch.Tensor | None:
        if not isinstance(layer, nn.Linear) or layer not in self.squares:
            return None
        cols = list(idxs)
        return layer.weight.detach()[:, cols].float().norm(dim=0) * self.squares[layer][cols].sqrt()

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor:
        import torch_pruning as tp

        scores, roots = [], []
        for dep, idxs in group:
            if dep.handler == tp.prune_linear_in_channels:
                score = self.consumer_scores(dep.target.module, sorted(idxs))
                if score is not None:
                    scores.append(score)
                    roots.append(dep_root_idxs(group, dep))
        if not scores:
            return self._base(group)
        # the base class's reduction and normalisation, as Torch-Pruning's own importances use them
        return self._base._normalize(self._base._reduce(scores, roots), self._base.normalizer)


def dep_root_idxs(group: Any, dep: Any) -> Any:
    """The root indices that `dep`'s indices map to (Torch-Pruning keeps them per group item)."""
    return next(item.root_idxs for item in group.items if item.dep is dep)


def _importance(kind: str, model: nn.Module, calibration: Sequence[Any]) -> Any:
    """A fresh importance for one pass (activations change after pass A, so contribution is re-measured)."""
    import torch_pruning as tp

    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    importance = ContributionImportance()
    importance.collect(model.eval(), calibration)
    return importance


def _prune_heads(model: nn.Module, specs: list[AttentionSpec], removed: int, example: Any,
                 frozen: list[nn.Module], importance: str, calibration: Sequence[Any]) -> None:
    """Pass A with Torch-Pruning: whole heads of separate q/k/v projections; every other layer is ignored."""
    import torch_pruning as tp

    num_heads: dict[nn.Module, int] = {}
    for s in specs:
        assert s.q is not None and s.k is not None and s.v is not None
        num_heads.update({s.q: s.heads, s.k: s.kv_heads, s.v: s.kv_heads})
    attention = {id(m) for m in num_heads}
    others = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in attention]
    heads = specs[0].heads
    with torch.enable_grad():  # the dependency graph is traced through autograd
        pruner = tp.pruner.MetaPruner(
            model, example, importance=_importance(importance, model, calibration), global_pruning=False,
            # the ratio only opens Torch-Pruning's per-scope gate (head pruning runs inside the channel loop);
            # with prune_head_dims=False no dimension is removed
            pruning_ratio=0.5, ignored_layers=_ignored(frozen, others), num_heads=num_heads,
            prune_num_heads=True, prune_head_dims=False, in_channel_groups={}, out_channel_groups={},
            # ceil(ratio * heads) is the count removed; half a head below the count survives float rounding
            head_pruning_ratio=(removed - 0.5) / heads, round_to=None,
            forward_fn=_forward, output_transform=_scalar)
        for group in pruner.step(interactive=True):
            group.prune()
    model.zero_grad(set_to_none=True)


def _ignored(frozen: Sequence[nn.Module], others: Sequence[nn.Module]) -> list[nn.Module | nn.Parameter]:
    """Torch-Pruning's ignored_layers: the frozen layers, `others`, and the frozen layers' own parameters
    that it sees as unwrapped (an RMSNorm's weight), which it would prune otherwise.

    Fresh dicts go to every MetaPruner for in/out_channel_groups: their defaults are shared mutable dicts
    that Torch-Pruning 1.6 fills with num_heads, which would keep earlier trials' modules alive."""
    return [*frozen, *others, *loose_parameters(frozen)]


@torch.no_grad()
def _prune_fused_heads(model: nn.Module, specs: list[AttentionSpec], removed: int, example: Any,
                       frozen: list[nn.Module], importance: str, calibration: Sequence[Any]) -> None:
    """Whole heads of fused [q | k | v] projections (GPT-2's c_attn), by hand: rows from all three blocks and
    the matching columns of the one layer that consumes the attention output (found by Torch-Pruning's
    dependency graph). The [q | k | v] layout is an assumption the final check verifies."""
    import torch_pruning as tp

    contribution = _importance(importance, model, calibration) if importance == "contribution" else None
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(
            model, example, forward_fn=_forward, output_transform=_scalar,
            ignored_params=loose_parameters(frozen))
    for s in specs:
        fused, heads, dim = s.fused, s.heads, s.head_dim
        assert isinstance(fused, nn.Linear)
        group = graph.get_pruning_group(fused, tp.prune_linear_out_channels, idxs=[0])
        consumers = list({id(d.target.module): d.target.module for d, _ in group
                          if d.handler == tp.prune_linear_in_channels and d.target.module is not fused}.values())
        if len(consumers) != 1 or not isinstance(consumers[0], nn.Linear) or \
                consumers[0].in_features != heads * dim:
            raise PruningDeclined(f"{s.name}: the output projection of the fused qkv layer was not found")
        out = consumers[0]
        score = torch.zeros(heads)
        for h in range(heads):
            rows = [part * heads * dim + h * dim + i for part in range(3) for i in range(dim)]
            cols = list(range(h * dim, (h + 1) * dim))
            measured = contribution.consumer_scores(out, cols) if contribution is not None else None
            score[h] = measured.sum() if measured is not None else (
                fused.weight[rows].float().norm(dim=1).sum() + out.weight[:, cols].float().norm(dim=0).sum())
        drop = sorted(torch.topk(score, removed, largest=False).indices.tolist())
        tp.prune_linear_out_channels(fused, [p * heads * dim + h * dim + i for p in range(3) for h in drop
                                             for i in range(dim)])
        tp.prune_linear_in_channels(out, [h * dim + i for h in drop for i in range(dim)])


def _prune_ffn(model: nn.Module, specs: list[AttentionSpec], fraction: float, example: Any,
               frozen: list[nn.Module], importance: str, calibration: Sequence[Any]) -> dict[str, tuple[int, int]]:
    """Pass B: with the attention projections ignored, the prunable groups left are channels a Linear produces
    and another consumes (FFN up/gate -> down). Groups that produce an output nothing consumes (a classifier,
    a pooler whose result is returned) are skipped: their width is the model's output; so are layers as wide
    as the hidden size (a pooler feeding a classifier), which are not FFN channels. Returns the widths of the
    layers whose outputs shrank, by name."""
    import torch_pruning as tp

    widths = {n: m.out_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    hidden = hidden_size(model)
    others = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == hidden]
    with torch.enable_grad():
        pruner = tp.pruner.MetaPruner(
            model, example, importance=_importance(importance, model, calibration), global_pruning=False,
            pruning_ratio=fraction,
            ignored_layers=_ignored(frozen, [*(p for s in specs for p in s.projections), *others]),
            round_to=FFN_ROUND_TO, in_channel_groups={}, out_channel_groups={}, num_heads={},
            forward_fn=_forward, output_transform=_scalar)
        for group in pruner.step(interactive=True):
            produced = {id(d.target.module) for d, _ in group if pruner.DG.is_out_channel_pruning_fn(d.handler)}
            consumed = any(d.handler == tp.prune_linear_in_channels and id(d.target.module) not in produced
                           for d, _ in group)
            if consumed:
                group.prune()
    model.zero_grad(set_to_none=True)
    return {n: (widths[n], m.out_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n in widths and m.out_features != widths[n]}

