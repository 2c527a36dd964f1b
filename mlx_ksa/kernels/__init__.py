"""Fused KSA kernels: thin wrappers over the sources in metal/ and cuda/.

Each op module builds its kernel once per back end and exposes one function
that returns None where no kernel serves the inputs (CPU, an unsupported
shape or dtype), so callers fall back to the pure-MLX reference path.
"""

import functools
from importlib import resources
from pathlib import Path

import mlx.core as mx

_REPO = Path(__file__).resolve().parents[2]


def backend():
    """'metal', 'cuda' or None (CPU) for the default device."""
    if mx.default_device().type != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


@functools.lru_cache(maxsize=None)
def source(name):
    """Text of a kernel source such as 'metal/prefill.metal'."""
    folder, file = name.split("/")
    try:
        return resources.files(f"mlx_ksa.{folder}").joinpath(file).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        # A source checkout that was not pip-installed.
        return (_REPO / folder / file).read_text()
