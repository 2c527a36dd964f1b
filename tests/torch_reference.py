"""An independent PyTorch reference of KSA, written from KSA-SPEC alone.

It runs the interleaved sequence the spec describes, with a dense mask built
straight from the spec's predicate, so it shares no code or structure with
mlx_ksa (which never builds the interleaved sequence). Test-only: torch is
not a runtime dependency. Also writes official-format checkpoints.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

BASE_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "hidden_act": "silu",
    "use_summary_attention": True,
    "summary_chunk_size": 4,
    "summary_token_num": 1,
    "summary_token_begin": 96,
    "vocab_size": 97,
    "summary_sliding_chunk_num": "([2]*3+[64]*1)*1",
    "summary_chunk_position_ids_type": "origin",
    "summary_token_position_ids_type": "last_chunk_slice_right",
    "summary_independent_parameters": False,
    "summary_independent_attention_layernorm": False,
    "summary_attention_mode": "kernel",
    "mix_coeff": 0.0,
    "torch_dtype": "float32",
    "auto_map": {"AutoModelForCausalLM": "modeling_qwen3sa.Qwen3ForCausalLM"},
}


def make_config(**overrides):
    cfg = dict(BASE_CONFIG)
    cfg.update(overrides)
    S = cfg["summary_token_num"]
    cfg.setdefault("vocab_size", cfg["summary_token_begin"] + S)
    cfg["vocab_size"] = max(cfg["vocab_size"], cfg["summary_token_begin"] + S)
    return cfg


def windows_of(cfg):
    # The spec's grammar is a subset of Python's; eval is fine for the tests'
    # own trusted strings (the library parses them safely).
    v = cfg["summary_sliding_chunk_num"]
    if isinstance(v, str):
        assert re.fullmatch(r"[\d\[\]\(\)\+\*, ]+", v)
        v = eval(v)
    return v if isinstance(v, list) else [v] * cfg["num_hidden_layers"]


def random_weights(cfg, seed=0, scale=0.08):
    """HF-named float32 weights; summary rows inside embed_tokens (as the official format)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * scale
    ones = lambda n: 1.0 + torch.randn(n, generator=g) * 0.1
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    H, Hkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    V = cfg["vocab_size"]
    w = {"model.embed_tokens.weight": torch.randn(V, d, generator=g) * 0.5, "model.norm.weight": ones(d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes = {"q": H * D, "k": Hkv * D, "v": Hkv * D}
        for n, out in shapes.items():
            w[p + f"self_attn.{n}_proj.weight"] = r(out, d)
            if cfg["summary_independent_parameters"]:
                w[p + f"self_attn.{n}_proj_summary.weight"] = r(out, d)
        w[p + "self_attn.o_proj.weight"] = r(d, H * D)
        w[p + "self_attn.q_norm.weight"] = ones(D)
        w[p + "self_attn.k_norm.weight"] = ones(D)
        w[p + "input_layernorm.weight"] = ones(d)
        w[p + "post_attention_layernorm.weight"] = ones(d)
        if cfg["summary_independent_attention_layernorm"]:
            w[p + "input_layernorm_summary.weight"] = ones(d)
        w[p + "mlp.gate_proj.weight"] = r(f, d)
        w[p + "mlp.up_proj.weight"] = r(f, d)
        w[p + "mlp.down_proj.weight"] = r(d, f)
    if not cfg["tie_word_embeddings"]:
        lm = r(V, d) * 4
        lm[cfg["summary_token_begin"] :] = 0  # the official zero summary row
        w["lm_head.weight"] = lm
    return w


def save_checkpoint(path, cfg, weights):
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    return path


# -- the spec, literally ----------------------------------------------------
def expanded_layout(n_text, k, S):
    """(is_summary, chunk, offset, text_index) per interleaved position."""
    rows = []
    for t in range(n_text):
        rows.append((False, t // k, t % k, t))
        if (t + 1) % k == 0:
            rows.extend((True, t // k, j, -1) for j in range(S))
    return rows


def spec_mask(rows, k, W):
    L = len(rows)
    m = np.zeros((L, L), bool)
    for q, (qs, qc, qo, _) in enumerate(rows):
        for kv, (ks, kc, ko, _) in enumerate(rows[: q + 1]):
            sliding = qc - kc <= W
            if qs:
                m[q, kv] = qc == kc
            else:
                m[q, kv] = (sliding and not ks) or (ks and not sliding)
    return m


def positions(rows, k, S, text_type, summary_type):
    out = []
    for s, c, o, t in rows:
        if not s:
            out.append(t if text_type == "origin" else t % k)
        elif summary_type == "zeros":
            out.append(0)
        elif summary_type == "last_chunk_slice_right":
            out.append(c * k + max(math.floor((o + 1) * k / S) - 1, 0))
        else:
            out.append(c * k + max(math.floor(o * k / S) - 1, 0))
    return out


def _rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, D, theta):
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    ang = torch.tensor(pos, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos(), emb.sin()
    rot = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1)
    return x * cos + rot * sin


@torch.no_grad()
def forward(cfg, weights, ids):
    """Logits [n_text, text_vocab] for a 1-D id sequence, dense-mask attention."""
    k, S = cfg["summary_chunk_size"], cfg["summary_token_num"]
    begin = cfg["summary_token_begin"]
    H, Hkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, mix = cfg["rms_norm_eps"], cfg["mix_coeff"]
    rows = expanded_layout(len(ids), k, S)
    exp_ids = [ids[t] if not s else begin + o for s, _, o, t in rows]
    is_sum = torch.tensor([r[0] for r in rows])
    pos = positions(rows, k, S, cfg["summary_chunk_position_ids_type"], cfg["summary_token_position_ids_type"])
    w = weights
    h = w["model.embed_tokens.weight"][torch.tensor(exp_ids)]
    L = h.shape[0]
    for i, W in enumerate(windows_of(cfg)):
        p = f"model.layers.{i}."
        x = _rms(h, w[p + "input_layernorm.weight"], eps)
        if cfg["summary_independent_attention_layernorm"]:
            xs = _rms(h, w[p + "input_layernorm_summary.weight"], eps)
            x = torch.where(is_sum[:, None], xs, x)

        def qkv(suffix):
            q = (x @ w[p + f"self_attn.q_proj{suffix}.weight"].T).view(L, H, D)
            kk = (x @ w[p + f"self_attn.k_proj{suffix}.weight"].T).view(L, Hkv, D)
            v = (x @ w[p + f"self_attn.v_proj{suffix}.weight"].T).view(L, Hkv, D)
            q = _rms(q, w[p + "self_attn.q_norm.weight"], eps)
            kk = _rms(kk, w[p + "self_attn.k_norm.weight"], eps)
            return q, kk, v

        q, kk, v = qkv("")
        if cfg["summary_independent_parameters"] and mix != 0:
            qs, ks, vs = qkv("_summary")
            sel = is_sum[:, None, None]
            q = torch.where(sel, mix * qs + (1 - mix) * q, q)
            kk = torch.where(sel, mix * ks + (1 - mix) * kk, kk)
            v = torch.where(sel, mix * vs + (1 - mix) * v, v)
        q = _rope(q.transpose(0, 1), pos, D, cfg["rope_theta"])
        kk = _rope(kk.transpose(0, 1), pos, D, cfg["rope_theta"])
        v = v.transpose(0, 1)
        rep = H // Hkv
        kk, v = kk.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        scores = (q @ kk.transpose(1, 2)) / math.sqrt(D)
        mask = torch.tensor(spec_mask(rows, k, W))
        scores = scores.masked_fill(~mask, float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(0, 1).reshape(L, H * D)
        h = h + o @ w[p + "self_attn.o_proj.weight"].T
        x = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
        gate = x @ w[p + "mlp.gate_proj.weight"].T
        up = x @ w[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    h = _rms(h, w["model.norm.weight"], eps)[~is_sum]
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    vocab = cfg.get("truncate_predict_nums") or begin
    return (h @ head.T)[:, :vocab].numpy()
