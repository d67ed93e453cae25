"""Stage 2 as a library: train the conditional latent noise estimator of BS-LDM / GL-LCM (docs/method.md §3),
or distil a trained one into a few-step latent consistency model (``ldm_train.mode: distill``, §4.5);
what ``ldm_train.py`` runs.

The frozen first stage (rebuilt from its checkpoint) encodes every (CXR, soft tissue) pair of the
train and val splits once (``ldm_train.cache_latents``; plus the lung-masked pairs with
``data.use_masked``, §1.5). The UNet sees [noisy soft-tissue latent ; CXR latent] and predicts the
offset noise ε + c·δ (or, with ``diffusion.prediction: v``, v = √ᾱ·(ε + c·δ) − √(1−ᾱ)·z0; MSE on the 4
supervised channels, timesteps drawn per real batch element,
§7.5); the condition enters as ``diffusion.cond_mode`` says (§3.5). AdamW with MultiStepLR
milestones in epochs; an EMA of the weights is kept, saved and used for validation and sampling
(§7.6). Validation: the same loss on the val split with a fixed generator, and a PNG grid of sampled val
images (CXR | prediction | target, all through the VQGAN decoder).

Distillation (``ldm_train.mode: distill``): the teacher is a diffusion checkpoint of this stage
(its EMA weights, frozen); the UNet, schedule, offset noise, condition mode and prediction type are taken from its
config, and so is the VQGAN unless ``ldm_train.vqgan_ckpt`` is given. The student starts from the
teacher's weights; the EMA target network (μ = ``distill.target_ema``) is what gets saved as
``ema`` and sampled. Each step draws a start time on the N-point DDIM grid, takes one DDIM teacher
step k = T/N back, and regresses the student's consistency output onto the target's (L2 or
pseudo-Huber, gradient norm clipped at 1). A teacher trained in ``bug_compatible`` mode yields a
student in ``scaled_consistent`` mode (its sampling input is its training input, §3.5).

Run folder ``<run.out_dir>/ldm/<NNN>-<run.name>/``: config.yaml (the config the run used: a
distillation's holds the teacher's sections, see ``resolve_config``), log.txt, metrics.csv, curves.png,
samples/val_<epoch>.png, checkpoints/ (step_*.pt, best.pt by EMA val loss, latest.json).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

from data.datasets import PairedDataset, split_list
from models import build_unet, count_parameters, load_ldm, load_vqgan
from models.checkpoints import checkpoint_config
from models.distill import consistency_distillation_loss
from models.inference import suppress_latents
from models.schedule import build_schedule, eps_model, training_loss
from utils.checkpoint import CheckpointError, resolve_first_stage
from utils.config import Config, ConfigError
from utils.dist import DistInfo, all_reduce_mean, autocast_context, seed_everything
from utils.ema import EMA
from utils.logging import get_logger, plot_curves, save_grid
from utils.training import RunCheckpoints, check_finite, iteration_milestones, prepare_run_dir, run_training

STAGE = "ldm"
FROZEN_SECTIONS = ("unet", "diffusion", "data")


@torch.no_grad()
def encode_pairs(vqgan, cfg, split: str, device: torch.device, progress: bool = False) -> TensorDataset:
    """VQ latents of a split's pairs: TensorDataset of (z_bs, z_cxr), each (N, 4, S/f, S/f), on the CPU."""
    d = cfg.data
    names = split_list(d, split)
    sets = [PairedDataset(d.root, names, d.image_size, d.invert, max_pixels=d.max_pixels)]
    if d.use_masked:
        sets.append(PairedDataset(d.root, names, d.image_size, d.invert, masked=True, max_pixels=d.max_pixels))
    z_bs, z_cxr = [], []
    for ds in sets:
        loader = DataLoader(ds, batch_size=cfg.ldm_train.batch_size, num_workers=d.num_workers)
        for batch in tqdm(loader, desc=f"encode {split}", disable=not progress, leave=False):
            z_bs.append(vqgan.encode_stage_2_inputs(batch["bs"].to(device)).cpu())
            z_cxr.append(vqgan.encode_stage_2_inputs(batch["cxr"].to(device)).cpu())
    if not z_bs:
        return TensorDataset(torch.zeros(0), torch.zeros(0))
    return TensorDataset(torch.cat(z_bs), torch.cat(z_cxr))


