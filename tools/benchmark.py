"""Sampling benchmark: BS-LDM as published, GL-LCM as published, and this project's default.

Usage:
    python -m tools.benchmark                      # demo size: configs/demo.yaml networks, 256² input
    python -m tools.benchmark --paper --max-steps 2   # paper size: 1024², 383M UNet, 38M VQGAN, fp32 and auto
    python -m tools.benchmark --quick              # tiny networks, a few steps (used by the tests)
    python -m tools.benchmark --paper --max-steps 5 --out bench.json

Times one image through the real code paths (``models.inference``, ``models.global_local``,
``models.fusion``, the VQGAN) for three scenarios:

    (a) bs-ldm   DDPM, 1000 steps, one path (the full CXR);
    (b) gl-lcm   LCM, 50 steps, global and local paths one after the other (two UNet calls per step,
                 two encodings, two decodings, Poisson fusion);
    (c) ours     distilled LCM, 4 steps, global and local paths batched (one UNet call per step, one
                 batched encoding and one batched decoding), Poisson fusion.

Each scenario runs once per precision of ``--precisions`` (default ``fp32,auto``: the published
code's arithmetic and what this project picks on the machine, see ``models/precision.py``), and
(c) also in fp32 with the whole local path (``ours-whole``, the default before the lung box). For
each: UNet calls, wall time split into VQ encoding, sampling, VQ decoding and fusion, the ratios to
(c), and the peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set
size, each row in a fresh subprocess so the peaks do not mix). The header names the CPU model, its
native bf16 instruction sets and the threads. The floating-point work per image of (b) and (c),
counted by ``torch.utils.flop_counter`` on the same networks, is printed below the table. Weights
are random: timings do not depend on them. ``--max-steps N`` runs only the first N sampler steps
of a scenario and extrapolates the sampling time linearly (marked); nothing else is extrapolated.
Channels-last is on unless ``--no-channels-last``; ``--compile`` adds ``torch.compile`` of the UNet.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from models import build_unet, build_vqgan, count_parameters
from models.fusion import fuse
from models.global_local import dual_path_sample
from models.inference import suppress_latents
from models.pipeline import BoneSuppressor, lung_box, useful_box
from models.precision import cpu_bf16_isa, cpu_model, prepare_for_inference
from models.schedule import build_schedule
from utils.atomic import atomic_write_text, json_text
from utils.config import InferenceConfig, load_config
from utils.dist import resolve_device

ROOT = Path(__file__).resolve().parents[1]
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


def synthetic_case(image: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth "CXR" (image, image) in [0, 1] and a two-lobe "lung mask": content does not change timings."""
    yy, xx = np.mgrid[0:image, 0:image] / image
    cxr = (0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy)).astype(np.float32)
    mask = (((xx - 0.3) ** 2 / 0.03 + (yy - 0.5) ** 2 / 0.12) < 1) | (((xx - 0.7) ** 2 / 0.03 + (yy - 0.5) ** 2 / 0.12) < 1)
    return cxr, mask


