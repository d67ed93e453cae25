"""The authors' published checkpoints (whole pickled models) as checkpoints of this project.

The reference code saves ``torch.save(model)`` of two classes:

* ``modules.unet.UNetModel`` (its copy of guided-diffusion): parameter names, order and shapes are
  those of :class:`models.unet.UNetModel`. The q/k/v split order of attention is not in the weights;
  the pickle records it only as the class of each attention block's ``attention`` child
  (``QKVAttention``: the new order, GL-LCM; ``QKVAttentionLegacy``: BS-LDM). Loading with the wrong
  order passes a strict ``load_state_dict`` and silently changes every output, so it is read from
  the file and written into the config.
* ``generative.networks.nets.vqvae.VQVAE`` (MONAI-Generative 0.2): the same tensors as
  :class:`models.vqgan.VQGAN` under other names. MONAI wraps each conv in a block with a ``.conv``
  child and puts the ReLU inside that block, so one level of the encoder is 1 + R entries of its
  ``blocks`` where ours is 2 + R (conv, ReLU, R residual units); see :func:`reference_vqgan_key`.

Files are read with :func:`utils.foreign_pickle.read_module_tree`, which runs nothing from them.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from models.unet import build_unet
from models.vqgan import VQGAN
from utils.config import Config
from utils.foreign_pickle import ForeignPickleError, ModuleNode, read_module_tree

UNET_CLASS = "modules.unet.UNetModel"
VQVAE_CLASS = "generative.networks.nets.vqvae.VQVAE"
ATTENTION_CLASSES = {"QKVAttention": True, "QKVAttentionLegacy": False}   # -> use_new_attention_order
# Every class a genuine file names lies in its authors' packages or in torch.nn (numpy for scalars).
UNET_NAMESPACES = ("modules.", "torch.nn.modules.", "numpy.")
VQVAE_NAMESPACES = ("generative.", "monai.", "torch.nn.modules.", "numpy.")

METHODS = ("gl-lcm", "bs-ldm")
DATASETS = ("szch", "jsrt")

# The published test-set scores (GL-LCM paper, Tables of SZCH-X-Rays and JSRT; the BS-LDM rows are
# that paper's re-run of BS-LDM), mean ± std, computed by the reference metric code, which
# ``metrics.py --mode faithful`` reproduces.
PUBLISHED_SCORES = {
    ("gl-lcm", "szch"): {"BSR (%)": "95.611 ± 1.529", "MSE (1e-3)": "0.512 ± 0.293",
                         "PSNR (dB)": "33.347 ± 1.829", "LPIPS": "0.056 ± 0.015"},
    ("bs-ldm", "szch"): {"BSR (%)": "94.159 ± 2.751", "MSE (1e-3)": "0.701 ± 0.293",
                         "PSNR (dB)": "31.953 ± 1.969", "LPIPS": "0.070 ± 0.018"},
    ("gl-lcm", "jsrt"): {"BSR (%)": "90.056 ± 10.635", "MSE (1e-3)": "0.746 ± 0.680",
                         "PSNR (dB)": "32.951 ± 3.799", "LPIPS": "0.052 ± 0.015"},
    ("bs-ldm", "jsrt"): {"BSR (%)": "89.322 ± 9.562", "MSE (1e-3)": "0.783 ± 0.632",
                         "PSNR (dB)": "32.307 ± 3.231", "LPIPS": "0.058 ± 0.017"},
}


def reference_vqgan_key(key: str, res_layers: int) -> str:
    """The MONAI VQVAE name of one of our VQGAN state-dict keys (R = ``res_layers`` units per level).

    Encoder, ours -> MONAI: level i's conv ``(2+R)i`` -> ``(1+R)i.conv``; its unit r ``(2+R)i+2+r`` ->
    ``(1+R)i+1+r`` with ``conv{1,2}`` -> ``conv{1,2}.conv``; the last conv ``(2+R)L`` -> ``(1+R)L.conv``.
    Decoder: the first conv ``0`` -> ``0.conv``; level i's unit r ``1+(2+R)i+r`` -> ``1+(1+R)i+r``; its
    transposed conv ``1+(2+R)i+R`` -> ``1+(1+R)i+R`` + ``.conv``. Quantiser: ``codebook`` ->
    ``quantizer.embedding.weight``, ``ema_embed_sum`` -> ``quantizer.ema_w``.
    """
    quantizer = {"quantizer.codebook": "quantizer.quantizer.embedding.weight",
                 "quantizer.ema_cluster_size": "quantizer.quantizer.ema_cluster_size",
                 "quantizer.ema_embed_sum": "quantizer.quantizer.ema_w"}
    if key in quantizer:
        return quantizer[key]
    m = re.fullmatch(r"(encoder|decoder)\.blocks\.(\d+)\.(conv[12]\.)?(weight|bias)", key)
    if not m:
        raise KeyError(key)
    part, k, unit_conv, leaf = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    stride_ours, stride_ref = 2 + res_layers, 1 + res_layers
    offset = 0 if part == "encoder" else 1          # the decoder's first conv sits before the levels
    if part == "decoder" and k == 0:
        return f"decoder.blocks.0.conv.{leaf}"
    level, pos = divmod(k - offset, stride_ours)
    if part == "encoder":
        # pos 0: the level's conv (or the final conv when level == L); pos >= 2: residual unit pos - 2.
        ref_pos = 0 if pos == 0 else pos - 1
    else:
        ref_pos = pos                                 # units 0..R-1, then the transposed conv at R
    ref = offset + level * stride_ref + ref_pos
    return f"{part}.blocks.{ref}.{unit_conv}conv.{leaf}" if unit_conv else f"{part}.blocks.{ref}.conv.{leaf}"


def match_state(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], names: dict[str, str],
                path: Path) -> dict[str, torch.Tensor]:
    """Our state dict filled from ``theirs`` through ``names`` (our key -> their key), every key and
    shape checked; refuses a missing, extra or differently shaped tensor, naming the file's key."""
    missing = [names[k] for k in ours if names[k] not in theirs]
    if missing:
        raise ForeignPickleError(f"{path}: key {missing[0]!r} is missing ({len(missing)} missing in all); "
                                 "the file is not the model this config describes")
    extra = sorted(set(theirs) - set(names.values()))
    if extra:
        raise ForeignPickleError(f"{path}: unexpected key {extra[0]!r} ({len(extra)} in all); "
                                 "the file is not the model this config describes")
    out = {}
    for k, t in ours.items():
        src = theirs[names[k]]
        if tuple(src.shape) != tuple(t.shape):
            raise ForeignPickleError(f"{path}: key {names[k]!r} has shape {tuple(src.shape)}, "
                                     f"expected {tuple(t.shape)} for this config")
        if not (src.is_floating_point() and t.is_floating_point()):
            raise ForeignPickleError(f"{path}: key {names[k]!r} holds {src.dtype}, expected floating point")
        src = src.detach().to(t.dtype).contiguous()
        # Keep the loaded tensor when it owns its storage (saves a copy of 1.5 GB at paper size).
        out[k] = src if src.untyped_storage().nbytes() == src.numel() * src.element_size() else src.clone()
    return out


