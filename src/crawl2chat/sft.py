"""Supervised fine-tuning: conversations rendered with the chat template, loss on the assistant's tokens
only, packed into rows of the context length → a chat model."""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from crawl2chat import conversations as conv
from crawl2chat import world as world_mod
from crawl2chat.chat_template import render
from crawl2chat.common import dist_info, iter_jsonl
from crawl2chat.config import Config
from crawl2chat.evals import chat_evals
from crawl2chat.shards import RowLoader
from crawl2chat.tokenizer import Tokenizer
from crawl2chat.train import evaluate_loss, load_model, pick_device, resolve_dtype, train, with_batch_tokens


def pack(rendered: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int):
    """Pack conversations into rows of seq_len + 1 tokens, best fit, longest first. Targets outside the
    assistant's tokens and on padding are -1. Returns x, y [rows, seq_len] and packing stats."""
    cap = seq_len + 1
    items = sorted(((ids[:cap], mask[:cap]) for ids, mask in rendered), key=lambda r: -len(r[0]))
    truncated = sum(len(ids) > cap for ids, _ in rendered)
    rows: list[list] = []     # each: [free, ids, mask]
    for ids, mask in items:
        best = None
        for r in rows:
            if r[0] >= len(ids) and (best is None or r[0] < best[0]):
                best = r
        if best is None:
            best = [cap, [], []]
            rows.append(best)
        best[1].extend(ids)
        best[2].extend(mask)
        best[0] -= len(ids)
    x = np.full((len(rows), seq_len), pad_id, dtype=np.int32)
    y = np.full((len(rows), seq_len), -1, dtype=np.int32)
    used = 0
    for i, (_, ids, mask) in enumerate(rows):
        ids, mask = np.asarray(ids), np.asarray(mask)
        n = len(ids)
        used += n
        x[i, :n - 1] = ids[:-1]
        y[i, :n - 1] = np.where(mask[1:] == 1, ids[1:], -1)
    stats = {"rows": len(rows), "conversations": len(rendered), "truncated": truncated,
             "padding_share": 1 - used / max(1, len(rows) * cap),
             "trained_tokens": int((y >= 0).sum())}
    return x, y, stats


def load_conversations(run_dir: Path, cfg: Config, world: dict | None) -> list[list[dict]]:
    data = cfg.chat_data
    convs = []
    if world is not None:
        people = conv.chat_people(world, data.probe_holdout)
        convs += conv.world_conversations(world, seed=data.seed, n_math=data.max_math,
                                           fact_phrasings=data.fact_phrasings, people=people)
        if data.open_ended:
            convs += conv.open_ended_conversations(world, seed=data.seed, n=data.open_ended, people=people)
    for path in data.extra:
        convs += conv.load_chat_jsonl(path)
    if data.oasst:
        convs += conv.load_oasst_trees(data.oasst)
    if data.corrections:
        from crawl2chat.corrections import load_corrections
        convs += load_corrections(data.corrections) * data.corrections_weight
    return convs


