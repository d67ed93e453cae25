"""models.precision: the precision choice, its cache, and fp32 where it matters."""
from __future__ import annotations

import json

import pytest
import torch

from models import build_unet, build_vqgan
from models import precision as P
from tests.conftest import ROOT
from utils.config import load_config


def test_explicit_choices_and_errors():
    cpu = torch.device("cpu")
    assert P.resolve_precision("fp32", cpu) == ("fp32", "as configured")
    assert P.resolve_precision("bf16", cpu)[0] == "bf16"
    with pytest.raises(ValueError, match="inference.precision"):
        P.resolve_precision("int8", cpu)


def test_auto_keeps_fp32_without_native_bf16(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_isa", lambda: [])
    monkeypatch.setattr(P, "cpu_bf16_speedup", lambda: pytest.fail("no probe without native bf16"))
    choice, why = P.resolve_precision("auto", torch.device("cpu"))
    assert choice == "fp32" and "no native bf16" in why


@pytest.mark.parametrize("speedup,expected", [(3.0, "bf16"), (1.05, "fp32")])
def test_auto_follows_the_measured_speed(monkeypatch, speedup, expected):
    monkeypatch.setattr(P, "cpu_bf16_isa", lambda: ["AMX-BF16"])
    monkeypatch.setattr(P, "cpu_bf16_speedup", lambda: speedup)
    choice, why = P.resolve_precision("auto", torch.device("cpu"))
    assert choice == expected and "AMX-BF16" in why


def test_probe_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(P, "_probe_seconds", lambda dtype, reps=3: calls.append(dtype) or (2.0 if dtype is None else 1.0))
    assert P.cpu_bf16_speedup() == 2.0 and len(calls) == 2
    assert P.cpu_bf16_speedup() == 2.0 and len(calls) == 2          # second time from the cache
    cache = json.loads((tmp_path / "bone-suppression" / "precision_probe.json").read_text())
    assert list(cache.values()) == [2.0] and P.cpu_model() in next(iter(cache))


def test_wrappers_return_fp32_and_quantise_in_fp32():
    cfg = load_config([ROOT / "configs" / "demo.yaml", ROOT / "configs" / "smoke.yaml"])
    torch.manual_seed(0)
    vq, unet = build_vqgan(cfg.vqgan).eval(), build_unet(cfg.unet, image_size=8).eval()
    for p in unet.out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    cfg.inference.precision = "bf16"
    u16, v16, note = P.prepare_for_inference(unet, vq, cfg.inference, torch.device("cpu"))
    assert note.startswith("precision bf16 (as configured), channels-last on")
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        z32, z16 = vq.encode_stage_2_inputs(x), v16.encode_stage_2_inputs(x)
        assert z16.dtype == torch.float32
        codes = vq.quantizer.codebook
        # every bf16 latent is exactly a codebook vector (the nearest-code search ran in fp32) ...
        assert torch.cdist(z16.permute(0, 2, 3, 1).reshape(-1, 4), codes).min(1).values.max() < 1e-6
        same = torch.isclose(z16, z32, atol=1e-6, rtol=0).all(1).float().mean()
        assert same > 0.95, same                                          # ... and mostly the fp32 one
        inp, t = torch.cat([z32, z32], 1), torch.tensor([10, 900])
        e32, e16 = unet(inp, t), u16(inp, t)
        assert e16.dtype == torch.float32 and e16.is_contiguous()
        assert (e16 - e32).abs().max() < 0.05 * e32.abs().max()
        assert v16.decode(z32).dtype == torch.float32


@pytest.mark.parametrize("damaged", ["[1, 2]", '{"KEY": "fast"}', '{"KEY": NaN}', '{"KEY": -1}', "[" * 100_000])
def test_damaged_probe_cache_is_measured_again(monkeypatch, tmp_path, damaged):
    """The cache lives in the user's home, outside the project: a damaged one costs the probe, never a
    traceback or a nonsense speedup."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(P, "_probe_seconds", lambda dtype, reps=3: 3.0 if dtype is None else 1.0)
    key = f"{P.cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    (tmp_path / "bone-suppression").mkdir()
    (tmp_path / "bone-suppression" / "precision_probe.json").write_text(damaged.replace("KEY", key))
    assert P.cpu_bf16_speedup() == 3.0
