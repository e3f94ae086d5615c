"""Atomic, ``weights_only``-safe checkpoints.

Layout of a checkpoint dict (every value is a tensor, a state dict or a plain
dict/list/number/string, so ``torch.load(weights_only=True)`` reads it):

* ``"format"``: ``"mtkd-ckpt-3"`` (:data:`FORMAT`); versions 1 and 2 still
  load (version 1 files never hold ``"pruning"``; neither holds
  ``"aux_optimizers"``, so their ``train_state`` resumes only runs without
  auxiliary groups);
* ``"model"``: the weights to evaluate and deploy (the EMA's where EMA is on);
* ``"pruning"`` (pruned models only, since version 2): how to rebuild the
  pruned architecture without pickle, see :mod:`mtkd.models.restore`;
* ``"config"``: the run's config as a plain dict; ``"task"``, ``"classes"``;
* ``"epoch"`` (completed epochs), ``"step"``, ``"metrics"`` (last val metrics),
  ``"best_score"``;
* ``"train_state"`` (``last.pt`` only, what ``--resume`` needs): raw model
  weights, optimizer, scheduler, grad-scaler, EMA update count, composer
  ``state_dict`` and ``extra_state``, the auxiliary groups' optimizers
  (``"aux_optimizers"``, by group key, since version 3), RNG states, the
  results history.

Saves write a temporary file in the destination's directory, fsync it and
``os.replace`` it over the target, so a crash never leaves a torn file. A
failed write (disk full, read-only folder) removes the temporary file and
raises a one-line MtkdError naming the target. A process killed mid-save
leaves its temporary file (``.<name>.<8 random characters>.tmp``) behind;
:func:`remove_stale_temps` deletes such files.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from mtkd.errors import MtkdError, os_error_in_chain, write_error

FORMAT = "mtkd-ckpt-3"

#: Formats :func:`load_checkpoint` reads (a file without ``"format"`` is taken as version 1).
READABLE_FORMATS = ("mtkd-ckpt-1", "mtkd-ckpt-2", "mtkd-ckpt-3")

#: Names of :func:`save_atomic`'s temporary files: ``tempfile.mkstemp`` with
#: prefix ``.<name>.`` and suffix ``.tmp`` (8 random characters between).
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def save_atomic(obj: Dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then ``os.replace``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = os_error_in_chain(exc) if isinstance(exc, Exception) else None
        if cause is not None:
            raise write_error(path, cause) from None
        raise


def remove_stale_temps(folder: str | Path) -> List[Path]:
    """Delete the temporary files that killed :func:`save_atomic` calls left in ``folder``.

    Only names of :data:`TEMP_NAME`'s form are touched; a file that cannot be
    removed is left alone. Returns the removed paths. Call it when no save
    into ``folder`` is under way.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        if TEMP_NAME.match(p.name) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def load_checkpoint(path: str | Path, trust_pickle: bool = False,
                    map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """Load a checkpoint; ``weights_only=True`` unless ``trust_pickle`` is set.

    A missing, truncated, corrupt or non-mtkd file, or one of an unknown
    ``"format"``, raises a one-line MtkdError naming it (:func:`unreadable`).
    """
    path = Path(path)
    if not path.is_file():
        raise MtkdError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=not trust_pickle)
    except Exception as exc:  # torch raises many types for torn/foreign files
        raise unreadable(path, exc) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise MtkdError(f"{path}: not an mtkd checkpoint (no 'model' entry)")
    fmt = ckpt.get("format", READABLE_FORMATS[0])
    if fmt not in READABLE_FORMATS:
        newer = isinstance(fmt, str) and fmt.startswith("mtkd-ckpt-")
        raise MtkdError(f"{path}: checkpoint format {fmt!r} is not one this mtkd reads "
                        f"({', '.join(READABLE_FORMATS)}){'; written by a newer mtkd?' if newer else ''}")
    return ckpt


def unreadable(path: Path, exc: Exception, trust_key: str = "trust_pickle") -> MtkdError:
    """The one-line MtkdError for a checkpoint file ``torch.load`` failed on.

    * A weights-only load refusing a pickled object (the file is whole; it
      holds more than tensors and plain types): the object is named and the
      config key ``trust_key`` suggested.
    * A zip archive (what ``torch.save`` writes) without its closing central
      directory, or an empty file: *truncated*, e.g. a copy cut short.
    * Anything else: *corrupt or not a checkpoint*, with torch's first line.
    """
    text = str(exc).strip()
    refused = re.search(r"Unsupported global: (?:GLOBAL )?(\S+)", text)
    if isinstance(exc, pickle.UnpicklingError) and refused:
        return MtkdError(f"{path}: holds pickled objects that a weights-only load refuses ({refused.group(1)}); "
                         f"if it is a trusted pickle, set {trust_key}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(4)
    if size == 0 or (head == b"PK\x03\x04" and not zipfile.is_zipfile(path)):
        return MtkdError(f"{path}: checkpoint file is truncated ({size} bytes, the archive is incomplete); "
                         "save or copy it again")
    reason = text.splitlines()[0] if text else type(exc).__name__
    return MtkdError(f"{path}: checkpoint file is corrupt or not a checkpoint ({size} bytes): {reason[:160]}")


def rng_state() -> Dict[str, Any]:
    """Torch (CPU and CUDA), numpy and Python RNG states as tensors/plain types."""
    np_state = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "keys": torch.tensor(py_keys, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(k) for k in p["keys"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
