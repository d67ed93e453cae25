"""Import the top-level scripts whose names are not identifiers (``vq-gan_train.py``)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import ``ROOT/name`` as a module (once; scripts do no work at import) and return it."""
    mod_name = name.replace("-", "_").removesuffix(".py")
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, ROOT / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module
