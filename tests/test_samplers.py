"""Samplers: timestep grids, TAT clip ranges, consistency scalings (golden values of docs/method.md §4, §8),
x0 recovery with an oracle denoiser, seeded determinism, per-step clipping, step identities and
seeded golden sums with a fixed linear "denoiser"."""
from __future__ import annotations

import math

import pytest
import torch

from models.samplers import (clip_ranges, consistency_scalings, ddim_step, ddpm_step, lcm_step, sample,
                             sample_timesteps, timesteps_ddim, timesteps_ddpm, timesteps_lcm)
from models.schedule import NoiseSchedule, model_input_sample
from tests.conftest import gen, tiny_unet

SHAPE = (2, 4, 8, 8)


def oracle(schedule: NoiseSchedule, x0: torch.Tensor):
    """ε̂ that is exactly right for the known clean latent x0: x̂0 = x0 at every step."""
    return lambda x_t, t: schedule.predict_eps(x_t, x0, t)


def n_steps(name: str, steps: int | None) -> int:
    return len(sample_timesteps(name, steps))


# --------------------------------------------------------------------------------------------------
# Grids, ranges, scalings
# --------------------------------------------------------------------------------------------------

def test_ddpm_timesteps():
    ts = timesteps_ddpm()
    assert len(ts) == 1000 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)


def test_lcm_grid_50_and_4():
    assert timesteps_lcm(50) == [999 - 20 * j for j in range(50)]
    assert timesteps_lcm(4) == [999, 759, 499, 259]
    assert timesteps_lcm(1) == [999]
    assert timesteps_lcm(2) == [999, 499]
    assert timesteps_lcm(8) == [999, 879, 759, 639, 499, 379, 259, 139]   # floor(6.25 i) -> 0,6,12,18,25,...
    with pytest.raises(ValueError):
        timesteps_lcm(51)


def test_ddim_trailing_grid():
    assert timesteps_ddim(50) == timesteps_lcm(50)
    assert timesteps_ddim(1000) == timesteps_ddpm()
    assert timesteps_ddim(3) == [999, 666, 332]
    with pytest.raises(ValueError):
        timesteps_ddim(0)


def test_clip_ranges_tat():
    bs_ldm = clip_ranges(1.4, 0.003, 1000, off_by_one=True)
    assert bs_ldm[0] == bs_ldm[1] == 1.4
    assert bs_ldm[2] == pytest.approx(1.403) and bs_ldm[999] == pytest.approx(4.394)
    global_szch = clip_ranges(2.0, 0.025, 50)
    assert global_szch[0] == 2.0 and global_szch[1] == pytest.approx(2.025)
    assert global_szch[49] == pytest.approx(3.225)
    assert clip_ranges(3.5, 0.025, 50)[49] == pytest.approx(4.725)   # SZCH local path
    assert clip_ranges(1.7, 0.025, 50)[49] == pytest.approx(2.925)   # JSRT global path
    with pytest.raises(ValueError):
        clip_ranges(1.0, 0.1, 0)


def test_consistency_scalings_golden():
    c_skip, c_out = consistency_scalings(19, 0.5, 10.0)
    assert c_skip == pytest.approx(6.93e-6, rel=1e-3) and c_out == pytest.approx(0.9999965, abs=1e-7)
    for t, expected in [(999, 2.5e-9), (499, 1.0e-8), (99, 2.6e-7)]:
        assert consistency_scalings(t)[0] == pytest.approx(expected, rel=0.02)
    c_skip, c_out = consistency_scalings(torch.tensor([0.0, 19.0]))
    assert torch.allclose(c_skip, torch.tensor([1.0, 6.925e-6]), rtol=1e-3)
    assert torch.allclose(c_out, torch.tensor([0.0, 0.9999965]))


# --------------------------------------------------------------------------------------------------
# Loops with an oracle denoiser
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, steps, eta", [
    ("ddpm", None, 0.0), ("ddpm", 10, 0.0), ("ddim", 1, 0.0), ("ddim", 50, 0.0), ("ddim", 20, 1.0),
    ("lcm", 1, 0.0), ("lcm", 4, 0.0), ("lcm", 50, 0.0)])
