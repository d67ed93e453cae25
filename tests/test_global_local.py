"""Global-local dual-path sampling and Local-Enhanced Guidance (docs/method.md §5.1, §5.2): LEG formulas and
identities, seeded noise, one batched network call per step (2 or 3 branches), shared x_T, per-path
clip ranges and generators, agreement with the single-path sampler and with a hand-written loop."""
from __future__ import annotations

import pytest
import torch

from models.global_local import dual_path_sample, local_enhanced_guidance
from models.inference import make_denoiser
from models.samplers import clip_ranges, ddim_step, ddpm_step, lcm_step, sample, sample_timesteps
from models.schedule import model_input_sample, randn
from models.unet import UNetModel
from tests.conftest import LinearNet, conds, gen, tiny_unet
from utils.config import GlobalLocalConfig, SamplerConfig

B, SHAPE = 2, (2, 4, 8, 8)


def reference_loop(net, sched, cg, cl, scfg, gcfg, gg, gl, leg_std_channels=4):
    """The dual-path algorithm written out the plain way (two or three separate calls per step)."""
    ts = sample_timesteps(scfg.name, scfg.steps)
    n = len(ts)
    rg = clip_ranges(scfg.clip_r0_global, scfg.clip_kappa, n)
    rl = clip_ranges(scfg.clip_r0_local, scfg.clip_kappa, n)
    x_g = x_l = randn(SHAPE, gg)
    for j, t in enumerate(ts):
        tb = torch.full((B,), t, dtype=torch.long)
        raw_g = net(model_input_sample(x_g, cg, tb, sched, "clean"), tb)
        raw_l = net(model_input_sample(x_l, cl, tb, sched, "clean"), tb)
        e_g, e_l = raw_g[:, :4], raw_l[:, :4]
        a = gcfg.alpha
        if gcfg.leg_mode == "noise":
            sigma = raw_l[:, :leg_std_channels].flatten(1).std(dim=1)[:, None, None, None]
            e_l = a * e_l + (1 - a) * randn(SHAPE, gl) / sigma
        elif gcfg.leg_mode == "global_pred":
            e_l = (1 - a) * e_g + a * e_l
        elif gcfg.leg_mode == "global_cond":
            e_ref = net(model_input_sample(x_l, cg, tb, sched, "clean"), tb)[:, :4]
            e_l = (1 - a) * e_ref + a * e_l
        t_next = ts[j + 1] if j + 1 < n else None
        t_prev = -1 if t_next is None else t_next
        steps = []
        for eps, x, r, g in ((e_g, x_g, rg[j], gg), (e_l, x_l, rl[j], gl)):
            if scfg.name == "lcm":
                steps.append(lcm_step(sched, eps, t, t_next, x, r, g).prev_sample)
            elif scfg.name == "ddim":
                steps.append(ddim_step(sched, eps, t, t_prev, x, r, g, scfg.eta).prev_sample)
            else:
                steps.append(ddpm_step(sched, eps, t, x, r, g, t_prev=t_prev).prev_sample)
        x_g, x_l = steps
    return x_g, x_l


# --------------------------------------------------------------------------------------------------
# Local-Enhanced Guidance
# --------------------------------------------------------------------------------------------------

def test_leg_none_is_plain_local():
    e = torch.randn(SHAPE, generator=gen(0))
    assert local_enhanced_guidance(e, 3.0, "none") is e


@pytest.mark.parametrize("mode", ["global_pred", "global_cond"])
def test_leg_reference_modes_formula_and_identities(mode):
    e_l, e_ref = torch.randn(SHAPE, generator=gen(0)), torch.randn(SHAPE, generator=gen(1))
    torch.testing.assert_close(local_enhanced_guidance(e_l, 3.0, mode, e_ref), 3 * e_l - 2 * e_ref)
    assert torch.equal(local_enhanced_guidance(e_l, 1.0, mode, e_ref), e_l)       # α = 1: no guidance
    assert torch.equal(local_enhanced_guidance(e_l, 1.0, mode, None), e_l)        # ... ref not needed
    assert torch.equal(local_enhanced_guidance(e_l, 0.0, mode, e_ref), e_ref)     # α = 0: the reference
    with pytest.raises(ValueError, match="needs eps_ref"):
        local_enhanced_guidance(e_l, 3.0, mode)
    with pytest.raises(ValueError, match="shape"):
        local_enhanced_guidance(e_l, 3.0, mode, e_ref[:1])