def run_scenario(name: str, size: str, max_steps: int | None, device: torch.device, precision: str = "fp32",
                 channels_last: bool = True, compile_unet: bool = False, local_crop: bool = True,
                 seed: int = 0) -> dict:
    """Time one image through scenario ``name``; returns the row of the table."""
    spec = SCENARIOS[name]
    base = bench_config(size)
    steps = spec["steps"] if size != "quick" else min(spec["steps"], 8)
    cfg = replace(base, sampler=replace(base.sampler, name=spec["sampler"], steps=steps),
                  global_local=replace(base.global_local, leg_mode="noise"),
                  inference=InferenceConfig(precision=precision, channels_last=channels_last, compile=compile_unet,
                                            local_crop=local_crop))
    torch.manual_seed(seed)
    vqgan_raw = build_vqgan(cfg.vqgan).to(device).eval().requires_grad_(False)
    image = cfg.data.image_size
    unet_raw = build_unet(cfg.unet, image_size=image // vqgan_raw.downsample_factor).to(device).eval().requires_grad_(False)
    n_unet, n_vqgan = count_parameters(unet_raw), count_parameters(vqgan_raw)
    unet_w, vqgan, arithmetic = prepare_for_inference(unet_raw, vqgan_raw, cfg.inference, device)
    unet = CountingUNet(unet_w)
    schedule = build_schedule(cfg.diffusion)
    cxr, mask = synthetic_case(image)
    x = torch.from_numpy(cxr * 2 - 1)[None, None].to(device)
    x_masked = torch.from_numpy(np.where(mask, cxr, 0) * 2 - 1)[None, None].to(device).float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        # warm-up of every network on this input size (not timed): first calls allocate and tune kernels
        for _ in range(1 if size == "paper" else 2):   # one pass is enough for the heavy paper networks
            warm = vqgan.encode_stage_2_inputs(torch.cat([x, x_masked]))
            vqgan.decode(warm)
            unet_w(torch.cat([warm, warm], 1), torch.zeros(2, dtype=torch.long, device=device))
        synchronize(device)
    unet.calls = 0
    if spec["batched"]:
        # (c) is exactly what ldm_eval.py runs, native-size output included (counted in "fusion").
        suppressor = BoneSuppressor(unet, vqgan, schedule, cfg, cfg.diffusion.cond_mode)
        if local_crop:
            suppressor.black_latent()      # once per run, not per image
        suppressor([cxr], [mask], ["benchmark.png"])
        synchronize(device)
        times, n_done = dict(suppressor.times), steps
    else:
        times = {}
        n_done = _published(spec, steps, vqgan, unet, schedule, cfg, x, x_masked, cxr, mask, device,
                            max_steps, seed, times)

    calls_per_step = unet.calls / max(n_done, 1)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    label = name if local_crop or not spec["batched"] else f"{name}-whole"
    return {"scenario": label, "size": size, "image": image, "sampler": spec["sampler"], "steps": steps,
            "paths": spec["paths"], "batched": spec["batched"], "steps_timed": n_done,
            "extrapolated": n_done < steps, "unet_calls": int(round(calls_per_step * steps)),
            "seconds": {**times, "total": sum(times.values())}, "peak_memory_bytes": int(peak),
            "peak_memory_kind": "cuda allocated" if device.type == "cuda" else "process RSS",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads, native bf16: "
            f"{'+'.join(cpu_bf16_isa()) or 'none'})",
            "unet_params": n_unet, "vqgan_params": n_vqgan, "precision_asked": precision,
            "precision": arithmetic.split()[1], "arithmetic": arithmetic, "local_crop": local_crop and spec["batched"],
            "channels_last": channels_last, "compile": compile_unet}


def flops_per_image(size: str) -> dict[str, float]:
    """Floating-point operations per image of (b) and of (c) with the whole local path and with the
    lung box, counted on meta-device copies of the networks (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = bench_config(size)
    with torch.device("meta"):
        vqgan = build_vqgan(cfg.vqgan)
        unet = build_unet(cfg.unet, image_size=cfg.data.image_size // vqgan.downsample_factor)
    f, s = vqgan.downsample_factor, cfg.data.image_size

    def count(fn, *shape) -> float:
        with FlopCounterMode(display=False) as fc:
            fn(torch.empty(*shape, device="meta"))
        return float(fc.get_total_flops())

    _, mask = synthetic_case(s)
    box = useful_box(lung_box(mask, f, cfg.inference.crop_margin), s // f)
    bh, bw = (box[1] - box[0], box[3] - box[2]) if box else (s // f, s // f)
    enc, dec = count(vqgan.encode, 1, 1, s, s), count(vqgan.decode, 1, vqgan.embedding_dim, s // f, s // f)
    enc_box, dec_box = count(vqgan.encode, 1, 1, bh * f, bw * f), count(vqgan.decode, 1, vqgan.embedding_dim, bh, bw)
    with FlopCounterMode(display=False) as fc:
        unet(torch.empty(1, cfg.unet.in_channels, s // f, s // f, device="meta"), torch.zeros(1, device="meta"))
    path = float(fc.get_total_flops())
    ours_steps, gl_steps = SCENARIOS["ours"]["steps"], SCENARIOS["gl-lcm"]["steps"]
    return {"gl-lcm": 2 * enc + 2 * gl_steps * path + 2 * dec,
            "ours-whole": 2 * enc + 2 * ours_steps * path + 3 * dec,
            "ours": enc + enc_box + 2 * ours_steps * path + 2 * dec + dec_box,
            "encode": enc, "encode_box": enc_box, "decode": dec, "decode_box": dec_box, "unet_path": path,
            "box_fraction": bh * bw / (s // f) ** 2}


def _published(spec, steps, vqgan, unet, schedule, cfg, x, x_masked, cxr, mask, device, max_steps, seed,
               times) -> int:
    """Scenarios (a) and (b), structured as the published code: one encoding, sampling and decoding
    per path, one after the other. Fills ``times``; returns the number of sampler steps run."""
    gens = lambda s: [torch.Generator().manual_seed(s)]  # noqa: E731
    done_steps = [0]

    def callback(j, *args):
        done_steps[0] = j + 1
        if max_steps is not None and j + 1 >= max_steps:
            raise StopSampling

    with torch.no_grad():
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
    """Markdown table of the rows, with the speed-ups of sampling and end to end over (c) as chosen
    (``ours`` in the last precision run, the project's default)."""
    ours = next((r for r in reversed(rows) if r["scenario"] == "ours"), None)
    lines = ["| scenario | precision | sampler, steps | UNet calls | encode s | sample s | decode s | fusion s | total s "
             "| sampling × vs ours | end to end × vs ours | peak memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds"]
        ext = f" (timed {r['steps_timed']}, extrapolated)" if r["extrapolated"] else ""
        sp = f"{s['sample'] / ours['seconds']['sample']:.1f}" if ours else "-"
        tot = f"{s['total'] / ours['seconds']['total']:.1f}" if ours else "-"
        lines.append(f"| {r['scenario']} | {r['precision']} | {r['sampler']}, {r['steps']}{ext} | {r['unet_calls']} | "
                     f"{s['encode']:.3f} | {s['sample']:.3f} | {s['decode']:.3f} | {s['fusion']:.3f} | {s['total']:.3f} | "
                     f"{sp} | {tot} | {r['peak_memory_bytes'] / 2**20:.0f} MiB |")
    return "\n".join(lines)


def plan(scenarios: list[str], precisions: list[str], device: torch.device) -> list[tuple[str, str, bool]]:
    """(scenario, precision, local_crop) of every row: each scenario in each precision (``auto`` is
    dropped where it resolves to one already listed), and (c) in fp32 with the whole local path."""
    from models.precision import resolve_precision

    resolved = {p: resolve_precision(p, device)[0] for p in precisions}
    unique = [p for i, p in enumerate(precisions) if resolved[p] not in [resolved[q] for q in precisions[:i]]]
    rows = [(name, p, True) for name in scenarios for p in unique]
    if "ours" in scenarios:
        rows.insert(rows.index(("ours", unique[0], True)), ("ours", "fp32", False))
    return rows


def main(size: str = "demo", max_steps: int | None = None, out: str | Path | None = None, device: str = "auto",
         precisions: tuple[str, ...] = ("fp32", "auto"), channels_last: bool = True, compile_unet: bool = False,
         scenarios: list[str] | None = None, subprocesses: bool = True) -> list[dict]:
    """Run the rows of :func:`plan` (each in its own process unless ``subprocesses`` is False); print and save."""
    rows = []
    dev = resolve_device(device)
    for name, precision, crop in plan(scenarios or list(SCENARIOS), list(precisions), dev):
        if subprocesses:
            cmd = [sys.executable, "-m", "tools.benchmark", "--_one", name, "--size", size, "--device", device,
                   "--precisions", precision]
            cmd += [] if max_steps is None else ["--max-steps", str(max_steps)]
            cmd += [] if channels_last else ["--no-channels-last"]
            cmd += ["--compile"] if compile_unet else []
            cmd += [] if crop else ["--_whole"]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if res.returncode != 0:
                raise RuntimeError(f"benchmark scenario {name} failed:\n{res.stderr[-3000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        else:
            rows.append(run_scenario(name, size, max_steps, dev, precision, channels_last, compile_unet, crop))
        print(f"{rows[-1]['scenario']} ({rows[-1]['precision']}): {rows[-1]['seconds']['total']:.2f} s", file=sys.stderr)
    r0 = rows[0]
    print(f"\nbenchmark at the {size} size on {r0['device']} (UNet {r0['unet_params']:,} params, "
          f"VQGAN {r0['vqgan_params']:,} params, {r0['image']}² input, channels-last "
          f"{'on' if channels_last else 'off'}{', compiled UNet' if compile_unet else ''})\n")
    print(table(rows))
    flops = flops_per_image(size)
    print(f"\nwork per image: gl-lcm {flops['gl-lcm'] / 1e12:.2f} TFLOP, ours with the whole local path "
          f"{flops['ours-whole'] / 1e12:.2f}, ours with the lung box {flops['ours'] / 1e12:.2f} (the box is "
          f"{flops['box_fraction']:.0%} of the latent grid; encoding {flops['encode'] / 1e12:.2f} -> "
          f"{flops['encode_box'] / 1e12:.2f} TFLOP, decoding {flops['decode'] / 1e12:.2f} -> "
          f"{flops['decode_box'] / 1e12:.2f}, one UNet path {flops['unet_path'] / 1e12:.3f})")
    if out:
        atomic_write_text(out, json_text({"rows": rows, "flops": flops}, indent=2) + "\n")
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
    parser.add_argument("--precisions", default="fp32,auto",
                        help="comma-separated, each of fp32, bf16, fp16, auto (default fp32,auto)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", dest="compile_unet", action="store_true")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="run only these")
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    parser.add_argument("--_whole", action="store_true", help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    precisions = tuple(p.strip() for p in args.precisions.split(","))
    bad = [p for p in precisions if p not in ("fp32", "bf16", "fp16", "auto")]
    if bad:
        sys.exit(f"error: --precisions: unknown {', '.join(bad)} (choose among fp32, bf16, fp16, auto)")
    if args._one:
        row = run_scenario(args._one, args.size, args.max_steps, resolve_device(args.device), precisions[0],
                           args.channels_last, args.compile_unet, not args._whole)
        print(json_text(row))
    else:
        main(args.size, args.max_steps, args.out, args.device, precisions, args.channels_last, args.compile_unet,
             args.scenario)
