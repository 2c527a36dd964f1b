"""Fused KSA kernels: thin wrappers over the sources in metal/ and cuda/.

Each op module builds its kernel once per back end and exposes one function
that returns None where no kernel serves the inputs (CPU, an unsupported
shape or dtype), so callers fall back to the pure-MLX reference path.
"""

import contextlib
import functools
from importlib import resources
from pathlib import Path

import mlx.core as mx

_REPO = Path(__file__).resolve().parents[2]
_enabled = True


def backend():
    """'metal', 'cuda' or None (CPU, or kernels turned off) for the default device."""
    if not _enabled or mx.default_device().type != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


@contextlib.contextmanager
def disabled():
    """Run the pure-MLX reference path on every back end inside this block:
    the oracle the kernels are checked against, and a way to rule a kernel out
    when a result looks wrong. The choice is made when an op is called, so the
    arrays may be evaluated after the block."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


@functools.lru_cache(maxsize=None)
def source(name):
    """Text of a kernel source such as 'metal/prefill.metal'."""
    folder, file = name.split("/")
    try:
        return resources.files(f"mlx_ksa.{folder}").joinpath(file).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        # A source checkout that was not pip-installed.
        return (_REPO / folder / file).read_text()


@functools.lru_cache(maxsize=1024)
def constant(values, dtype=mx.int32):
    """A kernel's small parameter input (a tuple of values, nested for more
    dimensions), made once per value: a fresh array costs as much as a small
    kernel to make, and on MLX's CUDA back end its first use by a kernel pages
    it onto the GPU (0.27 ms a launch, measured on a 64K-token prefill)."""
    return mx.array(values, dtype=dtype)


def scalar(x):
    """A kernel's float32 scalar input (its scale), as `constant`."""
    return constant((float(x),), mx.float32)


def cuda_launch_bounds(threads, blocks):
    """Header suffix giving the kernel MLX declares after it __launch_bounds__:
    mx.fast.cuda_kernel has no option for them, and without them the compiler
    spends registers freely and fewer blocks fit on an SM."""
    return ("\n#undef __global__\n"
            f"#define __global__ __location__(global) __launch_bounds__({threads}, {blocks})\n")


def cuda_kernel(name, inputs, outputs, body, header, shared_memory, wgmma=True):
    """mx.fast.cuda_kernel; wgmma=False builds the kernel's mma.sync path even
    on Hopper, where its wgmma path runs otherwise, so that the GPU tests check
    the path other NVIDIA GPUs take on the H200."""
    if not wgmma:  # MLX caches compiled kernels by name
        name, header = name + "_mma", "#define KSA_NO_WGMMA\n" + header
    return mx.fast.cuda_kernel(name, inputs, outputs, body, header, shared_memory=shared_memory)
