"""Small helpers shared by the built-in strategies and metrics (private: not part of the plugin API)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from optagent import inputs as ins

if TYPE_CHECKING:
    import torch

    from optagent.strategy import TrialContext


def model_device(model: torch.nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of the model's first parameter or buffer (`default` for a model without tensors)."""
    import torch

    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device(default)


def to_device(value: Any, device: torch.device) -> Any:
    """Move a tensor, or the tensors inside a tuple/list/dict, to `device`."""
    return ins.to(value, device)


def example_batch(trial: TrialContext, model: torch.nn.Module, size: int | None = 1) -> Any:
    """The model file's example input trimmed to `size` samples (None = as given), on the model's device."""
    example = trial.model_file.example_input()
    if size is not None:
        example = ins.take(example, 0, size)
    return ins.to(example, model_device(model, trial.device))


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


def is_quantized(model: Any) -> bool:
    """Whether the model holds quantized (integer) modules or tensors, which FLOP counting cannot see."""
    import torch

    for module in model.modules():
        if type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized",
                                               "torch.nn.quantized")):
            return True
    return any(isinstance(v, torch.Tensor) and v.is_quantized for v in model.state_dict().values())


def state_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a state_dict value (quantized modules keep tuples of packed tensors)."""
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from state_tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from state_tensors(v)


def weight_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's weights and biases, float or quantized, each once.

    Quantized modules have no `parameters()`: their weights sit behind `weight()` / `bias()` methods,
    which build new tensors on every call (so they are kept in the list, never deduplicated by id).
    """
    import torch

    found: list[torch.Tensor] = []
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                found.append(param)
        for attr in ("weight", "bias"):
            method = getattr(type(module), attr, None)
            if not callable(method):  # a Parameter/tensor attribute, counted above
                continue
            try:
                value = getattr(module, attr)()
            except Exception:
                continue
            if isinstance(value, torch.Tensor):
                found.append(value)
    return found


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
