"""python -m mlx_ksa.generate under two ring ranks on loopback, as `mlx.launch
--backend ring` starts them: the sharded model writes one process's text,
on rank 0 only."""

import json
import os
import subprocess
import sys

from tests.test_cli import ROOT, cli, generated, make_model, stats
from tests.test_distributed import free_ports


def test_two_ranks_generate_the_text_of_one_process(tmp_path):
    model = make_model(tmp_path / "model")[0]
    env = {**os.environ, "MLX_KSA_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    args = ["-m", "mlx_ksa.generate", "--model", str(model), "--prompt", "shard me", "-m", 60]
    alone = cli(*args[1:], env=env)
    assert alone.returncode == 0, alone.stderr

    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(2)]))
    procs = [subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, text=True,
                              env={**env, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=40) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    (out0, _), (out1, _) = outs
    assert generated(out0) == generated(alone.stdout)
    assert out1 == ""  # only rank 0 prints
    # Each rank holds half the KV heads: its cache and the dense reference halve alike.
    assert out0.rstrip().endswith("; on each of 2 ranks (sharded heads)")
    (ksa, tokens, dense), (ksa1, tokens1, dense1) = stats(alone.stdout)["kv"], stats(out0)["kv"]
    assert tokens1 == tokens
    assert abs(float(ksa1) - float(ksa) / 2) < 1e-3 and abs(float(dense1) - float(dense) / 2) < 1e-3
