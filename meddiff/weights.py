"""Reading weights files a user passes in: nothing in them is ever run, and what does not fit is said in one line.

``torch_load`` is ``torch.load(weights_only=True)``: torch's restricted unpickler, which builds tensors,
containers and plain values only, so a pickled ``__reduce__`` payload is refused instead of run. A file that
holds other objects gets one ``MeddiffError`` line naming the first of them. ``modules_from`` reads release
files that are whole pickled ``nn.Module`` trees (torchxrayvision's) without importing or running any class of
theirs: every module class the file names is read as a ``PickledModule``, an inert attribute holder, and only
its tensors come out (``module_tensors``). Zip files (torch >= 1.6) go through torch's weights-only unpickler
with those names allow-listed; legacy files (torch < 1.6, which that unpickler cannot read) through an
unpickler that resolves only an explicit allow-list (``_restricted_pickle``).

``check_fit`` compares a state dict with a network before loading it and says what differs in one line
(counts of missing, unexpected and reshaped tensors, and the first few of each) instead of torch's
one-line-per-kind ``RuntimeError``, whose first line names no tensor; ``load_error_line`` turns that
``RuntimeError``, where a load was not checked first, into the same one line.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meddiff.errors import MeddiffError, first_line

# what a user can do with a file meddiff refuses to unpickle
SAVE_TENSORS = "save the tensors alone (torch.save(model.state_dict(), PATH), or safetensors) and pass that file"


class PickledModule:
    """Stands in for every ``nn.Module`` class of a whole pickled model: the unpickler fills its ``__dict__``
    (``_parameters``, ``_buffers``, ``_modules``, ...) and no code of the real class ever runs.

    Written here because torch has no inert module type: its weights-only unpickler builds an allow-listed
    class with ``cls.__new__`` and ``__setstate__`` (or a ``__dict__`` update), so whatever class is allowed
    is what runs; this one has no methods at all.
    """

    dump_patches = False  # torch's legacy loader asks module classes this before it would write a .patch file


def _legacy_allowed() -> dict:
    """What a legacy-format whole pickled model may name besides its module classes: containers and the
    tensor-rebuilding functions torch's weights-only unpickler allows too."""
    from collections import OrderedDict

    import torch

    # modules pickled by torch < 1.2 carry it; returns None
    from torch.nn.backends.thnn import _get_thnn_function_backend

    return {
        "collections.OrderedDict": OrderedDict,
        "builtins.set": set,
        "__builtin__.set": set,
        "torch.Size": torch.Size,
        "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch.nn.backends.thnn._get_thnn_function_backend": _get_thnn_function_backend,
    }


def _restricted_pickle(prefixes: tuple[str, ...]):
    """A ``pickle_module`` for ``torch.load`` whose unpickler resolves only allow-listed names (the Python docs'
    "Restricting Globals" recipe): module classes under ``prefixes`` become ``PickledModule``, a few containers
    and torch's tensor-rebuilding functions resolve as themselves, anything else is refused. Written here
    because torch's weights-only unpickler refuses the legacy format's module records outright (torch < 1.6
    files, as torchxrayvision's releases are); torch's own legacy loader still reads the storages."""
    allowed = _legacy_allowed()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            full = f"{module}.{name}"
            if full.startswith(prefixes):
                return PickledModule
            if full in allowed:
                return allowed[full]
            raise pickle.UnpicklingError(f"GLOBAL {full} was not an allowed global")

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    return type("RestrictedPickle", (), {"Unpickler": Unpickler, "load": staticmethod(load)})


def torch_load(path: str | os.PathLike, what: str = "weights", modules_from: tuple[str, ...] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that does not read is one MeddiffError line.

    ``modules_from``: package prefixes (``"torchxrayvision."``) whose pickled module classes, and torch's own
    ``torch.nn.modules`` classes in the same file, are read as ``PickledModule``.
    """
    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SourceChangeWarning of legacy files: their classes are never used
            if not modules_from:
                return torch.load(path, map_location="cpu", weights_only=True)
            prefixes = (*modules_from, "torch.nn.modules.")
            if not zipfile.is_zipfile(path):  # torch < 1.6's format
                return torch.load(path, map_location="cpu", weights_only=False,
                                  pickle_module=_restricted_pickle(prefixes))
            # read by disassembling, nothing unpickled
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            allowed = [(PickledModule, name) for name in names if name.startswith(prefixes)]
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MeddiffError(f"the {what} {path} does not exist") from None
    except IsADirectoryError:
        raise MeddiffError(f"the {what} {path} is a folder — give the file") from None
    except pickle.UnpicklingError as exc:
        raise MeddiffError(refused(exc, f"the {what} {path}")) from None
    except Exception as exc:  # noqa: BLE001 - truncated, not a torch file, ...: whatever torch raises, one line
        raise MeddiffError(f"cannot read the {what} {path}: {first_line(exc)}") from None


def refused(exc: pickle.UnpicklingError, source: str, remedy: str = SAVE_TENSORS) -> str:
    """The one-line message for a file torch's weights-only unpickler refused: the object it would not build."""
    found = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)"
                      r"|unrecognized function (.+?)(?: which|$)", str(exc), re.MULTILINE)
    name = next((g for g in found.groups() if g), None) if found else None
    if name:
        return f"{source} holds pickled Python objects ({name}), which meddiff never unpickles — {remedy}"
    detail = re.search(r"WeightsUnpickler error: *\n*\s*(\S.*)", str(exc))
    return (f"cannot read {source}: not a file of tensors ({detail.group(1).strip() if detail else first_line(exc)}), "
            f"and meddiff never unpickles anything else — {remedy}")


