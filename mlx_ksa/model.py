"""Qwen3 with Kwai Summary Attention, in the shape of an mlx-lm model file.

The model runs the text and summary tokens of a call as one sequence
``[text (n) | summaries (m*S)]``: every per-token op is shared, and only
attention (`attention.ksa_attention`, or `KSACache.decode` for one token) knows how
the two streams see each other. Logits come back for text tokens only, over
the text vocabulary.
"""

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import shard_linear
from mlx_lm.models.base import BaseModelArgs

from . import visibility
from .attention import ksa_attention
from .cache import BatchKSACache, KSACache
from .layout import Layout, apply_rope, rope_cos_sin
from .pattern import parse_windows


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    vocab_size: int
    summary_chunk_size: int
    summary_token_begin: int
    summary_sliding_chunk_num: Union[int, list, str]
    head_dim: Optional[int] = None
    rope_theta: float = 1000000.0
    rope_parameters: Optional[dict] = None
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    hidden_act: str = "silu"
    use_summary_attention: bool = True
    # 0 is allowed as the "sliding chunks only" baseline: no summary tokens,
    # text sees its own chunk and the W chunks before it, nothing older. That
    # is not a KSA model; it exists to compare KSA against at equal windows.
    summary_token_num: int = 1
    summary_chunk_position_ids_type: str = "origin"
    summary_token_position_ids_type: str = "last_chunk_slice_right"
    summary_independent_parameters: bool = False
    summary_independent_attention_layernorm: bool = False
    summary_independent_qk_norm: bool = False
    mix_coeff: float = 0.0
    truncate_predict_nums: Optional[int] = None
    quantization: Optional[dict] = None
    windows: list = field(init=False)
    layout: Layout = field(init=False)

    @classmethod
    def from_dict(cls, params):
        """mlx-lm's from_dict, with a missing key named in a ValueError
        instead of a TypeError from the dataclass constructor."""
        required = [f.name for f in fields(cls) if f.init and f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in params]
        if missing:
            raise ValueError(f"config is missing {', '.join(missing)}")
        return super().from_dict(params)

    def __post_init__(self):
        if not self.use_summary_attention:
            raise ValueError("config has use_summary_attention false: a dense model, load it with mlx-lm")
        for key in ("hidden_size", "num_hidden_layers", "intermediate_size",
                    "num_attention_heads", "num_key_value_heads", "vocab_size",
                    "summary_token_begin", "max_position_embeddings"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"config value {key} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Qwen3 uses silu)")
        if self.rope_parameters:
            if self.rope_parameters.get("rope_type", "default") != "default":
                raise ValueError(f"rope_parameters {self.rope_parameters} are not supported")
            self.rope_theta = self.rope_parameters.get("rope_theta", self.rope_theta)
        if self.rope_scaling and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) != "default":
            raise ValueError(f"rope_scaling {self.rope_scaling} is not supported")
        if not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if not 0.0 <= self.mix_coeff <= 1.0:
            raise ValueError(f"mix_coeff must lie in [0, 1], got {self.mix_coeff!r}")
        self.layout = Layout(
            self.summary_chunk_size, self.summary_token_num,
            self.summary_chunk_position_ids_type, self.summary_token_position_ids_type,
        )
        self.windows = parse_windows(self.summary_sliding_chunk_num, self.num_hidden_layers)
        if self.summary_token_begin + self.summary_token_num > self.vocab_size:
            raise ValueError(
                f"summary ids {self.summary_token_begin}..{self.summary_token_begin + self.summary_token_num - 1}"
                f" do not fit in vocab_size {self.vocab_size}"
            )
        n = self.truncate_predict_nums
        if n is not None and not (isinstance(n, int) and 0 < n <= self.summary_token_begin):
            raise ValueError(f"truncate_predict_nums must be in 1..summary_token_begin, got {n!r}")

    @property
    def text_vocab(self):
        return self.truncate_predict_nums or self.summary_token_begin

    @property
    def summary_branch(self):
        """Whether summary tokens mix in their own q/k/v projections."""
        return self.summary_independent_parameters and self.mix_coeff != 0.0


