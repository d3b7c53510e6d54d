"""Pretraining: next-token prediction over windows of the token shards → the base model."""
from __future__ import annotations

from pathlib import Path

import torch

from crawl2chat import world as world_mod
from crawl2chat.common import dist_info
from crawl2chat.config import Config
from crawl2chat.evals import fact_recall
from crawl2chat.model import GPT, GPTConfig
from crawl2chat.shards import BatchLoader, TokenStream, shard_paths, val_batches
from crawl2chat.tokenizer import Tokenizer
from crawl2chat.train import evaluate_loss, pick_device, resolve_dtype, train, with_batch_tokens


def model_config(cfg: Config, vocab_size: int) -> GPTConfig:
    m = cfg.model
    return GPTConfig.from_depth(m.depth, vocab_size, m.seq_len, aspect_ratio=m.aspect_ratio, head_dim=m.head_dim)


def run_pretrain(run_dir: Path, cfg: Config, resume: bool = False) -> dict:
    run_dir = Path(run_dir)
    tok = Tokenizer.load(run_dir / "tokenizer")
    tokens_dir = run_dir / "tokens"
    train_stream = TokenStream(shard_paths(tokens_dir, "train"), tok.vocab_size)
    val_stream = TokenStream(shard_paths(tokens_dir, "val"), tok.vocab_size)
    T = cfg.model.seq_len
    tc = with_batch_tokens(cfg.pretrain, cfg.pretrain.batch_size * T)
    loader = BatchLoader(train_stream, T, tc.batch_size, seed=tc.seed)
    val = val_batches(val_stream, T, tc.batch_size, tc.eval_batches)
    token_bytes = torch.from_numpy(tok.token_bytes()).long()
    eval_dtype = resolve_dtype(tc.dtype, pick_device())

    torch.manual_seed(tc.seed)  # the initial weights follow from the seed, the same in every process
    model = GPT(model_config(cfg, tok.vocab_size))
    summary = train(
        model, tc, run_dir / "base",
        lambda step, micro, rank, world: loader.batch(step, micro, tc.grad_accum, rank, world),
        tokens_per_micro=tc.batch_size * T,
        eval_fn=lambda m: evaluate_loss(m, val, token_bytes, eval_dtype),
        resume=resume, desc="pretrain")
    summary["epochs"] = loader.epoch_of(tc.steps, tc.grad_accum, summary["world_size"])
    if dist_info()[0] == 0:
        summary.update(base_model_evals(model, tok, run_dir))
    return summary


def base_model_evals(model: GPT, tok: Tokenizer, run_dir: Path) -> dict:
    """fact_recall_seen / _unseen over every known person (and per half, A = has Q&A pages)."""
    world_dir = run_dir / "world"
    if not (world_dir / "facts.json").exists():
        return {}
    world = world_mod.load_world(world_dir)
    model = model.float().eval()
    known = world["splits"]["known_a"] + world["splits"]["known_b"]
    out = {}
    for heldout, key in ((False, "fact_recall_seen"), (True, "fact_recall_unseen")):
        res = fact_recall(model, tok, world, known, heldout=heldout, return_rows=True)
        out[key] = res["acc"]
        out[key + "_per_attribute"] = res["per_attribute"]
        for half in ("known_a", "known_b"):
            names = set(world["splits"][half])
            rows = [r for r in res["rows"] if r["name"] in names]
            out[f"{key}_{half[-1]}"] = sum(r["correct"] for r in rows) / max(1, len(rows))
        if heldout:
            out["fact_recall_unseen_examples"] = res["rows"][:6]
    return out
