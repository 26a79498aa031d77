"""The attention layers of a transformer, found by name, and the bookkeeping structured pruning needs around them.

Imported lazily by `optagent.plugins.pruning` (it imports torch). Nothing here is specific to one
architecture: attention is any module with q/k/v projection children (or one fused qkv projection) under
the names Hugging Face models and common reimplementations use, the head count comes from the module's
attributes or the model's config, and everything after pruning is recomputed from weight shapes. So
BERT, GPT-2, Llama and their relatives take the same path, and a layout that the recipe gets wrong is
caught by `max_difference` (an exact check) rather than trusted.

Why each piece exists:
- `frozen_layers`: the hidden size (the residual stream) must never shrink. Embeddings, norms and the
  output embeddings (tied or not) are what Torch-Pruning needs told; it then skips every group that would
  narrow them, and layers off the traced path (an unused pooler) keep matching widths.
- `conv1d_as_linear`: GPT-2's `Conv1D` (weight stored [in, out]) is unknown to Torch-Pruning; it is
  swapped for an equivalent `nn.Linear` while pruning and back afterwards, so the model keeps its classes.
- `fix_attention_attributes`: transformers reads head size, GPT-2's `split_size` and Llama's
  `num_key_value_groups` in `forward`, and the config's head counts elsewhere; all must match the weights.
- `masked_reference` / `max_difference`: removing heads or FFN channels computes exactly what the
  original computes with those channels zeroed, so a wrong head mapping shows as a difference.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optagent import inputs as ins

Q_NAMES = frozenset({"query", "q_proj", "q", "q_lin", "wq", "query_proj", "to_q", "q_attn"})
K_NAMES = frozenset({"key", "k_proj", "k", "k_lin", "wk", "key_proj", "to_k"})
V_NAMES = frozenset({"value", "v_proj", "v", "v_lin", "wv", "value_proj", "to_v"})
FUSED_NAMES = frozenset({"qkv", "qkv_proj", "c_attn", "wqkv", "query_key_value", "in_proj", "to_qkv"})
HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_head", "n_heads", "num_attention_heads_per_partition")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
HEAD_DIM_ATTRS = ("attention_head_size", "head_dim", "head_size", "d_head")
WIDTH_ATTRS = ("all_head_size", "split_size", "inner_dim", "inner_size")  # = heads * head size
CONFIG_HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads")
CONFIG_FFN = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim")


class PruningDeclined(Exception):
    """The model has a structure structured pruning will not change safely; the message says which."""


@dataclass
class AttentionSpec:
    """One attention module: its projections and head layout (heads of K/V differ from Q's under GQA)."""

    name: str
    module: nn.Module
    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    fused: nn.Module | None
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def projections(self) -> list[nn.Module]:
        return [m for m in (self.q, self.k, self.v, self.fused) if m is not None]


def out_width(layer: nn.Module) -> int:
    """Output features of a Linear, or of transformers' Conv1D (whose weight is [in, out])."""
    if isinstance(layer, nn.Linear):
        return int(layer.out_features)
    return int(_tensor(layer, "weight").shape[1])


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """A module's weight or bias as a tensor (nn.Module's attribute typing cannot say it is one)."""
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor)
    return value


