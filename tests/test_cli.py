"""utils/cli.py: the one error wrapper of every command line, and the scripts as thin command lines."""
from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT
from utils.checkpoint import CheckpointError
from utils.cli import entry_point, naming_file
from utils.config import ConfigError


@pytest.mark.parametrize("error", [ConfigError("bad key"), CheckpointError("bad file"), ValueError("bad value"),
                                   FileNotFoundError("x.pt: not found"), FileExistsError("out: exists")])
def test_a_user_error_is_one_line_and_status_2(error, capsys):
    @entry_point()
    def main(argv=None):
        raise error

    assert main() == 2
    assert capsys.readouterr().err == f"error: {error}\n"


def test_extra_errors_statuses_and_bugs(capsys):
    @entry_point(OSError)
    def io_main():
        raise PermissionError("out: not allowed")

    assert io_main() == 2 and capsys.readouterr().err == "error: out: not allowed\n"
    assert entry_point()(lambda: None)() == 0                 # None is success
    assert entry_point()(lambda: 3)() == 3                    # a status is passed on

    @entry_point()
    def buggy():
        raise TypeError("a bug")

    with pytest.raises(TypeError, match="a bug"):             # not the user's fault: the traceback stays
        buggy()
    with pytest.raises(PermissionError):                      # OSError only where a script asks for it
        entry_point()(lambda: (_ for _ in ()).throw(PermissionError("p")))()


def test_naming_file():
    assert naming_file("a/b.png", ValueError("a/b.png: truncated")) == "a/b.png: truncated"
    assert naming_file("a/b.png", ValueError("truncated")) == "a/b.png: truncated"


SCRIPTS = ["dataSegmentation.py", "vq-gan_train.py", "vq-gan_eval.py", "ldm_train.py", "ldm_eval.py",
           "convert_reference.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_card_scripts_are_thin(script):
    """A card script defines no stage logic: at most one function (its ``main``), no classes, and is
    short; what it runs lives in ``stages/``."""
    tree = ast.parse((ROOT / script).read_text(encoding="utf-8"))
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert len(defs) <= 1 and all(isinstance(n, ast.FunctionDef) and n.name == "main" for n in defs), script
    code_lines = len((ROOT / script).read_text().splitlines()) - len(ast.get_docstring(tree).splitlines())
    assert code_lines <= 30, (script, code_lines)
    assert any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("stages.") for n in tree.body), script
