"""Frequency analysis of soft-tissue images, their VQ latents and the diffusion noise: why offset noise.

Usage:
    python -m tools.analysis --ckpt runs/demo/ldm/000-demo/checkpoints/best.pt --out docs/generated/analysis
    python -m tools.analysis --ckpt runs/vqgan/000-szch/checkpoints/best.pt --split test --n 16 --components 64 \
        --out runs/analysis --set data.root=/data/SZCH-X-Rays --set diffusion.beta_schedule=cosine

``--ckpt`` is a stage-2 (diffusion or distilled) checkpoint, whose VQGAN and noise schedule are used,
or a stage-1 VQGAN checkpoint, with the schedule of that checkpoint's ``diffusion`` config section
(change it with ``--set diffusion.*``). ``--n`` soft-tissue images of ``--split`` are read at the
model size, VQ-encoded (quantised latents, what the diffusion model learns) and compared with
Gaussian noise of the latents' shape. Outputs in ``--out``:

``psd.png``, ``psd.csv``
    Radially averaged power spectral density (PSD) of the soft-tissue images, of their latents and
    of N(0, I) noise on one log-log plot, averaged over the images and channels, in ``--components``
    radial bins between 0 (DC excluded) and Nyquist. Frequencies are in cycles per pixel of each
    signal's own grid (a latent pixel spans f image pixels). White noise is flat; images and latents
    fall off as a power law, so most of their energy sits at low frequencies.
``frequency_noise.png``
    One latent channel and its DFT low-pass / high-pass parts (ideal circular filter at ``--cutoff``
    cycles/pixel), clean and noised by the forward process x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε at
    ``--timesteps``: the high band drowns early, the low band (and the mean) survives to large t.
``band_snr.png``
    Signal-to-noise ratio of the low band, the high band and the per-channel mean (DC) against t,
    with plain and with offset noise: offset noise lowers the SNR of the mean, so the model has to
    learn to set the mean brightness instead of copying it from x_t (docs/method.md §3.3).
``offset_noise.png``
    How offset noise is composed: per-pixel ε, the per-channel constant c·δ, their sum ε + c·δ, and
    the spread of the per-channel means of both (variance 1/(h·w) vs 1/(h·w) + c²).
``analysis.json``
    Settings, image names, the fitted power-law exponents and the band SNRs at ``--timesteps``.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from data.datasets import PairedDataset, split_list
from models import load_vqgan
from models.schedule import build_schedule, offset_noise, randn
from utils.atomic import atomic_write_text, json_text
from utils.cli import entry_point
from utils.checkpoint import CheckpointError, load_checkpoint, resolve_first_stage
from utils.config import config_from_dict
from utils.dist import resolve_device
from utils.logging import pyplot, save_figure

DEFAULT_TIMESTEPS = (200, 500, 800)


# --------------------------------------------------------------------------------------------------
# Spectra and bands (NumPy, no model)
# --------------------------------------------------------------------------------------------------

def radial_frequency(h: int, w: int) -> np.ndarray:
    """(h, w) radial frequency |f| in cycles per pixel of the unshifted DFT grid (0 at [0, 0])."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    return np.sqrt(fy ** 2 + fx ** 2)


