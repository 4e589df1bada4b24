"""Checkpoints: model + optimiser + vocabulary + config in one ``.npz`` file.

Layout (all plain arrays; the file loads with ``np.load(allow_pickle=False)``):

* ``meta``          - a JSON string: format tag and version, the model's
  constructor config, the tokenizer's vocabulary, the training config and
  the training state (position in the data, RNG states, counters), and a
  SHA-256 digest of every array below;
* ``model/<name>``  - each parameter, named as in ``model.state_dict()``;
* ``optim/<key>``   - the optimiser's flat ``state_dict()``;
* ``extra/<name>``  - other arrays (e.g. the carried recurrent state).

Saving is atomic and durable: the file is written to a temporary name in the
same directory, flushed and fsynced, renamed over the final name, and the
directory is fsynced, so a crash or power cut at any moment leaves either the
previous checkpoint or the new one under the final name, never a mixture. A
failed write (disk full, file size limit, permissions) raises
:class:`CheckpointWriteError` and removes the temporary file; temporary files
left by a process that was killed during a save are removed by the next
successful save to the same path. Anything wrong
with a file (not a zip, truncated, bit rot, missing entries, mis-shaped
arrays, a digest mismatch) raises :class:`CheckpointError` naming the file
and the problem.
"""

import hashlib
import io
import json
import os

import numpy as np

from fastrnn._atomic import replacing, stale_temporaries

__all__ = ["CheckpointError", "CheckpointWriteError", "Checkpoint", "save_checkpoint",
           "load_checkpoint", "FORMAT", "VERSION"]

FORMAT = "fastrnn-lm-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or not a fastrnn checkpoint."""


class CheckpointWriteError(OSError, CheckpointError):
    """A checkpoint could not be written (disk full, file too large, no permission,
    non-finite weights). The previous file under that name is unchanged and no
    temporary file is left behind. Both an OSError and a CheckpointError."""

    def __str__(self):
        return self.strerror if self.strerror else super().__str__()


def _remove_stale_tmp(path):
    """Remove temporary files of saves to `path` whose process no longer runs
    (killed while writing; _atomic.stale_temporaries)."""
    for name, pid in stale_temporaries(path):
        if pid == os.getpid():
            continue                # this process: another thread may be saving now
        try:
            os.kill(pid, 0)
            continue                # that process is alive: maybe saving right now
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.remove(name)
        except OSError:
            pass


