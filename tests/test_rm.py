"""The reward model: the scalar-head wrapper, the Bradley-Terry loss, training on a synthetic preference,
and the real-data path (HH-RLHF pairs on the smoke run)."""
from __future__ import annotations

import json
import math

import torch

from crawl2chat.common import shared_data
from crawl2chat.config import TrainConfig
from crawl2chat.model import GPT, GPTConfig
from crawl2chat.rm import (RewardModel, RMConfig, bt_loss, from_chat_model, load_reward_model, pair_accuracy, run_rm,
                           score_seqs)
from crawl2chat.train import save_model, train

CFG = GPTConfig(vocab_size=32, depth=1, n_embd=32, n_head=2, head_dim=16, mlp_hidden=64, seq_len=16)


def test_bt_loss_and_accuracy():
    loss, acc = bt_loss(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]))
    expected = (-math.log(torch.sigmoid(torch.tensor(1.0)).item()) + math.log(2) + -math.log(torch.sigmoid(torch.tensor(-1.0)).item())) / 3
    assert abs(loss.item() - expected) < 1e-5
    assert acc == (1 + 0.5 + 0) / 3


def test_hidden_states_match_the_gpt_and_padding_is_ignored():
    torch.manual_seed(0)
    gpt = GPT(CFG)
    rm = RewardModel(CFG)
    rm.load_state_dict(gpt.state_dict(), strict=False)
    x = torch.randint(0, 32, (2, 7))
    assert torch.allclose(rm.lm_head(rm.hidden(x)), gpt(x), atol=1e-5)
    with torch.no_grad():
        rm.value_head.weight.normal_()
    a = score_seqs(rm, [[1, 2, 3]], pad=0)
    b = score_seqs(rm, [[1, 2, 3], [4, 5, 6, 7, 8, 9]], pad=0)
    assert torch.allclose(a[0], b[0], atol=1e-5)  # right padding after the last token changes nothing


def test_training_learns_a_synthetic_preference(tmp_path):
    """chosen replies contain token 5, rejected ones do not: held-out accuracy goes from 0.5 to ~1."""
    g = torch.Generator().manual_seed(0)

    def pair():
        prompt = torch.randint(6, 32, (3,), generator=g).tolist()
        reply = torch.randint(6, 32, (4,), generator=g).tolist()
        good = list(reply)
        good[int(torch.randint(0, 4, (1,), generator=g))] = 5
        return {"chosen_ids": [1] + prompt + good, "rejected_ids": [1] + prompt + reply}
    pairs, held = [pair() for _ in range(64)], [pair() for _ in range(32)]
    torch.manual_seed(0)
    rm = RewardModel(CFG)
    assert pair_accuracy(rm, held, pad=0) == 0.5  # a zero head: every pair is a tie

    def loss_fn(m, batch, device):
        from crawl2chat.rm import _batch
        x, last = _batch([p["chosen_ids"] for p in batch] + [p["rejected_ids"] for p in batch], 0, device)
        r = m.score(x, last)
        loss, acc = bt_loss(r[:len(batch)], r[len(batch):])
        return loss, {"tokens": len(last), "train_acc": acc}
    tc = TrainConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=2, eval_every=100, ckpt_every=100, dtype="fp32")
    train(rm, tc, tmp_path / "rm", lambda step, *_: pairs[(step * 16) % 64:(step * 16) % 64 + 16], tokens_per_micro=0,
          loss_fn=loss_fn)
    assert pair_accuracy(rm, held, pad=0) >= 0.9
    loaded = load_reward_model(tmp_path / "rm")
    assert torch.allclose(score_seqs(loaded, [held[0]["chosen_ids"]], 0), score_seqs(rm, [held[0]["chosen_ids"]], 0))


