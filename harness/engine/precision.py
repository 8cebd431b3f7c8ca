"""How an arm computes: bf16 autocast and channels-last memory where the hardware runs them natively.

``engine.amp`` and ``engine.channels_last`` default to ``auto``:

- on for CUDA;
- on for a CPU whose oneDNN computes bf16 natively (AVX-512 BF16 or AMX on x86, bf16 dot products on Arm).
  The test is PyTorch's own, the one its mkldnn tests use to decide whether to run bf16 cases:
  ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``;
- off elsewhere: a CPU without native bf16 emulates it and runs slower than fp32.

``true`` / ``false`` force either choice (``false`` = fp32 everywhere). Autocast keeps the weights, the
optimizer state, the loss and everything GEM computes from gradients (Gram matrix, QP, projection) in fp32
or fp64; only convolutions and matrix products run in bf16. Channels-last only applies to convolutional
backbones. ``engine.compile`` wraps the backbone in ``torch.compile``; its ``auto`` (``choose_compile``) is on
only for the bf16 + channels-last CPU path, where it was measured faster over a whole task.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from harness.errors import ConfigError

Switch = bool | Literal["auto"]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (on a CPU: PyTorch's oneDNN check)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


@dataclass(frozen=True)
class Precision:
    """The resolved choice for one arm; ``warning`` is one line to show the user, if any."""

    amp: bool
    channels_last: bool
    warning: str | None = None

    @property
    def tags(self) -> dict[str, str]:
        """Recorded on every run, so each number says how it was computed."""
        return {"precision": "bf16-autocast" if self.amp else "fp32",
                "memory_format": "channels_last" if self.channels_last else "contiguous"}

    def autocast(self, device: torch.device, *, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=cache_enabled)


def choose_precision(amp: Switch, channels_last: Switch, device_type: str, native: bool, convolutional: bool) -> Precision:
    """Resolve the engine's switches for a device. ``native``: the device computes bf16 natively
    (``native_bf16``); ``convolutional``: the backbone takes 4-d inputs (an MLP gains nothing from
    channels-last)."""
    fast = device_type == "cuda" or (device_type == "cpu" and native)
    use_amp = fast if amp == "auto" else bool(amp)
    use_cl = (fast if channels_last == "auto" else bool(channels_last)) and convolutional
    warning = None
    if use_amp and not native:
        warning = (f"engine.amp is true but this {device_type} has no native bf16: bf16 is emulated and will be "
                   "slower than fp32")
    return Precision(use_amp, use_cl, warning)


def choose_compile(compile: Switch, precision: Precision, device_type: str, native: bool, convolutional: bool) -> bool:
    """Whether to ``torch.compile`` the backbone. ``auto``: on only where a whole 80-epoch task 0 was measured
    faster compiled, compilation included: a CPU that computes bf16 natively, training a convolutional
    backbone in bf16 + channels-last (docs/PERFORMANCE.md), and only when Inductor's C++ compiler is there.
    Off on CUDA, whose step is a CUDA graph, and for fp32 on CPU, where the measurements were mixed."""
    if compile != "auto":
        return bool(compile)
    return (device_type == "cpu" and native and precision.amp and precision.channels_last and convolutional
            and compiler_available())


def compiler_available() -> bool:
    try:
        check_compiler("engine.compile", None)
    except ConfigError:
        return False
    return True


def check_compiler(key: str, source: str | None) -> None:
    """``engine.compile`` needs TorchDynamo and the C++ compiler that Inductor builds its CPU kernels with
    (``$CXX``, else g++); checked before anything trains or is recorded."""
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError("torch.compile is not supported by this Python/torch build", key=key, source=source)
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:  # Inductor raises its own types for a missing or unusable compiler
        raise ConfigError(f"torch.compile needs a working C++ compiler: {str(exc).splitlines()[0][:160]}",
                          key=key, source=source) from None
