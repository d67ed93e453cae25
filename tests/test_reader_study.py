"""tools.reader_study: blinded export, sheet validation, and the aggregation arithmetic on hand-made sheets."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tools import reader_study as rs
from data.io import read_image
from tests.conftest import write_gray

HEADER = "case_id,side,reader,vessel_visibility,airway_visibility,bone_suppression,lesion_present,lesion_location,notes\n"


@pytest.fixture
def sources(tmp_path):
    """Two folders of 6 cases (CXR as 16-bit PNG with distinct values; soft tissue as 8-bit)."""
    rng = np.random.default_rng(0)
    names = [f"secret_{i}.png" for i in range(6)]
    for n in names:
        write_gray(tmp_path / "cxr" / n, rng.integers(0, 65536, (12, 10), dtype=np.uint16))
        write_gray(tmp_path / "soft" / n, rng.integers(0, 256, (12, 10), dtype=np.uint8))
    (tmp_path / "list.txt").write_text("".join(f"{n}\n" for n in names))
    return tmp_path, names


def _export(tmp_path, out="pkg", **kw):
    return rs.export([f"cxr={tmp_path / 'cxr'}", f"soft={tmp_path / 'soft'}"], tmp_path / out,
                     list_file=tmp_path / "list.txt", **kw)


def test_export_is_blinded_balanced_and_seeded(sources):
    tmp_path, names = sources
    key = _export(tmp_path, readers=("junior", "senior"), seed=3)
    pkg = tmp_path / "pkg"
    assert (tmp_path / "pkg.key.json").is_file() and not list(pkg.rglob("*.json"))    # key beside, not inside
    assert json.loads((tmp_path / "pkg.key.json").read_text()) == key
    cases = key["cases"]
    assert sorted(c["name"] for c in cases) == names
    assert [c["case_id"] for c in cases] == [f"C{i:03d}" for i in range(1, 7)]
    assert sum(c["L"] == "soft" for c in cases) == 3 and all({c["L"], c["R"]} == {"cxr", "soft"} for c in cases)
    # nothing in the package names a patient
    text = "".join(p.read_text() for p in pkg.rglob("*") if p.suffix in (".csv", ".html", ".txt"))
    assert "secret" not in text and all("secret" not in p.name for p in pkg.rglob("*"))
    # the images are the sources' pixels (16-bit stays 16-bit), on the recorded side
    for c in cases:
        for side in ("L", "R"):
            shown = read_image(pkg / "images" / f"{c['case_id']}_{side}.png")
            src = read_image(tmp_path / c[side] / c["name"])
            np.testing.assert_array_equal(shown.pixels, src.pixels)
            assert shown.bit_depth == src.bit_depth
    rows = list(csv.DictReader(open(pkg / "sheets" / "junior.csv")))
    assert list(rows[0]) == list(rs.COLUMNS) and len(rows) == 12 and {r["reader"] for r in rows} == {"junior"}
    assert "C001_L.png" in (pkg / "viewer.html").read_text()
    # same seed, same study; another seed, another order
    assert _export(tmp_path, out="again", seed=3)["cases"] == cases
    assert (tmp_path / "again" / "sheet.csv").is_file()
    assert _export(tmp_path, out="other", seed=4)["cases"] != cases
    assert len(_export(tmp_path, out="subset", seed=3, n=2)["cases"]) == 2


def test_export_refusals(sources):
    tmp_path, _ = sources
    _export(tmp_path)
    with pytest.raises(FileExistsError, match="not empty"):
        _export(tmp_path)
    _export(tmp_path, force=True, n=2)
    assert len(list((tmp_path / "pkg" / "images").iterdir())) == 4         # the earlier export's images are gone
    with pytest.raises(ValueError, match="inside the reader package"):
        _export(tmp_path, out="p2", key_path=tmp_path / "p2" / "key.json")
    (tmp_path / "soft" / "secret_4.png").unlink()
    with pytest.raises(FileNotFoundError, match="secret_4.png"):
        _export(tmp_path, out="p3")
    with pytest.raises(ValueError, match="exactly two"):
        rs.export([f"cxr={tmp_path / 'cxr'}"], tmp_path / "p4")


# ----------------------------------------------------------------------------------- aggregation

def hand_key(tmp_path):
    """4 cases; soft tissue on the left for c0 and c2."""
    cases = [{"case_id": "C001", "name": "c0.png", "L": "soft", "R": "cxr"},
             {"case_id": "C002", "name": "c1.png", "L": "cxr", "R": "soft"},
             {"case_id": "C003", "name": "c2.png", "L": "soft", "R": "cxr"},
             {"case_id": "C004", "name": "c3.png", "L": "cxr", "R": "soft"}]
    path = tmp_path / "study.key.json"
    path.write_text(json.dumps({"format": rs.KEY_FORMAT, "seed": 0, "labels": ["cxr", "soft"], "cases": cases}))
    return path


# reader A: soft vessel 3,2,3,2 (c0..c3); cxr vessel 1,1,2,1; lesions soft yes,yes,yes,no; cxr yes,no,no,no
SHEET_A = HEADER + """C001,L,A,3,3,3,yes,right upper zone,
C001,R,A,1,2,1,yes,right upper,
C002,L,A,1,2,1,no,,
C002,R,A,2,2,3,yes,left lower,
C003,L,A,3,3,2,yes,,
C003,R,A,2,2,1,no,,
C004,L,A,1,1,1,no,,
C004,R,A,2,3,3,no,,
"""
# reader B (semicolons, BOM, a blank score and a blank lesion answer, an extra column, y/n spellings)
SHEET_B = "\ufeff" + HEADER.strip().replace(",", ";") + ";extra\n" + """C001;L;B;3;3;3;y;;;x
C001;R;B;2;2;1;n;;;x
C002;L;B;2;2;1;n;;;x
C002;R;B;3;;2;Y;;;x
C003;L;B;3;3;3;;;;x
C003;R;B;1;1;1;no;;;x
C004;L;B;2;2;1;yes;;;x
C004;R;B;2;3;3;no;;;x
"""
NODULES = "name,row,col,radius\nc0.png,10,10,3\nc0.png,20,20,2\nc1.png,5,5,2\nc9.png,1,1,1\n"


def test_aggregate_arithmetic(tmp_path):
    key = hand_key(tmp_path)
    (tmp_path / "a.csv").write_text(SHEET_A)
    (tmp_path / "b.csv").write_text(SHEET_B, encoding="utf-8")
    (tmp_path / "nodules.csv").write_text(NODULES)
    s = rs.aggregate(key, [tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "out", tmp_path / "nodules.csv")
    q = s["quality"]
    assert s["readers"] == ["A", "B"] and s["n_rows"] == 16
    assert q["soft"]["vessel_visibility"]["A"]["mean"] == pytest.approx(2.5)          # 3, 2, 3, 2
    assert q["soft"]["vessel_visibility"]["B"]["mean"] == pytest.approx(2.75)         # 3, 3, 3, 2
    assert q["soft"]["vessel_visibility"]["Mean"]["mean"] == pytest.approx(2.625)     # mean of reader means
    assert q["cxr"]["vessel_visibility"]["A"]["mean"] == pytest.approx(1.25)          # 1, 1, 2, 1
    assert q["soft"]["airway_visibility"]["B"] == {"mean": 3.0, "std": 0.0, "n": 3}  # 3, (blank), 3, 3
    assert q["cxr"]["airway_visibility"]["B"] == {"mean": pytest.approx(1.75), "std": pytest.approx(np.std([2, 2, 1, 2])), "n": 4}
    # detection against nodules.csv: lesions in c0 and c1 (c9 is not in the study)
    d = s["detection"]
    assert s["n_lesion"] == 2
    a_soft = d["soft"]["A"]                                  # yes, yes, yes, no -> TP 2, FP 1, FN 0
    assert (a_soft["tp"], a_soft["fp"], a_soft["fn"], a_soft["tn"]) == (2, 1, 0, 1)
    assert (a_soft["precision"], a_soft["recall"], a_soft["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    a_cxr = d["cxr"]["A"]                                    # yes, no, no, no -> TP 1, FN 1
    assert (a_cxr["precision"], a_cxr["recall"], a_cxr["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))
    b_soft = d["soft"]["B"]                                  # y, Y, (blank), no -> TP 2 of 3 answered
    assert (b_soft["n"], b_soft["tp"], b_soft["fp"], b_soft["fn"]) == (3, 2, 0, 0)
    assert d["soft"]["Mean"]["f1"] == pytest.approx((0.8 + 1.0) / 2)
    md = (tmp_path / "out" / "detection.md").read_text()
    assert "| A | 1.00 / 0.50 / 0.67 | 0.67 / 1.00 / 0.80 |" in md
    qmd = (tmp_path / "out" / "quality.md").read_text()
    assert "| Lung-vessel visibility | 2.500 | 2.750 | 2.625 |" in qmd
    assert "### Image quality: soft (maximum score 3)" in qmd
    rows = list(csv.DictReader(open(tmp_path / "out" / "unblinded.csv")))
    assert len(rows) == 16 and rows[0]["name"] == "c0.png" and rows[0]["source"] == "soft"
    assert any("blank" in w for w in s["warnings"])
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["detection"]["soft"]["B"]["f1"] == pytest.approx(1.0)
    # the same reference in the explicit format (by case ID and by stem) gives the same table
    (tmp_path / "ref.csv").write_text("case_id,lesion\nC001,yes\nc1,yes\nC003,no\nc3.png,no\n")
    s2 = rs.aggregate(key, [tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "out2", tmp_path / "ref.csv")
    assert s2["detection"] == s["detection"]


def test_bone_suppression_means(tmp_path):
    """Unblinding puts each row under the right source: reader A's bone scores, soft = L of c0/c2, R of c1/c3."""
    key = hand_key(tmp_path)
    (tmp_path / "a.csv").write_text(SHEET_A)
    q = rs.aggregate(key, [tmp_path / "a.csv"], tmp_path / "out")["quality"]
    assert q["soft"]["bone_suppression"]["A"]["mean"] == pytest.approx((3 + 3 + 2 + 3) / 4)
    assert q["cxr"]["bone_suppression"]["A"]["mean"] == pytest.approx((1 + 1 + 1 + 1) / 4)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace("C002,R,A,2,2,3", "C002,R,A,2,4,3"), r"a\.csv: row 5, column 'airway_visibility': score '4' is outside 1–3"),
    (lambda t: t.replace("C003,L,A,3,3,2", "C003,L,A,0,3,2"), r"row 6, column 'vessel_visibility': score '0'"),
    (lambda t: t.replace("C003,L,A,3,3,2", "C003,L,A,good,3,2"), r"row 6, column 'vessel_visibility': 'good' is not a score"),
    (lambda t: t.replace("C004,L,A", "C009,L,A"), r"row 8, column 'case_id': unknown case ID 'C009'"),
    (lambda t: t.replace("C004,L,A", "C004,X,A"), r"row 8, column 'side': 'X' is not L or R"),
    (lambda t: t.replace("C004,L,A", "C004,L,"), r"row 8, column 'reader': empty reader name"),
    (lambda t: t.replace("C004,L,A,1,1,1,no", "C004,L,A,1,1,1,maybe"), r"row 8, column 'lesion_present': 'maybe' is not yes or no"),
    (lambda t: t.replace("C004,L,A", "C003,L,A"), r"row 8, column 'case_id': reader 'A' scored C003 L twice \(also .*a\.csv row 6\)"),
    (lambda t: t.replace(",airway_visibility", ""), r"a\.csv: row 1: missing column\(s\) 'airway_visibility'"),
])
def test_invalid_sheet_names_file_row_column(tmp_path, edit, match):
    key = hand_key(tmp_path)
    (tmp_path / "a.csv").write_text(edit(SHEET_A))
    with pytest.raises(rs.SheetError, match=match):
        rs.aggregate(key, [tmp_path / "a.csv"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_one_line_error_and_reference_errors(tmp_path, capsys):
    key = hand_key(tmp_path)
    (tmp_path / "a.csv").write_text(SHEET_A.replace("C002,R,A,2,2,3", "C002,R,A,2,5,3"))
    assert rs.main(["aggregate", "--key", str(key), "--sheets", str(tmp_path / "a.csv"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "row 5, column 'airway_visibility'" in err
    (tmp_path / "a.csv").write_text(SHEET_A)
    (tmp_path / "ref.csv").write_text("name,lesion\nc0.png,yes\nc1.png,no\n")
    with pytest.raises(rs.SheetError, match=r"ref\.csv: no entry for 2 case\(s\)"):
        rs.aggregate(key, [tmp_path / "a.csv"], tmp_path / "o", tmp_path / "ref.csv")
    (tmp_path / "ref.csv").write_text("name,lesion\nc0.png,yes\nc1.png,perhaps\n")
    with pytest.raises(rs.SheetError, match=r"row 3, column 'lesion'"):
        rs.aggregate(key, [tmp_path / "a.csv"], tmp_path / "o", tmp_path / "ref.csv")
    assert rs.prf(0, 0, 0)[0] != rs.prf(0, 0, 0)[0]          # NaN: no answers, no lesions
    assert rs.prf(0, 2, 1) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("damage, needle", [
    (lambda k: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (lambda k: {**k, "cases": {"C001": 1}}, "damaged key: 'cases' must be a list"),
    (lambda k: {**k, "cases": [{"case_id": "C001"}]}, "damaged key: cases[0] needs the strings"),
    (lambda k: {**k, "labels": "ab"}, "damaged key: 'labels' must be two condition names"),
])
def test_damaged_key_and_sheet_are_one_error_line(tmp_path, capsys, damage, needle):
    """An edited or hostile key (or a sheet csv cannot parse) is one error line, not a traceback."""
    import json

    key = hand_key(tmp_path)
    bad = damage(json.loads(key.read_text()))
    key.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    (tmp_path / "a.csv").write_text(SHEET_A)
    assert rs.main(["aggregate", "--key", str(key), "--sheets", str(tmp_path / "a.csv"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{key}: " in err and needle in err, err
    key = hand_key(tmp_path)
    (tmp_path / "a.csv").write_text(SHEET_A.replace("C002,R,A", "C002,R," + "x" * 200_000, 1))
    assert rs.main(["aggregate", "--key", str(key), "--sheets", str(tmp_path / "a.csv"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a.csv: not a readable CSV sheet" in err, err