def test_leg_noise_formula_seeded_and_per_sample_std():
    e_l = torch.randn(SHAPE, generator=gen(0)) * torch.tensor([1.0, 4.0])[:, None, None, None]
    out = local_enhanced_guidance(e_l, 3.0, "noise", generator=gen(5))
    assert torch.equal(out, local_enhanced_guidance(e_l, 3.0, "noise", generator=gen(5)))
    assert not torch.equal(out, local_enhanced_guidance(e_l, 3.0, "noise", generator=gen(6)))
    xi = torch.randn(SHAPE, generator=gen(5))
    sigma = torch.stack([e_l[0].std(), e_l[1].std()])[:, None, None, None]     # one σ per sample
    torch.testing.assert_close(out, 3 * e_l - 2 * xi / sigma)
    # α = 1: exactly ε_l, although ξ is still drawn (same stream layout for every α)
    g = gen(5)
    assert torch.equal(local_enhanced_guidance(e_l, 1.0, "noise", generator=g), e_l)
    assert g.initial_seed() == 5 and not torch.equal(torch.randn(SHAPE, generator=g), xi)


def test_leg_noise_std_over_all_output_channels():
    """std_over = the raw 8-channel output reproduces the reference's σ (unsupervised channels included)."""
    raw = torch.randn(2, 8, 8, 8, generator=gen(0))
    raw[:, 4:] *= 10
    e_l = raw[:, :4]
    out4 = local_enhanced_guidance(e_l, 3.0, "noise", generator=gen(5))
    out8 = local_enhanced_guidance(e_l, 3.0, "noise", generator=gen(5), std_over=raw)
    xi = torch.randn(SHAPE, generator=gen(5))
    sigma8 = raw.flatten(1).std(dim=1)[:, None, None, None]
    torch.testing.assert_close(out8, 3 * e_l - 2 * xi / sigma8)
    assert (out8 - 3 * e_l).abs().mean() < 0.2 * (out4 - 3 * e_l).abs().mean()   # σ8 ≈ 7 σ4
    with pytest.raises(ValueError, match="batch"):
        local_enhanced_guidance(e_l, 3.0, "noise", std_over=raw[:1])


def test_leg_noise_statistics():
    """(ε̃ − αε)·σ/(1 − α) is the fresh N(0, I) draw."""
    s = 0.37
    e_l = torch.randn(1, 4, 64, 64, generator=gen(0)) * s
    out = local_enhanced_guidance(e_l, 3.0, "noise", generator=gen(1))
    xi = (out - 3 * e_l) * e_l.std() / (1 - 3.0)
    assert abs(xi.mean().item()) < 0.03 and abs(xi.std().item() - 1) < 0.03
    assert abs((out - 3 * e_l).std().item() - 2 / s) < 0.05 * 2 / s


def test_leg_noise_per_sample_generators_are_batch_independent():
    e_l = torch.randn(SHAPE, generator=gen(0))
    both = local_enhanced_guidance(e_l, 3.0, "noise", generator=[gen(1), gen(2)])
    alone = local_enhanced_guidance(e_l[1:], 3.0, "noise", generator=[gen(2)])
    assert torch.equal(both[1:], alone)


def test_leg_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        local_enhanced_guidance(torch.zeros(SHAPE), 3.0, "cfg")


# --------------------------------------------------------------------------------------------------
# Dual path, with the exactly per-sample linear network
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, eta", [("lcm", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
@pytest.mark.parametrize("mode", ["none", "noise", "global_pred", "global_cond"])
def test_dual_path_matches_reference_loop(sched, name, eta, mode):
    """Formulas, branch inputs, per-path clip ranges and the order of random draws."""
    net = LinearNet()
    cg, cl = conds(SHAPE)
    scfg = SamplerConfig(name=name, steps=3, eta=eta, clip_r0_global=1.0, clip_r0_local=1.5, clip_kappa=0.3)
    gcfg = GlobalLocalConfig(leg_mode=mode, alpha=3.0)
    expected = reference_loop(net, sched, cg, cl, scfg, gcfg, gen(5), gen(6))
    for batched in (True, False):
        got = dual_path_sample(net, sched, cg, cl, scfg, gcfg, "clean", gen(5), gen(6), batched=batched)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode, alpha, branches", [("none", 3.0, 2), ("noise", 3.0, 2), ("global_pred", 3.0, 2),
                                                   ("global_cond", 3.0, 3), ("global_cond", 1.0, 2)])
def test_one_network_call_per_step(sched, mode, alpha, branches):
    """Batched: one call of batch branches·B per step; sequential: one call of B per branch."""
    cg, cl = conds(SHAPE)
    scfg = SamplerConfig(name="lcm", steps=4)
    gcfg = GlobalLocalConfig(leg_mode=mode, alpha=alpha)
    net = LinearNet()
    dual_path_sample(net, sched, cg, cl, scfg, gcfg, "clean", gen(0), gen(1))
    assert net.calls == [branches * B] * 4
    net.calls.clear()
    dual_path_sample(net, sched, cg, cl, scfg, gcfg, "clean", gen(0), gen(1), batched=False)
    assert net.calls == [B] * (4 * branches)


