"""UNet noise estimator: paper parameter count and attention placement, shapes, zero init, attention
maths (SDPA vs explicit, legacy vs new order), gradient checkpointing, argument checks.

The paper-size UNet is only built on the meta device (no memory, no init, no forward); everything
else uses a tiny configuration (32-64 channels, 8-16 px latents) so the file runs in seconds on CPU.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from models.nn import timestep_embedding
from models.unet import AttentionBlock, ResBlock, UNetModel, build_unet
from tests.conftest import gen, tiny_unet
from utils.config import UNetConfig

PAPER_PARAMS = 382_978_184


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (zero-initialised ones included) small random values."""
    g = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def attention_widths(model: UNetModel) -> Counter:
    return Counter(m.qkv.in_channels for m in model.modules() if isinstance(m, AttentionBlock))


@pytest.fixture(scope="module")
def paper_unet() -> UNetModel:
    # Meta tensors: the architecture and the count without allocating or initialising 383M params.
    with torch.device("meta"):
        return build_unet(UNetConfig())


# --------------------------------------------------------------------------------------------------
# Paper configuration
# --------------------------------------------------------------------------------------------------

def test_paper_parameter_count(paper_unet):
    assert sum(p.numel() for p in paper_unet.parameters()) == PAPER_PARAMS


def test_paper_attention_as_factors(paper_unet):
    # ds in {8, 16, 32} -> levels 3, 4, 5 (16², 8², 4² on a 128² latent); 52 blocks incl. the middle.
    assert paper_unet.attention_levels == (3, 4, 5)
    assert attention_widths(paper_unet) == Counter({256: 17, 512: 35})
    heads = {m.num_heads for m in paper_unet.modules() if isinstance(m, AttentionBlock)}
    assert heads == {8}


def test_paper_attention_as_resolutions():
    # Spatial sizes 64, 32, 16, 8 of a 128² latent -> levels 1-4: 4 x (8 + 9) blocks + middle.
    with torch.device("meta"):
        model = build_unet(UNetConfig(attention_as_factor=False), image_size=128)
    assert model.attention_levels == (1, 2, 3, 4)
    assert attention_widths(model) == Counter({128: 17, 256: 34, 512: 18})


def test_out_channels_4_count(paper_unet):
    # Only the output conv changes: 4 fewer output channels x (128·9 weights + 1 bias).
    with torch.device("meta"):
        model = build_unet(UNetConfig(out_channels=4))
    assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMS - 4 * (128 * 9 + 1)


def test_attention_order_does_not_change_count():
    a = tiny_unet(use_new_attention_order=True)
    b = tiny_unet(use_new_attention_order=False)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


# --------------------------------------------------------------------------------------------------
# Tiny models: shapes, init, placement
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_channels", [4, 8])
@pytest.mark.parametrize("size", [8, 16])
def test_forward_shape(out_channels, size):
    model = randomize_(tiny_unet(out_channels=out_channels))
    x = torch.randn(2, 8, size, size)
    y = model(x, torch.tensor([0, 999]))
    assert y.shape == (2, out_channels, size, size) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    # A scalar t is broadcast to the batch.
    assert torch.allclose(model(x, 5), model(x, torch.tensor([5, 5])))


def test_zero_init_output_is_zero():
    model = tiny_unet()
    y = model(torch.randn(2, 8, 16, 16), torch.tensor([3, 700]))
    assert torch.count_nonzero(y) == 0


def test_timestep_changes_output():
    model = randomize_(tiny_unet()).eval()
    x = torch.randn(1, 8, 8, 8)
    assert not torch.allclose(model(x, 10), model(x, 900))


def test_timestep_embedding_layout():
    t = torch.tensor([0, 7])
    emb = timestep_embedding(t, 6)
    freqs = torch.tensor([10_000 ** (-i / 3) for i in range(3)])
    expected = torch.cat([torch.cos(7 * freqs), torch.sin(7 * freqs)])
    assert torch.allclose(emb[1], expected, atol=1e-6)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert timestep_embedding(t, 5).shape == (2, 5)


def test_attention_resolution_option_places_blocks():
    # Three levels on a 16² latent: sizes 16, 8, 4 at ds 1, 2, 4.
    common = dict(channel_mult=(1, 2, 2), attention_resolutions=(8,))
    as_factor = tiny_unet(attention_as_factor=True, image_size=16, **common)
    as_size = tiny_unet(attention_as_factor=False, image_size=16, **common)
    assert as_factor.attention_levels == ()                   # factor 8 never occurs (ds <= 4)
    assert attention_widths(as_factor) == Counter({64: 1})    # middle block only
    assert as_size.attention_levels == (1,)                   # 16 / 2 = 8
    assert attention_widths(as_size) == Counter({64: 1 + 1 + 2})  # middle + 1 enc + 2 dec at level 1
    assert as_size(torch.randn(1, 8, 16, 16), 1).shape == (1, 8, 16, 16)


