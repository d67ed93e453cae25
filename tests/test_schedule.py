"""Noise schedules (golden values of docs/method.md §3.3, §3.5, §8), forward/inverse maps, offset noise,
the three condition modes, the ε- and v-prediction training loss and the v -> ε adapter."""
from __future__ import annotations

import math

import pytest
import torch

from models.schedule import (EpsFromV, NoiseSchedule, build_schedule, eps_model, model_input_sample,
                             model_input_train, offset_noise, training_loss)
from tests.conftest import gen, tiny_unet
from utils.config import DiffusionConfig

TABLE_T = [999, 949, 899, 799, 699, 499, 299, 99, 19]
# √ᾱ_t of docs/method.md §3.5 (3 decimals; the cosine value at 999 is 4.9e-5 in §3.3).
SQRT_ALPHA_BAR = {
    "scaled_linear": [0.068, 0.091, 0.120, 0.193, 0.288, 0.527, 0.770, 0.946, 0.991],
    "cosine": [0.00005, 0.078, 0.155, 0.307, 0.451, 0.703, 0.887, 0.986, 0.999],
}


@pytest.fixture(scope="module")
def schedules() -> dict[str, NoiseSchedule]:
    return {name: NoiseSchedule(1000, name) for name in ("scaled_linear", "cosine", "linear")}


# --------------------------------------------------------------------------------------------------
# Golden values
# --------------------------------------------------------------------------------------------------

def test_alpha_bar_999_golden(schedules):
    assert schedules["scaled_linear"].alphas_cumprod[999].item() == pytest.approx(0.004660, abs=5e-7)
    assert schedules["cosine"].alphas_cumprod[999].item() == pytest.approx(2.43e-9, rel=5e-3)
    assert schedules["cosine"].betas.max().item() == pytest.approx(0.999)   # the capped last beta


@pytest.mark.parametrize("name", ["scaled_linear", "cosine"])
def test_sqrt_alpha_bar_table(schedules, name):
    got = schedules[name].sqrt_alphas_cumprod[TABLE_T]
    assert torch.allclose(got, torch.tensor(SQRT_ALPHA_BAR[name], dtype=torch.float64), atol=5e-4)


def test_sqrt_alpha_bar_at_0(schedules):
    # §3.3: 0.99998 (cosine), 0.9996 (scaled-linear); t = 499 is in the table above.
    assert schedules["cosine"].sqrt_alphas_cumprod[0].item() == pytest.approx(0.99998, abs=5e-6)
    assert schedules["scaled_linear"].sqrt_alphas_cumprod[0].item() == pytest.approx(0.9996, abs=5e-5)


def test_beta_formulas(schedules):
    sl, lin = schedules["scaled_linear"], schedules["linear"]
    assert sl.betas[0].item() == pytest.approx(0.00085) and sl.betas[-1].item() == pytest.approx(0.012)
    assert lin.betas[0].item() == pytest.approx(0.00085) and lin.betas[-1].item() == pytest.approx(0.012)
    # scaled-linear is linear in √β
    assert torch.allclose(sl.betas.sqrt().diff(), sl.betas.sqrt().diff()[:1].expand(999), atol=1e-12)
    cos = schedules["cosine"]
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cos.alphas_cumprod[499].item() == pytest.approx(f(500 / 1000) / f(0), rel=1e-9)


def test_cosine_ignores_beta_end_points():
    a = NoiseSchedule(1000, "cosine", 0.0008, 0.02)
    b = NoiseSchedule(1000, "cosine")
    assert torch.equal(a.betas, b.betas)


@pytest.mark.parametrize("name", ["scaled_linear", "cosine", "linear"])
def test_alpha_bar_strictly_decreasing(schedules, name):
    ac = schedules[name].alphas_cumprod
    assert ac.dtype == torch.float64 and ac.shape == (1000,)
    assert (ac.diff() < 0).all() and 0 < ac[-1] < ac[0] < 1


