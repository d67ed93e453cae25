"""models.pipeline: native-size output modes and the whole batch path on tiny random networks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models import build_unet, build_vqgan
from models.pipeline import BoneSuppressor, image_generators, upsample
from models.schedule import build_schedule
from tests.conftest import ROOT
from utils.config import load_config


@pytest.fixture
def suppressor():
    cfg = load_config([ROOT / "configs" / "demo.yaml", ROOT / "configs" / "smoke.yaml"])
    torch.manual_seed(0)
    vq = build_vqgan(cfg.vqgan).eval()
    unet = build_unet(cfg.unet, image_size=8).eval()
    for p in unet.out.parameters():          # undo the zero init so the prediction is not trivial
        torch.nn.init.normal_(p, std=0.1)
    return BoneSuppressor(unet, vq, build_schedule(cfg.diffusion), cfg, "clean")


def two_lungs(h, w):
    m = np.zeros((h, w), bool)
    m[h // 5: 4 * h // 5, w // 8: 3 * w // 8] = True
    m[h // 5: 4 * h // 5, 5 * w // 8: 7 * w // 8] = True
    return m


def test_native_residual_keeps_native_detail(suppressor):
    rng = np.random.default_rng(0)
    pixels = rng.random((70, 50)).astype(np.float32)          # detail finer than the 32² model size
    cxr_model = upsample(pixels, (32, 32))
    # no predicted bone: the output is the input, pixel for pixel
    np.testing.assert_array_equal(suppressor.to_native(pixels, cxr_model, cxr_model), pixels)
    # a constant bone layer c is subtracted everywhere (then clipped)
    out = suppressor.to_native(pixels, cxr_model, cxr_model - 0.1)
    np.testing.assert_allclose(out, np.clip(pixels - 0.1, 0, 1), atol=1e-6)
    suppressor.cfg.output.mode = "resize"
    assert np.abs(suppressor.to_native(pixels, cxr_model, cxr_model) - pixels).mean() > 0.05  # detail lost


def test_batch_path_sizes_and_batch_independence(suppressor):
    rng = np.random.default_rng(1)
    images = [rng.random((70, 50)).astype(np.float32), rng.random((40, 40)).astype(np.float32)]
    masks = [two_lungs(70, 50), two_lungs(40, 40)]
    both = suppressor(images, masks, ["a.png", "b.png"])
    assert [r.soft.shape for r in both] == [(70, 50), (40, 40)]
    assert both[0].global_img.shape == both[0].local_img.shape == both[0].fused.shape == (32, 32)
    alone = suppressor(images[1:], masks[1:], ["b.png"])
    np.testing.assert_allclose(alone[0].soft, both[1].soft, atol=2e-5)     # batch-independent up to fp rounding
    # fusion changes nothing outside the lungs: there the fused image is the global one
    outside = ~both[0].mask
    np.testing.assert_array_equal(both[0].fused[outside], np.clip(both[0].global_img, 0, 1)[outside])
    with pytest.raises(ValueError, match="needs a lung mask"):
        suppressor(images, [None, None], ["a.png", "b.png"])
    suppressor.cfg.global_local.enabled = False
    (g,) = suppressor(images[:1], [None], ["a.png"])
    assert g.local_img is None and g.soft.shape == (70, 50)
    assert set(suppressor.times) == {"encode", "sample", "decode", "fusion"}


def test_generators_depend_on_seed_and_name_only():
    a, b = image_generators(3, "x.png"), image_generators(3, "x.png")
    assert torch.equal(torch.randn(4, generator=a[0]), torch.randn(4, generator=b[0]))
    assert not torch.equal(torch.randn(4, generator=image_generators(3, "y.png")[0]),
                           torch.randn(4, generator=image_generators(3, "x.png")[0]))
    g, l = image_generators(3, "x.png")
    assert not torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=l))


def test_decoded_reference_cancels_the_autoencoder_error(suppressor, monkeypatch):
    """If sampling returned the CXR's own latent (nothing to suppress), the decoded reference gives
    back the input exactly, whereas the resized input as reference leaves the VQGAN's error in."""
    import models.pipeline as pipeline

    monkeypatch.setattr(pipeline, "dual_path_sample", lambda unet, sched, c_g, c_l, *a, **k: (c_g, c_g))
    rng = np.random.default_rng(2)
    pixels = rng.random((48, 40)).astype(np.float32)
    (res,) = suppressor([pixels], [two_lungs(48, 40)], ["a.png"])
    np.testing.assert_allclose(res.soft, pixels, atol=1e-6)
    suppressor.cfg.output.residual_reference = "input"
    (res,) = suppressor([pixels], [two_lungs(48, 40)], ["a.png"])
    assert np.abs(res.soft - pixels).mean() > 0.05


