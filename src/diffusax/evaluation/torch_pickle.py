"""Reads a PyTorch state dict (a file written by `torch.save(module.state_dict(), path)`) into numpy
without importing torch; also reads an `.npz` holding the same keys.

    load_state_dict(path) -> {"Conv2d_1a_3x3.conv.weight": np.ndarray [32, 3, 3, 3], ...}

Two `torch.save` layouts are understood:
  zip (torch >= 1.6)  `<name>/data.pkl` pickles the dict; each tensor's storage is the raw
                      little-endian bytes of `<name>/data/<key>` (`<name>/byteorder` says otherwise);
  legacy              pickles of the magic number, protocol 1001 and system info, then the dict's
                      pickle, then the list of storage keys, then per storage an int64 element count
                      followed by the raw bytes.
In both, the dict's pickle refers to storages by persistent id `("storage", torch.<T>Storage, key,
location, numel[, view_metadata])` and rebuilds tensors with `torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)`. The unpickler here resolves only those globals (plus OrderedDict):
anything else in the file (a pickled module, optimizer, arbitrary callable) is refused, so loading a
file cannot run code. Tensors come back as numpy arrays (bfloat16 via ml_dtypes).
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import numpy as np

from diffusax import storage

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}


class NotAStateDict(ValueError):
  """The file is not a tensor state dict this reader understands."""


def _np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # a jax dependency
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


class _StorageType:
  """Stands in for `torch.<T>Storage` inside the pickle."""

  def __init__(self, name: str):
    self.name, self.dtype = name, _np_dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  """torch._utils._rebuild_tensor_v2: a strided view of a storage (a 1-D numpy array)."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise NotAStateDict("a tensor refers to something that is not a storage")
  size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise NotAStateDict(f"a tensor has an invalid layout (offset {offset}, size {size}, stride {stride})")
  if any(s == 0 for s in size):
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:  # as_strided does not check bounds: refuse before it could read past the end
    raise NotAStateDict(f"a tensor of size {size} reaches element {last} of a storage of {storage.size}")
  item = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * item for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals of a tensor state dict; storages come from `storage_fn`."""

  def __init__(self, file, storage_fn=None):
    super().__init__(file)
    self._storage_fn = storage_fn

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor_v2
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise NotAStateDict(f"the pickle refers to {module}.{name}, which a plain tensor state dict does not")

  def persistent_load(self, pid):
    if (self._storage_fn is None or not isinstance(pid, tuple) or len(pid) not in (5, 6)
        or pid[0] != "storage" or not isinstance(pid[1], _StorageType)):
      raise NotAStateDict(f"unknown persistent id {str(pid)[:80]}")
    view = pid[5] if len(pid) == 6 else None
    return self._storage_fn(pid[1], str(pid[2]), int(pid[4]), view)


def _load_zip(zf: zipfile.ZipFile, pkl_name: str):
  prefix = pkl_name[: -len("data.pkl")]
  names = set(zf.namelist())
  big = prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() == b"big"
  cache: dict[str, np.ndarray] = {}

  def storage(stype: _StorageType, key: str, numel: int, view) -> np.ndarray:
    if view is not None:
      raise NotAStateDict("storage views do not occur in zip-format files")
    if key not in cache:
      name = f"{prefix}data/{key}"
      if name not in names:
        raise NotAStateDict(f"storage {name} is missing from the archive")
      dtype = stype.dtype.newbyteorder(">") if big else stype.dtype
      raw = zf.read(name)
      if len(raw) < numel * dtype.itemsize:
        raise NotAStateDict(f"storage {name} holds {len(raw)} bytes, {numel} x {dtype.itemsize} expected")
      cache[key] = np.frombuffer(raw, dtype, numel)
    return cache[key]

  return _Unpickler(io.BytesIO(zf.read(pkl_name)), storage).load()


def _load_legacy(data: bytes):
  f = io.BytesIO(data)
  if _Unpickler(f).load() != LEGACY_MAGIC:
    raise NotAStateDict("no torch.save magic number")
  if _Unpickler(f).load() != LEGACY_PROTOCOL:
    raise NotAStateDict("unknown legacy torch.save protocol")
  info = _Unpickler(f).load()
  big = isinstance(info, dict) and info.get("little_endian") is False
  roots: dict[str, np.ndarray] = {}

  def storage(stype: _StorageType, key: str, numel: int, view) -> np.ndarray:
    if key not in roots:  # filled in place after the dict's pickle; tensors are views of it
      roots[key] = np.zeros(numel, stype.dtype.newbyteorder(">") if big else stype.dtype)
    if view is None:
      return roots[key]
    _, offset, view_size = view
    return roots[key][int(offset): int(offset) + int(view_size)]

  obj = _Unpickler(f, storage).load()
  keys = _Unpickler(f).load()
  if not isinstance(keys, list):
    raise NotAStateDict("no storage key list after the pickle")
  for key in keys:
    root = roots.get(str(key))
    if root is None:
      raise NotAStateDict(f"storage {key!r} listed but not used")
    head = f.read(8)
    if len(head) != 8:
      raise NotAStateDict(f"file ends before storage {key!r}")
    count = struct.unpack(">q" if big else "<q", head)[0]
    raw = f.read(count * root.dtype.itemsize)
    if count != root.size or len(raw) != count * root.dtype.itemsize:
      raise NotAStateDict(f"storage {key!r}: {count} elements stored ({len(raw)} bytes), {root.size} expected")
    root[...] = np.frombuffer(raw, root.dtype)
  return obj


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: array} from a `torch.save`d state dict (zip or legacy layout) or an `.npz`.

  Raises FileNotFoundError if `path` is not a file, and NotAStateDict (a ValueError) naming `path`
  if it is not a flat {str: tensor} mapping in one of those layouts.
  """
  if not storage.isfile(path):
    raise FileNotFoundError(f"weights file {path!r} does not exist")
  what = "not a PyTorch state dict (torch.save zip or legacy layout) or .npz of arrays"
  src = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path  # gs://...: read once.
  try:
    if zipfile.is_zipfile(src):
      with zipfile.ZipFile(src) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
        if pkl:
          obj = _load_zip(zf, pkl[0])
        elif names and all(n.endswith(".npy") for n in names):
          if isinstance(src, io.BytesIO):
            src.seek(0)
          with np.load(src, allow_pickle=False) as z:
            obj = {k: z[k] for k in z.files}
        else:
          raise NotAStateDict(f"a zip archive without data.pkl or .npy members ({names[:3]}...)")
    else:
      obj = _load_legacy(storage.read_bytes(path))
  except NotAStateDict as e:
    raise NotAStateDict(f"{path}: {what}: {e}") from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
          struct.error, zipfile.BadZipFile) as e:
    raise NotAStateDict(f"{path}: {what} ({type(e).__name__}: {e})") from None
  if not isinstance(obj, dict):
    raise NotAStateDict(f"{path}: holds a {type(obj).__name__}, not a state dict {{name: tensor}}")
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise NotAStateDict(f"{path}: entries that are not named tensors: {bad[:5]}")
  return {k: np.array(v, v.dtype.newbyteorder("=") if v.dtype.byteorder == ">" else v.dtype)
          for k, v in obj.items()}