def convert_vqgan(path: str | Path, cfg: Config) -> tuple[dict[str, torch.Tensor], int]:
    """(our VQGAN state dict, codebook size K) from the reference VQVAE pickle at ``path``.

    ``cfg.vqgan`` gives the architecture; K is read from the file (256 for BS-LDM, 1024 for GL-LCM).
    """
    path = Path(path)
    tree = read_module_tree(path, VQVAE_CLASS, VQVAE_NAMESPACES)
    theirs = tree.state_dict()
    book = theirs.get("quantizer.quantizer.embedding.weight")
    if book is None or book.ndim != 2:
        raise ForeignPickleError(f"{path}: key 'quantizer.quantizer.embedding.weight' (the codebook) is missing")
    v = cfg.vqgan
    with torch.device("meta"):        # names, shapes and dtypes only: no memory, no initialisation
        ours = VQGAN(in_channels=v.in_channels, channels=v.channels, num_res_channels=v.num_res_channels,
                     num_res_layers=v.num_res_layers, embedding_dim=v.embedding_dim,
                     num_embeddings=book.shape[0]).state_dict()
    names = {k: reference_vqgan_key(k, v.num_res_layers) for k in ours}
    return match_state(ours, theirs, names, path), int(book.shape[0])


def attention_order(tree: ModuleNode, path: Path) -> bool | None:
    """``use_new_attention_order`` as the file records it: the class of every attention block's
    ``attention`` child. None when the network has no attention; refuses a file that mixes orders."""
    orders = {}
    for name, node in tree.named_modules():
        if node.class_name == "AttentionBlock":
            child = node.children.get("attention")
            if child is None or child.class_name not in ATTENTION_CLASSES:
                found = child.class_path if child else "nothing"
                raise ForeignPickleError(f"{path}: {name}.attention is {found}, expected QKVAttention or "
                                         "QKVAttentionLegacy; cannot tell the q/k/v order")
            orders[name] = ATTENTION_CLASSES[child.class_name]
    if len(set(orders.values())) > 1:
        raise ForeignPickleError(f"{path}: attention blocks use both q/k/v orders; not a reference UNet")
    return next(iter(orders.values()), None)


