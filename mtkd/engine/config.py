"""YAML run configs: ``_base_`` inheritance, defaults, overrides, validation.

How a run's config is built (:func:`load_config`):

1. The run's YAML file is found (:func:`resolve_config`: an existing file
   path, else a path inside the packaged configs ``mtkd/configs/``, where a
   leading ``configs/`` is dropped) and read. A top-level ``_base_: other.yaml`` (a path
   relative to that file, or a list of them, applied in order) is loaded first
   and the file is deep-merged onto it; chains are followed and cycles are an
   error.
2. The result is merged onto ``mtkd/configs/defaults.yaml``, which lists every
   valid key with its default and a comment. Mappings merge key by key,
   except the free-form subtrees of :data:`FREE_FORM`: there the user's value
   *replaces* the default as a whole (so a run can drop, say, the default
   detection loss instead of inheriting it).
3. Command-line overrides ``key.sub=value`` are applied; values are parsed
   as YAML (``train.lr=1e-3`` is a float, ``data.classes=[a,b]`` a list,
   ``teacher.ckpt=null`` None).
4. Validation: an unknown key anywhere raises :class:`ConfigError` naming the
   full dotted key and the closest known key; a value whose type differs
   from the default's raises :class:`ConfigError` naming the key. An int is
   accepted where the default is a float; a null default accepts any type;
   bools are never taken for numbers; the keys of :data:`MIXED_TYPES` take
   any of their listed types.

Files and override values are read by :func:`yaml_load`: PyYAML's safe
loader (YAML 1.1), plus YAML 1.2's reading of scientific notation, so
``1e-3``, ``1E-4`` and ``5e-4`` are floats (YAML 1.1 reads them as strings,
its floats need a dot and a signed exponent: ``1.0e-3``).

The config is a plain nested dict throughout (so it checkpoints with
``weights_only=True``).
"""
from __future__ import annotations

import copy
import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from mtkd.errors import ConfigError


def packaged_configs() -> Path:
    """The folder of configs shipped inside the package (``mtkd/configs``)."""
    root = resources.files("mtkd") / "configs"
    if not isinstance(root, Path):  # pragma: no cover - mtkd imported from a zip
        raise ConfigError("mtkd's packaged configs need mtkd installed as files, not imported from a zip")
    return root


#: The packaged ``mtkd/configs/defaults.yaml``: every valid key with its default.
DEFAULTS_PATH = packaged_configs() / "defaults.yaml"

#: Keys whose value may take one of several types (their default is one of them).
MIXED_TYPES: Dict[str, Tuple[type, ...]] = {"model.pretrained": (bool, str)}

#: Subtrees whose content is validated by their owners, not here: the loss
#: section (LossComposer), augmentation options (mtkd.datasets), the
#: teacher's model config and the composite teacher (mtkd.models).
FREE_FORM = frozenset({"loss", "data.augment", "teacher.model", "teacher.composite"})


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3``-style scientific notation as a float (see the module doc)."""


# added after PyYAML's own float pattern, so it only decides what that one leaves a string
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with scientific notation such as ``1e-3`` read as a float."""
    return yaml.load(text, Loader=_Loader)


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    """A new dict: ``top`` merged onto ``base`` (mappings recursively, the rest replaced)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml_chain(path: str | Path, _seen: Optional[List[Path]] = None) -> Dict[str, Any]:
    """Read ``path`` and resolve its ``_base_`` chain (paths relative to the file)."""
    path = Path(path).expanduser().resolve()
    seen = list(_seen or [])
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + [path])
        raise ConfigError(f"{path}: _base_ cycle: {chain}")
    seen.append(path)
    data = _read_yaml(path)
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths")
    merged: Dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml_chain(path.parent / base, seen))
    return deep_merge(merged, data)


def resolve_config(path: str | Path) -> Path:
    """Where the run config ``path`` given by a user is.

    An existing file path wins; otherwise a relative path is looked up in the
    packaged configs, first as given, then without a leading ``configs/``
    (so ``synthetic_kd.yaml`` and ``configs/synthetic_kd.yaml`` both name
    ``mtkd/configs/synthetic_kd.yaml``). A path found nowhere is returned
    as given (loading it then reports it missing).
    """
    given = Path(path).expanduser()
    if given.is_file() or given.is_absolute():
        return given
    root = packaged_configs()
    candidates = [given]
    if len(given.parts) > 1 and given.parts[0] == "configs":
        candidates.append(Path(*given.parts[1:]))
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    return given


def load_defaults() -> Dict[str, Any]:
    return _read_yaml(DEFAULTS_PATH)


def parse_overrides(items: Iterable[str]) -> Dict[str, Any]:
    """``["train.lr=0.01", "data.classes=[a,b]"]`` -> nested dict."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"{key}: cannot parse override value {raw!r}") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{key}: conflicting overrides")
            node = nxt
        node[parts[-1]] = value
    return out


def _merge_onto_defaults(defaults: Dict[str, Any], user: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = copy.deepcopy(defaults)
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if dotted in FREE_FORM:
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_onto_defaults(out[key], value, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, int):
        return isinstance(value, int)
    return isinstance(value, type(default))


def _dotted_keys(tree: Dict[str, Any], prefix: str = "") -> List[str]:
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict) and dotted not in FREE_FORM:
            keys.extend(_dotted_keys(value, dotted + "."))
    return keys


def validate(cfg: Dict[str, Any], defaults: Dict[str, Any], prefix: str = "",
             _known: Optional[Sequence[str]] = None) -> None:
    """Raise ConfigError for an unknown key or a type mismatch (named by dotted key)."""
    known = _known if _known is not None else _dotted_keys(defaults)
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in defaults:
            close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{dotted}: unknown config key{hint}")
        default = defaults[key]
        if dotted in FREE_FORM:
            if value is not None and not _type_ok(default, value):
                raise ConfigError(f"{dotted}: expected {type(default).__name__}, got {type(value).__name__}")
            continue
        if dotted in MIXED_TYPES:
            kinds = MIXED_TYPES[dotted]
            if value is not None and not isinstance(value, kinds):
                raise ConfigError(f"{dotted}: expected {' or '.join(k.__name__ for k in kinds)}, got "
                                  f"{type(value).__name__} ({value!r})")
            continue
        if not _type_ok(default, value):
            raise ConfigError(f"{dotted}: expected {type(default).__name__}, got "
                              f"{type(value).__name__} ({value!r})")
        if isinstance(default, dict) and isinstance(value, dict):
            validate(value, default, dotted + ".", known)


def build_config(user: Dict[str, Any], overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """Merge a user mapping and overrides onto the defaults and validate."""
    defaults = load_defaults()
    user = deep_merge(user, parse_overrides(overrides))
    validate(user, defaults)
    return _merge_onto_defaults(defaults, user)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """The validated config of the run file ``path`` plus ``key=value`` overrides.

    ``path`` is found by :func:`resolve_config` (a file, else a packaged config).
    """
    found = resolve_config(path)
    if not found.is_file():
        raise ConfigError(f"{path}: config file not found (neither a file nor a packaged config "
                          f"under {packaged_configs()})")
    return build_config(load_yaml_chain(found), overrides)


def dump_config(cfg: Dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
