"""Per-layer mixed precision: keep the layers that int8 hurts most in float, quantize the rest.

Quantizing every Linear of a transformer to int8 can cost more accuracy than the constraint allows (the
feed-forward output projections, whose inputs carry the largest activation outliers, are the usual
culprits), while quantizing all but a few keeps most of the speed. Accuracy-aware tools find those
layers in a separate fallback loop (NNCF's `quantize_with_accuracy_control`, INC's fallback); here it is
one more searched parameter, so the search trades it against pruning, runtimes and training knobs:

- a one-off sensitivity pass (`analysis`, in the baseline trial, cached per model file): each Linear and
  Conv layer is quantized alone, with simulated int8 (per-channel symmetric weights, per-tensor
  activations as dynamic quantization computes them), and the change of the job's constraint metric on
  the eval split is measured; the layers are ranked by it;
- `keep_float`: how many of the most sensitive layers stay in float, searched when an int8 mode is.

The float set is published as `trial.settings["float_layers"]` (module names); the quantization strategy
(eager torch.ao), PT2E, ONNX Runtime and OpenVINO/NNCF each leave those layers unquantized.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from optagent.hookspecs import hookimpl
from optagent.plugins._precision import INT8_MODES
from optagent.strategy import Param, Params, SpaceContext, Stage, Strategy, TrialContext, categorical

if TYPE_CHECKING:
    import torch

SENSITIVITY_SAMPLES = 128  # eval samples each single-layer measurement uses
KEEP_CHOICES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24)


def _fake_quant_forward(module: torch.nn.Module) -> Callable[..., Any]:
    """A forward for `module` (Linear or Conv) with int8-rounded weights (per output channel, symmetric)
    and inputs (per tensor, asymmetric uint8, as dynamic quantization does at run time)."""
    import torch

    weight: torch.Tensor = module.weight.detach()  # type: ignore[operator]
    flat = weight.reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q_weight = (torch.round(flat / scale[:, None]).clamp(-127, 127) * scale[:, None]).reshape(weight.shape)
    original = module.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if x.is_floating_point():
            low, high = float(x.min().clamp(max=0)), float(x.max().clamp(min=0))
            step = max(high - low, 1e-12) / 255.0
            zero = round(-low / step)
            x = (torch.round(x / step).clamp(-zero, 255 - zero)) * step
        saved = module.weight.data
        module.weight.data = q_weight
        try:
            return original(x, *args, **kwargs)
        finally:
            module.weight.data = saved

    return forward


def quantizable_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every Linear and Conv layer, the layers int8 quantization acts on."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds) and name]


def sensitivity(trial: TrialContext, samples: int = SENSITIVITY_SAMPLES) -> dict[str, Any]:
    """Each layer's harm when it alone is int8, in units of the constraint metric (positive = worse)."""
    import copy

    constraint = trial.constraint
    metric, sign = (constraint.metric, constraint.sign) if constraint else ("accuracy", 1.0)
    model = copy.deepcopy(trial.baseline).eval()
    mf = trial.model_file

    def measure() -> float:
        return float(mf.evaluate(model, limit=samples)[metric])

    reference = measure()
    harm: dict[str, float] = {}
    for name, module in quantizable_layers(model):
        module.forward = _fake_quant_forward(module)
        try:
            harm[name] = sign * (reference - measure())
        finally:
            del module.forward  # back to the class's forward
    ranking = sorted(harm, key=lambda n: -harm[n])
    return {"metric": metric, "reference": reference, "samples": samples, "ranking": ranking, "harm": harm}


class MixedPrecisionStrategy(Strategy):
    name = "mixed_precision"
    stage = Stage.QUANTIZE
    description = ("Keep the layers int8 hurts most in float: a one-off sensitivity pass ranks every Linear/Conv "
                   "layer by the constraint metric's change when it alone is int8; the search picks how many stay "
                   "in float (the rest are quantized by whichever runtime serves the model).")
    analysis_version = "1"

    def search_space(self, ctx: SpaceContext) -> list[Param]:
        layers = len((ctx.analysis.get(self.name) or {}).get("ranking") or [])
        choices = [k for k in KEEP_CHOICES if k == 0 or k <= max(1, layers // 2)] if layers else [0]
        return [categorical("keep_float", choices, when={"quantization.mode": list(INT8_MODES)},
                            help="how many of the layers most sensitive to int8 stay in float")]

    def off_params(self, ctx: SpaceContext) -> Params:
        return {}  # keep_float exists only in int8 trials

    def is_off(self, params: Params, ctx: SpaceContext) -> bool:
        return not params.get("keep_float")

    def configure(self, params: Params, trial: TrialContext) -> None:
        ranking = (trial.analysis.get(self.name) or {}).get("ranking") or []
        keep = int(params.get("keep_float") or 0)
        trial.settings["float_layers"] = list(ranking[:keep])
        if keep and len(ranking) < keep:
            trial.notes.append(f"mixed_precision: {keep} float layers asked for, {len(ranking)} ranked")

    def apply(self, model: torch.nn.Module, params: Params, trial: TrialContext) -> torch.nn.Module:
        return model  # the float set acts through trial.settings (see configure)

    def analysis(self, trial: TrialContext) -> dict[str, Any] | None:
        if not quantizable_layers(trial.baseline):
            return None
        return sensitivity(trial)


@hookimpl
def optagent_register_strategies(register: Callable[[Strategy], None]) -> None:
    register(MixedPrecisionStrategy())