class _IdentityVQ(torch.nn.Module):
    """An 'autoencoder' that loses nothing: what first_stage_ceiling returns is then the output path alone."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def encode_stage_2_inputs(self, x):
        return x

    def decode(self, z):
        return z


@pytest.mark.parametrize("reference", ["decoded", "input"])
def test_first_stage_ceiling_is_the_output_path_of_the_true_latent(reference):
    from models.pipeline import first_stage_ceiling
    from utils.config import Config, DataConfig, OutputConfig

    rng = np.random.default_rng(1)
    soft = rng.uniform(0.1, 0.6, (32, 32)).astype(np.float32)         # fine detail of its own
    rr, cc = np.mgrid[:32, :32]
    bone = 0.3 * np.exp(-((rr - 16.0) ** 2 + (cc - 12.0) ** 2) / 60.0)   # a smooth 'bone'
    cxr = (soft + bone).astype(np.float32)
    cfg = Config(data=DataConfig(image_size=32, invert=False),
                 output=OutputConfig(mode="native_residual", residual_reference=reference))
    # at the native size a lossless first stage gives the target back exactly
    np.testing.assert_allclose(first_stage_ceiling(_IdentityVQ(), cfg, cxr, soft), soft, atol=1e-6)
    # at half the size the bone layer is measured at 16² and upsampled onto the native CXR: the
    # smooth bone is removed, the soft tissue's pixel-scale detail kept
    cfg.data.image_size = 16
    half = first_stage_ceiling(_IdentityVQ(), cfg, cxr, soft)
    assert half.shape == (32, 32)
    assert 0 < np.abs(half - soft).mean() < 0.25 * np.abs(cxr - soft).mean()


# ---- the local path over the lungs' box only (inference.local_crop) --------------------------------

def test_lung_box_on_the_latent_grid():
    from models.pipeline import lung_box, useful_box

    m = np.zeros((64, 64), bool)
    m[20:30, 9:40] = True
    assert lung_box(m, 4, 0) == (5, 8, 2, 10)             # rows 20..29 -> latent 5..7, cols 9..39 -> 2..9
    assert lung_box(m, 4, 2) == (3, 10, 0, 12)            # grown by 2 latent pixels, clipped at 0
    assert lung_box(np.zeros((64, 64), bool), 4, 2) is None
    assert useful_box((0, 16, 0, 15), 16) is None         # 94 % of the grid: not worth a call of its own
    assert useful_box((3, 10, 0, 12), 16) == (3, 10, 0, 12)


def test_local_crop_matches_the_whole_local_path_inside_the_lungs():
    cfg = load_config([ROOT / "configs" / "demo.yaml", ROOT / "configs" / "smoke.yaml"],
                      ["data.image_size=64", "inference.crop_margin=2", "global_local.fusion=alpha"])
    torch.manual_seed(0)
    vq = build_vqgan(cfg.vqgan).eval()
    unet = build_unet(cfg.unet, image_size=16).eval()
    for p in unet.out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    sup = BoneSuppressor(unet, vq, build_schedule(cfg.diffusion), cfg, "clean")
    rng = np.random.default_rng(2)
    image = rng.random((64, 64)).astype(np.float32)
    mask = np.zeros((64, 64), bool)
    mask[24:40, 24:40] = True                                # box 6..10 (+2) of a 16x16 latent grid
    calls = []
    encode = vq.encode_stage_2_inputs
    vq.encode_stage_2_inputs = lambda x: calls.append(tuple(x.shape)) or encode(x)
    crop = sup([image], [mask], ["x.png"])[0]
    assert (1, 1, 32, 32) in calls                           # the 8x8-latent lung box was encoded alone
    cfg.inference.local_crop = False
    whole = sup([image], [mask], ["x.png"])[0]
    # Inside the lungs the local image barely changes; the rest of it is never used (alpha fusion).
    inside = mask
    assert np.abs(crop.local_img[inside] - whole.local_img[inside]).mean() < 0.02


def test_local_crop_pastes_into_the_background_code():
    cfg = load_config([ROOT / "configs" / "demo.yaml", ROOT / "configs" / "smoke.yaml"], ["data.image_size=64"])
    torch.manual_seed(0)
    vq = build_vqgan(cfg.vqgan).eval()
    unet = build_unet(cfg.unet, image_size=16).eval()
    sup = BoneSuppressor(unet, vq, build_schedule(cfg.diffusion), cfg, "clean")
    masked = torch.full((1, 64, 64), -1.0)
    masked[:, 24:40, 24:40] = torch.rand(1, 16, 16) * 2 - 1
    z = sup.encode_local(masked, (4, 12, 4, 12))
    full = vq.encode_stage_2_inputs(masked[None])[0]
    assert torch.equal(z[:, 0, 0], sup.black_latent())
    torch.testing.assert_close(z[:, 4:12, 4:12], vq.encode_stage_2_inputs(masked[None, :, 16:48, 16:48])[0])
    # the centre of the box, away from its edges, is what the whole-image encoding gives
    torch.testing.assert_close(z[:, 7:9, 7:9], full[:, 7:9, 7:9], atol=1e-6, rtol=0)   # same codes
