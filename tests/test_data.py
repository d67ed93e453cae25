"""Splits, list files, datasets and the dataSegmentation.py scan / report / split."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.datasets import ImageDataset, PairedDataset, split_list
from data.io import ImageError, list_images, read_image
from data.masking import binarize_mask, load_mask, masked_copy
from data.splits import list_paths, read_list, read_split, split_names, write_split
from stages.dataset import prepare_dataset, scan_pairs
from tests.conftest import write_gray
from utils.config import load_config


def image_names(folder):
    return [p.name for p in list_images(folder)]


# ------------------------------------------------------------------------------------------ splits

def test_split_counts_follow_gl_lcm():
    names = [f"{i}.png" for i in range(818)]
    s = split_names(names, [0.8, 0.1, 0.1], seed=42)
    assert [len(s[k]) for k in ("train", "val", "test")] == [654, 81, 83]
    assert sorted(s["train"] + s["val"] + s["test"]) == sorted(names)
    j = split_names(names[:241], [0.8, 0.1, 0.1], seed=0)
    assert [len(j[k]) for k in ("train", "val", "test")] == [192, 24, 25]


def test_split_is_reproducible_and_seeded():
    names = [f"n{i}.png" for i in range(50)]
    a = split_names(names, seed=3)
    assert a == split_names(list(reversed(names)), seed=3)     # input order does not matter
    assert a != split_names(names, seed=4)


@pytest.mark.parametrize("ratios", [[0.8, 0.2], [0.5, 0.5, 0.5], [1.2, -0.1, -0.1]])
def test_bad_ratios(ratios):
    with pytest.raises(ValueError, match="ratios"):
        split_names(["a", "b"], ratios)


def test_list_files_refuse_overwrite_and_read_back(tmp_path):
    split = split_names([f"{i}.png" for i in range(10)], seed=1)
    paths = write_split(split, tmp_path, "X")
    assert paths["train"].name == "X_trainset.txt"
    assert read_split(tmp_path, "X") == split
    before = paths["test"].read_text()
    with pytest.raises(FileExistsError, match="--force"):
        write_split(split_names([f"{i}.png" for i in range(10)], seed=2), tmp_path, "X")
    assert paths["test"].read_text() == before
    write_split(split, tmp_path, "X", force=True)


def test_read_list_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt: split list not found"):
        read_list(tmp_path / "nope.txt")
    (tmp_path / "d.txt").write_text("a.png\n\n# comment\na.png\n")
    with pytest.raises(ValueError, match="'a.png' is listed twice"):
        read_list(tmp_path / "d.txt")
    for s, p in list_paths(tmp_path, "O").items():
        p.write_text("same.png\n")
    with pytest.raises(ValueError, match="in both the train and val lists"):
        read_split(tmp_path, "O")


# ----------------------------------------------------------------------------------------- datasets

def test_paired_dataset_items(pair_folder):
    names = image_names(pair_folder / "CXR")
    ds = PairedDataset(pair_folder, names, image_size=16, with_mask=True)
    item = ds[0]
    assert item["cxr"].shape == item["bs"].shape == item["mask"].shape == (1, 16, 16)
    assert item["cxr"].min() >= -1 and item["cxr"].max() <= 1
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["name"] == names[0] and item["size"] == (32, 32)
    raw = read_image(pair_folder / "CXR" / names[0]).pixels
    np.testing.assert_allclose(PairedDataset(pair_folder, names, 32)[0]["cxr"][0].numpy(), raw * 2 - 1, atol=1e-6)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["cxr"].shape == (4, 1, 16, 16) and len(batch["name"]) == 4


def test_paired_dataset_augmentation_is_seeded_and_shared(pair_folder):
    names = image_names(pair_folder / "CXR")
    plain = PairedDataset(pair_folder, names, 32, with_mask=True)[0]
    a = PairedDataset(pair_folder, names, 32, with_mask=True, augment=True, seed=5)
    b = PairedDataset(pair_folder, names, 32, with_mask=True, augment=True, seed=5)
    ia, ib = a[0], b[0]
    assert torch.equal(ia["cxr"], ib["cxr"]) and not torch.equal(ia["cxr"], plain["cxr"])
    # CXR and BS moved together: BS = 0.8 CXR held before the warp, so it (roughly) holds after it
    assert torch.corrcoef(torch.stack([ia["cxr"].flatten(), ia["bs"].flatten()]))[0, 1] > 0.9
    a.set_epoch(1)
    assert not torch.equal(a[0]["cxr"], ia["cxr"])


def test_paired_dataset_errors(pair_folder):
    with pytest.raises(FileNotFoundError, match="Masked_CXR"):
        PairedDataset(pair_folder, ["case00.png"], 16, masked=True)
    write_gray(pair_folder / "BS" / "case00.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(ImageError, match="differs from its CXR"):
        PairedDataset(pair_folder, ["case00.png"], 16)[0]


def test_image_dataset_union(pair_folder):
    names = image_names(pair_folder / "CXR")[:3]
    ds = ImageDataset(pair_folder, names, ["CXR", "BS"], 16)
    assert len(ds) == 6 and ds[4]["subdir"] == "BS" and ds[4]["image"].shape == (1, 16, 16)


def test_masked_copy():
    img = np.array([[0.2, 0.4], [0.6, 1.0]], np.float32)
    mask = binarize_mask(np.array([[1.0, 0.0], [0.6, 0.4]]))
    out = masked_copy(img, mask)
    np.testing.assert_allclose(out, [[0.0, 0.0], [0.5, 0.0]], atol=1e-6)


# ------------------------------------------------------------------------------- dataSegmentation

def demo_cfg(root, **extra):
    sets = [f"data.root={root}", "data.name=t"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config([], sets)


def test_scan_split_and_masked_copies(pair_folder, capsys):
    cfg = demo_cfg(pair_folder)
    report = prepare_dataset(cfg, progress=False)
    assert len(report.pairs) == 10 and not report.problems
    split = read_split(pair_folder, "t")
    assert sum(len(v) for v in split.values()) == 10 and len(split["train"]) == 8
    assert split_list(cfg.data, "test") == split["test"]
    assert image_names(pair_folder / "Masked_CXR") == image_names(pair_folder / "CXR")
    m = read_image(pair_folder / "Masked_BS" / "case03.png").pixels
    mask = read_image(pair_folder / "Mask" / "case03.png").pixels > 0.5
    assert (m[~mask] == 0).all() and m[mask].max() == 1.0
    assert (pair_folder / "t_config.yaml").is_file()
    # same config -> same split; refuses to overwrite without force
    with pytest.raises(FileExistsError, match="--force"):
        prepare_dataset(cfg, progress=False)
    prepare_dataset(cfg, force=True, progress=False)
    assert read_split(pair_folder, "t") == split


def test_bad_inputs_are_reported_not_dropped(pair_folder, capsys):
    rng = np.random.default_rng(0)
    (pair_folder / "CXR" / "case01.png").write_bytes(b"corrupt")                    # unreadable
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(pair_folder / "BS" / "case02.png")
    opaque = np.full((32, 32, 4), 9, np.uint8)
    opaque[..., 3] = 255
    Image.fromarray(opaque).save(pair_folder / "CXR" / "case03.png")                 # gray as RGBA: fine
    rgba = np.full((32, 32, 4), 9, np.uint8)
    rgba[..., 3] = 10
    Image.fromarray(rgba).save(pair_folder / "CXR" / "case04.png")                   # transparent RGBA
    write_gray(pair_folder / "BS" / "case05.png", np.zeros((16, 32), np.uint8))      # size mismatch
    (pair_folder / "CXR" / "case06.png").unlink()                                   # missing partner
    write_gray(pair_folder / "CXR" / "extra.png", np.zeros((32, 32), np.uint8))      # missing partner
    (pair_folder / "BS" / "notes.txt").write_text("hello")                           # not an image
    report = prepare_dataset(demo_cfg(pair_folder), progress=False)
    text = (pair_folder / "t_report.txt").read_text()
    problems = dict(report.problems)
    assert "not a readable image" in problems[str(pair_folder / "CXR" / "case01.png")]
    assert "colour image" in problems[str(pair_folder / "BS" / "case02.png")]
    assert "transparency" in problems[str(pair_folder / "CXR" / "case04.png")]
    assert "differs from its CXR" in problems[str(pair_folder / "BS" / "case05.png")]
    assert "no CXR partner" in problems[str(pair_folder / "BS" / "case06.png")]
    assert "no soft-tissue partner" in problems[str(pair_folder / "CXR" / "extra.png")]
    assert "not an image file" in problems[str(pair_folder / "BS" / "notes.txt")]
    assert sorted(report.pairs) == ["case00.png", "case03.png", "case07.png", "case08.png", "case09.png"]
    for f in problems:
        assert f in text
    assert "problem:" in capsys.readouterr().err
    listed = sum(read_split(pair_folder, "t").values(), [])
    assert sorted(listed) == sorted(report.pairs)


def test_strict_and_empty(pair_folder, tmp_path):
    write_gray(pair_folder / "BS" / "case05.png", np.zeros((16, 32), np.uint8))
    with pytest.raises(ValueError, match="1 problem"):
        prepare_dataset(demo_cfg(pair_folder), strict=True, progress=False)
    assert not (pair_folder / "t_trainset.txt").exists()
    empty = tmp_path / "empty"
    (empty / "CXR").mkdir(parents=True)
    (empty / "BS").mkdir()
    with pytest.raises(ValueError, match="problem"):
        prepare_dataset(demo_cfg(empty), progress=False)
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        prepare_dataset(demo_cfg(tmp_path / "nowhere"), progress=False)


def test_cli_error_is_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "dataSegmentation.py", "--set", f"data.root={tmp_path}/x",
                          "--set", "data.nme=1"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --set data.nme=1: unknown key 'data.nme' (did you mean 'data.name'?)"


def test_auto_masks_on_real_samples(szch_samples, tmp_path):
    import shutil

    root = tmp_path / "real"
    for sub in ("CXR", "BS"):
        shutil.copytree(szch_samples / sub, root / sub)
    (root / "CXR" / "2.png").write_bytes((root / "CXR" / "0.png").read_bytes())
    write_gray(root / "BS" / "2.png", np.zeros((1024, 1024), np.uint8))
    write_gray(root / "CXR" / "3.png", np.full((1024, 1024), 128, np.uint8))     # blank: no lungs to find
    write_gray(root / "BS" / "3.png", np.full((1024, 1024), 128, np.uint8))
    report = prepare_dataset(demo_cfg(root), masks="auto", progress=False)
    assert sorted(report.pairs) == ["0.png", "1.png", "2.png"]
    assert "automatic lung mask failed" in dict(report.problems)[str(root / "CXR" / "3.png")]
    mask = read_image(root / "Mask" / "0.png").pixels
    assert set(np.unique(mask)) == {0.0, 1.0} and 0.15 < mask.mean() < 0.4
    assert (root / "Masked_CXR" / "1.png").is_file() and not (root / "Mask" / "3.png").exists()


def test_links_to_nothing_and_image_named_folders_are_named(tmp_path, capsys):
    """A dangling link, a link loop and a folder called dir.png used to be skipped without a word."""
    import os

    for sub in ("CXR", "BS"):
        d = tmp_path / sub
        d.mkdir()
        write_gray(d / "a.png", np.full((16, 16), 100, np.uint8))
        os.symlink(d / "missing.png", d / "dangling.png")
        os.symlink(d / "loop.png", d / "loop.png")
        (d / "dir.png").mkdir()
    skipped = []
    assert list_images(tmp_path / "CXR", must_exist=True, problems=skipped) == [tmp_path / "CXR" / "a.png"]
    named = [f"{p.name}: {why}" for p, why in skipped]
    for name in ("dangling.png: a broken symbolic link", "loop.png: a broken symbolic link",
                 "dir.png: a folder, not an image file"):
        assert any(n.startswith(name) for n in named), named
    report = scan_pairs(tmp_path, progress=False)
    problems = [Path(p).name + ": " + why for p, why in report.problems]
    assert "dir.png: a folder, not an image file, ignored" in problems
    assert sum("broken symbolic link" in p for p in problems) == 4          # two per folder


def test_list_images_options(tmp_path):
    """One lister: sorted image paths; a missing folder is [] or, with must_exist, an error naming it;
    the entries passed over are handed back in listing order when asked for."""
    d = tmp_path / "in"
    assert list_images(d) == []
    with pytest.raises(FileNotFoundError, match=f"{d}: input folder not found"):
        list_images(d, must_exist=True)
    d.mkdir()
    for name in ("b.PNG", "a.dcm", ".hidden.png", "notes.txt", "c.tif"):
        (d / name).write_bytes(b"")
    (d / "sub").mkdir()
    skipped = []
    assert list_images(d, problems=skipped) == [d / "a.dcm", d / "b.PNG", d / "c.tif"]
    assert skipped == [(d / "notes.txt", "not an image file (ignored)")]       # a plain sub-folder is not news


def test_load_mask_finds_checks_and_binarises(tmp_path):
    masks = tmp_path / "Mask"
    m = np.zeros((8, 8), np.uint8)
    m[2:6, 1:4] = 255
    m[0, 0] = 127                                                          # below half scale: not lung
    write_gray(masks / "x.png", m)
    pixels = np.zeros((8, 8), np.float32)
    got = load_mask(tmp_path / "x.dcm", masks, pixels, auto=False, max_pixels=10**6)   # found by stem
    assert got.dtype == bool and got.sum() == 12 and not got[0, 0]
    with pytest.raises(ImageError, match="y.png: lung mask not found"):
        load_mask(tmp_path / "y.png", masks, pixels, auto=False, max_pixels=10**6)
    with pytest.raises(ImageError, match="differs from its CXR"):
        load_mask(tmp_path / "x.png", masks, np.zeros((9, 8)), auto=False, max_pixels=10**6)
    with pytest.raises(ValueError, match="give --masks DIR or set global_local.masks=auto"):
        load_mask(tmp_path / "x.png", None, pixels, auto=False, max_pixels=10**6)


def test_unwritable_list_folder_is_refused_before_the_scan(pair_folder, tmp_path):
    from tests.conftest import smoke_config

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = smoke_config(pair_folder, tmp_path / "runs", f"data.split.list_dir={blocker / 'lists'}")
    with pytest.raises(ValueError, match="cannot write output here"):
        prepare_dataset(cfg, progress=False)


# ---- lists: BOM, duplicates, names leaving the data root (issue 24, 2.10) ---------------------------

def test_read_list_strips_a_bom_and_refuses_duplicates_by_line(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffc00.png\r\nc01.png\r\n".encode("utf-8"))
    assert read_list(tmp_path / "bom.txt") == ["c00.png", "c01.png"]       # not '\ufeffc00.png'
    for text, needle in (("a.png\nb.png\na.png\n", "line 3: 'a.png' is listed twice (first on line 1)"),
                         ("a\nb.png\na.png\n", "line 3: 'a.png' is listed twice (first on line 1)"),
                         ("a.png\na\n", "line 2: 'a' is listed twice (first on line 1)")):
        (tmp_path / "d.txt").write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'd.txt'}: {needle}")):
            read_list(tmp_path / "d.txt")
    (tmp_path / "two.txt").write_text("a.png\na.tif\n")          # two files of one stem: two cases
    assert read_list(tmp_path / "two.txt") == ["a.png", "a.tif"]


@pytest.mark.parametrize("name", ["../x.png", "sub/../../x.png", "/etc/passwd", "C:\\x.png", "..\\x.png",
                                  "a\0b.png"])
def test_read_list_refuses_names_leaving_the_root(tmp_path, name):
    (tmp_path / "l.txt").write_text(f"ok.png\n{name}\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'l.txt'}: line 2: ") + ".*leaves the data folder"):
        read_list(tmp_path / "l.txt")
    assert read_list(tmp_path / "l.txt", allow_outside=True) == ["ok.png", name]
    (tmp_path / "in.txt").write_text("sub/x.png\n..a.png\nb..png\n")      # inside the root: accepted
    assert read_list(tmp_path / "in.txt") == ["sub/x.png", "..a.png", "b..png"]
