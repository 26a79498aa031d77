"""Runtimes head to head on one model: the same pruned + fine-tuned digits CNN served as eager torch.ao int8
(static and dynamic), PT2E int8 under torch.compile, ONNX Runtime int8 (QDQ static and dynamic), ONNX Runtime
fp32 and torch.compile fp32, every one
timed interleaved with the fp32 baseline in this one process (paired speedups with 95% bands).

It answers how much a runtime adds over the best eager option *for this model*, independent of what a
search happened to sample.      python benchmarks/runtime_head_to_head.py [--threads 1] [--amount 0.3]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch

from optagent.protocol import JobRef, ModelRef, TrialPayload
from optagent.trial.measure import MeasureSettings, interleaved, speedup_band
from optagent.trial.pipeline import _batch, build

MODEL = Path(__file__).resolve().parents[1] / "examples" / "digits_cnn.py"
PRUNE = {"pruning": {"method": "structured", "amount": 0.3},
         "finetune": {"epochs": 3, "optimizer": "sgd", "sgd_lr": 0.00226, "schedule": "cosine", "warmup": 0.25}}
VARIANTS = {
    "eager int8 (torch.ao FX)": {"quantization": {"mode": "static_int8"}, "runtime": {"engine": "eager"}},
    "compile PT2E int8": {"quantization": {"mode": "static_int8"},
                          "runtime": {"engine": "compile", "compile_mode": "default"}},
    "ORT QDQ int8": {"quantization": {"mode": "static_int8"}, "runtime": {"engine": "onnxruntime", "ort_level": "all"}},
    "eager dynamic int8": {"quantization": {"mode": "dynamic_int8"}, "runtime": {"engine": "eager"}},
    "ORT dynamic int8": {"quantization": {"mode": "dynamic_int8"},
                         "runtime": {"engine": "onnxruntime", "ort_level": "all"}},
    "eager fp32 (pruned)": {"quantization": {"mode": "none"}, "runtime": {"engine": "eager"}},
    "ORT fp32": {"quantization": {"mode": "none"}, "runtime": {"engine": "onnxruntime", "ort_level": "all"}},
    "compile fp32": {"quantization": {"mode": "none"}, "runtime": {"engine": "compile", "compile_mode": "default"}},
}


def main() -> None:
    from optagent.trial.pipeline import steady_allocator

    # time like a trial process (glibc keeps large allocations on the heap): without it, eager fp32 at
    # batch 64 timed 62 ms here against 48.5 ms in the search's trial processes, inflating ratios to eager
    steady_allocator()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--amount", type=float, default=0.3, help="structured pruning amount before every variant")
    args = ap.parse_args()
    base = TrialPayload(trial=1, job=JobRef(0, "h2h"),
                        model=ModelRef(str(MODEL), hashlib.sha256(MODEL.read_bytes()).hexdigest()),
                        strategies=["pruning", "finetune", "quantization", "runtime"],
                        objectives=["accuracy:max", "latency_ms:min"], seed=26, threads=args.threads, device="cpu")
    models, accuracy = {}, {}
    for name, variant in VARIANTS.items():
        prune = {**PRUNE, "pruning": {**PRUNE["pruning"], "amount": args.amount}}
        built = build(base.replace(params={**prune, **variant}))
        models[name], accuracy[name] = built.model, built.model_file.evaluate(built.model)["accuracy"]
        baseline, mf, ctx = built.ctx.baseline, built.model_file, built.ctx
    batch = _batch(mf, mf.default_batch_size, ctx.device)
    torch.set_num_threads(args.threads)
    calls = {"baseline": lambda: baseline(batch), **{n: (lambda m=m: m(batch)) for n, m in models.items()}}
    stats = interleaved(calls, MeasureSettings(warmup=10, min_reps=100, max_reps=150, min_time_s=2, max_time_s=6))
    b = stats["baseline"]
    print(f"structured pruning {args.amount} + 3-epoch fine-tune, batch {mf.default_batch_size}, "
          f"{args.threads} thread(s), "
          f"{b.reps} interleaved rounds; fp32 baseline {b.median_ms:.2f} ms (spread {b.spread:.1%}), "
          f"accuracy {mf.evaluate(baseline)['accuracy']:.4f}")
    for name in models:
        band = speedup_band(b.samples_ms, stats[name].samples_ms)
        print(f"  {name:26s} {band.ratio:5.2f}x [{band.low:.2f}-{band.high:.2f}]  "
              f"latency {stats[name].median_ms:6.2f} ms  accuracy {accuracy[name]:.4f}")


if __name__ == "__main__":
    main()
