"""Read PyTorch checkpoints without importing torch and without running pickled code.

`torch.save` writes a zip: ``<top>/data.pkl`` (a pickle of the object, with each
tensor's storage replaced by a persistent id) and one raw record
``<top>/data/<key>`` per storage. Unpickling such a file with the stock
unpickler runs whatever callables it names, so a downloaded checkpoint could
run ``os.system``. Here the unpickler resolves only the handful of globals a
tensor needs, each to a stand-in defined in this module; every other global
is refused before anything is called.

Public API:

* ``open_torch_checkpoint(path) -> TorchCheckpoint``: a read-only
  ``Mapping[str, mx.array]`` that reads a tensor from disk each time it is
  looked up, so a converter can go tensor by tensor holding about one tensor
  of extra memory. Close it (or use it as a context manager) when done.
* ``load_torch_checkpoint(path) -> dict[str, mx.array]``: everything at once.

``path`` is a ``torch.save`` file (``pytorch_model.bin``, ``*.pt``) or a
directory holding ``pytorch_model.bin`` or a sharded
``pytorch_model.bin.index.json`` with its shards.

Names: nested containers are flattened with dots, so ``{"model": {"w": t}}``
gives ``"model.w"`` and lists give ``"layers.0"``; a bare saved tensor gets the
name ``""``. Non-tensor leaves (epoch counters, learning rates, strings) are
dropped. Callers that want one sub-dictionary (``"model."``,
``"state_dict."``) pick it by prefix.

Dtypes map one to one (bfloat16 included); a dtype MLX lacks (float8,
complex128, quantized) is an error naming the tensor rather than a silent
cast. Checkpoints that pickle other objects (an ``argparse.Namespace``, a
whole ``nn.Module``, numpy scalars) are refused as a whole, as torch's own
``weights_only=True`` does. The pre-1.6 non-zip format is refused too.
"""

import io
import json
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

__all__ = [
    "TorchCheckpoint",
    "TorchCheckpointError",
    "UnsafeCheckpointError",
    "load_torch_checkpoint",
    "open_torch_checkpoint",
]


class TorchCheckpointError(ValueError):
    """The file is not a readable torch checkpoint; the message names the file and tensor."""


class UnsafeCheckpointError(TorchCheckpointError):
    """The pickle names a global outside the allow-list."""


# torch dtype name -> (numpy dtype of the raw bytes, mlx dtype). bfloat16 has no
# numpy dtype, so its bytes travel as uint16 and are reinterpreted in MLX.
_DTYPES = {
    "float64": (np.float64, mx.float64),
    "float32": (np.float32, mx.float32),
    "float16": (np.float16, mx.float16),
    "bfloat16": (np.uint16, mx.bfloat16),
    "int64": (np.int64, mx.int64),
    "int32": (np.int32, mx.int32),
    "int16": (np.int16, mx.int16),
    "int8": (np.int8, mx.int8),
    "uint64": (np.uint64, mx.uint64),
    "uint32": (np.uint32, mx.uint32),
    "uint16": (np.uint16, mx.uint16),
    "uint8": (np.uint8, mx.uint8),
    "bool": (np.bool_, mx.bool_),
    "complex64": (np.complex64, mx.complex64),
}
# Safe to name in a pickle (they are only values) but not representable in
# MLX; reading a tensor of one of these fails with its name and dtype.
_ITEMSIZE_UNSUPPORTED = {
    "complex128": 16,
    "complex32": 4,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "qint8": 1,
    "quint8": 1,
    "qint32": 4,
    "quint4x2": 1,
    "quint2x4": 1,
}
# Legacy typed storage classes, which torch 2.x still writes for the classic dtypes.
_STORAGE_CLASSES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}


def _itemsize(dtype):
    if dtype in _DTYPES:
        return np.dtype(_DTYPES[dtype][0]).itemsize
    return _ITEMSIZE_UNSUPPORTED[dtype]


@dataclass(frozen=True)
class _Dtype:
    name: str


@dataclass(frozen=True)
class _StorageClass:
    dtype: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int

    @property
    def nbytes(self):
        return self.numel * _itemsize(self.dtype)


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    dtype: str
    offset: int
    shape: tuple
    stride: tuple


class _TensorClass:
    """Stands in for `torch.Tensor` as the type argument of `_rebuild_from_type_v2`."""


def _is_index_tuple(value):
    return isinstance(value, tuple) and all(isinstance(v, int) and v >= 0 for v in value)


