"""safetensors files: read and written by fastrnn itself (NumPy only, no pickle).

The format: 8 bytes little-endian header length N, N bytes of JSON header
``{"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}``, then the raw little-endian tensor bytes.
Offsets are relative to the end of the header.

`fastrnn.save("m.safetensors", module)` writes the parameters (named as in
`state_dict()`) and, in the metadata, ``format="fastrnn"``, ``version``,
``class`` and ``config`` (JSON), so `fastrnn.load` rebuilds the module.
`load_weights(path)` reads any safetensors file -- e.g. one written by
``safetensors.torch.save_file(torch_model.state_dict(), path)`` -- into a dict
of NumPy arrays for `load_state_dict`. BF16 tensors are widened to float32
(exactly). Every file is checked before anything is read: header length and
JSON, known dtypes, shapes matching byte counts, offsets in bounds, contiguous
and non-overlapping, covering the data exactly. Problems raise ValueError
naming the file and the tensor. The format has no checksum of its own, so
`fastrnn.save` adds one to the metadata (``fastrnn_sha256``: SHA-256 of the
header and the data) and reading checks it when it is there: a flipped bit in
the weights or the config is an error, not a different model. Files without
it (other writers, fastrnn before it) are read as before.

The `safetensors` package is not needed; the tests check compatibility with it.
"""

import hashlib
import json
import math
import os

import numpy as np

from fastrnn._atomic import replacing

__all__ = ["save", "load", "load_weights", "read", "MAX_HEADER"]

MAX_HEADER = 100 * 1024 * 1024     # the reference implementation's limit
DIGEST_KEY = "fastrnn_sha256"      # metadata: SHA-256 of the contents (fastrnn.save)

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
           "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
           "BOOL": "?", "BF16": "<u2"}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items() if k != "BF16"}   # numpy dtype -> code


def _fail(path, why):
    return ValueError(f"fastrnn: {path!r} is not a valid safetensors file: {why}")