def _fsync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:   # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:   # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _digest(arr):
    h = hashlib.sha256()
    h.update(str(arr.dtype).encode())
    h.update(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes: ``model_config``, ``model_state`` (name -> array),
    ``optim_state`` (key -> array, empty if none was saved), ``tokenizer``
    (vocabulary dict or None), ``config`` (training config dict), ``train_state``
    (dict), ``extra`` (name -> array), ``path``.
    """

    def __init__(self, path, meta, model_state, optim_state, extra):
        self.path = path
        self.meta = meta
        self.model_config = meta.get("model_config")
        self.tokenizer_dict = meta.get("tokenizer")
        self.config = meta.get("config") or {}
        self.train_state = meta.get("train_state") or {}
        self.model_state = model_state
        self.optim_state = optim_state
        self.extra = extra

    def build_model(self):
        """A fresh RNNLanguageModel with the saved weights."""
        from fastrnn.io import budget_for
        from fastrnn.lm import RNNLanguageModel
        from fastrnn.modules.module import (ParameterBudgetError, parameter_budget,
                                            weights_to_be_loaded)
        stored = sum(a.size for a in self.model_state.values())
        try:
            with parameter_budget(budget_for(stored)), weights_to_be_loaded():
                model = RNNLanguageModel.from_config(self.model_config)
            model.load_state_dict(self.model_state)
        except ParameterBudgetError:
            raise CheckpointError(f"{self.path}: the model config declares more parameter "
                                  f"values than the {stored} stored") from None
        except (TypeError, ValueError, OverflowError) as e:
            raise CheckpointError(f"{self.path}: model does not match its config: {e}") from None
        return model

    def build_tokenizer(self):
        from fastrnn.data.tokenizers import tokenizer_from_dict
        if self.tokenizer_dict is None:
            return None
        try:
            tok = tokenizer_from_dict(self.tokenizer_dict)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{self.path}: bad vocabulary: {e}") from None
        vocab = (self.model_config or {}).get("vocab_size")
        if vocab is not None and tok.vocab_size != vocab:   # (meta edited by hand)
            raise CheckpointError(f"{self.path}: the vocabulary has {tok.vocab_size} tokens "
                                  f"but the model's config says vocab_size {vocab}")
        return tok

    def load_optimizer(self, optimizer):
        if not self.optim_state:
            raise CheckpointError(f"{self.path}: checkpoint holds no optimiser state")
        try:
            optimizer.load_state_dict(self.optim_state)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: optimiser state does not fit: {e}") from None


def save_checkpoint(path, model, optimizer=None, tokenizer=None, config=None,
                    train_state=None, extra=None, allow_nonfinite=False):
    """Write a checkpoint (see the module docstring). ``config`` and
    ``train_state`` must be JSON-serialisable; ``extra`` maps names to arrays.

    Refuses (CheckpointWriteError) to write model parameters that are not all
    finite unless ``allow_nonfinite``: a diverged model must never replace a
    good checkpoint.
    """
    arrays = {}
    for name, value in model.state_dict().items():
        arrays[f"model/{name}"] = np.asarray(value)
    if optimizer is not None:
        for key, value in optimizer.state_dict().items():
            arrays[f"optim/{key}"] = np.asarray(value)
    for key, value in (extra or {}).items():
        arrays[f"extra/{key}"] = np.asarray(value)
    for key, arr in arrays.items():
        if arr.dtype == object:
            raise TypeError(f"checkpoint entry {key!r} is an object array (would need pickle)")
        if (not allow_nonfinite and key.startswith("model/") and arr.dtype.kind == "f"
                and not np.isfinite(arr).all()):
            raise CheckpointWriteError(
                f"{os.fspath(path)}: not saved: model parameter {key[6:]!r} has non-finite "
                f"values (the previous checkpoint, if any, is unchanged)")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": model.config() if hasattr(model, "config") else None,
        "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
        "config": config or {},
        "train_state": train_state or {},
        "digests": {k: _digest(v) for k, v in arrays.items()},
    }
    arrays["meta"] = np.array(json.dumps(meta, ensure_ascii=False))

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        with replacing(path) as tmp:     # removed again if anything below fails
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())     # the data is on disk before the name points at it
        _fsync_directory(directory)      # ... and the rename itself is on disk
    except OSError as e:
        why = e.strerror or str(e)
        raise CheckpointWriteError(
            e.errno, f"{path}: could not write the checkpoint: {why} (errno {e.errno}); the "
                     f"previous checkpoint, if any, is unchanged and no partial file was left"
        ) from None
    _remove_stale_tmp(path)
    return path


def load_checkpoint(path):
    """Read and verify a checkpoint; returns a :class:`Checkpoint`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not raw.startswith(b"PK"):   # not a zip: NumPy would say 'pickled data ... unsafely'
        raise CheckpointError(f"{path}: not a fastrnn checkpoint (a checkpoint is a .npz "
                              f"archive; this file does not start like one)")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:   # noqa: BLE001 - see below
        # allow_pickle=False: reading runs no code, so whatever goes wrong while parsing
        # means a damaged file. A flipped bit in a zip or .npy header surfaces as zipfile's
        # NotImplementedError/RuntimeError (compression method, encryption flag), as
        # SyntaxError/tokenize.TokenError from the .npy header parser, or as MemoryError
        # from a corrupted shape, besides the usual BadZipFile/ValueError/zlib.error.
        raise CheckpointError(f"{path}: not a readable fastrnn checkpoint "
                              f"(corrupt or truncated file?): {type(e).__name__}: {e}") from None
    if "meta" not in arrays:
        raise CheckpointError(f"{path}: not a fastrnn checkpoint (no 'meta' entry)")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except (ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt metadata: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastrnn checkpoint (format tag "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')} is not "
                              f"supported (this fastrnn reads version {VERSION})")
    digests = meta.get("digests", {})
    if not (isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())):
        raise CheckpointError(f"{path}: corrupt metadata: 'digests' must map entry names to "
                              f"strings, got {type(digests).__name__}")
    missing = sorted(set(digests) - set(arrays))
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing entries: {', '.join(missing)}")
    for key, arr in arrays.items():
        if key not in digests:
            raise CheckpointError(f"{path}: unexpected entry {key!r}")
        if _digest(arr) != digests[key]:
            raise CheckpointError(f"{path}: entry {key!r} is corrupt (checksum mismatch)")
    split = {"model": {}, "optim": {}, "extra": {}}
    for key, arr in arrays.items():
        group, _, name = key.partition("/")
        if group not in split or not name:
            raise CheckpointError(f"{path}: unexpected entry {key!r}")
        split[group][name] = arr
    return Checkpoint(path, meta, split["model"], split["optim"], split["extra"])
