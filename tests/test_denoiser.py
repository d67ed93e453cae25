"""The dual path as a denoiser of the stacked batch over the one sampler loop (docs/method.md §5.1, §5.2):
each half of the 2B run is the single-path run with that half's generator(s) and clip ranges, LEG is
formed inside the denoiser, block generators and per-element clip ranges, and one grid per run."""
from __future__ import annotations

import pytest
import torch

import models.samplers as samplers
from models.global_local import dual_path_denoiser, dual_path_sample, local_enhanced_guidance
from models.inference import make_denoiser, suppress_latents
from models.samplers import BlockGenerators, block_clip_ranges, clip_ranges, draw_noise, sample, sample_timesteps
from models.schedule import randn
from tests.conftest import LinearNet, conds, gen
from utils.config import GlobalLocalConfig, SamplerConfig

B, H, W = 2, 3, 5          # 4·3·5 = 60 values per element: not a multiple of 16 (see the block test)


def config(name: str, steps: int, **kw) -> SamplerConfig:
    base = dict(name=name, steps=steps, eta=1.0, clip=True, clip_r0_global=0.8, clip_r0_local=1.3,
                clip_kappa=0.2, clip_off_by_one=False, clip_index="step")
    return SamplerConfig(**{**base, **kw})


# --------------------------------------------------------------------------------------------------
# Each half of the stacked run is a single-path run
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, steps", [("lcm", 4), ("ddim", 3), ("ddpm", 4)])
@pytest.mark.parametrize("per_element", [False, True])
def test_halves_are_single_path_runs(sched, name, steps, per_element):
    """Without guidance each half equals models.samplers.sample with that half's condition,
    generator(s) and clip ranges, from the shared x_T, bit for bit."""
    net, (cg, cl), scfg = LinearNet(), conds((B, 4, H, W)), config(name, steps)
    pick = (lambda s: [gen(10 * s), gen(10 * s + 1)]) if per_element else gen
    n = len(sample_timesteps(name, steps))
    z_g, z_l = dual_path_sample(net, sched, cg, cl, scfg, GlobalLocalConfig(leg_mode="none", alpha=3.0), "clean",
                                pick(5), pick(6), batched=False)
    g_global = pick(5)
    x_T = randn((B, 4, H, W), g_global)           # drawn first, from the global generator(s)
    for z, c, r0, g in ((z_g, cg, 0.8, g_global), (z_l, cl, 1.3, pick(6))):
        alone = sample(make_denoiser(net, sched, c, "clean"), sched, (B, 4, H, W), name, steps,
                       clip_ranges(r0, 0.2, n), g, eta=1.0, x_T=x_T)
        assert torch.equal(z, alone)


@pytest.mark.parametrize("name, steps", [("lcm", 4), ("ddim", 3)])
def test_leg_noise_is_part_of_the_local_denoiser(sched, name, steps):
    """The local half is the single-path run whose denoiser applies LEG: ξ is drawn from the local
    generator inside the denoiser, before that step's noise, from the same generator."""
    net, (cg, cl), scfg = LinearNet(), conds((B, 4, H, W)), config(name, steps)
    gl = GlobalLocalConfig(leg_mode="noise", alpha=3.0)
    x_T = randn((B, 4, H, W), gen(5))              # the shared x_T, from the global generator
    _, z_l = dual_path_sample(net, sched, cg, cl, scfg, gl, "clean", gen(5), gen(6), batched=False)
    g_local = gen(6)
    local = make_denoiser(net, sched, cl, "clean")
    guided = lambda x, t: local_enhanced_guidance(local(x, t), 3.0, "noise", generator=g_local)  # noqa: E731
    alone = sample(guided, sched, (B, 4, H, W), name, steps, clip_ranges(1.3, 0.2, len(sample_timesteps(name, steps))),
                   g_local, eta=1.0, x_T=x_T)
    assert torch.equal(z_l, alone)


