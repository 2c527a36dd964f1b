"""The benchmark's quick mode runs end to end on the CPU and writes its JSON."""

import json

import mlx.core as mx
import numpy as np

from mlx_ksa import bench, visibility
from mlx_ksa.layout import Layout


def test_quick_bench_on_cpu(tmp_path, capsys):
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        bench.main(["--quick", "--out", str(tmp_path / "b.json")])
    finally:
        mx.set_default_device(device)
    results = json.loads((tmp_path / "b.json").read_text())
    assert set(bench.SECTIONS) <= set(results)
    assert results["prefill"][0]["visible_entries"] == bench.visible_entries(256, 8, 1, 4)
    assert all(r["ksa"] > 0 and r["dense"] > 0 for r in results["model"] + results["train"])
    batch = results["batch"]
    assert batch["batch"] == 8 and batch["batched_tokens_per_s"] > 0 and batch["one_at_a_time_tokens_per_s"] > 0
    kv = {r["bits"]: r for r in results["kvbits"]}
    assert set(kv) == {16, 8, 4} and all(r["tokens_per_s"] > 0 for r in kv.values())
    assert kv[16]["kv_bytes"] > kv[8]["kv_bytes"] > kv[4]["kv_bytes"]
    out = capsys.readouterr().out
    assert "### Decode attention" in out and "### Batched decode" in out and "### Quantized KV" in out


def test_visible_entries_count_the_predicate():
    for n, k, S, W in ((37, 4, 1, 2), (40, 3, 2, 1), (24, 8, 1, 0), (50, 5, 2, 100)):
        layout = Layout(k, S)
        # Expanded positions of n text tokens and the summaries of their complete chunks.
        L = n // k * (k + S) + n % k
        p = np.arange(L)
        vis = visibility.visible(p[:, None], p[None, :], layout, W) & (p[:, None] >= p[None, :])
        assert bench.visible_entries(n, k, S, W) == vis.sum()


def test_timeit_takes_turns_and_returns_each_median():
    # A dict of functions runs one call of each per repeat (after one warmup
    # round), so that clock drift reaches all of them alike.
    calls = []
    fns = {name: (lambda name=name: calls.append(name) or mx.array(0)) for name in ("a", "b", "c")}
    medians = bench.timeit(fns, warmup=1, repeats=3)
    assert calls == ["a", "b", "c"] * 4
    assert set(medians) == {"a", "b", "c"} and all(t >= 0 for t in medians.values())
    assert isinstance(bench.timeit(fns["a"], repeats=2), float)
