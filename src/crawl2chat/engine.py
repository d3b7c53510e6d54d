"""Generation: batched sampling with a preallocated KV cache. Prompts of equal length share a batch,
so no padding enters attention and batched output equals one-by-one output."""
from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor
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
    # inverse-CDF sampling: one uniform per row (torch.multinomial draws one per vocabulary entry, ~40×
    # slower at a 2k vocabulary). right=True never lands on a zero-probability token
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return torch.where(ids < cdf.size(-1), ids, logits.argmax(-1))  # u rounded up onto the total: rare


def gate_abstention(model: GPT, logits: torch.Tensor, last_ids: torch.Tensor) -> torch.Tensor:
    """logits [B, V] of the next token after last_ids [B]. On rows whose last id opens a reply, the
    first tokens of an abstention stay possible only where the model gives them at least
    cfg.abstain_threshold together (idk.calibrate_abstention); elsewhere, or with the threshold 0, the
    logits pass unchanged."""
    cfg = model.cfg
    if cfg.abstain_threshold <= 0 or not cfg.abstain_ids:
        return logits
    at = last_ids.to(logits.device) == cfg.reply_open
    if not bool(at.any()):
        return logits
    ids = torch.tensor(list(cfg.abstain_ids), dtype=torch.long, device=logits.device)
    drop = at & (logits.float().softmax(-1)[:, ids].sum(-1) < cfg.abstain_threshold)
    out = logits.clone()
    sub = out[:, ids]
    sub[drop] = float("-inf")
    out[:, ids] = sub
    return out


@torch.no_grad()
def generate_batch(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None, stop_ids: Sequence[int] = (),
                   generator: torch.Generator | None = None,
                   on_token: Callable[[int, int], None] | None = None,
                   key_mask: torch.Tensor | None = None, compile: bool = False) -> list[list[int]]:
    """Continue prompts that all have the same length; returns the new ids of each (stop id included).
    key_mask [B, T0] (False on left padding) lets prompts of different lengths share the batch.
    compile=True decodes with torch.compile'd GPT.decode_step over a cache of the full context: the
    first call per batch size compiles (tens of seconds on a CPU), later calls run one fused graph per
    token. Worth it in a long-lived process (chat, serve) generating at small batch sizes."""
    device = next(model.parameters()).device
    T0 = len(prompts[0])
    assert all(len(p) == T0 for p in prompts), "generate_batch needs prompts of equal length"
    max_new_tokens = min(max_new_tokens, model.cfg.seq_len - T0)
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    B = len(prompts)
    L = model.cfg.seq_len if compile else T0 + max_new_tokens  # compiled: one cache shape for every call
    cache = KVCache(model.cfg, B, L, device, next(model.parameters()).dtype, fused=model.decode_weights())
    step = compiled_decode_step(model) if compile else None
    if key_mask is not None:
        cache.key_mask = torch.ones(B, L, dtype=torch.bool, device=device)
        cache.key_mask[:, :T0] = key_mask.to(device)
    x = torch.tensor(prompts, dtype=torch.long, device=device)
    logits = gate_abstention(model, model(x, cache=cache)[:, -1], x[:, -1])
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stops = set(stop_ids)
    rows = list(range(B))  # the prompt each cache row continues
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        for b, tok in zip(rows, nxt.tolist()):  # one host transfer per step, bookkeeping in Python
            if done[b]:
                continue
            out[b].append(tok)
            if on_token is not None:
                on_token(b, tok)
            done[b] = tok in stops
        live = [j for j, b in enumerate(rows) if not done[b]]
        if not live or i == max_new_tokens - 1:
            break
        if step is None and len(live) <= COMPACT_AT * len(rows):
            # finished rows leave the batch: decoding costs what the rows still generating need
            keep = torch.tensor(live, device=device)
            cache.keep_rows(keep)
            nxt, rows = nxt[keep], [rows[j] for j in live]
        if step is None:
            logits = model(nxt.view(len(rows), 1), cache=cache)[:, -1]
        else:
            logits = step(nxt.view(B, 1), torch.tensor([T0 + i], device=device), cache)
    return out


COMPACT_AT = 0.75  # drop finished rows once a quarter of the batch has finished (each drop copies the cache)