def _checksum(tensors, meta):
    """SHA-256 of a file's contents: the metadata but DIGEST_KEY, and each tensor's
    name, dtype, shape and bytes, in name order. Not of the header's layout, so a
    file another writer saved again with the same tensors and metadata (in its own
    order and offsets) keeps its checksum. tensors: name -> (code, shape, bytes)."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != DIGEST_KEY},
                        sort_keys=True).encode())
    for name in sorted(tensors):
        code, shape, data = tensors[name]
        h.update(json.dumps([name, code, list(shape), len(data)]).encode())
        h.update(data)
    return h.hexdigest()


def write(path, tensors, metadata=None, checksum=False):
    """Write a dict name -> array (and str -> str metadata) as a safetensors file.
    checksum: put the SHA-256 of the contents in the metadata (DIGEST_KEY), which
    `read` then checks (safetensors itself has none; fastrnn.save sets it). A
    DIGEST_KEY given in `metadata` is dropped: it described other contents."""
    header, chunks, offset, contents = {}, [], 0, {}
    for name, a in tensors.items():
        a = np.asarray(a)
        code = _CODES.get(a.dtype.newbyteorder("<"))
        if code is None:
            raise TypeError(f"save: tensor {name!r} has dtype {a.dtype}, which safetensors "
                            f"cannot store")
        data = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
        header[name] = dict(dtype=code, shape=list(a.shape),
                            data_offsets=[offset, offset + len(data)])
        chunks.append(data)
        contents[name] = (code, a.shape, data)
        offset += len(data)
    meta = {k: v for k, v in (metadata or {}).items() if k != DIGEST_KEY}
    bad = [k for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"save: safetensors metadata must map str to str; bad keys {bad}")
    if checksum:
        meta[DIGEST_KEY] = _checksum(contents, meta)
    if meta:
        header["__metadata__"] = meta
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)             # align the data to 8 bytes
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for c in chunks:
                f.write(c)


def read(path):
    """-> (dict name -> array, metadata dict). Validates the whole file first, and
    its checksum when it has one (DIGEST_KEY, not in the metadata returned)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"only {len(head)} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or n > size - 8:
            raise _fail(path, f"header length {n} exceeds the file ({size} bytes) or the "
                              f"{MAX_HEADER}-byte limit")
        raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise _fail(path, f"header is not valid JSON ({type(e).__name__}: {e})") from None
        if not isinstance(header, dict):
            raise _fail(path, "header is not a JSON object")
        meta = header.get("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise _fail(path, "__metadata__ must map strings to strings")
        header.pop("__metadata__", None)
        data_len = size - 8 - n
        spans = []
        for name, info in header.items():
            if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
                raise _fail(path, f"tensor {name!r}: entry must have dtype, shape and "
                                  f"data_offsets, got {info!r}")
            dt = info["dtype"]
            if not isinstance(dt, str) or dt not in _DTYPES:
                raise _fail(path, f"tensor {name!r}: unsupported dtype {dt!r}")
            shape, offs = info["shape"], info["data_offsets"]
            # (bool is an int to isinstance; a dimension over 2**40 can only come with a
            # 0 elsewhere, and NumPy would refuse the shape with no name in its message)
            if (not isinstance(shape, list) or len(shape) > 32
                    or not all(type(s) is int and 0 <= s <= 2 ** 40 for s in shape)):
                raise _fail(path, f"tensor {name!r}: bad shape {shape!r}")
            if (not isinstance(offs, list) or len(offs) != 2
                    or not all(type(o) is int for o in offs) or not 0 <= offs[0] <= offs[1]):
                raise _fail(path, f"tensor {name!r}: bad data_offsets {offs!r}")
            want = math.prod(shape) * np.dtype(_DTYPES[dt]).itemsize   # exact: no wrap
            if offs[1] - offs[0] != want:
                raise _fail(path, f"tensor {name!r}: shape {shape} {dt} needs {want} bytes, "
                                  f"data_offsets give {offs[1] - offs[0]}")
            if offs[1] > data_len:
                raise _fail(path, f"tensor {name!r}: data_offsets {offs} run past the end of "
                                  f"the data ({data_len} bytes; truncated file?)")
            spans.append((offs[0], offs[1], name))
        spans.sort()
        pos = 0
        for b, e, name in spans:
            if b != pos:
                raise _fail(path, f"tensor {name!r}: data starts at {b}, expected {pos} "
                                  f"(gap or overlap)")
            pos = e
        if pos != data_len:
            raise _fail(path, f"{data_len - pos} bytes of data after the last tensor")
        data = f.read(data_len)
    if DIGEST_KEY in meta:
        contents = {name: (info["dtype"], info["shape"],
                           data[info["data_offsets"][0]:info["data_offsets"][1]])
                    for name, info in header.items()}
        if _checksum(contents, meta) != meta[DIGEST_KEY]:
            raise _fail(path, "checksum mismatch: tensors or metadata changed after the file "
                              "was written (a flipped bit, a partial copy?)")
        meta = {k: v for k, v in meta.items() if k != DIGEST_KEY}   # checked: done with
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        a = np.frombuffer(data, _DTYPES[info["dtype"]], count=(e - b) //
                          np.dtype(_DTYPES[info["dtype"]]).itemsize, offset=b)
        if info["dtype"] == "BF16":                    # top half of a float32: exact
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a.reshape(info["shape"]).astype(a.dtype.newbyteorder("="), copy=True)
    return out, meta


def load_weights(path):
    """Every tensor of a safetensors file as a dict of NumPy arrays (for load_state_dict)."""
    return read(path)[0]


def save(path, module):
    """`fastrnn.save` for a path ending in .safetensors."""
    from fastrnn import io
    name = type(module).__name__
    if io._REGISTRY.get(name) is not type(module):
        raise ValueError(f"save: {name} is not a saveable class; known: "
                         f"{', '.join(sorted(io._REGISTRY))} (see fastrnn.io.register)")
    try:
        config = json.dumps(module.config())
    except TypeError as e:
        raise ValueError(f"save: {name}.config() is not JSON-serialisable: {e}") from e
    meta = {"format": io.FORMAT, "version": str(io.VERSION), "class": name, "config": config,
            "training": "true" if module.training else "false"}
    write(path, module.state_dict(), meta, checksum=True)


def load(path):
    """`fastrnn.load` for a safetensors file written by `fastrnn.save`."""
    from fastrnn import io
    path = os.fspath(path)
    arrays, meta = read(path)
    if meta.get("format") != io.FORMAT:
        raise io._fail(path, "safetensors file without fastrnn metadata (format, class, config): "
                             "not written by fastrnn.save. For weights only, use "
                             "module.load_state_dict(fastrnn.load_weights(path))")
    if meta.get("version") != str(io.VERSION):
        raise io._fail(path, f"unsupported format version {meta.get('version')!r} "
                             f"(this fastrnn reads {io.VERSION})")
    training = {"true": True, "false": False, None: True}.get(meta.get("training"))
    if training is None:
        raise io._fail(path, f"metadata 'training' must be 'true' or 'false', got "
                             f"{meta.get('training')!r}")
    header = json.dumps({"format": io.FORMAT, "version": io.VERSION,
                         "class": meta.get("class"), "config": _config(path, meta),
                         "training": training})
    module = io._build(path, np.array([header]), arrays)
    io._load_arrays(path, module, arrays)
    return module


def _config(path, meta):
    from fastrnn import io
    try:
        return json.loads(meta.get("config", ""))
    except ValueError as e:
        raise io._fail(path, f"metadata 'config' is not valid JSON ({e})") from e
