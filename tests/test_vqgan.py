"""ML-VQGAN and patch discriminator: sizes, shapes, quantiser maths, EMA rules, codebook statistics.

Paper-size modules are only built (parameter counts), except one 64 px forward; everything else uses
a tiny config (widths 8-16, 16-64 px) so the file runs in seconds on CPU.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models import build_discriminator, build_vqgan, count_parameters
from models.discriminator import PatchDiscriminator
from models.vqgan import VQGAN, VectorQuantizerEMA, codebook_counts, usage_from_counts
from tests.conftest import gen
from utils.config import DiscriminatorConfig, VQGANConfig

K_TINY = 32


def tiny_vqgan(**overrides) -> VQGAN:
    kwargs = dict(in_channels=1, channels=(8, 16, 16), num_res_channels=8, num_res_layers=1,
                  embedding_dim=4, num_embeddings=K_TINY)
    kwargs.update(overrides)
    return VQGAN(**kwargs)


# --------------------------------------------------------------------------------------------------
# Paper sizes
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, expected", [(256, 38_326_533), (1024, 38_329_605)])
def test_paper_vqgan_parameter_count(k, expected):
    model = build_vqgan(VQGANConfig(num_embeddings=k))
    assert count_parameters(model) == expected
    # The EMA codebook counts as a parameter but is not trainable.
    assert count_parameters(model, trainable_only=True) == expected - k * 4
    assert not model.quantizer.codebook.requires_grad


def test_paper_vqgan_latent_shape_rule_and_small_forward():
    torch.manual_seed(0)
    model = build_vqgan(VQGANConfig()).eval()
    assert model.downsample_factor == 8
    assert model.latent_shape(1024, 1024) == (4, 128, 128)
    with torch.no_grad():
        z = model.encode_stage_2_inputs(torch.rand(1, 1, 64, 64) * 2 - 1)
        x_rec = model.decode(z)
    assert z.shape == (1, 4, 8, 8)
    assert x_rec.shape == (1, 1, 64, 64)


def test_paper_discriminator_parameter_count_and_output_size():
    d = build_discriminator(DiscriminatorConfig())
    assert count_parameters(d) == 2_763_585
    # k4 p1: stride 2 halves, stride 1 removes one pixel: 64 -> 32 -> 16 -> 8 -> 7 -> 6,
    # and 1024 -> 512 -> 256 -> 128 -> 127 -> 126.
    with torch.no_grad():
        assert d(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 6, 6)


def test_discriminator_layout_and_init():
    d = PatchDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (1, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 1), (512, 1, 1)]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules()) == 3
    assert abs(convs[1].weight.std().item() - 0.02) < 0.002      # N(0, 0.02) init


def test_discriminator_invalid_arguments():
    with pytest.raises(ValueError):
        PatchDiscriminator(num_layers=0)
    with pytest.raises(ValueError):
        PatchDiscriminator(num_channels=0)


# --------------------------------------------------------------------------------------------------
# Tiny model: shapes, validation
# --------------------------------------------------------------------------------------------------

def test_tiny_shapes_and_indices():
    model = tiny_vqgan()
    x = torch.rand(2, 1, 64, 64, generator=gen()) * 2 - 1
    z_e = model.encode(x)
    assert z_e.shape == (2, 4, 8, 8) and model.latent_shape(64, 64) == (4, 8, 8)
    x_rec, commit, info = model(x)
    assert x_rec.shape == x.shape and torch.isfinite(x_rec).all()
    assert commit.dim() == 0 and commit.item() >= 0
    idx = info["indices"]
    assert idx.shape == (2, 8, 8) and idx.dtype == torch.int64
    assert 0 <= idx.min() and idx.max() < K_TINY
    assert 1.0 <= info["perplexity"].item() <= K_TINY


def test_any_number_of_levels():
    model = tiny_vqgan(channels=(8,), num_res_channels=[4])
    assert model.downsample_factor == 2
    x_rec, _, info = model(torch.randn(1, 1, 16, 16, generator=gen()))
    assert x_rec.shape == (1, 1, 16, 16) and info["indices"].shape == (1, 8, 8)


def test_size_not_divisible_by_factor_raises():
    with pytest.raises(ValueError, match="divisible"):
        tiny_vqgan().encode(torch.zeros(1, 1, 60, 64))


@pytest.mark.parametrize("bad", [
    dict(channels=()), dict(channels=(8, 0)), dict(embedding_dim=0), dict(num_embeddings=0),
    dict(decay=1.0), dict(decay=-0.1), dict(epsilon=0.0), dict(commitment_cost=-1.0),
    dict(num_res_channels=[8]), dict(num_res_layers=-1), dict(in_channels=0),
])
def test_invalid_arguments_raise(bad):
    with pytest.raises(ValueError):
        tiny_vqgan(**bad)


def test_builder_rejects_invalid_config():
    with pytest.raises(ValueError):
        build_vqgan(VQGANConfig(channels=[]))
    with pytest.raises(ValueError):
        build_vqgan(VQGANConfig(decay=1.5))


# --------------------------------------------------------------------------------------------------
# Quantiser
# --------------------------------------------------------------------------------------------------

def test_quantizer_picks_nearest_code_and_commitment_loss():
    q = VectorQuantizerEMA(num_embeddings=16, embedding_dim=3, commitment_cost=0.25).eval()
    z_e = torch.randn(2, 3, 4, 5, generator=gen())
    z_q, commit, idx = q(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 3)
    expected_idx = torch.cdist(flat, q.codebook).argmin(1).view(2, 4, 5)
    assert torch.equal(idx, expected_idx)
    e = q.codebook[idx].permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, e)
    torch.testing.assert_close(commit, 0.25 * ((e - z_e) ** 2).mean())


def test_straight_through_gradient():
    q = VectorQuantizerEMA(num_embeddings=8, embedding_dim=2, commitment_cost=0.0).eval()
    rng = gen()
    z_e = torch.randn(1, 2, 3, 3, generator=rng, requires_grad=True)
    g = torch.randn(1, 2, 3, 3, generator=rng)
    z_q, _, _ = q(z_e)
    (z_q * g).sum().backward()
    torch.testing.assert_close(z_e.grad, g)           # d z_q / d z_e = identity
    assert q.codebook.grad is None


def test_gradients_reach_encoder_not_codebook():
    model = tiny_vqgan()
    x_rec, commit, _ = model(torch.rand(2, 1, 32, 32, generator=gen()) * 2 - 1)
    (x_rec.pow(2).mean() + commit).backward()
    first_conv = model.encoder.blocks[0]
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    assert model.quantizer.codebook.grad is None


def _ema_expected(q: VectorQuantizerEMA, z_e: torch.Tensor):
    """Hand computation of one EMA step from the module's current state."""
    k, d, g, eps = q.num_embeddings, q.embedding_dim, q.decay, q.epsilon
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
    idx = torch.cdist(flat, q.codebook).argmin(1)
    onehot = F.one_hot(idx, k).float()
    n = g * q.ema_cluster_size + (1 - g) * onehot.sum(0)
    m = g * q.ema_embed_sum + (1 - g) * onehot.t() @ flat
    n_smooth = (n + eps) / (n.sum() + k * eps) * n.sum()
    return n, m, m / n_smooth[:, None]


