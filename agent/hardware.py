"""What the machine running a trial can do, and a fingerprint stored with every measurement."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any


def _cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


_INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
                      "avx_vnni", "fma", "asimd", "sve")


@dataclass(frozen=True)
class Capabilities:
    """Hardware and backend support, used by strategies to offer only what can run here."""

    device: str  # "cpu" or "cuda"
    cpu_model: str
    cpu_flags: tuple[str, ...]
    quantized_engines: tuple[str, ...]
    cuda: bool
    gpu_name: str | None = None
    gpu_capability: tuple[int, int] | None = None
    gpu_bf16: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def x86(self) -> bool:
        return platform.machine().lower() in ("x86_64", "amd64", "i686")

    @property
    def cpu_bf16(self) -> bool:
        """bf16 matmuls have native support (AVX512-BF16 or AMX); elsewhere they are emulated and slow."""
        return bool({"avx512_bf16", "amx_bf16"} & set(self.cpu_flags))

    @property
    def int8_engine(self) -> str | None:
        """The torch.ao quantized engine for this CPU ("x86" on x86 with VNNI/AVX2, "qnnpack" on ARM)."""
        for engine in ("x86", "fbgemm", "onednn", "qnnpack"):
            if engine in self.quantized_engines and (self.x86 or engine == "qnnpack"):
                return engine
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=4)
def detect(device: str = "auto") -> Capabilities:
    """Probe the hardware. Never initialises CUDA unless the device is "cuda" or "auto" with a GPU."""
    import torch

    model, flags = _cpu_model_and_flags()
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        from optagent.errors import UserError

        raise UserError("device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    gpu_name = gpu_cap = None
    gpu_bf16 = False
    if want_cuda:
        gpu_name = torch.cuda.get_device_name(0)
        gpu_cap = tuple(torch.cuda.get_device_capability(0))
        gpu_bf16 = bool(torch.cuda.is_bf16_supported())
    return Capabilities(
        device="cuda" if want_cuda else "cpu",
        cpu_model=model,
        cpu_flags=tuple(sorted(f for f in flags if f in _INTERESTING_FLAGS)),
        quantized_engines=tuple(torch.backends.quantized.supported_engines),
        cuda=want_cuda,
        gpu_name=gpu_name,
        gpu_capability=gpu_cap,  # type: ignore[arg-type]
        gpu_bf16=gpu_bf16,
        extra={"software": software()},
    )


def _version(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def software() -> dict[str, Any]:
    """The inference software installed here, by what a runtime needs (versions, or None when missing).

    Reported by every worker with its capabilities, so the search offers the runtimes the *workers* have
    (the coordinator may have none of them), and stored in each trial's fingerprint. Read from package
    metadata: nothing heavy is imported.
    """
    import importlib.util
    import shutil

    compiler = next((c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)), None)
    openvino = _version("openvino")
    return {
        "torch": _version("torch"), "torchao": _version("torchao"), "cxx": compiler,
        "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "onnxscript": _version("onnxscript"), "openvino": openvino, "nncf": _version("nncf"),
        # the devices OpenVINO can serve on: its CPU plugin always, "GPU" with an Intel GPU's render node
        "openvino_devices": ("CPU,GPU" if _intel_gpu() else "CPU") if openvino else None,
        "inductor": importlib.util.find_spec("torch") is not None,
    }


def _intel_gpu() -> bool:
    """An Intel GPU (PCI vendor 0x8086) behind a DRM render node: what OpenVINO's GPU plugin drives. Read
    from sysfs, so openvino is not imported on workers that never serve with it."""
    import glob

    for vendor in glob.glob("/sys/class/drm/renderD*/device/vendor"):
        try:
            with open(vendor, encoding="ascii") as f:
                if f.read().strip().lower() == "0x8086":
                    return True
        except OSError:
            continue
    return False


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version (torch does not expose it); None where nvidia-smi is absent."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def fingerprint(threads: int, caps: Capabilities | None = None) -> dict[str, Any]:
    """The facts that make two latency figures comparable (or not); stored with every trial."""
    import torch

    caps = caps or detect()
    fp: dict[str, Any] = {
        "host": platform.node(),
        "cpu_model": caps.cpu_model,
        "cpu_flags": list(caps.cpu_flags),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": caps.cpu_bf16,  # native bf16 (AVX512-BF16 / AMX): bf16 speedups are real here
        "int8_engine": caps.int8_engine,  # torch.ao quantized engine int8 models run on (None: no int8)
        "torch_threads": torch.get_num_threads(),  # what torch actually uses, vs `threads` asked for
        "device": caps.device,
        "python": platform.python_version(),
        "software": {k: v for k, v in software().items() if isinstance(v, str)},
    }
    if caps.cuda:
        fp.update(gpu=caps.gpu_name, gpu_capability=list(caps.gpu_capability or ()),
                  cuda=torch.version.cuda, cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
        fp["driver"] = _nvidia_driver()
    return fp
