"""Run an `mx.fast.metal_kernel` on the CPU: capture the Metal source MLX
generates, compile it as C++ against a Metal shim with g++, and run every
threadgroup on real OS threads.

MLX cannot dispatch a Metal kernel on Linux, but tracing one inside
`mx.export_function` records the `CustomKernel` primitive with the exact
source MLX would compile and the kernel's flags (`ensure_row_contiguous`,
which the kernel object does not expose), so we read both from the export.
"""

import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
HEADERS = ("runtime.h", "metal.h")
CACHE = Path(os.environ.get("MLX_KSA_EMU_CACHE", Path.home() / ".cache" / "mlx_ksa_metal_emu"))

# mx dtype -> numpy dtype of its bytes (bfloat16 travels as raw uint16 bits)
_RAW = {
    mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16,
    mx.int8: np.int8, mx.int16: np.int16, mx.int32: np.int32, mx.int64: np.int64,
    mx.uint8: np.uint8, mx.uint16: np.uint16, mx.uint32: np.uint32, mx.uint64: np.uint64,
    mx.bool_: np.uint8,
}
_BASE_FLAGS = ["-std=gnu++20", "-pthread", "-fno-strict-aliasing", "-w", "-O1"]
_SANITIZE = {
    None: [],
    "thread": ["-fsanitize=thread", "-g1"],
    "address": ["-fsanitize=address", "-fno-omit-frame-pointer", "-g1"],
}
_RUN_ENV = {
    "TSAN_OPTIONS": "halt_on_error=0 exitcode=66 report_signal_unsafe=0",
    "ASAN_OPTIONS": "detect_leaks=0",
}
_CXX_ATTRS = {"likely", "unlikely", "maybe_unused", "fallthrough", "nodiscard", "noreturn", "deprecated"}


class MetalEmuError(RuntimeError):
    """The kernel failed to compile, or its run reported an error."""


def compiler():
    return os.environ.get("MLX_KSA_EMU_CXX") or shutil.which("g++")


def available():
    return compiler() is not None


# ---- source capture ---------------------------------------------------------

@dataclass
class Captured:
    name: str
    source: str
    ensure_row_contiguous: bool


def _call_kwargs(output_shapes, output_dtypes, grid, threadgroup, template, init_value):
    kw = dict(output_shapes=[tuple(s) for s in output_shapes], output_dtypes=list(output_dtypes),
              grid=tuple(grid), threadgroup=tuple(threadgroup), init_value=init_value)
    if template:
        kw["template"] = list(template)
    return kw


def capture(kernel, inputs, **call):
    """The Metal source MLX generates for this call, and the kernel's flags."""
    kw = _call_kwargs(**call)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.mlxfn")
        mx.export_function(path, lambda *xs: kernel(inputs=list(xs), **kw), *inputs)
        blob = Path(path).read_bytes()
    return _parse_export(blob, len(inputs), kw["grid"], kw["threadgroup"])


def _parse_export(blob, n_inputs, grid, threadgroup):
    # CustomKernel's serialized state (MLX 0.32): name, source (u64-length
    # prefixed), grid and threadgroup (3 x int32 each), shape infos (u64 count,
    # 3 bools each), then ensure_row_contiguous (bool).
    at = blob.find(b"CustomKernel")
    if at < 8:
        raise MetalEmuError("no CustomKernel in the export: did the function call the kernel?")
    pos = at - 8

    def string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", blob, pos)
        s = blob[pos + 8: pos + 8 + n].decode()
        pos += 8 + n
        return s

    string()
    name, source = string(), string()
    g = struct.unpack_from("<3i", blob, pos)
    t = struct.unpack_from("<3i", blob, pos + 12)
    (n,) = struct.unpack_from("<Q", blob, pos + 24)
    flag = blob[pos + 32 + 3 * n]
    if g != tuple(grid) or t != tuple(threadgroup) or n != n_inputs or flag > 1:
        raise MetalEmuError("unexpected layout of MLX's exported CustomKernel (MLX version?)")
    return Captured(name, source, bool(flag))


# ---- Metal -> C++ -----------------------------------------------------------

@dataclass
class Param:
    type: str
    name: str
    attr: str  # "buffer" or the Metal attribute name
    index: int = -1