def convert_unet(path: str | Path, cfg: Config, latent_size: int) -> tuple[dict[str, torch.Tensor], bool | None]:
    """(our UNet state dict, use_new_attention_order read from the file or None) from the reference pickle.

    The names, order and shapes are the same as ours; ``cfg.unet`` gives the architecture.
    """
    path = Path(path)
    tree = read_module_tree(path, UNET_CLASS, UNET_NAMESPACES)
    order = attention_order(tree, path)
    with torch.device("meta"):
        ours = build_unet(cfg.unet, image_size=latent_size).state_dict()
    theirs = tree.state_dict()
    n_attn = sum(1 for k in ours if k.endswith(".qkv.weight"))
    n_theirs = sum(1 for _, n in tree.named_modules() if n.class_name == "AttentionBlock")
    if n_attn != n_theirs:
        raise ForeignPickleError(f"{path}: {n_theirs} attention blocks, this config has {n_attn}")
    return match_state(ours, theirs, {k: k for k in ours}, path), order


def convert_reference(cfg: Config, unet_path: str | Path, vqgan_path: str | Path, method: str,
                      dataset: str) -> tuple[dict, dict]:
    """The two checkpoints (keyword arguments of :func:`utils.checkpoint.save_checkpoint`) of a
    converted reference model: ``vqgan`` and ``ldm``, both configs being ``cfg`` with the codebook
    size and the attention order read from the files, and ``ldm_train.vqgan_ckpt`` = ``vqgan.pt``
    (found beside ``ldm.pt``). The UNet fills both the ``unet`` and the ``ema`` slot (the authors
    saved raw weights only). Nothing is written; any mismatch raises ForeignPickleError.
    """
    from utils.config import config_to_dict
    from utils.release import sha256

    unet_path, vqgan_path = Path(unet_path), Path(vqgan_path)
    vq_state, codes = convert_vqgan(vqgan_path, cfg)
    cfg = replace(cfg, vqgan=replace(cfg.vqgan, num_embeddings=codes))    # a new config; the caller's is kept
    latent = cfg.data.image_size // 2 ** len(cfg.vqgan.channels)
    unet_state, order = convert_unet(unet_path, cfg, latent)
    cfg = replace(cfg, unet=cfg.unet if order is None else replace(cfg.unet, use_new_attention_order=order),
                  ldm_train=replace(cfg.ldm_train, vqgan_ckpt="vqgan.pt"))
    sources = {"unet": {"file": unet_path.name, "sha256": sha256(unet_path)},
               "vqgan": {"file": vqgan_path.name, "sha256": sha256(vqgan_path)}}
    facts = {"converted_from": f"{method} ({dataset})", "source": sources,
             "attention_order": {True: "new", False: "legacy", None: "none"}[order]}
    config = config_to_dict(cfg)
    vq = dict(kind="vqgan", step=0, epoch=0, config=config, state={"model": vq_state},
              extra={**facts, "source": {"vqgan": sources["vqgan"]}})
    ldm = dict(kind="ldm", step=0, epoch=0, config=config, state={"unet": unet_state, "ema": unet_state},
               extra={**facts, "latent_size": latent})
    return vq, ldm
