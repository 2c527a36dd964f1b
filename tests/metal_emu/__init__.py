"""CPU emulator for Metal kernels built with `mx.fast.metal_kernel`.

    from tests.metal_emu import run_metal_kernel
    out, = run_metal_kernel(kernel, inputs=[x], output_shapes=[x.shape],
                            output_dtypes=[x.dtype], grid=(n, 1, 1),
                            threadgroup=(32, 1, 1), sanitizer="thread")
"""

from .driver import MetalEmuError, available, build, capture, run_metal_kernel, translate

__all__ = ["MetalEmuError", "available", "build", "capture", "run_metal_kernel", "translate"]
