"""Read the tensors out of a whole pickled ``torch.nn.Module`` without running anything from it.

A file written by ``torch.save(model)`` is a pickle: loading it normally imports the classes it
names and may call any function it names, so a crafted file runs code. This reader never imports or
calls anything the file names, except an exact allowlist of tensor-rebuild functions and plain
containers (:data:`ALLOWED`). Every other name becomes an inert :class:`Stub` class: creating,
"calling" or restoring it only records what was given. The module tree is then rebuilt from the stubs'
``_parameters``, ``_buffers`` (persistent ones) and ``_modules`` dicts, which is all ``state_dict()``
ever reads.

The file must also look like a model of the code it claims to come from: every name it refers to
must lie in ``namespaces`` (for the reference checkpoints: their packages, torch and numpy). A name
such as ``posix.system`` is refused even though its stub could not have run, so a tampered file is
reported rather than half-trusted.

    tree = read_module_tree("unet.pth", "modules.unet.UNetModel", ("modules.", "torch.nn.modules."))
    tree.class_path          # 'modules.unet.UNetModel'
    tree.state_dict()        # {'time_embed.0.weight': tensor, ...} in registration order
"""
from __future__ import annotations

import io
import os
import pickle
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import torch


class ForeignPickleError(ValueError):
    """A foreign checkpoint cannot be read safely or is not a module tree; names the file and the key."""


class Stub:
    """Stand-in for a class the file names. Never runs anything; keeps what the pickle hands it."""

    _path = "?"
    dump_patches = False          # torch's legacy loader reads this attribute of container classes

    def __new__(cls, *args: Any, **kwargs: Any) -> "Stub":
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        # (dict) from object.__reduce_ex__, or (dict, slots) for classes with __slots__.
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = state[0] or {}
        self.__dict__["_stub_state"] = state

    @property
    def state(self) -> dict:
        s = self.__dict__.get("_stub_state")
        return s if isinstance(s, dict) else {}

    def __repr__(self) -> str:
        return f"<stub {self._path}>"