def make_loss(cfg, schedule, teacher=None):
    """``loss_fn(model, z_bs, z_cxr, generator) -> (loss, logs)`` of the configured mode.

    Diffusion: ε-MSE with offset noise. Distillation: the LCD loss with ``model`` as the student and
    as its own target (the trainer passes the EMA target network as ``target`` through a closure).
    """
    if cfg.ldm_train.mode == "diffusion":
        return lambda model, z_bs, z_cxr, g=None, target=None: training_loss(
            model, schedule, z_bs, z_cxr, cfg.diffusion, generator=g)
    # The LCD loss works with ε-models: a v-prediction student, target and teacher are seen through
    # eps_model (the student inherits the teacher's prediction type with its weights).
    as_eps = lambda net: eps_model(net, schedule, cfg.diffusion.prediction)  # noqa: E731
    teacher = as_eps(teacher)
    return lambda model, z_bs, z_cxr, g=None, target=None: consistency_distillation_loss(
        as_eps(model), as_eps(model if target is None else target), teacher, schedule, z_bs, z_cxr, cfg.distill,
        cfg.diffusion, generator=g)


@torch.no_grad()
def validate(loss_fn, model, val_set: TensorDataset, cfg, device: torch.device) -> float:
    """EMA-model loss over the val latents; the generator is reseeded so every call sees the same t and noise."""
    g = torch.Generator(device="cpu").manual_seed(cfg.run.seed)
    total, n = 0.0, 0
    for z_bs, z_cxr in DataLoader(val_set, batch_size=cfg.ldm_train.batch_size):
        loss, _ = loss_fn(model, z_bs.to(device), z_cxr.to(device), g)
        total += loss.item() * len(z_bs)
        n += len(z_bs)
    return total / max(n, 1)


@torch.no_grad()
def sample_grid(path: Path, unet, vqgan, schedule, val_set: TensorDataset, cfg, device: torch.device) -> None:
    """Sample up to 4 val cases with the configured sampler; grid rows CXR | prediction | target."""
    z_bs, z_cxr = (t[:4].to(device) for t in val_set.tensors)
    g = torch.Generator(device="cpu").manual_seed(cfg.sampler.seed)
    z_pred = suppress_latents(eps_model(unet, schedule, cfg.diffusion.prediction), schedule, z_cxr, cfg.sampler,
                              cfg.diffusion.cond_mode, generator=g)
    cols = [vqgan.decode(z).clamp(-1, 1).cpu() for z in (z_cxr, z_pred, z_bs)]
    save_grid(path, cols)