def module_tensors(module: PickledModule, prefix: str = "", _parents: frozenset = frozenset()) -> dict:
    """The state dict of a ``PickledModule`` tree: its parameters and persistent buffers, by dotted name
    (a module shared by two parents under both names, as ``nn.Module.state_dict`` does)."""
    import torch

    if id(module) in _parents or len(_parents) > 200:  # only a crafted file holds a cycle, or modules nested 200 deep
        raise MeddiffError("the pickled model contains itself (or nests modules 200 deep) — " + SAVE_TENSORS)
    _parents = _parents | {id(module)}
    attributes = vars(module)

    def mapping(name: str) -> dict:  # what a crafted file puts there may be anything: only dicts are read
        value = attributes.get(name)
        return value if isinstance(value, dict) else {}

    skip = attributes.get("_non_persistent_buffers_set")
    skip = skip if isinstance(skip, set) else set()
    state = {}
    for group in ("_parameters", "_buffers"):
        for name, value in mapping(group).items():
            if isinstance(name, str) and isinstance(value, torch.Tensor) and not (group == "_buffers" and name in skip):
                state[prefix + name] = value
    for name, child in mapping("_modules").items():
        if isinstance(name, str) and isinstance(child, PickledModule):
            state.update(module_tensors(child, f"{prefix}{name}.", _parents))
    return state


def check_fit(network, state: Mapping, source: str, remedy: str) -> None:
    """MeddiffError (one line) unless ``state`` has exactly ``network``'s tensors with their shapes.

    ``source`` says what the weights must fit, e.g. ``"the model folder X: weights do not fit config.json"``;
    ``remedy`` what to do about it.
    """
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    given = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    reshaped = [(k, given[k], expected[k]) for k in expected if k in given and given[k] != expected[k]]
    if missing or unexpected or reshaped:
        raise MeddiffError(f"{source}: {mismatch(missing, unexpected, reshaped)} — {remedy}")


SHOWN = 3  # names of each kind a mismatch line shows


def mismatch(missing: list[str], unexpected: list[str], reshaped: list[tuple[str, tuple, tuple]]) -> str:
    """``2 tensors missing, 1 of another shape, 3 unexpected (first: missing a, b; c is [1] in the file, [2] in
    the network; unexpected x, y, z)``: counts, then the first few names of each kind."""

    def first(names: list[str]) -> str:
        return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")

    parts, firsts = [], []
    if missing:
        parts.append(f"{len(missing)} tensor{'s' * (len(missing) != 1)} missing")
        firsts.append(f"missing {first(missing)}")
    if reshaped:
        parts.append(f"{len(reshaped)} of another shape")
        shown = [f"{k} is {list(old)} in the file, {list(new)} in the network" for k, old, new in reshaped[:SHOWN - 1]]
        firsts.append(", ".join(shown) + (", ..." if len(reshaped) > SHOWN - 1 else ""))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected")
        firsts.append(f"unexpected {first(unexpected)}")
    return f"{', '.join(parts)} (first: {'; '.join(firsts)})"


def load_error_line(exc: BaseException) -> str | None:
    """torch's ``Error(s) in loading state_dict for X:`` (a line per kind of difference, every key named) as one
    line, or None for any other error. A safety net for loads that ``check_fit`` did not see first."""
    text = str(exc)
    head = re.match(r"Error\(s\) in loading state_dict for ([\w.]+)", text)
    if not head:
        return None

    def keys(kind: str) -> list[str]:
        found = re.search(rf"{kind} key\(s\) in state_dict: (.*?)\.\s*$", text, re.MULTILINE)
        return re.findall(r'"([^"]+)"', found.group(1)) if found else []

    reshaped = [(k, tuple(int(d) for d in re.findall(r"\d+", old)), tuple(int(d) for d in re.findall(r"\d+", new)))
                for k, old, new in re.findall(r"size mismatch for (\S+): copying a param with shape torch\.Size\("
                                              r"\[([^\]]*)\]\) from checkpoint, the shape in current model is "
                                              r"torch\.Size\(\[([^\]]*)\]\)", text)]
    missing, unexpected = keys("Missing"), keys("Unexpected")
    if not (missing or unexpected or reshaped):
        return f"the weights do not fit {head.group(1)}: {first_line(text.split(':', 1)[1])}"
    return f"the weights do not fit {head.group(1)}: {mismatch(missing, unexpected, reshaped)}"
