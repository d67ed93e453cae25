"""Conditional latent noise estimator: the guided-diffusion ``UNetModel`` layout (docs/method.md §3.1-3.2).

Written from the specification (not copied). The module knows nothing about betas or samplers:
it maps a network input and a timestep to an output of the same spatial size.

Conditioning is by channel concatenation, done by the caller (``models.schedule.model_input_*``):

    x (B, in_channels, h, w) = [noisy target latent x_t (4 ch) ; condition latent c (4 ch)]
    t (B,) or scalar, raw integer timesteps 0..T-1
      -> eps_hat (B, out_channels, h, w); only channels 0..3 are the noise estimate.

The paper configuration (``UNetConfig()`` defaults: 8 in / 8 out, 128 channels, mults 1,1,2,2,4,4,
8 res blocks, attention "resolutions" 64,32,16,8 read as down-sampling factors) has exactly
382,978,184 parameters and 52 attention blocks (17 at 256 ch on 16², 35 at 512 ch on 8², 4² and the
middle block), for a 128² latent.

Constraints: every width ``model_channels * mult`` must be divisible by 32 (GroupNorm(32)) and by
``num_heads``; h and w must be divisible by 2 ** (len(channel_mult) - 1) so that skips line up.

Sub-module names and ``nn.Sequential`` indices follow the reference layout (``time_embed``,
``input_blocks``, ``middle_block``, ``output_blocks``, ``out``; ResBlock ``in_layers`` /
``emb_layers`` / ``out_layers`` / ``skip_connection``; attention ``norm`` / ``qkv`` / ``proj_out``)
so that a state dict extracted from the authors' pickled modules loads without renaming.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.nn import downsample2x, normalization, timestep_embedding, upsample2x, zero_module
from utils.config import UNetConfig

__all__ = ["ResBlock", "AttentionBlock", "UNetModel", "build_unet"]


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------

class TimestepBlock(nn.Module):
    """A block whose forward also takes the time embedding ``emb`` (B, E)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that hands the time embedding to the children that need it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Downsample(nn.Module):
    """Stand-alone down-sampling, only used with ``resblock_updown=False``: stride-2 3x3 conv (kept
    under the name ``op`` as in the reference layout)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Stand-alone up-sampling, only used with ``resblock_updown=False``: nearest x2 then 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(upsample2x(x))


class ResBlock(TimestepBlock):
    """Residual block with time conditioning and optional 2x resampling inside the block.

    h = Conv3x3(SiLU(GN(x)));  with scale-shift norm (FiLM): h = GN(h)·(1 + s) + b, (s, b) =
    Linear(SiLU(emb)), otherwise h = GN(h + Linear(SiLU(emb))); then SiLU, dropout and a zero-initialised
    Conv3x3, so the block starts as (a resampled) identity. With ``up``/``down`` the resampling
    (nearest x2 / 2x2 avg-pool, no parameters) is applied to both the skip path and the main path
    right before the first conv.

    Args:
        channels: input channels C.
        emb_channels: width E of the time embedding.
        dropout: dropout probability before the last conv.
        out_channels: output channels C' (default C); the skip is a 1x1 conv when C' != C.
        use_scale_shift_norm: FiLM conditioning (True in the paper).
        up, down: resample x2 up / down inside the block.
        grad_checkpoint: recompute activations in backward to save memory.

    Shapes: x (B, C, H, W), emb (B, E) -> (B, C', H', W') with H' = 2H, H/2 or H.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0,
                 out_channels: int | None = None, use_scale_shift_norm: bool = True,
                 up: bool = False, down: bool = False, grad_checkpoint: bool = False) -> None:
        super().__init__()
        if up and down:
            raise ValueError("a ResBlock cannot both up- and down-sample")
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.grad_checkpoint = grad_checkpoint
        self.resample = upsample2x if up else downsample2x if down else None
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample is not None:
            # Resample after norm+SiLU and before the conv, so the conv runs at the output size.
            h = self.in_layers[:-1](x)
            h, x = self.resample(h), self.resample(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        norm, rest = self.out_layers[0], self.out_layers[1:]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = rest(norm(h + emb_out))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head spatial self-attention with a residual connection, through
    ``torch.nn.functional.scaled_dot_product_attention`` (scale 1/√d, d = C / num_heads).

    The 1x1 ``qkv`` conv produces 3C channels; how they are split into q, k, v and heads is the only
    difference between the two orders, and it does not change the parameter count:

    * new order (GL-LCM, ``use_new_attention_order=True``): [q | k | v] first, each then split into heads;
    * legacy order (BS-LDM): heads first, each head's channels being [q_h | k_h | v_h].

    The orders matter only for loading weights trained with one of them.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, num_heads: int = 1, use_new_attention_order: bool = True,
                 grad_checkpoint: bool = False) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.use_new_attention_order = use_new_attention_order
        self.grad_checkpoint = grad_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x_flat = x.reshape(b, c, -1)                             # (B, C, T), T = H·W
        qkv = self.qkv(self.norm(x_flat))                        # (B, 3C, T)
        n, d, length = self.num_heads, c // self.num_heads, x_flat.shape[-1]
        if self.use_new_attention_order:
            q, k, v = (y.reshape(b, n, d, length) for y in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b, n, 3 * d, length).split(d, dim=2)
        # SDPA wants (B, heads, T, d); the default scale 1/√d is the reference's (1/d^¼)² on q and k.
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = h.transpose(-1, -2).reshape(b, c, length)
        return (x_flat + self.proj_out(h)).reshape(b, c, *spatial)


