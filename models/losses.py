"""Multi-level hybrid loss of the ML-VQGAN stage (docs/method.md §2.3).

Generator / autoencoder loss, x in [-1, 1] and x_rec = VQGAN(x):

    L_G = L_rec(x_rec, x) + L_VQ + w_p LPIPS_VGG(x_rec, x) + w_adv mean((D(x_rec) - 1)^2)
          + w_ms (1 - MS-SSIM(x_rec, x))

Discriminator loss (least-squares GAN, real -> 1, fake -> 0, also scaled by w_adv as in the reference):

    L_D = w_adv * 1/2 * [mean(D(sg x_rec)^2) + mean((D(x) - 1)^2)]

Both GAN terms are off before ``adversarial_start`` (the reference had no warm-up: start = 0).
A term whose weight is 0 is neither computed nor are its networks built, so a run without the
perceptual term needs no ImageNet weights and a run with w_adv = 0 needs no discriminator.

Typical trainer step (separate G and D optimisers)::

    x_rec, commit, info = vqgan(x)
    loss_g, logs_g = hybrid.generator_loss(x, x_rec, commit, step)
    opt_g.zero_grad(set_to_none=True); loss_g.backward(); opt_g.step()
    if hybrid.adversarial_active(step):
        loss_d, logs_d = hybrid.discriminator_loss(x, x_rec, step)   # detaches x_rec itself
        opt_d.zero_grad(set_to_none=True); loss_d.backward(); opt_d.step()
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from models.msssim import MSSSIM
from utils.hub import VGG16_FILE, require_hub_file

__all__ = ["HybridLoss", "build_perceptual_net", "lpips_distance"]


def build_perceptual_net() -> nn.Module:
    """LPIPS v0.1 with an ImageNet VGG-16 trunk and the package's linear heads, frozen.

    The VGG-16 weights must already be in the torch hub cache (``utils.hub``): this checks first and
    raises FileNotFoundError naming the file, because lpips would otherwise try to download them.
    """
    require_hub_file(VGG16_FILE, "the perceptual loss (LPIPS-VGG)")
    # Imported here, not at module level: lpips pulls in scipy and is only needed for this term.
    import lpips
    return lpips.LPIPS(net="vgg", version="0.1", verbose=False)


def lpips_distance(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS distance between two batches (B, C, H, W) in [-1, 1] -> scalar.

    One-channel images are expanded to 3 channels. That equals what lpips does implicitly (its
    per-channel shift/scale layer broadcasts a 1-channel input to 3 channels, which is how MONAI's
    PerceptualLoss fed the CXRs) but also works with an injected net that expects RGB.
    """
    if x.shape[1] == 1:
        x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"LPIPS needs 1- or 3-channel images, got {x.shape[1]} channels")
    return net(x, y).mean()