def _tensor_ref(storage, offset, shape, stride, dtype):
    if not isinstance(storage, _Storage):
        raise TorchCheckpointError(f"tensor storage is {type(storage).__name__}, not a storage record")
    shape, stride = tuple(shape), tuple(stride)
    if not (isinstance(offset, int) and offset >= 0 and _is_index_tuple(shape)
            and _is_index_tuple(stride) and len(shape) == len(stride)):
        raise TorchCheckpointError(f"malformed tensor layout: offset={offset!r} shape={shape!r} stride={stride!r}")
    return _TensorRef(storage, dtype, offset, shape, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor_ref(storage, storage_offset, size, stride, getattr(storage, "dtype", None))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    # New dtypes (uint16, float8, ...) come as an untyped byte storage plus the dtype.
    if not isinstance(dtype, _Dtype):
        raise TorchCheckpointError(f"tensor dtype is {dtype!r}, not a torch dtype")
    return _tensor_ref(storage, storage_offset, size, stride, dtype.name)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # A plain tensor that carries Python attributes; subclasses could run code on load.
    if new_type is not _TensorClass:
        raise UnsafeCheckpointError(f"refusing to rebuild a tensor subclass {new_type!r}")
    return func(*args)


def _device(type, index=None):
    # Training checkpoints keep devices in their configs; a string is enough.
    return type if index is None else f"{type}:{index}"


_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "Size"): tuple,
    ("torch", "device"): _device,
    ("torch", "Tensor"): _TensorClass,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch.storage", "UntypedStorage"): _StorageClass("uint8"),
    ("torch", "UntypedStorage"): _StorageClass("uint8"),
    **{("torch", name): _StorageClass(dtype) for name, dtype in _STORAGE_CLASSES.items()},
    **{("torch", name): _Dtype(name) for name in (*_DTYPES, *_ITEMSIZE_UNSUPPORTED)},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global '{module}.{name}': only tensors and plain containers are allowed"
            ) from None

    def persistent_load(self, pid):
        # torch writes ('storage', storage class, key, location, numel); an
        # untyped storage counts numel in bytes, which matches its uint8 class.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageClass) and isinstance(pid[2], str)
                and isinstance(pid[4], int) and pid[4] >= 0):
            raise TorchCheckpointError(f"unexpected persistent id {pid!r}")
        return _Storage(pid[2], pid[1].dtype, pid[4])


def _flatten(obj, prefix, out, path, on_path):
    if isinstance(obj, _TensorRef):
        if prefix in out:
            raise TorchCheckpointError(f"{path}: two tensors flatten to the name {prefix!r}")
        out[prefix] = obj
        return
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return
    # A pickle can build a container that holds itself.
    if id(obj) in on_path:
        return
    on_path.add(id(obj))
    for key, value in items:
        _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, path, on_path)
    on_path.discard(id(obj))


_LOCAL_HEADER = struct.Struct("<4s22xHH")


