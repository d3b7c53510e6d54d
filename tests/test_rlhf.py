"""RLHF: the guard's stopping rule, the paired bootstrap, adversarial examples, and rm + rlhf end to end
on the smoke run."""
from __future__ import annotations

import json
import math

from crawl2chat.config import TrainConfig
from crawl2chat.report import hacking_verdict
from crawl2chat.rlhf import RLHFConfig, adversarial, guard_decision, paired_bootstrap, paired_se, run_rlhf
from crawl2chat.rm import RMConfig, run_rm


def _curve(points):
    return [{"step": 5 * i, "proxy": p, "gold": g, "kl": k} for i, (p, g, k) in enumerate(points)]


def test_guard_stops_on_proxy_up_gold_down_for_m_evaluations():
    rc = RLHFConfig(patience=2, margin=0.01, kl_budget=5.0)
    rising = [(0.0, 0.50, 0.1), (0.2, 0.60, 0.2), (0.4, 0.55, 0.3)]
    assert guard_decision(_curve(rising), rc) is None  # one evaluation of divergence is not enough
    assert guard_decision(_curve(rising + [(0.5, 0.52, 0.4)]), rc) == "reward_hacking"
    assert guard_decision(_curve(rising + [(0.5, 0.65, 0.4)]), rc) is None  # gold recovered: a new peak
    assert guard_decision(_curve(rising + [(0.1, 0.52, 0.4)]), rc) is None  # proxy fell too: not hacking
    assert guard_decision(_curve([(0.0, 0.5, 0.1), (0.1, 0.6, 6.0)]), rc) == "kl_budget"
    # the proxy peaked with gold, then climbs again (still below its peak) while gold sinks
    plateau = [(0.0, 0.50, 0.1), (0.50, 0.70, 0.2), (0.45, 0.66, 0.3), (0.47, 0.64, 0.4)]
    assert guard_decision(_curve(plateau), rc) is None  # one evaluation of divergence is not enough
    assert guard_decision(_curve(plateau + [(0.48, 0.62, 0.5)]), rc) == "reward_hacking"
    assert guard_decision(_curve(plateau + [(0.46, 0.62, 0.5)]), rc) is None  # proxy fell with gold
    assert guard_decision(_curve(plateau[:2] + [(0.45, 0.695, 0.3), (0.47, 0.692, 0.4)]), rc) is None  # gold within margin


def test_guard_ignores_a_gold_drop_within_the_evaluations_noise():
    """Gold 0.02-0.03 below its peak with the proxy up: hacking when every prompt moved alike, noise when
    the prompts scatter (per-prompt differences of ±0.15 over 4 prompts: a standard error of 0.087)."""
    rc = RLHFConfig(patience=2, margin=0.01, noise_z=1.0, kl_budget=5.0)
    dip = _curve([(0.0, 0.82, 0.1), (0.3, 0.80, 0.2), (0.4, 0.79, 0.3)])
    peak = [0.6, 0.8, 0.9, 0.98]
    alike = [[g - 0.02 for g in peak], [g - 0.03 for g in peak]]
    scattered = [[g + d for g, d in zip(peak, (0.13, -0.17, 0.13, -0.17))],
                 [g + d for g, d in zip(peak, (0.12, -0.18, 0.12, -0.18))]]
    with_prompts = lambda later: [dict(dip[0], gold_prompts=peak)] + [  # noqa: E731
        dict(c, gold_prompts=p) for c, p in zip(dip[1:], later)]
    assert guard_decision(with_prompts(alike), rc) == "reward_hacking"
    assert guard_decision(with_prompts(scattered), rc) is None
    assert paired_se(peak, alike[0]) < 1e-6 and abs(paired_se(peak, scattered[0]) - 0.0866) < 1e-3
    assert guard_decision(dip, rc) == "reward_hacking"  # without per-prompt scores: the margin alone


