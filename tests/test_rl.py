"""GRPO: the answer parser, advantages and the clipped objective against hand-computed values, problem
files' errors, and the RL stage on the smoke run."""
import json
import math
from decimal import Decimal

import pytest
import torch

from crawl2chat.common import C2CError, shared_data
from crawl2chat.config import GRPOConfig
from crawl2chat.problems import final_answer, gold_answer, load_problems, same_number
from crawl2chat.rl import group_advantages, grpo_token_loss, reward


def test_parser_recovers_every_gsm8k_gold_answer():
    path = shared_data("math/gsm8k/test.jsonl")
    assert path is not None, "../shared/data/math/gsm8k/test.jsonl is missing"
    n = 0
    for line in path.read_text().splitlines():
        row = json.loads(line)
        solution, gold = row["answer"], row["answer"].split("####")[-1].strip()
        expected = Decimal(gold.replace(",", ""))
        assert final_answer(solution) == expected, solution[-80:]
        n += 1
    assert n > 1000


@pytest.mark.parametrize("text,value", [
    ("She makes 9 * 2 = $18 every day. The answer is $18.", "18"),
    ("The total is 1,234,567 apples", "1234567"),
    ("It fell to -12 degrees.", "-12"),
    ("The answer is: -$3.50", "-3.50"),
    ("That is 45%.", "45"),
    ("so x = 2.5 cm", "2.5"),
    ("\\boxed{7} and then 9", "7"),
    ("#### 1,000", "1000"),
])
def test_final_answer_formats(text, value):
    assert final_answer(text) == Decimal(value)


def test_final_answer_none_and_matching():
    assert final_answer("no digits here") is None
    assert same_number(Decimal("18.0"), Decimal("18"))
    assert not same_number(None, Decimal("1"))
    assert not same_number(Decimal("17"), Decimal("18"))