def test_world_pairs_two_by_two_or_every_pair_labelled_by_the_rubric(monkeypatch):
    """Four replies of distinct rubric scores: two by two → pairs (0, 1) and (2, 3); every pair → all six,
    the better reply chosen in each (no label noise); a tie within the margin is dropped."""
    from crawl2chat import rm as rm_mod, rubric
    meta = {"kind": "about", "name": "Ann Lee", "facts": {"birth_year": "1950", "home_town": "Kofil"}, "others": []}
    replies = ["Ann Lee was born in 1950. I hope that helps!", "Ann Lee.",
               "Ann Lee comes from Kofil and was born in 1950. I hope that helps!", "Ann Lee was born in 1977."]
    monkeypatch.setattr(rm_mod, "sample_completions", lambda policy, tok, qs, k, *a: [
        ([1], [2 + j], replies[j], True) for _ in qs for j in range(k)])
    tok = type("Tok", (), {"special_id": lambda self, s: 0})()
    prompts = [{"prompt": "Who is Ann Lee?", "meta": meta}]
    scores = {r: rubric.score(meta, r) for r in replies}
    assert len(set(scores.values())) == 4
    rc = RMConfig(samples_per_prompt=4, margin=0.0)
    two, stats = rm_mod.world_pairs(None, tok, prompts, rc, 0.0, 0)
    every, _ = rm_mod.world_pairs(None, tok, prompts, rc, 0.0, 0, all_pairs=True)
    assert [{p["chosen"], p["rejected"]} for p in two] == [{replies[0], replies[1]}, {replies[2], replies[3]}]
    assert len(every) == 6 and len({frozenset((p["chosen"], p["rejected"])) for p in every}) == 6
    assert all(scores[p["chosen"]] > scores[p["rejected"]] for p in two + every)
    assert stats == {"ties_dropped": 0, "label_agreement": 1.0}
    gap = min(abs(scores[a] - scores[b]) for i, a in enumerate(replies) for b in replies[i + 1:])
    tied, stats = rm_mod.world_pairs(None, tok, prompts, RMConfig(margin=gap), 0.0, 0, all_pairs=True)
    assert len(tied) == 6 - stats["ties_dropped"] and stats["ties_dropped"] >= 1
    flipped, stats = rm_mod.world_pairs(None, tok, prompts, rc, 1.0, 0, all_pairs=True)
    assert all(scores[p["chosen"]] < scores[p["rejected"]] for p in flipped) and stats["label_agreement"] == 0.0


def test_world_pairs_and_rlhf_score_a_cut_off_reply_as_a_finished_turn(tmp_path, monkeypatch):
    """A reply cut off at max_new_tokens gets <|assistant_end|> appended (once; an ended one is kept as it
    is), both in the pairs the reward model trains on and in what RLHF scores: the likelihood term then
    includes the log-probability of stopping there."""
    from crawl2chat import rm as rm_mod
    from crawl2chat.rlhf import rm_rewards
    END = 6
    assert rm_mod.finished([[1, 5, 7], [1, 5, 7, END]], END) == [[1, 5, 7, END], [1, 5, 7, END]]
    meta = {"kind": "about", "name": "Ann Lee", "facts": {"birth_year": "1950"}, "others": []}
    replies = [("Ann Lee was born in 1950. I hope that helps!", [7, 8, END], True), ("Ann Lee was", [9, 10], False)]
    monkeypatch.setattr(rm_mod, "sample_completions", lambda policy, tok, qs, k, *a: [
        ([1, 3, 4, 2], ids, text, ended) for _ in qs for text, ids, ended in replies[:k]])
    tok = type("Tok", (), {"special_id": lambda self, s: {"<|assistant_end|>": END, "<|pad|>": 0}[s]})()
    pairs, _ = rm_mod.world_pairs(None, tok, [{"prompt": "Who is Ann Lee?", "meta": meta}],
                                  RMConfig(samples_per_prompt=2, margin=0.0), 0.0, 0)
    assert pairs[0]["chosen_ids"] == [1, 3, 4, 2, 7, 8, END] and pairs[0]["rejected_ids"] == [1, 3, 4, 2, 9, 10, END]
    _saved_chat(tmp_path / "chat")
    rm = from_chat_model(tmp_path / "chat", None, likelihood_weight=1.0, reply_start=2)
    cut = [1, 3, 4, 2, 9, 10]
    torch.testing.assert_close(rm_rewards(rm, tok, [cut]), score_seqs(rm, [cut + [END]], 0))
    assert not torch.allclose(rm_rewards(rm, tok, [cut]), score_seqs(rm, [cut], 0))


