"""The torch-free checkpoint reader: round trips against torch.save, and refusals.

torch is used here only to write checkpoints and to compare values.
"""

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_ksa.torch_pickle import (
    TorchCheckpoint,
    TorchCheckpointError,
    UnsafeCheckpointError,
    load_torch_checkpoint,
    open_torch_checkpoint,
)

MODULE = Path(__file__).resolve().parents[1] / "mlx_ksa" / "torch_pickle.py"


def as_numpy(array):
    """mx.array -> numpy, bfloat16 as its raw uint16 bits."""
    if array.dtype == mx.bfloat16:
        return np.array(array.view(mx.uint16))
    return np.array(array)


def expected_numpy(tensor):
    if tensor.dtype in (torch.bfloat16, torch.uint16):  # numpy has no bfloat16; torch's numpy() no uint16
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def assert_same(loaded, tensors):
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        got, want = as_numpy(loaded[name]), expected_numpy(tensor)
        assert got.shape == want.shape, name
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def rewrite_zip(src, dst, change, compression=zipfile.ZIP_STORED):
    """Copy a torch zip, passing each member's (name, bytes) through `change`, which may drop it (None)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


class StorageMarker:
    def __init__(self, key, numel, storage_class=torch.FloatStorage):
        self.key, self.numel, self.storage_class = key, numel, storage_class


class FakeTensor:
    """Pickles as torch's own _rebuild_tensor_v2 call, with any layout, valid or not."""

    def __init__(self, storage, offset, shape, stride):
        self.args = (storage, offset, tuple(shape), tuple(stride), False, OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class MarkerPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageMarker):
            return ("storage", obj.storage_class, obj.key, "cpu", obj.numel)
        return None


def write_torch_like_zip(path, obj, records, byteorder=b"little"):
    buf = io.BytesIO()
    MarkerPickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", byteorder)
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)


def test_dtypes_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g)
    tensors = {
        "fp32": base,
        "fp16": base.half(),
        "bf16": base.bfloat16(),
        "fp64": base.double(),
        "int64": torch.randint(-2**40, 2**40, (4, 3), generator=g),
        "int32": torch.randint(-2**30, 2**30, (7,), generator=g, dtype=torch.int32),
        "int16": torch.randint(-2**15, 2**15, (7,), generator=g, dtype=torch.int16),
        "int8": torch.randint(-128, 128, (7,), generator=g, dtype=torch.int8),
        "uint8": torch.randint(0, 256, (2, 2, 2), generator=g, dtype=torch.uint8),
        "bool": torch.rand(9, generator=g) > 0.5,
        "complex64": torch.randn(4, dtype=torch.complex64, generator=g),
        # No legacy storage class: written as an untyped byte storage + dtype (_rebuild_tensor_v3).
        "uint16": torch.tensor([0, 1, 65535, 4242], dtype=torch.uint16),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(2, 0, 3),
    }
    path = tmp_path / "dtypes.pt"
    torch.save(tensors, path)
    loaded = load_torch_checkpoint(path)
    assert_same(loaded, tensors)
    assert loaded["bf16"].dtype == mx.bfloat16
    assert loaded["fp64"].dtype == mx.float64
    assert loaded["uint16"].dtype == mx.uint16


def test_views_and_shared_storage(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    tensors = {
        "whole": base,
        "transposed": base.t(),
        "stepped": base[1::2, ::3],
        "offset_row": base[4],
        "column": base[:, 7],
        "expanded": base[2, :4].unsqueeze(0).expand(5, 4),
    }
    path = tmp_path / "views.pt"
    torch.save(tensors, path)
    with zipfile.ZipFile(path) as z:
        assert sum("/data/" in n for n in z.namelist()) == 1  # one storage behind all six
    assert_same(load_torch_checkpoint(path), tensors)


def test_tied_weights_state_dict(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Linear(4, 11, bias=False))
    model[1].weight = model[0].weight
    path = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    loaded = load_torch_checkpoint(path)
    assert set(loaded) == {"0.weight", "1.weight"}
    np.testing.assert_array_equal(np.array(loaded["1.weight"]), model[0].weight.detach().numpy())


def test_nested_training_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    tagged = torch.ones(2)
    tagged.note = "python attribute"  # pickled through _rebuild_from_type_v2
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "config": {"lr": 0.1, "names": ["a", "b"], "device": torch.device("cuda", 0), "shape": torch.Size([2, 3])},
        "params": [torch.nn.Parameter(torch.zeros(2)), tagged],
    }
    path = tmp_path / "train.pt"
    torch.save(checkpoint, path)
    loaded = load_torch_checkpoint(path)
    assert set(loaded) == {
        "model.weight", "model.bias",
        "optimizer.state.0.step", "optimizer.state.0.exp_avg", "optimizer.state.0.exp_avg_sq",
        "optimizer.state.1.step", "optimizer.state.1.exp_avg", "optimizer.state.1.exp_avg_sq",
        "params.0", "params.1",
    }
    np.testing.assert_array_equal(np.array(loaded["model.weight"]), model.weight.detach().numpy())
    np.testing.assert_array_equal(
        np.array(loaded["optimizer.state.1.exp_avg"]), opt.state[model.bias]["exp_avg"].numpy()
    )
    np.testing.assert_array_equal(np.array(loaded["params.1"]), np.ones(2, np.float32))


