"""The repository's own papers: a licence that permits reuse, and a citation file for both papers;
its layering (each package imports only the floors below it) and its root."""
from __future__ import annotations

import ast

import pytest
import yaml

from pathlib import Path

from tests.conftest import ROOT


def test_licence_and_citation():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT" and cff["authors"]
    ids = {i["value"] for ref in cff["references"] for i in ref["identifiers"]}
    assert ids == {"arXiv:2412.15670", "arXiv:2508.03357"}          # BS-LDM and GL-LCM


# Each package may import only the packages of the floors below it (README "Layout"); an import
# upwards would make a cycle or tie a library to a script.
FLOORS = {"utils": set(), "data": {"utils"}, "models": {"utils", "data"}, "evaluation": {"utils", "data"},
          "stages": {"utils", "data", "models", "evaluation"}, "node": {"utils", "data", "models"},
          "tools": {"utils", "data", "models", "evaluation", "stages", "node", "tools"}}
ROOT_SCRIPTS = {"dataSegmentation.py", "vq-gan_train.py", "vq-gan_eval.py", "ldm_train.py", "ldm_eval.py",
                "metrics.py", "demo.py", "convert_reference.py", "dicom_node.py"}


def imported_tops(path) -> list[tuple[int, str]]:
    """(line, top-level module name) of every import in a file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node.lineno, (node.module or "").split(".")[0]))
    return out


def test_each_floor_imports_only_the_floors_below():
    ours = set(FLOORS) | {Path(s).stem for s in ROOT_SCRIPTS}
    for pkg, allowed in FLOORS.items():
        for f in sorted((ROOT / pkg).glob("*.py")):
            for line, top in imported_tops(f):
                if top in ours and top != pkg:
                    assert top in allowed, f"{pkg}/{f.name}:{line} imports {top}, above its floor"


def test_no_script_loads_a_script():
    """The root scripts are leaves: thin command lines over the packages. No package, script or tool
    imports one, or executes one by path (importlib / runpy); tests run them as commands (or call the
    ``main(argv)`` of one with an importable name, as a user's shell would)."""
    names = {Path(s).stem for s in ROOT_SCRIPTS}
    files = sorted(ROOT.glob("*.py")) + [f for pkg in FLOORS for f in sorted((ROOT / pkg).glob("*.py"))]
    for f in files:
        for line, top in imported_tops(f):
            assert top not in names, f"{f.relative_to(ROOT)}:{line} imports the script {top}.py"
        text = f.read_text(encoding="utf-8")
        for loader in ("spec_from_file_location", "run_path(", "load_script"):
            assert loader not in text, f"{f.relative_to(ROOT)} loads a file as a module ({loader})"


def test_root_holds_the_pipeline_scripts_only():
    """The design card's six scripts, the front door and the converter; research kits live in tools/."""
    assert {f.name for f in ROOT.glob("*.py")} == ROOT_SCRIPTS
    assert not list((ROOT / "docs").glob("*.py"))


def test_every_tool_runs_one_way_and_says_so():
    """Each research kit imports without work, has a ``main`` and documents ``python -m tools.<name>``."""
    import importlib

    names = sorted(f.stem for f in (ROOT / "tools").glob("*.py") if f.stem != "__init__")
    assert len(names) == 13
    for name in names:
        module = importlib.import_module(f"tools.{name}")
        assert callable(getattr(module, "main", None)), name
        assert f"python -m tools.{name}" in module.__doc__, name


# Writers of part B of issue 24 (being reworked there); each must switch to utils.atomic.json_text.
JSON_PENDING: set[str] = set()


def test_no_json_file_can_hold_nan():
    """Every json.dump/json.dumps whose text may reach a file passes allow_nan=False (json_text does, and
    turns NaN/Infinity into null): ``timing.json`` held NaN once, which no strict JSON reader accepts."""
    offenders = []
    for f in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("*/*.py")):
        rel = f.relative_to(ROOT).as_posix()
        if rel.startswith(("tests/", ".venv/")) or rel in JSON_PENDING:
            continue
        tree = ast.parse(f.read_text(encoding="utf-8"))
        hashed = {id(n) for call in ast.walk(tree) if isinstance(call, ast.Call)
                  and ast.unparse(call.func).startswith("hashlib.") for n in ast.walk(call)}   # digests, never written
        for call in ast.walk(tree):
            if (isinstance(call, ast.Call) and ast.unparse(call.func) in ("json.dump", "json.dumps")
                    and id(call) not in hashed
                    and not any(k.arg == "allow_nan" and ast.unparse(k.value) == "False" for k in call.keywords)):
                offenders.append(f"{rel}:{call.lineno}")
    assert not offenders, offenders

    from utils.atomic import json_text
    import json

    text = json_text({"a": float("nan"), "b": [float("inf"), (1.5, float("-inf"))]})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON")) == {"a": None, "b": [None, [1.5, None]]}
