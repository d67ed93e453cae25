"""HybridLoss (VQGAN stage) and MS-SSIM.

No test downloads anything: LPIPS is a stub or ``lpips.LPIPS(pnet_rand=True)`` (random VGG trunk,
packaged linear heads) with downloads patched to fail.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import build_hybrid_loss
from models.discriminator import PatchDiscriminator
from models.losses import HybridLoss, build_perceptual_net, lpips_distance
from models.msssim import MSSSIM, gaussian_window, guess_data_range, ssim_components
from models.vqgan import VQGAN
from utils.config import VQLossConfig
from utils.hub import VGG16_FILE


class StubPerceptual(nn.Module):
    """Tiny LPIPS stand-in: squared distance of fixed random 3->4 channel features, (B, 1, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return (self.conv(x) - self.conv(y)).pow(2).mean((1, 2, 3), keepdim=True)


def tiny_disc() -> PatchDiscriminator:
    return PatchDiscriminator(in_channels=1, num_layers=2, num_channels=4)


def count_calls(module: nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def make_loss(**overrides) -> HybridLoss:
    kwargs = dict(recon="mse", perceptual_weight=0.001, adversarial_weight=0.01, adversarial_start=0,
                  msssim_weight=1.0, discriminator=tiny_disc(), perceptual_net=StubPerceptual())
    kwargs.update(overrides)
    return HybridLoss(**kwargs)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    x_rec = (x + 0.2 * torch.randn(x.shape, generator=g)).requires_grad_()
    return x, x_rec


@pytest.fixture(scope="module")
def lpips_random() -> nn.Module:
    """Real lpips VGG LPIPS with a random trunk; any download attempt fails the test."""
    lpips = pytest.importorskip("lpips")
    mp = pytest.MonkeyPatch()

    def no_download(*args, **kwargs):
        raise AssertionError(f"download attempted: {args}")

    mp.setattr(torch.hub, "download_url_to_file", no_download)
    mp.setattr(torch.hub, "load_state_dict_from_url", no_download)
    try:
        net = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    finally:
        mp.undo()
    return net


# --------------------------------------------------------------------------------------------------
# Generator loss
# --------------------------------------------------------------------------------------------------

def test_generator_loss_is_the_weighted_sum(batch):
    x, x_rec = batch
    hybrid = make_loss()
    commit = torch.tensor(0.05)
    loss, logs = hybrid.generator_loss(x, x_rec, commit, step=0)
    assert set(logs) == {"rec", "commit", "perc", "msssim", "adv_g", "loss_g"}
    assert all(isinstance(v, float) for v in logs.values())
    assert logs["rec"] == pytest.approx(F.mse_loss(x_rec, x).item())
    expected = (logs["rec"] + logs["commit"] + 0.001 * logs["perc"] + 0.01 * logs["adv_g"]
                + 1.0 * (1 - logs["msssim"]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logs["loss_g"] == pytest.approx(loss.item())
    assert hybrid.perceptual_net.calls == [(2, 3, 32, 32)]     # 1 channel expanded to 3
    loss.backward()
    assert torch.isfinite(x_rec.grad).all()


def test_l1_reconstruction(batch):
    x, x_rec = batch
    _, logs = make_loss(recon="l1").generator_loss(x, x_rec, torch.tensor(0.0), step=0)
    assert logs["rec"] == pytest.approx(F.l1_loss(x_rec, x).item())


def test_zero_weight_terms_are_neither_built_nor_computed(batch, monkeypatch, tmp_path):
    # An empty hub cache: building LPIPS-VGG would raise, so not raising proves it was not built.
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    x, x_rec = batch
    hybrid = HybridLoss(recon="mse", perceptual_weight=0.0, adversarial_weight=0.0, msssim_weight=0.0)
    assert hybrid.perceptual_net is None and hybrid.msssim is None and hybrid.discriminator is None
    loss, logs = hybrid.generator_loss(x, x_rec, torch.tensor(0.1), step=10)
    assert set(logs) == {"rec", "commit", "loss_g"}
    assert loss.item() == pytest.approx(logs["rec"] + 0.1)
    loss_d, logs_d = hybrid.discriminator_loss(x, x_rec, step=10)
    assert loss_d.item() == 0.0 and not loss_d.requires_grad and logs_d["loss_d"] == 0.0


def test_adversarial_warmup(batch):
    x, x_rec = batch
    d = tiny_disc()
    calls = count_calls(d)
    hybrid = make_loss(discriminator=d, adversarial_start=5)
    assert not hybrid.adversarial_active(4) and hybrid.adversarial_active(5)

    _, logs = hybrid.generator_loss(x, x_rec, torch.tensor(0.0), step=4)
    loss_d, logs_d = hybrid.discriminator_loss(x, x_rec, step=4)
    assert logs["adv_g"] == 0.0 and calls == []                   # D never ran
    assert loss_d.item() == 0.0 and not loss_d.requires_grad
    assert logs_d == {"loss_d": 0.0, "d_real": 0.0, "d_fake": 0.0}

    _, logs = hybrid.generator_loss(x, x_rec, torch.tensor(0.0), step=5)
    loss_d, logs_d = hybrid.discriminator_loss(x, x_rec, step=5)
    assert logs["adv_g"] > 0 and loss_d.requires_grad and len(calls) == 3   # G: fake; D: fake, real


def test_adversarial_terms_values(batch):
    x, x_rec = batch
    d = tiny_disc()
    hybrid = make_loss(discriminator=d, perceptual_weight=0.0, msssim_weight=0.0, adversarial_weight=0.5)
    _, logs = hybrid.generator_loss(x, x_rec, torch.tensor(0.0), step=0)
    loss_d, logs_d = hybrid.discriminator_loss(x, x_rec, step=0)
    with torch.no_grad():                       # train-mode BN: same batch -> same logits
        fake, real = d(x_rec), d(x)
    assert logs["adv_g"] == pytest.approx(((fake - 1) ** 2).mean().item(), rel=1e-5)
    expected_d = 0.5 * 0.5 * ((fake ** 2).mean() + ((real - 1) ** 2).mean())
    assert loss_d.item() == pytest.approx(expected_d.item(), rel=1e-5)
    assert logs_d["d_real"] == pytest.approx(real.mean().item(), rel=1e-5)
    assert logs_d["d_fake"] == pytest.approx(fake.mean().item(), rel=1e-5)


def test_gradient_paths_of_g_and_d_are_separate():
    """G loss: gradients reach the generator but never D's .grad; D loss: the reverse."""
    g = torch.Generator().manual_seed(0)
    vqgan = VQGAN(channels=(4, 8), num_res_channels=4, num_res_layers=1, num_embeddings=8)
    d = tiny_disc()
    hybrid = make_loss(discriminator=d, perceptual_weight=0.0, msssim_weight=0.0)
    x = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    x_rec, commit, _ = vqgan(x)

    loss_g, _ = hybrid.generator_loss(x, x_rec, commit, step=0)
    loss_g.backward(retain_graph=True)
    assert all(p.grad is None for p in d.parameters())
    assert vqgan.decoder.blocks[0].weight.grad.abs().sum() > 0
    vqgan.zero_grad(set_to_none=True)

    loss_d, _ = hybrid.discriminator_loss(x, x_rec, step=0)
    loss_d.backward()
    assert all(p.grad is None for p in vqgan.parameters())
    assert all(p.grad is not None for p in d.parameters())


def test_adversarial_term_changes_generator_gradient(batch):
    x, x_rec = batch
    grads = []
    for weight in (0.0, 1.0):
        x_rec.grad = None
        hybrid = make_loss(adversarial_weight=weight, perceptual_weight=0.0, msssim_weight=0.0)
        hybrid.generator_loss(x, x_rec, torch.tensor(0.0), step=0)[0].backward()
        grads.append(x_rec.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_loss(recon="l2")
    with pytest.raises(ValueError):
        make_loss(msssim_weight=-1.0)
    with pytest.raises(ValueError):
        make_loss(adversarial_start=-1)
    with pytest.raises(ValueError, match="discriminator"):
        make_loss(discriminator=None)


def test_builder_from_config(batch):
    x, x_rec = batch
    hybrid = build_hybrid_loss(VQLossConfig(recon="l1", adversarial_start=3), discriminator=tiny_disc(),
                               perceptual_net=StubPerceptual())
    assert hybrid.recon == "l1" and hybrid.adversarial_start == 3 and hybrid.msssim.data_range == 2.0
    loss, _ = hybrid.generator_loss(x, x_rec, torch.tensor(0.0), step=0)
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------------------
# Perceptual network
# --------------------------------------------------------------------------------------------------

def test_perceptual_net_is_frozen_and_stays_in_eval(batch, lpips_random):
    hybrid = make_loss(perceptual_net=lpips_random)
    hybrid.train()
    assert not hybrid.perceptual_net.training
    assert all(not p.requires_grad for p in hybrid.perceptual_net.parameters())
    assert hybrid.discriminator.training
    x, x_rec = batch
    loss, logs = hybrid.generator_loss(x, x_rec, torch.tensor(0.0), step=0)
    loss.backward()
    assert logs["perc"] > 0 and torch.isfinite(x_rec.grad).all()
    assert all(p.grad is None for p in lpips_random.parameters())


def test_lpips_one_channel_expansion_equals_lpips_broadcast(batch, lpips_random):
    x, x_rec = batch
    with torch.no_grad():
        ours = lpips_distance(lpips_random, x_rec, x)
        native = lpips_random(x_rec, x).mean()          # lpips' scaling layer broadcasts 1 -> 3
    torch.testing.assert_close(ours, native)


def test_missing_vgg_weights_error_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        HybridLoss(perceptual_weight=0.001, adversarial_weight=0.0, msssim_weight=0.0)
    assert VGG16_FILE in str(err.value) and str(tmp_path / "hub" / "checkpoints") in str(err.value)


def test_perceptual_net_built_from_cache_when_present(monkeypatch, tmp_path):
    lpips = pytest.importorskip("lpips")
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / VGG16_FILE).touch()
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    seen = {}

    def fake_lpips(**kwargs):
        seen.update(kwargs)
        return StubPerceptual()

    monkeypatch.setattr(lpips, "LPIPS", fake_lpips)
    net = build_perceptual_net()
    assert isinstance(net, StubPerceptual)
    assert seen["net"] == "vgg" and seen["version"] == "0.1" and not seen.get("pnet_rand", False)


# --------------------------------------------------------------------------------------------------
# MS-SSIM
# --------------------------------------------------------------------------------------------------

def smooth_image(size: int, seed: int = 0) -> torch.Tensor:
    """A smooth random image in [-1, 1], (1, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 1, size // 8, size // 8, generator=g)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1


def test_msssim_identity_and_monotone_in_noise():
    ms = MSSSIM(data_range=2.0)
    x = smooth_image(176)                        # smallest size with full 11 px windows at 5 scales
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    assert ms(x, x).item() == pytest.approx(1.0, abs=1e-6)
    values = [ms(x + s * noise, x).item() for s in (0.05, 0.2, 0.5)]
    assert 1.0 > values[0] > values[1] > values[2] >= 0.0


def test_msssim_single_scale_matches_hand_computation():
    """An 11 x 11 image pair gives one valid window position: SSIM from explicit weighted sums.

    y is a noisy copy of x, so the covariance is not a float32 cancellation residue."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 1, 11, 11, generator=g)
    y = (x + 0.2 * torch.rand(1, 1, 11, 11, generator=g)).clamp(0, 1)
    w = gaussian_window(11, 1.5).double()
    a, b = x[0, 0].double(), y[0, 0].double()
    mu_a, mu_b = (w * a).sum(), (w * b).sum()
    var_a = (w * a * a).sum() - mu_a ** 2
    var_b = (w * b * b).sum() - mu_b ** 2
    cov = (w * a * b).sum() - mu_a * mu_b
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2
    expected = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    single = MSSSIM(data_range=1.0, weights=(1.0,))
    assert 0.5 < expected.item() < 1.0
    assert single(x, y).item() == pytest.approx(expected.item(), rel=1e-5)
    # 1-D Gaussian of the window: centred, sigma 1.5, normalised
    assert w.sum().item() == pytest.approx(1.0) and w[5, 5] == w.max()


def test_single_scale_ssim_matches_scikit_image():
    """skimage with Gaussian weights (sigma 1.5, 11 taps) and population covariance crops the padded
    border, i.e. it averages over the same valid positions."""
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    x, y = smooth_image(48, seed=3), smooth_image(48, seed=4)
    ssim_map, _ = ssim_components(x.double(), y.double(), gaussian_window(11).double(), 2.0)
    ref = structural_similarity(x[0, 0].double().numpy(), y[0, 0].double().numpy(), data_range=2.0,
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim_map.mean().item() == pytest.approx(ref, rel=1e-4)


def test_msssim_combines_scales_as_specified():
    x, y = smooth_image(64, seed=5), smooth_image(64, seed=6)
    weights = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    ssims, css = [], []
    a, b = x, y
    for s in range(5):
        if s:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        k = min(11, a.shape[-1])                                  # window shrinks below 11 px
        sm, cm = ssim_components(a, b, gaussian_window(k), 2.0)
        ssims.append(F.relu(sm.mean()))
        css.append(F.relu(cm.mean()))
    expected = torch.prod(torch.stack([c ** w for c, w in zip(css[:4], weights[:4])])) * ssims[4] ** weights[4]
    torch.testing.assert_close(MSSSIM(data_range=2.0)(x, y), expected)


def test_msssim_data_range_guess_and_fixed():
    assert guess_data_range(torch.tensor([-0.9, 0.7])) == 2.0
    assert guess_data_range(torch.tensor([-0.4, 0.7])) == 1.0
    assert guess_data_range(torch.tensor([0.0, 200.0])) == 255.0
    assert guess_data_range(torch.tensor([-1.0, 200.0])) == 256.0
    x, y = smooth_image(32, seed=7), smooth_image(32, seed=8)
    assert x.min() < -0.5
    torch.testing.assert_close(MSSSIM(data_range=None)(x, y), MSSSIM(data_range=2.0)(x, y))
    x01, y01 = (x + 1) / 2, (y + 1) / 2                     # [0, 1]: the guess switches to L = 1
    torch.testing.assert_close(MSSSIM(data_range=None)(x01, y01), MSSSIM(data_range=1.0)(x01, y01))


def test_msssim_differentiable_and_per_image():
    x = smooth_image(32, seed=9)
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).requires_grad_()
    (1 - MSSSIM()(y, x)).backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    both = torch.cat([x, y.detach()])
    per_image = MSSSIM(reduction="none")(both, torch.cat([x, x]))
    assert per_image.shape == (2,) and per_image[0].item() == pytest.approx(1.0, abs=1e-6)
    assert per_image[1].item() == pytest.approx(MSSSIM()(y.detach(), x).item(), rel=1e-6)


def test_msssim_rejects_too_small_or_mismatched_inputs():
    with pytest.raises(ValueError, match="16 px"):
        MSSSIM()(torch.zeros(1, 1, 8, 32), torch.zeros(1, 1, 8, 32))
    with pytest.raises(ValueError):
        MSSSIM()(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 16))
    with pytest.raises(ValueError):
        MSSSIM(data_range=0.0)


def test_ddp_wrapped_discriminator(tmp_path):
    """With D wrapped in DDP the G pass bypasses the wrapper (no grads to reduce) and the D pass
    goes through it; two iterations show DDP's reducer is left in a consistent state."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        d = DistributedDataParallel(tiny_disc())
        hybrid = make_loss(discriminator=d, perceptual_weight=0.0, msssim_weight=0.0)
        g = torch.Generator().manual_seed(0)
        for step in range(2):
            x = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
            x_rec = (x + 0.1).requires_grad_()
            d.zero_grad(set_to_none=True)
            loss_g, _ = hybrid.generator_loss(x, x_rec, torch.tensor(0.0), step)
            loss_g.backward()
            assert all(p.grad is None for p in d.parameters()) and x_rec.grad is not None
            loss_d, _ = hybrid.discriminator_loss(x, x_rec, step)
            loss_d.backward()
            assert all(p.grad is not None for p in d.parameters())
    finally:
        dist.destroy_process_group()