class _Archive:
    """One torch zip file, open for reading storage records by key."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(4)
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, ValueError) as e:
            raise TorchCheckpointError(_not_a_zip_message(path, head, e)) from None
        self._file = open(path, "rb")
        try:
            self._members = {info.filename: info for info in self._zip.infolist()}
            pickles = [n for n in self._members if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise TorchCheckpointError(
                    f"{path}: a zip but not a torch.save checkpoint "
                    f"(expected one <folder>/data.pkl, found {len(pickles)})"
                )
            self._prefix = pickles[0][: -len("data.pkl")]
            byteorder = self._members.get(self._prefix + "byteorder")
            # Files from before torch 1.13 have no byteorder record; they were written little-endian.
            order = self._read(byteorder).tobytes() if byteorder else b"little"
            if order not in (b"little", b"big"):
                raise TorchCheckpointError(f"{path}: unknown byteorder record {order!r}")
            self._big_endian = order == b"big"
        except BaseException:
            self.close()
            raise

    def close(self):
        self._zip.close()
        self._file.close()

    def tensors(self):
        """Unpickle data.pkl into flat name -> _TensorRef, checking each against its record."""
        data = self._read(self._members[self._prefix + "data.pkl"])
        try:
            obj = _RestrictedUnpickler(io.BytesIO(data.tobytes())).load()
        except TorchCheckpointError as e:
            raise type(e)(f"{self.path}: {e}") from None
        except Exception as e:  # any failure inside a corrupt pickle means the same thing
            raise TorchCheckpointError(f"{self.path}: corrupt data.pkl ({type(e).__name__}: {e})") from None
        refs = {}
        _flatten(obj, "", refs, self.path, set())
        for name, ref in refs.items():
            self._check(name, ref)
        return refs

    def _check(self, name, ref):
        where = f"{self.path}: tensor {name!r}"
        record = self._members.get(f"{self._prefix}data/{ref.storage.key}")
        if record is None:
            raise TorchCheckpointError(f"{where}: storage record data/{ref.storage.key} is missing")
        if ref.dtype not in _DTYPES:
            raise TorchCheckpointError(f"{where}: dtype {ref.dtype} has no MLX equivalent")
        if record.file_size < ref.storage.nbytes:
            raise TorchCheckpointError(
                f"{where}: storage record data/{ref.storage.key} holds {record.file_size} bytes, "
                f"the pickle declares {ref.storage.nbytes}"
            )
        if all(ref.shape):
            available = ref.storage.nbytes // _itemsize(ref.dtype)
            needed = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) + 1
            if needed > available:
                raise TorchCheckpointError(
                    f"{where}: shape {ref.shape} stride {ref.stride} offset {ref.offset} reaches element "
                    f"{needed - 1} of a storage of {available} {ref.dtype} elements"
                )

    def read_tensor(self, name, ref):
        np_dtype, mx_dtype = _DTYPES[ref.dtype]
        if not all(ref.shape):
            return mx.zeros(ref.shape, dtype=mx_dtype)
        record = self._members[f"{self._prefix}data/{ref.storage.key}"]
        raw = self._read(record, name)
        flat = raw[: ref.storage.nbytes - ref.storage.nbytes % np.dtype(np_dtype).itemsize]
        flat = flat.view(np.dtype(np_dtype).newbyteorder(">" if self._big_endian else "<"))
        itemsize = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset :], ref.shape, [s * itemsize for s in ref.stride], writeable=False
        )
        array = view.astype(np.dtype(np_dtype).newbyteorder("="), order="C", copy=False)
        if ref.dtype == "bfloat16":
            return mx.array(array).view(mx.bfloat16)
        return mx.array(array, dtype=mx_dtype)

    def _read(self, info, tensor=None):
        """Bytes of one member as a uint8 array.

        torch stores members uncompressed and may leave their CRC at zero
        (`set_crc32_options(False)`), which zipfile rejects, so stored members are
        read straight from their offset and a nonzero CRC is checked here.
        """
        what = f"{self.path}: " + (f"tensor {tensor!r}, record {info.filename}" if tensor else info.filename)
        if info.compress_type != zipfile.ZIP_STORED:
            try:
                return np.frombuffer(self._zip.read(info), dtype=np.uint8)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
                raise TorchCheckpointError(f"{what}: unreadable ({e})") from None
        self._file.seek(info.header_offset)
        header = self._file.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise TorchCheckpointError(f"{what}: corrupt zip (bad local header)")
        _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        self._file.seek(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
        data = np.empty(info.file_size, dtype=np.uint8)
        if self._file.readinto(memoryview(data)) != info.file_size:
            raise TorchCheckpointError(f"{what}: file is truncated")
        if info.CRC and zlib.crc32(data) != info.CRC:
            raise TorchCheckpointError(f"{what}: CRC mismatch, the file is corrupt")
        return data


def _not_a_zip_message(path, head, error):
    if head.startswith(b"\x80"):
        return (f"{path}: legacy (pre-1.6, non-zip) torch serialization format is not supported; "
                "re-save it with torch.save from torch >= 1.6 or convert it to safetensors")
    if head == b"PK\x03\x04":
        return f"{path}: truncated or corrupt zip archive ({error})"
    return f"{path}: not a torch checkpoint (no zip archive found; starts with {head!r})"


class TorchCheckpoint(Mapping):
    """Read-only mapping name -> mx.array over one or more torch checkpoint files.

    Each lookup reads that tensor's storage from disk; nothing is cached.
    """

    def __init__(self, files, expected=None):
        # `expected` maps tensor name -> the file a shard index says holds it.
        self._archives = []
        self._refs = {}
        try:
            for file in files:
                archive = _Archive(file)
                self._archives.append(archive)
                for name, ref in archive.tensors().items():
                    if name in self._refs:
                        other = self._refs[name][0].path
                        raise TorchCheckpointError(f"{file}: tensor {name!r} also appears in {other}")
                    self._refs[name] = (archive, ref)
            for name, shard in (expected or {}).items():
                if name not in self._refs or self._refs[name][0].path != shard:
                    raise TorchCheckpointError(f"index lists tensor {name!r} in {shard}, which does not hold it")
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name):
        archive, ref = self._refs[name]
        return archive.read_tensor(name, ref)

    def __iter__(self):
        return iter(self._refs)

    def __len__(self):
        return len(self._refs)

    def close(self):
        for archive in self._archives:
            archive.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_torch_checkpoint(path):
    """Open a torch checkpoint file, or a directory with `pytorch_model.bin` or
    `pytorch_model.bin.index.json` and its shards, as a lazy `TorchCheckpoint`."""
    path = Path(path)
    if not path.is_dir():
        return TorchCheckpoint([path])
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            expected = {name: path / shard for name, shard in json.loads(index.read_text())["weight_map"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise TorchCheckpointError(f"{index}: not a shard index ({type(e).__name__}: {e})") from None
        return TorchCheckpoint(sorted(set(expected.values())), expected)
    if (path / "pytorch_model.bin").is_file():
        return TorchCheckpoint([path / "pytorch_model.bin"])
    raise TorchCheckpointError(f"{path}: no pytorch_model.bin or pytorch_model.bin.index.json")


def load_torch_checkpoint(path):
    """Read every tensor of a torch checkpoint (see `open_torch_checkpoint`) into a dict."""
    with open_torch_checkpoint(path) as checkpoint:
        return {name: checkpoint[name] for name in checkpoint}
