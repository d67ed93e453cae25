"""Sampling benchmark: BS-LDM as published, GL-LCM as published, and this project's default.

Usage:
    python benchmark.py                      # demo size: configs/demo.yaml networks, 256² input
    python benchmark.py --paper              # paper size: 1024² input, 383M UNet, 38M VQGAN (slow on a CPU)
    python benchmark.py --quick              # tiny networks, a few steps (used by the tests)
    python benchmark.py --ldm-ckpt runs/ldm/001-distill/checkpoints/best.pt   # trained demo weights
    python benchmark.py --paper --max-steps 5 --out bench.json

Times one image through the real code paths (``models.inference``, ``models.global_local``,
``models.fusion``, the VQGAN) for three scenarios:

    (a) bs-ldm   DDPM, 1000 steps, one path (the full CXR);
    (b) gl-lcm   LCM, 50 steps, global and local paths one after the other (two UNet calls per step,
                 two encodings, two decodings, Poisson fusion);
    (c) ours     distilled LCM, 4 steps, global and local paths batched (one UNet call per step, one
                 batched encoding and one batched decoding), Poisson fusion.

For each: UNet calls, wall time split into VQ encoding, sampling, VQ decoding and fusion, and the
peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set size, each
scenario in a fresh subprocess so the peaks do not mix). Weights are random unless checkpoints are
given: timings do not depend on them. ``--max-steps N`` runs only the first N sampler steps of a
scenario and extrapolates the sampling time linearly (marked in the table); nothing else is
extrapolated. On CUDA, bf16 autocast and channels-last are on by default (``--no-bf16``,
``--no-channels-last``) and ``--compile`` adds ``torch.compile`` of the UNet.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from models import build_unet, build_vqgan, count_parameters
from models.fusion import fuse
from models.global_local import dual_path_sample
from models.inference import suppress_latents
from models.pipeline import BoneSuppressor
from models.schedule import build_schedule
from utils.atomic import atomic_write_text
from utils.config import load_config
from utils.dist import resolve_device

ROOT = Path(__file__).resolve().parent
SCENARIOS = {
    "bs-ldm": {"sampler": "ddpm", "steps": 1000, "paths": 1, "batched": False},
    "gl-lcm": {"sampler": "lcm", "steps": 50, "paths": 2, "batched": False},
    "ours": {"sampler": "lcm", "steps": 4, "paths": 2, "batched": True},
}


def bench_config(size: str):
    """The config whose networks are timed: paper (szch.yaml), demo (demo.yaml) or quick (smoke.yaml)."""
    files = {"paper": ["szch.yaml"], "demo": ["demo.yaml"], "quick": ["demo.yaml", "smoke.yaml"]}[size]
    return load_config([ROOT / "configs" / f for f in files], ["run.device=auto"])


class CountingUNet(torch.nn.Module):
    """Wraps the UNet to count its calls (one call = one forward, whatever the batch)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet, self.calls = unet, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.unet(x, t)


