"""Generation speed: engine.generate_batch (KV cache) against a loop with no cache that re-runs the
whole forward for every new token, same model, prompt and token count, measured in the same run."""
from __future__ import annotations

import time

import torch

from crawl2chat.common import C2CError
from crawl2chat.engine import generate_batch

BASELINE_IS = "no KV cache, full forward per token"


@torch.no_grad()
def greedy_no_cache(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The baseline: argmax of a full forward over the whole sequence, once per new token."""
    device = next(model.parameters()).device
    x = torch.tensor(prompts, dtype=torch.long, device=device)
    T0 = x.size(1)
    for _ in range(new_tokens):
        nxt = model(x)[:, -1].argmax(dim=-1)
        x = torch.cat([x, nxt[:, None]], dim=1)
    return x[:, T0:].tolist()


def greedy_ours(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    return generate_batch(model, prompts, new_tokens, temperature=0.0, stop_ids=())


def _timed(fn, *args) -> tuple[float, list[list[int]]]:
    device = next(args[0].parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def bench_generate(model, tok, prompt_ids: list[int], new_tokens: int = 64) -> dict:
    """Greedy tokens/s at batch 1 and 32, ours (KV cache) beside the no-cache baseline. Generation never
    stops early (no stop ids) and new_tokens is capped so prompt + new tokens fit the context.
    `tok` is not needed for the timing (kept for a uniform signature; may be None)."""
    prompt_ids = list(prompt_ids)
    new_tokens = min(new_tokens, model.cfg.seq_len - len(prompt_ids))
    if not prompt_ids or new_tokens < 1:
        raise C2CError(f"bench generate: a prompt of {len(prompt_ids)} tokens leaves no room in the "
                       f"context ({model.cfg.seq_len})")
    was_training = model.training
    model.eval()
    result: dict = {"prompt_tokens": len(prompt_ids), "new_tokens": new_tokens,
                    "device": str(next(model.parameters()).device)}
    try:
        for B in (1, 32):
            prompts = [prompt_ids] * B
            greedy_ours(model, prompts, 2), greedy_no_cache(model, prompts, 2)  # warm-up
            t_ours, ours = _timed(greedy_ours, model, prompts, new_tokens)
            t_base, base = _timed(greedy_no_cache, model, prompts, new_tokens)
            assert all(len(o) == new_tokens for o in ours + base)
            o, b = B * new_tokens / t_ours, B * new_tokens / t_base
            result[f"batch{B}"] = {"ours": o, "baseline": b, "ratio": o / b, "unit": "tok/s",
                                   "baseline_is": BASELINE_IS}
            if B == 1:
                result["same_output"] = ours == base
    finally:
        model.train(was_training)
    return result


def bench_generate_random(depth: int = 4, width: int = 256, seq_len: int = 256, vocab_size: int = 2048,
                          prompt_len: int = 64, new_tokens: int = 64, device=None, seed: int = 0) -> dict:
    """bench_generate on a random GPT (head_dim 64) with a random prompt: needs no trained run."""
    from crawl2chat.model import GPT, GPTConfig
    torch.manual_seed(seed)
    cfg = GPTConfig.from_depth(depth, vocab_size, seq_len, aspect_ratio=width // depth, head_dim=64)
    model = GPT(cfg).to(device or "cpu")
    prompt = torch.randint(0, vocab_size, (prompt_len,)).tolist()
    r = bench_generate(model, None, prompt, new_tokens)
    r["model"] = f"random GPT depth {depth}, width {cfg.n_embd}, seq_len {seq_len}, vocab {vocab_size}"
    return r