def _projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _is_conv1d(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2


def configs(model: nn.Module) -> list[Any]:
    """Every distinct Hugging Face config object held by the model's modules (a wrapper may hold several)."""
    seen: set[int] = set()
    found = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict") and id(config) not in seen:
            seen.add(id(config))
            found.append(config)
    return found


def _first_int(objects: Iterable[Any], names: Iterable[str]) -> int | None:
    names = tuple(names)
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None) if obj is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def find_attention(model: nn.Module) -> list[AttentionSpec]:
    """Every attention module: a module with q, k and v projection children, or one fused qkv projection.

    Raises PruningDeclined when a module looks like attention but its widths do not add up (head pruning
    would then cut inside heads), or mixes a separate q with a fused kv (GPT-2 cross-attention).
    """
    model_configs = configs(model)
    specs = []
    for name, module in model.named_modules():
        kids = {n.lower(): c for n, c in module.named_children() if _projection(c)}
        q, k, v, fused = (next((kids[n] for n in kids if n in names), None)
                          for names in (Q_NAMES, K_NAMES, V_NAMES, FUSED_NAMES))
        if not ((q is not None and k is not None and v is not None) or fused is not None):
            continue
        where = name or type(module).__name__
        if fused is not None and q is not None:
            raise PruningDeclined(f"{where} mixes a separate query with a fused key/value projection "
                                  "(cross-attention)")
        own_config = getattr(module, "config", None)
        heads = _first_int([module], HEAD_ATTRS) or _first_int([own_config, *model_configs], CONFIG_HEADS)
        if heads is None:
            raise PruningDeclined(f"{where}: the number of attention heads is neither an attribute nor in the config")
        head_dim = _first_int([module], HEAD_DIM_ATTRS) or _first_int([own_config, *model_configs], ("head_dim",))
        if fused is not None:
            width = out_width(fused)
            head_dim = head_dim or width // (3 * heads)
            if width != 3 * heads * head_dim:
                raise PruningDeclined(f"{where}: fused qkv width {width} is not 3 x {heads} heads x {head_dim} "
                                      "(grouped-query attention in a fused projection)")
            kv_heads = heads
        else:
            assert q is not None and k is not None and v is not None
            head_dim = head_dim or out_width(q) // heads
            if out_width(q) != heads * head_dim or out_width(k) % head_dim or out_width(v) != out_width(k):
                raise PruningDeclined(f"{where}: q/k/v widths {out_width(q)}/{out_width(k)}/{out_width(v)} do not "
                                      f"split into heads of {head_dim}")
            kv_heads = out_width(k) // head_dim
            if heads % kv_heads:
                raise PruningDeclined(f"{where}: {heads} query heads do not share {kv_heads} key/value heads evenly")
        specs.append(AttentionSpec(where, module, q, k, v, fused, heads, kv_heads, head_dim))
    return specs


def hidden_size(model: nn.Module) -> int | None:
    """The width of the residual stream: the config's, else the first embedding's."""
    found = _first_int(configs(model), ("hidden_size", "n_embd", "d_model", "dim"))
    if found:
        return found
    return next((int(m.embedding_dim) for m in model.modules() if isinstance(m, nn.Embedding)), None)


def frozen_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose outputs are the hidden size: every embedding, every norm, the output embeddings."""
    frozen: list[nn.Module] = []
    for module in model.modules():
        kind = type(module).__name__
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) or "Norm" in kind or "Embedding" in kind:
            frozen.append(module)
        get_output = getattr(module, "get_output_embeddings", None)
        if callable(get_output):
            with contextlib.suppress(Exception):
                head = get_output()
                if isinstance(head, nn.Module):
                    frozen.append(head)
    return list({id(m): m for m in frozen}.values())


def loose_parameters(layers: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The parameters of frozen layers that are not Linear or Embedding (an RMSNorm's weight): Torch-Pruning
    treats those as unwrapped parameters and would prune them unless named as ignored."""
    return [p for m in layers if not isinstance(m, nn.Linear | nn.Embedding) for p in m.parameters(recurse=False)]


class _Conv1DAsLinear(nn.Linear):
    """An nn.Linear standing in for a transformers Conv1D while Torch-Pruning works on the model."""

    original: type[nn.Module]


@contextlib.contextmanager
def conv1d_as_linear(model: nn.Module) -> Iterator[None]:
    """Swap every transformers Conv1D for an equivalent nn.Linear, and back (same class) on the way out."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_conv1d(child) and not isinstance(child, _Conv1DAsLinear):
                weight, bias = _tensor(child, "weight"), getattr(child, "bias", None)
                nx, nf = weight.shape
                linear = _Conv1DAsLinear(nx, nf, bias=bias is not None, device=weight.device, dtype=weight.dtype)
                linear.weight = nn.Parameter(weight.detach().t().contiguous())
                if isinstance(bias, torch.Tensor):
                    linear.bias = nn.Parameter(bias.detach().clone())
                linear.original = type(child)
                setattr(parent, name, linear)
    try:
        yield
    finally:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, _Conv1DAsLinear):
                    back = child.original(child.out_features, child.in_features)  # Conv1D(nf, nx)
                    back.weight = nn.Parameter(child.weight.detach().t().contiguous())
                    back.bias = nn.Parameter(child.bias.detach().clone()) if child.bias is not None else None
                    setattr(parent, name, back)


@dataclass(frozen=True)
class LayerHeads:
    """One attention module's head layout after pruning."""

    name: str
    heads: int
    kv_heads: int
    head_dim: int


