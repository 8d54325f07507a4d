"""Reading PyTorch checkpoints and pickled feature files without importing torch, safely.

The prep stage never imports PyTorch (docs/design.md §1), yet the paper's backbones
(§III-B.4) are distributed as PyTorch files, and peers' features often come as pickles.
This module reads both:

* `.pth` / `.pt` files written by `torch.save`: the zip format of PyTorch >= 1.6
  (`<archive>/data.pkl` plus one raw file per tensor storage under `<archive>/data/`) and
  the older "legacy" format (a few pickles followed by the raw storages, PyTorch 0.3-1.5,
  e.g. the PyTorch I3D port's `flow_imagenet.pt`);
* plain pickles (`.pkl`) and object `.npy` files holding NumPy arrays, numbers, strings,
  lists and dicts.

Safety. A pickle can name any Python callable and have it run while loading. The
unpicklers here resolve every global through an allow-list, the rule that
`torch.load(weights_only=True)` applies: for checkpoints, the functions that rebuild
tensors and parameters, the storage types, `collections.OrderedDict` and a few harmless
builtins, plus NumPy array and scalar reconstruction (checkpoint metadata sometimes holds
NumPy numbers); for feature pickles, the NumPy part and the same containers. None of
the real torch functions is ever called: each allowed name maps to a small stand-in
written here. Any other name (`os.system`, `builtins.eval`, a model class, ...) stops the
load with `UnsafePickleError` naming the file and the global; nothing from the file runs.

Tensors come back as `TensorRef` records (dtype, shape, strides, storage) and are read
from disk only when `.numpy()` is called, so optimiser states in a checkpoint cost nothing.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import tarfile
import zipfile
from typing import Any, Callable, Optional

import numpy as np

from data_prep.common import PrepError

SAFE_LOAD_FIX = ("nothing from the file was run. Fix: use the checkpoint from its official "
                 "source, or re-save it as a plain state dict of tensors "
                 "(`torch.save(model.state_dict(), path)`)")


class UnsafePickleError(PrepError):
    """The file names a Python object outside the allow-list; it was not loaded."""


class CheckpointFormatError(PrepError):
    """The file is not a checkpoint this reader understands."""


# -- storages and tensors ---------------------------------------------------------------

# torch storage class name -> NumPy dtype of its elements ('bfloat16' is handled apart).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}


class _StorageType:
    """Stand-in for a `torch.*Storage` class named in the pickle."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize


class _Storage:
    """One tensor storage: where its bytes are and how to read them (lazily)."""

    def __init__(self, storage_type: _StorageType, numel: int, read: Callable[[], bytes],
                 little_endian: bool = True):
        self.type = storage_type
        self.numel = int(numel)
        self._read = read
        self._array: Optional[np.ndarray] = None
        self.little_endian = little_endian

    def array(self) -> np.ndarray:
        if self._array is None:
            raw = self._read()
            st = self.type
            if st.dtype == "bfloat16":   # the upper 16 bits of a float32
                bits = np.frombuffer(raw, "<u2" if self.little_endian else ">u2")
                self._array = (bits.astype(np.uint32) << 16).view(np.float32)
            else:
                dt = np.dtype(st.dtype).newbyteorder("<" if self.little_endian else ">")
                self._array = np.frombuffer(raw, dt).astype(np.dtype(st.dtype), copy=False)
        return self._array


