"""The repository's own papers: a licence that permits reuse, and a citation file for both papers;
and its layering: utils/ is the bottom layer."""
from __future__ import annotations

import ast

import yaml

from tests.conftest import ROOT


def test_licence_and_citation():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT" and cff["authors"]
    ids = {i["value"] for ref in cff["references"] for i in ref["identifiers"]}
    assert ids == {"arXiv:2412.15670", "arXiv:2508.03357"}          # BS-LDM and GL-LCM


def test_utils_import_nothing_from_data_or_models():
    """utils/ serves data/, models/ and the scripts; an import the other way round would make a cycle."""
    for f in sorted((ROOT / "utils").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not [n for n in names if n.split(".")[0] in ("data", "models")], f"{f.name}:{node.lineno}: {names}"
