"""Config loading: merge order, overrides, strict keys and types, round trips, shipped configs."""
from __future__ import annotations

import dataclasses

import pytest

from utils.config import Config, ConfigError, config_from_dict, config_to_dict, load_config, save_config
from tests.conftest import ROOT

CONFIGS = ROOT / "configs"


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_without_files():
    assert load_config() == Config()


def test_files_merge_in_order_then_overrides(tmp_path):
    a = write(tmp_path, "a.yaml", "ldm_train:\n  lr: 1.0e-3\n  epochs: 5\nvqgan:\n  channels: [8, 16]\n")
    b = write(tmp_path, "b.yaml", "ldm_train:\n  lr: 2.0e-3\n")
    cfg = load_config([a, b], ["ldm_train.epochs=7", "sampler.name=ddim", "vqgan.channels=[4, 4, 4]"])
    assert cfg.ldm_train.lr == 2e-3          # b overrides a
    assert cfg.ldm_train.epochs == 7         # --set overrides both
    assert cfg.sampler.name == "ddim"
    assert cfg.vqgan.channels == [4, 4, 4]
    assert cfg.ldm_train.batch_size == Config().ldm_train.batch_size  # untouched keys keep defaults


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "bad.yaml", "vqgan:\n  num_embedings: 12\n")
    with pytest.raises(ConfigError) as e:
        load_config([p])
    msg = str(e.value)
    assert str(p) in msg and "vqgan.num_embedings" in msg and "num_embeddings" in msg  # suggestion


def test_unknown_section_and_override(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_config([write(tmp_path, "x.yaml", "nope: 1\n")])
    with pytest.raises(ConfigError, match=r"--set unet\.depth=3: unknown key 'unet\.depth'"):
        load_config([], ["unet.depth=3"])


@pytest.mark.parametrize("text, key", [
    ("ldm_train:\n  epochs: ten\n", "ldm_train.epochs"),
    ("ldm_train:\n  epochs: 1.5\n", "ldm_train.epochs"),
    ("ldm_train:\n  cache_latents: 1\n", "ldm_train.cache_latents"),
    ("sampler:\n  name: euler\n", "sampler.name"),
    ("vqgan:\n  channels: 128\n", "vqgan.channels"),
    ("vqgan:\n  channels: [1, a]\n", "vqgan.channels[1]"),
    ("vqgan: 3\n", "vqgan"),
    ("data:\n  split:\n    ratios: [0.8, x, 0.1]\n", "data.split.ratios[1]"),
])
def test_wrong_type_names_key_and_file(tmp_path, text, key):
    p = write(tmp_path, "t.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config([p])
    assert str(p) in str(e.value) and key in str(e.value)


def test_float_fields_accept_ints_and_yaml11_exponents(tmp_path):
    # PyYAML reads "1e-4" (no dot) as a string; a float field still takes it.
    cfg = load_config([write(tmp_path, "f.yaml", "ldm_train:\n  lr: 1e-4\n  gamma: 1\n")])
    assert cfg.ldm_train.lr == 1e-4 and isinstance(cfg.ldm_train.gamma, float)


def test_override_errors():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config([], ["ldm_train.lr"])
    with pytest.raises(ConfigError, match="ldm_train.epochs"):
        load_config([], ["ldm_train.epochs=abc"])


def test_missing_empty_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "missing.yaml"])
    assert load_config([write(tmp_path, "empty.yaml", "")]) == Config()
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config([write(tmp_path, "broken.yaml", "a: [1, 2\n")])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config([write(tmp_path, "list.yaml", "- 1\n- 2\n")])