@dataclass
class ModuleNode:
    """One module of the pickled tree: its class path and its own tensors, children in order."""
    class_path: str
    parameters: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    children: dict[str, "ModuleNode"] = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        return self.class_path.rsplit(".", 1)[-1]

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "ModuleNode"]]:
        yield prefix, self
        for name, child in self.children.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters then persistent buffers, module by module, as ``nn.Module.state_dict`` orders them."""
        out: dict[str, torch.Tensor] = {}
        for prefix, node in self.named_modules():
            for name, t in {**node.parameters, **node.buffers}.items():
                out[f"{prefix}.{name}" if prefix else name] = t
        return out


# ---- the allowlist -------------------------------------------------------------------------------

def _tensor_from(storage: Any, storage_offset: Any, size: Any, stride: Any) -> torch.Tensor:
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"a tensor whose storage is a {type(storage).__name__}, not tensor data")
    for name, v in (("size", size), ("stride", stride)):
        if not (isinstance(v, tuple) and all(type(i) is int for i in v)):
            raise pickle.UnpicklingError(f"a tensor with a {name} that is not a tuple of ints")
    if type(storage_offset) is not int:
        raise pickle.UnpicklingError("a tensor whose storage offset is not an int")
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor_from(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    # Hooks and metadata are not applied: only the numbers are kept.
    return _tensor_from(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"a parameter holding a {type(data).__name__}, not a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return _rebuild_parameter(data)   # the extra Python state is dropped, never set on anything


def _reconstructor(cls, base, state):
    """copyreg._reconstructor (pickle protocols 0 and 1): only ever builds a stub."""
    if not (isinstance(cls, type) and issubclass(cls, Stub)) or base is not object:
        raise pickle.UnpicklingError("copyreg._reconstructor applied to something other than a plain object")
    return cls.__new__(cls)


_BUILTINS = {"set": set, "frozenset": frozenset, "object": object}   # object: the base copyreg names
ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("copyreg", "_reconstructor"): _reconstructor,
    # Protocols 1 and 2 name these modules the Python 2 way.
    ("copy_reg", "_reconstructor"): _reconstructor,
    **{(mod, name): fn for mod in ("builtins", "__builtin__") for name, fn in _BUILTINS.items()},
}


def _allowed(module: str, name: str) -> Any | None:
    if (module, name) in ALLOWED:
        return ALLOWED[(module, name)]
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)          # torch.float32 etc.: values, not callables that run code
    return None


def _make_pickle_module(seen: set[str]) -> types.ModuleType:
    """A stand-in for the ``pickle`` module whose Unpickler resolves names as described above."""
    stubs: dict[str, type] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            found = _allowed(module, name)
            if found is not None:
                return found
            path = f"{module}.{name}"
            seen.add(path)
            if path not in stubs:
                stubs[path] = type(name if name.isidentifier() else "Stub", (Stub,), {"_path": path})
            return stubs[path]

    def load(file: Any, **kwargs: Any) -> Any:
        return Unpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs: Any) -> Any:
        return Unpickler(io.BytesIO(data), **kwargs).load()

    mod = types.ModuleType("restricted_pickle")
    mod.Unpickler = Unpickler
    # torch's legacy loaders call ``pickle_module.load`` directly (magic number, protocol, system info,
    # storage keys, tar members) before or besides building an Unpickler: those must be restricted too,
    # so that no byte of the file ever reaches the real pickle.load (defence in depth: load_restricted
    # refuses those formats before torch sees them).
    mod.load = load
    mod.loads = loads
    mod.__name__ = "restricted_pickle"
    return mod


# ---- the file format gate --------------------------------------------------------------------------

ZIP_MAGIC = b"PK\x03\x04"      # what torch.serialization._is_zipfile looks for, at the same place


def check_format(p: Path, f: BinaryIO) -> None:
    """Refuse, before torch sees the open file ``f``, every format but a zip-format ``torch.save`` file.

    The reference checkpoints are zip-format (torch >= 1.6). torch.load would also accept the legacy
    stream and tar formats, whose first pickles torch reads with ``pickle_module.load``, and TorchScript
    archives, which it hands to ``torch.jit.load`` (TorchScript code runs there, and the restricted
    unpickler is never used). The same tests torch makes decide which path it takes: the first four
    bytes, then torch's own zip reader looking for ``constants.pkl``.
    """
    start = f.read(len(ZIP_MAGIC))
    f.seek(0)
    if start != ZIP_MAGIC:
        raise ForeignPickleError(f"{p}: not a zip-format torch file (torch.save of torch >= 1.6, as the published "
                                 "weights are); legacy, tar and other formats are refused unread")
    try:
        records = torch._C.PyTorchFileReader(f).get_all_records()
    except Exception as e:    # a damaged zip: torch.load would fail the same way
        raise ForeignPickleError(f"{p}: not a readable torch file ({type(e).__name__}: {_first_line(e)})") from None
    finally:
        f.seek(0)
    if "constants.pkl" in records:
        raise ForeignPickleError(f"{p}: a TorchScript archive (torch.jit.save), not a pickled model; refused unread "
                                 "(loading one runs its TorchScript code)")


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (torch's C++ errors append a stack trace)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ---- reading ---------------------------------------------------------------------------------------

def load_restricted(path: str | Path) -> tuple[Any, set[str]]:
    """(the unpickled object with stubs in place of every foreign class, the class paths it named)."""
    p = Path(path)
    if not p.is_file():
        raise ForeignPickleError(f"{p}: file not found")
    if os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        raise ForeignPickleError(f"{p}: TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, and torch then refuses every custom "
                                 "unpickler, including this converter's restricted one; unset it for this command "
                                 "(nothing in the file is run either way)")
    seen: set[str] = set()
    # One open file for the format check and for torch, so what was checked is what torch reads.
    with open(p, "rb") as f:
        check_format(p, f)
        try:
            obj = torch.load(f, map_location="cpu", weights_only=False, pickle_module=_make_pickle_module(seen))
        except pickle.UnpicklingError as e:
            raise ForeignPickleError(f"{p}: not a model file this converter can read ({e})") from None
        except RecursionError:
            raise ForeignPickleError(f"{p}: not a model file this converter can read (nested too deeply)") from None
        except Exception as e:   # truncated zip, not a torch file, storage errors
            raise ForeignPickleError(f"{p}: not a readable torch file ({type(e).__name__}: {_first_line(e)})") from None
    return obj, seen


def module_tree(obj: Any, path: str | Path, where: str = "") -> ModuleNode:
    """The :class:`ModuleNode` tree of a stubbed module; refuses anything that is not a module of tensors."""
    def fail(msg: str) -> ForeignPickleError:
        return ForeignPickleError(f"{path}: {where or 'the file'}: {msg}")

    if not isinstance(obj, Stub):
        raise fail(f"holds a {type(obj).__name__}, not a pickled model (torch.save(model))")
    state = obj.state
    for key in ("_parameters", "_buffers", "_modules"):
        if not isinstance(state.get(key), dict):
            raise fail(f"{obj._path} is not a torch module (no {key} dict)")
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    if not isinstance(non_persistent, (set, frozenset)):
        raise fail("_non_persistent_buffers_set is not a set")
    node = ModuleNode(obj._path)
    for kind, target in (("_parameters", node.parameters), ("_buffers", node.buffers)):
        for name, t in state[kind].items():
            if t is None or (kind == "_buffers" and name in non_persistent):
                continue
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise fail(f"{kind}[{name!r}] holds a {type(t).__name__}, not a tensor")
            target[name] = t
    for name, child in state["_modules"].items():
        if child is None:
            continue
        if not isinstance(name, str):
            raise fail(f"a submodule named {name!r}")
        node.children[name] = module_tree(child, path, f"{where}.{name}" if where else name)
    return node


def read_module_tree(path: str | Path, root_class: str, namespaces: tuple[str, ...]) -> ModuleNode:
    """Read a ``torch.save(model)`` file into a :class:`ModuleNode` tree, running nothing from it.

    Args:
        path: the pickled model.
        root_class: the class path the pickled model must have (e.g. ``"modules.unet.UNetModel"``).
        namespaces: prefixes every class path the file names must start with (e.g. ``"modules."``,
            ``"torch.nn.modules."``); anything else (``posix.system``, ``builtins.eval``, ...) is refused.
    Raises:
        ForeignPickleError: unreadable, another model, names something outside ``namespaces``, or
            not a module tree.
    """
    obj, seen = load_restricted(path)
    if isinstance(obj, Stub) and obj._path != root_class:
        raise ForeignPickleError(f"{path}: holds a {obj._path}, expected a {root_class}")
    foreign = sorted(s for s in seen if not s.startswith(namespaces))
    if foreign:
        names = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ForeignPickleError(f"{path}: refused: it refers to {names}, outside the packages of a "
                                 f"{root_class.rsplit('.', 1)[-1]} model (nothing from the file was run)")
    return module_tree(obj, path)
