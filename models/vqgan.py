"""ML-VQGAN autoencoder: encoder, EMA vector quantiser, decoder (docs/method.md §2.1).

The layout reproduces MONAI-Generative's ``VQVAE`` as configured by BS-LDM / GL-LCM, so that the
parameter counts match the paper's efficiency tables (38,326,533 with K = 256 and 38,329,605 with
K = 1024 at the paper config) and the authors' checkpoints can be mapped onto it. The code is written
from the specification, not copied.

Shapes, with f = 2 ** len(channels) (f = 8 for the paper config):

    x (B, C_in, H, W) in [-1, 1]
      -> encode   -> z_e (B, D, H/f, W/f)                  D = embedding_dim (4)
      -> quantize -> z_q (B, D, H/f, W/f), indices (B, H/f, W/f) in [0, K)
      -> decode   -> x_rec (B, C_out, H, W), unbounded (no output activation)

A 1024 x 1024 image gives a 4 x 128 x 128 latent.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from utils.config import VQGANConfig

__all__ = ["ResUnit", "Encoder", "Decoder", "VectorQuantizerEMA", "VQGAN", "build_vqgan",
           "codebook_counts", "usage_from_counts"]


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------

class ResUnit(nn.Module):
    """Residual unit y = ReLU(x + Conv3x3_{R->C}(ReLU(Conv3x3_{C->R}(x)))), all convs with bias.

    Args:
        channels: C, the channels of ``x`` and ``y``.
        res_channels: R, the width of the inner conv.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, res_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, res_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(res_channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _per_level(name: str, value: int | Sequence[int], levels: int) -> list[int]:
    """Expand an int to one value per level, or validate a per-level sequence."""
    values = [value] * levels if isinstance(value, int) else list(value)
    if len(values) != levels:
        raise ValueError(f"{name} must be an int or have one entry per level ({levels}), got {value!r}")
    for v in values:
        _check_positive(name, v)
    return values


class Encoder(nn.Module):
    """Image -> continuous latent z_e.

    Per level i: Conv4x4 s2 p1 (C_{i-1} -> C_i) + ReLU, then ``num_res_layers`` x ResUnit(C_i, R_i).
    Finally Conv3x3 p1 (C_last -> embedding_dim) with no activation.

    Shapes: (B, in_channels, H, W) -> (B, embedding_dim, H / 2**L, W / 2**L), L = len(channels).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], res_channels: Sequence[int],
                 num_res_layers: int, embedding_dim: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        prev = in_channels
        for ch, res_ch in zip(channels, res_channels):
            blocks += [nn.Conv2d(prev, ch, 4, stride=2, padding=1), nn.ReLU()]
            blocks += [ResUnit(ch, res_ch) for _ in range(num_res_layers)]
            prev = ch
        blocks.append(nn.Conv2d(prev, embedding_dim, 3, padding=1))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """Latent -> image, the mirror of :class:`Encoder`.

    Conv3x3 p1 (embedding_dim -> C_last) with no activation; then per level, from the deepest:
    ``num_res_layers`` x ResUnit(C_i, R_i), then ConvTranspose4x4 s2 p1 (C_i -> C_{i-1}) + ReLU.
    The last transposed conv maps to ``out_channels`` and has no activation, so the output is not
    bounded to [-1, 1] (as in the reference).

    Shapes: (B, embedding_dim, h, w) -> (B, out_channels, h * 2**L, w * 2**L).
    """

    def __init__(self, out_channels: int, channels: Sequence[int], res_channels: Sequence[int],
                 num_res_layers: int, embedding_dim: int) -> None:
        super().__init__()
        rev_ch, rev_res = list(reversed(channels)), list(reversed(res_channels))
        blocks: list[nn.Module] = [nn.Conv2d(embedding_dim, rev_ch[0], 3, padding=1)]
        for i, (ch, res_ch) in enumerate(zip(rev_ch, rev_res)):
            blocks += [ResUnit(ch, res_ch) for _ in range(num_res_layers)]
            last = i == len(rev_ch) - 1
            blocks.append(nn.ConvTranspose2d(ch, out_channels if last else rev_ch[i + 1], 4,
                                             stride=2, padding=1))
            if not last:
                blocks.append(nn.ReLU())
        self.blocks = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


# --------------------------------------------------------------------------------------------------
# Vector quantiser
# --------------------------------------------------------------------------------------------------

class VectorQuantizerEMA(nn.Module):
    """Nearest-neighbour vector quantiser whose codebook is learnt by EMA (van den Oord et al. 2017).

    Codebook e (K, D), initialised N(0, 1). It is an ``nn.Parameter`` with ``requires_grad=False``
    so that it counts as a parameter (the paper's parameter totals include it) and sits in the
    state dict under ``codebook``, while no optimiser ever changes it (its ``.grad`` stays None).

    EMA update (decay gamma, Laplace smoothing eps), with count_k the number of vectors assigned to
    code k in the batch and sum_k their sum:

        n_k <- gamma n_k + (1 - gamma) count_k
        m_k <- gamma m_k + (1 - gamma) sum_k
        e_k  = m_k / n~_k,   n~_k = (n_k + eps) / (sum_j n_j + K eps) * sum_j n_j

    ``n`` starts at 0 and ``m`` at a copy of the initial codebook (as in MONAI). The returned z_q uses
    the codebook *before* this step's update, as in the reference.

    When the update runs: only when the module is in train mode **and** autograd is enabled. A
    forward under ``torch.no_grad()`` / ``inference_mode`` (e.g. an extra reconstruction for logging
    or a D-only step) therefore never moves the codebook, even if the model was left in train mode.
    MONAI updates in train mode regardless of grad mode; a trainer that does one grad-enabled
    forward per iteration (as the reference does) behaves identically.

    Under DDP (``torch.distributed`` initialised) the per-batch counts and sums are all-reduced
    (summed) across ranks before the update, so every replica applies the same update and the
    codebooks stay identical; each rank must therefore run the same number of updating forwards.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25,
                 decay: float = 0.5, epsilon: float = 1e-5) -> None:
        super().__init__()
        _check_positive("num_embeddings", num_embeddings)
        _check_positive("embedding_dim", embedding_dim)
        if not commitment_cost >= 0:
            raise ValueError(f"commitment_cost must be >= 0, got {commitment_cost!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = float(commitment_cost)
        self.decay = float(decay)
        self.epsilon = float(epsilon)

        self.codebook = nn.Parameter(torch.randn(num_embeddings, embedding_dim), requires_grad=False)
        self.register_buffer("ema_cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("ema_embed_sum", self.codebook.detach().clone())

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"commitment_cost={self.commitment_cost}, decay={self.decay}, epsilon={self.epsilon}")

    def updates_codebook(self) -> bool:
        """True when a forward now would apply an EMA step (train mode and grad enabled)."""
        return self.training and torch.is_grad_enabled()

    def nearest(self, z_e: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (Euclidean) for every position.

        Args:
            z_e: (B, D, h, w).
        Returns:
            indices: (B, h, w), int64 in [0, K).
        """
        b, d, h, w = z_e.shape
        if d != self.embedding_dim:
            raise ValueError(f"expected {self.embedding_dim} latent channels, got {d}")
        flat = z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, d)
        codebook = self.codebook.float()
        # ||z||^2 + ||e||^2 - 2 z.e, computed in fp32 (autocast is off in forward) because the
        # expansion cancels badly in half precision.
        dist2 = (flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None, :]
                 - 2.0 * flat @ codebook.t())
        return dist2.argmin(dim=1).view(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for ``indices`` (B, h, w) -> (B, D, h, w)."""
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def _ema_update(self, z_e: torch.Tensor, indices: torch.Tensor) -> None:
        flat = z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, self.embedding_dim)
        idx = indices.reshape(-1)
        counts = torch.bincount(idx, minlength=self.num_embeddings).to(flat.dtype)
        sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, idx, flat)
        if dist.is_available() and dist.is_initialized():
            # Sum the statistics over ranks so every replica applies the identical update.
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        self.codebook.data.copy_(self.ema_embed_sum / smoothed.unsqueeze(1))

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise z_e, update the codebook if :meth:`updates_codebook`, return the STE output.

        Args:
            z_e: encoder output (B, D, h, w).
        Returns:
            z_q: (B, D, h, w) float32, equal in value to the codebook vectors, with the
                straight-through gradient d z_q / d z_e = I (z_q = z_e + sg(e - z_e)).
            commitment_loss: scalar, commitment_cost * mean((sg(e) - z_e)^2).
            indices: (B, h, w) int64.
        """
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z_e = z_e.float()
            indices = self.nearest(z_e)
            # Looked up before the EMA step: the update only affects later forwards (as in MONAI).
            e = self.lookup(indices)
            if self.updates_codebook():
                self._ema_update(z_e, indices)
            commitment_loss = self.commitment_cost * F.mse_loss(e.detach(), z_e)
            z_q = z_e + (e - z_e).detach()
        return z_q, commitment_loss, indices


# --------------------------------------------------------------------------------------------------
# Codebook statistics
# --------------------------------------------------------------------------------------------------

def codebook_counts(indices: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """How often each code occurs in ``indices`` (any shape, values in [0, K)) -> (K,) int64.

    Add the counts of several batches to get dataset-level statistics, then call
    :func:`usage_from_counts`.
    """
    flat = indices.reshape(-1).long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= num_embeddings):
        raise ValueError(f"indices must lie in [0, {num_embeddings})")
    return torch.bincount(flat, minlength=num_embeddings)


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code distribution p = counts / sum(counts), with 0 log 0 = 0."""
    p = counts.double() / counts.sum().clamp_min(1)
    return torch.exp(-torch.special.xlogy(p, p).sum())


def usage_from_counts(counts: torch.Tensor) -> dict[str, float | int]:
    """Codebook statistics from per-code counts (K,).

    Returns a dict of plain numbers:
        perplexity: exp(-sum_k p_k log p_k), between 1 (one code) and K (uniform use);
        used / unused: number of codes that occur / never occur;
        usage: used / K;
        total: number of quantised vectors.
    """
    k = counts.numel()
    used = int((counts > 0).sum())
    return {"perplexity": float(_perplexity(counts)), "used": used, "unused": k - used,
            "usage": used / k, "total": int(counts.sum())}


# --------------------------------------------------------------------------------------------------
# Full model
# --------------------------------------------------------------------------------------------------

class VQGAN(nn.Module):
    """ML-VQGAN autoencoder (MONAI-Generative VQVAE layout).

    Args:
        in_channels: image channels (1 for CXR).
        out_channels: reconstruction channels; defaults to ``in_channels``.
        channels: encoder widths, one stride-2 level each (>= 1 level); f = 2 ** len(channels).
        num_res_channels: inner width of the residual units, an int or one per level.
        num_res_layers: residual units per level (>= 0).
        embedding_dim: latent channels D.
        num_embeddings: codebook size K.
        commitment_cost, decay, epsilon: see :class:`VectorQuantizerEMA`.

    Raises:
        ValueError: on an empty ``channels``, non-positive sizes, or decay outside [0, 1).
    """

    def __init__(self, in_channels: int = 1, out_channels: int | None = None,
                 channels: Sequence[int] = (128, 256, 512), num_res_channels: int | Sequence[int] = 512,
                 num_res_layers: int = 2, embedding_dim: int = 4, num_embeddings: int = 1024,
                 commitment_cost: float = 0.25, decay: float = 0.5, epsilon: float = 1e-5) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        _check_positive("in_channels", in_channels)
        _check_positive("out_channels", out_channels)
        channels = list(channels)
        if not channels:
            raise ValueError("channels must list at least one level")
        for ch in channels:
            _check_positive("channels", ch)
        res_channels = _per_level("num_res_channels", num_res_channels, len(channels))
        if isinstance(num_res_layers, bool) or not isinstance(num_res_layers, int) or num_res_layers < 0:
            raise ValueError(f"num_res_layers must be an integer >= 0, got {num_res_layers!r}")
        _check_positive("embedding_dim", embedding_dim)

        self.in_channels, self.out_channels = in_channels, out_channels
        self.embedding_dim = embedding_dim
        self.downsample_factor = 2 ** len(channels)
        self.encoder = Encoder(in_channels, channels, res_channels, num_res_layers, embedding_dim)
        self.quantizer = VectorQuantizerEMA(num_embeddings, embedding_dim, commitment_cost, decay, epsilon)
        self.decoder = Decoder(out_channels, channels, res_channels, num_res_layers, embedding_dim)

    @property
    def num_embeddings(self) -> int:
        return self.quantizer.num_embeddings

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(D, H/f, W/f) for an (H, W) image; e.g. (4, 128, 128) for 1024^2 at the paper config."""
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not divisible by the downsampling factor {f}")
        return self.embedding_dim, height // f, width // f

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous latent z_e: (B, C_in, H, W) -> (B, D, H/f, W/f). H, W must be multiples of f."""
        self.latent_shape(x.shape[-2], x.shape[-1])   # a clear error instead of a decoder size mismatch
        return self.encoder(x)

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_q, commitment_loss, indices); see :meth:`VectorQuantizerEMA.forward`."""
        return self.quantizer(z_e)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a latent (B, D, h, w) -> (B, C_out, h f, w f) **without** re-quantising it.

        The diffusion stage decodes its generated latents this way (docs/method.md §2.1).
        """
        return self.decoder(z)

    def encode_stage_2_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised latent q(E(x)) (B, D, H/f, W/f): what the diffusion model is trained on.

        Call it with the model in ``eval()`` (the diffusion stage keeps the VQGAN frozen), otherwise
        a grad-enabled call in train mode would move the EMA codebook.
        """
        return self.quantize(self.encode(x))[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruct ``x``.

        Args:
            x: (B, C_in, H, W) in [-1, 1], H and W multiples of f.
        Returns:
            x_rec: (B, C_out, H, W).
            commitment_loss: scalar tensor.
            info: ``indices`` (B, H/f, W/f) int64 and ``perplexity`` (scalar tensor, this batch,
                this rank).
        """
        z_q, commitment_loss, indices = self.quantize(self.encode(x))
        x_rec = self.decode(z_q)
        # bincount without the range check of codebook_counts: no host sync in the training loop.
        counts = torch.bincount(indices.reshape(-1), minlength=self.num_embeddings)
        perplexity = _perplexity(counts).float()
        return x_rec, commitment_loss, {"indices": indices, "perplexity": perplexity}


def build_vqgan(cfg: VQGANConfig) -> VQGAN:
    """ML-VQGAN from ``model.vqgan``; out_channels = in_channels. Raises ValueError on bad values."""
    return VQGAN(in_channels=cfg.in_channels, channels=cfg.channels,
                 num_res_channels=cfg.num_res_channels, num_res_layers=cfg.num_res_layers,
                 embedding_dim=cfg.embedding_dim, num_embeddings=cfg.num_embeddings,
                 commitment_cost=cfg.commitment_cost, decay=cfg.decay, epsilon=cfg.epsilon)
