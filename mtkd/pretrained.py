"""``model.pretrained``: where a model's initial weights come from.

* ``false`` (the default): random init.
* ``true``: the library's own pretrained weights (timm's ``pretrained=True``,
  smp's ImageNet encoder weights). These are downloaded by timm / smp (or read
  from their caches); mtkd downloads nothing itself, so this needs a machine
  online or with warm caches (``mtkd --offline`` blocks the Hugging Face Hub).
* ``PATH``: a local state dict file, read with ``weights_only=True``: a plain
  ``{name: tensor}`` mapping or a dict holding one under ``state_dict`` or
  ``model``. It is loaded strictly: every key must match; the first missing or
  unexpected key (or wrong shape) is a one-line error naming the file.

Which module a ``PATH`` fills is up to the model: the backbone's encoder for
the multi-task model (:func:`mtkd.models.backbone.build_backbone`), the
network without its final class layer for a classifier
(:func:`mtkd.tasks.classify.models.build_classifier`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Collection, Dict, Mapping, Union

import torch
from torch import nn

from mtkd.errors import ConfigError

Pretrained = Union[bool, str]


def check_pretrained(value: object, key: str = "model.pretrained") -> Pretrained:
    """``value`` if it is true/false or a non-empty path string, else a ConfigError naming ``key``."""
    if isinstance(value, bool) or (isinstance(value, str) and value.strip()):
        return value
    raise ConfigError(f"{key}: expected false, true or a path to a state dict file, got {value!r}")


def read_state_dict(path: Union[str, Path], key: str = "model.pretrained") -> Dict[str, torch.Tensor]:
    """The state dict in file ``path`` (``weights_only=True``; bare or under ``state_dict``/``model``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: {path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign, torn or pickled-object files
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{key}: {path}: cannot read a state dict: {reason[:200]}") from None
    for inner in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(inner), Mapping):
            obj = obj[inner]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{key}: {path}: not a state dict of tensors (bare, or under 'state_dict'/'model')")
    return dict(obj)


def _strip(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_file(module: nn.Module, path: Union[str, Path], key: str = "model.pretrained",
                    prefixes: Collection[str] = (), skip: Collection[str] = ()) -> None:
    """Load the state dict in ``path`` into ``module``, strictly.

    ``prefixes``: wrapper prefixes dropped when *every* key of the file has
    one (``module.`` of DataParallel always is). ``skip``: module-name
    prefixes left out on both sides (their keys in the file are ignored and
    the module keeps its init), e.g. a classifier's class layer.
    """
    state = read_state_dict(path, key)
    for prefix in ("module.", *prefixes):
        state = _strip(state, prefix)

    def kept(name: str) -> bool:
        return not any(name == s or name.startswith(s + ".") for s in skip)

    state = {k: v for k, v in state.items() if kept(k)}
    own = {k: v for k, v in module.state_dict().items() if kept(k)}
    # BatchNorm fills a missing num_batches_tracked itself (older and timm files lack it)
    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    for what, keys in (("missing key", missing), ("unexpected key", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ConfigError(f"{key}: {path}: {what} {keys[0]!r}{more}")
    for name, value in state.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise ConfigError(f"{key}: {path}: {name!r} has shape {list(value.shape)} in the file, "
                              f"{list(own[name].shape)} in the model")
    module.load_state_dict(state, strict=not skip)