def test_resblock_updown_false_uses_conv_resampling():
    model = randomize_(tiny_unet(resblock_updown=False))
    assert model(torch.randn(1, 8, 8, 8), 3).shape == (1, 8, 8, 8)
    assert sum(p.numel() for p in model.parameters()) != sum(p.numel() for p in tiny_unet().parameters())


def test_resblock_resampling_shapes():
    emb = torch.randn(2, 16)
    x = torch.randn(2, 32, 8, 8)
    assert ResBlock(32, 16, out_channels=64, down=True)(x, emb).shape == (2, 64, 4, 4)
    assert ResBlock(32, 16, up=True)(x, emb).shape == (2, 32, 16, 16)
    assert ResBlock(32, 16, use_scale_shift_norm=False)(x, emb).shape == (2, 32, 8, 8)


# --------------------------------------------------------------------------------------------------
# Attention maths
# --------------------------------------------------------------------------------------------------

def test_attention_matches_explicit_softmax():
    block = randomize_(AttentionBlock(64, num_heads=4, use_new_attention_order=True))
    x = torch.randn(2, 64, 4, 4)
    b, c, n, d = 2, 64, 4, 16
    xf = x.reshape(b, c, -1)
    q, k, v = block.qkv(block.norm(xf)).chunk(3, dim=1)
    q, k, v = (y.reshape(b, n, d, -1) for y in (q, k, v))
    w = torch.softmax(torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(d), dim=-1)
    h = torch.einsum("bhts,bhds->bhdt", w, v).reshape(b, c, -1)
    expected = (xf + block.proj_out(h)).reshape_as(x)
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_legacy_order_is_a_permutation_of_new_order():
    c, n = 64, 4
    d = c // n
    new = randomize_(AttentionBlock(c, n, use_new_attention_order=True))
    legacy = AttentionBlock(c, n, use_new_attention_order=False)
    # Legacy rows are [q_h | k_h | v_h] per head; new rows are [q (all heads) | k | v].
    perm = torch.tensor([part * c + head * d + i for head in range(n) for part in range(3) for i in range(d)])
    state = new.state_dict()
    state["qkv.weight"] = state["qkv.weight"][perm]
    state["qkv.bias"] = state["qkv.bias"][perm]
    legacy.load_state_dict(state)
    x = torch.randn(2, c, 4, 4)
    assert torch.allclose(new(x), legacy(x), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Gradient checkpointing and argument checks
# --------------------------------------------------------------------------------------------------

def test_grad_checkpoint_same_gradients():
    plain = randomize_(tiny_unet())
    ckpt = tiny_unet(grad_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 8, 8, 8), torch.tensor([1, 500])
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        model(x, t).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g_plain, g_ckpt in zip(*grads):
        assert torch.allclose(g_plain, g_ckpt, atol=1e-6)
    with torch.no_grad():  # no checkpointing (and no error) without autograd
        assert torch.allclose(ckpt(x, t), plain(x, t))


def test_build_unet_from_config():
    cfg = UNetConfig(in_channels=8, out_channels=4, model_channels=32, channel_mult=[1, 2],
                     num_res_blocks=1, attention_resolutions=[2], num_heads=2)
    model = build_unet(cfg)
    assert model.out_channels == 4 and model.attention_levels == (1,)
    assert model(torch.randn(1, 8, 8, 8), 0).shape == (1, 4, 8, 8)


@pytest.mark.parametrize("overrides", [
    dict(model_channels=16),               # GroupNorm(32) needs widths divisible by 32
    dict(model_channels=48),
    dict(num_heads=3),                     # 32 not divisible by 3
    dict(num_res_blocks=0),
    dict(channel_mult=()),
    dict(dropout=1.0),
    dict(in_channels=0),
])
def test_invalid_arguments_raise(overrides):
    with pytest.raises(ValueError):
        tiny_unet(**overrides)


def test_invalid_input_raises():
    model = tiny_unet(channel_mult=(1, 2, 2))
    with pytest.raises(ValueError):
        model(torch.randn(1, 8, 10, 10), 0)   # not divisible by 4
    with pytest.raises(ValueError):
        model(torch.randn(1, 4, 8, 8), 0)     # wrong channel count
