"""c2c export --format hf: the Qwen3 checkpoint loads in transformers offline and behaves like our model
(logits, greedy generation, chat template ids)."""
from __future__ import annotations

import argparse
import json
import math
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # everything below reads local folders only (set before transformers loads)
import transformers  # noqa: E402

from crawl2chat.chat_template import render  # noqa: E402
from crawl2chat.common import C2CError  # noqa: E402
from crawl2chat.engine import generate  # noqa: E402
from crawl2chat.export import export_hf, register  # noqa: E402
from crawl2chat.model import GPT, GPTConfig  # noqa: E402
from crawl2chat.tokenizer import Tokenizer  # noqa: E402
from crawl2chat.train import load_model, save_model  # noqa: E402

LINES = ["the cat sat on the mat", "Alice works at the bakery in Paris", "what is two plus two? four",
         "the river flows north to the sea", "café, naïve, déjà vu — unicode text", "x = 12345 * 678"] * 20
# Width (64) differs from heads × head_dim (4 × 8), and theta/eps are not the defaults: each must map.
CFG = dict(depth=2, n_embd=64, n_head=4, head_dim=8, mlp_hidden=96, seq_len=64, rope_theta=5000.0, norm_eps=1e-5)
END = 6  # <|assistant_end|>

CONVERSATIONS = [
    [{"role": "user", "content": "hello there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "what is two plus two?"}],
    [{"role": "user", "content": "who is Alice?"}, {"role": "assistant", "content": "She works at the bakery."},
     {"role": "user", "content": "where?\n In Paris"}],
    [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "12345 * 678?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                       {"type": "python", "text": "12345 * 678"},
                                       {"type": "output", "text": "8369910"},
                                       {"type": "text", "text": "It is 8369910."}]},
     {"role": "user", "content": "and the river?"},
     {"role": "assistant", "content": [{"type": "search", "text": "river flows"}, {"type": "output", "text": "north"},
                                       {"type": "text", "text": "north"}]}],
]