class HybridLoss(nn.Module):
    """Generator and discriminator losses of the VQGAN stage; build once per run.

    Args:
        recon: "l1" (BS-LDM) or "mse" (GL-LCM) pixel loss.
        perceptual_weight: w_p of LPIPS-VGG (0 switches it off).
        adversarial_weight: w_adv of both GAN terms (0 switches them off).
        adversarial_start: first iteration (0-based) at which the GAN terms are on.
        msssim_weight: w_ms of (1 - MS-SSIM) (0 switches it off).
        msssim_data_range: fixed MS-SSIM dynamic range L (2 for [-1, 1]); None reproduces the
            reference's per-call guess.
        discriminator: the patch discriminator, required when adversarial_weight > 0. It is held as
            a submodule (``.to()`` / ``.train()`` reach it) but it is the trainer's to optimise and to
            checkpoint; a DistributedDataParallel wrapper may be passed.
        perceptual_net: a callable ``net(x_rec, x) -> (B, 1, 1, 1)`` used instead of building
            LPIPS-VGG (tests pass ``lpips.LPIPS(net="vgg", pnet_rand=True)`` or a stub).

    The perceptual net is frozen (no grads) and kept in eval mode even when the loss is put in
    train mode, so LPIPS's dropout layers never fire. MS-SSIM is a module built once.

    Raises:
        ValueError: on an unknown ``recon``, negative weights or start, or a missing discriminator.
        FileNotFoundError: when the perceptual term is on, no net is injected and the VGG-16 weights
            are not in the torch hub cache.
    """

    def __init__(self, recon: str = "mse", perceptual_weight: float = 0.001,
                 adversarial_weight: float = 0.01, adversarial_start: int = 0,
                 msssim_weight: float = 1.0, msssim_data_range: float | None = 2.0,
                 discriminator: nn.Module | None = None,
                 perceptual_net: nn.Module | None = None) -> None:
        super().__init__()
        if recon not in ("l1", "mse"):
            raise ValueError(f"recon must be 'l1' or 'mse', got {recon!r}")
        for name, value in (("perceptual_weight", perceptual_weight),
                            ("adversarial_weight", adversarial_weight),
                            ("msssim_weight", msssim_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if isinstance(adversarial_start, bool) or not isinstance(adversarial_start, int) \
                or adversarial_start < 0:
            raise ValueError(f"adversarial_start must be an integer >= 0, got {adversarial_start!r}")
        if adversarial_weight > 0 and discriminator is None:
            raise ValueError("adversarial_weight > 0 needs a discriminator")

        self.recon = recon
        self.perceptual_weight = float(perceptual_weight)
        self.adversarial_weight = float(adversarial_weight)
        self.adversarial_start = adversarial_start
        self.msssim_weight = float(msssim_weight)

        self.discriminator = discriminator if adversarial_weight > 0 else None
        self.perceptual_net: nn.Module | None = None
        if perceptual_weight > 0:
            net = perceptual_net if perceptual_net is not None else build_perceptual_net()
            self.perceptual_net = net.eval().requires_grad_(False)
        self.msssim = MSSSIM(data_range=msssim_data_range) if msssim_weight > 0 else None

    @classmethod
    def from_config(cls, cfg, discriminator: nn.Module | None = None,
                    perceptual_net: nn.Module | None = None) -> "HybridLoss":
        """Build from a :class:`utils.config.VQLossConfig`."""
        return cls(recon=cfg.recon, perceptual_weight=cfg.perceptual_weight,
                   adversarial_weight=cfg.adversarial_weight, adversarial_start=cfg.adversarial_start,
                   msssim_weight=cfg.msssim_weight, msssim_data_range=cfg.msssim_data_range,
                   discriminator=discriminator, perceptual_net=perceptual_net)

    def train(self, mode: bool = True) -> "HybridLoss":
        super().train(mode)
        if self.perceptual_net is not None:
            self.perceptual_net.eval()     # frozen metric network: dropout must stay off
        return self

    def adversarial_active(self, step: int) -> bool:
        """Whether the GAN terms are on at iteration ``step``."""
        return self.adversarial_weight > 0 and step >= self.adversarial_start

    def _logits_for_generator(self, x_rec: torch.Tensor) -> torch.Tensor:
        """D(x_rec) with gradients to x_rec only: D's parameters are swapped for detached copies.

        So the generator backward neither fills D's ``.grad`` (no stale grads for the D optimiser,
        no wasted weight-gradient compute) nor needs D's parameters to be toggled. A DDP wrapper is
        bypassed here because no gradient of D is reduced in this pass. BatchNorm still uses and
        updates its statistics on this batch, as in the reference.
        """
        d = self.discriminator
        if isinstance(d, DistributedDataParallel):
            d = d.module
        params = {name: p.detach() for name, p in d.named_parameters()}
        return functional_call(d, params, (x_rec,))

    def generator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, commitment_loss: torch.Tensor,
                       step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Autoencoder loss L_G.

        Args:
            x: target images (B, C, H, W) in [-1, 1].
            x_rec: reconstructions (B, C, H, W), with grad.
            commitment_loss: scalar from the quantiser (already scaled by the commitment cost).
            step: global iteration (0-based), for the adversarial warm-up.
        Returns:
            loss: scalar tensor.
            logs: plain floats: ``rec``, ``commit``, ``perc`` (LPIPS, if on), ``msssim`` (the MS-SSIM
                value, if on; the loss term is 1 - msssim), ``adv_g`` (mean (D(x_rec) - 1)^2, 0.0
                before the start; if on) and ``loss_g``. Unweighted except ``loss_g``.
        """
        if x.shape != x_rec.shape:
            raise ValueError(f"x and x_rec differ in shape: {tuple(x.shape)} vs {tuple(x_rec.shape)}")
        x, x_rec = x.float(), x_rec.float()
        rec = F.l1_loss(x_rec, x) if self.recon == "l1" else F.mse_loss(x_rec, x)
        loss = rec + commitment_loss
        logs = {"rec": rec.item(), "commit": float(torch.as_tensor(commitment_loss).detach())}
        if self.perceptual_net is not None:
            perc = lpips_distance(self.perceptual_net, x_rec, x)
            loss = loss + self.perceptual_weight * perc
            logs["perc"] = perc.item()
        if self.msssim is not None:
            ms = self.msssim(x_rec, x)
            loss = loss + self.msssim_weight * (1.0 - ms)
            logs["msssim"] = ms.item()
        if self.adversarial_weight > 0:
            adv = x.new_zeros(())
            if self.adversarial_active(step):
                adv = (self._logits_for_generator(x_rec) - 1.0).pow(2).mean()
                loss = loss + self.adversarial_weight * adv
            logs["adv_g"] = adv.item()
        logs["loss_g"] = loss.item()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Least-squares discriminator loss L_D; x_rec is detached here.

        Before ``adversarial_start`` (or with w_adv = 0) D is not run and the loss is a constant 0
        with ``requires_grad=False``: skip the backward and the D step (see :meth:`adversarial_active`).

        Returns:
            loss: scalar tensor.
            logs: plain floats ``loss_d`` (weighted, as returned), ``d_real`` / ``d_fake`` (mean logit on
                real / reconstructed images; the LSGAN optimum pushes them towards 1 / 0).
        """
        if not self.adversarial_active(step):
            return x.new_zeros((), dtype=torch.float32), {"loss_d": 0.0, "d_real": 0.0, "d_fake": 0.0}
        # Two separate forwards (fake first, then real) as in the reference: with BatchNorm in
        # train mode, one concatenated batch would normalise real and fake with mixed statistics.
        logits_fake = self.discriminator(x_rec.detach().float())
        logits_real = self.discriminator(x.detach().float())
        loss = self.adversarial_weight * 0.5 * (logits_fake.pow(2).mean()
                                                + (logits_real - 1.0).pow(2).mean())
        logs = {"loss_d": loss.item(), "d_real": logits_real.mean().item(),
                "d_fake": logits_fake.mean().item()}
        return loss, logs