class TensorRef:
    """A tensor in a checkpoint: `.shape`, `.dtype`, and `.numpy()` to read it."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage = storage
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)

    @property
    def dtype(self) -> str:
        d = self.storage.type.dtype
        return "bfloat16" if d == "bfloat16" else np.dtype(d).name

    def numpy(self) -> np.ndarray:
        """A fresh C-contiguous array (bfloat16 storages come back as float32)."""
        base = self.storage.array()
        if not self.shape:
            return np.array(base[self.offset])
        n_last = self.offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride)) + 1
        if min(self.shape) > 0 and n_last > base.size:
            raise CheckpointFormatError(
                f"a tensor of shape {self.shape} reaches past the end of its storage "
                f"({base.size} elements); the checkpoint is truncated or corrupt.")
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.shape,
            strides=tuple(s * base.itemsize for s in self.stride), writeable=False)
        return np.array(view, copy=True)

    def __repr__(self) -> str:
        return f"TensorRef(shape={self.shape}, dtype={self.dtype})"


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError("a tensor record does not point at a storage")
    return TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor, _rebuild_parameter) or new_type not in (_TENSOR, _PARAMETER):
        raise CheckpointFormatError("unexpected tensor subclass record")
    return func(*args)


_TENSOR = object()      # stand-ins for torch.Tensor / torch.nn.Parameter as type markers
_PARAMETER = object()


def _encode(text, encoding="latin1"):
    """`_codecs.encode`, which protocol-2 pickles use to write bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointFormatError("unexpected bytes record")
    return text.encode("latin1")


_CONTAINERS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _encode,
}

_TORCH_GLOBALS: dict[tuple[str, str], Any] = {
    **_CONTAINERS,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TENSOR,
    ("torch.nn.parameter", "Parameter"): _PARAMETER,
    ("torch", "Size"): tuple,
    ("torch", "device"): str,
}
_TORCH_GLOBALS.update({("torch", n): _StorageType(n) for n in _STORAGE_DTYPES})
# Files saved from a GPU by PyTorch < 1.0 name the CUDA storage classes.
_TORCH_GLOBALS.update({("torch.cuda", n): _StorageType(n) for n in _STORAGE_DTYPES})
_TORCH_GLOBALS[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage")
_TORCH_GLOBALS.update({("torch", n): n for n in (
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "bool", "complex64", "complex128", "float", "double", "half", "long", "int")})


# -- NumPy arrays in feature pickles ----------------------------------------------------

def _np_reconstruct(cls, shape, typecode):
    if cls is not np.ndarray:
        raise CheckpointFormatError("array record of an unexpected class")
    return np.ndarray.__new__(np.ndarray, shape, typecode)


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise CheckpointFormatError("unexpected NumPy scalar record")
    return np.frombuffer(data, dtype)[0] if data is not None else dtype.type()


_NUMPY_GLOBALS: dict[tuple[str, str], Any] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _NUMPY_GLOBALS[(_mod, "_reconstruct")] = _np_reconstruct
    _NUMPY_GLOBALS[(_mod, "scalar")] = _np_scalar
_NUMPY_GLOBALS[("numpy", "ndarray")] = np.ndarray
_NUMPY_GLOBALS[("numpy", "dtype")] = np.dtype
for _n in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType",
           "Int16DType", "Int8DType", "UInt8DType", "BoolDType", "ObjectDType", "StrDType",
           "BytesDType"):
    if hasattr(np.dtypes, _n):
        _NUMPY_GLOBALS[("numpy.dtypes", _n)] = getattr(np.dtypes, _n)