def resolve_config(cfg: Config) -> Config:
    """The config a run trains with, as its config.yaml and checkpoints state it.

    Diffusion: ``cfg`` itself (nothing to resolve). Distillation: a new config, ``cfg`` with the
    teacher's ``unet`` and ``diffusion`` sections (a ``bug_compatible`` teacher gives a
    ``scaled_consistent`` student: its sampling input is its training input, §3.5) and, when
    ``ldm_train.vqgan_ckpt`` is empty, the teacher's first stage (found as
    :func:`utils.checkpoint.resolve_first_stage` finds it). Reads the teacher's config only; never
    changes ``cfg``; resolving a resolved config gives it back.

    Raises:
        ConfigError: no ``distill.teacher_ckpt``. CheckpointError: the teacher is not a diffusion
            checkpoint of this stage, or was trained with another ``data.image_size`` / ``data.invert``.
    """
    if cfg.ldm_train.mode != "distill":
        return cfg
    path = cfg.distill.teacher_ckpt
    if not path:
        raise ConfigError("distill.teacher_ckpt is empty: give a diffusion checkpoint of ldm_train.py, e.g. "
                          "--set distill.teacher_ckpt=runs/ldm/000-demo/checkpoints/best.pt")
    tcfg = checkpoint_config(path, STAGE)
    if tcfg.ldm_train.mode != "diffusion":
        raise CheckpointError(f"{path}: is a '{tcfg.ldm_train.mode}' checkpoint; the teacher must be a diffusion model")
    for key in ("image_size", "invert"):
        if getattr(tcfg.data, key) != getattr(cfg.data, key):
            raise CheckpointError(f"{path}: teacher trained with data.{key}={getattr(tcfg.data, key)!r}, "
                                  f"this config has {getattr(cfg.data, key)!r}")
    diffusion = tcfg.diffusion
    if diffusion.cond_mode == "bug_compatible":
        # Same training input (√ᾱ_t·c); sampling then feeds what the student was distilled on.
        diffusion = dataclasses.replace(diffusion, cond_mode="scaled_consistent")
    vqgan_ckpt = cfg.ldm_train.vqgan_ckpt or str(resolve_first_stage(path, tcfg.ldm_train.vqgan_ckpt))
    return dataclasses.replace(cfg, unet=tcfg.unet, diffusion=diffusion,
                               ldm_train=dataclasses.replace(cfg.ldm_train, vqgan_ckpt=vqgan_ckpt))


def train_ldm(cfg: Config, resume: str | Path | None = None, progress: bool = True) -> Path:
    """Train; return the run folder. See the module docstring.

    ``cfg`` is not changed: the run trains with :func:`resolve_config` of it, resolved before any
    work, and that is the config its config.yaml and checkpoints hold.
    """
    return run_training(_train, resolve_config(cfg), resume, progress)


