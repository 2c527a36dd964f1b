"""`python -m mlx_ksa.bench --quick` on the GPU: every section runs end to end
with the kernels serving (skips without CUDA). The figures themselves come
from the full run (BENCHMARKS.md); this keeps the bench's GPU-only branches
(the decode kernel timed on prebuilt graphs, the quantized cache's kernel) from rotting.

    python -m pytest -q tests/gpu/test_bench_cuda.py
"""

import json

import mlx.core as mx
import pytest

from mlx_ksa import bench

pytestmark = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA back end")


def test_quick_bench_runs_every_section_with_the_kernels(tmp_path):
    bench.main(["--quick", "--out", str(tmp_path / "b.json")])
    results = json.loads((tmp_path / "b.json").read_text())
    assert set(bench.SECTIONS) <= set(results)
    assert results["decode"]["backend"] == "cuda"
    assert all(r["kernel"] and r["prebuilt_s"] > 0 for r in results["decode"]["rows"])
    kv = {r["bits"]: r for r in results["kvbits"]}
    assert set(kv) == {16, 8, 4} and all(r["tokens_per_s"] > 0 for r in kv.values())
