"""Classifiers for distillation, all returning ``{"logits", "embed", "feats"}``.

* :class:`Cnn4` - the small student: four conv blocks (3x3 conv, BN, ReLU;
  2x2 max-pool after the first three; widths 32/64/128/256 by default), global
  average pool, then ``Linear(256,128) - ReLU - Dropout - Linear(128, nc)``.
  ``feats`` f1..f4 are the four block outputs (strides 2, 4, 8, 8); ``embed``
  is the pooled 256-d vector.
* ``cnn8`` - the same layout with two convs per block and doubled widths
  (64/128/256/512, hidden 256): 13.9x the student's FLOPs (419 vs 30 MFLOPs at
  32 px, torch FlopCounterMode) and 4.8M vs 0.42M params, with ``feats``
  f1..f4 at the student's strides (2, 4, 8, 8), so every feature-map loss of
  the zoo pairs maps of equal size without resizing. The zoo benchmark's
  default teacher (a torchvision ResNet-18 downsamples 4x in its stem and
  loses 32 px textures; measured: it did not beat the student there).
* ``cnn4w`` - the student's layout (one conv per block) at doubled widths
  (64/128/256/512, hidden 256): about 4x its FLOPs, a teacher cheap enough to
  train adversarially on a CPU (``benchmarks/adversarial``).
* :class:`TappedClassifier` - any torchvision or timm classifier, built with
  ``nc`` outputs (its classifier replaced), random init. Forward hooks read
  ``feats`` f1..f4 = the maps at strides 4, 8, 16, 32 and ``embed`` = the
  input of the final classifier layer (pooled penultimate features). Tap
  choice: for timm models, the last ``feature_info`` module of each of those
  reductions (what timm's ``features_only`` returns); otherwise the stage
  module found by a probe forward (see :func:`_probe_taps`). Models without
  such maps (e.g. ViTs) give fewer or no feats.

Names: ``cnn4`` is the student, ``cnn8`` and ``cnn4w`` its bigger siblings; ``torchvision/<name>`` or ``timm/<name>``
pick a library; a bare name is torchvision's when torchvision has that
classification model (so seed-style torchvision state dicts load), else timm's.

Initial weights (``pretrained``, the config's ``model.pretrained`` /
``teacher.model.pretrained``; see :mod:`mtkd.pretrained`): ``False``
random; ``True`` timm's own pretrained weights, which timm downloads (timm
models only: ``cnn4``/``cnn8`` have none, and torchvision's would need their
1000-class head swapped, so name the model ``timm/<name>`` or give a path);
a path: a local state dict of the network without its final class layer
(the layer producing the logits keeps its random init; its keys in the file,
of whatever class count, are ignored), loaded strictly. The file's keys are
the library model's own (``timm.create_model(...).state_dict()``) or this
wrapper's (a leading ``model.`` on every key is dropped).

KD lives in :mod:`mtkd.losses`; nothing here knows a loss.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.checkpoint import unreadable
from mtkd.errors import ConfigError, MtkdError
from mtkd.pretrained import Pretrained, check_pretrained, load_state_file

STUDENT = "cnn4"
#: The built-in CNNs by name: constructor defaults of :class:`Cnn4`.
CNN_VARIANTS: Dict[str, Dict[str, Any]] = {
    "cnn4": {},
    "cnn8": {"widths": (64, 128, 256, 512), "hidden": 256, "depth": 2},
    "cnn4w": {"widths": (64, 128, 256, 512), "hidden": 256},
}
TAP_STRIDES = (4, 8, 16, 32)
PROBE_SIZES = (128, 224)


class Cnn4(nn.Module):
    """The 4-block CNN student (see the module doc)."""

    def __init__(self, num_classes: int, widths: Sequence[int] = (32, 64, 128, 256), hidden: int = 128,
                 drop_rate: float = 0.2, depth: int = 1):
        super().__init__()
        if len(widths) != 4:
            raise ConfigError(f"model.widths: expected 4 block widths, got {list(widths)}")
        if int(depth) < 1:
            raise ConfigError(f"model.depth: convs per block must be >= 1, got {depth}")
        blocks = []
        c_in = 3
        for i, c in enumerate(widths):
            layers: List[nn.Module] = []
            for j in range(int(depth)):
                layers += [nn.Conv2d(c_in if j == 0 else c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2, 2))
            blocks.append(nn.Sequential(*layers))
            c_in = c
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(inplace=True), nn.Dropout(drop_rate),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> Dict[str, Any]:
        feats = {}
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            feats[f"f{i}"] = x
        embed = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return {"logits": self.classifier(embed), "embed": embed, "feats": feats}


def _resolve(name: str) -> Tuple[str, str]:
    """(library, model name) for a classifier name; see the module doc."""
    import timm
    from torchvision import models as tvm

    if "/" in name:
        lib, _, arch = name.partition("/")
        if lib not in ("torchvision", "timm"):
            raise ConfigError(f"model name {name!r}: prefix must be 'torchvision/' or 'timm/'")
    else:
        lib, arch = ("torchvision", name) if name in tvm.list_models(module=tvm) else ("timm", name)
    known = tvm.list_models(module=tvm) if lib == "torchvision" else timm.list_models()
    if arch not in known:
        raise ConfigError(f"model name {name!r}: not a {lib} classification model")
    return lib, arch


class _Store(dict):
    """Tapped tensors of the running forward; ``active`` only inside it, so a
    tapped module called on its own (e.g. ``model.fc(x)``) leaves nothing behind."""

    active = False


class _Tap:
    """A forward (pre-)hook writing one tensor into a shared :class:`_Store`."""

    def __init__(self, store: _Store, key: str, inputs: bool = False):
        self.store = store
        self.key = key
        self.inputs = inputs

    def __call__(self, module: nn.Module, args: Any, output: Any = None) -> None:
        if self.store.active:
            self.store[self.key] = args[0] if self.inputs else output


class TappedClassifier(nn.Module):
    """A torchvision/timm classifier whose forward returns the mtkd output dict.

    The hooks write into ``self._store``, a plain dict shared with them (so a
    ``deepcopy``, as the EMA makes, gives the copy its own store and hooks).
    ``taps`` maps feature keys to tapped module names (``f<i>`` is the map
    at stride ``TAP_STRIDES[i-1]``; a stride the model lacks has no key);
    ``head_name`` is the final classifier layer whose input is ``embed``.
    """

    def __init__(self, model: nn.Module, taps: Dict[str, str], head_name: Optional[str]):
        super().__init__()
        self.model = model
        self.taps = dict(taps)
        self.head_name = head_name
        self._store = _Store()
        modules = dict(model.named_modules())
        for key, name in self.taps.items():
            modules[name].register_forward_hook(_Tap(self._store, key))
        if head_name is not None:
            modules[head_name].register_forward_pre_hook(_Tap(self._store, "embed", inputs=True))

    def forward(self, x: torch.Tensor) -> Dict[str, Any]:
        self._store.clear()
        self._store.active = True
        try:
            logits = self.model(x)
        finally:
            self._store.active = False
        feats = {k: self._store[k] for k in self.taps if k in self._store}
        embed = self._store.get("embed")
        if embed is None and feats:
            embed = F.adaptive_avg_pool2d(feats[list(feats)[-1]], 1)
        self._store.clear()
        return {"logits": logits, "embed": None if embed is None else embed.flatten(1), "feats": feats}


def _probe_taps(model: nn.Module) -> Tuple[Dict[str, str], Optional[str]]:
    """Tap names and the final Linear's name, found by a probe forward.

    For each stride in :data:`TAP_STRIDES`, among the modules whose output is
    a map of that stride, the shallowest ones (fewest dots in the name: stage
    containers rather than layers inside them) are kept and the last of them
    to run is the tap. The probe is 128x128, or 224x224 for models that only
    take that size; a model that takes neither gets no taps.
    """
    for size in PROBE_SIZES:
        order: List[Tuple[str, Tuple[int, ...]]] = []
        linears: List[str] = []
        handles = []
        for name, mod in model.named_modules():
            if not name:
                continue

            def hook(m: nn.Module, args: Any, out: Any, name: str = name) -> None:
                if isinstance(out, torch.Tensor):
                    order.append((name, tuple(out.shape)))
                if isinstance(m, nn.Linear):
                    linears.append(name)

            handles.append(mod.register_forward_hook(hook))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
        except (RuntimeError, AssertionError, ValueError):
            continue
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        taps = {}
        for i, stride in enumerate(TAP_STRIDES, start=1):
            hits = [n for n, shape in order if len(shape) == 4 and shape[2:] == (size // stride, size // stride)]
            if hits:
                depth = min(n.count(".") for n in hits)
                taps[f"f{i}"] = [n for n in hits if n.count(".") == depth][-1]
        return taps, (linears[-1] if linears else None)
    return {}, None


def _timm_taps(model: nn.Module) -> Tuple[Dict[str, str], Optional[str]]:
    info = getattr(model, "feature_info", None)
    taps: Dict[str, str] = {}
    if isinstance(info, list):
        for i, stride in enumerate(TAP_STRIDES, start=1):
            hits = [d["module"] for d in info if d.get("reduction") == stride]
            if hits:
                taps[f"f{i}"] = hits[-1]
    head = None
    modules = dict(model.named_modules())
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, mod in modules.items():
        if classifier is not None and mod is classifier and name:
            head = name
    if len(taps) < len(TAP_STRIDES) or any(t not in modules for t in taps.values()):
        taps = _probe_taps(model)[0]
    return taps, head


def build_classifier(name: str, num_classes: int, pretrained: Pretrained = False,
                     pretrained_key: str = "model.pretrained", **kwargs: Any) -> nn.Module:
    """A classifier returning the mtkd output dict.

    ``name``: ``cnn4``/``cnn8`` (kwargs: ``widths``, ``hidden``, ``drop_rate``, ``depth``) or a
    torchvision/timm name (kwargs go to the library's constructor). ``pretrained``: ``False``
    (random init), ``True`` (timm's weights) or a state dict path (see the module doc);
    ``pretrained_key`` names the config entry in errors.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes: must be >= 1, got {num_classes}")
    pretrained = check_pretrained(pretrained, pretrained_key)
    if name in CNN_VARIANTS:
        if pretrained is True:
            raise ConfigError(f"{pretrained_key}: {name} has no published weights; give a state dict path")
        try:
            model: nn.Module = Cnn4(num_classes, **{**CNN_VARIANTS[name], **kwargs})
        except TypeError as exc:
            raise ConfigError(f"model {name!r}: bad arguments {sorted(kwargs)}: {exc}") from None
    else:
        lib, arch = _resolve(name)
        if pretrained is True and lib != "timm":
            raise ConfigError(f"{pretrained_key}: true takes timm's weights; name the model 'timm/{arch}' "
                              f"or give a state dict path for torchvision's {arch}")
        try:
            if lib == "torchvision":
                from torchvision import models as tvm

                net = tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
                taps, head = _probe_taps(net)
            else:
                import timm

                net = timm.create_model(arch, pretrained=pretrained is True, num_classes=num_classes, **kwargs)
                taps, head = _timm_taps(net)
        except TypeError as exc:
            raise ConfigError(f"model {name!r}: bad arguments {sorted(kwargs)}: {exc}") from None
        model = TappedClassifier(net, taps, head)
    if isinstance(pretrained, str):  # all but the class layer, which keeps its init
        if isinstance(model, TappedClassifier):  # the file holds the library model's own keys
            load_state_file(model.model, pretrained, pretrained_key, prefixes=("model.",),
                            skip=[model.head_name] if model.head_name else [])
        else:
            load_state_file(model, pretrained, pretrained_key, skip=[f"classifier.{len(model.classifier) - 1}"])
    return model


def _state_dict_of(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "net", "snet"):
            if key in obj and isinstance(obj[key], (dict, nn.Module)):
                return _state_dict_of(obj[key], path)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise MtkdError(f"{path}: no state dict found (expected a state dict, or one under "
                    "'model'/'state_dict'/'net')")


def load_weights(model: nn.Module, path: Union[str, Path], trust_pickle: bool = False) -> nn.Module:
    """Load a user checkpoint into ``model`` (in place) and return it.

    Accepted: an mtkd checkpoint, a plain state dict (for a wrapped
    torchvision/timm model its keys may omit the wrapper's ``model.`` prefix,
    as a seed-style ``torch.save(densenet.state_dict())`` has), a dict holding
    one under ``model``/``state_dict``/``net``; DataParallel ``module.``
    prefixes are stripped. Files are read with ``weights_only=True`` unless
    ``trust_pickle`` (trusted files only; then a pickled ``nn.Module`` works too).
    """
    path = Path(path)
    if not path.is_file():
        raise MtkdError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # torch raises many types for foreign/torn files
        raise unreadable(path, exc, "teacher.trust_pickle") from None
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in _state_dict_of(obj, path).items()}
    target = model
    if isinstance(model, TappedClassifier) and not any(k.startswith("model.") for k in state):
        target = model.model
    try:
        target.load_state_dict(state)
    except RuntimeError as exc:
        raise MtkdError(f"{path}: weights do not fit the model: {str(exc).strip().splitlines()[0]}") from None
    return model