def _train(cfg: Config, info: DistInfo, resume, progress: bool) -> Path:
    device, tc = info.device, cfg.ldm_train
    seed_everything(cfg.run.seed, info.rank)
    teacher = None
    if tc.mode == "distill":      # the frozen teacher: its EMA weights, the UNet itself (not seen as ε)
        teacher, _ = load_ldm(cfg.distill.teacher_ckpt, device, "ema", as_eps=False)
    if not tc.cache_latents:
        raise ConfigError("ldm_train.cache_latents=false is not supported: the frozen VQGAN's latents are "
                          "encoded once (set data.augment=false and cache_latents=true)")

    # ---- checks and latents before the run folder exists --------------------------------------------
    if not tc.vqgan_ckpt:
        raise ConfigError("ldm_train.vqgan_ckpt is empty: give the stage-1 checkpoint, e.g. "
                          "--set ldm_train.vqgan_ckpt=runs/vqgan/000-demo/checkpoints/best.pt")
    vqgan, vq_cfg = load_vqgan(tc.vqgan_ckpt, device)
    if vq_cfg.data.invert != cfg.data.invert:
        raise CheckpointError(f"{tc.vqgan_ckpt}: trained with data.invert={vq_cfg.data.invert}, "
                              f"this config has {cfg.data.invert}")
    if vqgan.embedding_dim * 2 != cfg.unet.in_channels or cfg.unet.out_channels < vqgan.embedding_dim:
        raise ConfigError(f"{tc.vqgan_ckpt}: the VQGAN has {vqgan.embedding_dim} latent channels, so unet.in_channels "
                          f"must be {2 * vqgan.embedding_dim} ([x_t ; condition]) and unet.out_channels >= "
                          f"{vqgan.embedding_dim}; got {cfg.unet.in_channels} / {cfg.unet.out_channels}")
    latent = cfg.data.image_size // vqgan.downsample_factor
    train_set = encode_pairs(vqgan, cfg, "train", device, progress and info.is_main)
    val_set = encode_pairs(vqgan, cfg, "val", device, progress and info.is_main)
    if len(train_set) == 0:
        raise ValueError(f"{cfg.data.root}: the train split is empty")

    run_dir = prepare_run_dir(cfg, info, STAGE, resume)
    log = get_logger(run_dir, info.is_main, name=STAGE)
    schedule = build_schedule(cfg.diffusion)
    unet = build_unet(cfg.unet, image_size=latent).to(device)
    if teacher is not None:
        unet.load_state_dict(teacher.state_dict())      # the student starts as the teacher
    # Diffusion: the evaluation EMA. Distillation: the EMA target network θ⁻ (also what is sampled).
    ema = EMA(unet, tc.ema_decay if teacher is None else cfg.distill.target_ema)
    loss_fn = make_loss(cfg, schedule, teacher)
    unet_ddp = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.distributed else unet
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.run.seed)
    loader = DataLoader(train_set, batch_size=tc.batch_size, sampler=sampler, drop_last=False)
    steps_per_epoch = len(loader)
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, eps=tc.adam_eps, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, iteration_milestones(tc.milestones, steps_per_epoch),
                                                 gamma=tc.gamma)

    ckpts = RunCheckpoints(run_dir, STAGE, cfg, info, log, tc.keep_last,
                           {"unet": unet, "ema": ema.shadow, "opt": opt, "sched": sched})
    start_epoch, step, best, metrics_log = ckpts.begin(resume is not None, FROZEN_SECTIONS)
    log.info(f"run {run_dir} | {info.world_size} process(es) on {device} | UNet {count_parameters(unet):,} params "
             f"| latents {tuple(train_set.tensors[0].shape[1:])} | {len(train_set)} train / {len(val_set)} val "
             f"pairs, {steps_per_epoch} iterations per epoch | {tc.mode} | {cfg.diffusion.beta_schedule}, offset "
             f"noise {cfg.diffusion.offset_noise}, condition {cfg.diffusion.cond_mode}, predicts "
             f"{cfg.diffusion.prediction}")

    amp = autocast_context(device, tc.amp)
    skipped = 0
    for epoch in range(start_epoch, tc.epochs):
        sampler.set_epoch(epoch)
        unet.train()
        bar = tqdm(loader, desc=f"ldm epoch {epoch + 1}/{tc.epochs}", disable=not (progress and info.is_main),
                   leave=False, dynamic_ncols=True)
        for z_bs, z_cxr in bar:
            with amp:
                loss, logs = loss_fn(unet_ddp, z_bs.to(device), z_cxr.to(device), None, ema.shadow)
            if not check_finite(loss, tc.mode, step, epoch, ckpts.manager, info, tc.on_nonfinite):
                skipped += 1
                log.info(f"skipped a batch with a non-finite loss at step {step} ({skipped} so far)")
                continue
            logs["skipped"] = float(skipped)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if teacher is not None:
                logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0))
            opt.step()
            sched.step()
            ema.update(unet)
            step += 1
            if step % tc.log_every == 0 or step == 1:
                logs = all_reduce_mean(logs, info)
                if info.is_main:
                    bar.set_postfix(loss=f"{logs['loss']:.4f}")
                    metrics_log.log({"step": step, "epoch": epoch, "split": "train", "lr": sched.get_last_lr()[0],
                                     **logs})
        bar.close()

        last = epoch + 1 == tc.epochs
        is_best = False
        if info.is_main and ((epoch + 1) % tc.val_every == 0 or last) and len(val_set):
            val = validate(loss_fn, ema.shadow, val_set, cfg, device)
            is_best = val < best
            best = min(best, val)
            metrics_log.log({"step": step, "epoch": epoch, "split": "val", "val_loss": val, "skipped": skipped})
            log.info(f"epoch {epoch + 1} step {step} | val_loss (EMA) {val:.4g}" + (" best" if is_best else ""))
            sample_grid(run_dir / "samples" / f"val_{epoch + 1:04d}.png", ema.shadow, vqgan, schedule, val_set,
                        cfg, device)
            plot_curves(run_dir / "metrics.csv", run_dir / "curves.png", ["loss", "val_loss"],
                        title=f"LDM {run_dir.name}")
        if (epoch + 1) % tc.ckpt_every == 0 or last or is_best:
            ckpts.save(epoch=epoch, step=step, best=best, is_best=is_best, extra={"latent_size": latent})
    log.info(f"done: {run_dir}")
    return run_dir
