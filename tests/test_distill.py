"""Latent consistency distillation (docs/method.md §4.5): the skipping-step grid, the boundary condition of
the consistency function, the DDIM solver step, the distances, the EMA target, how the loss builds
its inputs (noise, condition mode, guidance), and convergence on an exactly solvable problem.

The exactly solvable problem: latents z0 ~ N(μ, diag(s²)). For z_t = a·z0 + σ·ε (a = √ᾱ_t,
σ² = 1 − ᾱ_t) the posterior mean is

    E[z0 | z_t] = μ + g_t·(z_t − a·μ),   g_t = a·s² / (a²·s² + σ²),

so the *exact* ε-teacher is ε̂ = (z_t − a·E[z0 | z_t]) / σ. Every DDIM step with this teacher is an
elementwise affine map, hence so is the teacher's N-step DDIM solution and the ideal consistency
function f*(z, t_n) = A_n·z + B_n on the grid (the composition of the DDIM steps t_n → … → t_1 → 0,
which is exactly the fixed point of the LCD iteration). The continuous PF-ODE is analytic too:
(z_t/a_t − μ)/√(s² + σ̄_t²), σ̄ = σ/a, is constant along it.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from models.distill import (ddim_grid, consistency_distillation_loss, consistency_output, ddim_solver_step,
                            distance)
from models.samplers import consistency_scalings, ddim_step, sample, timesteps_lcm
from models.schedule import NoiseSchedule, model_input_train, offset_noise
from tests.conftest import gen, tiny_unet
from utils.config import DiffusionConfig, DistillConfig
from utils.ema import EMA

SHAPE = (4, 2, 2)          # one toy "latent": 16 independent Gaussian dimensions


# --------------------------------------------------------------------------------------------------
# Gaussian toy: exact teacher, affine consistency student
# --------------------------------------------------------------------------------------------------

def gaussian_params(dtype=torch.float64):
    g = gen(1)
    mu = (torch.rand(SHAPE, generator=g, dtype=torch.float64) - 0.5) * 2        # means in [−1, 1]
    s = 0.3 + 0.7 * torch.rand(SHAPE, generator=g, dtype=torch.float64)         # stds in [0.3, 1]
    return mu.to(dtype), s.to(dtype)


def posterior_gain(schedule: NoiseSchedule, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """g_t = a·s² / (a²·s² + 1 − a²) for every t (shape (len(t), *SHAPE)), float64."""
    a = schedule.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    s = s.double()
    return a * s ** 2 / (a ** 2 * s ** 2 + 1 - a ** 2)


class GaussianTeacher(torch.nn.Module):
    """Exact ε-prediction for z0 ~ N(μ, s²); reads channels 0-3 of the input, ignores the condition."""

    def __init__(self, schedule: NoiseSchedule, mu: torch.Tensor, s: torch.Tensor):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = x[:, :4]
        a = self.schedule.sqrt_alpha_bar(t, z)
        mu, s = self.mu.to(z), self.s.to(z)
        x0 = mu + a * s ** 2 / (a ** 2 * s ** 2 + 1 - a ** 2) * (z - a * mu)
        return self.schedule.predict_eps(z, x0, t)


class AffineStudent(torch.nn.Module):
    """x̂0 = A[n]·z + B[n] with one (A, B) per grid level n (level 0 is t = 0, level n is t = n·k − 1),
    returned as ε̂. Enough capacity to represent the exact consistency function of the Gaussian."""

    def __init__(self, schedule: NoiseSchedule, A: torch.Tensor, B: torch.Tensor, k: int = 20):
        super().__init__()
        self.schedule, self.k = schedule, k
        self.A, self.B = torch.nn.Parameter(A.clone()), torch.nn.Parameter(B.clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = x[:, :4]
        n = (t + 1) // self.k
        return self.schedule.predict_eps(z, self.A[n] * z + self.B[n], t)


def level_timesteps(N: int = 50) -> torch.Tensor:
    """t of grid levels 0..N: 0, 19, 39, …, 999."""
    return torch.cat([torch.zeros(1, dtype=torch.long), ddim_grid(1000, N)])


def teacher_init_student(schedule, mu, s, dtype) -> AffineStudent:
    """The student as LCD initialises it: a copy of the teacher (x̂0 = E[z0 | z_t])."""
    g = posterior_gain(schedule, level_timesteps(), s)
    a = schedule.sqrt_alphas_cumprod[level_timesteps()].reshape(-1, 1, 1, 1)
    return AffineStudent(schedule, g.to(dtype), (mu.double() * (1 - g * a)).to(dtype))


def exact_consistency(schedule, mu, s):
    """f*(z, t_n) = A_n·z + B_n, composing the exact teacher's DDIM steps t_n → t_{n−1} → … → 0 (float64)."""
    ts = level_timesteps()
    A, B = [torch.ones(SHAPE, dtype=torch.float64)], [torch.zeros(SHAPE, dtype=torch.float64)]
    mu = mu.double()
    for n in range(1, len(ts)):
        t, tp = int(ts[n]), int(ts[n - 1])
        a, sig = math.sqrt(schedule.alpha_cumprod(t)), math.sqrt(1 - schedule.alpha_cumprod(t))
        ap, sigp = math.sqrt(schedule.alpha_cumprod(tp)), math.sqrt(1 - schedule.alpha_cumprod(tp))
        g = posterior_gain(schedule, torch.tensor([t]), s)[0]
        # x̂0 = g·z + μ(1 − g·a);  z' = a'·x̂0 + σ'·(z − a·x̂0)/σ = c·x̂0 + (σ'/σ)·z,
        # with c = a' − σ'·a/σ
        c = ap - sigp * a / sig
        alpha, beta = c * g + sigp / sig, c * mu * (1 - g * a)
        A.append(A[-1] * alpha)
        B.append(A[-2] * beta + B[-1])
    return torch.stack(A), torch.stack(B)


