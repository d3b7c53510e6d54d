"""GRPO on problems with known answers (DeepSeekMath; TRL's GRPOTrainer; DAPO's clip-higher and token-level
normalisation; Dr. GRPO's option to skip std scaling). Rollouts come from the engine, the optimisation from
the one training loop (train.train with a loss_fn)."""
from __future__ import annotations

import copy
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from crawl2chat.chat_template import render
from crawl2chat.common import C2CError, dist_info
from crawl2chat.config import Config, GRPOConfig
from crawl2chat.engine import fit_prompt, generate, generate_with_tools_batch, tool_parts_from_ids
from crawl2chat.problems import final_answer, load_problems, same_number
from crawl2chat.tokenizer import Tokenizer
from crawl2chat.train import load_model, train

_FORMAT = re.compile(r"The answer is -?[$€£]?[\d,]*\d(?:\.\d+)?\.?\s*$")


# ---------------------------------------------------------------- rewards and the GRPO objective

def reward(text: str, ended: bool, n_tokens: int, gold, g: GRPOConfig) -> tuple[float, bool]:
    """1 for a correct final answer; + format_reward for ending with 'The answer is N.' and the end
    token; + brevity_reward × (share of the token budget left) for correct answers only."""
    correct = same_number(final_answer(text), gold)
    r = 1.0 if correct else 0.0
    if ended and _FORMAT.search(text.strip()):
        r += g.format_reward
    if correct:
        r += g.brevity_reward * max(0.0, 1.0 - n_tokens / g.max_new_tokens)
    return r, correct


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-4,
                     neg_weight: float = 1.0) -> torch.Tensor:
    """rewards [n_groups, G] → advantages: reward minus its group's mean (over the group's std when
    scale_std), the negative ones × neg_weight. A group whose rewards are all equal gets zero advantages:
    it teaches nothing."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_std:
        std = rewards.std(dim=1, keepdim=True)
        adv = torch.where(std > 0, adv / (std + eps), torch.zeros_like(adv))
    return torch.where(adv < 0, adv * neg_weight, adv)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                    eps_low: float, eps_high: float, ref_logp: torch.Tensor | None = None,
                    beta: float = 0.0, ref_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped policy-ratio objective per completion token. logp/old_logp/ref_logp/mask: [B, T]; adv: [B].
    Returns the SUM of per-token losses over masked tokens (the caller divides by the batch's token
    count: DAPO's token-level normalisation) and statistics. ref_rows [B] (bool): the rows ref_logp
    holds (the KL statistic averages over those); None: all."""
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(1)
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:  # k3 estimator of KL(policy || reference), always ≥ 0
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        if beta:
            per_token = per_token + beta * kl
    m = mask.float()
    n = m.sum().clamp(min=1)
    was_clipped = ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
    m_kl = m if ref_rows is None else m * ref_rows.float()[:, None]
    stats = {"clip_frac": float((was_clipped.float() * m).sum() / n),
             "kl": float((kl.detach() * m_kl).sum() / m_kl.sum().clamp(min=1))}
    return (per_token * m).sum(), stats


# ---------------------------------------------------------------- rollouts

@dataclass
class Rollouts:
    seqs: list[list[int]]        # prompt + completion ids
    prompt_lens: list[int]
    advantages: torch.Tensor     # [N]
    old_logp: list[torch.Tensor] | None
    ref_logp: list[torch.Tensor | None] | None  # None for a rollout the reference did not score
    stats: dict
    sampled: list[list[int]] | None = None  # per completion id: 1 sampled, 0 a tool's output (never trained)


