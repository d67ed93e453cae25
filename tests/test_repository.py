"""The repository's own papers: a licence that permits reuse, and a citation file for both papers."""
from __future__ import annotations

import yaml

from tests.conftest import ROOT


def test_licence_and_citation():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT" and cff["authors"]
    ids = {i["value"] for ref in cff["references"] for i in ref["identifiers"]}
    assert ids == {"arXiv:2412.15670", "arXiv:2508.03357"}          # BS-LDM and GL-LCM
