"""`c2c bench gpu`: MFU of the GPU presets' pretraining step on synthetic tokens, beside a plain
nanoGPT-style GPT of the same shape (bf16 autocast, torch.compile, fused AdamW) measured in the same run.

Each variant runs in its own process (fresh dynamo state and allocator, and torchrun where the variant
asks for DDP; inductor's on-disk cache is shared, so a shape compiled before compiles fast); the driver measures the card's bf16 matmul rate, runs the variants in order
until its time budget is spent, and writes every result as soon as it has it.
MFU counts FLOPs as nanochat does (6 × matmul weights + the attention term) over the card's dense
bf16 peak (989 TFLOP/s for H100/H200 SXM); the card's measured bf16 matmul rate is recorded beside it."""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from crawl2chat.common import C2CError, atomic_write_json

# Variants are named <model>-<depth>[+modifier...]: model `ours` (the GPT and the `c2c pretrain` loop) or
# `plain` (nanoGPT's GPT and step); depth d12 or d20 (the gpu-d12 / gpu-d20 presets' shapes); modifiers
# hd<N> (head dim), b<N> (micro-batch), cudnn (cuDNN attention only), ddp1 (one rank under torchrun).
# The default list runs in this order, so a spent budget drops the least important.
DEFAULT_VARIANTS = ["ours-d12", "plain-d12", "ours-d20", "plain-d20", "ours-d12+hd64", "ours-d12+ddp1",
                    "ours-d20+cudnn", "ours-d12+b64", "ours-d20+b32"]


def parse_variant(name: str) -> dict:
    base, *mods = name.split("+")
    model, _, depth = base.partition("-")
    if model not in ("ours", "plain") or depth not in ("d12", "d20"):
        raise C2CError(f"variant {name!r}: the name starts with ours-d12, ours-d20, plain-d12 or plain-d20")
    spec = {"name": name, "model": model, "preset": f"gpu-{depth}"}
    for m in mods:
        if m.startswith("hd") and m[2:].isdigit():
            spec["head_dim"] = int(m[2:])
        elif m.startswith("b") and m[1:].isdigit():
            spec["batch"] = int(m[1:])
        elif m in ("cudnn", "ddp1"):
            spec[m] = True
        else:
            raise C2CError(f"variant {name!r}: unknown modifier {m!r} (hd<N>, b<N>, cudnn, ddp1)")
    if spec.get("ddp1") and model != "ours":
        raise C2CError(f"variant {name!r}: ddp1 is for the ours model (the plain step has no DDP)")
    return spec


# the shape every variant takes with --tiny: the same code paths, small enough for a CPU test
TINY = {"depth": 2, "width": 128, "head_dim": 64, "vocab": 512, "seq_len": 64, "batch": 2}


def shape_of(spec: dict, tiny: bool) -> dict:
    from crawl2chat.config import get_preset
    cfg = get_preset(spec["preset"])
    m = cfg.model
    shape = {"depth": m.depth, "width": m.depth * m.aspect_ratio, "head_dim": spec.get("head_dim", m.head_dim),
             "vocab": cfg.tokenizer.vocab_size, "seq_len": m.seq_len, "batch": spec.get("batch", cfg.pretrain.batch_size)}
    if tiny:
        shape.update(TINY)
    return shape


# ---------------------------------------------------------------- the plain baseline (nanoGPT's GPT)