@dataclass
class Step:
    """What every layer needs to know about the current call."""
    t0: Any  # text index of the first new text token (one per row in a batch decode step)
    n: int  # new text tokens
    cos: Optional[mx.array]  # [1 or B, 1, L, D]: per batch row in a batch decode step
    sin: Optional[mx.array]
    # Without tables: the one position of a plain decode step (mx.fast.rope's offset).
    offset: Optional[mx.array] = None
    theta: float = 0.0

    def rope(self, x):
        if self.cos is None:
            # One fused op instead of the half-split arithmetic: decode steps
            # that complete no chunk (7 in 8) are launch-bound.
            return mx.fast.rope(x, x.shape[-1], traditional=False, base=self.theta, scale=1.0,
                                offset=self.offset)
        return apply_rope(x, self.cos, self.sin)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, window: int):
        super().__init__()
        self.args, self.window = args, window
        H, Hkv, D, d = args.num_attention_heads, args.num_key_value_heads, args.head_dim, args.hidden_size
        self.n_heads, self.n_kv_heads, self.scale = H, Hkv, D**-0.5
        bias = args.attention_bias
        self.q_proj = nn.Linear(d, H * D, bias=bias)
        self.k_proj = nn.Linear(d, Hkv * D, bias=bias)
        self.v_proj = nn.Linear(d, Hkv * D, bias=bias)
        self.o_proj = nn.Linear(H * D, d, bias=bias)
        self.q_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        if args.summary_branch:
            self.q_proj_summary = nn.Linear(d, H * D, bias=bias)
            self.k_proj_summary = nn.Linear(d, Hkv * D, bias=bias)
            self.v_proj_summary = nn.Linear(d, Hkv * D, bias=bias)
            if args.summary_independent_qk_norm:
                self.q_norm_summary = nn.RMSNorm(D, eps=args.rms_norm_eps)
                self.k_norm_summary = nn.RMSNorm(D, eps=args.rms_norm_eps)

    def _qkv(self, x, suffix=""):
        B, L, _ = x.shape
        D = self.args.head_dim
        proj = lambda name: getattr(self, name + "_proj" + suffix)(x).reshape(B, L, -1, D)
        norm = lambda name: getattr(self, name + "_norm" + suffix, getattr(self, name + "_norm"))
        return norm("q")(proj("q")), norm("k")(proj("k")), proj("v")

    def __call__(self, x, step: Step, cache: Optional[KSACache]):
        B, L, _ = x.shape
        n = step.n
        q, k, v = self._qkv(x)
        if self.args.summary_branch and L > n:
            # Each branch is normed before mixing (KSA-SPEC section 4).
            mix = self.args.mix_coeff
            mixed = [mix * s + (1 - mix) * b[:, n:] for s, b in zip(self._qkv(x[:, n:], "_summary"), (q, k, v))]
            q, k, v = (mx.concatenate([b[:, :n], s], axis=1) for b, s in zip((q, k, v), mixed))
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        q, k = step.rope(q), step.rope(k)
        if cache is not None and n == 1:
            out = cache.decode(q, k, v, self.scale)
        else:
            (q_t, q_s), (k_t, k_s), (v_t, v_s) = ((t[:, :, :n], t[:, :, n:]) for t in (q, k, v))
            layout = self.args.layout
            text_base = 0
            k_text, v_text, k_sum, v_sum = k_t, v_t, k_s, v_s
            if cache is not None:
                ks, vs, text_base, kss, vss = cache.context(n, k_t)
                k_text, v_text = mx.concatenate(ks + [k_t], 2), mx.concatenate(vs + [v_t], 2)
                k_sum, v_sum = mx.concatenate(kss + [k_s], 2), mx.concatenate(vss + [v_s], 2)
            o_t, o_s = ksa_attention(
                q_t, q_s, k_text, v_text, k_sum, v_sum, layout=layout, window=self.window,
                t0=step.t0, text_base=text_base, scale=self.scale,
            )
            if cache is not None:
                cache.commit(k_text, v_text, text_base, k_s, v_s)
            out = mx.concatenate([o_t, o_s], axis=2) if L > n else o_t
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, window: int):
        super().__init__()
        self.self_attn = Attention(args, window)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if args.summary_independent_attention_layernorm:
            self.input_layernorm_summary = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, h, step: Step, cache=None):
        x = self.input_layernorm(h)
        if "input_layernorm_summary" in self and h.shape[1] > step.n:
            x = mx.concatenate([x[:, : step.n], self.input_layernorm_summary(h[:, step.n :])], axis=1)
        h = h + self.self_attn(x, step, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class KSAModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # Text rows only; the summary rows live apart so that quantizing the
        # text embedding never touches them.
        self.embed_tokens = nn.Embedding(args.summary_token_begin, args.hidden_size)
        if args.summary_token_num:
            # S = 0 (the no-summary baseline) has no parameter rather than an
            # empty one that optimizers and checkpoints would carry around.
            self.summary_embedding = mx.zeros((args.summary_token_num, args.hidden_size))
        self.layers = [TransformerBlock(args, w) for w in args.windows]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        args, layout = self.args, self.args.layout
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        B, n = h.shape[:2]
        # A BatchKSACache's decode step gives one offset per row: rows sit at
        # their own positions, and every row gets the summary tokens when any
        # row completes a chunk (see BatchKSACache).
        t0 = cache[0].offset if cache is not None else 0
        starts = np.atleast_1d(t0)
        c0, m = layout.completed_chunks(starts, n)
        m = int(m.max())
        if m and layout.summaries:
            summaries = mx.tile(self.summary_embedding.astype(h.dtype), (m, 1))
            h = mx.concatenate([h, mx.broadcast_to(summaries, (B, *summaries.shape))], axis=1)
        positions = np.stack([np.concatenate([layout.text_positions(t, n), layout.summary_positions(c, m)])
                              for t, c in zip(starts, c0)])
        if positions.shape == (1, 1):
            step = Step(t0, n, None, None, mx.array(int(positions[0, 0]), mx.int32), args.rope_theta)
        else:
            cos, sin = rope_cos_sin(positions.reshape(-1), args.head_dim, args.rope_theta, h.dtype)
            cos, sin = (x.reshape(*positions.shape, -1)[:, None] for x in (cos, sin))
            step = Step(t0, n, cos, sin)
        for i, layer in enumerate(self.layers):
            h = layer(h, step, cache[i] if cache is not None else None)
        return self.norm(h[:, :n])


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = KSAModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.text_vocab, bias=False)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        if cache is not None and isinstance(cache[0], BatchKSACache):
            return self._batch(inputs, cache, input_embeddings)
        return self._logits(self.model(inputs, cache, input_embeddings))

    def _logits(self, h):
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)[..., : self.args.text_vocab]
        return self.lm_head(h)

    def _batch(self, inputs, cache, input_embeddings):
        """A batch under mlx-lm's batching. A decode step (one real token in
        every row) runs all rows at once. Blocks of tokens run row by row,
        each row's real tokens through its own caches at its own chunk phase;
        padding gets zero logits."""
        L = inputs.shape[1]
        spans = [c.take(L) for c in cache][0]
        if all(s == (0, 1) for s in spans) and all(c.fusable() for c in cache):
            return self._logits(self.model(inputs, cache, input_embeddings))
        for c in cache:
            c.unpack()
        out = []
        for b, (a, n) in enumerate(spans):
            logits = mx.zeros((1, L, self.args.text_vocab))
            if n:
                embeddings = None if input_embeddings is None else input_embeddings[b : b + 1, a : a + n]
                row = self(inputs[b : b + 1, a : a + n], [c.rows[b] for c in cache], embeddings)
                logits = mx.pad(row, [(0, 0), (a, L - a - n), (0, 0)])
            out.append(logits)
        return mx.concatenate(out, axis=0)

    @property
    def layers(self):
        return self.model.layers

    def shard(self, group: Optional[mx.distributed.Group] = None):
        """Tensor parallelism over `group`, as mlx-lm shards Qwen3: each rank
        keeps 1/N of the query heads, KV heads (so its caches hold only those)
        and MLP rows; o_proj and down_proj sum the ranks' parts. The summary
        branch's projections split like the base ones; embeddings, norms and
        lm_head stay whole."""
        group = group or mx.distributed.init()
        N, args = group.size(), self.args
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if getattr(args, key) % N:
                raise ValueError(f"cannot shard {key} = {getattr(args, key)} over {N} ranks")
        split = lambda m, name, how: setattr(m, name, shard_linear(getattr(m, name), how, group=group))
        for layer in self.layers:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj", "q_proj_summary", "k_proj_summary", "v_proj_summary"):
                if name in attn:
                    split(attn, name, "all-to-sharded")
            split(attn, "o_proj", "sharded-to-all")
            attn.n_heads //= N
            attn.n_kv_heads //= N
            split(layer.mlp, "gate_proj", "all-to-sharded")
            split(layer.mlp, "up_proj", "all-to-sharded")
            split(layer.mlp, "down_proj", "sharded-to-all")

    def make_cache(self, max_context: Optional[int] = None):
        """One KSACache per layer. Layers whose window covers max_context
        (default: max_position_embeddings) keep no summaries."""
        args, layout = self.args, self.args.layout
        max_context = max_context or args.max_position_embeddings
        return [
            KSACache(layout.chunk, layout.summaries, w,
                     keep_summaries=visibility.summary_prefix(max_context - 1, layout.chunk, 1, w) > 0)
            for w in args.windows
        ]

    def sanitize(self, weights: dict[str, Any]):
        """Maps the official HF layout onto this module tree."""
        args = self.args
        begin, S = args.summary_token_begin, args.summary_token_num
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        embed = weights.get("model.embed_tokens.weight")
        if not S:  # a no-summary checkpoint may carry an empty summary row block
            weights.pop("model.summary_embedding", None)
        elif embed is not None and "model.summary_embedding" not in weights:
            if embed.shape[0] < begin + S:
                raise ValueError(
                    f"model.embed_tokens.weight has {embed.shape[0]} rows; the summary rows "
                    f"{begin}..{begin + S - 1} are missing"
                )
            weights["model.summary_embedding"] = embed[begin : begin + S]
            weights["model.embed_tokens.weight"] = embed[:begin]
        if args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        elif "lm_head.weight" in weights:
            weights["lm_head.weight"] = weights["lm_head.weight"][: args.text_vocab]
        if not args.summary_branch:
            weights = {k: v for k, v in weights.items() if "_proj_summary." not in k}
        return weights
