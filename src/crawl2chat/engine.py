"""Generation: batched sampling with a preallocated KV cache. Prompts of equal length share a batch,
so no padding enters attention and batched output equals one-by-one output."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import torch

from crawl2chat.model import GPT, KVCache


def fit_prompt(ids: list[int], max_len: int, bos_id: int) -> list[int]:
    """Keep <|bos|> and the last tokens of a prompt longer than max_len."""
    return ids if len(ids) <= max_len else [bos_id] + ids[-(max_len - 1):]


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] → next ids [B]. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop[:, 0] = False  # the most likely token always stays (top_p <= 0 is greedy)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_batch(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None, stop_ids: Sequence[int] = (),
                   generator: torch.Generator | None = None,
                   on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Continue prompts that all have the same length; returns the new ids of each (stop id included)."""
    device = next(model.parameters()).device
    T0 = len(prompts[0])
    assert all(len(p) == T0 for p in prompts), "generate_batch needs prompts of equal length"
    max_new_tokens = min(max_new_tokens, model.cfg.seq_len - T0)
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    B = len(prompts)
    cache = KVCache(model.cfg, B, T0 + max_new_tokens, device, next(model.parameters()).dtype)
    logits = model(torch.tensor(prompts, dtype=torch.long, device=device), cache=cache)[:, -1]
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stops = torch.tensor(list(stop_ids) or [-1], device=device)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        for b in (~done).nonzero().flatten().tolist():
            tok = int(nxt[b])
            out[b].append(tok)
            if on_token is not None:
                on_token(b, tok)
        done |= torch.isin(nxt, stops)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = model(nxt.view(B, 1), cache=cache)[:, -1]
    return out


def generate(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 64,
             **kwargs) -> list[list[int]]:
    """Continue prompts of any lengths: grouped by length into batches of at most batch_size."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    out: list[list[int] | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    for idxs in by_len.values():
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s:s + batch_size]
            for i, ids in zip(chunk, generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, **kwargs)):
                out[i] = ids
    model.train(was_training)
    return out