def sharpen(model: GPT, seed: int) -> GPT:
    """Every weight random and nonzero (std ~1/sqrt(fan-in)), logits far apart: argmax is never a near-tie."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 1.0 / math.sqrt(p.shape[-1]) if p is not model.embed.weight else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * std)
        model.lm_head.weight.mul_(4.0)
    return model.eval()


def swap_tokens(model: GPT, a: int, b: int) -> None:
    """Relabel token ids a ↔ b (embedding and output rows): the same model under other names."""
    with torch.no_grad():
        for w in (model.embed.weight, model.lm_head.weight):
            w[[a, b]] = w[[b, a]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    tok = Tokenizer.train(LINES, 300)
    tok.save(d / "tokenizer")
    torch.manual_seed(0)
    model = sharpen(GPT(GPTConfig(vocab_size=tok.vocab_size, **CFG)), seed=1)
    # Make greedy replies end: relabel ids so that the token our model produces 4th for the first prompt
    # becomes <|assistant_end|> (a random model would otherwise never stop).
    prompt = render(tok, CONVERSATIONS[0], add_generation_prompt=True)[0]
    out = generate(model, [prompt], 8, temperature=0.0)[0]
    t = next(x for i, x in enumerate(out) if i >= 3 and x not in prompt + out[:i] and x != END)
    swap_tokens(model, t, END)
    save_model(model, d / "sft")
    summary = export_hf(d / "sft", d / "tokenizer", d / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(d / "hf", local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(d / "hf", local_files_only=True)
    return dict(dir=d, tok=tok, model=load_model(d / "sft").eval(), summary=summary, hf_model=hf_model, hf_tok=hf_tok)


def test_files_and_config(exported):
    d, s = exported["dir"] / "hf", exported["summary"]
    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "README.md"):
        assert (d / f).is_file() and f in s["files"], f
    model = exported["model"]
    assert s["params"] == model.num_params() and s["architecture"] == "Qwen3ForCausalLM"
    c = exported["hf_model"].config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.max_position_embeddings, c.vocab_size) == (64, 2, 4, 4, 8, 96, 64, 300)
    assert c.rms_norm_eps == 1e-5 and not c.tie_word_embeddings and not c.attention_bias
    assert json.loads((d / "config.json").read_text())["rope_theta"] == 5000.0
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (0, END, 13)
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == END and gen["bos_token_id"] == 0
    ht = exported["hf_tok"]
    assert (ht.bos_token, ht.eos_token, ht.pad_token) == ("<|bos|>", "<|assistant_end|>", "<|pad|>")
    # Our extra weights are exactly Qwen3's norms; HF found nothing missing or unexpected.
    hf_params = sum(p.numel() for p in exported["hf_model"].parameters())
    assert hf_params == model.num_params() + 2 * 2 * (64 + 8) + 64


def test_logits_match(exported):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for T in (64, 17, 1):
            x = torch.randint(0, 300, (4, T), generator=g)
            ours, theirs = exported["model"](x), exported["hf_model"](x).logits
            assert ours.shape == theirs.shape == (4, T, 300)
            assert (ours - theirs).abs().max().item() <= 1e-4
            assert ours.std() > 1.0  # not a trivially flat model


def test_greedy_generation_matches(exported):
    tok, model, hf_model = exported["tok"], exported["model"], exported["hf_model"]
    stopped = 0
    for conv in CONVERSATIONS[:3]:
        prompt = render(tok, conv, add_generation_prompt=True)[0]
        n = 64 - len(prompt)
        ours = generate(model, [prompt], n, temperature=0.0, stop_ids=[END])[0]
        out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                do_sample=False, max_new_tokens=n)
        theirs = out[0, len(prompt):].tolist()
        assert ours == theirs, (conv, ours, theirs)
        assert len(ours) >= 4
        stopped += ours[-1] == END and len(ours) < n
    assert stopped >= 1  # at least one reply ended at <|assistant_end|> (the first, by construction)


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["user", "system", "multi-turn", "tool-parts"])
def test_chat_template_ids(exported, conv):
    tok, ht = exported["tok"], exported["hf_tok"]
    gen_prompts = (False, True) if conv[-1]["role"] == "user" else (False,)
    for add in gen_prompts:
        r = ht.apply_chat_template(conv, tokenize=True, add_generation_prompt=add)
        ids = list(r["input_ids"] if hasattr(r, "keys") else r)
        assert ids == render(tok, conv, add_generation_prompt=add)[0]
    assert ht.decode(ids, skip_special_tokens=False) == tok.decode(ids)


def test_bf16_export(exported, tmp_path):
    d = exported["dir"]
    s = export_hf(d / "sft", d / "tokenizer", tmp_path / "bf16", dtype="bf16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", local_files_only=True)
    assert s["dtype"] == "bf16" and next(hf.parameters()).dtype == torch.bfloat16
    fp32 = exported["hf_model"].model.embed_tokens.weight
    assert torch.equal(hf.model.embed_tokens.weight, fp32.to(torch.bfloat16))


def test_bad_model_dir(tmp_path, exported):
    with pytest.raises(C2CError) as e:
        export_hf(tmp_path / "nope", exported["dir"] / "tokenizer", tmp_path / "out")
    assert "nope" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "bad" / "config.json").write_text(json.dumps(exported["model"].cfg.to_dict()))
    with pytest.raises(C2CError) as e:
        export_hf(tmp_path / "bad", exported["dir"] / "tokenizer", tmp_path / "out")
    assert "bad/model.safetensors" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_defaults(exported, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "base").mkdir(parents=True)
    for name in ("tokenizer", "sft"):
        (run / name).symlink_to(exported["dir"] / name)
    save_model(GPT(GPTConfig(vocab_size=300, **CFG)), run / "base")
    parser = argparse.ArgumentParser(prog="c2c")
    register(parser.add_subparsers(dest="command", required=True))
    from crawl2chat.export import cmd_export
    s = cmd_export(parser.parse_args(["export", "--out", str(run)]))
    assert s["source"] == str(run / "sft")  # the latest stage present, not base
    assert (run / "export" / "sft-hf" / "model.safetensors").is_file()
    assert json.loads(capsys.readouterr().out)["params"] == s["params"]
    with pytest.raises(C2CError, match="no model to export"):
        cmd_export(parser.parse_args(["export", "--out", str(tmp_path / "empty")]))


def test_bench_generate_hf_baseline(exported):
    from crawl2chat.bench_generate import BASELINE_IS, bench_generate
    prompt = render(exported["tok"], CONVERSATIONS[1], add_generation_prompt=True)[0]
    r = bench_generate(exported["model"], None, prompt, new_tokens=4, repeats=1)
    assert r["baseline_is"] == BASELINE_IS and r["unit"] == "tok/s" and r["new_tokens"] == 4
    for b in ("batch1", "batch32"):
        e = r[b]
        assert e["same_output"] is True and e["no_cache"]["same_output"] is True, e
        assert e["ours"] > 0 and e["baseline"] > 0 and e["ratio"] == pytest.approx(e["ours"] / e["baseline"])
    assert r["ratio"] == r["batch1"]["ratio"] and r["same_output"] is True


@pytest.mark.parametrize("frozen", [False, True])
def test_surprisal_input_is_left_out_and_said(exported, tmp_path, frozen):
    """A model that reads its own surprisal (or a frozen copy's) exports as the plain Qwen3 it is on
    text without user messages; the export says what it left out."""
    d, tok = exported["dir"], exported["tok"]
    model = exported["model"].with_surprisal_input(tok.special_id("<|user_start|>"), tok.special_id("<|user_end|>"),
                                                   frozen=frozen)
    torch.nn.init.normal_(model.surprisal_in.weight)
    save_model(model, tmp_path / "idk")
    summary = export_hf(tmp_path / "idk", d / "tokenizer", tmp_path / "hf")
    assert summary["surprisal_input_dropped"] and not exported["summary"]["surprisal_input_dropped"]
    assert "surprisal" in (tmp_path / "hf" / "README.md").read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    plain = tok.encode("the cat sat on the mat")
    user = render(tok, CONVERSATIONS[0], add_generation_prompt=True)[0]
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([plain])).logits, model(torch.tensor([plain])), atol=1e-4, rtol=0)
        assert not torch.allclose(hf(torch.tensor([user])).logits, model(torch.tensor([user])), atol=1e-3)


def test_abstention_threshold_is_said(exported, tmp_path):
    """The threshold lives in crawl2chat's decoding, not in the weights: the export keeps the weights
    and says in the summary and the model card what transformers will not do."""
    import dataclasses
    d, tok = exported["dir"], exported["tok"]
    cfg = dataclasses.replace(exported["model"].cfg, reply_open=tok.special_id("<|assistant_start|>"),
                              abstain_ids=[5], abstain_threshold=0.75)
    model = type(exported["model"])(cfg)
    model.load_state_dict(exported["model"].state_dict())
    save_model(model, tmp_path / "idk")
    summary = export_hf(tmp_path / "idk", d / "tokenizer", tmp_path / "hf")
    assert summary["abstain_threshold_dropped"] == 0.75 and not exported["summary"]["abstain_threshold_dropped"]
    assert "abstention threshold (0.750" in (tmp_path / "hf" / "README.md").read_text()