def test_paired_bootstrap_interval():
    before = [0.5, 0.4, 0.6, 0.5, 0.3, 0.7, 0.5, 0.4]
    after = [b + d for b, d in zip(before, [0.1, 0.2, 0.1, 0.15, 0.1, 0.05, 0.2, 0.1])]
    mean, lo, hi = paired_bootstrap(before, after)
    assert abs(mean - 0.125) < 1e-6 and 0.05 <= lo < mean < hi <= 0.2
    mean, lo, hi = paired_bootstrap(before, before)
    assert mean == lo == hi == 0.0


def test_adversarial_examples_are_high_proxy_low_gold():
    start = [{"prompt": "p", "response": str(i), "proxy": float(i), "gold": 0.5, "prompt_index": i} for i in range(4)]
    later = [{"prompt": "p", "response": "hack", "proxy": 9.0, "gold": 0.1, "prompt_index": 0},
             {"prompt": "p", "response": "fine", "proxy": 9.0, "gold": 0.9, "prompt_index": 1}]
    adv = adversarial([(0, start), (10, later)], k=5)
    assert [a["response"] for a in adv] == ["hack"] and adv[0]["step"] == 10
    # the same reply at a later evaluation is listed once, at its first step
    adv = adversarial([(0, start), (10, later), (20, later)], k=5)
    assert [a["response"] for a in adv] == ["hack"] and adv[0]["step"] == 10


def _configs():
    rm_cfg = RMConfig(n_prompts=40, n_heldout=10, max_new_tokens=16)
    rm_tc = TrainConfig(steps=6, batch_size=8, lr=3e-4, warmup_steps=1, eval_every=3, ckpt_every=3, dtype="fp32")
    rc = RLHFConfig(prompts_per_step=4, group_size=2, max_new_tokens=16, eval_prompts=6, eval_samples=2,
                    final_samples=2)
    tc = TrainConfig(steps=4, batch_size=0, lr=1e-4, warmup_steps=1, eval_every=2, ckpt_every=2, dtype="fp32")
    return rm_cfg, rm_tc, rc, tc