_PARAM = re.compile(r"^\s*(.+?)\s*\b(\w+)\s*\[\[\s*(\w+)\s*(?:\(\s*(\d+)\s*\))?\s*\]\],?\s*(?:\)\s*\{)?\s*$")
_INSTANCE = re.compile(r"^template \[\[host_name\(\"\w+\"\)\]\] \[\[kernel\]\] decltype\((\w+)(<.*>)\) .*;$", re.M)
_ATTR = re.compile(r"\[\[\s*([A-Za-z_]\w*)\s*(?:\([^()\]]*\))?\s*\]\]")
_TYPE = r"(?:(?:const|unsigned|signed|long|short)[ \t]+)*[A-Za-z_][\w:]*(?:[ \t]*<[^;{}()\n]*?>)?"
_DECLARATOR = r"([A-Za-z_]\w*)[ \t]*((?:\[[^\]\n;]+\][ \t]*)*)"
_TG_DECL = re.compile(rf"\bthreadgroup[ \t]+({_TYPE})[ \t]+({_DECLARATOR}(?:,[ \t]*{_DECLARATOR})*);")
_HALF_LIT = re.compile(r"(?<![\w.])(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?[hH]\b")


def parse_signature(source, name):
    start = source.index(f"[[kernel]] void {name}(")
    body = source.index(") {\n", start)
    params = []
    for line in source[start:body + 3].split("\n")[1:]:
        m = _PARAM.match(line)
        if not m:
            raise MetalEmuError(f"cannot parse kernel parameter {line!r}")
        typ, pname, attr, idx = m.groups()
        params.append(Param(typ, pname, attr, int(idx) if idx else -1))
    m = _INSTANCE.search(source)
    return params, (m.group(2) if m else "")


def translate(source, name, metal_path):
    """C++ for one kernel instantiation; keeps Metal line numbers via #line."""
    params, targs = parse_signature(source, name)
    counter = iter(range(1 << 20))

    def tg_decl(m):
        out = []
        for var, dims in re.findall(_DECLARATOR, m.group(2)):
            dims = re.sub(r"\s+", "", dims)
            out.append(f"auto& {var} = ::emu::tg_var<{m.group(1)}{dims}>({next(counter)});")
        return " ".join(out)

    text = _INSTANCE.sub("", source)
    text = _ATTR.sub(lambda m: m.group(0) if m.group(1) in _CXX_ATTRS else "", text)
    text = _TG_DECL.sub(tg_decl, text)
    text = _HALF_LIT.sub(lambda m: f"half({m.group(1)}{m.group(2) or ''})", text)

    args = []
    for p in params:
        if p.attr == "buffer":
            if p.type.endswith("&"):
                args.append(f"*({p.type[:-1]}*)b[{p.index}]")
            else:
                args.append(f"({p.type})b[{p.index}]")
        else:
            n = {"uint3": 3, "uint2": 2}.get(p.type, 1)
            comps = ", ".join(f"a.{p.attr}[{i}]" for i in range(n))
            args.append(f"{p.type}({comps})")
    launcher = "\n".join([
        '#line 1 "metal_emu_launcher"',
        "static void emu_kernel() {",
        "  void** b = emu::buffers.data();",
        "  const emu::Attrs& a = emu::self->a;",
        f"  {name}{targs}(\n    " + ",\n    ".join(args) + ");",
        "}",
        "int main(int argc, char** argv) { return emu::main(argc, argv, emu_kernel); }",
        "",
    ])
    cpp = f'#line 1 "{metal_path}"\n{text}\n{launcher}'
    return cpp, params


# ---- build ------------------------------------------------------------------