def test_build_schedule_and_invalid_arguments():
    s = build_schedule(DiffusionConfig(beta_schedule="cosine"))
    assert s.beta_schedule == "cosine" and s.num_train_timesteps == 1000
    with pytest.raises(ValueError):
        NoiseSchedule(1000, "sigmoid")
    with pytest.raises(ValueError):
        NoiseSchedule(1000, "linear", 0.02, 0.001)
    with pytest.raises(ValueError):
        NoiseSchedule(1, "linear")


# --------------------------------------------------------------------------------------------------
# Forward process and inverses
# --------------------------------------------------------------------------------------------------

def test_add_noise_at_t0_is_close_to_x0(schedules):
    x0 = torch.rand(2, 4, 8, 8, generator=gen()) * 2 - 1
    noise = torch.randn(2, 4, 8, 8, generator=gen(1))
    # √(1−ᾱ_0) = 0.029 (scaled-linear), 0.0063 (cosine)
    for name, tol in [("scaled_linear", 0.15), ("cosine", 0.03)]:
        assert (schedules[name].add_noise(x0, noise, torch.zeros(2, dtype=torch.long)) - x0).abs().max() < tol


def test_add_noise_per_sample_timesteps(schedules):
    s = schedules["scaled_linear"]
    x0, noise = torch.randn(3, 4, 4, 4, generator=gen()), torch.randn(3, 4, 4, 4, generator=gen(1))
    t = torch.tensor([0, 499, 999])
    xt = s.add_noise(x0, noise, t)
    for i in range(3):
        a = s.alphas_cumprod[t[i]].item()
        assert torch.allclose(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i], atol=1e-6)
    assert torch.allclose(s.add_noise(x0, noise, 499), s.add_noise(x0, noise, torch.full((3,), 499)))


@pytest.mark.parametrize("name", ["scaled_linear", "cosine"])
def test_predict_x0_and_eps_invert_add_noise(schedules, name):
    s = schedules[name]
    x0 = torch.randn(4, 4, 4, 4, generator=gen(), dtype=torch.float64)
    noise = torch.randn(4, 4, 4, 4, generator=gen(1), dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 990])  # cosine t = 999 is too ill-conditioned (√ᾱ = 5e-5) for x0
    xt = s.add_noise(x0, noise, t)
    assert torch.allclose(s.predict_x0(xt, noise, t), x0, atol=1e-9)
    assert torch.allclose(s.predict_eps(xt, x0, t), noise, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# Offset noise
# --------------------------------------------------------------------------------------------------

def test_offset_noise_zero_coefficient_is_plain_noise():
    plain = torch.randn(2, 4, 8, 8, generator=gen(3))
    assert torch.equal(offset_noise((2, 4, 8, 8), 0.0, gen(3)), plain)


def test_offset_noise_structure():
    a = offset_noise((2, 4, 8, 8), 0.1, gen(3))
    eps = torch.randn(2, 4, 8, 8, generator=(g := gen(3)))
    delta = torch.randn(2, 4, 1, 1, generator=g)
    assert torch.allclose(a, eps + 0.1 * delta)


@pytest.mark.parametrize("coefficient", [0.0, 0.1, 0.5])
def test_offset_noise_channel_mean_variance(coefficient):
    # Per (sample, channel) spatial mean: variance 1/(H·W) + c². 16384 means -> ~1.1 % std error.
    n = offset_noise((4096, 4, 16, 16), coefficient, gen(7))
    means = n.mean(dim=(2, 3)).flatten()
    expected = 1 / 256 + coefficient ** 2
    assert means.var().item() == pytest.approx(expected, rel=0.05)
    assert n.var().item() == pytest.approx(1 + coefficient ** 2, rel=0.02)


# --------------------------------------------------------------------------------------------------
# Condition modes (§3.5)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, train_scaled, sample_scaled", [
    ("clean", False, False), ("bug_compatible", True, False), ("scaled_consistent", True, True)])