def test_global_cond_third_branch_is_local_latent_under_global_condition(sched):
    cg, cl = conds(SHAPE)
    seen = []

    class Spy(LinearNet):
        def forward(self, x, t):
            seen.append(x.clone())
            return super().forward(x, t)

    dual_path_sample(Spy(), sched, cg, cl, SamplerConfig(name="lcm", steps=2),
                     GlobalLocalConfig(leg_mode="global_cond"), "clean", gen(0), gen(1))
    x = seen[1]                                   # second step: the paths have diverged
    xg, xl, xr = x[:B], x[B:2 * B], x[2 * B:]
    assert torch.equal(xg[:, 4:], cg) and torch.equal(xl[:, 4:], cl) and torch.equal(xr[:, 4:], cg)
    assert torch.equal(xr[:, :4], xl[:, :4]) and not torch.equal(xg[:, :4], xl[:, :4])


def test_both_paths_start_from_the_same_noise(sched):
    cg, cl = conds(SHAPE)
    net = LinearNet()
    first = []
    net.register_forward_hook(lambda m, args, out: first.append(args[0].clone()) if not first else None)
    dual_path_sample(net, sched, cg, cl, SamplerConfig(name="lcm", steps=2),
                     GlobalLocalConfig(leg_mode="noise"), "clean", gen(5), gen(6))
    x_T = torch.randn(SHAPE, generator=gen(5))    # drawn from the global generator
    assert torch.equal(first[0][:B, :4], x_T) and torch.equal(first[0][B:, :4], x_T)
    # An explicit x_T is used as given by both paths.
    first.clear()
    given = torch.randn(SHAPE, generator=gen(9))
    dual_path_sample(net, sched, cg, cl, SamplerConfig(name="lcm", steps=2),
                     GlobalLocalConfig(leg_mode="none"), "clean", gen(5), gen(6), x_T=given)
    assert torch.equal(first[0][:B, :4], given) and torch.equal(first[0][B:, :4], given)


@pytest.mark.parametrize("name, steps", [("lcm", 5), ("ddim", 4), ("ddpm", 4)])
def test_each_path_clipped_to_its_own_range(sched, name, steps):
    class Huge(torch.nn.Module):   # ε̂ = 1e4 -> x̂0 far below -r_j on both paths
        def forward(self, x, t):
            return torch.full((x.shape[0], 4, *x.shape[2:]), 1e4)

    cg, cl = conds(SHAPE)
    scfg = SamplerConfig(name=name, steps=steps, clip_r0_global=2.0, clip_r0_local=3.5, clip_kappa=0.025)
    seen = []
    dual_path_sample(Huge(), sched, cg, cl, scfg, GlobalLocalConfig(leg_mode="global_pred", alpha=1.0), "clean",
                     gen(0), gen(1), callback=lambda j, t, og, ol: seen.append((j, t, og.pred_x0, ol.pred_x0)))
    ts = sample_timesteps(name, steps)
    assert [(j, t) for j, t, *_ in seen] == list(enumerate(ts))
    for j, _, x0_g, x0_l in seen:
        r_g = torch.tensor(2.0 + 0.025 * j).item()
        r_l = torch.tensor(3.5 + 0.025 * j).item()
        assert x0_g.min().item() == x0_g.max().item() == -r_g
        assert x0_l.min().item() == x0_l.max().item() == -r_l


def test_clip_off_gives_unclipped_x0(sched):
    class Huge(torch.nn.Module):
        def forward(self, x, t):
            return torch.full((x.shape[0], 4, *x.shape[2:]), 1e4)

    cg, cl = conds(SHAPE)
    seen = []
    dual_path_sample(Huge(), sched, cg, cl, SamplerConfig(name="lcm", steps=2, clip=False),
                     GlobalLocalConfig(leg_mode="none"), "clean", gen(0), gen(1),
                     callback=lambda j, t, og, ol: seen.append(min(og.pred_x0.min(), ol.pred_x0.min()).item()))
    assert max(seen) < -1e4


@pytest.mark.parametrize("mode", ["noise", "global_pred", "global_cond"])
def test_global_path_is_the_single_path_sampler(sched, mode):
    """The global path ignores everything local: it equals models.samplers.sample with the global
    generator (x_T drawn first), whatever the local condition, generator or LEG mode."""
    net = LinearNet()
    cg, cl = conds(SHAPE)
    scfg = SamplerConfig(name="lcm", steps=4, clip_r0_global=1.0, clip_kappa=0.2)
    g = gen(5)
    x_T = randn(SHAPE, g)
    expected = sample(make_denoiser(net, sched, cg, "clean"), sched, SHAPE, "lcm", 4,
                      clip_ranges(1.0, 0.2, 4), g, x_T=x_T)
    z_g, z_l = dual_path_sample(net, sched, cg, cl, scfg, GlobalLocalConfig(leg_mode=mode), "clean", gen(5), gen(6),
                                batched=False)
    assert torch.equal(z_g, expected)
    z_g2, z_l2 = dual_path_sample(net, sched, cg, cl * 2, scfg, GlobalLocalConfig(leg_mode=mode), "clean", gen(5),
                                  gen(7), batched=False)
    assert torch.equal(z_g2, expected) and not torch.allclose(z_l, z_l2)