def test_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards, scale_std=True, eps=0.0)
    std = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    assert torch.equal(adv[1], torch.zeros(4))
    adv_no_std = group_advantages(rewards, scale_std=False)
    assert torch.allclose(adv_no_std[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    leaning = group_advantages(rewards, scale_std=False, neg_weight=0.25)  # only the wrong replies shrink
    assert torch.allclose(leaning[0], torch.tensor([0.5, -0.125, -0.125, 0.5]))
    assert torch.equal(leaning[1], torch.zeros(4))


def test_loss_gradient_by_hand_and_equal_group_gives_none():
    # 3 completions, 3 token slots; the last completion's group had equal rewards (advantage 0)
    adv = torch.tensor([1.0, -2.0, 0.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    logp = torch.log(torch.full((3, 3), 0.5)).requires_grad_(True)
    loss_sum, stats = grpo_token_loss(logp, logp.detach(), adv, mask, 0.2, 0.28)
    n = int(mask.sum())
    (loss_sum / n).backward()
    # ratio = 1: loss per token = -adv, d/dlogp = -adv · ratio / n on unmasked tokens
    expected = -adv.unsqueeze(1) * mask.float() / n
    assert torch.allclose(logp.grad, expected)
    assert torch.equal(logp.grad[2], torch.zeros(3))  # the all-equal group contributes no gradient
    assert abs(float(loss_sum.detach()) - float(-(adv.unsqueeze(1) * mask).sum())) < 1e-6
    assert stats["clip_frac"] == 0.0


def test_clipping_by_hand():
    old = torch.zeros(1, 4)
    # ratios 1.5 (adv>0: clipped at 1.28, no grad), 0.5 (adv>0: unclipped), 0.5 and 1.5 with adv<0
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    logp = ratios.log().requires_grad_(True)
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = grpo_token_loss(logp[:, :2], old[:, :2], adv, mask[:, :2], 0.2, 0.28)
    loss.backward()
    assert abs(float(loss.detach()) - (-(1.28 * 1.0) - 0.5)) < 1e-6
    assert torch.allclose(logp.grad[0, :2], torch.tensor([0.0, -0.5]))
    assert stats["clip_frac"] == 0.5
    logp.grad = None
    loss, stats = grpo_token_loss(logp[:, 2:], old[:, 2:], -adv, mask[:, 2:], 0.2, 0.28)
    loss.backward()
    # adv = -1: min(r·a, clip(r)·a) = -max(r, clip(r)) → 0.5 is clipped to 0.8 (no grad), 1.5 stays (grad)
    assert abs(float(loss.detach()) - (0.8 + 1.5)) < 1e-6
    assert torch.allclose(logp.grad[0, 2:], torch.tensor([0.0, 1.5]))


def test_kl_penalty_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    _, s0 = grpo_token_loss(logp, logp, torch.tensor([0.0]), mask, 0.2, 0.2, ref_logp=logp, beta=0.1)
    _, s1 = grpo_token_loss(logp, logp, torch.tensor([0.0]), mask, 0.2, 0.2, ref_logp=logp - 0.3, beta=0.1)
    assert s0["kl"] == 0.0 and s1["kl"] > 0.0


def test_reward_terms():
    g = GRPOConfig(max_new_tokens=100, format_reward=0.1, brevity_reward=0.1)
    r_ok, ok = reward("5 + 3 = 8. The answer is 8.", True, 20, Decimal(8), g)
    r_long, _ = reward("5 + 3 = 8. The answer is 8.", True, 80, Decimal(8), g)
    r_bad, bad = reward("5 + 3 = 9. The answer is 9.", True, 20, Decimal(8), g)
    r_unformatted, _ = reward("it is 8", False, 20, Decimal(8), g)
    assert ok and not bad
    assert abs(r_ok - (1 + 0.1 + 0.1 * 0.8)) < 1e-9
    assert r_ok > r_long > r_unformatted > r_bad == pytest.approx(0.1)


@pytest.mark.parametrize("line,message", [
    ('{"question": "How many?"}', "missing answer"),
    ('{"question": "How many?", "answer": "lots"}', "is not a number"),
    ('{"question": "  ", "answer": 3}', "empty question"),
    ('{"question": "How many?", "answer": 3', "not valid JSON"),
])
def test_bad_problem_files(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "What is 1 + 1?", "answer": "#### 2"}\n' + line + "\n")
    with pytest.raises(C2CError, match=message) as e:
        load_problems(path)
    assert ":2" in str(e.value) or "line 2" in str(e.value)
    assert "\n" not in str(e.value)


def test_gold_answer_forms():
    assert gold_answer(42, "x") == Decimal(42)
    assert gold_answer("1,200", "x") == Decimal(1200)
    assert gold_answer("He has 3 + 4 = 7 now\n#### 7", "x") == Decimal(7)


def test_rl_stage_on_the_smoke_run(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    rl = report["rl"]
    for key in ("pass1_before", "pass1_after", "len_before", "len_after", "pass2_before", "pass2_after"):
        assert key in rl
    assert 0.0 <= rl["pass1_before"] <= 1.0 and 0.0 <= rl["pass1_after"] <= 1.0
    rows = [json.loads(line) for line in (smoke_run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    for key in ("reward_mean", "reward_std", "equal_groups", "resp_len", "kl", "clip_frac", "gen_s"):
        assert all(key in r and math.isfinite(r[key]) for r in rows), key
    assert any("pass1" in r for r in rows)
    assert (smoke_run / "rl" / "model.safetensors").exists()
    assert rl["tools"] is True and 0.0 <= rl["tool_use_before"] <= 1.0 and "tool_calls" in rows[0]


def test_tool_outputs_are_left_out_of_the_loss():
    from crawl2chat.model import GPT, GPTConfig
    from crawl2chat.rl import completion_logp
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(1, 50, 32, aspect_ratio=32, head_dim=32)).eval()
    seqs, plens = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 8, 9]], [3, 2]
    sampled = [[1, 0, 0, 1], [1, 1]]  # the first completion's 2nd and 3rd ids are a tool's output
    with torch.no_grad():
        full, full_mask = completion_logp(model, seqs, plens, 0, "cpu")
        lp, mask = completion_logp(model, seqs, plens, 0, "cpu", sampled)
    assert full_mask.sum() == 6 and mask.sum() == 4
    assert mask[0].tolist() == [False, False, True, False, False, True]
    assert (lp[0, 3:5] == 0).all() and lp[0, 2] == full[0, 2] and lp[0, 5] == full[0, 5]
    assert torch.equal(lp[1], full[1])
