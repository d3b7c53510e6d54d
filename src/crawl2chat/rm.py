"""The reward model: the chat model's transformer with a scalar head on the last token's hidden state,
trained on preference pairs with the Bradley-Terry loss -log σ(r_chosen - r_rejected) (InstructGPT).

Pairs come from files (TRL {prompt, chosen, rejected} JSONL, Anthropic HH-RLHF transcripts) or, for the
synthetic world, from the policy itself: two replies sampled per open-ended prompt, labelled by the hidden
rubric with label noise (the small human-labelled subset). Held-out pairs are labelled by the rubric
without noise and give rm_acc.

A few hundred noisy pairs teach the head little about which facts are right: trained alone it ranked
held-out pairs worse (0.67 over three seeds) than the chat model's own likelihood of the replies did
untrained (0.77). With rm.likelihood_weight the score also adds the reply's mean log-probability under
the frozen chat model the RM starts from, and the head learns what that misses."""
from __future__ import annotations

import random
from itertools import combinations
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from crawl2chat import rubric
from crawl2chat import world as world_mod
from crawl2chat.chat_template import render
from crawl2chat.common import C2CError, atomic_write_json, dist_info, read_json, write_jsonl
from crawl2chat.config import Config, RMConfig, TrainConfig
from crawl2chat.model import GPT, GPTConfig, rms_norm
from crawl2chat.rl import sample_completions
from crawl2chat.tokenizer import Tokenizer
from crawl2chat.train import SURPRISAL_IN_LR_MULT, load_model, train


@dataclass
class RewardConfig(GPTConfig):
    """The GPT's shape plus the likelihood term: score += likelihood_weight × the mean log-probability of
    the reply's tokens (after the last reply_start token) under a frozen reference model of shape
    `reference` (a GPTConfig as a dict; None = no term)."""
    likelihood_weight: float = 0.0
    reply_start: int = -1
    reference: dict | None = None


