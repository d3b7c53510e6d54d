"""RLHF: GRPO (crawl2chat.rl) on open-ended prompts with the reward model's score as the reward and a KL
penalty to the starting policy, stopped before the policy games the reward model.

The guard: every eval_every steps, replies to a fixed set of held-out prompts are scored by the reward
model (proxy), by the hidden rubric (gold), and the policy's KL to the start is measured. Training stops
when, for `patience` evaluations in a row, gold stays below its peak (by more than the evaluations' own
noise: `noise_z` standard errors of the per-prompt difference) while the proxy is above its value
at that peak or is still rising as gold falls (Goodhart: the proxy keeps rising as the true score
falls), or when the KL exceeds its budget. The weights with the best gold score are the stage's model; replies with a high proxy and a
low gold score go to adversarial.jsonl."""
from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from crawl2chat import rubric
from crawl2chat import world as world_mod
from crawl2chat.common import C2CError, atomic_write_json, dist_info, read_json, write_jsonl
from crawl2chat.config import Config, RLHFConfig, TrainConfig
from crawl2chat.rl import Rollouts, completion_logp, group_advantages, grpo_token_loss, per_token_logp, sample_completions
from crawl2chat.rm import RMConfig, finished, init_dir, load_reward_model, score_seqs, world_prompt_sets
from crawl2chat.tokenizer import Tokenizer
from crawl2chat.train import load_model, save_model, train


class GuardStop(Exception):
    """Raised between steps to end training when the guard fires."""


def rm_rewards(rm, tok: Tokenizer, seqs: list[list[int]]) -> torch.Tensor:
    """The reward model's scores of prompt + reply sequences, each read as a finished turn."""
    return score_seqs(rm, finished(seqs, tok.special_id("<|assistant_end|>")), tok.special_id("<|pad|>"))


