"""Helpers shared by the built-in strategies (private: not part of the plugin API).

The general ones (`model_device`, `to_device`, `example_batch`, `is_quantized`, `state_tensors`,
`weight_tensors`) are public in `optagent.torchutils` and re-exported here under their old names; a
third-party plugin imports them from there.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from optagent import inputs as ins
from optagent.torchutils import (  # noqa: F401 - re-exported for the built-ins
    example_batch,
    is_quantized,
    model_device,
    state_tensors,
    to_device,
    weight_tensors,
)

if TYPE_CHECKING:
    import torch


def output_dim(model: torch.nn.Module, example: Any) -> int | None:
    """The size of the last dimension of the model's output on `example`, if the output is one tensor."""
    import torch

    with torch.no_grad():
        out = ins.call(model, example)
    return int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.dim() > 0 else None


def classifier_layers(model: torch.nn.Module, example: torch.Tensor) -> list[torch.nn.Module]:
    """The final classifier: the last Linear/Conv whose output width equals the model's output width.

    Pruning its outputs would change the model's output shape, so structured pruning leaves it alone.
    Without a width match the last Linear/Conv is taken (and the pruner checks the output shape after).
    """
    import torch

    width = output_dim(model, example)
    layers: list[torch.nn.Module] = [m for m in model.modules()
                                     if isinstance(m, torch.nn.Linear | torch.nn.modules.conv._ConvNd)]
    matching = [m for m in layers if layer_width(m) == width]
    if matching:
        return matching[-1:]
    return layers[-1:]  # no width match (the output is reshaped or not a tensor): protect the last layer


def layer_width(layer: torch.nn.Module) -> int:
    import torch

    if isinstance(layer, torch.nn.Linear):
        return layer.out_features
    return int(getattr(layer, "out_channels", 0))


def prunable_weights(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(module, "weight") for every Linear and Conv layer: the tensors magnitude pruning acts on."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
    return [(m, "weight") for m in model.modules() if isinstance(m, kinds) and isinstance(m.weight, torch.Tensor)]


def zero_masks(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, keep-mask) for every weight matrix/kernel holding exact zeros.

    Fine-tuning multiplies these back after each optimizer step, so a pruned weight stays pruned
    (momentum and Adam's running averages would otherwise revive it).
    """
    import torch

    masks = []
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and param.is_floating_point():
                keep = param != 0
                if not bool(keep.all()):
                    masks.append((param, keep))
    return masks


@contextlib.contextmanager
def quiet_torch_ao() -> Iterator[None]:
    """Silence torch.ao.quantization's deprecation notices (one per call, they would flood worker logs).

    The deprecation is known and handled: the quantization strategy isolates torch.ao behind a backend
    interface so a torchao backend can replace it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions .* are deprecated",
                                category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*must run observer before calling calculate_qparams",
                                category=UserWarning)
        yield


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Silence what a toolchain prints while it works: the named loggers below ERROR, warnings, and stdout
    and stderr (exporters print progress and, on failure, whole graphs; NNCF draws progress bars). Its
    exceptions still propagate: callers turn them into one-line trial failures."""
    import io
    import logging

    found = [logging.getLogger(n) for n in loggers]
    levels = [lg.level for lg in found]
    for lg in found:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(found, levels, strict=True):
            lg.setLevel(level)