def test_condition_modes(schedules, mode, train_scaled, sample_scaled):
    s = schedules["cosine"]
    x_t, c = torch.randn(2, 4, 4, 4, generator=gen()), torch.randn(2, 4, 4, 4, generator=gen(1))
    t = torch.tensor([999, 499])
    scale = s.sqrt_alphas_cumprod[t].float().view(2, 1, 1, 1)
    for fn, scaled in [(model_input_train, train_scaled), (model_input_sample, sample_scaled)]:
        inp = fn(x_t, c, t, s, mode)
        assert inp.shape == (2, 8, 4, 4)
        assert torch.equal(inp[:, :4], x_t)
        assert torch.allclose(inp[:, 4:], scale * c if scaled else c)


def test_bug_compatible_matches_reference_8_channel_add_noise(schedules):
    # The reference noises [z_bs ; z_cxr] with [ε ; 0]: its input equals [add_noise(z_bs) ; √ᾱ·z_cxr].
    s = schedules["scaled_linear"]
    z, c, eps = (torch.randn(2, 4, 4, 4, generator=gen(i)) for i in range(3))
    t = torch.tensor([5, 900])
    ref = s.add_noise(torch.cat([z, c], 1), torch.cat([eps, torch.zeros_like(eps)], 1), t)
    ours = model_input_train(s.add_noise(z, eps, t), c, t, s, "bug_compatible")
    assert torch.allclose(ours, ref, atol=1e-6)


def test_invalid_cond_mode_raises(schedules):
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError):
        model_input_train(x, x, 0, schedules["cosine"], "noisy")
    with pytest.raises(ValueError):
        model_input_sample(x, x, 0, schedules["cosine"], "noisy")


# --------------------------------------------------------------------------------------------------
# Training loss
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("out_channels", [4, 8])
def test_training_loss_with_tiny_unet(batch, out_channels, schedules):
    model = tiny_unet(out_channels=out_channels)
    z, c = torch.randn(batch, 4, 8, 8, generator=gen()), torch.randn(batch, 4, 8, 8, generator=gen(1))
    cfg = DiffusionConfig(cond_mode="bug_compatible")
    loss, logs = training_loss(model, schedules["scaled_linear"], z, c, cfg, gen(2))
    # Zero-initialised output: the loss is E[ε_off²] ≈ 1 + 0.1².
    assert loss.ndim == 0 and torch.isfinite(loss) and 0.3 < loss.item() < 3
    assert set(logs) == {"loss", "t_mean"} and isinstance(logs["loss"], float)
    loss.backward()
    assert model.out[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["clean", "bug_compatible", "scaled_consistent"])
def test_training_loss_plumbing_with_oracle(mode, schedules):
    """A 'model' that inverts add_noise knows ε_off exactly: the loss is 0 and t has the real batch size."""
    s = schedules["cosine"]
    z, c = torch.randn(3, 4, 4, 4, generator=gen()), torch.randn(3, 4, 4, 4, generator=gen(1))
    seen = {}

    def oracle(x, t):
        seen["t"], seen["x"] = t, x
        eps = s.predict_eps(x[:, :4], z, t)
        return torch.cat([eps, torch.full_like(eps, 1e3)], 1)   # extra channels are not supervised

    loss, _ = training_loss(oracle, s, z, c, DiffusionConfig(beta_schedule="cosine", cond_mode=mode), gen(5))
    assert seen["t"].shape == (3,) and seen["t"].dtype == torch.long
    assert 0 <= seen["t"].min() and seen["t"].max() < 1000
    assert loss.item() < 1e-8
    scale = s.sqrt_alphas_cumprod[seen["t"]].float().view(3, 1, 1, 1)
    assert torch.allclose(seen["x"][:, 4:], c if mode == "clean" else scale * c)


