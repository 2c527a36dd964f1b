"""Peak memory of `python -m mlx_ksa.convert` on a model of the KSA-4B-base shapes.

    python examples/convert_memory.py --work /tmp/ksa4b [--layers 36] [-q]

Writes a randomly initialised checkpoint in the official layout (bfloat16,
safetensors shards with an index, summary row inside embed_tokens, tied
embeddings), then converts it in a child process and reports the child's
peak RSS (ru_maxrss) and wall time. Values do not matter for either, so the
weights are uniform noise, which MLX draws several times faster than normal.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

SHARD_BYTES = 4 << 30  # the official release's shards are a few GB each
CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2560,
    "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
    "max_position_embeddings": 131072, "tie_word_embeddings": True, "attention_bias": False,
    "hidden_act": "silu", "vocab_size": 151937, "torch_dtype": "bfloat16",
    "use_summary_attention": True, "summary_chunk_size": 8, "summary_token_num": 1,
    "summary_token_begin": 151936, "summary_sliding_chunk_num": "([128]*3+[16768]*1)*9",
    "summary_chunk_position_ids_type": "origin", "summary_token_position_ids_type": "last_chunk_slice_right",
    "summary_independent_parameters": False, "summary_independent_attention_layernorm": False,
    "summary_attention_mode": "kernel", "mix_coeff": 0.0,
    "auto_map": {"AutoModelForCausalLM": "modeling_qwen3sa.Qwen3ForCausalLM"},
}


def shapes(cfg):
    d, f, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    yield "model.embed_tokens.weight", (cfg["vocab_size"], d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield from [(p + "self_attn.q_proj.weight", (H * D, d)), (p + "self_attn.k_proj.weight", (Hkv * D, d)),
                    (p + "self_attn.v_proj.weight", (Hkv * D, d)), (p + "self_attn.o_proj.weight", (d, H * D)),
                    (p + "self_attn.q_norm.weight", (D,)), (p + "self_attn.k_norm.weight", (D,)),
                    (p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
                    (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                    (p + "mlp.down_proj.weight", (d, f))]
    yield "model.norm.weight", (d,)


def write_source(path, cfg):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    shards, shard, size = [], {}, 0
    for name, shape in shapes(cfg):
        shard[name] = ((mx.random.uniform(shape=shape) - 0.5) * 0.05).astype(mx.bfloat16)
        mx.eval(shard[name])
        size += shard[name].nbytes
        if size >= SHARD_BYTES:
            shards.append(list(shard))  # names only: the written arrays are freed
            mx.save_safetensors(str(path / f"part-{len(shards)}.safetensors"), shard)
            shard, size = {}, 0
    if shard:
        shards.append(list(shard))
        mx.save_safetensors(str(path / f"part-{len(shards)}.safetensors"), shard)
    # Rename to HF's model-0000i-of-0000n names once n is known.
    n, weight_map = len(shards), {}
    for i, names in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        (path / f"part-{i}.safetensors").rename(path / name)
        weight_map.update(dict.fromkeys(names, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (about 2x the model size)")
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("-q", "--quantize", action="store_true", help="also quantize (4-bit, group 64)")
    args = parser.parse_args()
    src, dst = args.work / "source", args.work / "converted"
    cfg = dict(CONFIG, num_hidden_layers=args.layers, summary_sliding_chunk_num=f"([128]*3+[16768]*1)*{args.layers // 4}")
    if not src.exists():
        t = time.time()
        write_source(src, cfg)
        print(f"wrote the source in {time.time() - t:.0f} s")
    shutil.rmtree(dst, ignore_errors=True)
    source_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    cmd = [sys.executable, "-m", "mlx_ksa.convert", "--hf-path", str(src), "--mlx-path", str(dst)]
    t = time.time()
    subprocess.run(cmd + (["-q"] if args.quantize else []), check=True)
    wall = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss << 10  # KiB on Linux
    out_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    print(json.dumps({"layers": args.layers, "quantize": args.quantize, "source_GB": round(source_bytes / 1e9, 2),
                      "output_GB": round(out_bytes / 1e9, 2), "source_shards": len(list(src.glob("*.safetensors"))),
                      "peak_rss_GB": round(peak / 1e9, 2), "wall_s": round(wall, 1)}))


if __name__ == "__main__":
    main()
