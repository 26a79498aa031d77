"""One batch of model inputs, whatever its shape: a Tensor, a tuple of tensors, or a dict of named tensors.

A CNN takes `model(x)`; a Hugging Face encoder takes `model(input_ids=..., attention_mask=...)`. The model
file's `example_input()` returns one of these forms and its data sets yield per-sample versions of it, and
every part of optagent that feeds a model goes through this module, so the form is kept everywhere:
latency batches, calibration, runtimes' feeds, export, profile, `apply`. Integer tensors (token ids,
masks) stay integer; the first dimension of every tensor is the batch.

    call(model, x)        model(x), model(*x) or model(**x)
    batch_size(x)         the first dimension of the first tensor
    take(x, start, stop)  rows start:stop of every tensor
    pad_to(x, n)          the last row repeated until every tensor has n rows
    collate(samples)      per-sample inputs stacked into one batch (a DataLoader's default collate)
    named(x)              {name: tensor}: dict keys, or input / input_0, input_1, ... (ONNX, OpenVINO feeds)
    as_args(x)            (args, kwargs) for torch.export, torch.compile and tracers
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

Inputs = Any  # torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def call(model: Callable[..., Any], x: Inputs) -> Any:
    """Run `model` on one batch in its form: dicts as keyword arguments, tuples as positional ones."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple | list):
        return model(*x)
    return model(x)


def leaves(x: Any) -> list[torch.Tensor]:
    """Every tensor inside `x`, in a stable order (dict keys sorted)."""
    if _is_tensor(x):
        return [x]
    if isinstance(x, tuple | list):
        return [t for v in x for t in leaves(v)]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in leaves(x[k])]
    return []


def _map(x: Any, fn: Callable[[Any], Any]) -> Any:
    if _is_tensor(x):
        return fn(x)
    if isinstance(x, tuple | list):
        return type(x)(_map(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    return x


def batch_size(x: Inputs) -> int:
    found = leaves(x)
    if not found or found[0].dim() == 0:
        raise ValueError("the input holds no batched tensor")
    return int(found[0].shape[0])


def take(x: Inputs, start: int, stop: int) -> Inputs:
    return _map(x, lambda t: t[start:stop])


def pad_to(x: Inputs, size: int) -> Inputs:
    """Every tensor grown to `size` rows by repeating its last row (for a model compiled at a fixed batch)."""
    import torch

    def grow(t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0]
        return t if n >= size else torch.cat([t, t[-1:].expand(size - n, *t.shape[1:])])

    return _map(x, grow)


def repeat_to(x: Inputs, size: int) -> Inputs:
    """A batch of exactly `size` rows: cycled through when `x` has fewer, cut when it has more."""
    import torch

    def cycle(t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0]
        return t[:size] if n >= size else t[torch.arange(size) % n]

    return _map(x, cycle)


def to(x: Inputs, device: Any = None, float_dtype: Any = None) -> Inputs:
    """Tensors moved to `device`; floating ones cast to `float_dtype` (integer ids and masks never are)."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if float_dtype is not None and t.is_floating_point():
            t = t.to(float_dtype)
        return t.to(device) if device is not None else t

    return _map(x, move)


def collate(samples: Sequence[Any]) -> Inputs:
    """Per-sample inputs (each a tensor, tuple or dict without a batch dimension) stacked into one batch."""
    from torch.utils.data import default_collate

    return default_collate(list(samples))


def concat(parts: Sequence[Any]) -> Any:
    """Outputs of consecutive slices of one batch joined again along the batch dimension."""
    import torch

    first = parts[0]
    if _is_tensor(first):
        return torch.cat(list(parts))
    if isinstance(first, tuple | list):
        return type(first)(concat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: concat([p[k] for p in parts]) for k in first}
    return first


def named(x: Inputs) -> dict[str, torch.Tensor]:
    """The inputs by name: a dict's own keys, else `input` (one tensor) or `input_0`, `input_1`, ..."""
    if isinstance(x, dict):
        return dict(x)
    if isinstance(x, tuple | list):
        return {f"input_{i}": t for i, t in enumerate(x)}
    return {"input": x}


def from_named(x: Inputs, values: dict[str, Any]) -> Inputs:
    """`values` (by the names `named` gives) back in the form of `x`."""
    if isinstance(x, dict):
        return {k: values[k] for k in x}
    if isinstance(x, tuple | list):
        return type(x)(values[f"input_{i}"] for i in range(len(x)))
    return values["input"]


def as_args(x: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) that `call` would pass."""
    if isinstance(x, dict):
        return (), dict(x)
    if isinstance(x, tuple | list):
        return tuple(x), {}
    return (x,), {}


def batch_dims(x: Inputs) -> Any:
    """A symbolic batch dimension for every input, in the structure torch.export and the dynamo ONNX exporter
    want (by argument: a dict for keyword inputs, a tuple for positional ones)."""
    import torch

    batch = torch.export.Dim("batch")
    if isinstance(x, dict):
        return {k: {0: batch} for k in x}
    if isinstance(x, tuple | list):
        return tuple({0: batch} for _ in x)
    return ({0: batch},)


def signature(x: Any) -> Any:
    """The form of a batch apart from its size: structure, dtypes and shapes without the first dimension."""
    if _is_tensor(x):
        return (str(x.dtype), tuple(x.shape[1:]))
    if isinstance(x, tuple | list):
        return tuple(signature(v) for v in x)
    if isinstance(x, dict):
        return {k: signature(v) for k, v in sorted(x.items())}
    return type(x).__name__


def describe(x: Any) -> str:
    """A short text of a batch's form, for messages: `input_ids int64[1, 32], attention_mask int64[1, 32]`."""
    return ", ".join(f"{name} {str(t.dtype).replace('torch.', '')}{list(t.shape)}"
                     for name, t in named(x).items()) if leaves(x) else type(x).__name__


def is_inputs(x: Any) -> bool:
    """Whether `x` is one of the supported forms with at least one batched tensor."""
    if _is_tensor(x):
        return x.dim() >= 1
    if isinstance(x, tuple | list) and x:
        return all(_is_tensor(v) and v.dim() >= 1 for v in x)
    if isinstance(x, dict) and x:
        return all(isinstance(k, str) and _is_tensor(v) and v.dim() >= 1 for k, v in x.items())
    return False