def exact_student(schedule, mu, s, dtype) -> AffineStudent:
    """The student whose f_θ equals f* on the whole grid: x̂0 = (f* − c_skip·z)/c_out (x̂0 = z at t = 0)."""
    A, B = exact_consistency(schedule, mu, s)
    c_skip, c_out = consistency_scalings(level_timesteps().double())
    c_skip, c_out = c_skip.reshape(-1, 1, 1, 1), c_out.reshape(-1, 1, 1, 1)
    A_x0, B_x0 = (A - c_skip) / c_out.clamp(min=1e-300), B / c_out.clamp(min=1e-300)
    A_x0[0], B_x0[0] = 1.0, 0.0          # c_out(0) = 0: x̂0 is irrelevant at the boundary
    return AffineStudent(schedule, A_x0.to(dtype), B_x0.to(dtype))


def teacher_ddim_solution(teacher, schedule, z_T: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """DDIM (η = 0) with models.samplers.ddim_step along ``timesteps`` (descending, ending at 0)."""
    x = z_T
    for t, tp in zip(timesteps[:-1], timesteps[1:]):
        eps = teacher(torch.cat([x, x], 1), torch.tensor(t))
        x = ddim_step(schedule, eps, t, tp, x).prev_sample
    return x


def rel_err(x: torch.Tensor, ref: torch.Tensor, mu: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref − μ‖: the error relative to the spread of the reference around the data mean."""
    return float((x - ref).norm() / (ref - mu.to(ref)).norm())


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------

def test_ddim_grid():
    grid = ddim_grid(1000, 50)
    assert grid.dtype == torch.long and len(grid) == 50
    assert grid.tolist() == list(range(19, 1000, 20))
    assert grid.flip(0).tolist() == timesteps_lcm(50)
    assert ddim_grid(1000, 1000).tolist() == list(range(1000))
    assert ddim_grid(1000, 1).tolist() == [999]
    assert ddim_grid(1000, 3).tolist() == [332, 665, 998]          # k = T // N, as diffusers
    for bad in (0, 1001, True, 2.5):
        with pytest.raises(ValueError):
            ddim_grid(1000, bad)


def test_consistency_output_boundary_and_formula(sched):
    x, eps = torch.randn(3, *SHAPE, generator=gen(0)), torch.randn(3, *SHAPE, generator=gen(1))
    assert torch.equal(consistency_output(eps, x, 0, sched), x)                  # f(x, 0) = x exactly
    t = torch.tensor([0, 19, 999])
    f = consistency_output(eps, x, t, sched)
    assert torch.equal(f[0], x[0])
    x0 = sched.predict_x0(x, eps, t)
    c_skip, c_out = consistency_scalings(19.0)
    torch.testing.assert_close(f[1], c_skip * x[1] + c_out * x0[1])
    torch.testing.assert_close(f[2], x0[2], rtol=1e-6, atol=1e-6)                # c_skip(999) = 2.5e-9
    assert (f[1] - x0[1]).abs().max() < 1e-4                                     # c_skip(19) = 6.9e-6


def test_ddim_solver_step_matches_sampler(sched):
    x, eps = torch.randn(2, *SHAPE, generator=gen(0)), torch.randn(2, *SHAPE, generator=gen(1))
    for t, tp in [(999, 979), (19, 0), (519, 499)]:
        x0 = sched.predict_x0(x, eps, t)
        expected = ddim_step(sched, eps, t, tp, x).prev_sample
        torch.testing.assert_close(ddim_solver_step(x0, eps, torch.tensor([tp, tp]), sched), expected)


def test_distances():
    pred, target = torch.tensor([0.0, 1.0, -2.0, 1e-5]), torch.zeros(4)
    assert distance(pred, target, "l2").item() == pytest.approx((1 + 4 + 1e-10) / 4)
    c = 0.001
    expected = sum(math.sqrt(d * d + c * c) - c for d in (0.0, 1.0, 2.0, 1e-5)) / 4
    assert distance(pred, target, "huber", c).item() == pytest.approx(expected, rel=1e-5)
    assert distance(target, target, "huber").item() == 0.0
    # |d| ≪ c (≈ d²/(2c)): fp32 must not lose the value to the cancellation in √(d² + c²) − c.
    small = torch.tensor([1e-5])
    exact = math.sqrt(1e-10 + c * c) - c                                         # float64: 4.99988e-8
    assert distance(small, torch.zeros(1), "huber", c).item() == pytest.approx(exact, rel=1e-5)
    with pytest.raises(ValueError):
        distance(pred, target, "l1")


def test_target_network_is_ema_of_student():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(student, 0.95)
    target = ema.shadow
    assert not any(p.requires_grad for p in target.parameters()) and not target.training
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(3.0)
    old = [p.clone() for p in target.parameters()]
    ema.update(student)
    for p_t, p_old, p_s in zip(target.parameters(), old, student.parameters()):
        torch.testing.assert_close(p_t, 0.95 * p_old + 0.05 * p_s)
    assert torch.equal(target[1].running_mean, student[1].running_mean)          # buffers copied
    copy_ema = EMA(student, 0.0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    copy_ema.update(student)
    assert all(torch.equal(a, b) for a, b in zip(copy_ema.shadow.parameters(), student.parameters()))


# --------------------------------------------------------------------------------------------------
# How the loss builds its inputs
# --------------------------------------------------------------------------------------------------

class Recorder(torch.nn.Module):
    """Records (input, t) of every call and returns a fixed ε̂ = 0.1·x_t (8 channels)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        return 0.1 * torch.cat([x[:, :4], x[:, :4]], 1)


@pytest.mark.parametrize("cond_mode,guidance", [("clean", 0.0), ("bug_compatible", 0.0), ("bug_compatible", 2.0)])
def test_loss_inputs_noise_condition_guidance(sched, cond_mode, guidance):
    b = 6
    z0, cond = torch.randn(b, *SHAPE, generator=gen(3)), torch.randn(b, *SHAPE, generator=gen(4))
    student, target, teacher = Recorder(), Recorder(), Recorder()
    dcfg = DistillConfig(guidance_scale=guidance, loss="l2")
    fcfg = DiffusionConfig(offset_noise=0.1, cond_mode=cond_mode)
    loss, logs = consistency_distillation_loss(student, target, teacher, sched, z0, cond, dcfg, fcfg, gen(7))
    assert set(logs) == {"loss", "mse", "t_mean"} and all(isinstance(v, float) for v in logs.values())
    assert logs["loss"] == pytest.approx(logs["mse"])

    # Replay the draws: grid index first, then offset noise (ε, then δ), from the same generator.
    g = gen(7)
    t_start = ddim_grid(1000, 50)[torch.randint(0, 50, (b,), generator=g)]
    z_start = sched.add_noise(z0, offset_noise(z0.shape, 0.1, g), t_start)
    (x_s, t_s), = student.calls
    assert torch.equal(t_s, t_start) and logs["t_mean"] == pytest.approx(t_start.float().mean().item())
    torch.testing.assert_close(x_s, model_input_train(z_start, cond, t_start, sched, cond_mode))
    if cond_mode == "bug_compatible":                    # the condition as the teacher saw it in training
        torch.testing.assert_close(x_s[:, 4:], sched.sqrt_alpha_bar(t_start, cond) * cond)
    else:
        assert torch.equal(x_s[:, 4:], cond)

    assert len(teacher.calls) == (2 if guidance > 0 else 1)
    torch.testing.assert_close(teacher.calls[0][0], x_s)
    if guidance > 0:                                     # unconditional branch: zeroed condition channels
        assert torch.equal(teacher.calls[1][0][:, :4], x_s[:, :4]) and not teacher.calls[1][0][:, 4:].any()

    # Target at t_prev = max(t_start − 20, 0) on the teacher's DDIM step (ε̂ = 0.1·z for both branches,
    # so the guided ε̂ equals the conditional one here).
    (x_t, t_t), = target.calls
    t_prev = (t_start - 20).clamp(min=0)
    assert torch.equal(t_t, t_prev)
    eps = 0.1 * z_start
    z_prev = ddim_solver_step(sched.predict_x0(z_start, eps, t_start), eps, t_prev, sched)
    torch.testing.assert_close(x_t, model_input_train(z_prev, cond, t_prev, sched, cond_mode))


def test_loss_is_zero_at_the_exact_consistency_function(sched):
    """With an exact teacher, f* (the composed DDIM steps) is a fixed point: pred = target exactly."""
    mu, s = gaussian_params()
    teacher = GaussianTeacher(sched, mu, s)
    exact = exact_student(sched, mu, s, torch.float64)
    z0 = mu + s * torch.randn(64, *SHAPE, generator=gen(5), dtype=torch.float64)
    fcfg = DiffusionConfig(offset_noise=0.0)
    for loss_type in ("l2", "huber"):
        loss, logs = consistency_distillation_loss(exact, exact, teacher, sched, z0, torch.zeros_like(z0),
                                                   DistillConfig(loss=loss_type), fcfg, gen(6))
        assert logs["mse"] < 1e-20 and loss.item() < 1e-12
    naive = teacher_init_student(sched, mu, s, torch.float64)
    _, logs = consistency_distillation_loss(naive, naive, teacher, sched, z0, torch.zeros_like(z0),
                                            DistillConfig(loss="l2"), fcfg, gen(6))
    assert logs["mse"] > 1e-6


# --------------------------------------------------------------------------------------------------
# Convergence on the Gaussian (the key test)
# --------------------------------------------------------------------------------------------------

def test_lcd_student_converges_to_teacher_ode_solution(sched):
    """LCD with the default config (N = 50, pseudo-Huber c = 0.001, EMA μ = 0.95) from a teacher
    initialisation: one LCM step of the student must reproduce the teacher's 50-step DDIM solution.

    Why 1200 steps: the boundary condition at t = 0 has to travel up through the N = 50 grid levels,
    and each level's target lags its student by the EMA time constant 1/(1 − μ) = 20 steps, so level
    50 cannot be right before ≈ N/(1 − μ) = 1000 steps (measured: rel. error 0.94 → 0.55 at 450 steps,
    0.07 at 900, 0.003 at 1200). Threshold 0.02: the fixed point is exactly representable, so the
    remaining error is optimisation noise (measured ≈ 0.003); 0.02 is still well below the 3.4%
    discretisation gap between 50-step DDIM and the continuous PF-ODE, i.e. the student is shown to
    have learned the teacher's solver, not merely something ODE-like.
    """
    mu, s = gaussian_params()
    teacher = GaussianTeacher(sched, mu, s)
    mu32, s32 = mu.float(), s.float()
    student = teacher_init_student(sched, mu, s, torch.float32)
    ema = EMA(student, DistillConfig().target_ema)
    target = ema.shadow
    dcfg, fcfg = DistillConfig(), DiffusionConfig(offset_noise=0.0)
    assert dcfg.loss == "huber" and dcfg.target_ema == 0.95 and dcfg.num_ddim_timesteps == 50

    # References from z_T (float64): the teacher's 50-step DDIM on the grid down to t = 0 (the LCD fixed
    # point), its closed form f*(·, 999), and the analytic PF-ODE.
    z_T = torch.randn(256, *SHAPE, generator=gen(8), dtype=torch.float64)
    ddim50 = teacher_ddim_solution(teacher, sched, z_T, timesteps_lcm(50) + [0])
    A, B = exact_consistency(sched, mu, s)
    torch.testing.assert_close(A[-1] * z_T + B[-1], ddim50, rtol=1e-9, atol=1e-9)
    sbar = lambda t: math.sqrt((1 - sched.alpha_cumprod(t)) / sched.alpha_cumprod(t))  # noqa: E731
    # x̄ = z/a goes from z_T/a_999 to x̄_0 along the ODE; the solver ends at z_0 = a_0·x̄_0 (t = 0, not ᾱ = 1).
    xbar_0 = mu + (z_T / sched.sqrt_alphas_cumprod[999] - mu) * (s ** 2 + sbar(0) ** 2).sqrt() \
        / (s ** 2 + sbar(999) ** 2).sqrt()
    ode = sched.sqrt_alphas_cumprod[0] * xbar_0
    ddim_vs_ode = rel_err(ddim50, ode, mu)
    # DDIM is a first-order solver: 3.3% off the exact ODE with 50 steps, ≈ 50/999 of that with 999 steps
    # (0.18%), which also validates the analytic teacher.
    assert 0.02 < ddim_vs_ode < 0.05
    assert rel_err(teacher_ddim_solution(teacher, sched, z_T, list(range(999, -1, -1))), ode, mu) < 0.003

    def one_step(model) -> torch.Tensor:
        with torch.no_grad():
            out = sample(lambda x, t: model(torch.cat([x, x], 1), t), sched, tuple(z_T.shape), "lcm", 1,
                         x_T=z_T.float())
        return out.double()

    before = rel_err(one_step(student), ddim50, mu)
    steps = 1200
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    g = gen(9)
    for _ in range(steps):
        z0 = mu32 + s32 * torch.randn(256, *SHAPE, generator=g)
        loss, logs = consistency_distillation_loss(student, target, teacher, sched, z0, torch.zeros_like(z0),
                                                   dcfg, fcfg, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_sched.step()
        ema.update(student)
    after = rel_err(one_step(student), ddim50, mu)
    after_target = rel_err(one_step(target), ddim50, mu)
    print(f"1-step rel. error vs 50-step DDIM: before {before:.4f}, after {after:.5f} (target {after_target:.5f});"
          f" 50-step DDIM vs PF-ODE {ddim_vs_ode:.4f}; last loss {logs['loss']:.2e}")
    assert before > 0.5                                # the teacher's 1-step x̂0 is nearly the data mean
    assert after < 0.02 and after_target < 0.02
    assert after < before / 25


# --------------------------------------------------------------------------------------------------
# Two steps with the tiny UNet
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cond_mode,loss_type,guidance", [("clean", "huber", 0.0), ("bug_compatible", "l2", 1.5)])
def test_two_step_unet_distillation(sched, cond_mode, loss_type, guidance):
    torch.manual_seed(0)
    teacher = tiny_unet(out_channels=4)
    with torch.no_grad():                 # undo the zero init so that the teacher's ε̂ is not identically 0
        for p in teacher.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    teacher.eval().requires_grad_(False)
    teacher_before = copy.deepcopy(teacher.state_dict())
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = EMA(student, DistillConfig().target_ema)
    target = ema.shadow
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    dcfg = DistillConfig(loss=loss_type, guidance_scale=guidance)
    fcfg = DiffusionConfig(offset_noise=0.1, cond_mode=cond_mode)
    z0, cond = torch.randn(2, 4, 8, 8, generator=gen(10)), torch.randn(2, 4, 8, 8, generator=gen(11))
    g = gen(12)
    for _ in range(2):
        target_before = [p.clone() for p in target.parameters()]
        loss, logs = consistency_distillation_loss(student, target, teacher, sched, z0, cond, dcfg, fcfg, g)
        assert torch.isfinite(loss) and math.isfinite(logs["mse"]) and loss.requires_grad
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in student.parameters()]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        assert sum(gr.abs().sum().item() for gr in grads) > 0
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is None for p in target.parameters())
        opt.step()
        ema.update(student)
        moved = False
        for p_t, p_old, p_s in zip(target.parameters(), target_before, student.parameters()):
            torch.testing.assert_close(p_t, 0.95 * p_old + 0.05 * p_s.detach())
            moved |= not torch.equal(p_t, p_old)
        assert moved
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