def _digest(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _compile(cmd, what):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise MetalEmuError(f"{what} failed:\n{r.stderr[-20000:]}")


def _flags(sanitizer):
    if sanitizer not in _SANITIZE:
        raise ValueError(f"sanitizer must be None, 'thread' or 'address', not {sanitizer!r}")
    return _BASE_FLAGS + _SANITIZE[sanitizer]


def _pch(flags):
    """Folder holding the shim headers and their precompiled form (once per flag set)."""
    cxx = compiler()
    headers = [(HERE / h).read_text() for h in HEADERS]
    d = CACHE / ("pch-" + _digest(cxx, *flags, *headers))
    if not (d / "metal.h.gch").exists():
        d.mkdir(parents=True, exist_ok=True)
        for h, text in zip(HEADERS, headers):
            (d / h).write_text(text)
        tmp = d / f"metal.h.gch.{os.getpid()}"
        _compile([cxx, *flags, "-x", "c++-header", str(d / "metal.h"), "-o", str(tmp)], "precompiling metal.h")
        os.replace(tmp, d / "metal.h.gch")
    return d


def build(source, name, sanitizer=None):
    """Path of the compiled emulator executable for this Metal source (cached)."""
    cxx = compiler()
    if cxx is None:
        raise MetalEmuError("no C++ compiler: install g++ or set MLX_KSA_EMU_CXX")
    flags = _flags(sanitizer)
    pch = _pch(flags)
    d = CACHE / _digest(pch.name, source, Path(__file__).read_text())  # the translation too
    exe = d / "kernel"
    if exe.exists():
        return exe
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.metal").write_text(source)
    cpp, _ = translate(source, name, d / "kernel.metal")
    (d / "kernel.cpp").write_text(cpp)
    tmp = d / f"kernel.{os.getpid()}"
    _compile([cxx, *flags, "-I", str(pch), "-include", "metal.h", str(d / "kernel.cpp"), "-o", str(tmp)],
             f"compiling {d / 'kernel.metal'}")
    os.replace(tmp, exe)
    return exe


# ---- buffers ----------------------------------------------------------------

def _raw_values(x):
    """Logical (C-order) element bytes of an mx array as a numpy array."""
    if x.dtype == mx.bfloat16:
        return (np.array(x.astype(mx.float32)).view(np.uint32) >> 16).astype(np.uint16)
    return np.array(x).astype(_RAW[x.dtype])


def _strides(x, ensure_row_contiguous):
    """Element strides the kernel sees: MLX copies non-row-contiguous inputs
    only when the kernel asks for it."""
    row, acc = [0] * x.ndim, 1
    for k in reversed(range(x.ndim)):
        row[k], acc = acc, acc * x.shape[k]
    actual = [s // x.itemsize for s in memoryview(x).strides]
    contiguous = all(a == r for a, r, n in zip(actual, row, x.shape) if n > 1)
    return row if (ensure_row_contiguous and not contiguous) else actual


def _input_image(x, strides, rng):
    """Bytes laid out as the kernel will index them (gaps hold garbage) and
    the byte offset of element 0 (negative strides start mid-buffer)."""
    vals = _raw_values(x)
    if x.ndim == 0 or x.size == 0:
        return vals.tobytes(), 0
    off = np.zeros(x.shape, np.int64)
    for k, (n, s) in enumerate(zip(x.shape, strides)):
        off += (np.arange(n, dtype=np.int64) * s).reshape([n if i == k else 1 for i in range(x.ndim)])
    lo, hi = int(off.min()), int(off.max())
    img = np.frombuffer(rng.bytes((hi - lo + 1) * x.itemsize), vals.dtype).copy()
    img[(off - lo).ravel()] = vals.ravel()
    return img.tobytes(), -lo * x.itemsize


def _output_init(shape, dtype, init_value, rng):
    n = int(np.prod(shape, dtype=np.int64)) * dtype.size
    if init_value is None:
        return rng.bytes(n)  # Metal outputs start uninitialised
    return _raw_values(mx.full(tuple(shape), init_value, dtype)).tobytes()


# ---- run --------------------------------------------------------------------

def run_metal_kernel(kernel, *, inputs, output_shapes, output_dtypes, grid, threadgroup,
                     template=None, init_value=None, sanitizer=None, stress=False, seed=None,
                     teams=2, timeout=600):
    """Run `kernel` (from `mx.fast.metal_kernel`) as MLX would dispatch it on
    Metal; returns the outputs as numpy arrays (bfloat16 as float32).

    sanitizer: None, "thread" (ThreadSanitizer) or "address" (AddressSanitizer).
    stress: random sleeps and yields at barriers and collectives, to shake out
    races that normal scheduling hides. seed: garbage bytes for uninitialised
    memory and the stress schedule (random when stress and no seed).
    teams: how many threadgroups run at once.
    Raises MetalEmuError on a compile error, a sanitizer report, a divergent
    barrier or collective, a deadlock or a crash.
    """
    inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
    grid, threadgroup = tuple(int(v) for v in grid), tuple(int(v) for v in threadgroup)
    if len(grid) != 3 or len(threadgroup) != 3 or min(grid + threadgroup) < 1:
        raise ValueError("grid and threadgroup need 3 positive sizes")
    if np.prod(threadgroup) > 1024:
        raise ValueError("Metal allows at most 1024 threads per threadgroup")
    call = dict(output_shapes=output_shapes, output_dtypes=output_dtypes, grid=grid,
                threadgroup=threadgroup, template=template, init_value=init_value)
    cap = capture(kernel, inputs, **call)
    exe = build(cap.source, cap.name, sanitizer)
    params, _ = parse_signature(cap.source, cap.name)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") if stress else 0
    rng = np.random.default_rng(seed)

    # MLX's signature: each input, then its _shape/_strides/_ndim if the
    # source names them, then the outputs.
    bufs = [p for p in params if p.attr == "buffer"]
    buffers, pos = {}, 0  # buffer index -> (bytes, byte offset of element 0, is output)
    for x in inputs:
        p = bufs[pos]
        pos += 1
        strides = _strides(x, cap.ensure_row_contiguous)
        buffers[p.index] = (*_input_image(x, strides, rng), False)
        extra = {"_shape": np.array(x.shape, np.int32), "_strides": np.array(strides, np.int64),
                 "_ndim": np.array(x.ndim, np.int32)}
        for suffix, arr in extra.items():
            if pos < len(bufs) and bufs[pos].name == p.name + suffix:
                buffers[bufs[pos].index] = (arr.tobytes(), 0, False)
                pos += 1
    out_params = bufs[pos:]
    if len(out_params) != len(output_shapes):
        raise MetalEmuError(f"kernel signature does not match the call:\n{cap.source}")
    for p, shape, dtype in zip(out_params, output_shapes, output_dtypes):
        buffers[p.index] = (_output_init(shape, dtype, init_value, rng), 0, True)

    with tempfile.TemporaryDirectory(prefix="metal_emu_") as job:
        lines = [f"grid {grid[0]} {grid[1]} {grid[2]}",
                 f"threadgroup {threadgroup[0]} {threadgroup[1]} {threadgroup[2]}",
                 f"teams {int(teams)}", f"stress {int(bool(stress))}", f"seed {seed}",
                 f"buffers {len(buffers)}"]
        for i in range(len(buffers)):
            data, offset, is_out = buffers[i]
            lines.append(f"{len(data)} {offset} {int(is_out)}")
            Path(job, f"in{i}.bin").write_bytes(data)
        Path(job, "job.txt").write_text("\n".join(lines) + "\n")
        _execute(exe, job, sanitizer, timeout, seed)
        outs = []
        for p, shape, dtype in zip(out_params, output_shapes, output_dtypes):
            raw = np.frombuffer(Path(job, f"out{p.index}.bin").read_bytes(), _RAW[dtype]).reshape(shape)
            if dtype == mx.bfloat16:
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
            elif dtype == mx.bool_:
                raw = raw != 0
            outs.append(raw.copy())
    return outs


def _execute(exe, job, sanitizer, timeout, seed):
    env = {**os.environ, **_RUN_ENV}
    cmd = [str(exe), job]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if sanitizer == "thread" and "unexpected memory mapping" in r.stderr and shutil.which("setarch"):
            # Older TSan cannot handle high ASLR entropy; run without ASLR.
            r = subprocess.run(["setarch", os.uname().machine, "-R", *cmd], capture_output=True,
                               text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MetalEmuError(f"{exe.parent / 'kernel.metal'} ran past {timeout} s (seed {seed})") from None
    if r.returncode or "Sanitizer" in r.stderr:
        what = {66: "ThreadSanitizer report", 70: "emulator error"}.get(r.returncode, f"exit status {r.returncode}")
        raise MetalEmuError(f"{what} running {exe.parent / 'kernel.metal'} (seed {seed}):\n{r.stderr[-30000:]}")