class RewardModel(GPT):
    """GPT + a scalar head: the chat model's weights layout plus value_head.*, and reference.* (the
    frozen chat model) when the score has the likelihood term."""

    def __init__(self, cfg: GPTConfig):
        if not isinstance(cfg, RewardConfig):
            cfg = RewardConfig(**{f.name: getattr(cfg, f.name) for f in fields(GPTConfig)})
        super().__init__(cfg)
        self.value_head = nn.Linear(cfg.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.reference = None
        if cfg.reference is not None and cfg.likelihood_weight:
            self.reference = GPT(GPTConfig.from_dict(cfg.reference)).requires_grad_(False)

    @torch.no_grad()
    def reply_logp(self, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Mean log-probability under the reference of each row's tokens after its last reply_start
        token (or after the first token, when it has none) up to `last`, [B]."""
        logp = self.reference(idx)[:, :-1].float().log_softmax(-1).gather(-1, idx[:, 1:, None])[..., 0]
        at = torch.arange(idx.size(1), device=idx.device)[None]
        opens = torch.where((idx == self.cfg.reply_start) & (at <= last[:, None]), at, 0).amax(1, keepdim=True)
        m = (at[:, 1:] > opens) & (at[:, 1:] <= last[:, None])
        return (logp * m).sum(1) / m.sum(1).clamp(min=1)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] → final normed hidden states [B, T, C] (GPT.forward without the LM head)."""
        T = idx.size(1)
        cos = self.rope_cos[:T].to(self.embed.weight.dtype)
        sin = self.rope_sin[:T].to(self.embed.weight.dtype)
        x = self.embed_input(idx, cos, sin, None)
        for block in self.blocks:
            x = block(x, cos, sin, None)
        return rms_norm(x, self.cfg.norm_eps)

    def score(self, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Right-padded idx [B, T] and the index of each row's last real token [B] → rewards [B]."""
        h = self.hidden(idx)
        h_last = h[torch.arange(idx.size(0), device=idx.device), last]
        r = self.value_head(h_last).squeeze(-1).float()
        if self.reference is not None:
            r = r + self.cfg.likelihood_weight * self.reply_logp(idx, last)
        return r


def from_chat_model(model_dir: Path, surprisal_at: tuple[int, int] | None = None, likelihood_weight: float = 0.0,
                    reply_start: int = -1) -> RewardModel:
    """The chat model under a zero value head; with surprisal_at (any token id, used only to switch
    it on), reading its own surprisal at every token of the conversation (GPT.input_surprisal), so that
    a reply's fact the model finds unlikely can lower its score; with likelihood_weight, plus that
    weight × the reply's mean log-probability under a frozen copy of the chat model."""
    chat = load_model(model_dir)
    base = {f.name: getattr(chat.cfg, f.name) for f in fields(GPTConfig)}
    rm = RewardModel(RewardConfig(**base, likelihood_weight=likelihood_weight, reply_start=reply_start,
                                  reference=dict(base) if likelihood_weight else None))
    missing, unexpected = rm.load_state_dict(chat.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("value_head", "reference.")) for k in missing), (missing, unexpected)
    if rm.reference is not None:
        rm.reference.load_state_dict(chat.state_dict())
    if surprisal_at is not None:
        rm = rm.with_surprisal_input(*surprisal_at, everywhere=True)
    return rm


def load_reward_model(rm_dir: Path, device="cpu") -> RewardModel:
    rm_dir = Path(rm_dir)
    weights = rm_dir / "model.safetensors"
    if not weights.exists():
        raise C2CError(f"{weights}: no reward model here — run `c2c rm` first")
    rm = RewardModel(RewardConfig.from_dict(read_json(rm_dir / "config.json", "model config")))
    try:
        rm.load_state_dict(load_file(str(weights)))
    except Exception as e:  # noqa: BLE001
        raise C2CError(f"{weights}: cannot load a reward model ({str(e).splitlines()[0]})") from None
    return rm.to(device)


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Bradley-Terry loss (mean) and pair accuracy (a tie counts half)."""
    d = r_chosen - r_rejected
    acc = float(((d > 0).float() + 0.5 * (d == 0).float()).mean())
    return -F.logsigmoid(d).mean(), acc


def _batch(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    return x.to(device), torch.tensor([len(s) - 1 for s in seqs], device=device)


@torch.no_grad()
def score_seqs(rm: RewardModel, seqs: list[list[int]], pad: int, chunk: int = 32) -> torch.Tensor:
    """Rewards of token sequences (prompt + reply), in chunks; one longer than the model's window keeps
    its first token and its end."""
    seqs = [fit(s, rm.cfg.seq_len, s[0]) for s in seqs]
    was = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    out = [rm.score(*_batch(seqs[i:i + chunk], pad, device)).cpu() for i in range(0, len(seqs), chunk)]
    rm.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def pair_accuracy(rm: RewardModel, pairs: list[dict], pad: int) -> float:
    if not pairs:
        return float("nan")
    rc = score_seqs(rm, [p["chosen_ids"] for p in pairs], pad)
    rr = score_seqs(rm, [p["rejected_ids"] for p in pairs], pad)
    return bt_loss(rc, rr)[1]


# ---------------------------------------------------------------- pairs

def fit(ids: list[int], max_len: int, bos_id: int) -> list[int]:
    return ids if len(ids) <= max_len else [bos_id] + ids[-(max_len - 1):]


def tokenize_pairs(tok: Tokenizer, pairs: list[dict], max_len: int) -> list[dict]:
    """{prompt: [messages], chosen, rejected} → + chosen_ids/rejected_ids (the rendered conversation, the
    reply's <|assistant_end|> last; long ones keep <|bos|> and their end)."""
    out = []
    for p in pairs:
        ids = {k: fit(render(tok, p["prompt"] + [{"role": "assistant", "content": p[k]}])[0], max_len, tok.bos_id)
               for k in ("chosen", "rejected")}
        out.append(dict(p, chosen_ids=ids["chosen"], rejected_ids=ids["rejected"]))
    return out


def finished(seqs: list[list[int]], end: int) -> list[list[int]]:
    """Each prompt + reply as a finished turn: <|assistant_end|> appended to a reply cut off at
    max_new_tokens. The head then always reads the end-of-turn token, as it does for files' pairs, and the
    likelihood term carries how unlikely stopping there is (a cut-off reply loses the rubric's ending and
    usually rambles). Measured on a run's 299 held-out pairs, 88 of whose 598 replies were cut off: the
    untrained likelihood ranked 0.829 without it, 0.846 with it."""
    return [s if s and s[-1] == end else s + [end] for s in seqs]


def world_pairs(policy: GPT, tok: Tokenizer, prompts: list[dict], rc: RMConfig, noise: float,
                seed: int, all_pairs: bool = False) -> tuple[list[dict], dict]:
    """rc.samples_per_prompt sampled replies per prompt, paired (every pair with all_pairs, as a
    labeller who ranks the k replies gives; else two by two), labelled by the rubric (flipped with
    probability noise); ties within rc.margin are dropped. Returns the pairs and label statistics."""
    k = max(2, rc.samples_per_prompt if all_pairs else rc.samples_per_prompt - rc.samples_per_prompt % 2)
    samples = sample_completions(policy, tok, [p["prompt"] for p in prompts], k, rc.max_new_tokens,
                                 rc.temperature, seed)
    which = list(combinations(range(k), 2)) if all_pairs else [(j, j + 1) for j in range(0, k, 2)]
    end = tok.special_id("<|assistant_end|>")
    rng = random.Random(seed)
    pairs, agree, ties = [], 0, 0
    for i, p in enumerate(prompts):
        for a, b in which:
            (pa, ca, ta, ea), (pb, cb, tb, eb) = samples[k * i + a], samples[k * i + b]
            label = rubric.label_pair(p["meta"], ta, tb, rng, noise, (ea, eb), rc.margin)
            if label is None:
                ties += 1
                continue
            true = rubric.label_pair(p["meta"], ta, tb, rng, 0.0, (ea, eb), rc.margin)
            agree += label == true
            ia, ib = finished([pa + ca, pb + cb], end)
            (ci, ct), (ri, rt) = ((ia, ta), (ib, tb)) if label == 0 else ((ib, tb), (ia, ta))
            pairs.append({"prompt": [{"role": "user", "content": p["prompt"]}], "chosen": ct, "rejected": rt,
                          "chosen_ids": ci, "rejected_ids": ri, "meta": p["meta"]})
    return pairs, {"ties_dropped": ties, "label_agreement": agree / max(1, len(pairs))}


def world_prompt_sets(world: dict, rc: RMConfig) -> tuple[list[dict], list[dict]]:
    """The open-ended prompts split into (train, held-out) by entity; the RLHF stage uses the same split."""
    prompts = rubric.open_prompts(world, seed=rc.seed)
    return rubric.split_prompts(prompts, rc.n_heldout)


def init_dir(run_dir: Path, init: str) -> Path:
    if init:
        path = Path(init) if Path(init).is_absolute() or Path(init).exists() else run_dir / init
    else:
        path = next((run_dir / s for s in ("rl", "sft") if (run_dir / s / "model.safetensors").exists()), run_dir / "sft")
    if not (path / "model.safetensors").exists():
        raise C2CError(f"{path}: no chat model to start from (run `c2c sft` first, or set rm.init)")
    return path


def _public(pairs: list[dict]) -> list[dict]:
    return [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]


# ---------------------------------------------------------------- the stage

def run_rm(run_dir: Path, cfg: Config, rm_cfg: RMConfig, train_cfg: TrainConfig, resume: bool = False) -> dict:
    run_dir = Path(run_dir)
    rc, tc = rm_cfg, train_cfg
    out = run_dir / "rm"
    tok = Tokenizer.load(run_dir / "tokenizer")
    pad = tok.special_id("<|pad|>")
    start_dir = init_dir(run_dir, rc.init)
    model = from_chat_model(start_dir, (tok.special_id("<|user_start|>"), tok.special_id("<|user_end|>"))
                            if rc.surprisal_input else None, rc.likelihood_weight, tok.special_id("<|assistant_start|>"))
    T = model.cfg.seq_len
    info: dict = {}
    if rc.pairs or rc.hh:
        pairs = [p for f in rc.pairs for p in rubric.load_pairs(f)]
        if rc.hh:
            pairs += rubric.load_hh(rc.hh, limit=rc.max_pairs or None)
        if rc.max_pairs:
            pairs = pairs[:rc.max_pairs]
        random.Random(rc.seed).shuffle(pairs)
        pairs = tokenize_pairs(tok, pairs, T)
        n_held = max(1, int(len(pairs) * rc.heldout_fraction))
        if len(pairs) < 2:
            raise C2CError("rm: need at least 2 preference pairs (one to train, one to hold out)")
        held, train_pairs = pairs[:n_held], pairs[n_held:]
        info["source"] = "files"
    else:
        world = world_mod.load_world(run_dir / "world")
        train_prompts, held_prompts = world_prompt_sets(world, rc)
        policy = load_model(start_dir).eval()
        rng = random.Random(rc.seed)
        train_prompts = rng.sample(train_prompts, min(rc.n_prompts, len(train_prompts)))
        train_pairs, stats = world_pairs(policy, tok, train_prompts, rc, rc.noise, rc.seed, rc.all_pairs)
        # every pair of the held-out replies: gold labels cost no person's time, and three times the
        # pairs of taking them two by two (315 against 102) narrow rm_acc's interval
        held, _ = world_pairs(policy, tok, held_prompts, rc, 0.0, rc.seed + 1, all_pairs=True)
        info.update({"source": "world", **stats})
        del policy
    if not train_pairs:
        raise C2CError("rm: no training pairs (every sampled pair was a tie?)")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "pairs_train.jsonl", _public(train_pairs))
    write_jsonl(out / "pairs_heldout.jsonl", _public(held))
    acc_before = pair_accuracy(model, held, pad)

    def batch_fn(step: int, micro: int, rank: int, world_size: int):
        rng = random.Random(tc.seed * 1_000_003 + (step * tc.grad_accum + micro) * world_size + rank)
        return [train_pairs[i] for i in rng.sample(range(len(train_pairs)), min(tc.batch_size, len(train_pairs)))]

    def loss_fn(m, batch, device):
        x, last = _batch([p["chosen_ids"] for p in batch] + [p["rejected_ids"] for p in batch], pad, device)
        r = m.score(x, last)
        loss, acc = bt_loss(r[:len(batch)], r[len(batch):])
        return loss, {"tokens": int(last.sum()) + len(last), "train_acc": acc}

    def eval_fn(m):
        return {"rm_acc": pair_accuracy(m, held, pad)}

    summary = train(model, tc, out, batch_fn, tokens_per_micro=0, eval_fn=eval_fn, resume=resume, desc="rm",
                    loss_fn=loss_fn, bar_keys=("train_acc", "rm_acc"),
                    # the input now reads every token of the reply, not the user's words it was trained on
                    surprisal_lr_mult=SURPRISAL_IN_LR_MULT)
    if dist_info()[0] != 0:
        return summary
    atomic_write_json(out / "rm_config.json", asdict(rc))
    summary.update({"init": str(start_dir), "rm_acc": pair_accuracy(model.float(), held, pad),
                    "rm_acc_before": acc_before, "train_pairs": len(train_pairs), "heldout_pairs": len(held), **info})
    return summary
