"""Training KSA models: from scratch, from a dense Qwen3 (the paper's continual
pre-training), and fine-tuning (full or LoRA, in mlx_lm.lora's format).

    python -m mlx_ksa.train pretrain --config cfg.json --tokenizer DIR --data a.txt --out OUT
    python -m mlx_ksa.train cpt --dense QWEN3_DIR --windows "([16]*3+[4096])*2" --data ... --out OUT
    python -m mlx_ksa.train finetune --model KSA_DIR --data train.jsonl --lora-rank 8 --out OUT
    python -m mlx_ksa.train fuse --model KSA_DIR --adapter-path OUT --save-path FUSED

The loss is cross-entropy on text tokens only: the model returns logits for
text positions, so each text token predicts the next text token and the
summaries learn only through the text that attends to them.
"""

import argparse
import contextlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .data import Batches, pack, pack_weights, read_tokens, read_tokens_and_mask
from .model import Model, ModelArgs

DISTILL_KL, DISTILL_MSE, MSE_CLAMP = 5.0, 5.0, 0.1  # the paper's stage-1 weights


@dataclass
class TrainArgs:
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 1024
    lr: float = 3e-4
    min_lr: float = 0.0
    warmup: int = 50
    schedule: str = "cosine"  # or "wsd": warmup, stable, linear decay
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_checkpoint: bool = False
    compile: bool = False
    save_every: int = 0
    eval_every: int = 0
    val_batches: int = 4
    report_every: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"unknown schedule {self.schedule!r}: use cosine or wsd")
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def lr_schedule(a: TrainArgs):
    warm = optim.linear_schedule(0.0, a.lr, max(a.warmup, 1))
    rest = max(a.steps - a.warmup, 1)
    if a.schedule == "cosine":
        main = optim.cosine_decay(a.lr, rest, a.min_lr)
        return optim.join_schedules([warm, main], [a.warmup])
    decay = max(int(rest * a.decay_fraction), 1)
    stable = lambda step: mx.array(a.lr)
    return optim.join_schedules(
        [warm, stable, optim.linear_schedule(a.lr, a.min_lr, decay)], [a.warmup, a.steps - decay]
    )


def lm_loss(model, batch):
    """Mean cross-entropy; for a (tokens, weights) batch, the weighted mean."""
    tokens, weights = batch if isinstance(batch, tuple) else (batch, None)
    logits = model(tokens[:, :-1]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:])
    if weights is None:
        return ce.mean()
    total = weights.sum()  # a batch of masked targets only: loss 0, no gradient
    return (ce * weights).sum() / mx.where(total > 0, total, 1)


