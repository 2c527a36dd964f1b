"""Tensor parallelism: two ranks on MLX's ring back end over loopback give one process's tokens.

The ranks are started as `mlx.launch --backend ring` starts them: each with
MLX_RANK and MLX_HOSTFILE, a JSON list of every rank's "ip:port". This file
is also the worker they run (`python tests/test_distributed.py MODEL OUT`).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Each rank keeps half the heads, and their summaries."
MAX_TOKENS = 24


def greedy(model, tokenizer):
    """Greedy tokens and their log-probabilities, the prompt straddling prefill steps."""
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(tokenizer.encode(PROMPT)), model, max_tokens=MAX_TOKENS,
                          prefill_step_size=7)
    tokens, logprobs = zip(*[(int(t), np.array(lp)) for t, lp in steps])
    return list(tokens), np.stack(logprobs)


def worker(model_path, out_path):
    import mlx_ksa

    group = mx.distributed.init(backend="ring", strict=True)
    model, tokenizer = mlx_ksa.load(model_path)
    model.shard(group)
    tokens, logprobs = greedy(model, tokenizer)
    cache = mlx_ksa.make_prompt_cache(model)
    model(mx.array(tokenizer.encode(PROMPT))[None], cache=cache)
    Path(out_path).write_text(json.dumps({
        "rank": group.rank(), "size": group.size(), "tokens": tokens,
        "logprobs": logprobs.tolist(), "kv_heads": [c.keys.shape[1] for c in cache],
    }))


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_ranks_give_the_single_process_greedy_tokens(tmp_path):
    import mlx_ksa
    from tests.helpers import tiny_checkpoint

    # The summary branch on (mix 0.5), so its projections are sharded too.
    path, cfg, _ = tiny_checkpoint(tmp_path / "model", summary_sliding_chunk_num="[1]*3+[3]",
                                   summary_independent_parameters=True, mix_coeff=0.5)
    model, tokenizer = mlx_ksa.load(str(path))
    expected_tokens, expected_logprobs = greedy(model, tokenizer)

    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(2)]))
    env = dict(os.environ, MLX_HOSTFILE=str(hostfile), PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen([sys.executable, __file__, str(path), str(tmp_path / f"rank{r}.json")],
                         env=dict(env, MLX_RANK=str(r)), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    try:
        logs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"

    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert (got["rank"], got["size"]) == (r, 2)
        assert got["tokens"] == expected_tokens
        assert np.abs(np.array(got["logprobs"]) - expected_logprobs).max() < 1e-4
        assert got["kv_heads"] == [cfg["num_key_value_heads"] // 2] * cfg["num_hidden_layers"]


if __name__ == "__main__":
    worker(*sys.argv[1:])
