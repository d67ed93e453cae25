"""The converter for the authors' published checkpoints and the safetensors release format."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from models import build_unet, count_parameters, load_ldm, load_vqgan
from models.reference import convert_unet, convert_vqgan, reference_vqgan_key
from tests.conftest import ROOT, tiny_dataset
from tests.reference_fakes import (Payload, fake_class, reference_unet, reference_vqvae, reference_vqvae_reconstruct,
                                   save_whole_model)
from stages import convert
from utils.checkpoint import CheckpointError, load_checkpoint, resolve_first_stage, save_checkpoint
from utils.config import config_to_dict
from utils.foreign_pickle import ForeignPickleError, read_module_tree


# The smoke architecture (with the reference's 8 output channels and 2 residual units per level).
SMALL = ["data.image_size=32", "vqgan.channels=[8, 16]", "vqgan.num_res_channels=8", "vqgan.num_res_layers=2",
         "unet.model_channels=32", "unet.channel_mult=[1, 2]", "unet.num_res_blocks=1",
         "unet.attention_resolutions=[4]", "unet.attention_as_factor=false", "unet.num_heads=2",
         "run.device=cpu", "sampler.steps=4"]


def small_unet(legacy: bool, seed: int = 0):
    cfg = convert.published_config("bs-ldm" if legacy else "gl-lcm", "szch", SMALL)
    torch.manual_seed(seed)
    unet = build_unet(cfg.unet, image_size=8).eval()
    for p in unet.parameters():           # zero-initialised layers would hide the q/k/v order
        torch.nn.init.normal_(p, std=0.2)
    return unet, cfg


def reference_pair(tmp_path: Path, legacy: bool = False) -> tuple[Path, Path, torch.nn.Module, torch.nn.Module]:
    """(unet.pth, vqgan.pth, our original UNet, the fake MONAI VQVAE)."""
    unet, _ = small_unet(legacy)
    vq = reference_vqvae()
    return (save_whole_model(reference_unet(unet, legacy), tmp_path / "unet.pth"),
            save_whole_model(vq, tmp_path / "vqgan.pth"), unet, vq)


# ---- the VQVAE renaming ---------------------------------------------------------------------------

def test_vqvae_names_at_paper_size(tmp_path):
    """The facts of the issue, at the published size: 67 tensors, 38,329,605 parameters, these renames."""
    vq = reference_vqvae(channels=(128, 256, 512), res_channels=512, num_embeddings=1024)
    theirs = vq.state_dict()
    assert len(theirs) == 67
    path = save_whole_model(vq, tmp_path / "vqgan.pth")
    cfg = convert.published_config("gl-lcm", "szch")
    ours, codes = convert_vqgan(path, cfg)
    assert codes == 1024 and len(ours) == 67
    model = load_state_into_vqgan(cfg, ours)
    assert count_parameters(model) == 38_329_605
    facts = {"encoder.blocks.0.conv.weight": "encoder.blocks.0.weight",
             "encoder.blocks.3.conv.bias": "encoder.blocks.4.bias",
             "encoder.blocks.7.conv1.conv.weight": "encoder.blocks.10.conv1.weight",   # i = 2, r = 0
             "encoder.blocks.8.conv2.conv.bias": "encoder.blocks.11.conv2.bias",       # i = 2, r = 1
             "encoder.blocks.9.conv.weight": "encoder.blocks.12.weight",
             "decoder.blocks.0.conv.weight": "decoder.blocks.0.weight",
             "decoder.blocks.5.conv1.conv.weight": "decoder.blocks.6.conv1.weight",    # 1+3i+r, i = 1, r = 1
             "decoder.blocks.9.conv.weight": "decoder.blocks.11.weight",               # 3+3i, i = 2
             "quantizer.quantizer.embedding.weight": "quantizer.codebook",
             "quantizer.quantizer.ema_cluster_size": "quantizer.ema_cluster_size",
             "quantizer.quantizer.ema_w": "quantizer.ema_embed_sum"}
    for ref_key, our_key in facts.items():
        assert torch.equal(ours[our_key], theirs[ref_key]), (ref_key, our_key)
        assert reference_vqgan_key(our_key, 2) == ref_key


def load_state_into_vqgan(cfg, state, codes=None):
    from models import build_vqgan

    cfg.vqgan.num_embeddings = codes or state["quantizer.codebook"].shape[0]
    model = build_vqgan(cfg.vqgan)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("res_layers", [2, 1, 0])
def test_vqvae_outputs_agree(tmp_path, res_layers):
    vq = reference_vqvae(res_layers=res_layers)
    path = save_whole_model(vq, tmp_path / "vqgan.pth")
    cfg = convert.published_config("gl-lcm", "szch", SMALL + [f"vqgan.num_res_layers={res_layers}"])
    ours, codes = convert_vqgan(path, cfg)
    model = load_state_into_vqgan(cfg, ours, codes)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        mine = model.decode(model.quantize(model.encode(x))[0])
    torch.testing.assert_close(mine, reference_vqvae_reconstruct(vq, x), rtol=0, atol=1e-6)


# ---- the UNet and its attention order ---------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True])
def test_unet_order_read_from_file_and_outputs_match(tmp_path, legacy):
    unet, cfg = small_unet(legacy)
    path = save_whole_model(reference_unet(unet, legacy), tmp_path / "unet.pth")
    state, order = convert_unet(path, cfg, latent_size=8)
    assert order is (not legacy)
    x, t = torch.randn(2, 8, 8, 8), torch.tensor([999, 10])
    for new_order, same in ((order, True), (not order, False)):
        cfg.unet.use_new_attention_order = new_order
        model = build_unet(cfg.unet, image_size=8).eval()
        model.load_state_dict(state)          # a strict load passes with either order ...
        with torch.no_grad():
            # ... but only the file's order gives the original outputs.
            assert torch.equal(model(x, t), unet(x, t)) is same


def test_bs_ldm_jsrt_conversion_end_to_end(tmp_path):
    """A JSRT BS-LDM pair through the CLI: legacy order, both slots, hashes, a release that loads."""
    unet_pth, vq_pth, unet, vq = reference_pair(tmp_path, legacy=True)
    out = tmp_path / "converted"
    res = subprocess.run([sys.executable, "convert_reference.py", "--method", "bs-ldm", "--dataset", "jsrt",
                          "--unet", str(unet_pth), "--vqgan", str(vq_pth), "--out", str(out),
                          *sum((["--set", s] for s in SMALL), [])],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    ckpt = load_checkpoint(out / "ldm.pt", kind="ldm")
    c = ckpt["config"]
    assert c["unet"]["use_new_attention_order"] is False and ckpt["extra"]["attention_order"] == "legacy"
    assert c["diffusion"]["cond_mode"] == "bug_compatible" and c["diffusion"]["beta_schedule"] == "cosine"
    assert c["sampler"]["name"] == "ddpm" and c["sampler"]["clip_r0_global"] == 1.4 and c["data"]["invert"] is True
    assert c["global_local"]["enabled"] is False and c["vqgan"]["num_embeddings"] == 16
    assert ckpt["extra"]["source"]["unet"]["sha256"] == _sha(unet_pth)
    assert ckpt["state"]["unet"].keys() == ckpt["state"]["ema"].keys()
    eps, _ = load_ldm(out / "ldm.pt", torch.device("cpu"))
    x, t = torch.randn(1, 8, 8, 8), torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(eps(x, t), unet(x, t))
    for name in ("vqgan.safetensors", "ldm.safetensors", "config.yaml", "MODEL_CARD.md"):
        assert (out / name).is_file()
    card = (out / "MODEL_CARD.md").read_text()
    assert "Not for diagnosis" in card and "89.322 ± 9.562" in card and _sha(unet_pth) in card
    assert "legacy" in card and _sha(out / "ldm.safetensors") in card


def _sha(path):
    from utils.release import sha256

    return sha256(path)


# ---- the route a user takes: convert, then ldm_eval.py with no other argument -----------------------------

def test_converted_checkpoint_runs_ldm_eval_from_anywhere(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    unet_pth, vq_pth, _, _ = reference_pair(tmp_path)
    out = tmp_path / "gl-lcm"
    cfg = convert.published_config("gl-lcm", "szch", SMALL + [f"data.root={data}", "data.name=demo"])
    convert.convert_published(cfg, "gl-lcm", "szch", unet_pth, vq_pth, out)
    c = load_checkpoint(out / "ldm.pt")["config"]
    assert c["global_local"]["poisson_domain"] == "bbox" and c["global_local"]["leg_std_channels"] == 8
    assert c["output"]["mode"] == "resize" and c["unet"]["use_new_attention_order"] is True
    moved = tmp_path / "elsewhere" / "weights"
    shutil.copytree(out, moved)                      # the folder may move: the first stage is found beside it
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    outputs = {}
    for name in ("ldm.pt", "ldm.safetensors"):
        res = subprocess.run([sys.executable, str(ROOT / "ldm_eval.py"), "--ckpt", str(moved / name),
                              "--no-progress"], cwd=elsewhere, capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        written = sorted((moved / "eval" / "test").glob("*.png"))
        assert written, res.stdout
        outputs[name] = {p.name: p.read_bytes() for p in written}
        shutil.rmtree(moved / "eval")
    assert outputs["ldm.pt"] == outputs["ldm.safetensors"]     # the two formats give the same images


# ---- hostile and wrong files ------------------------------------------------------------------------

def _hostile_files(tmp_path: Path, sentinel: Path) -> dict[str, Path]:
    cmd = f"touch {sentinel}"
    unet, _ = small_unet(False)
    files = {"root object": save_whole_model(Payload(cmd), tmp_path / "root.pth")}
    for where in ("attribute", "hook", "dict", "parameter"):
        m = reference_unet(unet, legacy=False)
        if where == "attribute":
            m.input_blocks[0].config = Payload(cmd)
        elif where == "hook":
            m.out._forward_hooks[0] = Payload(cmd)
        elif where == "dict":
            m.middle_block.__dict__["settings"] = {"a": [1, {"b": Payload(cmd)}]}
        else:
            m.out[0]._parameters["weight"] = Payload(cmd)
        files[where] = save_whole_model(m, tmp_path / f"{where}.pth")
    return files


def test_code_running_payloads_never_run(tmp_path):
    sentinel = tmp_path / "pwned"
    cfg = convert.published_config("gl-lcm", "szch", SMALL)
    for where, path in _hostile_files(tmp_path, sentinel).items():
        with pytest.raises(ForeignPickleError) as err:
            convert_unet(path, cfg, latent_size=8)
        assert str(path) in str(err.value) and "posix.system" in str(err.value), where
        assert not sentinel.exists(), where
    # Control: an ordinary unpickler does run the payload, so the files really are hostile.
    import pickle

    pickle.loads(pickle.dumps(Payload(f"touch {sentinel}")))
    assert sentinel.exists()


def test_hostile_file_through_the_cli_writes_nothing(tmp_path):
    sentinel = tmp_path / "pwned"
    files = _hostile_files(tmp_path, sentinel)
    _, vq_pth, _, _ = reference_pair(tmp_path)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "convert_reference.py", "--method", "gl-lcm", "--unet", str(files["hook"]),
                          "--vqgan", str(vq_pth), "--out", str(out), *sum((["--set", s] for s in SMALL), [])],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "posix.system" in res.stderr and str(files["hook"]) in res.stderr
    assert not sentinel.exists() and not out.exists()


def test_wrong_files_are_refused_with_the_key(tmp_path):
    unet_pth, vq_pth, unet, vq = reference_pair(tmp_path)
    cfg = convert.published_config("gl-lcm", "szch", SMALL)
    cases = []
    # the two files swapped
    cases.append((lambda: convert_unet(vq_pth, cfg, 8), ["holds a generative.networks.nets.vqvae.VQVAE, expected a modules.unet.UNetModel"]))
    cases.append((lambda: convert_vqgan(unet_pth, cfg), ["holds a modules.unet.UNetModel, expected a generative.networks.nets.vqvae.VQVAE"]))
    # a missing tensor
    m = reference_unet(unet, legacy=False)
    del m.out[2]._parameters["bias"]
    missing = save_whole_model(m, tmp_path / "missing.pth")
    cases.append((lambda: convert_unet(missing, cfg, 8), ["'out.2.bias' is missing"]))
    # an extra tensor
    m = reference_unet(unet, legacy=False)
    m.out[2].register_buffer("extra", torch.zeros(3))
    extra = save_whole_model(m, tmp_path / "extra.pth")
    cases.append((lambda: convert_unet(extra, cfg, 8), ["unexpected key 'out.2.extra'"]))
    # another architecture than the config's
    wide = convert.published_config("gl-lcm", "szch", SMALL + ["unet.model_channels=64"])
    cases.append((lambda: convert_unet(unet_pth, wide, 8), ["key 'time_embed.0.weight' has shape (128, 32), expected (256, 64)"]))
    # a state dict (not a whole model), and one of this project's checkpoints
    torch.save(unet.state_dict(), tmp_path / "sd.pth")
    cases.append((lambda: convert_unet(tmp_path / "sd.pth", cfg, 8), ["holds a OrderedDict, not a pickled model"]))
    # mixed attention orders, and an attention block without its q/k/v class
    m = reference_unet(unet, legacy=False)
    blocks = [b for b in m.modules() if type(b).__name__ == "AttentionBlock"]
    assert len(blocks) >= 2
    blocks[0].attention = fake_class("modules.unet.QKVAttentionLegacy")()
    mixed = save_whole_model(m, tmp_path / "mixed.pth")
    cases.append((lambda: convert_unet(mixed, cfg, 8), ["both q/k/v orders"]))
    del blocks[0]._modules["attention"]
    no_attn = save_whole_model(m, tmp_path / "noattn.pth")
    cases.append((lambda: convert_unet(no_attn, cfg, 8), ["attention is nothing"]))
    # a class of another package (a file saved from another code base)
    m = reference_unet(unet, legacy=False)
    m.out[0].__class__ = fake_class("mylib.layers.Norm", torch.nn.GroupNorm)
    other = save_whole_model(m, tmp_path / "other.pth")
    cases.append((lambda: convert_unet(other, cfg, 8), ["mylib.layers.Norm"]))
    # truncated and missing files
    (tmp_path / "cut.pth").write_bytes(unet_pth.read_bytes()[:5000])
    cases.append((lambda: convert_unet(tmp_path / "cut.pth", cfg, 8), ["cut.pth", "not a readable torch file"]))
    cases.append((lambda: convert_unet(tmp_path / "nope.pth", cfg, 8), ["nope.pth: file not found"]))
    for call, needles in cases:
        with pytest.raises(ForeignPickleError) as err:
            call()
        for needle in needles:
            assert needle in str(err.value), (needle, str(err.value))


def test_forced_weights_only_is_explained(tmp_path, monkeypatch):
    unet_pth, _, _, _ = reference_pair(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ForeignPickleError, match="TORCH_FORCE_WEIGHTS_ONLY_LOAD"):
        read_module_tree(unet_pth, "modules.unet.UNetModel", ("modules.", "torch.nn.modules."))


def test_old_pickle_protocols_read(tmp_path):
    """Protocol 2 (torch.save's default) names builtins as __builtin__; protocol 1 rebuilds objects through
    copyreg._reconstructor (protocol 0 files cannot be read by torch at all)."""
    unet, _ = small_unet(False)
    for protocol in (1, 2, 4):
        path = save_whole_model(reference_unet(unet, legacy=False), tmp_path / f"p{protocol}.pth", protocol)
        tree = read_module_tree(path, "modules.unet.UNetModel", ("modules.", "torch.nn.modules."))
        sd = tree.state_dict()
        assert list(sd) == list(unet.state_dict()) and all(torch.equal(sd[k], v) for k, v in unet.state_dict().items())


# ---- release format --------------------------------------------------------------------------------

def test_export_of_a_run_and_refusals(tmp_path):
    """A checkpoint of this project (distinct raw and EMA weights) exported with its EMA weights."""
    unet, cfg = small_unet(False)
    vq_state = load_state_into_vqgan(cfg, convert_vqgan(save_whole_model(reference_vqvae(), tmp_path / "v.pth"),
                                                        cfg)[0]).state_dict()
    cfg.vqgan.num_embeddings = 16
    run = tmp_path / "run" / "checkpoints"
    save_checkpoint(run / "vq.pt", kind="vqgan", step=5, epoch=1, config=config_to_dict(cfg), state={"model": vq_state})
    cfg.ldm_train.vqgan_ckpt = str(run / "vq.pt")
    ema = {k: v + 1 for k, v in unet.state_dict().items()}
    save_checkpoint(run / "best.pt", kind="ldm", step=7, epoch=2, config=config_to_dict(cfg),
                    state={"unet": unet.state_dict(), "ema": ema, "opt": {}},
                    extra={"latent_size": 8, "rng_cpu": torch.get_rng_state()})
    out = tmp_path / "release"
    res = subprocess.run([sys.executable, "convert_reference.py", "--export", str(run / "best.pt"), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rel = load_checkpoint(out / "ldm.safetensors", kind="ldm")
    assert set(rel["state"]) == {"ema"} and rel["step"] == 7 and rel["extra"] == {"latent_size": 8}
    assert all(torch.equal(rel["state"]["ema"][k], v) for k, v in ema.items())
    assert rel["config"]["ldm_train"]["vqgan_ckpt"] == "vqgan.safetensors"
    assert yaml.safe_load((out / "config.yaml").read_text()) == rel["config"]
    vq_model, _ = load_vqgan(out / "vqgan.safetensors")
    assert all(torch.equal(vq_model.state_dict()[k], v) for k, v in vq_state.items())
    with pytest.raises(CheckpointError, match="holds no 'unet' weights"):
        load_ldm(out / "ldm.safetensors", torch.device("cpu"), weights="raw")
    # existing outputs are kept
    res = subprocess.run([sys.executable, "convert_reference.py", "--export", str(run / "best.pt"), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "--overwrite" in res.stderr and "Traceback" not in res.stderr
    # damaged and foreign safetensors files
    (tmp_path / "cut.safetensors").write_bytes((out / "ldm.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors file"):
        load_checkpoint(tmp_path / "cut.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="without this project's header"):
        load_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="expected 'vqgan'"):
        load_vqgan(out / "ldm.safetensors")


def test_first_stage_found_beside_the_checkpoint_or_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "vqgan.pt").write_bytes(b"x")
    assert resolve_first_stage(tmp_path / "a" / "ldm.pt", "vqgan.pt") == (tmp_path / "a" / "vqgan.pt").resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_first_stage(tmp_path / "b" / "ldm.pt", "a/vqgan.pt") == Path("a/vqgan.pt")
    # a whole runs/ tree moved, the command run from elsewhere: found from a folder above the checkpoint
    (tmp_path / "moved" / "runs" / "vqgan").mkdir(parents=True)
    (tmp_path / "moved" / "runs" / "vqgan" / "best.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path / "a")
    assert resolve_first_stage(tmp_path / "moved" / "runs" / "ldm" / "checkpoints" / "best.pt",
                               "runs/vqgan/best.pt") == tmp_path / "moved" / "runs" / "vqgan" / "best.pt"
    with pytest.raises(CheckpointError, match="first stage nope.pt was not found"):
        resolve_first_stage(tmp_path / "a" / "ldm.pt", "nope.pt")
    with pytest.raises(CheckpointError, match="no ldm_train.vqgan_ckpt"):
        resolve_first_stage(tmp_path / "a" / "ldm.pt", "")


def test_cli_argument_errors(tmp_path):
    for args, needle in ((["--method", "gl-lcm", "--out", str(tmp_path)], "needs --unet, --vqgan"),
                         (["--export", "x.pt", "--method", "gl-lcm", "--out", str(tmp_path)], "--export takes only"),
                         (["--method", "gl-lcm", "--unet", "u.pth", "--vqgan", "v.pth", "--out", str(tmp_path / "o")],
                          "u.pth: --unet file not found"),
                         (["--method", "gl-lcm", "--unet", "u", "--vqgan", "v", "--out", str(tmp_path),
                           "--set", "unet.nope=1"], "unet.nope")):
        res = subprocess.run([sys.executable, "convert_reference.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr


# ---- payloads in every pickle protocol and every file format torch.load accepts --------------------

PROTOCOLS = range(6)
FORMATS = ("zip", "legacy", "legacy-first", "legacy-sysinfo", "legacy-keys", "tar")


def _payload_file(tmp_path: Path, fmt: str, protocol: int, marker: Path) -> Path:
    """A file in format ``fmt`` carrying a code-running pickle (``touch marker``) in ``protocol``.

    zip / legacy: ``torch.save`` of the payload; legacy-first / -sysinfo / -keys: a legacy file whose
    magic number, system info or storage keys pickle is the payload (torch reads those three, and the keys,
    with ``pickle_module.load`` rather than its Unpickler); tar: torch's oldest format, payload in
    ``storages``.
    """
    import io
    import pickle
    import tarfile

    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    payload = Payload(f"touch {marker}")
    path = tmp_path / f"evil-{fmt}-p{protocol}.pt"
    dump = lambda obj: pickle.dumps(obj, protocol=protocol)   # noqa: E731
    if fmt in ("zip", "legacy"):
        torch.save(payload, path, pickle_protocol=protocol, _use_new_zipfile_serialization=fmt == "zip")
    elif fmt == "legacy-first":
        path.write_bytes(dump(payload))
    elif fmt == "legacy-sysinfo":
        path.write_bytes(dump(MAGIC_NUMBER) + dump(PROTOCOL_VERSION) + dump(payload))
    elif fmt == "legacy-keys":
        path.write_bytes(dump(MAGIC_NUMBER) + dump(PROTOCOL_VERSION) + dump({}) + dump({}) + dump(payload))
    else:
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in (("storages", dump(payload)), ("sys_info", dump({})), ("pickle", dump({})),
                               ("tensors", dump(0))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_payloads_never_run_in_any_protocol_or_format(tmp_path):
    """The library function, on every protocol 0-5 in every format: refused, naming the file; nothing runs."""
    marker = tmp_path / "pwned"
    for fmt in FORMATS:
        for protocol in PROTOCOLS:
            path = _payload_file(tmp_path, fmt, protocol, marker)
            with pytest.raises(ForeignPickleError) as err:
                read_module_tree(path, "modules.unet.UNetModel", ("modules.", "torch.nn.modules."))
            assert str(path) in str(err.value), str(err.value)
            assert not marker.exists(), (fmt, protocol)
    # Control: the files are hostile; a plain unpickler runs the first pickle (which torch's legacy loader
    # reads with pickle_module.load), so the checks above would have caught a payload that ran.
    import pickle

    with open(_payload_file(tmp_path, "legacy-first", 2, marker), "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_restricted_module_load_is_restricted_on_torch_legacy_paths(tmp_path):
    """Second layer, below the format gate: torch.load given the restricted module on the legacy and tar
    formats (whose first pickles torch reads with ``pickle_module.load``) runs no payload either."""
    from utils.foreign_pickle import _make_pickle_module

    marker = tmp_path / "pwned"
    for fmt in FORMATS:
        for protocol in PROTOCOLS:
            path = _payload_file(tmp_path, fmt, protocol, marker)
            try:
                torch.load(path, weights_only=False, pickle_module=_make_pickle_module(set()))
            except Exception:
                pass          # the stubs make torch fail in many ways; what matters is the marker
            assert not marker.exists(), (fmt, protocol)
    mod = _make_pickle_module(set())
    import pickle

    assert type(mod.loads(pickle.dumps(Payload(f"touch {marker}")))).__name__ == "system" and not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt, protocol", [(f, p) for f in ("zip", "legacy-first") for p in PROTOCOLS] +
                         [(f, 2) for f in ("legacy", "legacy-sysinfo", "legacy-keys", "tar")])
def test_payload_through_the_cli_never_runs(tmp_path, fmt, protocol):
    """``convert_reference.py --unet evil.pt --vqgan evil.pt``: one error line, no traceback, nothing run."""
    marker = tmp_path / "pwned"
    evil = _payload_file(tmp_path, fmt, protocol, marker)
    res = subprocess.run([sys.executable, "convert_reference.py", "--method", "gl-lcm", "--unet", str(evil),
                          "--vqgan", str(evil), "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert not marker.exists(), res.stderr
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(evil) in lines[0], res.stderr
    assert not (tmp_path / "x").exists()


def test_torchscript_archive_refused_before_torch_sees_it(tmp_path, monkeypatch):
    """torch.load hands a TorchScript zip to torch.jit.load, which runs the archive's TorchScript code
    (``__setstate__``) and never uses the restricted unpickler: such files are refused by name."""
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was reached"))
    with pytest.raises(ForeignPickleError, match="TorchScript"):
        read_module_tree(path, "modules.unet.UNetModel", ("modules.", "torch.nn.modules."))


# ---- hostile safetensors headers and a full disk (issue 24, 2.7) -----------------------------------

def _release_file(path: Path, kind: str = "ldm", **header: str) -> Path:
    """A small safetensors file with this project's header; ``header`` replaces any field."""
    from safetensors.torch import save_file

    from utils.checkpoint import FORMAT
    from utils.config import Config

    cfg = config_to_dict(Config())
    meta = {"format": FORMAT, "kind": kind, "step": "1", "epoch": "1", "config": json.dumps(cfg),
            "extra": json.dumps({"latent_size": 8}), "aliases": "{}", **header}
    slot = "unet" if kind == "ldm" else "model"
    save_file({f"{slot}.w": torch.zeros(2)}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("field, text, needle", [
    ("aliases", '["ema"]', "'aliases' is a list, not a mapping"),
    ("aliases", '{"ema": ["unet"]}', "'aliases' must map slot names to slot names"),
    ("aliases", '{"ema": 5}', "'aliases' must map slot names to slot names"),
    ("aliases", '"unet"', "'aliases' is a str, not a mapping"),
    ("aliases", '{"ema": "nope"}', "header names slot 'nope' for 'ema'"),
    ("config", "[" * 100_000 + "]" * 100_000, "'config' is nested too deeply"),
    ("extra", '{"a": ' * 100_000 + "1" + "}" * 100_000, "'extra' is nested too deeply"),
    ("config", '{"sampler": {"clip_kappa": NaN}}', "'config' is not JSON (NaN is not JSON"),
    ("config", "{not json", "'config' is not JSON"),
    ("step", "seven", "'step' and 'epoch' must be integers"),
])
def test_hostile_safetensors_headers_are_named_errors(tmp_path, field, text, needle):
    path = _release_file(tmp_path / "evil.safetensors", **{field: text})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: ") and needle in str(err.value), str(err.value)
    assert len(str(err.value)) < 300 and "\n" not in str(err.value)


def test_export_of_a_header_without_sections_is_one_error_line(tmp_path):
    """--export used to end in a KeyError traceback on a config lacking ldm_train (or any section it reads)."""
    cfg = {"run": {"name": "x"}, "data": {}}
    path = _release_file(tmp_path / "partial.safetensors", config=json.dumps(cfg))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "convert_reference.py", "--export", str(path), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"error: {path}: its config lacks the sections vqgan, unet, diffusion"), lines[0]
    assert not out.exists() or not any(out.iterdir())
    # A config with a wrong value is refused the same way, naming the key.
    cfg = config_to_dict(__import__("utils.config", fromlist=["Config"]).Config())
    cfg["sampler"]["clip_kappa"] = -1.0
    bad = _release_file(tmp_path / "bad.safetensors", kind="vqgan", config=json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bad.safetensors \\(config\\): key 'sampler.clip_kappa' must be >= 0"):
        convert.export_run(bad, tmp_path / "out2")


@pytest.mark.parametrize("fails", ["vqgan.safetensors", "MODEL_CARD.md"])
def test_export_onto_a_full_disk_names_the_file_and_leaves_no_half_release(tmp_path, monkeypatch, fails):
    """A full disk: the Rust writer raises SafetensorError (not an OSError, so a traceback), Python's writer
    an OSError without a file name; both become one OSError naming the file, and the files written before
    it are removed (a half release would make the rerun refuse without --overwrite)."""
    import errno

    from safetensors import SafetensorError

    import utils.release as release

    src = _release_file(tmp_path / "vq.safetensors", kind="vqgan")
    real = release.atomic_write

    def full_disk(path, write, *inputs):
        if Path(path).name == fails:
            if fails.endswith(".safetensors"):
                raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                      'message: "No space left on device" })')
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write, *inputs)

    monkeypatch.setattr(release, "atomic_write", full_disk)
    out = tmp_path / "out"
    with pytest.raises(OSError) as err:
        convert.export_run(src, out)
    assert str(err.value).startswith(f"{out / fails}: not written (") and "\n" not in str(err.value), str(err.value)
    assert "No space left on device" in str(err.value)
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


@pytest.mark.parametrize("fails", ["ldm.pt", "MODEL_CARD.md"])
def test_conversion_onto_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch, fails):
    """torch.save on a full disk raises RuntimeError (no file named; the CLI printed a traceback). Now one
    OSError naming the file, and the files this conversion wrote are removed, so the rerun is not refused."""
    import errno

    import utils.checkpoint as checkpoint_module
    import utils.release as release

    unet_pth, vq_pth, _, _ = reference_pair(tmp_path)
    cfg = convert.published_config("gl-lcm", "szch", SMALL)
    real_save, real_write = torch.save, release.atomic_write

    def full_torch_save(obj, f, *a, **k):
        if Path(str(f)).name.startswith(f".{fails}."):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n(stack)")
        return real_save(obj, f, *a, **k)

    def full_write(path, write, *inputs):
        if Path(path).name == fails:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, write, *inputs)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_torch_save)
    monkeypatch.setattr(release, "atomic_write", full_write)
    out = tmp_path / "out"
    with pytest.raises(OSError) as err:
        convert.convert_published(cfg, "gl-lcm", "szch", unet_pth, vq_pth, out)
    assert str(err.value).startswith(f"{out / fails}: not written (") and "\n" not in str(err.value), str(err.value)
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