def test_save_and_dict_round_trip(tmp_path):
    cfg = load_config([CONFIGS / "szch.yaml", CONFIGS / "bs-ldm.yaml"], ["run.seed=3"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config([tmp_path / "run" / "config.yaml"]) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="checkpoint: unknown key 'vqgan.extra'"):
        d = config_to_dict(cfg)
        d["vqgan"]["extra"] = 1
        config_from_dict(d, source="checkpoint")


@pytest.mark.parametrize("files", [["szch.yaml"], ["jsrt.yaml"], ["demo.yaml"], ["szch.yaml", "bs-ldm.yaml"],
                                   ["jsrt.yaml", "bs-ldm.yaml"]])
def test_shipped_configs_load(files):
    load_config([CONFIGS / f for f in files])


def test_reference_hyper_parameters():
    """Spot-check the published values (docs/method.md §2–§5) in the shipped configs."""
    szch = load_config([CONFIGS / "szch.yaml"])
    jsrt = load_config([CONFIGS / "jsrt.yaml"])
    bsldm = load_config([CONFIGS / "szch.yaml", CONFIGS / "bs-ldm.yaml"])
    # GL-LCM
    assert szch.vqgan.num_embeddings == 1024 and szch.vqgan.decay == 0.5 and szch.vqgan.channels == [128, 256, 512]
    assert (szch.vq_loss.recon, szch.vq_loss.perceptual_weight, szch.vq_loss.adversarial_weight,
            szch.vq_loss.msssim_weight) == ("mse", 0.001, 0.01, 1.0)
    assert (szch.vq_train.lr_g, szch.vq_train.lr_d, szch.vq_train.epochs) == (1e-4, 5e-4, 300)
    assert szch.unet.channel_mult == [1, 1, 2, 2, 4, 4] and szch.unet.num_res_blocks == 8
    assert szch.diffusion.beta_schedule == "scaled_linear" and szch.diffusion.offset_noise == 0.1
    assert (szch.ldm_train.lr, szch.ldm_train.adam_eps, szch.ldm_train.milestones, szch.ldm_train.epochs) == \
        (1e-4, 1e-6, [300, 400, 500], 600)
    assert (szch.sampler.name, szch.sampler.steps, szch.sampler.clip_kappa) == ("lcm", 50, 0.025)
    assert (szch.global_local.alpha, szch.global_local.leg_mode) == (3.0, "noise")
    # per-dataset clip ranges (§4.3)
    assert (szch.sampler.clip_r0_global, szch.sampler.clip_r0_local) == (2.0, 3.5)
    assert (jsrt.sampler.clip_r0_global, jsrt.sampler.clip_r0_local) == (1.7, 3.0)
    assert jsrt.data.invert and not szch.data.invert
    # BS-LDM overlay
    assert bsldm.vqgan.num_embeddings == 256 and bsldm.vq_loss.recon == "l1" and bsldm.vq_loss.msssim_weight == 0
    assert bsldm.diffusion.beta_schedule == "cosine" and bsldm.ldm_train.lr == 2e-4
    assert bsldm.ldm_train.milestones == [200, 400, 750, 1500] and bsldm.ldm_train.epochs == 2500
    assert (bsldm.sampler.name, bsldm.sampler.steps, bsldm.sampler.clip_r0_global, bsldm.sampler.clip_kappa) == \
        ("ddpm", 1000, 1.4, 0.003)
    assert bsldm.sampler.clip_off_by_one and not bsldm.global_local.enabled


def test_jsrt_is_szch_but_for_its_dataset_values():
    """configs/jsrt.yaml overlays szch.yaml (its ``base``): the six JSRT values, everything else SZCH's."""
    szch = config_to_dict(load_config([CONFIGS / "szch.yaml"]))
    jsrt = config_to_dict(load_config([CONFIGS / "jsrt.yaml"]))
    own = {("run", "name"): "jsrt", ("data", "name"): "JSRT", ("data", "root"): "datasets/JSRT",
           ("data", "invert"): True, ("sampler", "clip_r0_global"): 1.7, ("sampler", "clip_r0_local"): 3.0}
    for (section, key), value in own.items():
        assert jsrt[section][key] == value and szch[section][key] != value, (section, key)
        jsrt[section][key] = szch[section][key]
    assert jsrt == szch
    # what follows it still overrides it: BS-LDM on JSRT takes BS-LDM's sampler, JSRT's data
    bsldm = load_config([CONFIGS / "jsrt.yaml", CONFIGS / "bs-ldm.yaml"])
    assert bsldm.sampler.clip_r0_global == 1.4 and bsldm.data.invert and bsldm.vqgan.num_embeddings == 256


def test_base_file_is_merged_first_and_errors_name_the_file(tmp_path):
    write(tmp_path, "a.yaml", "ldm_train:\n  lr: 1.0e-3\n  epochs: 5\n")
    (tmp_path / "sub").mkdir()
    b = write(tmp_path, "sub/b.yaml", "base: ../a.yaml\nldm_train:\n  epochs: 6\n")
    cfg = load_config([b])
    assert (cfg.ldm_train.lr, cfg.ldm_train.epochs) == (1e-3, 6)          # the base, then the file's own keys
    c = write(tmp_path, "c.yaml", "base: sub/b.yaml\n")                   # a base may have a base
    assert load_config([c]) == cfg
    assert "base" not in config_to_dict(cfg)                              # config.yaml states the merged values
    for text, needle in (("base: none.yaml\n", "key 'base': .*none.yaml not found"),
                         ("base: 3\n", "key 'base': expected the file name"),
                         ("base: d.yaml\n", "key 'base': a cycle of base files")):
        d = write(tmp_path, "d.yaml", text)
        with pytest.raises(ConfigError, match=f"{d}: {needle}"):
            load_config([d])
    e = write(tmp_path, "e.yaml", "base: f.yaml\n")
    write(tmp_path, "f.yaml", "base: e.yaml\n")
    with pytest.raises(ConfigError, match="a cycle of base files .*e.yaml -> .*f.yaml -> .*e.yaml"):
        load_config([e])
    with pytest.raises(ConfigError, match="unknown key 'base'"):           # files only, not --set
        load_config([], ["base=a.yaml"])


def test_schema_defaults_are_gl_lcm():
    """The dataclass defaults equal szch.yaml apart from run naming, paths and the fixed bugs."""
    szch = config_to_dict(load_config([CONFIGS / "szch.yaml"]))
    default = config_to_dict(Config())
    diff = {f"{s}.{k}" for s in szch for k in szch[s] if szch[s][k] != default[s][k]}
    assert diff <= {"run.name", "data.num_workers"}, diff
    assert dataclasses.fields(Config)  # schema is a dataclass tree


@pytest.mark.parametrize("item,needle", [
    ("data.image_size=-32", "'data.image_size' must be >= 8, got -32"),
    ("data.image_size=0", "'data.image_size' must be >= 8, got 0"),
    ("data.image_size=100000", "'data.image_size' must be <= 8192, got 100000"),
    ("ldm_train.epochs=-1", "'ldm_train.epochs' must be >= 1, got -1"),
    ("ldm_train.ckpt_every=0", "'ldm_train.ckpt_every' must be >= 1, got 0"),
    ("vq_train.batch_size=0", "'vq_train.batch_size' must be >= 1, got 0"),
    ("sampler.steps=0", "'sampler.steps' must be >= 1, got 0"),
])
def test_out_of_range_values_are_refused_with_the_key(item, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config([ROOT / "configs" / "demo.yaml"], [item])


def test_out_of_range_value_in_a_file_and_in_a_checkpoint_config(tmp_path):
    (tmp_path / "c.yaml").write_text("vq_train:\n  ckpt_every: 0\n")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'vq_train.ckpt_every' must be >= 1"):
        load_config([tmp_path / "c.yaml"])
    bad = config_to_dict(Config())
    bad["data"]["image_size"] = -1
    with pytest.raises(ConfigError, match="ckpt.pt \\(config\\): key 'data.image_size'"):
        config_from_dict(bad, "ckpt.pt (config)")


def test_duplicate_yaml_keys_are_refused(tmp_path):
    (tmp_path / "d.yaml").write_text("ldm_train:\n  epochs: 3\n  lr: 1.0e-4\n  epochs: 4\n")
    with pytest.raises(ConfigError, match="d.yaml: invalid YAML \\(duplicate key 'epochs'.*line 4"):
        load_config([tmp_path / "d.yaml"])


# ---- round 3: non-finite floats, ranges of every float key, alias bombs ---------------------------

def _float_keys() -> list[str]:
    """Every float (or list-of-float) key of the schema, dotted."""
    import typing

    def walk(cls, prefix):
        for name, tp in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, f"{prefix}{name}.")
            elif tp is float or typing.get_args(tp) == (float,):
                yield f"{prefix}{name}"
    return list(walk(Config, ""))


@pytest.mark.parametrize("value", [".nan", "nan", ".inf", "-.inf", "1e400", "-1e999"])
def test_every_float_key_refuses_non_finite_values(value):
    """``--set sampler.clip_kappa=nan`` sampled black images with exit 0; now each float key refuses it."""
    from utils.config import RANGES

    keys = _float_keys()
    assert "sampler.clip_kappa" in keys and "data.split.ratios" in keys and len(keys) > 40
    for key in keys:
        assert key in RANGES, f"{key} has no range"
        item = f"{key}=[{value}, {value}]" if "list" in str(_field_type(key)) else f"{key}={value}"
        with pytest.raises(ConfigError, match=f"key '{key}(\\[0\\])?' must be a finite number") as err:
            load_config([], [item])
        assert str(err.value).count("\n") == 0


def _field_type(dotted: str):
    import typing

    cls = Config
    *sections, name = dotted.split(".")
    for s in sections:
        cls = typing.get_type_hints(cls)[s]
    return typing.get_type_hints(cls)[name]


@pytest.mark.parametrize("item,needle", [
    ("sampler.clip_kappa=-0.1", "'sampler.clip_kappa' must be >= 0, got -0.1"),
    ("sampler.clip_r0_global=0", "'sampler.clip_r0_global' must be > 0, got 0.0"),
    ("sampler.clip_r0_local=-3", "'sampler.clip_r0_local' must be > 0, got -3.0"),
    ("sampler.eta=1.5", "'sampler.eta' must be <= 1, got 1.5"),
    ("ldm_train.ema_decay=1.01", "'ldm_train.ema_decay' must be <= 1, got 1.01"),
    ("ldm_train.lr=0", "'ldm_train.lr' must be > 0, got 0.0"),
    ("vq_train.betas=[0.9, 2]", "'vq_train.betas[1]' must be <= 1, got 2.0"),
    ("data.split.ratios=[0.8, -0.1, 0.3]", "'data.split.ratios[1]' must be >= 0, got -0.1"),
])
def test_float_keys_out_of_range_are_refused(item, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config([ROOT / "configs" / "demo.yaml"], [item])


def test_non_finite_value_in_a_file_and_a_checkpoint_config(tmp_path):
    (tmp_path / "n.yaml").write_text("sampler:\n  clip_kappa: .nan\n")
    with pytest.raises(ConfigError, match="n.yaml: key 'sampler.clip_kappa' must be a finite number, got nan"):
        load_config([tmp_path / "n.yaml"])
    bad = config_to_dict(Config())
    bad["sampler"]["clip_r0_local"] = float("inf")
    with pytest.raises(ConfigError, match="ckpt.pt \\(config\\): key 'sampler.clip_r0_local' must be a finite"):
        config_from_dict(bad, "ckpt.pt (config)")


def _alias_bomb(levels: int = 10) -> str:
    """``vqgan.channels`` holding 10**levels elements through nested aliases (a few hundred bytes)."""
    rows = ["  - &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    rows += [f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "vqgan:\n  channels:\n" + "\n".join(rows) + "\n"


def test_yaml_alias_bomb_fails_fast_naming_the_file(tmp_path):
    """The bomb's error message used to repr the expanded value: 53 s, 2.8 GB, MemoryError."""
    import time

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config([bomb])
    assert time.perf_counter() - t0 < 2.0
    msg = str(err.value)
    assert msg.startswith(f"{bomb}: invalid YAML (aliases expand to more than") and len(msg) < 400, msg
    # The same through --set, and a recursive alias.
    with pytest.raises(ConfigError, match="aliases expand to more than"):
        load_config([], ["vqgan.channels=" + "[" + _alias_bomb().split("channels:\n", 1)[1].replace("\n  - ", ", ")
                         .replace("  - ", "", 1).strip() + "]"])
    (tmp_path / "loop.yaml").write_text("vqgan:\n  channels: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="loop.yaml: invalid YAML \\(a recursive alias"):
        load_config([tmp_path / "loop.yaml"])
    # A few aliases within the budget still work (anchors are ordinary YAML).
    (tmp_path / "ok.yaml").write_text("vq_train:\n  lr_g: &lr 2.0e-4\nldm_train:\n  lr: *lr\n")
    cfg = load_config([tmp_path / "ok.yaml"])
    assert cfg.vq_train.lr_g == cfg.ldm_train.lr == 2.0e-4


def test_wrong_values_are_never_printed_whole(tmp_path):
    """A wrong-typed value within the budget, a long string, a deep nesting: short messages, no traceback."""
    (tmp_path / "big.yaml").write_text("vqgan:\n  channels: [[" + ", ".join(["7"] * 5000) + "]]\n")
    with pytest.raises(ConfigError) as err:
        load_config([tmp_path / "big.yaml"])
    assert "expected int, got [7, 7, 7, 7, 7, 7, ...] (list)" in str(err.value) and len(str(err.value)) < 300
    (tmp_path / "long.yaml").write_text("run:\n  name: [" + "x" * 200_000 + "]\n")
    with pytest.raises(ConfigError) as err:
        load_config([tmp_path / "long.yaml"])
    assert len(str(err.value)) < 300
    (tmp_path / "key.yaml").write_text("run:\n  " + "k" * 1000 + ": 1\n")
    with pytest.raises(ConfigError, match="unknown key 'run.kkk") as err:
        load_config([tmp_path / "key.yaml"])
    assert len(str(err.value)) < 300
    (tmp_path / "deep.yaml").write_text("vqgan:\n  channels: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: invalid YAML \\(nested too deeply"):
        load_config([tmp_path / "deep.yaml"])
    (tmp_path / "huge.yaml").write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="huge.yaml: .* bytes, not a config file"):
        load_config([tmp_path / "huge.yaml"])