def run_sft(run_dir: Path, cfg: Config, resume: bool = False) -> dict:
    run_dir = Path(run_dir)
    tok = Tokenizer.load(run_dir / "tokenizer")
    world = None
    if (run_dir / "world" / "facts.json").exists():
        world = world_mod.load_world(run_dir / "world")
        world["problems"] = {"train": [row for _, row in iter_jsonl(run_dir / "world" / "problems_train.jsonl")]}
    convs = load_conversations(run_dir, cfg, world)
    random.Random(cfg.chat_data.seed).shuffle(convs)
    n_val = max(1, int(len(convs) * cfg.chat_data.val_fraction))
    val_convs, train_convs = convs[:n_val], convs[n_val:]

    model = load_model(run_dir / "base")
    model.doc_start = tok.bos_id  # rows pack several conversations: each sees only itself
    T = model.cfg.seq_len
    tc = with_batch_tokens(cfg.sft, cfg.sft.batch_size * T)
    pad = tok.special_id("<|pad|>")
    x, y, stats = pack([render(tok, c) for c in train_convs], T, pad)
    vx, vy, _ = pack([render(tok, c) for c in val_convs], T, pad)
    val = [(torch.from_numpy(vx[i:i + tc.batch_size]).long(), torch.from_numpy(vy[i:i + tc.batch_size]).long())
           for i in range(0, min(len(vx), tc.batch_size * tc.eval_batches), tc.batch_size)]
    loader = RowLoader(x, y, tc.batch_size, seed=tc.seed)
    eval_dtype = resolve_dtype(tc.dtype, pick_device())
    summary = train(model, tc, run_dir / "sft",
                    lambda step, micro, rank, world_size: loader.batch(step, micro, tc.grad_accum, rank, world_size),
                    tokens_per_micro=tc.batch_size * T,
                    eval_fn=lambda m: evaluate_loss(m, val, None, eval_dtype), resume=resume, desc="sft")
    summary.update({f"pack_{k}": v for k, v in stats.items()})
    summary["epochs"] = loader.epoch_of(tc.steps, tc.grad_accum, summary["world_size"])
    summary["val_conversations"] = len(val_convs)
    if world is None:
        return summary
    problems = [row for _, row in iter_jsonl(run_dir / "world" / "problems_test.jsonl")]
    if cfg.chat_data.oracle_rounds > 0 and cfg.chat_data.correction_steps > 0 and not cfg.chat_data.corrections:
        before = chat_evals(model.float().eval(), tok, world, problems) if dist_info()[0] == 0 else {}
        summary.update({"fact_qa_acc_before_corrections": before.get("fact_qa_acc"),
                        "arith_acc_before_corrections": before.get("arith_acc")})
        summary.update(oracle_round(model, tok, world, run_dir, cfg, train_convs))
    if dist_info()[0] == 0:
        summary.update(chat_evals(model.float().eval(), tok, world, problems))
    return summary


def oracle_round(model, tok, world: dict, run_dir: Path, cfg: Config, train_convs: list) -> dict:
    """One round of expert corrections with the world's ground truth as the expert: the model answers
    the fact questions about half-A people (sft/review.jsonl) and the wrong answers are corrected. Training
    goes on over the corrections (each corrections_weight times) and a replay of correction_replay SFT
    conversations per correction, one pass, at most correction_steps steps: a round with few wrong answers
    is a short round, not more epochs of the SFT mix. Every process computes the same greedy review, so
    the data agree under DDP."""
    from crawl2chat.corrections import review_rows, world_review
    from crawl2chat.common import write_jsonl
    from crawl2chat.evals import contains_answer
    from crawl2chat.train import save_model
    data = cfg.chat_data
    rows, stats = world_review(model.float().eval(), tok, world, oracle=True,
                               names=conv.chat_people(world, data.probe_holdout))
    if dist_info()[0] == 0:
        write_jsonl(run_dir / "sft" / "review.jsonl", rows)
    fixed = [r for r in rows if r["corrected"]]
    out = {"corrections_reviewed": stats["reviewed"], "corrections_wrong": stats["wrong"], "corrections_steps": 0}
    if not fixed:
        return out
    fixes = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["corrected"]}]
             for r in fixed]
    replay = random.Random(data.seed).sample(train_convs, min(len(train_convs), data.correction_replay * len(fixes)))
    T, pad = model.cfg.seq_len, tok.special_id("<|pad|>")
    x, y, _ = pack([render(tok, c) for c in fixes * data.corrections_weight + replay], T, pad)
    tc = with_batch_tokens(cfg.sft, cfg.sft.batch_size * T)
    steps = max(1, min(data.correction_steps, -(-len(x) // (tc.batch_size * tc.grad_accum * dist_info()[2]))))
    tc = replace(tc, steps=steps, lr=data.correction_lr, warmup_steps=0, eval_every=0, ckpt_every=steps)
    loader = RowLoader(x, y, tc.batch_size, seed=tc.seed + 1)
    train(model.train(), tc, run_dir / "sft" / "corrections",
          lambda step, micro, rank, world_size: loader.batch(step, micro, tc.grad_accum, rank, world_size),
          tokens_per_micro=tc.batch_size * T, desc="sft corrections")
    if dist_info()[0] == 0:
        save_model(model, run_dir / "sft")
    answers = review_rows(model.float().eval(), tok, [r["prompt"] for r in fixed])
    now_right = sum(contains_answer(a["model_answer"], r["answer"]) for a, r in zip(answers, fixed))
    return {**out, "corrections_steps": steps, "corrections_rows": len(x), "corrections_fixed": now_right / len(fixed)}
