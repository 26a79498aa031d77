"""torch.compile (Inductor) for the runtime strategy, with PT2E int8 through torchao on x86 CPUs.

Imported lazily by `optagent.plugins.runtime` (it imports torch). The compiled graph is built for one
batch size, the trial's serving batch: Inductor specialises on shapes, so every other batch size would
compile again (seconds each). `FixedBatch` therefore feeds any batch through the compiled graph in
slices of that size (the last one padded), so evaluation runs the very graph that is timed and a trial
compiles exactly once.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from optagent import inputs as ins
from optagent.errors import TrialFailed
from optagent.plugins._util import quiet


def first_line(exc: BaseException) -> str:
    """The tool's own reason in one line: `Type: first line`, plus the root cause's when it is chained.

    torch.onnx and Dynamo wrap the real error in a generic one ("Failed to export the model with
    torch.export. This is step 1/3 ..."), so the innermost cause is the part that names the problem.
    """
    def one(e: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        return f"{type(e).__name__}: {line[:300]}" if line else type(e).__name__

    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return one(exc) if root is exc else f"{one(exc)} -- caused by {one(root)}"


def _quiet() -> contextlib.AbstractContextManager[None]:
    """torchao prints load failures of its CUDA kernels on CPU-only builds; they are irrelevant here."""
    return quiet("torchao", "torch._dynamo", "torch._inductor", "torch.utils._pytree")


def pt2e_available() -> bool:
    """torchao's PT2E flow with the x86 Inductor quantizer (torch 2.13 no longer ships torch.ao's copy)."""
    try:
        with _quiet():
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: F401
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer  # noqa: F401
    except Exception:
        return False
    return True


def chunked(fn: Callable[[Any], Any], x: Any, size: int) -> Any:
    """fn over the batch `x` (a tensor, tuple or dict; see optagent.inputs) in slices of exactly `size` rows,
    the last padded by repeating its final row; the outputs are joined again."""
    total = ins.batch_size(x)
    if total == size:
        return fn(x)
    outs = []
    for start in range(0, total, size):
        part = ins.take(x, start, start + size)
        n = ins.batch_size(part)
        outs.append(ins.take(fn(ins.pad_to(part, size)), 0, n))
    return ins.concat(outs)


def one_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The batch a wrapper's forward(*args, **kwargs) was called with, in optagent.inputs' form."""
    if kwargs and not args:
        return kwargs
    if len(args) == 1 and not kwargs:
        return args[0]
    if kwargs:
        raise TypeError("call a served model with positional or keyword inputs, not both")
    return tuple(args)


def _under_dispatch_mode() -> bool:
    """Whether a TorchDispatchMode (the FLOP counter, a profiler) is watching: compiled code hides ops."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        return _get_current_dispatch_mode() is not None
    except Exception:
        return False


class FixedBatch(torch.nn.Module):
    """A compiled model served at one batch size; takes and returns tensors like the eager model.

    `source` is the (possibly PT2E-quantized) module that was compiled: FLOP counting and the export
    recipe look at it. Calls always run under inference mode so Dynamo never recompiles for grad mode.
    """

    def __init__(self, source: torch.nn.Module, compiled: Callable[..., Any], batch_size: int,
                 recipe: dict[str, Any]):
        super().__init__()
        self.source = source
        self._compiled = compiled
        self.batch_size = batch_size
        self.recipe = recipe

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = one_batch(args, kwargs)
        if _under_dispatch_mode():
            if self.recipe.get("precision", "none") != "none":
                raise RuntimeError("a quantized compiled graph has no float FLOP count")
            return ins.call(self.source, x)
        with torch.inference_mode():
            return chunked(lambda part: ins.call(self._compiled, part), x, self.batch_size)

    def train(self, mode: bool = True) -> FixedBatch:
        """Serving only: a PT2E-converted graph refuses train()/eval(), so the flag is not passed down."""
        self.training = mode
        return self

    def extra_repr(self) -> str:
        return f"batch_size={self.batch_size}, recipe={self.recipe}"

    def optagent_export(self, directory: Path) -> list[Path]:
        """torch.compile output is not a file: write the recipe that rebuilds it (and the eager weights)."""
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / "compiled_source_state_dict.pt"
        torch.save(self.source.state_dict(), weights)
        note = directory / "torch_compile_recipe.json"
        note.write_text(json.dumps({
            **self.recipe,
            "how": "rebuild with `optagent apply` (same recipe and model file), or: load the model, apply the "
                   "recipe's strategies, then torch.compile(model, mode=recipe['mode'], dynamic=False) with "
                   "torch._inductor.config.freezing=True and call it once under torch.inference_mode() at "
                   "batch_size rows (first call compiles)",
            "torch": torch.__version__,
        }, indent=2) + "\n")
        return [note, weights]


def pt2e_quantize(model: torch.nn.Module, example: Any, calibration: Iterable[Any],
                  dynamic: bool, keep_float: Iterable[str] = ()) -> torch.nn.Module:
    """Static (calibrated) or dynamic int8 with the x86 Inductor quantizer; returns the converted graph."""
    with _quiet():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        size = ins.batch_size(example)
        args, kwargs = ins.as_args(example)
        try:
            exported = torch.export.export(model, args, kwargs).module()
        except Exception as exc:
            raise TrialFailed(f"torch.export cannot capture the model for PT2E int8: {first_line(exc)}") from exc
        # layers whose output nothing uses (a BERT pooler behind a mean-pooling head) stay in the exported
        # graph with no users, and the x86 quantizer's fusion annotation fails on them (IndexError)
        exported.graph.eliminate_dead_code()
        exported.recompile()
        quantizer = xiq.X86InductorQuantizer()
        config = xiq.get_default_x86_inductor_quantization_config(is_dynamic=dynamic)
        if dynamic:  # like eager quantize_dynamic: Linear layers only (there are no dynamic conv kernels)
            quantizer.set_module_type_qconfig(torch.nn.Linear, config)
        else:
            quantizer.set_global(config)
        for name in keep_float:  # the mixed-precision strategy's float set
            quantizer.set_module_name_qconfig(name, None)
        try:
            prepared = prepare_pt2e(exported, quantizer)
            # static: observe activation ranges; dynamic: one batch still has to run, or the weight
            # observers never see the weights and the int8 weights are garbage
            with torch.no_grad():
                for batch in calibration:
                    chunked(lambda part: ins.call(prepared, part), batch, size)
                    if dynamic:
                        break
            return convert_pt2e(prepared)
        except TrialFailed:
            raise
        except Exception as exc:
            raise TrialFailed(f"PT2E int8 quantization failed: {first_line(exc)}") from exc


def compile_model(model: torch.nn.Module, example: Any, mode: str, recipe: dict[str, Any],
                  ) -> tuple[FixedBatch, float]:
    """torch.compile with weight freezing; the first call (the compilation) is timed and returned."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
    started = time.perf_counter()
    try:
        # freezing folds weights into the graph (and prepacks oneDNN kernels); needed for int8 speed
        with _quiet(), inductor_config.patch(freezing=True), torch.inference_mode():
            ins.call(compiled, example)
            ins.call(compiled, example)  # a second call catches a guard failure (recompilation) now
    except Exception as exc:
        raise TrialFailed(f"torch.compile failed: {first_line(exc)}") from exc
    seconds = time.perf_counter() - started
    return FixedBatch(model, compiled, ins.batch_size(example), {**recipe, "mode": mode}), seconds


def copy_for_compile(model: torch.nn.Module) -> torch.nn.Module:
    """A private copy: freezing and export must not alias the pipeline's module."""
    return copy.deepcopy(model).eval()