_COMPILED: "weakref.WeakKeyDictionary[GPT, Callable]" = weakref.WeakKeyDictionary()


def compiled_decode_step(model: GPT) -> Callable:
    """model.decode_step through torch.compile, built once per model object."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model.decode_step, dynamic=False)
    return _COMPILED[model]


def generate(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 64,
             ragged: bool = False, **kwargs) -> list[list[int]]:
    """Continue prompts of any lengths: grouped by length into batches of at most batch_size (no padding:
    batched output equals one-by-one output exactly). ragged=True left-pads prompts of different lengths
    into shared batches instead (masked; equal up to float rounding): far fewer decode steps when many
    short prompts differ in length, as in RL rollouts."""
    out: list[list[int] | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    if ragged:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            L = len(prompts[chunk[-1]])
            padded = [[0] * (L - len(prompts[i])) + list(prompts[i]) for i in chunk]
            mask = torch.tensor([[j >= L - len(prompts[i]) for j in range(L)] for i in chunk])
            for i, ids in zip(chunk, generate_batch(model, padded, max_new_tokens, key_mask=mask, **kwargs)):
                out[i] = ids
        model.train(was_training)
        return out
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    for idxs in by_len.values():
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s:s + batch_size]
            for i, ids in zip(chunk, generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, **kwargs)):
                out[i] = ids
    model.train(was_training)
    return out


# ---- tool calls mid-stream -----------------------------------------------------------------------

_CALLS = {"<|python_start|>": "python", "<|search_start|>": "search"}
_ENDS = {"python": "<|python_end|>", "search": "<|search_end|>"}


def tool_parts_from_ids(tok, ids: Sequence[int]) -> list[dict]:
    """An assistant reply's ids → its parts [{"type": text|python|search|output, "text": ...}] in the
    chat template's format. Parsing stops at <|assistant_end|> or <|bos|>; an unclosed call or output
    at the end is kept as it is; stray end delimiters and other special ids are dropped."""
    sid = tok.special_id
    starts = {sid(s): kind for s, kind in _CALLS.items()}
    starts[sid("<|output_start|>")] = "output"
    ends = {sid(e): kind for kind, e in _ENDS.items()}
    ends[sid("<|output_end|>")] = "output"
    stop = {sid("<|assistant_end|>"), tok.bos_id}
    parts: list[dict] = []
    kind, buf = "text", []

    def flush() -> None:
        if kind != "text" or buf:
            text = tok.decode(buf)
            if kind == "text" and parts and parts[-1]["type"] == "text":
                parts[-1]["text"] += text
            else:
                parts.append({"type": kind, "text": text})

    for t in ids:
        t = int(t)
        if t in stop:
            break
        if t in starts:
            flush()
            kind, buf = starts[t], []
        elif t in ends:
            if ends[t] == kind:
                flush()
                kind, buf = "text", []
        elif not tok.is_special(t):
            buf.append(t)
    flush()
    return parts


@torch.no_grad()
def generate_with_tools(model: GPT, tok, prompt_ids: Sequence[int], max_new_tokens: int,
                        tools: dict[str, Callable[[str], str]], *, temperature: float = 0.0,
                        top_k: int | None = None, top_p: float | None = None,
                        generator: torch.Generator | None = None,
                        on_token: Callable[[int, str], None] | None = None,
                        max_calls: int = 4, compile: bool = False) -> tuple[list[int], list[dict]]:
    """Generate one assistant reply, running tool calls as the model makes them.

    When the model closes a call (<|python_end|> or <|search_end|>), the call's text is passed to
    tools["python"] / tools["search"], and <|output_start|> result <|output_end|> is appended to the
    sequence (prefilled into the KV cache); generation goes on until <|assistant_end|> (or <|bos|>), the
    budget of max_new_tokens sampled tokens, or the context is full. Returns every new id (tool outputs
    included) and the reply's parts (tool_parts_from_ids). The reply finished normally iff the last id
    is <|assistant_end|>; otherwise it stopped for length.

    on_token(id, kind) sees every new id, tool outputs included; kind is the part it belongs to:
    "text", "python", "search" (delimiters included), "output" (injected, delimiters included), or
    "end" for the final <|assistant_end|> / <|bos|>. A tool missing from `tools` answers
    "tool not available"; after max_calls calls every call answers "tool call limit reached".
    compile=True decodes single tokens with the compiled step (generate_batch); tool outputs prefill eagerly.
    """
    sid = tok.special_id
    starts = {sid(s): kind for s, kind in _CALLS.items()}
    ends = {sid(e): kind for kind, e in _ENDS.items()}
    stops = {sid("<|assistant_end|>"), tok.bos_id}
    out_start, out_end = sid("<|output_start|>"), sid("<|output_end|>")
    device = next(model.parameters()).device
    limit = model.cfg.seq_len
    new: list[int] = []
    if not prompt_ids or len(prompt_ids) >= limit or max_new_tokens <= 0:
        return new, []
    emit = on_token or (lambda t, kind: None)
    was_training = model.training
    model.eval()
    cache = KVCache(model.cfg, 1, limit, device, next(model.parameters()).dtype, fused=model.decode_weights())
    x = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    logits = gate_abstention(model, model(x, cache=cache)[:, -1], x[:, -1])
    call_kind, call_start, n_calls = None, 0, 0
    for _ in range(max_new_tokens):
        t = int(sample_next(logits, temperature, top_k, top_p, generator)[0])
        new.append(t)
        if t in stops:
            emit(t, "end")
            break
        feed = [t]
        if t in starts:
            call_kind, call_start = starts[t], len(new)
            emit(t, call_kind)
        elif t in ends and ends[t] == call_kind:
            emit(t, call_kind)
            query = tok.decode(new[call_start:-1])
            n_calls += 1
            if n_calls > max_calls:
                result = "tool call limit reached"
            elif call_kind not in tools:
                result = "tool not available"
            else:
                try:
                    result = str(tools[call_kind](query))
                except Exception as e:  # a tool's failure is the model's observation, not a crash
                    result = f"tool error: {e}"
            call_kind = None
            room = limit - len(prompt_ids) - len(new) - 1  # keep one position for the next token
            if room < 2:
                break
            output = [out_start] + tok.encode(result)[:room - 2] + [out_end]
            for o in output:
                emit(o, "output")
            new.extend(output)
            feed += output
        else:
            emit(t, call_kind or "text")
        if cache.pos + len(feed) >= limit:
            break  # no position left for another token: finish "length"
        if compile and len(feed) == 1:
            logits = compiled_decode_step(model)(torch.tensor([feed], device=device),
                                                 torch.tensor([cache.pos], device=device), cache)
            cache.pos += 1
        else:
            logits = model(torch.tensor([feed], dtype=torch.long, device=device), cache=cache)[:, -1]
    model.train(was_training)
    return new, tool_parts_from_ids(tok, new)


@torch.no_grad()
def generate_with_tools_batch(model: GPT, tok, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                              tools: dict[str, Callable[[str], str]], *, max_calls: int = 4,
                              batch_size: int = 256, temperature: float = 0.0, top_k: int | None = None,
                              top_p: float | None = None, generator: torch.Generator | None = None
                              ) -> list[tuple[list[int], list[int]]]:
    """generate_with_tools for many prompts at once, as RL rollouts need. The prompts are left-padded
    into batches sharing one KV cache; every row decodes until it ends or closes a call (a row that
    closed a call waits, masked, while the others go on); then the calls run in a thread pool and their
    outputs are prefilled into the same cache, each row's left-padded (per-row rotary positions keep
    the masked columns out of every distance), and decoding goes on. Rows that finished leave the batch.
    max_new_tokens counts sampled tokens only. Returns per prompt (new ids, sampled) where sampled[j]
    is 1 for an id the model sampled and 0 for an injected tool output id (a loss must not train on those)."""
    sid = tok.special_id
    ends = {sid(e): kind for kind, e in _ENDS.items()}
    starts = {sid(s): kind for s, kind in _CALLS.items()}
    finals = {sid("<|assistant_end|>"), tok.bos_id}
    out_start, out_end = sid("<|output_start|>"), sid("<|output_end|>")
    limit = model.cfg.seq_len
    new: list[list[int]] = [[] for _ in prompts]
    sampled: list[list[int]] = [[] for _ in prompts]
    calls = [0] * len(prompts)

    def budget(i: int) -> int:
        return min(max_new_tokens - sum(sampled[i]), limit - len(prompts[i]) - len(new[i]))

    def open_call(i: int) -> int:
        """Where the call that new[i]'s last id closes starts; -1 when that id closes nothing (as in
        generate_with_tools, a stray end delimiter is then just a token)."""
        ids, j = new[i], len(new[i]) - 2
        while j >= 0 and ids[j] not in starts and ids[j] not in ends and ids[j] != out_end:
            j -= 1
        return j if j >= 0 and starts.get(ids[j]) == ends[ids[-1]] else -1

    def run_call(i: int) -> str:
        start, kind = open_call(i), ends[new[i][-1]]
        calls[i] += 1
        if calls[i] > max_calls:
            return "tool call limit reached"
        if kind not in tools:
            return "tool not available"
        try:
            return str(tools[kind](tok.decode(new[i][start + 1:-1])))
        except Exception as e:  # a tool's failure is the model's observation, not a crash
            return f"tool error: {e}"

    todo = sorted((i for i, p in enumerate(prompts) if p and len(p) < limit and max_new_tokens > 0),
                  key=lambda i: len(prompts[i]))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with ThreadPoolExecutor(4) as pool:
        for s in range(0, len(todo), batch_size):
            rows = todo[s:s + batch_size]  # the prompt each cache row continues
            chunk = [list(prompts[i]) for i in rows]  # what each row feeds next: its prompt, then outputs
            cache = KVCache(model.cfg, len(rows), len(chunk[-1]) + max_new_tokens, device,
                            next(model.parameters()).dtype, fused=model.decode_weights())
            cache.key_mask = torch.ones(len(rows), cache.max_len, dtype=torch.bool, device=device)
            cache.row_pos = torch.zeros(len(rows), dtype=torch.long, device=device)
            while rows:
                T = max(len(c) for c in chunk)
                cache.reserve(cache.pos + T + max_new_tokens)
                cache.key_mask[:, cache.pos:cache.pos + T] = torch.tensor(
                    [[j >= T - len(c) for j in range(T)] for c in chunk], device=device)
                x = torch.tensor([[0] * (T - len(c)) + c for c in chunk], dtype=torch.long, device=device)
                logits = gate_abstention(model, model(x, cache=cache)[:, -1], x[:, -1])
                waiting: set[int] = set()  # rows that closed a call
                done: set[int] = set()     # rows that finished
                while True:
                    nxt = sample_next(logits, temperature, top_k, top_p, generator)
                    for i, t in zip(rows, nxt.tolist()):
                        if i in waiting or i in done:
                            continue
                        new[i].append(t)
                        sampled[i].append(1)
                        if t in finals:
                            done.add(i)
                        elif t in ends and open_call(i) >= 0:
                            waiting.add(i)
                        elif budget(i) <= 0:
                            done.add(i)
                    live = [j for j, i in enumerate(rows) if i not in done]
                    if len(live) <= COMPACT_AT * len(rows):  # finished rows leave the batch
                        keep = torch.tensor(live, dtype=torch.long, device=device)
                        cache.keep_rows(keep)
                        nxt, rows = nxt[keep], [rows[j] for j in live]
                    if all(i in waiting or i in done for i in rows):
                        break
                    cache.reserve(cache.pos + 1)
                    cache.key_mask[:, cache.pos] = torch.tensor([i not in waiting and i not in done for i in rows], device=device)
                    logits = model(nxt.view(len(rows), 1), cache=cache)[:, -1]
                # the calls of this round; the rows whose output fits and have budget left go on
                chunk, going, calling = [], [], [i for i in rows if i in waiting]
                for i, result in zip(calling, pool.map(run_call, calling)):
                    room = limit - len(prompts[i]) - len(new[i]) - 1  # keep one position for the next token
                    if room < 2:
                        continue
                    output = [out_start] + tok.encode(result)[:room - 2] + [out_end]
                    new[i] += output
                    sampled[i] += [0] * len(output)
                    if budget(i) > 0:
                        going.append(i)
                        chunk.append([new[i][-len(output) - 1]] + output)  # the call's end id, then the output
                keep = torch.tensor([j for j, i in enumerate(rows) if i in going], dtype=torch.long, device=device)
                if len(going):
                    cache.keep_rows(keep)
                rows = going
    model.train(was_training)
    return list(zip(new, sampled))