# -- checkpoints ----------------------------------------------------------
def save_pretrained(path, model, config, tokenizer=None, extra=None):
    """Writes an mlx-ksa model directory atomically (temp dir, then rename)."""
    from mlx_lm.utils import make_shards, save_config

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = model.sanitize(dict(tree_flatten(model.parameters())))
    shards = make_shards(weights)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx"})
        index["weight_map"].update({k: name for k in shard})
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    save_config(dict(config), tmp / "config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    for name, data in (extra or {}).items():
        data(tmp / name)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _save_checkpoint(path, model, config, opt, batches, step, targs):
    state = dict(tree_flatten(opt.state))
    save_pretrained(path, model, config, extra={
        "optimizer.safetensors": lambda p: mx.save_safetensors(str(p), state),
        "trainer.json": lambda p: p.write_text(json.dumps(
            {"step": step, "data": batches.state, "args": asdict(targs), "mix_coeff": model.args.mix_coeff})),
    })


def _load_checkpoint(path, model, opt, batches):
    path = Path(path)
    try:
        meta = json.loads((path / "trainer.json").read_text())
        weights = {}
        for f in sorted(path.glob("model*.safetensors")):
            weights.update(mx.load(str(f)))
        model.load_weights(list(model.sanitize(weights).items()), strict=False)
        opt.init(model.trainable_parameters())
        opt.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot resume from {path}: {e}") from None
    batches.state = meta["data"]
    model.args.mix_coeff = meta["mix_coeff"]
    return meta["step"]


# -- the loop ---------------------------------------------------------------
@contextlib.contextmanager
def _checkpointed_blocks(model, enabled):
    """Recompute each block in the backward pass instead of keeping its
    activations, while training (patches the block class, as mlx-lm does)."""
    cls, call = type(model.layers[0]), type(model.layers[0]).__call__

    def checkpointed(self, h, step, cache=None):
        def inner(params, h):
            self.update(params)
            return call(self, h, step, cache)
        return mx.checkpoint(inner)(self.trainable_parameters(), h)

    if enabled:
        cls.__call__ = checkpointed
    try:
        yield
    finally:
        cls.__call__ = call


def train(model, config, batches, targs: TrainArgs, out, *, loss=lm_loss, val=None,
          on_step=None, resume=None, log=None, loss_inputs=()):
    """Runs targs.steps optimizer steps; returns the list of training losses.
    loss_inputs: arrays the loss reads besides the model's (a teacher's state)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    opt = optim.AdamW(learning_rate=lr_schedule(targs), weight_decay=targs.weight_decay)
    step = _load_checkpoint(resume, model, opt, batches) if resume else 0
    out = Path(out)
    loss_and_grad = nn.value_and_grad(model, loss)

    def evaluate():
        losses = [loss(model, next(val)).item() for _ in range(targs.val_batches)]
        return sum(losses) / len(losses)

    def one_step(batch):
        value, grads = loss_and_grad(model, batch)
        if targs.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, targs.grad_clip)
        opt.update(model, grads)
        return value

    if targs.compile:
        # One trace, then every step replays it: for small models the graph
        # building and kernel launches cost more than the arithmetic.
        if not opt.state:
            opt.init(model.trainable_parameters())
        state = [model.state, opt.state, mx.random.state]
        one_step = mx.compile(one_step, inputs=state + [loss_inputs], outputs=state)

    losses, t_start, tokens = [], time.perf_counter(), 0
    with _checkpointed_blocks(model, targs.grad_checkpoint):
        while step < targs.steps:
            if on_step:
                on_step(step)
            batch = next(batches)
            value = one_step(batch)
            mx.eval(value, model.state, opt.state)
            losses.append(value.item())
            step += 1
            ids = batch[0] if isinstance(batch, tuple) else batch
            tokens += ids.shape[0] * (ids.shape[1] - 1)
            if step % targs.report_every == 0 or step == targs.steps:
                dt = time.perf_counter() - t_start
                eta = dt / len(losses) * (targs.steps - step)
                log(f"step {step}/{targs.steps} | loss {np.mean(losses[-targs.report_every:]):.4f} | "
                    f"lr {opt.learning_rate.item():.2e} | {tokens / dt:.0f} tok/s | ETA {eta:.0f}s")
            if val is not None and targs.eval_every and step % targs.eval_every == 0:
                log(f"step {step}: validation loss {evaluate():.4f}")
            if targs.save_every and step % targs.save_every == 0:
                _save_checkpoint(out / "checkpoints" / f"step_{step:07d}", model, config, opt, batches,
                                 step, targs)
    return losses


# -- continual pre-training of a dense model -------------------------------
def dense_to_ksa(dense, dense_config, *, chunk=8, summaries=1, windows="([128]*3+[16768]*1)*9",
                 summary_params=True):
    """A KSA model whose text path is the dense model's, plus summary weights:
    summary rows start at the mean text embedding, *_proj_summary as copies of
    the base projections, mixed in fully (mix_coeff 1)."""
    cfg = {k: v for k, v in dense_config.items() if k not in ("quantization", "quantization_config")}
    vocab = dense.model.embed_tokens.weight.shape[0]
    cfg.update(
        model_type="qwen3", use_summary_attention=True, summary_chunk_size=chunk,
        summary_token_num=summaries, summary_token_begin=vocab, vocab_size=vocab + summaries,
        summary_sliding_chunk_num=windows, summary_chunk_position_ids_type="origin",
        summary_token_position_ids_type="last_chunk_slice_right",
        summary_independent_parameters=summary_params, mix_coeff=1.0 if summary_params else 0.0,
    )
    student = Model(ModelArgs.from_dict(cfg))
    weights = dict(tree_flatten(dense.parameters()))
    embed = weights["model.embed_tokens.weight"]
    weights["model.summary_embedding"] = mx.broadcast_to(embed.mean(0), (summaries, embed.shape[1]))
    if summary_params:
        for name in list(weights):
            for p in ("q_proj", "k_proj", "v_proj"):
                if name.endswith(f"self_attn.{p}.weight"):
                    weights[name.replace(p, p + "_summary")] = weights[name]
    student.load_weights(list(weights.items()))
    return student, cfg


@contextlib.contextmanager
def recorded_attention(model):
    """Collects each layer's attention output (text positions) during a forward."""
    cls = type(model.layers[0].self_attn)
    call, outputs = cls.__call__, []

    def recording(self, x, *args, **kwargs):
        y = call(self, x, *args, **kwargs)
        outputs.append(y)
        return y

    cls.__call__ = recording
    try:
        yield outputs
    finally:
        cls.__call__ = call


def distill_loss(teacher):
    """Stage 1: CE + 5 KL(teacher || student) + 5 mean clamped attention-output MSE."""
    def loss(student, batch):
        inputs, n = batch[:, :-1], batch.shape[1] - 1
        with recorded_attention(teacher) as t_attn:
            t_logits = teacher(inputs)
        with recorded_attention(student) as s_attn:
            logits = student(inputs)
        logits, t_logits = logits.astype(mx.float32), mx.stop_gradient(t_logits.astype(mx.float32))
        ce = nn.losses.cross_entropy(logits, batch[:, 1:], reduction="mean")
        t_logp = t_logits - mx.logsumexp(t_logits, -1, keepdims=True)
        s_logp = logits - mx.logsumexp(logits, -1, keepdims=True)
        kl = (mx.exp(t_logp) * (t_logp - s_logp)).sum(-1).mean()
        mse = mx.mean(mx.stack([
            mx.clip(mx.square(s[:, :n].astype(mx.float32) - mx.stop_gradient(t).astype(mx.float32)), 0, MSE_CLAMP).mean()
            for s, t in zip(s_attn, t_attn)
        ]))
        return ce + DISTILL_KL * kl + DISTILL_MSE * mse
    return loss


def freeze_to_summary_parameters(model):
    model.freeze()
    model.model.unfreeze(keys=["summary_embedding"], recurse=False)
    for layer in model.layers:
        for name in ("q_proj_summary", "k_proj_summary", "v_proj_summary"):
            if name in layer.self_attn:
                layer.self_attn[name].unfreeze()


def cpt(dense_path, out, data, targs: TrainArgs, anneal: TrainArgs, *, val=None, chunk=8,
        summaries=1, windows="([128]*3+[16768]*1)*9", log=None):
    """Dense Qwen3 -> KSA: distillation (summary weights only), then annealing
    (everything trains while mix_coeff falls 1 -> 0). The result has mix 0."""
    from mlx_lm import load as load_dense

    if anneal.compile:
        # mix_coeff is a Python float that a compiled step would freeze at its first value.
        raise ValueError("the anneal stage cannot be compiled (--anneal-compile): mix_coeff changes every step")

    from .pattern import parse_windows
    from .utils import fetch

    path = fetch(dense_path)  # a mistyped path is named, not looked up on the hub
    source = json.loads((path / "config.json").read_text())
    if "summary_chunk_size" in source or source.get("use_summary_attention"):
        raise ValueError(f"{dense_path} is already a KSA model (its config has summary keys): "
                         "cpt starts from a dense Qwen3")
    # Before the teacher loads: a bad pattern should not cost a model load.
    parse_windows(windows, source.get("num_hidden_layers", 0))
    teacher, tokenizer, dense_config = load_dense(str(path), return_config=True)
    teacher.freeze()
    student, cfg = dense_to_ksa(teacher, dense_config, chunk=chunk, summaries=summaries, windows=windows)
    tokens = read_tokens(data, tokenizer)
    out = Path(out)
    freeze_to_summary_parameters(student)
    train(student, cfg, Batches(pack(tokens, targs.seq_len), targs.batch_size, targs.seed), targs,
          out / "distill", loss=distill_loss(teacher), val=val, log=log, loss_inputs=teacher.state)
    student.unfreeze()

    def mix(step):
        student.args.mix_coeff = 1.0 - step / anneal.steps

    train(student, cfg, Batches(pack(tokens, anneal.seq_len), anneal.batch_size, anneal.seed + 1),
          anneal, out / "anneal", on_step=mix, val=val, log=log)
    student.args.mix_coeff = 0.0
    cfg["mix_coeff"] = 0.0
    save_pretrained(out, student, cfg, tokenizer)
    return student


# -- command line -----------------------------------------------------------
HELP = {
    "steps": "optimizer steps", "batch_size": "sequences per step", "seq_len": "tokens per sequence",
    "lr": "peak learning rate", "min_lr": "final learning rate", "warmup": "linear warm-up steps",
    "schedule": "cosine, or wsd (warm-up, stable, linear decay)", "decay_fraction": "wsd: share of steps decaying",
    "weight_decay": "AdamW weight decay", "grad_clip": "global gradient-norm clip (0: off)",
    "grad_checkpoint": "recompute each block in the backward pass (less memory)",
    "compile": "trace the training step once (mx.compile): faster for small models; on MLX 0.32.4's "
               "CUDA back end the first compiled step of small float32 models has stalled",
    "save_every": "checkpoint every N steps (0: only at the end)", "eval_every": "validation every N steps",
    "val_batches": "batches per validation", "report_every": "log every N steps", "seed": "data order and init",
}


def _add_train_args(p, prefix=""):
    """TrainArgs as flags; prefix "anneal" gives --anneal-steps etc. (cpt's stage 2)."""
    for f in fields(TrainArgs):
        flag = "--" + "-".join(filter(None, (prefix, f.name.replace("_", "-"))))
        dest, text = "_".join(filter(None, (prefix, f.name))), HELP[f.name] + (f" ({prefix})" if prefix else "")
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", dest=dest, help=text)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, dest=dest, help=text)


def _targs(ns, prefix=""):
    return TrainArgs(**{f.name: getattr(ns, "_".join(filter(None, (prefix, f.name)))) for f in fields(TrainArgs)})


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mlx_ksa.train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    pre = sub.add_parser("pretrain", help="a KSA model from scratch")
    pre.add_argument("--config", required=True, help="config.json with the Qwen3 and summary_* keys")
    pre.add_argument("--tokenizer", required=True, help="directory with the tokenizer files")
    c = sub.add_parser("cpt", help="continual pre-training of a dense Qwen3 into KSA")
    c.add_argument("--dense", required=True, help="dense Qwen3 model directory (as mlx-lm loads it)")
    c.add_argument("--chunk", type=int, default=8, help="summary_chunk_size k")
    c.add_argument("--summaries", type=int, default=1, help="summary tokens per chunk S")
    c.add_argument("--windows", default="([128]*3+[16768]*1)*9", help="per-layer window pattern, in chunks")
    _add_train_args(c, "anneal")
    ft = sub.add_parser("finetune", help="full or LoRA fine-tuning of a KSA model")
    ft.add_argument("--model", required=True, help="KSA model directory or repo id")
    ft.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    ft.add_argument("--lora-rank", type=int, default=8)
    ft.add_argument("--lora-scale", type=float, default=20.0)
    ft.add_argument("--mask-prompt", action="store_true",
                    help="learn only the completion of {prompt, completion} JSONL records and the last "
                         "message of {messages} ones")
    ft.add_argument("--lora-layers", type=int, default=16, help="blocks to adapt, from the last (-1: all)")
    fu = sub.add_parser("fuse", help="fold LoRA adapters into the weights")
    fu.add_argument("--model", required=True, help="the model the adapters were trained on")
    fu.add_argument("--adapter-path", required=True)
    fu.add_argument("--save-path", required=True)
    for p in (pre, c, ft):
        p.add_argument("--data", nargs="+", required=True, help=".txt, .jsonl or .npy files")
        p.add_argument("--val-data", nargs="+", help="validation files (same formats)")
        p.add_argument("--out", required=True, help="output model directory (checkpoints under OUT/checkpoints)")
        p.add_argument("--resume", help="a checkpoint directory (OUT/checkpoints/step_N)")
        _add_train_args(p)
    ns = parser.parse_args(argv)
    try:
        run(ns)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run(ns):
    from .utils import load

    if ns.cmd == "fuse":
        model, tokenizer, config = load(ns.model, adapter_path=ns.adapter_path, return_config=True)
        fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
        model.update_modules(tree_unflatten(fused))
        save_pretrained(ns.save_path, model, config, tokenizer)
        return
    targs = _targs(ns)
    if ns.cmd == "cpt":
        cpt(ns.dense, ns.out, ns.data, targs, _targs(ns, "anneal"), chunk=ns.chunk,
            summaries=ns.summaries, windows=ns.windows)
        return
    if ns.cmd == "pretrain":
        from mlx_lm.utils import load_tokenizer

        try:
            config = json.loads(Path(ns.config).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{ns.config} is not valid JSON: {e}") from None
        model, tokenizer = Model(ModelArgs.from_dict(config)), load_tokenizer(Path(ns.tokenizer))
    else:
        if not ns.full and (ns.lora_rank < 1 or ns.lora_layers == 0 or ns.lora_layers < -1):
            raise ValueError(f"--lora-rank must be positive and --lora-layers positive or -1 (all), "
                             f"got {ns.lora_rank} and {ns.lora_layers}")
        model, tokenizer, config = load(ns.model, return_config=True)
        if not ns.full and ns.lora_layers > len(model.layers):  # as mlx_lm.lora
            raise ValueError(f"--lora-layers {ns.lora_layers} is more than the model's {len(model.layers)} "
                             f"layers (give --lora-layers {len(model.layers)}, or -1 for all)")
    mask_prompt = getattr(ns, "mask_prompt", False)

    def batches_of(paths):
        tokens, mask = read_tokens_and_mask(paths, tokenizer, mask_prompt)
        weights = pack_weights(mask, targs.seq_len) if mask_prompt else None
        return Batches(pack(tokens, targs.seq_len), targs.batch_size, targs.seed, weights)

    batches = batches_of(ns.data)
    val = batches_of(ns.val_data) if ns.val_data else None
    out = Path(ns.out)
    if ns.cmd == "finetune" and not ns.full:
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model.freeze()
        lora = {"rank": ns.lora_rank, "scale": ns.lora_scale, "dropout": 0.0}
        linear_to_lora_layers(model, ns.lora_layers, lora)
        train(model, config, batches, targs, out, val=val, resume=ns.resume)
        out.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        (out / "adapter_config.json").write_text(json.dumps(
            {"fine_tune_type": "lora", "num_layers": ns.lora_layers, "lora_parameters": lora}, indent=2))
        return
    train(model, config, batches, targs, out, val=val, resume=ns.resume)
    save_pretrained(out, model, config, tokenizer)


if __name__ == "__main__":
    sys.exit(main())