class PlainBlock(nn.Module):
    def __init__(self, width: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.c_attn, self.attn_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.c_fc, self.mlp_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(self.ln_1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class PlainGPT(nn.Module):
    """nanoGPT's GPT-2: learned positions, LayerNorm and biases, GELU MLP of 4× width, tied embedding."""

    def __init__(self, vocab: int, depth: int, width: int, n_head: int, seq_len: int):
        super().__init__()
        self.depth, self.width, self.n_head, self.seq_len = depth, width, n_head, seq_len
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(PlainBlock(width, n_head) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def flops_per_token(self) -> float:
        """The same count as GPT.flops_per_token: every matmul weight once (the tied head as the head)."""
        matmul = sum(p.numel() for n, p in self.named_parameters() if p.ndim == 2 and n.startswith("blocks."))
        matmul += self.lm_head.weight.numel()
        return 6 * matmul + 12 * self.depth * self.width * self.seq_len


# ---------------------------------------------------------------- one variant, in this process

def synthetic_batches(shape: dict, n: int = 4) -> list:
    g = torch.Generator().manual_seed(0)
    size = (shape["batch"], shape["seq_len"])
    return [(torch.randint(0, shape["vocab"], size, generator=g), torch.randint(0, shape["vocab"], size, generator=g))
            for _ in range(n)]


def run_ours(spec: dict, shape: dict, steps: int, warmup: int, compile: bool) -> dict:
    """The real `c2c pretrain` loop (train.train) on synthetic tokens; step rates from its metrics.jsonl."""
    from crawl2chat.config import get_preset
    from crawl2chat.model import GPT, GPTConfig
    from crawl2chat.train import train
    tc = replace(get_preset(spec["preset"]).pretrain, steps=warmup + steps, batch_size=shape["batch"], grad_accum=1, batch_tokens=0,
                 compile=compile, eval_every=10**9, ckpt_every=10**9, warmup_steps=1)
    mcfg = GPTConfig.from_depth(shape["depth"], shape["vocab"], shape["seq_len"], aspect_ratio=shape["width"] // shape["depth"],
                                head_dim=shape["head_dim"])
    torch.manual_seed(0)
    model = GPT(mcfg)
    batches = synthetic_batches(shape)
    with tempfile.TemporaryDirectory() as d:
        summary = train(model, tc, Path(d), lambda step, micro, rank, world: batches[step % len(batches)],
                        tokens_per_micro=shape["batch"] * shape["seq_len"], desc=spec["name"], save=False)
        rows = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    step_s = [shape["batch"] * shape["seq_len"] / r["tok_per_s"] for r in rows]
    return {"step_s": step_s, "flops_per_token": model.flops_per_token(), "params": model.num_params(),
            "ddp": summary["ddp"], "final_loss": summary["final_loss"]}


def run_plain(shape: dict, steps: int, warmup: int, compile: bool) -> dict:
    """nanoGPT's training step: bf16 autocast, torch.compile, fused AdamW (decay on matrices), clipping at 1,
    the loss read back every step; batches copied through pinned memory as nanoGPT's loader does."""
    from crawl2chat.train import pick_device, resolve_dtype, autocast
    device = pick_device()
    torch.manual_seed(0)
    model = PlainGPT(shape["vocab"], shape["depth"], shape["width"], shape["width"] // shape["head_dim"],
                     shape["seq_len"]).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    fwd = torch.compile(model) if compile else model
    dtype = resolve_dtype("auto", device)
    batches = synthetic_batches(shape)
    step_s = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        x, y = batches[step % len(batches)]
        if device.type == "cuda":
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        with autocast(device, dtype):
            loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_f = loss.item()
        step_s.append(time.perf_counter() - t0)
    return {"step_s": step_s, "flops_per_token": model.flops_per_token(),
            "params": sum(p.numel() for p in model.parameters()), "ddp": False, "final_loss": loss_f}


def run_variant(name: str, steps: int, warmup: int, tiny: bool, compile: bool) -> dict:
    from crawl2chat.train import peak_flops, pick_device
    spec = parse_variant(name)
    shape = shape_of(spec, tiny)
    device = pick_device()
    if spec.get("cudnn") and device.type == "cuda":
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_math_sdp(False)  # an error rather than a silent fall back to the slow path
        torch.backends.cuda.enable_cudnn_sdp(True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    r = (run_ours(spec, shape, steps, warmup, compile) if spec["model"] == "ours"
         else run_plain(shape, steps, warmup, compile))
    timed = r.pop("step_s")
    step = statistics.median(timed[warmup:])
    tok_s = shape["batch"] * shape["seq_len"] / step
    peak = peak_flops(device)
    out = {**r, **shape, "name": name, "model": spec["model"], "compile": compile, "steps_timed": len(timed) - warmup,
           "step_ms": 1000 * step, "first_step_s": timed[0], "tok_per_s": tok_s, "tflops": r["flops_per_token"] * tok_s / 1e12,
           "mfu": r["flops_per_token"] * tok_s / peak if peak else None, "wall_s": time.perf_counter() - t0,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__}
    if device.type == "cuda":
        out["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    if not math.isfinite(out["final_loss"]):
        raise C2CError(f"{name}: the loss is {out['final_loss']}")
    return out


# ---------------------------------------------------------------- the driver

def matmul_rate(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """bf16 FLOP/s of an n×n×n matmul on random data, the mean of `repeats` after three warm-ups."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def run_gpu_benchmarks(names: list[str], out: Path, steps: int, warmup: int, budget_s: float, tiny: bool = False,
                       compile: bool = True, variant_timeout_s: float = 240) -> dict:
    from crawl2chat.train import GPU_BF16_PEAK, pick_device
    for n in names:
        parse_variant(n)
    device = pick_device()
    if device.type != "cuda" and not tiny:
        raise C2CError("bench gpu: no CUDA GPU here; --tiny runs the same code paths at a tiny shape on the CPU")
    results = json.loads(out.read_text()) if out.exists() else {}
    gpu: dict = {"variants": {}, "errors": {}, "steps": steps, "warmup": warmup, "torch": torch.__version__}
    if device.type == "cuda":
        gpu["card"] = torch.cuda.get_device_name(device)
        gpu["matmul_tflops_measured"] = matmul_rate(device) / 1e12
        gpu["peak_tflops_nominal"] = next((v for k, v in GPU_BF16_PEAK.items() if k in gpu["card"]), 0) / 1e12
        print(f"{gpu['card']}: bf16 matmul {gpu['matmul_tflops_measured']:.0f} TFLOP/s measured, "
              f"{gpu['peak_tflops_nominal']:.0f} nominal", flush=True)
    start = time.perf_counter()
    for name in names:
        left = budget_s - (time.perf_counter() - start)
        if left < 60:
            gpu["errors"][name] = "skipped: the time budget was spent"
            continue
        with tempfile.TemporaryDirectory() as d:
            res = Path(d) / "result.json"
            cmd = ["-m", "crawl2chat.bench_gpu", "--variant", name, "--steps", str(steps), "--warmup", str(warmup),
                   "--json", str(res)] + (["--tiny"] if tiny else []) + ([] if compile else ["--no-compile"])
            if parse_variant(name).get("ddp1"):
                cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] + cmd
            print(f"--- {name}", flush=True)
            try:
                proc = subprocess.run([sys.executable] + cmd, timeout=min(variant_timeout_s, left + 60),
                                      env=os.environ.copy())
                if proc.returncode == 0 and res.exists():
                    gpu["variants"][name] = r = json.loads(res.read_text())
                    mfu = f"{100 * r['mfu']:.1f}% MFU" if r["mfu"] is not None else "no MFU (not a known GPU)"
                    print(f"    {name}: {r['tok_per_s']:.0f} tok/s, {r['tflops']:.1f} TFLOP/s, {mfu}, "
                          f"first step {r['first_step_s']:.0f} s", flush=True)
                else:
                    gpu["errors"][name] = f"exit status {proc.returncode}"
            except subprocess.TimeoutExpired:
                gpu["errors"][name] = "timed out"
        summarise(gpu)
        results["gpu"] = gpu
        atomic_write_json(out, results)
    print(table(gpu), flush=True)
    return results


def summarise(gpu: dict) -> None:
    """bench.json's usual fields: ours (gpu-d12 MFU) beside the plain baseline's, as a ratio."""
    v = gpu["variants"]
    for depth in ("d12", "d20"):
        ours, plain = v.get(f"ours-{depth}"), v.get(f"plain-{depth}")
        if ours and plain and ours["mfu"] and plain["mfu"]:
            gpu[depth] = {"ours": ours["mfu"], "baseline": plain["mfu"], "ratio": ours["mfu"] / plain["mfu"],
                          "unit": "MFU", "baseline_is": "plain nanoGPT-style GPT, bf16 autocast + compile + fused AdamW"}
    if "d12" in gpu:
        gpu.update({k: gpu["d12"][k] for k in ("ours", "baseline", "ratio", "unit", "baseline_is")})


def table(gpu: dict) -> str:
    lines = ["| variant | layers × width, head dim | batch × context | tok/s | TFLOP/s | MFU | step ms | memory GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in gpu["variants"].items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "—"
        lines.append(f"| {name} | {r['depth']} × {r['width']}, {r['head_dim']} | {r['batch']} × {r['seq_len']} | "
                     f"{r['tok_per_s']:,.0f} | {r['tflops']:.1f} | {mfu} | {r['step_ms']:.1f} | "
                     f"{r.get('max_mem_gb', 0):.1f} |")
    for name, why in gpu["errors"].items():
        lines.append(f"| {name} | {why} | | | | | | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="one `c2c bench gpu` variant, in this process")
    p.add_argument("--variant", required=True, help="<model>-<depth>[+modifier...], as in DEFAULT_VARIANTS")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    a = p.parse_args(argv)
    r = run_variant(a.variant, a.steps, a.warmup, a.tiny, a.compile)
    if int(os.environ.get("RANK", 0)) == 0:
        atomic_write_json(a.json, r)


if __name__ == "__main__":
    main()