def radial_psd(x: np.ndarray | torch.Tensor, components: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectral density of a batch of 2-D signals.

    The power |DFT(x)|² / (H·W) is averaged over all leading dimensions (samples, channels) and over
    the frequencies of each radial bin. With this normalisation white noise of variance σ² has a
    flat PSD equal to σ², whatever the grid size, so images, latents and noise share one y axis.

    Args:
        x: (..., H, W) real signals.
        components: number of equal-width radial bins on (0, 0.5] cycles/pixel. It is capped at
            min(H, W) // 2, the number of distinct frequencies along an axis, so no bin is empty.
            The DC term (the mean) is left out (it has no place on a log axis; ``band_snr`` covers it),
            and so are the corner frequencies beyond Nyquist, which only some directions reach.

    Returns:
        (frequencies (K,), psd (K,)): bin centres in cycles/pixel and the mean power per bin.
    """
    a = x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)
    if a.ndim < 2 or min(a.shape[-2:]) < 2:
        raise ValueError(f"need (..., H, W) signals with H, W >= 2, got shape {a.shape}")
    h, w = a.shape[-2:]
    k = min(int(components), min(h, w) // 2)
    if k < 1:
        raise ValueError(f"components must be >= 1, got {components}")
    power = (np.abs(np.fft.fft2(a)) ** 2 / (h * w)).reshape(-1, h, w).mean(axis=0)
    r = radial_frequency(h, w)
    edges = np.linspace(0.0, 0.5, k + 1)
    # Bin b holds edges[b] < r <= edges[b+1]: DC (r = 0) falls in none, Nyquist (r = 0.5) in the last.
    idx = np.searchsorted(edges, r, side="left") - 1
    keep = (r > 0) & (r <= 0.5)
    sums = np.bincount(idx[keep], weights=power[keep], minlength=k)
    counts = np.bincount(idx[keep], minlength=k)
    return (edges[:-1] + edges[1:]) / 2, sums / np.maximum(counts, 1)


def power_law_exponent(freqs: np.ndarray, psd: np.ndarray) -> float:
    """β of the least-squares fit log PSD = β·log f + c (0 for white noise, about −2 for natural images)."""
    ok = (freqs > 0) & (psd > 0)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(freqs[ok]), np.log(psd[ok]), 1)[0])


def band_split(x: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ideal DFT low-pass / high-pass split of (..., H, W) signals.

    low keeps the frequencies with |f| <= ``cutoff`` cycles/pixel (the DC term included), high = x − low,
    so low + high = x exactly (up to rounding).
    """
    h, w = x.shape[-2:]
    keep = torch.from_numpy(radial_frequency(h, w) <= cutoff).to(x.device)
    low = torch.fft.ifft2(torch.fft.fft2(x.double()) * keep).real.to(x.dtype)
    return low, x - low


def band_power(x: torch.Tensor, cutoff: float) -> dict[str, float]:
    """Mean power per element of the DC term, the low band (DC excluded) and the high band of (B, C, H, W) x.

    DC is the per-channel spatial mean; "power" is sum |DFT|² / (H·W)² over the band (Parseval: the
    three add up to mean(x²)).
    """
    h, w = x.shape[-2:]
    p = (torch.fft.fft2(x.double()).abs() ** 2 / (h * w) ** 2).mean(dim=tuple(range(x.ndim - 2)))
    r = torch.from_numpy(radial_frequency(h, w))
    return {"dc": float(p[0, 0]), "low": float(p[(r > 0) & (r <= cutoff)].sum()), "high": float(p[r > cutoff].sum())}


def noise_band_power(h: int, w: int, cutoff: float, coefficient: float = 0.0) -> dict[str, float]:
    """:func:`band_power` of N(0, I) noise in expectation (flat PSD: 1/(h·w) per frequency), plus c² on
    the DC term for offset noise ε + c·δ (δ is one N(0, 1) constant per channel)."""
    r = radial_frequency(h, w)
    return {"dc": 1 / (h * w) + coefficient ** 2, "low": float(((r > 0) & (r <= cutoff)).sum()) / (h * w),
            "high": float((r > cutoff).sum()) / (h * w)}


def band_snr(signal: dict[str, float], noise: dict[str, float], alphas_cumprod: np.ndarray) -> dict[str, np.ndarray]:
    """SNR of each band of x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε for every t: ᾱ_t·P_x0 / ((1−ᾱ_t)·P_ε)."""
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    return {k: a * signal[k] / np.maximum((1 - a) * noise[k], 1e-300) for k in signal}


# --------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------

def load_analysis_models(ckpt: str | Path, overrides: list[str] = ()):
    """(VQGAN on ``run.device``, config, checkpoint kind) for an LDM or a VQGAN checkpoint.

    For an LDM checkpoint the config is the diffusion run's (its data, VQGAN and schedule); for a
    VQGAN checkpoint it is the VQGAN run's, whose ``diffusion`` section gives the schedule.
    """
    raw = load_checkpoint(ckpt)
    kind = raw.get("kind")
    if kind not in ("ldm", "vqgan"):
        raise CheckpointError(f"{ckpt}: is a '{kind}' checkpoint, expected 'ldm' or 'vqgan'")
    cfg = config_from_dict(raw["config"], f"{ckpt} (config)", overrides)
    vq_path = ckpt if kind == "vqgan" else resolve_first_stage(ckpt, cfg.ldm_train.vqgan_ckpt)
    vqgan, vq_cfg = load_vqgan(vq_path, resolve_device(cfg.run.device))
    # The latents are the VQGAN's: encode at the size and intensity convention it was trained with.
    if kind == "vqgan":
        cfg = replace(cfg, data=replace(cfg.data, image_size=vq_cfg.data.image_size, invert=vq_cfg.data.invert))
    return vqgan, cfg, kind


def load_soft_tissue(cfg, split: str, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` soft-tissue images of a split at the model size: ((n, 1, S, S) in [-1, 1], names)."""
    names = split_list(cfg.data, split)[:n]
    if not names:
        raise ValueError(f"the {split} split of {cfg.data.root} is empty")
    ds = PairedDataset(cfg.data.root, names, cfg.data.image_size, cfg.data.invert, max_pixels=cfg.data.max_pixels)
    return torch.stack([ds[i]["bs"] for i in range(len(ds))]), names


@torch.no_grad()
def encode(vqgan, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Quantised latents q(E(x)) (n, D, S/f, S/f) of (n, 1, S, S) images, in batches."""
    device = next(vqgan.parameters()).device
    return torch.cat([vqgan.encode_stage_2_inputs(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------

def _save(fig, path: Path) -> None:
    save_figure(fig, path, dpi=110, bbox_inches="tight")


def plot_psd(curves: dict[str, tuple[np.ndarray, np.ndarray]], slopes: dict[str, float], path: Path,
             title: str = "") -> None:
    """One log-log figure of the radially averaged PSDs (label -> (frequencies, psd))."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for (label, (f, p)), style in zip(curves.items(), ("-", "--", ":", "-.")):
        ax.loglog(f, p, style, lw=2, label=f"{label} (slope {slopes[label]:.2f})")
    ax.set_xlabel("spatial frequency (cycles / pixel of its own grid)")
    ax.set_ylabel("power (variance per frequency)")
    ax.set_title(title or "Radially averaged power spectral density")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_frequency_noise(x0: torch.Tensor, noise: torch.Tensor, schedule, timesteps: list[int], cutoff: float,
                         path: Path) -> None:
    """Rows x_t / low-pass / high-pass, columns clean and each timestep, for one (h, w) latent channel."""
    plt = pyplot()
    cols = [("clean x0", x0)] + [
        (f"t = {t}  (√ᾱ = {float(schedule.sqrt_alphas_cumprod[t]):.3f})", schedule.add_noise(x0[None, None], noise[None, None], t)[0, 0])
        for t in timesteps]
    rows = ("x_t", f"low-pass (|f| ≤ {cutoff:g})", "high-pass")
    parts = [[x, *band_split(x, cutoff)] for _, x in cols]
    fig, axes = plt.subplots(3, len(cols), figsize=(2.4 * len(cols), 7.4), squeeze=False)
    for r in range(3):
        # One symmetric colour scale per row, so that a band's amplitude can be compared across t.
        vmax = max(float(parts[c][r].abs().quantile(0.99)) for c in range(len(cols))) or 1.0
        for c, (title, _) in enumerate(cols):
            img = parts[c][r].numpy()
            ax = axes[r, c]
            ax.imshow(img, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.02, 0.02, f"std {img.std():.2f}", transform=ax.transAxes, fontsize=8,
                    color="k", backgroundcolor=(1, 1, 1, 0.7))
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(rows[r])
    fig.suptitle("A latent channel before and after the forward process, split into DFT bands")
    _save(fig, path)


def plot_band_snr(snr_plain: dict[str, np.ndarray], snr_offset: dict[str, np.ndarray], coefficient: float,
                  path: Path) -> None:
    """SNR of the DC, low and high bands against t, plain noise (solid) and offset noise (dashed; drawn
    for the bands it changes, i.e. DC)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    t = np.arange(len(next(iter(snr_plain.values()))))
    for (band, s), colour in zip(snr_plain.items(), ("C3", "C0", "C2")):
        ax.semilogy(t, s, color=colour, lw=2, label=f"{band}" + (", plain noise" if band == "dc" else ""))
        if not np.allclose(snr_offset[band], s):   # offset noise only changes the DC term
            ax.semilogy(t, snr_offset[band], "--", color=colour, lw=1.5, label=f"{band}, offset noise (c = {coefficient:g})")
    ax.axhline(1.0, color="k", lw=0.8, alpha=0.5)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("SNR of x_t in the band")
    ax.set_title("Which part of the latent survives the forward process")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_offset_noise(eps: torch.Tensor, off: torch.Tensor, means_plain: np.ndarray, means_offset: np.ndarray,
                      coefficient: float, path: Path) -> None:
    """Rows = latent channels; columns ε, c·δ, ε + c·δ, then the spread of the per-channel means."""
    plt = pyplot()
    channels = eps.shape[0]
    const = off - eps     # c·δ broadcast to (h, w): what offset_noise added on top of ε
    fig = plt.figure(figsize=(11, 2.2 * channels))
    grid = fig.add_gridspec(channels, 4, width_ratios=[1, 1, 1, 1.6])
    # The constant is small next to ε (c = 0.1): on ε's colour scale it would be invisible, so its
    # column gets one scale of its own, shared by the channels so that their constants compare.
    cmax = float(const.abs().max()) or 1.0
    titles = ("per-pixel ε ~ N(0, I)", f"per-channel constant c·δ, c = {coefficient:g}\n(own colour scale ±{cmax:.2f})",
              "offset noise ε + c·δ")
    for ch in range(channels):
        vmax = float(off[ch].abs().max())
        for col, img in enumerate((eps[ch], const[ch], off[ch])):
            ax = fig.add_subplot(grid[ch, col])
            lim = cmax if col == 1 else vmax
            ax.imshow(img.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.02, 0.02, f"mean {float(img.mean()):+.3f}", transform=ax.transAxes, fontsize=8,
                    backgroundcolor=(1, 1, 1, 0.7))
            if ch == 0:
                ax.set_title(titles[col], fontsize=9)
            if col == 0:
                ax.set_ylabel(f"channel {ch}")
    ax = fig.add_subplot(grid[:, 3])
    bins = np.linspace(min(means_plain.min(), means_offset.min()), max(means_plain.max(), means_offset.max()), 60)
    ax.hist(means_plain, bins, alpha=0.6, density=True, label=f"ε: std {means_plain.std():.3f}")
    ax.hist(means_offset, bins, alpha=0.6, density=True, label=f"ε + c·δ: std {means_offset.std():.3f}")
    ax.set_xlabel("spatial mean of one channel")
    ax.set_title("per-channel means over many draws", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def main(ckpt: str | Path, out_dir: str | Path | None = None, split: str = "test", n: int = 16,
         components: int = 64, timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS, cutoff: float = 0.125,
         offset_coefficient: float | None = None, channel: int = 0, seed: int = 0,
         overrides: list[str] = ()) -> dict:
    """Write the four figures, ``psd.csv`` and ``analysis.json`` into ``out_dir``; return the summary.

    Args:
        ckpt: LDM or VQGAN checkpoint.
        out_dir: default ``<run>/analysis``.
        n: number of soft-tissue images (the first n of the split list).
        components: radial bins of the PSD (capped per signal, see :func:`radial_psd`).
        timesteps: forward-process timesteps of ``frequency_noise.png``.
        cutoff: low/high band edge in cycles/pixel (0 < cutoff < 0.5).
        offset_coefficient: c of ``offset_noise.png`` and ``band_snr.png``; default the config's
            ``diffusion.offset_noise``, or 0.1 when that is 0 (a model trained without it).
        channel: the latent channel shown in ``frequency_noise.png``.
        seed: seeds every noise draw.
    """
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if not 0 < cutoff < 0.5:
        raise ValueError(f"--cutoff must be in (0, 0.5) cycles/pixel, got {cutoff}")
    vqgan, cfg, kind = load_analysis_models(ckpt, overrides)
    schedule = build_schedule(cfg.diffusion)
    bad = [t for t in timesteps if not 0 <= t < schedule.num_train_timesteps]
    if bad:
        raise ValueError(f"timesteps must be in [0, {schedule.num_train_timesteps}), got {bad}")
    c = cfg.diffusion.offset_noise if offset_coefficient is None else offset_coefficient
    c = c if c > 0 else 0.1
    out = Path(out_dir) if out_dir else Path(ckpt).resolve().parent.parent / "analysis"

    images, names = load_soft_tissue(cfg, split, n)
    latents = encode(vqgan, images)                                   # (n, D, h, w)
    if not 0 <= channel < latents.shape[1]:
        raise ValueError(f"--channel must be in [0, {latents.shape[1]}), got {channel}")
    gen = torch.Generator().manual_seed(seed)
    noise = randn(latents.shape, gen)

    curves = {"soft-tissue images": radial_psd(images, components),
              "VQ latents": radial_psd(latents, components),
              "Gaussian noise N(0, I)": radial_psd(noise, components)}
    slopes = {k: power_law_exponent(*v) for k, v in curves.items()}
    plot_psd(curves, slopes, out / "psd.png",
             f"PSD, {len(names)} {split} images ({cfg.data.image_size}²) and latents {tuple(latents.shape[1:])}")
    rows = [(label, f"{fr:.6g}", f"{p:.6g}") for label, (f, ps) in curves.items() for fr, p in zip(f, ps)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("signal", "frequency_cycles_per_pixel", "power"), *rows])
    atomic_write_text(out / "psd.csv", buf.getvalue())

    plot_frequency_noise(latents[0, channel], noise[0, channel], schedule, list(timesteps), cutoff,
                         out / "frequency_noise.png")

    h, w = latents.shape[-2:]
    # Expected noise power, not one draw: the curves then depend on the data alone.
    signal_bands = band_power(latents, cutoff)
    plain_bands, offset_bands = noise_band_power(h, w, cutoff), noise_band_power(h, w, cutoff, c)
    a_bar = schedule.alphas_cumprod.numpy()
    snr_plain, snr_offset = band_snr(signal_bands, plain_bands, a_bar), band_snr(signal_bands, offset_bands, a_bar)
    plot_band_snr(snr_plain, snr_offset, c, out / "band_snr.png")

    # ε alone with the same generator state: offset_noise draws ε first, so off − eps = c·δ exactly.
    off = offset_noise(latents.shape, c, torch.Generator().manual_seed(seed))
    eps = randn(latents.shape, torch.Generator().manual_seed(seed))
    draws = 4096 // latents.shape[1] + 1
    many_gen = torch.Generator().manual_seed(seed + 1)
    shape = (draws, *latents.shape[1:])
    means_plain = randn(shape, many_gen).mean(dim=(-2, -1)).flatten().numpy()
    means_offset = offset_noise(shape, c, many_gen).mean(dim=(-2, -1)).flatten().numpy()
    plot_offset_noise(eps[0], off[0], means_plain, means_offset, c, out / "offset_noise.png")

    summary = {
        "checkpoint": str(ckpt), "kind": kind, "split": split, "names": names,
        "image_size": cfg.data.image_size, "latent_shape": list(latents.shape[1:]),
        "schedule": cfg.diffusion.beta_schedule, "offset_coefficient": c, "cutoff": cutoff, "seed": seed,
        "components": {"requested": components,
                       "used": {k: int(len(v[0])) for k, v in curves.items()}},
        "psd_slope": slopes,
        "latent_std": float(latents.std()),
        "band_power": {"latents": signal_bands, "plain_noise": plain_bands, "offset_noise": offset_bands},
        "band_snr": {str(t): {"plain": {k: float(v[t]) for k, v in snr_plain.items()},
                              "offset": {k: float(v[t]) for k, v in snr_offset.items()}} for t in timesteps},
        "mean_variance": {"plain_theory": 1 / (h * w), "offset_theory": 1 / (h * w) + c * c,
                          "plain_measured": float(means_plain.var()), "offset_measured": float(means_offset.var())},
        "figures": ["psd.png", "frequency_noise.png", "band_snr.png", "offset_noise.png"],
    }
    atomic_write_text(out / "analysis.json", json_text(summary, indent=2) + "\n")
    print(f"{len(names)} images, latents {tuple(latents.shape[1:])}: PSD slopes "
          + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items()) + f" -> {out}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="stage-2 (LDM) or stage-1 (VQGAN) checkpoint")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--n", type=int, default=16, help="number of images (the first n of the split)")
    p.add_argument("--components", type=int, default=64, help="radial frequency bins of the PSD")
    p.add_argument("--timesteps", type=int, nargs="+", default=list(DEFAULT_TIMESTEPS))
    p.add_argument("--cutoff", type=float, default=0.125, help="low/high band edge, cycles per latent pixel")
    p.add_argument("--offset", dest="offset_coefficient", type=float,
                   help="offset-noise coefficient c (default: diffusion.offset_noise, or 0.1 if that is 0)")
    p.add_argument("--channel", type=int, default=0, help="latent channel of frequency_noise.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the checkpoint's config, e.g. --set data.root=/data/SZCH-X-Rays")
    p.add_argument("--out", dest="out_dir", help="output folder (default: <run>/analysis)")
    return p


@entry_point()
def cli(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    main(args.ckpt, args.out_dir, args.split, args.n, args.components, tuple(args.timesteps), args.cutoff,
         args.offset_coefficient, args.channel, args.seed, args.overrides)


if __name__ == "__main__":
    sys.exit(cli())