@torch.no_grad()
def evaluate(policy, ref, rm, tok: Tokenizer, prompts: list[dict], n: int, max_new_tokens: int, seed: int) -> dict:
    """n sampled replies per prompt → mean proxy (RM), mean gold (rubric), mean KL(policy || ref) per reply
    (sum over its tokens of log π - log π_ref: unbiased on the policy's own samples), and the samples."""
    pad = tok.special_id("<|pad|>")
    samples = sample_completions(policy, tok, [p["prompt"] for p in prompts], n, max_new_tokens, 1.0, seed)
    seqs, plens = [p + c for p, c, _, _ in samples], [len(p) for p, _, _, _ in samples]
    device = next(policy.parameters()).device
    proxy = rm_rewards(rm, tok, seqs)
    gold = torch.tensor([rubric.score(prompts[i // n]["meta"], t, e) for i, (_, _, t, e) in enumerate(samples)])
    lp = per_token_logp(policy, seqs, plens, pad, device)
    lr = per_token_logp(ref, seqs, plens, pad, device)
    kl = torch.tensor([float((a - b).sum()) for a, b in zip(lp, lr)])
    rows = [{"prompt": prompts[i // n]["prompt"], "response": t, "ended": e, "proxy": float(proxy[i]),
             "gold": float(gold[i]), "prompt_index": i // n} for i, (_, _, t, e) in enumerate(samples)]
    return {"proxy": float(proxy.mean()), "gold": float(gold.mean()), "kl": float(kl.mean()),
            "resp_words": sum(len(r["response"].split()) for r in rows) / len(rows), "rows": rows}


def paired_bootstrap(before: list[float], after: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of after - before over paired items and its 95% percentile-bootstrap interval."""
    d = torch.tensor(after) - torch.tensor(before)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(d), (n, len(d)), generator=g)
    means = d[idx].mean(dim=1)
    return float(d.mean()), float(means.quantile(0.025)), float(means.quantile(0.975))


def per_prompt(rows: list[dict]) -> list[float]:
    by: dict[int, list[float]] = {}
    for r in rows:
        by.setdefault(r["prompt_index"], []).append(r["gold"])
    return [sum(v) / len(v) for _, v in sorted(by.items())]


def paired_se(a: list[float] | None, b: list[float] | None) -> float:
    """Standard error of mean(b - a) over paired per-prompt scores; 0 without them."""
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return 0.0
    d = torch.tensor(b) - torch.tensor(a)
    return float(d.std() / math.sqrt(len(d)))


def guard_decision(curve: list[dict], rc: RLHFConfig) -> str | None:
    """'reward_hacking' when each of the last `patience` evaluations has gold below the gold peak by more
    than margin and than noise_z standard errors of the paired difference (over the held-out prompts, from
    each entry's `gold_prompts` where given: 24 prompts move gold by ±0.02 between evaluations of one
    policy), and the proxy either above its value at that peak or up on the evaluation before while gold
    went down (a proxy that peaked with gold and then climbs again as gold sinks); 'kl_budget' when
    the KL is over budget."""
    if curve[-1]["kl"] > rc.kl_budget:
        return "kl_budget"
    peak = max(range(len(curve)), key=lambda i: curve[i]["gold"])
    top = curve[peak]

    def diverging(i: int) -> bool:
        c, prev = curve[i], curve[i - 1]
        noise = rc.noise_z * paired_se(top.get("gold_prompts"), c.get("gold_prompts"))
        return c["gold"] < top["gold"] - max(rc.margin, noise) and (
            c["proxy"] > top["proxy"] or (c["proxy"] > prev["proxy"] and c["gold"] < prev["gold"]))

    recent = range(peak + 1, len(curve))[-rc.patience:]
    if len(recent) >= rc.patience and all(diverging(i) for i in recent):
        return "reward_hacking"
    return None


def adversarial(evals: list[tuple[int, list[dict]]], k: int) -> list[dict]:
    """Replies whose proxy is above the start's mean and gold below it, most divergent first (z-scores
    against the first evaluation's replies); a reply the policy gave again at a later evaluation is
    listed once, at its first step."""
    base = evals[0][1]
    def stats(key):
        v = torch.tensor([r[key] for r in base])
        return float(v.mean()), float(v.std()) or 1.0
    (pm, ps), (gm, gs) = stats("proxy"), stats("gold")
    cands = [dict(r, step=step, gap=(r["proxy"] - pm) / ps - (r["gold"] - gm) / gs)
             for step, rows in evals for r in rows if r["proxy"] > pm and r["gold"] < gm]
    seen: set = set()
    cands = [r for r in cands if (r["prompt"], r["response"]) not in seen and not seen.add((r["prompt"], r["response"]))]
    cands.sort(key=lambda r: -r["gap"])
    return [{k2: v for k2, v in r.items() if k2 != "prompt_index"} for r in cands[:k]]


def run_rlhf(run_dir: Path, cfg: Config, rlhf_cfg: RLHFConfig, train_cfg: TrainConfig, resume: bool = False,
             out_name: str = "rlhf") -> dict:
    """The stage into <run>/<out_name>/ (c2c rlhf --no-guard writes rlhf_noguard/, beside the guarded run)."""
    run_dir = Path(run_dir)
    rc, tc = rlhf_cfg, train_cfg
    out = run_dir / out_name
    if tc.grad_accum < 1 or rc.prompts_per_step % tc.grad_accum:
        raise C2CError(f"rlhf.prompts_per_step ({rc.prompts_per_step}) must be a multiple of grad_accum ({tc.grad_accum})")
    tok = Tokenizer.load(run_dir / "tokenizer")
    pad = tok.special_id("<|pad|>")
    rm_dir = Path(rc.rm) if Path(rc.rm).is_absolute() else run_dir / rc.rm
    rm = load_reward_model(rm_dir).eval().requires_grad_(False)
    rm_meta = read_json(rm_dir / "metrics.json", "reward model metrics") if (rm_dir / "metrics.json").exists() else {}
    rm_cfg = RMConfig(**read_json(rm_dir / "rm_config.json")) if (rm_dir / "rm_config.json").exists() else RMConfig()
    start_dir = init_dir(run_dir, rc.init)
    policy = load_model(start_dir)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    world = world_mod.load_world(run_dir / "world")
    train_prompts, held = world_prompt_sets(world, rm_cfg)  # the RM's split: held-out entities stay unseen
    eval_set = held[:rc.eval_prompts]
    if not train_prompts or not eval_set:
        raise C2CError(f"{run_dir}/world: too few open-ended prompts for RLHF")

    curve: list[dict] = []
    evals: list[tuple[int, list[dict]]] = []
    state = {"best_gold": -1.0, "best_step": 0, "best": None, "stop": None, "stopped_step": tc.steps}

    def watch(model, step: int) -> dict:
        ev = evaluate(model.float().eval(), ref, rm, tok, eval_set, rc.eval_samples, rc.max_new_tokens,
                      rc.seed + 17)  # the same seed every time: differences come from the policy
        model.train()
        curve.append({"step": step, "proxy": ev["proxy"], "gold": ev["gold"], "kl": ev["kl"],
                      "resp_words": ev["resp_words"], "gold_prompts": per_prompt(ev["rows"])})
        evals.append((step, ev["rows"]))
        if ev["gold"] > state["best_gold"]:
            state.update(best_gold=ev["gold"], best_step=step,
                         best={k: v.detach().clone().cpu() for k, v in model.state_dict().items()})
        if rc.guard and state["stop"] is None and step > 0:
            reason = guard_decision(curve, rc)
            if reason:
                state.update(stop=reason, stopped_step=step)
        return {k: v for k, v in curve[-1].items() if k not in ("step", "gold_prompts")}

    if dist_info()[0] == 0:
        watch(policy, 0)
    cache: dict = {}

    def batch_fn(step: int, micro: int, rank: int, world_size: int):
        if state["stop"]:
            raise GuardStop(state["stop"])
        state["done"] = step + 1  # train() evaluates after this step, as step + 1
        if cache.get("index") != step:
            rng = random.Random(rc.seed * 1_000_003 + step)
            chosen = rng.sample(range(len(train_prompts)), min(len(train_prompts), rc.prompts_per_step * world_size))
            mine = [train_prompts[i] for i in chosen[rank::world_size]]
            device = next(policy.parameters()).device
            ref.to(device), rm.to(device)
            policy.eval()
            samples = sample_completions(policy, tok, [p["prompt"] for p in mine], rc.group_size, rc.max_new_tokens,
                                         rc.temperature, rc.seed + 7919 * step + rank)
            policy.train()
            seqs, plens = [p + c for p, c, _, _ in samples], [len(p) for p, _, _, _ in samples]
            R = rm_rewards(rm, tok, seqs).view(len(mine), rc.group_size)
            gold = [rubric.score(mine[i // rc.group_size]["meta"], t, e) for i, (_, _, t, e) in enumerate(samples)]
            adv = group_advantages(R, rc.scale_std).view(-1)
            keep = [i for i, s in enumerate(samples) if s[1]]
            seqs, plens, adv = [seqs[i] for i in keep], [plens[i] for i in keep], adv[keep]
            refs = per_token_logp(ref, seqs, plens, pad, device)
            stats = {"reward_mean": float(R.mean()), "gold_mean": sum(gold) / len(gold),
                     "resp_len": sum(len(s[1]) for s in samples) / len(samples)}
            cache.update(index=step, ro=Rollouts(seqs, plens, adv, None, refs, stats))
        ro: Rollouts = cache["ro"]
        per = -(-len(ro.seqs) // tc.grad_accum)
        idx = list(range(micro * per, min(len(ro.seqs), (micro + 1) * per)))
        return ro, idx, sum(len(s) - p for s, p in zip(ro.seqs, ro.prompt_lens))

    def loss_fn(model, batch, device):
        ro, idx, n_tokens = batch
        if not idx:
            return sum(p.sum() * 0 for p in model.parameters()), {"tokens": 0}
        logp, mask = completion_logp(model, [ro.seqs[i] for i in idx], [ro.prompt_lens[i] for i in idx], pad, device)
        T = logp.size(1)
        refl = torch.stack([torch.nn.functional.pad(ro.ref_logp[i], (0, T - len(ro.ref_logp[i]))) for i in idx]).to(device)
        loss_sum, stats = grpo_token_loss(logp, logp.detach(), ro.advantages[idx].to(device), mask, rc.epsilon,
                                          rc.epsilon_high, refl, rc.beta)
        stats["kl_token"] = stats.pop("kl")  # per token, in the loss; the guard's "kl" is per reply
        stats.update(ro.stats, tokens=int(mask.sum()))
        return loss_sum * tc.grad_accum / max(1, n_tokens), stats

    summary: dict = {}
    try:
        summary = train(policy, tc, out, batch_fn, tokens_per_micro=0, eval_fn=lambda m: watch(m, state["done"]),
                        resume=resume, desc="rlhf", loss_fn=loss_fn, bar_keys=("reward_mean", "proxy", "gold", "kl"))
    except GuardStop:
        pass
    if dist_info()[0] != 0:
        return summary
    if rc.guard and state["best"] is not None:
        policy.load_state_dict(state["best"])
    save_model(policy, out)
    _prepend_row(out / "metrics.jsonl", {k: v for k, v in curve[0].items() if k != "gold_prompts"})

    seed = rc.seed + 99991  # fresh samples, so the gold peak's selection does not inflate gold_after
    final_set = held[:rc.final_prompts or None]
    before = evaluate(ref, ref, rm, tok, final_set, rc.final_samples, rc.max_new_tokens, seed)
    after = evaluate(policy.float().eval(), ref, rm, tok, final_set, rc.final_samples, rc.max_new_tokens, seed)
    diff, lo, hi = paired_bootstrap(per_prompt(before["rows"]), per_prompt(after["rows"]), seed=rc.seed)
    from_peak = {}
    if not rc.guard and state["best"] is not None and state["best_step"] != tc.steps:
        # unguarded: the gold peak's weights on the same fresh samples, so that "gold fell while the proxy
        # rose" is measured, not read off the watched curve, whose peak is the maximum of noisy evaluations
        at_peak = copy.deepcopy(policy)
        at_peak.load_state_dict(state["best"])
        peak = evaluate(at_peak.float().eval(), ref, rm, tok, final_set, rc.final_samples, rc.max_new_tokens, seed)
        d, plo, phi = paired_bootstrap(per_prompt(peak["rows"]), per_prompt(after["rows"]), seed=rc.seed)
        from_peak = {"gold_at_peak": peak["gold"], "proxy_at_peak": peak["proxy"], "gold_from_peak": d,
                     "gold_from_peak_ci95": [plo, phi]}
    adv = adversarial(evals, rc.n_adversarial)
    write_jsonl(out / "adversarial.jsonl", adv)
    write_jsonl(out / "samples.jsonl", [dict(r, model="after") for r in after["rows"][:40]])
    atomic_write_json(out / "rlhf_config.json", asdict(rc))
    summary.update({
        "init": str(start_dir), "rm_acc": rm_meta.get("rm_acc"), "beta": rc.beta, "guard": rc.guard,
        "gold_before": before["gold"], "gold_after": after["gold"], "gold_diff": diff, "gold_diff_ci95": [lo, hi],
        "proxy_before": before["proxy"], "proxy_after": after["proxy"], "kl_after": after["kl"],
        "words_before": before["resp_words"], "words_after": after["resp_words"],
        "stopped_step": state["stopped_step"] if state["stop"] else tc.steps, "stop_reason": state["stop"] or "completed",
        "gold_peak_step": state["best_step"], "gold_peak": state["best_gold"],
        "guard_would_stop": next((c["step"] for i, c in enumerate(curve) if i and guard_decision(curve[:i + 1], rc)), None),
        "saved_step": state["best_step"] if rc.guard else
        (state["stopped_step"] if state["stop"] else tc.steps), "adversarial": len(adv), "eval_prompts": len(eval_set),
        "final_prompts": len(final_set), **from_peak,
        "curve": [{k: v for k, v in c.items() if k != "gold_prompts"} for c in curve]})
    return summary


def _prepend_row(path: Path, row: dict) -> None:
    lines = path.read_text().splitlines() if path.exists() else []
    path.write_text("".join(l + "\n" for l in [json.dumps(row)] + lines))
