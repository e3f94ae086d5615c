"""Registries: named tables of losses, tasks, dataset formats and CLI commands.

One small class in the style of MMEngine's ``Registry``::

    LOSSES = Registry("loss", locations=("mtkd.losses",))

    @LOSSES.register("seg_kl")          # or @LOSSES.register() to use the object's __name__
    class SegKL(Loss): ...

    LOSSES.get("seg_kl")                # the class; an unknown name is a one-line ConfigError
    LOSSES.names()                      # sorted names

``locations`` are the modules whose import runs the ``register`` lines of the
registry's entries; they are imported on the first :meth:`Registry.get`,
:meth:`Registry.names` or ``in`` test, never when this module is imported
(a package location also imports every module below it). Registering a
name twice is an error. The four registries of mtkd are defined at the
bottom of this module, so that ``mtkd list`` and the layers that look
names up need import nothing above themselves.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from mtkd.errors import ConfigError


class Registry:
    """Name -> object table with lazy imports of its ``locations``."""

    def __init__(self, name: str, locations: Sequence[str] = ()):
        self.name = name
        self.locations: Tuple[str, ...] = tuple(locations)
        self._entries: Dict[str, Any] = {}
        self._imported = False

    def register(self, name: Optional[str] = None) -> Callable[[Any], Any]:
        """Decorator adding a class or function under ``name`` (default: its ``__name__``)."""

        def deco(obj: Any) -> Any:
            key = name if name is not None else obj.__name__
            if key in self._entries:
                raise ValueError(f"{self.name} {key!r} is registered twice "
                                 f"({_where(self._entries[key])} and {_where(obj)})")
            self._entries[key] = obj
            return obj

        return deco

    def unregister(self, name: str) -> Any:
        """Remove and return the entry ``name`` (for code that registers something temporarily)."""
        return self._entries.pop(name)

    def _import_locations(self) -> None:
        if self._imported:
            return
        self._imported = True  # first, so that a location looking a name up does not recurse
        try:
            for location in self.locations:
                module = importlib.import_module(location)
                for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=location + "."):
                    importlib.import_module(info.name)
        except BaseException:
            self._imported = False
            raise

    def get(self, name: str, key: Optional[str] = None) -> Any:
        """The entry ``name``, else a one-line ConfigError naming ``key`` (the config entry or
        argument that gave the name, default the registry's name) and the closest known names."""
        self._import_locations()
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"{key or self.name}: unknown {self.name} {name!r}; {hint}known: {', '.join(known)}")

    def names(self) -> List[str]:
        self._import_locations()
        return sorted(self._entries)

    def items(self) -> Iterator[Tuple[str, Any]]:
        """``(name, entry)`` in name order."""
        for n in self.names():
            yield n, self._entries[n]

    def __contains__(self, name: object) -> bool:
        self._import_locations()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {len(self._entries)} entries)"


def summary(obj: Any) -> str:
    """The first sentence of ``obj``'s docstring, on one line ('' without one)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    para = " ".join(doc.split("\n\n")[0].split())
    end = para.find(". ")
    return para if end < 0 else para[:end + 1]


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


#: Losses (``mtkd.losses.base.build_loss``), one ``@LOSSES.register("name")`` line each.
LOSSES = Registry("loss", locations=("mtkd.losses",))
#: Tasks, looked up by the config's ``task`` name (``mtkd.engine.tasks.get_task``).
TASKS = Registry("task", locations=("mtkd.tasks.multitask.task", "mtkd.tasks.classify.task"))
#: Dataset readers, looked up by ``data.format`` (``mtkd.datasets.build_dataset``).
FORMATS = Registry("format", locations=("mtkd.datasets",))
#: ``mtkd`` subcommands: setup functions ``(parser) -> runner`` (``mtkd.cli``).
COMMANDS = Registry("command", locations=("mtkd.cli", "mtkd.demo", "mtkd.tasks.classify.cli",
                                          "mtkd.adversarial.cli", "mtkd.export.cli"))
