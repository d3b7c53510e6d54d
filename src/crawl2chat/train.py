"""The one training loop every stage uses: AdamW (or Muon for hidden matrices), warmup + WSD/cosine,
gradient accumulation, clipping, bf16 autocast, DDP under torchrun, a progress bar, metrics.jsonl,
periodic evaluation, atomic checkpoints (also on Ctrl-C) and exact resume."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from crawl2chat.common import C2CError, atomic_write_bytes, atomic_write_json, dist_info
from crawl2chat.config import TrainConfig
from crawl2chat.model import GPT, GPTConfig

BatchFn = Callable[[int, int, int, int], object]  # (step, micro, rank, world) → (x, y) or a loss_fn batch
LossFn = Callable[[torch.nn.Module, object, torch.device], tuple]  # (model, batch, device) → (loss, stats)


# ---------------------------------------------------------------- device, precision, distributed

def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dist_info()[1])
    return torch.device("cpu")


# dense bf16 peak FLOP/s by GPU name, for MFU as nanochat reports it
GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                 "4090": 165e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)


@functools.cache
def cpu_bf16_is_faster() -> bool:
    """Time a model-shaped matmul in both dtypes: CPUs with AMX run bf16 several times faster,
    CPUs without it run bf16 several times slower."""
    def best(dtype):
        a, w = torch.randn(4096, 256, dtype=dtype), torch.randn(768, 256, dtype=dtype)
        F.linear(a, w)
        t = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            F.linear(a, w)
            t = min(t, time.perf_counter() - t0)
        return t
    return best(torch.float32) / best(torch.bfloat16) > 1.5


def resolve_dtype(name: str, device: torch.device) -> str:
    """auto: bf16 on GPUs, and on CPUs where a bf16 matmul measures clearly faster than fp32."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16"
        return "bf16" if cpu_bf16_is_faster() else "fp32"
    if name not in ("fp32", "bf16"):
        raise C2CError(f"dtype must be auto, fp32 or bf16, not {name!r}")
    return name


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when torchrun started us (also with one process, so that
    `torchrun --nproc_per_node=1` runs the same DDP path as eight)."""
    rank, _, world = dist_info()
    if (world > 1 or launched_by_torchrun()) and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_flush_denormal(True)  # tiny values late in training must not drop to slow denormal paths
    return rank, world


# ---------------------------------------------------------------- optimizer and schedule

# The surprisal input (GPT.surprisal_in) is added to a trained model at zero; at a fine-tuning learning
# rate it would stay a small fraction of the embeddings it is added to. Only the stage that adds it (or
# gives it a new job, as the reward model does) boosts it: at 100× in RL (1e-2 per step) it moved 13.5%
# in 40 steps while no other weight moved 2%.
SURPRISAL_IN_LR_MULT = 100.0


def build_optimizers(model: GPT, cfg: TrainConfig, device: torch.device,
                     surprisal_lr_mult: float = 1.0) -> list[torch.optim.Optimizer]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # not a frozen reference
    matrices = [p for n, p in named if p.ndim == 2 and n.startswith("blocks.")]
    boosted = [p for n, p in named if n.startswith("surprisal_in.")]
    others = [p for n, p in named if not (p.ndim == 2 and n.startswith("blocks.")) and not n.startswith("surprisal_in.")]
    fused = device.type == "cuda"
    extra = [{"params": boosted, "lr": cfg.lr * surprisal_lr_mult, "weight_decay": 0.0}] if boosted else []
    if cfg.optimizer == "muon":
        adam = torch.optim.AdamW([{"params": others}, *extra], lr=cfg.lr, betas=cfg.betas, weight_decay=0.0, fused=fused)
        muon = torch.optim.Muon(matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
        opts = [adam, muon]
    elif cfg.optimizer == "adamw":
        groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": others, "weight_decay": 0.0}, *extra]
        opts = [torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)]
    else:
        raise C2CError(f"optimizer must be adamw or muon, not {cfg.optimizer!r}")
    for opt in opts:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return opts


def with_batch_tokens(cfg: TrainConfig, tokens_per_micro: int) -> TrainConfig:
    """cfg with grad_accum set so that an optimizer step sees cfg.batch_tokens tokens over all processes
    (micro-batch tokens × grad_accum × processes); cfg unchanged when batch_tokens is 0."""
    if not cfg.batch_tokens:
        return cfg
    per_pass = tokens_per_micro * dist_info()[2]
    if cfg.batch_tokens % per_pass:
        raise C2CError(f"batch_tokens ({cfg.batch_tokens}) must be a multiple of batch_size × seq_len × processes "
                       f"({per_pass}); change batch_tokens or batch_size")
    return replace(cfg, grad_accum=cfg.batch_tokens // per_pass)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    decay_start = int(cfg.steps * (1 - cfg.decay_frac))
    if step < decay_start:
        return 1.0
    frac = (step - decay_start) / max(1, cfg.steps - decay_start)
    return 1.0 - (1 - cfg.min_lr_frac) * frac


# ---------------------------------------------------------------- checkpoints

def save_model(model: GPT, out_dir: Path) -> None:
    """model.safetensors + config.json, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".model.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, out_dir / "model.safetensors")
    atomic_write_json(out_dir / "config.json", model.cfg.to_dict())