@pytest.mark.parametrize("mode", ["none", "global_pred", "global_cond"])
def test_denoiser_halves(sched, mode):
    """dual_path_denoiser([x_g ; x_l], t) = [ε_g ; LEG(ε_l)] with the single-path denoisers' ε."""
    net, (cg, cl) = LinearNet(), conds((B, 4, H, W))
    x = torch.randn(2 * B, 4, H, W, generator=gen(1))
    t = torch.full((2 * B,), 499, dtype=torch.long)
    eps = dual_path_denoiser(net, sched, cg, cl, "clean", mode, 3.0)(x, t)
    e_g = make_denoiser(net, sched, cg, "clean")(x[:B], t[:B])
    e_l = make_denoiser(net, sched, cl, "clean")(x[B:], t[B:])
    ref = {"none": None, "global_pred": e_g, "global_cond": make_denoiser(net, sched, cg, "clean")(x[B:], t[B:])}[mode]
    assert eps.shape == (2 * B, 4, H, W)
    torch.testing.assert_close(eps[:B], e_g, rtol=0, atol=1e-6)
    torch.testing.assert_close(eps[B:], e_l if ref is None else 3 * e_l - 2 * ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Block generators and per-element clip ranges
# --------------------------------------------------------------------------------------------------

def test_block_generators_draw_each_block_as_alone():
    shape = (2 * B, 4, H, W)
    got = draw_noise(shape, BlockGenerators((gen(1), [gen(2), gen(3)])))
    expected = torch.cat([randn((B, 4, H, W), gen(1)), randn((B, 4, H, W), [gen(2), gen(3)])])
    assert torch.equal(got, expected)
    # Why a block is drawn in one piece: row by row, one generator gives other numbers here.
    g = gen(1)
    assert not torch.equal(got[:B], torch.stack([torch.randn(4, H, W, generator=g) for _ in range(B)]))
    with pytest.raises(ValueError, match="blocks"):
        draw_noise((3, 4, H, W), BlockGenerators((gen(1), gen(2))))


def test_block_clip_ranges():
    r = block_clip_ranges([[1.0, 1.5, 2.0], [3.0, 3.5, 4.0]], rows=2)
    assert r.shape == (3, 4, 1, 1, 1)
    assert r[1].flatten().tolist() == [1.5, 1.5, 3.5, 3.5]
    assert block_clip_ranges([None, None], rows=2) is None
    with pytest.raises(ValueError, match="every block"):
        block_clip_ranges([[1.0], None], rows=2)
    with pytest.raises(ValueError, match="every block"):
        block_clip_ranges([[1.0], [1.0, 2.0]], rows=2)


def test_tensor_clip_range_equals_float(sched):
    """A (B, 1, 1, 1) float32 range clamps exactly as the float it holds."""
    x_t, eps = torch.randn(B, 4, H, W, generator=gen(0)), torch.randn(B, 4, H, W, generator=gen(1)) * 50
    r = 1.0 + 0.025 * 7
    a = samplers.ddim_step(sched, eps, 600, 400, x_t, r)
    b = samplers.ddim_step(sched, eps, 600, 400, x_t, torch.full((B, 1, 1, 1), r))
    assert torch.equal(a.pred_x0, b.pred_x0) and torch.equal(a.prev_sample, b.prev_sample)


# --------------------------------------------------------------------------------------------------
# One grid per run
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def grid_builds(monkeypatch) -> list[str]:
    """Names of the grid functions called, in order (every grid goes through one of them)."""
    calls: list[str] = []
    for name in ("timesteps_ddpm", "timesteps_ddim", "timesteps_lcm"):
        original = getattr(samplers, name)
        monkeypatch.setattr(samplers, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    return calls


@pytest.mark.parametrize("name, clip_index", [("lcm", "step"), ("lcm", "time"), ("ddim", "step"), ("ddpm", "step")])
def test_grid_is_computed_once_per_run(sched, grid_builds, name, clip_index):
    cg, cl = conds((B, 4, H, W))
    scfg = config(name, 3, clip_index=clip_index)
    dual_path_sample(LinearNet(), sched, cg, cl, scfg, GlobalLocalConfig(leg_mode="noise", alpha=3.0), "clean",
                     gen(0), gen(1))
    assert len(grid_builds) == 1
    grid_builds.clear()
    suppress_latents(LinearNet(), sched, cg, scfg, "clean", gen(0))
    assert len(grid_builds) == 1


def test_sample_takes_steps_or_timesteps(sched):
    fn = lambda x, t: 0.5 * x  # noqa: E731
    ts = sample_timesteps("lcm", 4)
    assert torch.equal(sample(fn, sched, (B, 4, H, W), "lcm", 4, None, gen(0)),
                       sample(fn, sched, (B, 4, H, W), "lcm", None, None, gen(0), timesteps=ts))
    with pytest.raises(ValueError, match="not both"):
        sample(fn, sched, (B, 4, H, W), "lcm", 4, timesteps=ts)
    with pytest.raises(ValueError, match="sampler_name"):
        sample(fn, sched, (B, 4, H, W), "euler", timesteps=ts)