def test_oracle_recovers_x0(sched, name, steps, eta):
    x0 = torch.rand(SHAPE, generator=gen(1)) * 2 - 1
    ranges = clip_ranges(2.0, 0.025, n_steps(name, steps))          # never binding for |x0| <= 1
    out = sample(oracle(sched, x0), sched, SHAPE, name, steps, ranges, gen(0), eta)
    # DDPM/DDIM end exactly at x̂0; LCM's last step is c_out·x̂0 + c_skip·x_t with c_skip <= 2.6e-7
    # at t >= 99 (and 2.5e-9 at t = 999 for one step).
    assert (out - x0).abs().max() < 1e-4


@pytest.mark.parametrize("name, steps", [("ddpm", 10), ("ddim", 10), ("lcm", 4)])
def test_seeded_determinism(sched, name, steps):
    fn = lambda x, t: 0.5 * x  # noqa: E731
    eta = 1.0 if name == "ddim" else 0.0    # make DDIM stochastic too
    a = sample(fn, sched, SHAPE, name, steps, None, gen(42), eta)
    b = sample(fn, sched, SHAPE, name, steps, None, gen(42), eta)
    c = sample(fn, sched, SHAPE, name, steps, None, gen(43), eta)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_shared_initial_noise(sched):
    """Two paths may share x_T (GL-LCM) yet draw different step noise from their own generators."""
    x_T = torch.randn(SHAPE, generator=gen(0))
    fn = lambda x, t: 0.5 * x  # noqa: E731
    a = sample(fn, sched, SHAPE, "lcm", 4, None, gen(1), x_T=x_T)
    b = sample(fn, sched, SHAPE, "lcm", 4, None, gen(1), x_T=x_T.clone())
    c = sample(fn, sched, SHAPE, "lcm", 4, None, gen(2), x_T=x_T)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(sample(fn, sched, SHAPE, "lcm", 1, None, gen(1), x_T=x_T),
                       sample(fn, sched, SHAPE, "lcm", 1, None, gen(2), x_T=x_T))  # 1 step: no noise


@pytest.mark.parametrize("name, steps, off_by_one", [("lcm", 50, False), ("ddim", 5, False),
                                                      ("ddpm", 8, True)])
def test_clip_applied_per_step(sched, name, steps, off_by_one):
    n = n_steps(name, steps)
    ranges = clip_ranges(1.4, 0.3, n, off_by_one)
    seen = []
    huge = lambda x, t: torch.full_like(x, 1e4)  # noqa: E731  -> x̂0 far below -r_j
    sample(huge, sched, SHAPE, name, steps, ranges, gen(0),
           callback=lambda j, t, out: seen.append((j, out.pred_x0.min().item(), out.pred_x0.max().item())))
    assert [j for j, *_ in seen] == list(range(n))
    for j, lo, hi in seen:
        r = torch.tensor(ranges[j], dtype=torch.float32).item()
        assert lo == hi == -r
    if off_by_one:
        assert seen[0][1] == seen[1][1]


def test_clip_none_leaves_x0_unclipped(sched):
    seen = []
    sample(lambda x, t: torch.full_like(x, 1e4), sched, SHAPE, "lcm", 2, None, gen(0),
           callback=lambda j, t, out: seen.append(out.pred_x0.min().item()))
    assert min(seen) < -1e3


def test_denoise_fn_receives_batched_long_timesteps(sched):
    calls = []

    def fn(x, t):
        calls.append(t.clone())
        return torch.zeros_like(x)

    sample(fn, sched, SHAPE, "lcm", 4, None, gen(0))
    assert [c.tolist() for c in calls] == [[t, t] for t in (999, 759, 499, 259)]
    assert all(c.dtype == torch.long for c in calls)


# --------------------------------------------------------------------------------------------------
# Step identities
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t, clip", [(999, None), (500, 1.0), (1, None)])
def test_ddim_eta1_equals_ddpm_step(sched, t, clip):
    x_t, eps = torch.randn(SHAPE, generator=gen(0)), torch.randn(SHAPE, generator=gen(1))
    a = ddpm_step(sched, eps, t, x_t, clip, gen(5))
    b = ddim_step(sched, eps, t, t - 1, x_t, clip, gen(5), eta=1.0)
    assert torch.allclose(a.prev_sample, b.prev_sample, atol=1e-5)
    assert torch.equal(a.pred_x0, b.pred_x0)


