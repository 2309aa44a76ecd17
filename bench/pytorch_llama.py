#!/usr/bin/env python3
"""The agora Llama in plain PyTorch eager, and a training-step benchmark that mirrors `agora bench`.

The model is built from a Hugging Face LlamaConfig JSON (`agora info --preset NAME --hf-config`) and computes
exactly what agora's model computes, op for op:

    x = embed(ids)
    per layer:  h = x + o_proj(attention(rms_norm(x)))
                x = h + down_proj(silu(gate_proj(n)) * up_proj(n)),   n = rms_norm(h)
    logits = rms_norm(x) @ embed.T   (tied)   or   lm_head(rms_norm(x))

One benchmark step is a full optimizer update, like agora's `Trainer::train_step`: zero the gradients, forward
a [B, T] batch of random token ids, mean cross-entropy, backward, clip the global gradient norm at 1.0, AdamW
(betas 0.9/0.95, eps 1e-8, decoupled weight decay 0.1 on >=2-D parameters only) at a warmup + cosine learning
rate, and read the loss as a Python float (which waits for the step to finish).

    python bench/pytorch_llama.py --config small.json --batch-size 8 --seq-len 256 --steps 10 --warmup 2 \
        --threads 2 --json

prints one JSON line with the same fields as `agora bench --json`, with "impl": "pytorch".
"""

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    initializer_range: float

    @staticmethod
    def from_hf(d: dict) -> "LlamaConfig":
        """Reads the fields agora's model uses from an HF config.json (transformers 4 or 5 layout)."""
        heads = d["num_attention_heads"]
        rope_theta = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        return LlamaConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=d.get("initializer_range", 0.02),
        )


# ----------------------------------------------------------------------------------------------------------
# Model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(c: LlamaConfig):
    """cos/sin tables [max_positions, head_dim], HF convention (the two halves share frequencies)."""
    hd = c.head_dim
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    positions = torch.arange(c.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x):
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    """x: [B, heads, T, hd]; cos/sin: [T, hd]."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(y.transpose(1, 2).contiguous().view(B, T, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        cos, sin = rope_tables(c)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """agora's scheme: matrices ~ N(0, initializer_range²), the residual-stream writers (o_proj, down_proj)
        scaled by 1/√(2·layers), RMSNorm gains 1. (Speed does not depend on it; the initial loss does, a little.)"""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.config.num_hidden_layers))
            else:
                p.normal_(0.0, std)

    def forward(self, ids):
        T = ids.size(1)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head)

    def loss(self, ids, targets):
        logits = self(ids)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# ----------------------------------------------------------------------------------------------------------
# Training step (the same update as agora's Trainer::train_step)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1):
    """AdamW with weight decay on matrices only (RMSNorm gains are not decayed).

    foreach/fused are left at their defaults (None). In torch 2.13 that picks the for-loop implementation
    (`_single_tensor_adam`) on CPU: `_default_to_fused_or_foreach` only turns foreach on for CUDA/XPU/MTIA
    tensors, and fused is never the default. (AdamW is Adam with decoupled_weight_decay=True.)
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def warmup_cosine(peak: float, minimum: float, warmup: int, total: int):
    """agora's Schedule::lr: linear warmup to `peak` over `warmup` updates, then cosine decay to `minimum`."""

    def lr(step: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return minimum + 0.5 * (peak - minimum) * (1.0 + math.cos(math.pi * progress))

    return lr


class Trainer:
    # agora bench's TrainConfig: lr 3e-3 → 3e-4, 10 warmup steps, a long horizon, clip 1.0.
    def __init__(self, model: Llama, lr=3e-3, min_lr=3e-4, warmup=10, total=1_000_000, grad_clip=1.0):
        self.model = model
        self.optimizer = make_optimizer(model, lr)
        self.schedule = warmup_cosine(lr, min_lr, warmup, total)
        self.grad_clip = grad_clip
        self.step = 0

    def train_step(self, ids, targets) -> float:
        self.optimizer.zero_grad()  # set_to_none=True, PyTorch's default
        loss = self.model.loss(ids, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step += 1
        return loss.item()


def random_batch(generator, vocab_size: int, batch_size: int, seq_len: int):
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


# ----------------------------------------------------------------------------------------------------------
# Benchmark (the same measurements as `agora bench`)


def median_seconds(warmup: int, n: int, f):
    for _ in range(warmup):
        f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], times  # agora's median: the upper one for even n


def matmul_peak_gflops(n: int = 2048) -> float:
    """The fp32 matmul rate here (GFLOP/s): median of 5 timed 2048×2048 matmuls after 2 warmups."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds, _ = median_seconds(2, 5, lambda: a @ b)
    return 2.0 * n**3 / seconds / 1e9


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied embedding is one Parameter, counted once


def train_flops_per_token(model: Llama, seq_len: int) -> float:
    """6 per matmul parameter (all but RMSNorm gains and an untied embedding lookup) + attention (PaLM)."""
    c = model.config
    norms = (2 * c.num_hidden_layers + 1) * c.hidden_size
    lookup = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    matmul_params = num_parameters(model) - norms - lookup
    return 6.0 * matmul_params + 12.0 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="HF config.json path, or - for stdin")
    ap.add_argument("--preset", default=None, help="name to report (default: the config file's name)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    text = sys.stdin.read() if args.config == "-" else open(args.config).read()
    config = LlamaConfig.from_hf(json.loads(text))
    if args.seq_len > config.max_position_embeddings:
        sys.exit(f"--seq-len {args.seq_len} exceeds max_position_embeddings = {config.max_position_embeddings}")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    preset = args.preset or args.config.rsplit("/", 1)[-1].removesuffix(".json")

    torch.manual_seed(args.seed)
    model = Llama(config)
    trainer = Trainer(model)
    generator = torch.Generator().manual_seed(args.seed)
    losses = []

    def step():
        ids, targets = random_batch(generator, config.vocab_size, args.batch_size, args.seq_len)
        losses.append(trainer.train_step(ids, targets))

    seconds, times = median_seconds(args.warmup, args.steps, step)
    tokens_per_step = args.batch_size * args.seq_len
    achieved = train_flops_per_token(model, args.seq_len) * tokens_per_step / seconds / 1e9
    peak = matmul_peak_gflops()
    row = {
        "impl": "pytorch", "preset": preset, "parameters": num_parameters(model),
        "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": threads,
        "ms_per_step": seconds * 1e3, "tokens_per_second": tokens_per_step / seconds,
        "model_gflops": achieved, "matmul_peak_gflops": peak, "mfu": achieved / peak,
        "step_times_ms": [t * 1e3 for t in times],
        "initial_loss": losses[0], "vocab_size": config.vocab_size, "torch_version": torch.__version__,
    }  # fmt: skip
    if args.json:
        print(json.dumps(row))
    else:
        print(
            f"pytorch {preset}: {seconds * 1e3:.1f} ms/step, {tokens_per_step / seconds:.0f} tokens/s, "
            f"{achieved:.1f} GFLOP/s = {100 * achieved / peak:.1f}% of the {peak:.1f} GFLOP/s matmul peak "
            f"(initial loss {losses[0]:.4f}, ln(vocab) = {math.log(config.vocab_size):.4f})"
        )


if __name__ == "__main__":
    main()