def test_training_loss_is_seeded(schedules):
    model = lambda x, t: x[:, :4] * 0.5  # noqa: E731
    z, c = torch.randn(2, 4, 4, 4, generator=gen()), torch.randn(2, 4, 4, 4, generator=gen(1))
    cfg = DiffusionConfig()
    a = training_loss(model, schedules["scaled_linear"], z, c, cfg, gen(9))[0]
    b = training_loss(model, schedules["scaled_linear"], z, c, cfg, gen(9))[0]
    d = training_loss(model, schedules["scaled_linear"], z, c, cfg, gen(10))[0]
    assert a.item() == b.item() and a.item() != d.item()


# --------------------------------------------------------------------------------------------------
# v-prediction
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["scaled_linear", "cosine"])
def test_v_target_and_eps_from_v_invert(schedules, name):
    s = schedules[name]
    x0 = torch.randn(4, 4, 4, 4, generator=gen(), dtype=torch.float64)
    noise = torch.randn(4, 4, 4, 4, generator=gen(1), dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    xt = s.add_noise(x0, noise, t)
    v = s.v_target(x0, noise, t)
    assert torch.allclose(s.eps_from_v(xt, v, t), noise, atol=1e-9)
    # v = √ᾱ·ε − √(1−ᾱ)·x0 by hand, and x̂0 through the recovered ε̂ is x0 (well-conditioned t only)
    a = s.alphas_cumprod[t].view(4, 1, 1, 1)
    assert torch.allclose(v, a.sqrt() * noise - (1 - a).sqrt() * x0, atol=1e-12)
    assert torch.allclose(s.predict_x0(xt[:3], s.eps_from_v(xt[:3], v[:3], t[:3]), t[:3]), x0[:3], atol=1e-9)


@pytest.mark.parametrize("mode", ["clean", "bug_compatible"])
def test_v_training_loss_with_oracle(mode, schedules):
    """A network that knows z and outputs the exact v has zero loss; its ε-view is the offset noise."""
    s = schedules["scaled_linear"]
    z, c = torch.randn(3, 4, 4, 4, generator=gen()), torch.randn(3, 4, 4, 4, generator=gen(1))

    def v_oracle(x, t):
        eps = s.predict_eps(x[:, :4], z, t)
        return torch.cat([s.v_target(z, eps, t), torch.full_like(eps, 7.0)], 1)

    cfg = DiffusionConfig(cond_mode=mode, prediction="v")
    loss, _ = training_loss(v_oracle, s, z, c, cfg, gen(5))
    assert loss.item() < 1e-8
    # The same oracle judged as an ε-network is wrong: the target really changed.
    assert training_loss(v_oracle, s, z, c, DiffusionConfig(cond_mode=mode), gen(5))[0].item() > 0.1
    net = EpsFromV(v_oracle, s)
    x_t = s.add_noise(z, torch.randn(3, 4, 4, 4, generator=gen(2)), torch.tensor([5, 500, 990]))
    t = torch.tensor([5, 500, 990])
    out = net(torch.cat([x_t, c], 1), t)
    assert out.shape == (3, 8, 4, 4) and torch.all(out[:, 4:] == 7.0)       # extra channels pass through
    assert torch.allclose(out[:, :4], s.predict_eps(x_t, z, t), atol=1e-4)


def test_eps_model_dispatch(schedules):
    net = tiny_unet(out_channels=4, channel_mult=(1,), attention_resolutions=(), num_heads=1)
    s = schedules["scaled_linear"]
    assert eps_model(net, s, "epsilon") is net
    wrapped = eps_model(net, s, "v")
    assert isinstance(wrapped, EpsFromV) and wrapped.net is net
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in net.parameters()]   # none of its own
    with pytest.raises(ValueError, match="prediction must be one of"):
        eps_model(net, s, "x0")
    with pytest.raises(ValueError, match="prediction must be one of"):
        training_loss(net, s, torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4), DiffusionConfig(prediction="x0"))