def test_ddpm_step_formula_and_last_step(sched):
    x_t, eps = torch.randn(SHAPE, generator=gen(0)), torch.randn(SHAPE, generator=gen(1))
    t = 600
    a_t, a_p = sched.alphas_cumprod[t].item(), sched.alphas_cumprod[t - 1].item()
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    mean = (math.sqrt(a_p) * (1 - a_t / a_p) * x0 + math.sqrt(a_t / a_p) * (1 - a_p) * x_t) / (1 - a_t)
    sigma = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    z = torch.randn(SHAPE, generator=gen(5))
    assert torch.allclose(ddpm_step(sched, eps, t, x_t, None, gen(5)).prev_sample, mean + sigma * z, atol=1e-5)
    # t = 0: x_{-1} = x̂0 and no noise is drawn.
    g = gen(5)
    out = ddpm_step(sched, eps, 0, x_t, None, g)
    assert torch.allclose(out.prev_sample, out.pred_x0, atol=1e-6)
    assert torch.equal(g.get_state(), gen(5).get_state())


def test_lcm_step_renoises_with_fresh_noise(sched):
    x_t, eps = torch.randn(SHAPE, generator=gen(0)), torch.randn(SHAPE, generator=gen(1))
    out = lcm_step(sched, eps, 999, 979, x_t, 2.0, gen(5))
    x0 = sched.predict_x0(x_t, eps, 999).clamp(-2.0, 2.0)
    c_skip, c_out = consistency_scalings(999)
    denoised = c_out * x0 + c_skip * x_t
    a = sched.alphas_cumprod[979].item()
    expected = math.sqrt(a) * denoised + math.sqrt(1 - a) * torch.randn(SHAPE, generator=gen(5))
    assert torch.allclose(out.prev_sample, expected, atol=1e-6)
    assert torch.equal(out.pred_x0, x0)
    last = lcm_step(sched, eps, 19, None, x_t, 2.0, gen(5))
    c_skip, c_out = consistency_scalings(19)
    expected_last = c_out * sched.predict_x0(x_t, eps, 19).clamp(-2, 2) + c_skip * x_t
    assert torch.allclose(last.prev_sample, expected_last, atol=1e-6)


def test_ddim_eta0_is_deterministic_and_ddpm_equals_ddim_eta1_loop(sched):
    fn = lambda x, t: 0.5 * x  # noqa: E731
    x_T = torch.randn(SHAPE, generator=gen(0))
    assert torch.equal(sample(fn, sched, SHAPE, "ddim", 10, None, gen(1), x_T=x_T),
                       sample(fn, sched, SHAPE, "ddim", 10, None, gen(2), x_T=x_T))
    r = clip_ranges(1.0, 0.05, 10)
    assert torch.allclose(sample(fn, sched, SHAPE, "ddpm", 10, r, gen(1), x_T=x_T),
                          sample(fn, sched, SHAPE, "ddim", 10, r, gen(1), eta=1.0, x_T=x_T), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Golden sums (regression) and argument checks
# --------------------------------------------------------------------------------------------------

GOLDEN = [  # (sampler, steps, eta, sum, mean |x|) with eps = 0.5·x_t, r_j = 1.0 + 0.01·j, seed 0
    ("ddpm", None, 0.0, -44.308136, 0.9213833),
    ("ddpm", 10, 0.0, -15.113104, 0.6162575),
    ("ddim", 1, 0.0, 14.597431, 0.9529111),
    ("ddim", 10, 0.0, 21.367735, 0.8756902),
    ("lcm", 1, 0.0, 14.597431, 0.9529111),
    ("lcm", 4, 0.0, -6.008970, 0.5675461),
    ("lcm", 50, 0.0, 0.951131, 0.3971678),
]


@pytest.mark.parametrize("name, steps, eta, total, abs_mean", GOLDEN)
def test_golden_full_loop(sched, name, steps, eta, total, abs_mean):
    x = sample(lambda x, t: 0.5 * x, sched, SHAPE, name, steps, clip_ranges(1.0, 0.01, n_steps(name, steps)),
               gen(0), eta)
    assert x.sum().item() == pytest.approx(total, abs=1e-3)
    assert x.abs().mean().item() == pytest.approx(abs_mean, rel=1e-5)


def test_sample_argument_checks(sched):
    fn = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError):
        sample(fn, sched, SHAPE, "euler", 4)
    with pytest.raises(ValueError):
        sample(fn, sched, SHAPE, "lcm", 4, clip_ranges(1.0, 0.1, 5))
    with pytest.raises(ValueError):
        sample(fn, sched, SHAPE, "lcm", 4, x_T=torch.zeros(1, 4, 8, 8))


