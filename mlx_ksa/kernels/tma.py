"""Tensor maps for the CUDA prefill kernel's TMA loads of K and V (Hopper).

A tensor map describes a global array to the Tensor Memory Accelerator. The
driver makes it (cuTensorMapEncodeTiled, through ctypes: MLX's CUDA back end
already loads libcuda), but from Python an MLX array's device address is not
known, so the maps are made with a placeholder address and a one-warp kernel
sets each array's real one on the GPU (PTX `tensormap.replace`), right before
the prefill kernel that reads them.

Each map views a [B * Hkv, rows, D] K or V array in boxes of 64 rows x 64
columns with the 128-byte swizzle, the layout wgmma reads (cuda/prefill.cu).
`maps` returns None where TMA is unavailable (no driver, not compute
capability 9): the kernel's other paths never read the maps.
"""

import ctypes
import functools

import mlx.core as mx

MAP_BYTES = 128
BOX = 64  # rows and columns of one box: 64 columns of 2 bytes = the 128-byte swizzle span
_DATA_TYPES = {mx.float16: 6, mx.bfloat16: 9}  # CUtensorMapDataType
_SWIZZLE_128B, _L2_PROMOTION_256B = 3, 3
_COMPUTE_CAPABILITY_MAJOR = 75  # CUdevice_attribute
_PLACEHOLDER = 1 << 20  # an aligned, nonzero address: the GPU replaces it


@functools.lru_cache(maxsize=None)
def _driver():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    lib.cuTensorMapEncodeTiled.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                                           u64p, u64p, u32p, u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                           ctypes.c_int]
    lib.cuTensorMapEncodeTiled.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def available(device_index=0):
    """Whether the GPU is a Hopper (compute capability 9), whose prefill kernel loads through TMA."""
    lib = _driver()
    if lib is None:
        return False
    dev, major = ctypes.c_int(), ctypes.c_int()
    return (lib.cuInit(0) == 0 and lib.cuDeviceGet(ctypes.byref(dev), device_index) == 0
            and lib.cuDeviceGetAttribute(ctypes.byref(major), _COMPUTE_CAPABILITY_MAJOR, dev) == 0
            and major.value == 9)


def _encode(dtype, heads, rows, D):
    # The driver wants the map 64-byte aligned: an over-sized buffer, then an aligned offset.
    buf = ctypes.create_string_buffer(MAP_BYTES + 64)
    at = (ctypes.addressof(buf) + 63) & ~63
    esize = 2
    dims = (ctypes.c_uint64 * 3)(D, rows, heads)
    strides = (ctypes.c_uint64 * 2)(D * esize, rows * D * esize)
    box = (ctypes.c_uint32 * 3)(BOX, BOX, 1)
    steps = (ctypes.c_uint32 * 3)(1, 1, 1)
    err = _driver().cuTensorMapEncodeTiled(at, _DATA_TYPES[dtype], 3, _PLACEHOLDER, dims, strides, box, steps,
                                           0, _SWIZZLE_128B, _L2_PROMOTION_256B, 0)
    if err:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({err}) for a [{heads}, {rows}, {D}] {dtype} array")
    return ctypes.string_at(at, MAP_BYTES)


@functools.lru_cache(maxsize=256)
def templates(dtype, heads, rows_sum, rows_text, D):
    """The four maps (k_sum, v_sum, k_text, v_text), placeholder addresses, as one uint8 array."""
    sums, texts = _encode(dtype, heads, rows_sum, D), _encode(dtype, heads, rows_text, D)
    return mx.array(list(sums * 2 + texts * 2), dtype=mx.uint8)


# The maps sit at the first 128-byte boundary of their buffer (the driver
# wants 64): `aligned` in cuda/prefill.cu finds them the same way.
_PATCH = """
// Lane i < 4 copies map i and sets its global address: the copy, the replace
// (which reads the map back) and the release fence in one thread's order.
const int lane = threadIdx.x;
if (lane < 4) {
  uint4* out = reinterpret_cast<uint4*>(((reinterpret_cast<size_t>(maps) + 127) & ~size_t(127)) + 128 * lane);
  const uint4* in = reinterpret_cast<const uint4*>(templates) + 8 * lane;
  for (int i = 0; i < 8; ++i) out[i] = in[i];
  const void* base = lane == 0 ? (const void*)k_sum : lane == 1 ? (const void*)v_sum
                   : lane == 2 ? (const void*)k_text : (const void*)v_text;
  asm volatile("tensormap.replace.tile.global_address.global.b1024.b64 [%0], %1;\\n"
               ::"l"(out), "l"(base) : "memory");
  asm volatile("fence.proxy.tensormap::generic.release.gpu;\\n" ::: "memory");
}
"""


@functools.lru_cache(maxsize=None)
def _patch_kernel():
    return mx.fast.cuda_kernel("ksa_tma_maps", ["templates", "k_sum", "v_sum", "k_text", "v_text"], ["maps"],
                               _PATCH)


def maps(k_text, v_text, k_sum, v_sum):
    """[5 * 128] uint8 holding, from its first 128-byte boundary, the maps of
    these arrays ([B, Hkv, rows, D], row contiguous: the very arrays the
    prefill kernel gets), or None without TMA."""
    if not available() or k_text.dtype not in _DATA_TYPES:
        return None
    B, Hkv, Lt, D = k_text.shape
    t = templates(k_text.dtype, B * Hkv, k_sum.shape[2], Lt, D)
    return _patch_kernel()(inputs=[t, k_sum, v_sum, k_text, v_text], output_shapes=[(5 * MAP_BYTES,)],
                           output_dtypes=[mx.uint8], grid=(32, 1, 1), threadgroup=(32, 1, 1))[0]
