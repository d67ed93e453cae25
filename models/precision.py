"""Arithmetic and memory layout of the networks at inference: fp32, bf16, fp16 or ``auto``.

Reduced precision applies to the convolutions and attention of the UNet and of the VQGAN's encoder
and decoder, through ``torch.autocast``. What cancels badly or accumulates stays in fp32: the
quantiser's distances (it disables autocast itself), the sampler arithmetic (the UNet's output is
cast back to fp32 before any step), and everything after decoding (fusion, native-size output).

``auto`` picks bf16 on CUDA, and on a CPU only when it has native bf16 instructions (AVX512-BF16 or
AMX-BF16) *and* a short probe (a few convolutions of UNet size, about a second) shows bf16 faster
there; the result is cached per machine. CPUs without native bf16 emulate it, usually slower than
fp32, so they keep fp32. :func:`resolve_precision` says what it chose and why.

    unet, vqgan, note = prepare_for_inference(unet, vqgan, cfg.inference, device)
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from utils.atomic import json_text

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_isa() -> list[str]:
    """The CPU's native bf16 instruction sets among AMX-BF16 and AVX512-BF16 (empty if none)."""
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]


def _probe_seconds(dtype: torch.dtype | None, reps: int = 3) -> float:
    """Best-of-``reps`` time of a small stack of 3x3 convolutions (UNet-like widths), channels-last."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Conv2d(128, 128, 3, padding=1) for _ in range(3)]).eval()
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(1, 128, 64, 64).contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()
    best = float("inf")
    with torch.no_grad(), ctx:
        net(x)                                     # warm-up: oneDNN picks and builds its kernels
        for _ in range(reps):
            t = time.perf_counter()
            net(x)
            best = min(best, time.perf_counter() - t)
    return best


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bone-suppression" / "precision_probe.json"


def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of the probe on this CPU (cached per CPU model, torch version, threads)."""
    key = f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}                                 # a damaged cache only costs the probe
    ratio = cache.get(key)
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and math.isfinite(ratio) and ratio > 0):
        cache[key] = _probe_seconds(None) / _probe_seconds(torch.bfloat16)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json_text(cache, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass                                   # a read-only home only costs the probe next time
    return float(cache[key])


def resolve_precision(name: str, device: torch.device) -> tuple[str, str]:
    """(``fp32`` | ``bf16`` | ``fp16``, why) for ``inference.precision`` ``name`` on ``device``."""
    if name not in ("auto", *DTYPES):
        raise ValueError(f"inference.precision must be auto, fp32, bf16 or fp16, got {name!r}")
    if name != "auto":
        return name, "as configured"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16"
        return "fp32", "auto: this GPU has no bf16"
    if device.type != "cpu":
        return "fp32", f"auto: fp32 on {device.type}"
    isa = cpu_bf16_isa()
    if not isa:
        return "fp32", "auto: this CPU has no native bf16 (AVX512-BF16 or AMX-BF16), bf16 would be emulated"
    speedup = cpu_bf16_speedup()
    if speedup > 1.1:
        return "bf16", f"auto: {'+'.join(isa)}, bf16 convolutions measured {speedup:.1f}x faster than fp32"
    return "fp32", f"auto: {'+'.join(isa)}, but bf16 measured only {speedup:.2f}x the speed of fp32 here"


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved precision (a no-op for fp32)."""
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class AutocastUNet(torch.nn.Module):
    """The UNet run under autocast; its output is returned in fp32 so that samplers step in fp32."""

    def __init__(self, unet: torch.nn.Module, device: torch.device, precision: str, channels_last: bool):
        super().__init__()
        self.unet, self.device_, self.precision, self.channels_last = unet, device, precision, channels_last

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device_, self.precision):
            out = self.unet(x, t)
        return out.float().contiguous()


class AutocastVQGAN(torch.nn.Module):
    """The VQGAN's inference entry points under autocast; latents and images come back in fp32.

    Quantisation stays in fp32 (the quantiser turns autocast off around its distances).
    """

    def __init__(self, vqgan: torch.nn.Module, device: torch.device, precision: str, channels_last: bool):
        super().__init__()
        self.vqgan, self.device_, self.precision, self.channels_last = vqgan, device, precision, channels_last
        self.downsample_factor = vqgan.downsample_factor

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def encode_stage_2_inputs(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device_, self.precision):
            z_e = self.vqgan.encode(self._in(x))
        return self.vqgan.quantize(z_e.float())[0].contiguous()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        with autocast(self.device_, self.precision):
            out = self.vqgan.decode(self._in(z))
        return out.float().contiguous()


def prepare_for_inference(unet: torch.nn.Module, vqgan: torch.nn.Module, icfg, device: torch.device):
    """(UNet, VQGAN, one line saying what was chosen) set up as ``icfg`` (``inference``) asks.

    The networks must already be on ``device`` and in eval mode. Channels-last reorders the weights
    in place; ``compile`` wraps the UNet in ``torch.compile`` (slow first call).
    """
    precision, why = resolve_precision(icfg.precision, device)
    if icfg.channels_last:
        unet, vqgan = unet.to(memory_format=torch.channels_last), vqgan.to(memory_format=torch.channels_last)
    if icfg.compile:
        unet = torch.compile(unet)
    note = (f"precision {precision} ({why}), channels-last {'on' if icfg.channels_last else 'off'}, "
            f"torch.compile {'on' if icfg.compile else 'off'}")
    return (AutocastUNet(unet, device, precision, icfg.channels_last),
            AutocastVQGAN(vqgan, device, precision, icfg.channels_last), note)