class StopSampling(Exception):
    """Raised by the step callback after ``--max-steps`` steps."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_scenario(name: str, size: str, max_steps: int | None, device: torch.device, bf16: bool,
                 channels_last: bool, compile_unet: bool, seed: int = 0) -> dict:
    """Time one image through scenario ``name``; returns the row of the table."""
    spec = SCENARIOS[name]
    cfg = bench_config(size)
    steps = spec["steps"] if size != "quick" else min(spec["steps"], 8)
    cfg.sampler.name, cfg.sampler.steps = spec["sampler"], steps
    cfg.global_local.leg_mode = "noise"
    torch.manual_seed(seed)
    vqgan = build_vqgan(cfg.vqgan).to(device).eval().requires_grad_(False)
    image = cfg.data.image_size
    unet_raw = build_unet(cfg.unet, image_size=image // vqgan.downsample_factor).to(device).eval().requires_grad_(False)
    if channels_last and device.type == "cuda":
        vqgan, unet_raw = vqgan.to(memory_format=torch.channels_last), unet_raw.to(memory_format=torch.channels_last)
    unet = CountingUNet(torch.compile(unet_raw) if compile_unet else unet_raw)
    schedule = build_schedule(cfg.diffusion)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (bf16 and device.type == "cuda") else nullcontext()

    # A smooth synthetic "CXR" and a two-lobe "lung mask": the content does not change the timings.
    yy, xx = np.mgrid[0:image, 0:image] / image
    cxr = (0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy)).astype(np.float32)
    mask = (((xx - 0.3) ** 2 / 0.03 + (yy - 0.5) ** 2 / 0.12) < 1) | (((xx - 0.7) ** 2 / 0.03 + (yy - 0.5) ** 2 / 0.12) < 1)
    x = torch.from_numpy(cxr * 2 - 1)[None, None].to(device)
    x_masked = torch.from_numpy(np.where(mask, cxr, 0) * 2 - 1)[None, None].to(device).float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), amp:
        # warm-up of every network on this input size (not timed): first calls allocate and tune kernels
        for _ in range(1 if size == "paper" else 2):   # one pass is enough for the heavy paper networks
            warm = vqgan.encode_stage_2_inputs(torch.cat([x, x_masked]))
            vqgan.decode(warm)
            unet_raw(torch.cat([warm, warm], 1), torch.zeros(2, dtype=torch.long, device=device))
        synchronize(device)
    unet.calls = 0
    if spec["batched"]:
        # (c) is exactly what ldm_eval.py runs, native-size output included (counted in "fusion").
        suppressor = BoneSuppressor(unet, vqgan, schedule, cfg, cfg.diffusion.cond_mode)
        with amp:
            suppressor([cxr], [mask], ["benchmark.png"])
        synchronize(device)
        times, n_done = dict(suppressor.times), steps
    else:
        times = {}
        n_done = _published(spec, steps, vqgan, unet, schedule, cfg, x, x_masked, cxr, mask, amp, device,
                            max_steps, seed, times)

    calls_per_step = unet.calls / max(n_done, 1)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"scenario": name, "size": size, "image": image, "sampler": spec["sampler"], "steps": steps,
            "paths": spec["paths"], "batched": spec["batched"], "steps_timed": n_done,
            "extrapolated": n_done < steps, "unet_calls": int(round(calls_per_step * steps)),
            "seconds": {**times, "total": sum(times.values())}, "peak_memory_bytes": int(peak),
            "peak_memory_kind": "cuda allocated" if device.type == "cuda" else "process RSS",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, "
                      f"{torch.get_num_threads()} threads)",
            "unet_params": count_parameters(unet_raw), "vqgan_params": count_parameters(vqgan),
            "bf16": bf16 and device.type == "cuda", "channels_last": channels_last and device.type == "cuda",
            "compile": compile_unet}


def _published(spec, steps, vqgan, unet, schedule, cfg, x, x_masked, cxr, mask, amp, device, max_steps, seed,
               times) -> int:
    """Scenarios (a) and (b), structured as the published code: one encoding, sampling and decoding
    per path, one after the other. Fills ``times``; returns the number of sampler steps run."""
    gens = lambda s: [torch.Generator().manual_seed(s)]  # noqa: E731
    done_steps = [0]

    def callback(j, *args):
        done_steps[0] = j + 1
        if max_steps is not None and j + 1 >= max_steps:
            raise StopSampling

    with torch.no_grad(), amp:
        t0 = time.perf_counter()
        conds = [vqgan.encode_stage_2_inputs(x)]
        if spec["paths"] == 2:
            conds.append(vqgan.encode_stage_2_inputs(x_masked))
        synchronize(device)
        times["encode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        try:
            if spec["paths"] == 1:
                latents = [suppress_latents(unet, schedule, conds[0], cfg.sampler, cfg.diffusion.cond_mode, gens(seed),
                                            callback=lambda j, t, out: callback(j))]
            else:
                latents = list(dual_path_sample(unet, schedule, conds[0], conds[1], cfg.sampler, cfg.global_local,
                                                cfg.diffusion.cond_mode, gens(seed), gens(seed + 1),
                                                batched=False, callback=callback))
            complete = True
        except StopSampling:
            latents = [c.clone() for c in conds]   # placeholder latents of the right shape for the decoder
            complete = False
        synchronize(device)
        sample_time = time.perf_counter() - t0
        n_done = done_steps[0] if not complete else steps
        times["sample"] = sample_time * steps / max(n_done, 1)

        t0 = time.perf_counter()
        decoded = [vqgan.decode(z).float() for z in latents]
        synchronize(device)
        times["decode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    images = [(d[0, 0].cpu().numpy() * 0.5 + 0.5) for d in decoded]
    if len(images) == 2:
        fuse(images[0], images[1], mask, cxr, mode="poisson")
    times["fusion"] = time.perf_counter() - t0

    return n_done


def table(rows: list[dict]) -> str:
    """Markdown table of the rows, with the speed-ups of sampling and end to end over (c)."""
    ours = next((r for r in rows if r["scenario"] == "ours"), None)
    lines = ["| scenario | sampler | steps | UNet calls | encode s | sample s | decode s | fusion s | total s | "
             "sampling × vs ours | end-to-end × vs ours | peak memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds"]
        ext = f" (extrapolated from {r['steps_timed']})" if r["extrapolated"] else ""
        sp = f"{s['sample'] / ours['seconds']['sample']:.1f}" if ours else "-"
        tot = f"{s['total'] / ours['seconds']['total']:.1f}" if ours else "-"
        lines.append(f"| {r['scenario']} | {r['sampler']} | {r['steps']}{ext} | {r['unet_calls']} | {s['encode']:.3f} | "
                     f"{s['sample']:.3f} | {s['decode']:.3f} | {s['fusion']:.3f} | {s['total']:.3f} | {sp} | {tot} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} MiB |")
    return "\n".join(lines)


def main(size: str = "demo", max_steps: int | None = None, out: str | Path | None = None, device: str = "auto",
         bf16: bool = True, channels_last: bool = True, compile_unet: bool = False,
         scenarios: list[str] | None = None, subprocesses: bool = True) -> list[dict]:
    """Run the scenarios (each in its own process unless ``subprocesses`` is False); print and save."""
    rows = []
    for name in scenarios or list(SCENARIOS):
        if subprocesses:
            cmd = [sys.executable, __file__, "--_one", name, "--size", size, "--device", device]
            cmd += [] if max_steps is None else ["--max-steps", str(max_steps)]
            cmd += [] if bf16 else ["--no-bf16"]
            cmd += [] if channels_last else ["--no-channels-last"]
            cmd += ["--compile"] if compile_unet else []
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if res.returncode != 0:
                raise RuntimeError(f"benchmark scenario {name} failed:\n{res.stderr[-3000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        else:
            rows.append(run_scenario(name, size, max_steps, resolve_device(device), bf16, channels_last, compile_unet))
        print(f"{name}: {rows[-1]['seconds']['total']:.2f} s", file=sys.stderr)
    print(f"\nbenchmark at the {size} size on {rows[0]['device']} (UNet {rows[0]['unet_params']:,} params, "
          f"VQGAN {rows[0]['vqgan_params']:,} params, {rows[0]['image']}² input)\n")
    print(table(rows))
    if out:
        atomic_write_text(out, json.dumps(rows, indent=2) + "\n")
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time BS-LDM, GL-LCM and this project's sampling per image.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--paper", dest="size", action="store_const", const="paper", help="paper-size networks, 1024²")
    group.add_argument("--quick", dest="size", action="store_const", const="quick", help="tiny networks (tests)")
    group.add_argument("--size", choices=["demo", "paper", "quick"], default="demo")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="time only the first N sampler steps of each scenario and extrapolate")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", dest="compile_unet", action="store_true")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="run only these")
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    if args._one:
        row = run_scenario(args._one, args.size, args.max_steps, resolve_device(args.device), args.bf16,
                           args.channels_last, args.compile_unet)
        print(json.dumps(row))
    else:
        main(args.size, args.max_steps, args.out, args.device, args.bf16, args.channels_last, args.compile_unet,
             args.scenario)