def completion_logp(model, seqs: list[list[int]], prompt_lens: list[int], pad_id: int,
                    device, sampled: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of each completion token under `model`: [B, T-1] (0 on prompt/padding and on
    tool outputs, where sampled is 0), and the mask."""
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T - 1), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T - 1), -1, dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
        target = torch.tensor(s[p:])
        if sampled is not None:
            target = torch.where(torch.tensor(sampled[i], dtype=torch.bool), target, -1)
        y[i, p - 1:len(s) - 1] = target
    x, y = x.to(device), y.to(device)
    nats = model(x, y, reduction="none").view(len(seqs), T - 1)
    mask = (y >= 0)
    return -nats * mask, mask


@torch.no_grad()
def per_token_logp(model, seqs, prompt_lens, pad_id: int, device, chunk: int = 32,
                   sampled: list[list[int]] | None = None) -> list[torch.Tensor]:
    """completion_logp for many sequences, in chunks, each row trimmed to its own length."""
    out = []
    for s in range(0, len(seqs), chunk):
        lp, _ = completion_logp(model, seqs[s:s + chunk], prompt_lens[s:s + chunk], pad_id, device,
                                sampled[s:s + chunk] if sampled is not None else None)
        out += [row[:len(seq) - 1].float().cpu() for row, seq in zip(lp, seqs[s:s + chunk])]
    return out


def prompt_ids(tok: Tokenizer, question: str, max_len: int, tools: bool = False) -> list[int]:
    from crawl2chat.chat_template import TOOLS_SYSTEM  # the system message the tools were taught with
    system = [{"role": "system", "content": TOOLS_SYSTEM}] if tools else []
    ids, _ = render(tok, system + [{"role": "user", "content": question}], add_generation_prompt=True)
    return fit_prompt(ids, max_len, tok.bos_id)


def sample_completions(model, tok: Tokenizer, questions: list[str], n: int, max_new_tokens: int,
                       temperature: float, seed: int) -> list[tuple[list[int], list[int], str, bool]]:
    """n sampled completions per question (greedy when temperature is 0): (prompt, completion ids, text, ended)."""
    return [s[:4] for s in sample_replies(model, tok, questions, n, max_new_tokens, temperature, seed)]


def sample_replies(model, tok: Tokenizer, questions: list[str], n: int, max_new_tokens: int,
                   temperature: float, seed: int, tools: bool = False) -> list[tuple]:
    """sample_completions, with a fifth field: with tools the python tool runs mid-generation, text is
    the reply's own text (tool calls and outputs left out) and sampled marks the ids the model sampled
    (1) against the tool's output (0); without tools sampled is None."""
    end = tok.special_id("<|assistant_end|>")
    budget = model.cfg.seq_len - max_new_tokens
    prompts = [prompt_ids(tok, q, budget, tools) for q in questions for _ in range(n)]
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    if not tools:
        outs = generate(model, prompts, max_new_tokens, temperature=temperature, stop_ids=[end, tok.bos_id],
                        generator=gen, ragged=True, batch_size=256)
        return [(p, o, tok.decode([t for t in o if t not in (end, tok.bos_id)]), bool(o) and o[-1] == end, None)
                for p, o in zip(prompts, outs)]
    from crawl2chat.tools import run_python
    outs = generate_with_tools_batch(model, tok, prompts, max_new_tokens, {"python": run_python},
                                     temperature=temperature, generator=gen)
    return [(p, o, "".join(x["text"] for x in tool_parts_from_ids(tok, o) if x["type"] == "text"),
             bool(o) and o[-1] == end, m) for p, (o, m) in zip(prompts, outs)]


def make_rollouts(policy, ref, tok: Tokenizer, problems: list[dict], g: GRPOConfig, seed: int, device) -> Rollouts:
    t0 = time.perf_counter()
    samples = sample_replies(policy, tok, [p["question"] for p in problems], g.group_size,
                             g.max_new_tokens, g.temperature, seed, g.tools)
    gen_s = time.perf_counter() - t0
    rewards, correct, lengths = [], [], []
    for i, (_, comp, text, ended, m) in enumerate(samples):
        r, ok = reward(text, ended, sum(m) if m is not None else len(comp), problems[i // g.group_size]["answer"], g)
        rewards.append(r)
        correct.append(ok)
        lengths.append(len(comp))
    R = torch.tensor(rewards).view(len(problems), g.group_size)
    adv = group_advantages(R, g.scale_std, neg_weight=g.neg_weight).view(-1)
    seqs = [p + c for p, c, _, _, _ in samples]
    plens = [len(p) for p, _, _, _, _ in samples]
    keep = [i for i, c in enumerate(samples) if c[1]]  # an empty completion has no token to train
    seqs, plens, adv = [seqs[i] for i in keep], [plens[i] for i in keep], adv[keep]
    sampled = [samples[i][4] for i in keep] if g.tools else None
    pad = tok.special_id("<|pad|>")
    old = per_token_logp(policy, seqs, plens, pad, device, sampled=sampled) if g.inner_steps > 1 else None
    # with beta 0 the KL is only logged: an estimate over every kl_stride-th rollout saves most of a pass
    scored = list(range(len(seqs))) if g.beta else list(range(0, len(seqs), max(1, g.kl_stride)))
    refs: list[torch.Tensor | None] = [None] * len(seqs)
    for i, lp in zip(scored, per_token_logp(ref, [seqs[i] for i in scored], [plens[i] for i in scored], pad,
                                            device, sampled=[sampled[i] for i in scored] if sampled else None)):
        refs[i] = lp
    equal = (R.max(dim=1).values == R.min(dim=1).values).float().mean()
    n_correct = sum(correct)
    stats = {"reward_mean": float(R.mean()), "reward_std": float(R.std()), "equal_groups": float(equal),
             "accuracy": n_correct / len(correct), "resp_len": sum(lengths) / len(lengths),
             "correct_len": sum(l for l, c in zip(lengths, correct) if c) / max(1, n_correct), "gen_s": gen_s}
    if g.tools:
        stats["tool_calls"] = sum(c.count(tok.special_id("<|python_start|>")) for c in (s[1] for s in samples)) / len(samples)
    return Rollouts(seqs, plens, adv, old, refs, stats, sampled)


# ---------------------------------------------------------------- evaluation

def shown(tok: Tokenizer, completion: list[int], text: str, sampled) -> str:
    """A reply as a person reads it: with its tool calls and outputs as [python: ...] [output: ...]."""
    if sampled is None:
        return text
    return " ".join(x["text"] if x["type"] == "text" else f"[{x['type']}: {x['text'].strip()}]"
                    for x in tool_parts_from_ids(tok, completion))


def pass_at(model, tok: Tokenizer, problems: list[dict], k: int, max_new_tokens: int, seed: int = 0,
            tools: bool = False) -> dict:
    """pass@1 (greedy) and pass@k (k samples at temperature 1, correct if any is), and the mean length
    (tokens) of correct greedy responses."""
    greedy = sample_replies(model, tok, [p["question"] for p in problems], 1, max_new_tokens, 0.0, seed, tools)
    ok1 = [same_number(final_answer(t), p["answer"]) for p, (_, _, t, _, _) in zip(problems, greedy)]
    length = [sum(m) if m is not None else len(c) for _, c, _, _, m in greedy]
    out = {"pass1": sum(ok1) / len(problems), "len": sum(n for n, o in zip(length, ok1) if o) / max(1, sum(ok1)),
           "n": len(problems)}
    if tools:
        python_start = tok.special_id("<|python_start|>")
        out["tool_use"] = sum(python_start in c for _, c, _, _, _ in greedy) / len(problems)
    if k > 1:
        sampled = sample_replies(model, tok, [p["question"] for p in problems], k, max_new_tokens, 1.0, seed, tools)
        hits = [any(same_number(final_answer(sampled[i * k + j][2]), p["answer"]) for j in range(k))
                for i, p in enumerate(problems)]
        out[f"pass{k}"] = sum(hits) / len(problems)
    out["examples"] = [{"question": p["question"], "answer": str(p["answer"]), "reply": shown(tok, c, t, m), "correct": o}
                       for p, (_, c, t, _, m), o in list(zip(problems, greedy, ok1))[:4]]
    return out


# ---------------------------------------------------------------- the stage

def init_model_dir(run_dir: Path, init: str) -> Path:
    if init:
        path = Path(init) if Path(init).is_absolute() or Path(init).exists() else run_dir / init
    else:
        path = next((run_dir / s for s in ("idk", "sft") if (run_dir / s / "model.safetensors").exists()), run_dir / "sft")
    if not (path / "model.safetensors").exists():
        raise C2CError(f"{path}: no model to start RL from (run `c2c sft` first, or set grpo.init)")
    return path


def problem_sets(run_dir: Path, g: GRPOConfig) -> tuple[list[dict], list[dict]]:
    train_files = g.problems or [run_dir / "world" / "problems_train.jsonl"]
    train_set = [p for f in train_files for p in load_problems(Path(f))]
    test_set = load_problems(Path(g.test_problems) if g.test_problems else run_dir / "world" / "problems_test.jsonl")
    return train_set, test_set[:g.eval_problems] if g.eval_problems else test_set


def run_rl(run_dir: Path, cfg: Config, resume: bool = False) -> dict:
    run_dir = Path(run_dir)
    g, tc = cfg.grpo, cfg.rl
    if tc.grad_accum < 1 or g.prompts_per_step % tc.grad_accum:
        raise C2CError(f"grpo.prompts_per_step ({g.prompts_per_step}) must be a multiple of rl.grad_accum ({tc.grad_accum})")
    tok = Tokenizer.load(run_dir / "tokenizer")
    start_dir = init_model_dir(run_dir, g.init)
    policy = load_model(start_dir)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    train_set, test_set = problem_sets(run_dir, g)
    pad = tok.special_id("<|pad|>")
    rank = dist_info()[0]
    before = pass_at(policy.eval(), tok, test_set, g.pass_k, g.max_new_tokens, g.seed, g.tools) if rank == 0 else {}
    policy.train()
    cache: dict = {}

    def batch_fn(step: int, micro: int, rank: int, world: int):
        r = step // g.inner_steps
        if cache.get("index") != r:
            rng = random.Random(g.seed * 1_000_003 + r)
            chosen = rng.sample(range(len(train_set)), min(len(train_set), g.prompts_per_step * world))
            mine = [train_set[i] for i in chosen[rank::world]]
            device = next(policy.parameters()).device
            ref.to(device)
            was = policy.training
            policy.eval()
            cache.update(index=r, rollouts=make_rollouts(policy, ref, tok, mine, g, g.seed + 7919 * r + rank, device))
            policy.train(was)
        ro: Rollouts = cache["rollouts"]
        n = len(ro.seqs)
        per = -(-n // tc.grad_accum)
        idx = list(range(micro * per, min(n, (micro + 1) * per)))
        n_tokens = sum(sum(m) for m in ro.sampled) if ro.sampled is not None else \
            sum(len(s) - p for s, p in zip(ro.seqs, ro.prompt_lens))
        return ro, idx, n_tokens, micro == 0 and step % g.inner_steps == 0

    def loss_fn(model, batch, device):
        ro, idx, n_tokens, first = batch
        if not idx:
            return sum(p.sum() * 0 for p in model.parameters()), {"tokens": 0}
        seqs, plens = [ro.seqs[i] for i in idx], [ro.prompt_lens[i] for i in idx]
        logp, mask = completion_logp(model, seqs, plens, pad, device,
                                     [ro.sampled[i] for i in idx] if ro.sampled is not None else None)
        T = logp.size(1)

        def stack(rows):  # a row missing (None) reads as the policy's own: zero KL
            return torch.stack([torch.nn.functional.pad(rows[i], (0, T - len(rows[i]))) if rows[i] is not None
                                else logp[j].detach().float().cpu() for j, i in enumerate(idx)]).to(device)
        old = stack(ro.old_logp) if ro.old_logp is not None else logp.detach()
        refl = stack(ro.ref_logp) if ro.ref_logp is not None else None
        has_ref = torch.tensor([ro.ref_logp[i] is not None for i in idx], device=device) if refl is not None else None
        loss_sum, stats = grpo_token_loss(logp, old, ro.advantages[idx].to(device), mask, g.epsilon,
                                          g.epsilon_high, refl, g.beta, has_ref)
        loss = loss_sum * tc.grad_accum / max(1, n_tokens)
        stats["tokens"] = int(mask.sum())
        stats.update(ro.stats)
        return loss, stats

    def eval_fn(model):
        res = pass_at(model.eval(), tok, test_set, 1, g.max_new_tokens, g.seed, g.tools)
        model.train()
        return {"pass1": res["pass1"]}

    summary = train(policy, tc, run_dir / "rl", batch_fn, tokens_per_micro=0, eval_fn=eval_fn, resume=resume,
                    desc="rl", loss_fn=loss_fn, bar_keys=("reward_mean", "accuracy", "pass1"))
    if rank != 0:
        return summary
    after = pass_at(policy.float().eval(), tok, test_set, g.pass_k, g.max_new_tokens, g.seed, g.tools)
    summary.update({"init": str(start_dir.relative_to(run_dir) if start_dir.is_relative_to(run_dir) else start_dir),
                    "pass1_before": before["pass1"], "pass1_after": after["pass1"],
                    f"pass{g.pass_k}_before": before.get(f"pass{g.pass_k}"),
                    f"pass{g.pass_k}_after": after.get(f"pass{g.pass_k}"),
                    "len_before": before["len"], "len_after": after["len"], "tools": g.tools,
                    **({"tool_use_before": before["tool_use"], "tool_use_after": after["tool_use"]} if g.tools else {}), "test_problems": len(test_set),
                    "train_problems": len(train_set), "examples_before": before["examples"],
                    "examples_after": after["examples"]})
    return summary