# --------------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------------

class UNetModel(nn.Module):
    """Guided-diffusion UNet (ε-prediction), condition by channel concatenation (docs/method.md §3.2).

    Encoder: input 3x3 conv, then per level ``num_res_blocks`` ResBlocks (each followed by attention
    where enabled) and, between levels, a down-sampling block. Middle: ResBlock, attention, ResBlock.
    Decoder: per level (deepest first) ``num_res_blocks + 1`` ResBlocks on the concatenation with the
    matching encoder activation (attention where enabled), and an up-sampling block after the last one
    of every level but the top. Output: GN, SiLU, zero-initialised 3x3 conv.

    Attention placement (docs/method.md §3.2, §7.8). Level l works at down-sampling factor ds = 2^l and
    spatial size ``image_size / ds``:

    * ``attention_as_factor=True`` (reference behaviour, default): attention at the levels whose ds is in
      ``attention_resolutions``. With (64, 32, 16, 8) and six levels this is ds ∈ {8, 16, 32}, i.e. the
      16², 8², 4² maps of a 128² latent; 64 never occurs.
    * ``attention_as_factor=False``: attention at the levels whose spatial size ``image_size // ds`` is in
      ``attention_resolutions`` (what the paper presumably meant: 64², 32², 16², 8²). The placement is
      decided once, at construction, from ``image_size`` (the latent side, 128 for 1024² images); the
      network still runs on other sizes, with the same blocks.

    The middle block always has attention.

    Args:
        in_channels: input channels (8 = 4 noisy target + 4 condition).
        out_channels: output channels (8 in the reference, of which 4 are used; 4 is the clean choice).
        model_channels: base width; also the sinusoidal embedding width (time MLP width 4x).
        channel_mult: width multiplier per level.
        num_res_blocks: ResBlocks per encoder level (decoder levels get one more).
        attention_resolutions: see above.
        attention_as_factor: see above.
        image_size: latent side used by ``attention_as_factor=False`` (ignored otherwise).
        num_heads: attention heads everywhere.
        use_scale_shift_norm: FiLM time conditioning in ResBlocks.
        resblock_updown: resample inside ResBlocks (parameter-free) instead of conv resampling.
        use_new_attention_order: q/k/v split order (see :class:`AttentionBlock`).
        dropout: dropout in ResBlocks.
        grad_checkpoint: gradient checkpointing of every ResBlock and attention block (the reference
            always checkpointed attention; here it is off by default since it only saves memory).

    Raises:
        ValueError: on non-positive sizes, widths not divisible by 32 or by ``num_heads``, or a bad
            dropout.
    """

    def __init__(self, in_channels: int = 8, out_channels: int = 8, model_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 1, 2, 2, 4, 4), num_res_blocks: int = 8,
                 attention_resolutions: Sequence[int] = (64, 32, 16, 8),
                 attention_as_factor: bool = True, image_size: int = 128, num_heads: int = 8,
                 use_scale_shift_norm: bool = True, resblock_updown: bool = True,
                 use_new_attention_order: bool = True, dropout: float = 0.0,
                 grad_checkpoint: bool = False) -> None:
        super().__init__()
        for name, value in [("in_channels", in_channels), ("out_channels", out_channels),
                            ("model_channels", model_channels), ("num_res_blocks", num_res_blocks),
                            ("image_size", image_size), ("num_heads", num_heads),
                            *((f"channel_mult[{i}]", m) for i, m in enumerate(channel_mult))]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if len(channel_mult) == 0:
            raise ValueError("channel_mult must not be empty")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        for m in channel_mult:
            if (model_channels * m) % num_heads:
                raise ValueError(f"width {model_channels * m} is not divisible by num_heads={num_heads}")
            # GroupNorm(32) would raise too, but with a less helpful message.
            if (model_channels * m) % 32:
                raise ValueError(f"width model_channels*mult = {model_channels * m} must be divisible "
                                 "by 32 (GroupNorm(32)); use model_channels a multiple of 32")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.channel_mult = tuple(channel_mult)
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.attention_as_factor = attention_as_factor
        self.image_size = image_size
        self.num_levels = len(channel_mult)

        def has_attention(level: int) -> bool:
            ds = 2 ** level
            key = ds if attention_as_factor else image_size // ds
            return key in self.attention_resolutions

        #: indices of the levels that carry attention (decided once, see the class docstring)
        self.attention_levels = tuple(lvl for lvl in range(self.num_levels) if has_attention(lvl))

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))

        def res(ch_in: int, ch_out: int, **kw) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm,
                            grad_checkpoint=grad_checkpoint, **kw)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads, use_new_attention_order, grad_checkpoint)

        # ---- encoder
        ch = model_channels * channel_mult[0]
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if level in self.attention_levels:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != self.num_levels - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)

        # ---- middle
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        # ---- decoder
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if level in self.attention_levels:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        """Predict the noise.

        Args:
            x: (B, in_channels, h, w) network input, h and w divisible by 2^(levels-1).
            t: (B,) timesteps, or a scalar / 0-d tensor used for the whole batch.

        Returns:
            (B, out_channels, h, w).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape (B, {self.in_channels}, h, w), got {tuple(x.shape)}")
        f = 2 ** (self.num_levels - 1)
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"h and w must be divisible by {f}, got {tuple(x.shape[-2:])}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))

        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def build_unet(cfg: UNetConfig, image_size: int = 128) -> UNetModel:
    """UNet noise estimator from ``model.unet``.

    Args:
        cfg: the UNet section of the config.
        image_size: latent side (image side / 8; 128 for 1024² images). Only used when
            ``cfg.attention_as_factor`` is False, to place attention at true spatial resolutions.
    """
    return UNetModel(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                     model_channels=cfg.model_channels, channel_mult=tuple(cfg.channel_mult),
                     num_res_blocks=cfg.num_res_blocks,
                     attention_resolutions=tuple(cfg.attention_resolutions),
                     attention_as_factor=cfg.attention_as_factor, image_size=image_size,
                     num_heads=cfg.num_heads, use_scale_shift_norm=cfg.use_scale_shift_norm,
                     resblock_updown=cfg.resblock_updown,
                     use_new_attention_order=cfg.use_new_attention_order, dropout=cfg.dropout,
                     grad_checkpoint=cfg.grad_checkpoint)