def load_model(model_dir: Path, device="cpu") -> GPT:
    model_dir = Path(model_dir)
    weights = model_dir / "model.safetensors"
    if not weights.exists():
        raise C2CError(f"{weights}: no model here — train this stage first")
    from crawl2chat.common import read_json
    cfg = GPTConfig.from_dict(read_json(model_dir / "config.json", "model config"))
    model = GPT(cfg)
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:  # noqa: BLE001 - safetensors/torch raise several types
        raise C2CError(f"{weights}: cannot load ({str(e).splitlines()[0]})") from None
    return model.to(device)


def save_checkpoint(ckpt_root: Path, step: int, model: GPT, opts, extra: dict) -> Path:
    """Write checkpoints/step_N/ under a temporary name, rename it, then repoint `latest` atomically.
    A kill at any moment leaves the previous checkpoint and pointer untouched."""
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".step_{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save([o.state_dict() for o in opts], tmp / "optim.pt")
    state = {"step": step, "model_config": model.cfg.to_dict(), "torch_rng": torch.get_rng_state().tolist(), **extra}
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_bytes(ckpt_root / "latest", final.name.encode())
    for old in sorted(ckpt_root.glob("step_*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest"
    if not pointer.exists():
        return None
    path = ckpt_root / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_checkpoint(path: Path, model: GPT, opts) -> dict:
    state = json.loads((path / "state.json").read_text())
    if state["model_config"] != model.cfg.to_dict():
        theirs, ours = GPTConfig.from_dict(state["model_config"]), model.cfg
        diff = ", ".join(f"{k} {getattr(theirs, k)} vs {getattr(ours, k)}"
                         for k in ours.__dataclass_fields__ if getattr(theirs, k) != getattr(ours, k))
        raise C2CError(f"{path}: checkpoint is for another model shape ({diff}); "
                       "drop --resume or use the same settings")
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    for opt, sd in zip(opts, torch.load(path / "optim.pt", weights_only=False)):
        opt.load_state_dict(sd)
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return state


# ---------------------------------------------------------------- the loop

def _truncate_metrics(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a crash
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


def train(model: GPT, cfg: TrainConfig, out_dir: Path, batch_fn: BatchFn, *, tokens_per_micro: int,
          eval_fn: Callable[[GPT], dict] | None = None, resume: bool = False, desc: str = "train",
          loss_fn: LossFn | None = None, bar_keys: tuple = (), save: bool = True,
          surprisal_lr_mult: float = 1.0) -> dict:
    """Train `model` for cfg.steps optimizer steps; returns the run's summary metrics.
    batch_fn(step, micro, rank, world) gives a micro-batch: (x, y) for next-token loss, or anything
    `loss_fn(model, batch, device) -> (loss, stats)` understands (RL); stats go into metrics.jsonl.
    Writes out_dir/metrics.jsonl, out_dir/checkpoints/, and finally out_dir/model.safetensors + config.json
    (with save=False, only metrics.jsonl: benchmarks). surprisal_lr_mult: the surprisal input's learning
    rate over cfg.lr (SURPRISAL_IN_LR_MULT in the stage that adds the input)."""
    out_dir = Path(out_dir)
    device = pick_device()
    rank, world = init_distributed(device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = model.to(device)
    opts = build_optimizers(model, cfg, device, surprisal_lr_mult)
    ckpt_root = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    torch.manual_seed(cfg.seed + rank)  # a resumed run restores the saved state below
    start = 0
    if resume:
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            raise C2CError(f"{ckpt_root}: no checkpoint to resume from")
        start = load_checkpoint(ckpt, model, opts)["step"]
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if start == 0:
            shutil.rmtree(ckpt_root, ignore_errors=True)
            metrics_path.unlink(missing_ok=True)
        else:
            _truncate_metrics(metrics_path, start)

    raw = model
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn = torch.compile(model) if cfg.compile else model

    stop = {"flag": False}
    old_handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))
    tokens_per_step = tokens_per_micro * cfg.grad_accum * world
    flops_per_token = raw.flops_per_token()
    peak = peak_flops(device)
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=rank != 0, dynamic_ncols=True)
    log = open(metrics_path, "a") if rank == 0 else None
    summary: dict = {}
    t_train, n_tok, last_eval = 0.0, 0, {}
    wall0 = time.time()
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            mult = lr_multiplier(step, cfg)
            for opt in opts:
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * mult
            loss_sum = torch.zeros((), device=device)
            step_stats: dict = {}
            micro_tokens = 0 if loss_fn is not None else tokens_per_step
            for micro in range(cfg.grad_accum):
                batch = batch_fn(step, micro, rank, world)
                sync = contextlib.nullcontext() if (world == 1 or micro == cfg.grad_accum - 1) else model.no_sync()
                with sync, autocast(device, dtype):
                    if loss_fn is None:
                        if device.type == "cuda":  # page-locked host memory lets the copy overlap compute
                            batch = (t.pin_memory() for t in batch)
                        x, y = (t.to(device, non_blocking=True) for t in batch)
                        loss = step_fn(x, y)
                    else:
                        loss, stats = loss_fn(step_fn, batch, device)
                        micro_tokens += stats.pop("tokens", tokens_per_micro) * world
                        for k, v in stats.items():
                            step_stats[k] = step_stats.get(k, 0.0) + v / cfg.grad_accum
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else torch.zeros(())
            for opt in opts:
                opt.step()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss_val = loss_sum / cfg.grad_accum
            if world > 1:
                dist.all_reduce(loss_val, op=dist.ReduceOp.AVG)
            loss_f = loss_val.item()
            dt = time.perf_counter() - t0
            t_train += dt
            n_tok += micro_tokens
            done = step + 1
            if not math.isfinite(loss_f):
                raise C2CError(f"{desc}: loss became {loss_f} at step {done}; lower the learning rate")
            row = {"step": done, "loss": loss_f, "lr": opts[0].param_groups[0]["lr"],
                   "grad_norm": float(grad_norm), "tok_per_s": micro_tokens / dt,
                   "gflops": flops_per_token * micro_tokens / dt / 1e9, **step_stats}
            if peak:
                row["mfu"] = flops_per_token * micro_tokens / dt / (peak * world)
            if eval_fn is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                if rank == 0:
                    last_eval = eval_fn(raw)
                    row.update(last_eval)
                if world > 1:
                    dist.barrier()
            if rank == 0:
                log.write(json.dumps(row) + "\n")
                log.flush()
                post = {"loss": f"{loss_f:.4f}", "tok/s": f"{row['tok_per_s']:.0f}"}
                if "mfu" in row:
                    post["mfu"] = f"{100 * row['mfu']:.1f}%"
                for key in ("val_bpb", *bar_keys):
                    if key in row or key in last_eval:
                        post[key] = f"{row.get(key, last_eval.get(key)):.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            summary = {"final_loss": loss_f}
            if save and (done % cfg.ckpt_every == 0 or done == cfg.steps or stop["flag"]):
                if rank == 0:
                    save_checkpoint(ckpt_root, done, raw, opts, {"train_config": asdict(cfg)})
                if world > 1:
                    dist.barrier()
            if stop["flag"]:
                raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, old_handler)
        bar.close()
        if log:
            log.close()
    if rank == 0 and save:
        save_model(raw, out_dir)
    summary.update(last_eval)
    summary.update({"steps": cfg.steps, "resumed_from": start, "tokens": n_tok, "train_s": t_train,
                    "wall_s": time.time() - wall0, "tok_per_s": n_tok / max(t_train, 1e-9),
                    "gflops": flops_per_token * n_tok / max(t_train, 1e-9) / 1e9, "dtype": dtype,
                    "mfu": flops_per_token * n_tok / max(t_train, 1e-9) / (peak * world) if peak else None,
                    "world_size": world, "ddp": dist.is_initialized(), "params": raw.num_params(), "params_non_embedding": raw.num_params(True),
                    "device": device.type})
    return summary


@torch.no_grad()
def evaluate_loss(model: GPT, batches, token_bytes: torch.Tensor | None, dtype: str = "fp32") -> dict:
    """Mean val loss (nats per target token; targets of -1 are ignored) and bits per byte
    (special tokens excluded from both sums)."""
    model.eval()
    device = next(model.parameters()).device
    total_nats, total_bytes, total_tok, loss_sum = 0.0, 0, 0, 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            nats = model(x, y, reduction="none").float().view(-1)
        valid = y.view(-1) >= 0
        loss_sum += nats[valid].sum().item()
        total_tok += int(valid.sum().item())
        if token_bytes is not None:
            nb = token_bytes.to(device)[y.view(-1).clamp(min=0)] * valid
            total_nats += (nats * (nb > 0)).sum().item()
            total_bytes += int(nb.sum().item())
    model.train()
    out = {"val_loss": loss_sum / max(total_tok, 1)}
    if token_bytes is not None:
        out["val_bpb"] = total_nats / math.log(2) / max(total_bytes, 1)
    return out