def test_tiny_unet_end_to_end(sched):
    """UNet + condition mode + LCM sampler, 2 steps, as an evaluation script would wire them."""
    torch.manual_seed(0)
    model = tiny_unet(out_channels=4).eval()
    cond = torch.randn(SHAPE, generator=gen(3))
    fn = lambda x, t: model(model_input_sample(x, cond, t, sched, "scaled_consistent"), t)  # noqa: E731
    out = sample(fn, sched, SHAPE, "lcm", 2, clip_ranges(2.0, 0.025, 2), gen(0))
    assert out.shape == SHAPE and torch.isfinite(out).all()


def test_per_sample_generators_make_samples_batch_independent(sched):
    """With one generator per element, an element's sample is the same alone or in a batch."""

    def denoise(x, t):
        return 0.5 * x

    gens = lambda: [gen(s) for s in (11, 12, 13)]  # noqa: E731
    for name, steps in (("lcm", 4), ("ddim", 5), ("ddpm", 6)):
        batch = sample(denoise, sched, (3, 4, 8, 8), name, steps, generator=gens(), eta=1.0)
        alone = sample(denoise, sched, (1, 4, 8, 8), name, steps, generator=gens()[1:2], eta=1.0)
        torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sample(denoise, sched, (3, 4, 8, 8), "lcm", 2, generator=gens()[:2])


# --------------------------------------------------------------------------------------------------
# Timestep-indexed TAT (sampler.clip_index: time)
# --------------------------------------------------------------------------------------------------

def test_clip_ranges_by_time():
    from models.samplers import clip_ranges_by_time, timesteps_lcm

    grid50 = timesteps_lcm(50)
    # On the 50-point grid: the step-indexed ranges exactly.
    assert clip_ranges_by_time(2.0, 0.025, grid50) == pytest.approx(clip_ranges(2.0, 0.025, 50))
    # 4 LCM steps: the ranges the 50-step run has at 999, 759, 499, 259 (not 2.0 ... 2.075).
    assert clip_ranges_by_time(2.0, 0.025, timesteps_lcm(4)) == pytest.approx([2.0, 2.3, 2.625, 2.925])
    assert clip_ranges(2.0, 0.025, 4)[-1] == pytest.approx(2.075)


def test_tat_ranges_dispatch_and_dual_path_clip(sched):
    from models.global_local import dual_path_sample
    from models.samplers import tat_ranges
    from utils.config import GlobalLocalConfig, SamplerConfig

    cfg = SamplerConfig(name="lcm", steps=4, eta=0.0, clip=True, clip_r0_global=0.5, clip_r0_local=0.7,
                        clip_kappa=0.025, clip_off_by_one=False, clip_index="time")
    assert tat_ranges(cfg, 0.5) == pytest.approx([0.5, 0.8, 1.125, 1.425])
    cfg.clip_index = "step"
    assert tat_ranges(cfg, 0.5) == pytest.approx([0.5, 0.525, 0.55, 0.575])
    cfg.clip = False
    assert tat_ranges(cfg, 0.5) is None
    cfg.clip, cfg.clip_index, cfg.clip_off_by_one = True, "time", True
    with pytest.raises(ValueError, match="clip_off_by_one"):
        tat_ranges(cfg, 0.5)
    # The dual path clips each path's x̂0 with its own time-indexed ranges.
    cfg.clip_off_by_one = False
    net = lambda x, t: 30 * torch.randn(x.shape[0], 4, *x.shape[2:], generator=gen(0))  # noqa: E731
    seen = []
    gl = GlobalLocalConfig(leg_mode="none", alpha=3.0, leg_std_channels=4)
    c = torch.zeros(2, 4, 4, 4)
    dual_path_sample(net, sched, c, c, cfg, gl, "clean", gen(1), gen(2),
                     callback=lambda j, t, g, l: seen.append((g.pred_x0.abs().max().item(), l.pred_x0.abs().max().item())))
    assert [g for g, _ in seen] == pytest.approx([0.5, 0.8, 1.125, 1.425])
    assert [l for _, l in seen] == pytest.approx([0.7, 1.0, 1.325, 1.625])