def fix_attention_attributes(model: nn.Module, specs: list[AttentionSpec]) -> list[LayerHeads]:
    """Recompute every attention module's head counts and widths from its projections' shapes, and the
    config's head counts when every layer agrees (pruning is uniform per layer, so they do).

    Head size never changes (only whole heads are removed). Updates `specs` in place.
    """
    layout = []
    for spec in specs:
        old_width = spec.heads * spec.head_dim
        if spec.fused is not None:
            heads = kv_heads = out_width(spec.fused) // (3 * spec.head_dim)
        else:
            assert spec.q is not None and spec.k is not None
            heads, kv_heads = out_width(spec.q) // spec.head_dim, out_width(spec.k) // spec.head_dim
        module = spec.module
        for attr in HEAD_ATTRS:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, heads)
        for attr in KV_ATTRS:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, kv_heads)
        if isinstance(getattr(module, "num_key_value_groups", None), int):
            setattr(module, "num_key_value_groups", heads // kv_heads)  # noqa: B010 - an int attribute
        for attr in WIDTH_ATTRS:
            if getattr(module, attr, None) == old_width:
                setattr(module, attr, heads * spec.head_dim)
        spec.heads, spec.kv_heads = heads, kv_heads
        layout.append(LayerHeads(spec.name, heads, kv_heads, spec.head_dim))
    uniform = {(lh.heads, lh.kv_heads, lh.head_dim) for lh in layout}
    if len(uniform) == 1:
        heads, kv_heads, head_dim = uniform.pop()
        for config in configs(model):
            _set_existing(config, CONFIG_HEADS, heads)
            _set_existing(config, KV_ATTRS, kv_heads)
            with contextlib.suppress(Exception):  # hidden / heads no longer is the head size
                config.head_dim = head_dim
    return layout


def set_ffn_width(model: nn.Module, width: int) -> None:
    """The config's FFN width (intermediate_size, n_inner, ...) after every layer was pruned to `width`."""
    for config in configs(model):
        for attr in CONFIG_FFN:
            value = getattr(config, attr, 0)
            if (isinstance(value, int) and not isinstance(value, bool)) or (attr == "n_inner" and value is None):
                setattr(config, attr, width)  # GPT-2's n_inner=None means 4 x hidden


def _set_existing(obj: Any, names: Iterable[str], value: int) -> None:
    for name in names:
        if isinstance(getattr(obj, name, None), int) and not isinstance(getattr(obj, name), bool):
            setattr(obj, name, value)


def float_leaves(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (a tensor, a ModelOutput, nested tuples and dicts)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):  # ModelOutput is a dict
        return [t for v in output.values() for t in float_leaves(v)]
    if isinstance(output, tuple | list):
        return [t for v in output for t in float_leaves(v)]
    return []


@torch.no_grad()
def masked_reference(original: nn.Module, pruned: nn.Module) -> nn.Module:
    """A copy of `original` with every input column that `pruned` removed from a layer set to zero.

    The removed columns are found by matching column signatures (a random projection of each column), so
    no bookkeeping of indices is needed; a pruned layer whose columns are not a subset of the original's is
    a broken mapping.
    """
    reference = copy.deepcopy(original)
    modules = dict(reference.named_modules())
    for name, layer in pruned.named_modules():
        twin = modules.get(name)
        weight, old = getattr(layer, "weight", None), getattr(twin, "weight", None)
        if not isinstance(weight, torch.Tensor) or not isinstance(old, torch.Tensor):
            continue
        if weight.dim() != 2 or weight.shape == old.shape:
            continue
        after, before = (weight.t(), old.t()) if _is_conv1d(layer) else (weight, old)  # as [out, in]
        if after.shape[0] != before.shape[0]:
            continue  # rows removed (a producer): the consumer's columns carry the change
        probe = torch.randn(before.shape[0], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        sig_before, sig_after = (before.double() * probe).sum(0), (after.double() * probe).sum(0)
        kept = (sig_after[:, None] - sig_before[None, :]).abs().argmin(1)
        if not torch.equal(before[:, kept], after):
            raise PruningDeclined(f"{name}: the pruned layer's inputs are not a subset of the original's")
        mask = torch.zeros(before.shape[1], dtype=torch.bool)
        mask[kept] = True
        before[:, ~mask] = 0  # a view of the copy's weight
    return reference


@torch.no_grad()
def max_difference(original: nn.Module, pruned: nn.Module, example: Any) -> float:
    """The largest difference between `pruned` and the masked original on `example`, relative to the
    largest output value (inf when the outputs differ in form)."""
    reference = masked_reference(original, pruned).eval()
    was_training = pruned.training
    pruned.eval()
    try:
        got, want = float_leaves(ins.call(pruned, example)), float_leaves(ins.call(reference, example))
    finally:
        pruned.train(was_training)
    if not want or len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want, strict=True)):
        return float("inf")
    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))
               for a, b in zip(got, want, strict=True))