def test_rm_and_rlhf_end_to_end_on_the_smoke_run(smoke_run, copy_run):
    run = copy_run(smoke_run)
    rm_cfg, rm_tc, rc, tc = _configs()
    rm = run_rm(run, None, rm_cfg, rm_tc)
    assert rm["source"] == "world" and rm["train_pairs"] > 0 and rm["heldout_pairs"] > 0
    assert 0.0 <= rm["rm_acc"] <= 1.0 and 0.5 <= rm["label_agreement"] <= 1.0
    (run / "rm" / "metrics.json").write_text(json.dumps(rm))
    out = run_rlhf(run, None, rc, tc)
    for key in ("rm_acc", "gold_before", "gold_after", "gold_diff_ci95", "proxy_before", "proxy_after",
                "stopped_step", "gold_peak_step", "stop_reason", "curve"):
        assert key in out, key
    assert out["rm_acc"] == rm["rm_acc"]
    assert out["final_prompts"] >= 10 > out["eval_prompts"] == 6  # gold_before/after: every held-out prompt
    assert 0.0 <= out["gold_before"] <= 1.0 and 0.0 <= out["gold_after"] <= 1.0
    lo, hi = out["gold_diff_ci95"]
    assert lo <= out["gold_diff"] <= hi
    assert out["gold_peak_step"] in {c["step"] for c in out["curve"]}
    assert [c["step"] for c in out["curve"]][:2] == [0, 2]
    rows = [json.loads(l) for l in (run / "rlhf" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and all(math.isfinite(rows[0][k]) for k in ("proxy", "gold", "kl"))
    assert any("gold" in r and r["step"] == 2 for r in rows)
    assert (run / "rlhf" / "model.safetensors").exists() and (run / "rlhf" / "adversarial.jsonl").exists()


def test_guard_stops_training_and_keeps_the_best_gold_weights(smoke_run, copy_run):
    """A KL budget below zero fires at the first evaluation after training starts."""
    run = copy_run(smoke_run)
    rm_cfg, rm_tc, rc, tc = _configs()
    run_rm(run, None, rm_cfg, rm_tc)
    rc.kl_budget = -1.0
    tc.steps = 6
    out = run_rlhf(run, None, rc, tc)
    assert out["stop_reason"] == "kl_budget" and out["stopped_step"] == 2
    rows = [json.loads(l) for l in (run / "rlhf" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2  # no step after the guard fired
    assert out["saved_step"] == out["gold_peak_step"]
    rc.guard, rc.kl_budget = False, -1.0
    out = run_rlhf(run, None, rc, tc)
    assert out["stop_reason"] == "completed" and out["stopped_step"] == 6 and out["saved_step"] == 6


def test_no_guard_cli_trains_beside_the_guarded_run(smoke_run, copy_run):
    """c2c rlhf --no-guard --kl 0 writes rlhf_noguard/ and leaves rlhf/, config.json and report.json alone;
    report.md plots the unguarded curve and says where the guard would have stopped."""
    from crawl2chat import cli
    run = copy_run(smoke_run)
    kept = {p: (run / p).read_bytes() for p in ("rlhf/metrics.json", "config.json", "report.json")}
    cli.main(["rlhf", "--out", str(run), "--no-guard", "--kl", "0"])
    assert {p: (run / p).read_bytes() for p in kept} == kept
    m = json.loads((run / "rlhf_noguard" / "metrics.json").read_text())
    assert m["guard"] is False and m["beta"] == 0.0 and m["stop_reason"] == "completed"
    assert "guard_would_stop" in m and (run / "rlhf_noguard" / "model.safetensors").exists()
    text = (run / "report.md").read_text()
    section = text.split("## RLHF without the guard and the KL penalty")[1]
    assert "| gold_before |" in section
    assert ("gold_from_peak_ci95" in m) == (m["gold_peak_step"] != m["steps"])  # the peak's weights measured
    hacked, sentence = hacking_verdict(m)
    assert sentence in section and ("Reward hacking:" in section) == hacked and "learning rate up to" in section
    assert (run / "rlhf_noguard_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_hacking_verdict_needs_the_proxy_up_and_golds_interval_below_zero():
    base = {"proxy_before": 0.5, "proxy_after": 1.9, "gold_before": 0.77, "gold_after": 0.80,
            "gold_peak_step": 110, "proxy_at_peak": 1.7, "gold_at_peak": 0.86}
    hacked, text = hacking_verdict(dict(base, gold_from_peak=-0.06, gold_from_peak_ci95=[-0.09, -0.03],
                                        gold_diff_ci95=[0.0, 0.06]))
    assert hacked and text.startswith("Reward hacking:") and "step 110" in text and "1.70 → 1.90" in text
    assert not hacking_verdict(dict(base, gold_from_peak=-0.02, gold_from_peak_ci95=[-0.05, 0.01]))[0]  # noise
    assert not hacking_verdict(dict(base, proxy_after=1.6, gold_from_peak=-0.06, gold_from_peak_ci95=[-0.09, -0.03]))[0]
    # no peak before the last step: from the start
    start = {k: base[k] for k in ("proxy_before", "proxy_after", "gold_before")}
    assert hacking_verdict(dict(start, gold_after=0.70, gold_diff_ci95=[-0.11, -0.03]))[0]
    assert not hacking_verdict(dict(start, gold_after=0.76, gold_diff_ci95=[-0.04, 0.02]))[0]
    assert hacking_verdict({"proxy_after": 1.0}) is None
    # a peak on the watched prompts whose weights score below the start on fresh samples: from the start
    low_peak = dict(base, gold_at_peak=0.70, gold_after=0.76, gold_from_peak=0.06, gold_from_peak_ci95=[0.01, 0.11])
    hacked, text = hacking_verdict(dict(low_peak, gold_diff_ci95=[-0.07, -0.004]))
    assert hacked and "from the start" in text and "0.770 → 0.760" in text
    assert not hacking_verdict(dict(low_peak, gold_diff_ci95=[-0.03, 0.01]))[0]