def test_leg_std_over_eight_output_channels(sched):
    """leg_std_channels=8 takes σ over all 8 outputs of an 8-output network (the reference's std)."""
    net = LinearNet(out_channels=8)
    cg, cl = conds(SHAPE)
    scfg = SamplerConfig(name="lcm", steps=3)
    gcfg = GlobalLocalConfig(leg_mode="noise")
    for k in (4, 8):
        expected = reference_loop(net, sched, cg, cl, scfg, gcfg, gen(5), gen(6), leg_std_channels=k)
        got = dual_path_sample(net, sched, cg, cl, scfg, gcfg, "clean", gen(5), gen(6), leg_std_channels=k)
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        dual_path_sample(LinearNet(4), sched, cg, cl, scfg, gcfg, "clean", gen(5), gen(6), leg_std_channels=8)


def test_per_sample_generators_make_dual_paths_batch_independent(sched):
    net = LinearNet()
    cg, cl = conds(SHAPE)
    scfg = SamplerConfig(name="lcm", steps=3)
    gcfg = GlobalLocalConfig(leg_mode="noise")
    both = dual_path_sample(net, sched, cg, cl, scfg, gcfg, "clean", [gen(1), gen(2)], [gen(3), gen(4)])
    alone = dual_path_sample(net, sched, cg[1:], cl[1:], scfg, gcfg, "clean", [gen(2)], [gen(4)])
    for a, b in zip(both, alone):
        torch.testing.assert_close(a[1:], b, rtol=0, atol=1e-6)


def test_dual_path_argument_checks(sched):
    net = LinearNet()
    cg, cl = conds(SHAPE)
    scfg = SamplerConfig(name="lcm", steps=2)
    with pytest.raises(ValueError, match="cond_global"):
        dual_path_sample(net, sched, cg, cl[:1], scfg, GlobalLocalConfig(), "clean")
    with pytest.raises(ValueError, match="x_T"):
        dual_path_sample(net, sched, cg, cl, scfg, GlobalLocalConfig(), "clean", x_T=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="leg_mode"):
        dual_path_sample(net, sched, cg, cl, scfg, GlobalLocalConfig(leg_mode="cfg"), "clean")


# --------------------------------------------------------------------------------------------------
# Batched vs sequential with a real (tiny) UNet
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unet() -> UNetModel:
    torch.manual_seed(0)
    unet = tiny_unet(out_channels=4).eval()
    # The output conv is zero-initialised (ε̂ ≡ 0 would make the test vacuous).
    with torch.no_grad():
        unet.out[-1].weight.normal_(0.0, 0.02, generator=gen(3))
    return unet


@pytest.mark.parametrize("name, mode", [("lcm", "global_cond"), ("ddim", "noise"), ("ddpm", "global_pred")])
def test_batched_equals_sequential_tiny_unet(sched, unet, name, mode):
    """One 2B/3B call per step gives the same latents as separate B calls, up to float32 rounding.

    Every UNet layer is per-sample (GroupNorm, convolutions, attention), so the only difference is
    the rounding of batch-size-dependent kernels. Measured on CPU (torch 2.14, oneDNN): batch 1 vs
    batch >= 2 differ by <= 3.6e-7 in ε̂ (|ε̂| <= 0.6, a few ulp); batches 2 vs 3 are bit-identical.
    The sampler steps are linear in ε̂, and LEG (α = 3) and 1/√ᾱ amplify values and errors alike, so
    the latents agree to <= 3.5e-7 of their largest magnitude; an absolute tolerance would not do
    (unclipped latents reach ~500 in ``noise`` mode: 6e-5 absolute). Hence 1e-6·max|z| (~8 ulp).
    B = 1 is used because it exercises the differing kernels; clipping is off so that no difference
    can hide behind a saturated x̂0.
    """
    cg, cl = conds((1, 4, 8, 8))
    scfg = SamplerConfig(name=name, steps=3, eta=1.0, clip=False)
    gcfg = GlobalLocalConfig(leg_mode=mode)
    a = dual_path_sample(unet, sched, cg, cl, scfg, gcfg, "clean", gen(5), gen(6))
    b = dual_path_sample(unet, sched, cg, cl, scfg, gcfg, "clean", gen(5), gen(6), batched=False)
    for x, y in zip(a, b):
        scale = y.abs().max().item()
        assert scale > 0.1
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6 * scale)
    assert not torch.allclose(a[0], a[1])