def test_ema_update_in_train_mode_matches_formula():
    q = VectorQuantizerEMA(num_embeddings=6, embedding_dim=2, decay=0.5).train()
    rng = gen()
    for _ in range(2):                                   # second step starts from a non-trivial state
        z_e = torch.randn(2, 2, 3, 3, generator=rng)
        n, m, e = _ema_expected(q, z_e)
        before = q.codebook.detach().clone()
        z_q, _, idx = q(z_e)
        # z_q uses the codebook from before the update
        torch.testing.assert_close(z_q, before[idx].permute(0, 3, 1, 2))
        torch.testing.assert_close(q.ema_cluster_size, n)
        torch.testing.assert_close(q.ema_embed_sum, m)
        torch.testing.assert_close(q.codebook.detach(), e)
        assert not torch.equal(q.codebook.detach(), before)


def test_no_ema_update_in_eval_mode_or_without_grad():
    model = tiny_vqgan()
    x = torch.rand(1, 1, 32, 32, generator=gen()) * 2 - 1
    state = {k: v.clone() for k, v in model.quantizer.state_dict().items()}

    def unchanged() -> bool:
        return all(torch.equal(v, model.quantizer.state_dict()[k]) for k, v in state.items())

    model.eval()
    model(x)
    model.encode_stage_2_inputs(x)
    assert unchanged()
    model.train()
    with torch.no_grad():                    # decided: no update without autograd, even in train mode
        model(x)
    assert unchanged()
    model(x)
    assert not unchanged()