# Checkpoint metadata (e.g. mmcv's `meta['hook_msgs']['best_score']`) may hold NumPy
# numbers and arrays: rebuilt with the same safe stand-ins as feature pickles.
_TORCH_GLOBALS.update(_NUMPY_GLOBALS)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals only through `allowed`; anything else raises UnsafePickleError."""

    def __init__(self, file, path: str, allowed: dict, persistent_load=None, what: str = "file"):
        super().__init__(file, encoding="utf-8")
        self._path, self._allowed, self._pload, self._what = path, allowed, persistent_load, what

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        raise UnsafePickleError(
            f"{self._path}: refused to load this {self._what}: it names the Python object "
            f"'{module}.{name}', which is not on the allow-list of plain data (tensors, "
            f"arrays, numbers, strings, lists and dicts, the rule of "
            f"torch.load(weights_only=True)); {SAFE_LOAD_FIX}.")

    def persistent_load(self, pid: Any) -> Any:
        if self._pload is None:
            raise UnsafePickleError(f"{self._path}: refused to load this {self._what}: it "
                                    f"refers to external objects; {SAFE_LOAD_FIX}.")
        return self._pload(pid)


def _unpickle(file, path: str, allowed: dict, persistent_load=None, what: str = "file") -> Any:
    try:
        return _RestrictedUnpickler(file, path, allowed, persistent_load, what).load()
    except (UnsafePickleError, CheckpointFormatError):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, struct.error, UnicodeDecodeError) as err:
        raise CheckpointFormatError(
            f"{path}: cannot be read as a {what} ({type(err).__name__}: {str(err)[:200]}); "
            f"the file is damaged or of another format. Fix: download it again.") from err


# -- torch.save files -------------------------------------------------------------------

def _load_zip(path: str) -> Any:
    zf = zipfile.ZipFile(path)
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise CheckpointFormatError(f"{path}: a zip file but not a PyTorch checkpoint (no "
                                    f"<archive>/data.pkl); fix: pass the .pth/.pt file itself.")
    prefix = pkl[0][: -len("data.pkl")]
    little = True
    if prefix + "byteorder" in names:
        little = zf.read(prefix + "byteorder").decode().strip() != "big"
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"{path}: refused: unexpected external reference "
                                    f"{str(pid)[:80]}; {SAFE_LOAD_FIX}.")
        _, stype, key, _location, numel = pid[:5]
        if not isinstance(stype, _StorageType):
            raise CheckpointFormatError(f"{path}: unexpected storage type {stype!r}")
        key = str(key)
        if key not in storages:
            member = f"{prefix}data/{key}"
            if member not in names:
                raise CheckpointFormatError(f"{path}: storage {key} is missing from the "
                                            f"archive; the file is truncated. Fix: download "
                                            f"it again.")
            if stype.name == "UntypedStorage":
                numel = zf.getinfo(member).file_size
            storages[key] = _Storage(stype, numel, lambda m=member: zf.read(m), little)
        return storages[key]

    with zf.open(pkl[0]) as f:
        return _unpickle(io.BytesIO(f.read()), path, _TORCH_GLOBALS, persistent_load,
                         "PyTorch checkpoint")


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def _load_legacy(path: str) -> Any:
    f = open(path, "rb")
    plain = dict(_CONTAINERS)
    magic = _unpickle(f, path, plain, None, "PyTorch checkpoint")
    if magic != _LEGACY_MAGIC:
        raise CheckpointFormatError(
            f"{path}: not a PyTorch checkpoint (no zip archive and no legacy magic number); "
            f"fix: pass the .pth/.pt file written by torch.save.")
    _unpickle(f, path, plain, None, "PyTorch checkpoint")            # protocol version
    sys_info = _unpickle(f, path, plain, None, "PyTorch checkpoint")
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        if isinstance(pid, tuple) and pid and pid[0] == "module":
            raise UnsafePickleError(f"{path}: refused: the file holds a whole pickled model "
                                    f"(with its source code), not a state dict; {SAFE_LOAD_FIX}.")
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafePickleError(f"{path}: refused: unexpected external reference "
                                    f"{str(pid)[:80]}; {SAFE_LOAD_FIX}.")
        _, stype, root_key, _location, numel, view = pid
        if not isinstance(stype, _StorageType):
            raise CheckpointFormatError(f"{path}: unexpected storage type {stype!r}")
        root_key = str(root_key)
        if root_key not in storages:
            storages[root_key] = _Storage(stype, numel, lambda: b"", little)
        if view is None:
            return storages[root_key]
        _view_key, offset, view_size = view
        # A view shares the root storage; express it as the root plus an element offset.
        return _ViewStorage(storages[root_key], int(offset), int(view_size))

    result = _unpickle(f, path, _TORCH_GLOBALS, persistent_load, "PyTorch checkpoint")
    keys = _unpickle(f, path, plain, None, "PyTorch checkpoint")
    if not isinstance(keys, list):
        raise CheckpointFormatError(f"{path}: damaged legacy checkpoint (no storage list)")
    pos = f.tell()
    size = os.fstat(f.fileno()).st_size
    for key in keys:
        st = storages.get(str(key))
        if st is None:
            raise CheckpointFormatError(f"{path}: storage {key} is listed but never used")
        f.seek(pos)
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointFormatError(f"{path}: truncated (storage {key} missing); fix: "
                                        f"download it again.")
        count = struct.unpack("<q" if little else ">q", head)[0]
        start, nbytes = pos + 8, count * st.type.itemsize
        if start + nbytes > size:
            raise CheckpointFormatError(f"{path}: truncated (storage {key} is cut); fix: "
                                        f"download it again.")
        st.numel = count
        st._read = _file_reader(path, start, nbytes)
        pos = start + nbytes
    f.close()
    return result


class _ViewStorage(_Storage):
    """A legacy storage view: elements [offset, offset + size) of a root storage."""

    def __init__(self, root: _Storage, offset: int, size: int):
        super().__init__(root.type, size, lambda: b"", root.little_endian)
        self.root, self.view_offset = root, offset

    def array(self) -> np.ndarray:
        return self.root.array()[self.view_offset:self.view_offset + self.numel]


def _file_reader(path: str, start: int, nbytes: int) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(nbytes)
    return read


def load_torch_file(path: str) -> Any:
    """The object a `torch.save` file holds, with tensors as lazy `TensorRef`s.

    Raises UnsafePickleError (names outside the allow-list; nothing is run),
    CheckpointFormatError (not a checkpoint, truncated) or PrepError (missing file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PrepError(f"checkpoint file {path!r} does not exist; fix: correct the path.")
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    if tarfile.is_tarfile(path):
        raise CheckpointFormatError(
            f"{path}: a tar-format checkpoint of PyTorch < 0.1.10, which this reader does not "
            f"support; fix: re-save it with a current PyTorch as a state dict.")
    return _load_legacy(path)


def find_state_dict(obj: Any, path: str) -> dict[str, TensorRef]:
    """The {name: TensorRef} mapping inside a loaded checkpoint.

    Accepts a bare state dict or one nested under 'state_dict', 'model', 'module',
    'model_state' or 'net'; a leading 'module.' (DataParallel) is removed from names.
    """
    def tensors(d):
        return isinstance(d, dict) and d and all(isinstance(v, TensorRef) for v in d.values())

    cand = obj
    for key in ("state_dict", "model", "module", "model_state", "net"):
        if not tensors(cand) and isinstance(cand, dict) and isinstance(cand.get(key), dict):
            cand = cand[key]
    if not tensors(cand) and isinstance(cand, dict):
        cand = {k: v for k, v in cand.items() if isinstance(v, TensorRef)} or cand
    if not tensors(cand):
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointFormatError(
            f"{path}: no state dict of tensors found (top level: {keys}); fix: pass the "
            f"checkpoint file of the model weights.")
    out = {}
    for k, v in cand.items():
        k = str(k)
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


# -- feature pickles --------------------------------------------------------------------

_FEATURE_GLOBALS = {**_CONTAINERS, **_NUMPY_GLOBALS}


def load_pickle(path: str, what: str = "feature file") -> Any:
    """A `.pkl` holding arrays, numbers, strings, lists and dicts (nothing else is built)."""
    with open(path, "rb") as f:
        return _unpickle(f, os.fspath(path), _FEATURE_GLOBALS, None, what)


def load_npy(path: str) -> Any:
    """An `.npy` file: plain arrays with `allow_pickle=False`; object arrays (e.g. a
    pickled dict, as MAQA/PAMFN store features) through the restricted unpickler."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except ValueError as err:
            raise CheckpointFormatError(f"{path}: not a NumPy .npy file ({err}); fix: save "
                                        f"features with numpy.save.") from err
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        obj = _unpickle(f, path, _FEATURE_GLOBALS, None, "feature file")
    arr = np.asarray(obj)
    if arr.dtype.hasobject and arr.shape == ():
        return arr.item()
    return obj
