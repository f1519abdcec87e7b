"""Which implementation a certification runs against.

Every check names APIs by their documented upstream path (``torch.distributed.elastic.X``). An :class:`Adapter`
maps that path onto one implementation: ``torch`` (upstream, the reference), ``elastic_impl`` (ours:
``elastic_impl.X``) or any importable package whose module tree mirrors the documented one (used to plant
violations in tests).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

from conformance.table import API_PREFIX

UPSTREAM_ROOT = "torch.distributed.elastic"


class AdapterError(ValueError):
    """The requested implementation cannot be used; one-line message."""


class ApiNotFound(LookupError):
    """A documented API path has no counterpart in the implementation."""


class Adapter:
    """Resolves documented API paths to one implementation's objects."""

    def __init__(self, name: str, root: str, launcher_module: str) -> None:
        self.name = name
        self.root = root
        self.launcher_module = launcher_module

    def __repr__(self) -> str:
        return f"Adapter(name={self.name!r}, root={self.root!r})"

    def map_path(self, api: str) -> str:
        if api == UPSTREAM_ROOT:
            return self.root
        if not api.startswith(API_PREFIX):
            raise ApiNotFound(f"{api} is not under {UPSTREAM_ROOT}")
        return f"{self.root}.{api[len(API_PREFIX):]}"

    def module(self, api_module: str) -> ModuleType:
        """Import the implementation's counterpart of a documented module path."""
        return importlib.import_module(self.map_path(api_module))

    def resolve(self, api: str) -> Any:
        """The implementation's object for a documented path; raises :class:`ApiNotFound` naming what is missing."""
        target = self.map_path(api)
        parts = target.split(".")
        module: ModuleType | None = None
        split = len(parts)
        while split > 0:
            candidate = ".".join(parts[:split])
            try:
                module = importlib.import_module(candidate)
                break
            except ModuleNotFoundError as exc:
                # Only "this very module is absent" means "try the parent"; a missing dependency inside an
                # existing module is a real import failure of the implementation.
                if exc.name is None or not (candidate == exc.name or candidate.startswith(exc.name + ".")):
                    raise
                split -= 1
        if module is None:
            raise ApiNotFound(f"{target}: package {parts[0]!r} is not importable")
        obj: Any = module
        walked = ".".join(parts[:split])
        for attr in parts[split:]:
            try:
                obj = _class_attr(obj, attr)
            except AttributeError:
                what = "submodule or attribute" if isinstance(obj, ModuleType) else "attribute"
                raise ApiNotFound(f"{target}: {walked} has no {what} {attr!r}") from None
            walked = f"{walked}.{attr}"
        return obj

    def exists(self, api: str) -> bool:
        try:
            self.resolve(api)
            return True
        except (ApiNotFound, ImportError):
            return False

    def launcher_command(self) -> list[str]:
        """The torchrun-equivalent of this implementation, as an argv prefix."""
        return [sys.executable, "-m", self.launcher_module]


def _class_attr(obj: Any, attr: str) -> Any:
    # Properties must come back as the property object, not be evaluated on the class.
    if isinstance(obj, type):
        for klass in obj.__mro__:
            if attr in vars(klass):
                if isinstance(vars(klass)[attr], property):
                    return vars(klass)[attr]
                break
    return getattr(obj, attr)


def get_adapter(name: str) -> Adapter:
    """``torch``, ``elastic_impl`` or the name of a package mirroring ``torch.distributed.elastic``."""
    if name == "torch":
        return Adapter("torch", UPSTREAM_ROOT, "torch.distributed.run")
    if not name or not all(part.isidentifier() for part in name.split(".")):
        raise AdapterError(f"--impl {name!r} is not a package name; use 'elastic_impl', 'torch' or a package path")
    absent = f"--impl {name!r} is not importable; use 'elastic_impl', 'torch' or an importable package"
    try:
        found = importlib.util.find_spec(name)
    except ModuleNotFoundError as exc:  # a parent package of a dotted name is absent
        raise (AdapterError(absent) if _is_absent(name, exc) else _broken(name, exc)) from None
    except (Exception, SystemExit) as exc:  # a parent package that fails to import
        raise _broken(name, exc) from None
    if found is None:
        raise AdapterError(absent)
    # Imported here so a package that cannot be imported is one error, not a failure of every row it would certify.
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise (AdapterError(absent) if _is_absent(name, exc) else _broken(name, exc)) from None
    except (Exception, SystemExit) as exc:
        raise _broken(name, exc) from None
    return Adapter(name, name, f"{name}.run")


def _is_absent(name: str, exc: ModuleNotFoundError) -> bool:
    return bool(exc.name) and (name == exc.name or name.startswith(exc.name + "."))


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (just ``Type`` when the message is empty)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _broken(name: str, exc: BaseException) -> AdapterError:
    return AdapterError(f"--impl {name!r} cannot be imported: {one_line(exc)}")


def reference_adapter() -> Adapter:
    return get_adapter("torch")