def test_ema_statistics_are_all_reduced_under_ddp(monkeypatch):
    """Two ranks that see the same batch must update like one process seeing it twice."""
    z = torch.randn(2, 2, 3, 3, generator=gen())
    torch.manual_seed(1)
    q_ddp = VectorQuantizerEMA(num_embeddings=5, embedding_dim=2).train()
    torch.manual_seed(1)
    q_ref = VectorQuantizerEMA(num_embeddings=5, embedding_dim=2).train()

    calls = []

    def fake_all_reduce(tensor, op=None, **_):   # SUM over two identical ranks
        calls.append(op)
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    q_ddp(z)
    monkeypatch.undo()
    q_ref(torch.cat([z, z]))
    assert calls == [dist.ReduceOp.SUM, dist.ReduceOp.SUM]
    torch.testing.assert_close(q_ddp.state_dict(), q_ref.state_dict())


def test_codebook_in_state_dict_and_not_optimised():
    model = tiny_vqgan()
    sd = model.state_dict()
    assert {"quantizer.codebook", "quantizer.ema_cluster_size", "quantizer.ema_embed_sum"} <= sd.keys()
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    model.eval()                                       # no EMA step: only the optimiser could move it
    before = model.quantizer.codebook.detach().clone()
    x_rec, commit, _ = model(torch.rand(1, 1, 32, 32, generator=gen()))
    (x_rec.mean() + commit).backward()
    opt.step()
    assert torch.equal(model.quantizer.codebook.detach(), before)


# --------------------------------------------------------------------------------------------------
# Codebook statistics
# --------------------------------------------------------------------------------------------------

def usage_of(indices: torch.Tensor, num_embeddings: int) -> dict[str, float | int]:
    """Codebook statistics of one tensor of indices (the stages accumulate the counts over batches)."""
    return usage_from_counts(codebook_counts(indices, num_embeddings))


def test_codebook_usage_hand_case():
    idx = torch.tensor([[0, 0], [1, 3]])
    stats = usage_of(idx, 5)
    # p = (1/2, 1/4, 0, 1/4, 0): entropy = 1.5 ln 2, perplexity = 2 ** 1.5
    assert stats["used"] == 3 and stats["unused"] == 2 and stats["total"] == 4
    assert stats["usage"] == pytest.approx(0.6)
    assert stats["perplexity"] == pytest.approx(2 ** 1.5)
    assert usage_of(torch.zeros(7, dtype=torch.long), 4)["perplexity"] == pytest.approx(1.0)
    assert usage_of(torch.arange(8), 8)["perplexity"] == pytest.approx(8.0)


def test_codebook_counts_accumulate_over_batches():
    a, b = torch.tensor([0, 1, 1]), torch.tensor([[2, 1], [4, 4]])
    total = codebook_counts(a, 6) + codebook_counts(b, 6)
    assert total.tolist() == [1, 3, 1, 0, 2, 0]
    assert usage_from_counts(total) == usage_of(torch.cat([a, b.flatten()]), 6)
    assert usage_from_counts(total)["perplexity"] == pytest.approx(
        math.exp(-sum(c / 7 * math.log(c / 7) for c in (1, 3, 1, 2))))
    with pytest.raises(ValueError):
        codebook_counts(torch.tensor([0, 6]), 6)


def _ddp_worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    """One rank of the gloo test below: same init, a different batch per rank, one EMA step."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        q = VectorQuantizerEMA(num_embeddings=5, embedding_dim=2).train()
        batches = torch.randn(world_size, 2, 2, 3, 3, generator=torch.Generator().manual_seed(1))
        q(batches[rank])
        torch.save(q.state_dict(), f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow          # ~6 s: two spawned interpreters
def test_ema_replicas_stay_identical_with_gloo(tmp_path):
    """Real 2-process group on CPU: both replicas equal a single process that saw both batches."""
    import torch.multiprocessing as mp
    out = str(tmp_path / "state")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    s0, s1 = (torch.load(f"{out}.{r}", weights_only=True) for r in range(2))
    torch.manual_seed(0)
    q_ref = VectorQuantizerEMA(num_embeddings=5, embedding_dim=2).train()
    batches = torch.randn(2, 2, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    q_ref(torch.cat([batches[0], batches[1]]))
    torch.testing.assert_close(s0, s1)
    torch.testing.assert_close(s0, q_ref.state_dict())