def test_lazy_mapping_large_tensor(tmp_path):
    big = torch.randn(2048, 1024, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "big.pt"
    torch.save({"big": big, "small": torch.ones(3)}, path)
    with open_torch_checkpoint(path) as checkpoint:
        assert isinstance(checkpoint, TorchCheckpoint)
        assert list(checkpoint) == ["big", "small"] and len(checkpoint) == 2
        assert "missing" not in checkpoint
        np.testing.assert_array_equal(np.array(checkpoint["big"]), big.numpy())


def test_sharded_directory(tmp_path):
    shards = {"pytorch_model-00001-of-00002.bin": {"a": torch.ones(2)},
              "pytorch_model-00002-of-00002.bin": {"b": torch.zeros(3, dtype=torch.int64), "c": torch.ones(1)}}
    for name, tensors in shards.items():
        torch.save(tensors, tmp_path / name)
    weight_map = {k: name for name, tensors in shards.items() for k in tensors}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = load_torch_checkpoint(tmp_path)
    assert_same(loaded, {k: v for tensors in shards.values() for k, v in tensors.items()})

    weight_map["a"] = "pytorch_model-00002-of-00002.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(TorchCheckpointError, match="index lists tensor 'a'"):
        load_torch_checkpoint(tmp_path)


def test_single_file_directory(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert set(load_torch_checkpoint(tmp_path)) == {"w"}
    (tmp_path / "other").mkdir()
    with pytest.raises(TorchCheckpointError, match="no pytorch_model.bin"):
        load_torch_checkpoint(tmp_path / "other")


def test_recompressed_zip(tmp_path):
    tensors = {"w": torch.randn(8, 8), "b": torch.zeros(3)}
    path = tmp_path / "w.pt"
    torch.save(tensors, path)
    deflated = tmp_path / "deflated.pt"
    rewrite_zip(path, deflated, lambda name, data: data, zipfile.ZIP_DEFLATED)
    assert_same(load_torch_checkpoint(deflated), tensors)


def test_records_without_crc(tmp_path):
    path = tmp_path / "nocrc.pt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(5.0)}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    np.testing.assert_array_equal(np.array(load_torch_checkpoint(path)["w"]), np.arange(5.0, dtype=np.float32))


def test_big_endian_file(tmp_path):
    tensors = {"f": torch.randn(3, 2).t(), "h": torch.randn(4).bfloat16(), "i": torch.arange(6).reshape(2, 3),
               "b": torch.tensor([True, False])}
    little = tmp_path / "little.pt"
    torch.save(tensors, little)
    # torch numbers storages in the order it pickles them: the dict's order.
    big_endian = {"0": np.dtype(">f4"), "1": np.dtype(">u2"), "2": np.dtype(">i8")}

    def swap(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        key = name.rsplit("/data/", 1)[-1]
        if "/data/" in name and key in big_endian:
            return np.frombuffer(data, big_endian[key].newbyteorder("<")).astype(big_endian[key]).tobytes()
        return data

    big = tmp_path / "big.pt"
    rewrite_zip(little, big, swap)
    assert_same(load_torch_checkpoint(big), tensors)


def test_reads_with_torch_unimportable(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    # Loaded by file path: the package's own __init__ may pull torch in through mlx-lm.
    script = f"""
import importlib.util, sys
sys.modules["torch"] = None
spec = importlib.util.spec_from_file_location("torch_pickle", {str(MODULE)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(module.load_torch_checkpoint({str(path)!r})["w"].tolist())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0.0, 1.0, 2.0, 3.0]"


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_torch_save_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": Evil(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load global '(posix|os|nt)\.system'") as info:
        load_torch_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_malicious_plain_pickle_in_zip_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil(marker)))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_torch_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [
    ("builtins", "eval"), ("builtins", "getattr"), ("torch", "load"), ("subprocess", "Popen"),
    ("torch.nn.parameter", "Parameter"), ("numpy.core.multiarray", "scalar"),
])
def test_other_globals_are_refused(tmp_path, module, name):
    path = tmp_path / "global.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x00x\x85R.")
    with pytest.raises(UnsafeCheckpointError, match=f"'{module}.{name}'"):
        load_torch_checkpoint(path)


def test_legacy_format_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2), "payload": Evil(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(TorchCheckpointError, match="legacy"):
        load_torch_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_garbage_files(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        truncated = tmp_path / f"cut{cut}.pt"
        truncated.write_bytes(data[:cut])
        with pytest.raises(TorchCheckpointError, match="truncated or corrupt zip"):
            load_torch_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(TorchCheckpointError, match="not a torch checkpoint"):
        load_torch_checkpoint(garbage)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(TorchCheckpointError, match="not a torch checkpoint"):
        load_torch_checkpoint(empty)
    with pytest.raises(FileNotFoundError):
        load_torch_checkpoint(tmp_path / "absent.pt")


def test_flipped_byte_fails_crc(tmp_path):
    path = tmp_path / "w.pt"
    values = torch.arange(16, dtype=torch.int32) + 0x5A5A0000
    torch.save({"w": values}, path)
    data = bytearray(path.read_bytes())
    at = data.find(values.numpy().tobytes())
    data[at + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with open_torch_checkpoint(path) as checkpoint, pytest.raises(TorchCheckpointError, match="'w'.*CRC mismatch"):
        checkpoint["w"]


def test_missing_and_short_storage_records(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(4, 4), "v": torch.ones(3)}, path)
    missing = tmp_path / "missing.pt"
    rewrite_zip(path, missing, lambda name, data: None if name.endswith("/data/1") else data)
    with pytest.raises(TorchCheckpointError, match=r"tensor 'v'.*data/1 is missing"):
        load_torch_checkpoint(missing)
    short = tmp_path / "short.pt"
    rewrite_zip(path, short, lambda name, data: data[:20] if name.endswith("/data/0") else data)
    with pytest.raises(TorchCheckpointError, match=r"tensor 'w'.*holds 20 bytes, the pickle declares 64"):
        load_torch_checkpoint(short)


def test_layout_past_storage_end(tmp_path):
    path = tmp_path / "layout.pt"
    storage = StorageMarker("0", 6)
    write_torch_like_zip(path, {"ok": FakeTensor(storage, 2, (2, 2), (2, 1)),
                                "bad": FakeTensor(storage, 1, (2, 3), (3, 1))},
                         {"0": np.arange(6, dtype=np.float32).tobytes()})
    with pytest.raises(TorchCheckpointError, match=r"tensor 'bad'.*reaches element 6 of a storage of 6"):
        load_torch_checkpoint(path)


def test_hand_made_zip_reads(tmp_path):
    path = tmp_path / "hand.pt"
    storage = StorageMarker("0", 6)
    write_torch_like_zip(path, {"ok": FakeTensor(storage, 2, (2, 2), (2, 1))},
                         {"0": np.arange(6, dtype=np.float32).tobytes()})
    np.testing.assert_array_equal(np.array(load_torch_checkpoint(path)["ok"]), [[2, 3], [4, 5]])


def test_unsupported_dtype_names_tensor(tmp_path):
    path = tmp_path / "f8.pt"
    torch.save({"fp8": torch.zeros(4, dtype=torch.float8_e4m3fn)}, path)
    with pytest.raises(TorchCheckpointError, match=r"tensor 'fp8'.*float8_e4m3fn has no MLX equivalent"):
        load_torch_checkpoint(path)


def test_corrupt_pickle(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2)}, path)
    bad = tmp_path / "bad.pt"
    rewrite_zip(path, bad, lambda name, data: data[: len(data) // 2] if name.endswith("data.pkl") else data)
    with pytest.raises(TorchCheckpointError, match="corrupt data.pkl"):
        load_torch_checkpoint(bad)