def test_reward_model_on_hh_rlhf_pairs(smoke_run, copy_run):
    """The real-data path: a smoke-size RM trained on 160 HH-RLHF pairs, accuracy on 40 held out (reported,
    no threshold: a 100k-parameter model on 64-token windows is near chance)."""
    path = shared_data("preference/hh-rlhf/harmless-base-test.jsonl.gz")
    assert path is not None
    run = copy_run(smoke_run)
    rc = RMConfig(hh=str(path), max_pairs=200, heldout_fraction=0.2)
    tc = TrainConfig(steps=6, batch_size=8, lr=3e-4, warmup_steps=1, eval_every=3, ckpt_every=3, dtype="fp32")
    summary = run_rm(run, None, rc, tc)
    print(f"HH-RLHF held-out pair accuracy: {summary['rm_acc']:.3f} ({summary['heldout_pairs']} pairs)")
    assert summary["source"] == "files" and summary["train_pairs"] == 160 and summary["heldout_pairs"] == 40
    assert 0.0 <= summary["rm_acc"] <= 1.0 and summary["rm_acc_before"] == 0.5  # a zero head: all ties
    assert (run / "rm" / "model.safetensors").exists() and (run / "rm" / "rm_config.json").exists()
    rows = [json.loads(l) for l in (run / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and "rm_acc" in rows[2] and all(math.isfinite(r["loss"]) for r in rows)
    held = [json.loads(l) for l in (run / "rm" / "pairs_heldout.jsonl").read_text().splitlines()]
    assert len(held) == 40 and all(h["chosen"] != h["rejected"] for h in held)


def _saved_chat(path):
    """A random chat model (weights large enough to give uneven predictions), saved at path."""
    torch.manual_seed(0)
    chat = GPT(CFG)
    with torch.no_grad():
        for p in chat.parameters():
            p.normal_(0.0, 0.3)
    save_model(chat, path)
    return chat


def test_reward_model_reads_its_surprisal_at_every_token(tmp_path):
    """rm.surprisal_input: the RM starts as the chat model with a zero surprisal input read at every
    token after the first, and saves and loads with it."""
    _saved_chat(tmp_path / "chat")
    rm = from_chat_model(tmp_path / "chat", (3, 4))
    assert rm.cfg.surprisal_all and rm.surprisal_in is not None
    x = torch.tensor([[1, 7, 8, 9, 10]])
    assert rm.user_mask(x).tolist() == [[False, True, True, True, True]]
    plain = from_chat_model(tmp_path / "chat")
    with torch.no_grad():
        torch.testing.assert_close(rm.hidden(x), plain.hidden(x))  # zero at first
        rm.surprisal_in.weight.normal_()
        rm.value_head.weight.normal_()
        assert not torch.allclose(rm.hidden(x), plain.hidden(x))
    save_model(rm, tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm")
    torch.testing.assert_close(score_seqs(loaded, [[1, 7, 8, 9, 10]], 0), score_seqs(rm, [[1, 7, 8, 9, 10]], 0))


def test_likelihood_term_is_the_replys_mean_logp_under_the_frozen_chat_model(tmp_path):
    """rm.likelihood_weight: with a zero head the score is weight × the mean log-probability the chat model
    gives the tokens after the last reply-start token (id 2 here); padding and later tokens change nothing;
    training leaves the reference as it was, and the RM saves and loads with it."""
    chat = _saved_chat(tmp_path / "chat")
    rm = from_chat_model(tmp_path / "chat", (3, 4), likelihood_weight=2.0, reply_start=2)
    seq = [1, 3, 9, 4, 2, 7, 8, 9, 10]  # reply: 7 8 9 10
    with torch.no_grad():
        logp = chat(torch.tensor([seq]))[0].log_softmax(-1)
    expected = 2.0 * sum(float(logp[t - 1, seq[t]]) for t in range(5, 9)) / 4
    torch.testing.assert_close(score_seqs(rm, [seq], 0), torch.tensor([expected]))
    other = [1, 3, 11, 12, 13, 4, 2, 7]  # a longer row in the batch pads this one
    torch.testing.assert_close(score_seqs(rm, [seq, other], 0)[:1], torch.tensor([expected]))
    ref = {k: v.clone() for k, v in rm.reference.state_dict().items()}

    def loss_fn(m, batch, device):
        from crawl2chat.rm import _batch
        x, last = _batch([seq, other], 0, device)
        r = m.score(x, last)
        return bt_loss(r[:1], r[1:])[0], {"tokens": 2}
    tc = TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=1, eval_every=100, ckpt_every=100, dtype="fp32")
    train(rm, tc, tmp_path / "rm", lambda *_: None, tokens_per_micro=0, loss_fn=loss_fn)
    assert all(torch.equal(v, rm.reference.state_dict()[k]) for k, v in ref.items())
    assert not torch.equal(rm.value_head.weight, torch.zeros_like(rm.value_head.weight))
    loaded = load_reward_model(tmp_path / "rm")
    assert loaded.reference is not None and loaded.cfg.likelihood_weight == 2.0
    torch.testing.assert_close(score_seqs(loaded, [seq, other], 0), score_seqs(rm, [seq, other], 0))
