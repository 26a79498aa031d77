"""Small torch helpers for plugin authors: where a model lives, moving a batch there, reading its weights.

The built-in strategies and metrics use these too (through the same public names), so a third-party
metric can do whatever the built-in ones do. Batches of any form (a tensor, a tuple or a dict of named
tensors) are handled through `optagent.inputs`.

    model_device(model, trial.device)       the device a served model runs on
    to_device(batch, device)                 the batch (any form) moved there
    example_batch(trial, model, size)        the model file's example input, trimmed, on the model's device
    is_quantized(model)                      whether it holds int8 modules or tensors
    weight_tensors(model)                    its weights and biases, float or quantized, each once
    state_tensors(value)                     every tensor inside a state_dict value
    early_stopping(trial, total_steps)       let trial.report(step, value) stop a hopeless training run

torch is imported by the functions, not by the module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from optagent import inputs as ins

if TYPE_CHECKING:
    import torch

    from optagent.strategy import TrialContext

__all__ = ["early_stopping", "example_batch", "is_quantized", "model_device", "state_tensors", "to_device",
           "weight_tensors"]


def model_device(model: Any, default: Any = "cpu") -> torch.device:
    """The device of the model's first parameter or buffer; `default` (e.g. `trial.device`) for a model
    without tensors, such as an ONNX Runtime or compiled wrapper."""
    import torch

    parameters = getattr(model, "parameters", None)
    buffers = getattr(model, "buffers", None)
    if callable(parameters):
        for param in parameters():
            return param.device
    if callable(buffers):
        for buffer in buffers():
            return buffer.device
    return torch.device(default)


def to_device(value: Any, device: Any) -> Any:
    """A tensor, or the tensors inside a tuple/list/dict batch, moved to `device` (dtypes kept)."""
    return ins.to(value, device)


def example_batch(trial: TrialContext, model: Any, size: int | None = 1) -> Any:
    """The model file's example input trimmed to `size` samples (None = as given), on the model's device."""
    example = trial.model_file.example_input()
    if size is not None:
        example = ins.take(example, 0, size)
    return ins.to(example, model_device(model, trial.device))


def is_quantized(model: Any) -> bool:
    """Whether the model holds quantized (integer) modules or tensors (FLOP counters cannot see them)."""
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


def weight_tensors(model: Any) -> list[torch.Tensor]:
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


def early_stopping(trial: TrialContext, total_steps: int) -> None:
    """Before a training loop of `total_steps` steps: install the job's stop rule (`--pruner`: constraint,
    median or none, fed with the job's earlier curves) so that `trial.report(step, value)` raises
    `optagent.errors.TrialPruned` once the trial cannot meet the constraint. Report the constraint metric
    (`trial.constraint.metric`) at step 0 and after each epoch. Without a constraint bound (the baseline
    trial) or with `--pruner none`, reports are only recorded. The built-in fine-tuning does the same."""
    from optagent.trial.early_stop import checker

    trial.should_stop = checker(trial.settings.get("pruner") or {}, trial.constraint, int(total_steps))
