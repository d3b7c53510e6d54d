"""c2c chat (reply_stream, one shot, the interactive loop) and bench_generate, on a tiny random model."""
from __future__ import annotations

import argparse
import builtins
import subprocess
import sys

import pytest
import torch

from crawl2chat import chat
from crawl2chat.bench_generate import bench_generate
from crawl2chat.common import C2CError
from crawl2chat.model import GPT, GPTConfig
from crawl2chat.tokenizer import Tokenizer
from crawl2chat.train import load_model, save_model

LINES = ["the cat sat on the mat", "Alice works at the bakery in Paris", "what is two plus two? four",
         "the river flows north to the sea", "café, naïve, déjà vu — unicode text"] * 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A fake run directory: tokenizer/ and a random depth-1 model in sft/."""
    d = tmp_path_factory.mktemp("chat") / "run"
    tok = Tokenizer.train(LINES, 300)
    tok.save(d / "tokenizer")
    torch.manual_seed(0)
    save_model(GPT(GPTConfig.from_depth(1, tok.vocab_size, 64, aspect_ratio=32, head_dim=32)), d / "sft")
    return d


@pytest.fixture
def loaded(run_dir):
    return load_model(run_dir / "sft").eval(), Tokenizer.load(run_dir / "tokenizer")


def parse(*argv):
    parser = argparse.ArgumentParser(prog="c2c")
    chat.build_chat_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["chat", *map(str, argv)])


def feed(monkeypatch, *lines):
    """builtins.input answers with `lines`, then EOF; an exception instance in lines is raised."""
    it = iter(lines)

    def fake_input(prompt=""):
        x = next(it, EOFError())
        if isinstance(x, BaseException):
            raise x
        print(prompt + x)
        return x
    monkeypatch.setattr(builtins, "input", fake_input)


def user(text):
    return [{"role": "user", "content": text}]


def test_stream_pieces_make_the_reply(loaded):
    model, tok = loaded
    pieces = []
    reply = chat.reply_stream(model, tok, user("hello there"), temperature=1.0, top_k=None, max_tokens=30,
                              on_text=pieces.append, seed=0)
    assert reply and "".join(pieces) == reply
    again = chat.reply_stream(model, tok, user("hello there"), temperature=1.0, top_k=None, max_tokens=30,
                              on_text=lambda s: None, seed=0)
    assert again == reply  # seeded


def test_multibyte_char_is_not_split(loaded, monkeypatch):
    model, tok = loaded
    byte_id = {tok.id_to_piece(i): i for i in range(tok.vocab_size) if not tok.is_special(i)}
    ids = [byte_id[b"a"], byte_id[b"\xc3"], byte_id[b"\xa9"], tok.special_id("<|assistant_end|>")]

    def fake_generate(model, prompts, n, *, on_token, **kw):
        for t in ids:
            on_token(0, t)
        return [ids]
    monkeypatch.setattr(chat, "generate_batch", fake_generate)
    pieces = []
    assert chat.reply_stream(model, tok, user("hi"), temperature=0, top_k=None, max_tokens=8,
                             on_text=pieces.append) == "aé"
    assert pieces == ["a", "é"]


def test_long_prompt_is_cut_with_a_warning(loaded, capsys):
    model, tok = loaded
    reply = chat.reply_stream(model, tok, user("the river flows north " * 100), temperature=0, top_k=None,
                              max_tokens=8, on_text=lambda s: None)
    assert isinstance(reply, str)
    err = capsys.readouterr().err
    assert "prompt cut to the last" in err and len(err.strip().splitlines()) == 1


def test_stops_at_assistant_end(loaded):
    model, tok = loaded
    end = tok.special_id("<|assistant_end|>")
    head = torch.nn.Linear(model.cfg.n_embd, model.cfg.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[end] = 10.0
    model.lm_head = head  # the argmax is now always <|assistant_end|>
    pieces = []
    assert chat.reply_stream(model, tok, user("hi"), temperature=0, top_k=None, max_tokens=20,
                             on_text=pieces.append) == ""
    assert pieces == []


def test_one_shot(run_dir, capsys):
    chat.cmd_chat(parse("--out", run_dir, "-p", "hello", "--max-tokens", 8, "--seed", 0))
    out, err = capsys.readouterr()
    assert out.endswith("\n") and "you>" not in out and err == ""
    with pytest.raises(C2CError, match="the message is empty"):
        chat.cmd_chat(parse("--out", run_dir, "-p", "  "))


def test_abstain_threshold_option(run_dir):
    """--abstain-threshold sets the model's threshold; outside [0, 1], or on a model without an
    abstention threshold (the SFT model), it is an error that says so."""
    _, model, _ = chat.load_chat(parse("--out", run_dir, "--abstain-threshold", 0))
    assert model.cfg.abstain_threshold == 0.0
    with pytest.raises(C2CError, match="between 0 and 1"):
        chat.load_chat(parse("--out", run_dir, "--abstain-threshold", 1.5))
    with pytest.raises(C2CError, match="no abstention threshold"):
        chat.load_chat(parse("--out", run_dir, "--abstain-threshold", 0.7))


def test_model_folder_choice(run_dir, tmp_path, capsys):
    assert chat.find_model_dir(parse("--out", run_dir)) == run_dir / "sft"
    with pytest.raises(C2CError, match="no model to chat with"):
        chat.find_model_dir(parse("--out", tmp_path))
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").touch()
    assert chat.find_model_dir(parse("--out", tmp_path)) == tmp_path / "base"
    assert "warning" in capsys.readouterr().err


def test_interactive_reset(run_dir, monkeypatch, capsys):
    seen = []

    def fake_reply(model, tok, messages, *, on_text, **kw):
        seen.append([m["content"] for m in messages])
        on_text("ok")
        return "ok"
    monkeypatch.setattr(chat, "reply_stream", fake_reply)
    feed(monkeypatch, "hello", "", "again", "/reset", "hi", "/quit", "never read")
    chat.cmd_chat(parse("--out", run_dir))
    assert seen == [["hello"], ["hello", "ok", "again"], ["hi"]]
    out = capsys.readouterr().out
    assert "/reset to start over, /quit to leave" in out and chat.HINT in out and "bot> ok" in out


def test_ctrl_c_stops_one_reply(loaded, monkeypatch, capsys):
    model, tok = loaded
    real = chat.generate_batch
    calls = []

    def interrupted_once(model, prompts, n, *, on_token, **kw):
        calls.append(1)
        if len(calls) > 1:
            return real(model, prompts, n, on_token=on_token, **kw)

        got = []

        def tick(b, t):  # Ctrl-C arrives after three tokens
            on_token(b, t)
            got.append(t)
            if len(got) == 3:
                raise KeyboardInterrupt
        return real(model, prompts, n, on_token=tick, **kw)
    monkeypatch.setattr(chat, "generate_batch", interrupted_once)
    feed(monkeypatch, "hello", "again", KeyboardInterrupt())  # Ctrl-C at the prompt leaves cleanly
    history = chat.chat_loop(model, tok, "sft", temperature=1.0, top_k=None, max_tokens=8, seed=0)
    assert "[stopped]" in capsys.readouterr().out
    assert len(calls) == 2
    assert [m["content"] for m in history][:1] == ["again"]  # the stopped exchange was not kept


def test_interactive_subprocess(run_dir, subprocess_env):
    code = ("import sys; from crawl2chat import chat; p = __import__('argparse').ArgumentParser();"
            "chat.build_chat_parser(p.add_subparsers(dest='command'));"
            "chat.cmd_chat(p.parse_args(['chat', '--out', sys.argv[1], '--max-tokens', '6', '--seed', '0']))")
    p = subprocess.run([sys.executable, "-c", code, str(run_dir)], input="hello\n/reset\nhi\n",
                       capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("you> ") == 4 and "(history cleared)" in p.stdout and "bot> " in p.stdout


def test_bench_generate(loaded):
    model, tok = loaded
    r = bench_generate(model, tok, tok.encode("the cat sat on the mat")[:8], new_tokens=8)
    assert r["same_output"] is True and r["new_tokens"] == 8
    for b in ("batch1", "batch32"):
        e = r[b]
        assert e["ours"] > 0 and e["baseline"] > 0 and e["unit"] == "tok/s"
        assert e["ratio"] == pytest.approx(e["ours"] / e["baseline"])
    assert bench_generate(model, tok, [tok.bos_id] * 60, new_tokens=64)["new_tokens"] == 4  # capped


class Script:
    """Stands in for engine.sample_next: emits the scripted ids in order."""

    def __init__(self, ids):
        self.ids = list(ids)

    def __call__(self, logits, temperature, top_k, top_p, generator):
        return torch.tensor([self.ids.pop(0)])


def test_tool_calls_are_shown_and_kept(loaded, monkeypatch):
    from crawl2chat import engine
    model, tok = loaded
    sid = tok.special_id
    monkeypatch.setattr(engine, "sample_next", Script(
        [sid("<|search_start|>"), *tok.encode("the cat"), sid("<|search_end|>"), *tok.encode("on the mat"),
         sid("<|assistant_end|>")]))
    queries = []
    tools = {"search": lambda q: queries.append(q) or "the cat sat on the mat", "python": lambda c: "?"}
    pieces = []
    reply = chat.reply_stream(model, tok, user("where is the cat?"), temperature=0, top_k=None, max_tokens=30,
                              on_text=pieces.append, tools=tools)
    assert queries == ["the cat"]
    assert "".join(pieces) == "[search: the cat] [output: the cat sat on the mat] on the mat"
    assert reply == [{"type": "search", "text": "the cat"}, {"type": "output", "text": "the cat sat on the mat"},
                     {"type": "text", "text": "on the mat"}]


def test_tools_default_by_stage_and_explicit(run_dir, monkeypatch, capsys):
    seen = []

    def fake_reply(model, tok, messages, *, on_text, tools=None, **kw):
        seen.append(sorted(tools or {}))
        return "ok"
    monkeypatch.setattr(chat, "reply_stream", fake_reply)
    chat.cmd_chat(parse("--out", run_dir, "-p", "hi"))  # an sft model: not trained on tools
    chat.cmd_chat(parse("--out", run_dir, "-p", "hi", "--tools"))  # no search index: Python only
    assert seen == [[], ["python"]]
    assert "no search index" in capsys.readouterr().err
    parts = [{"type": "python", "text": "1+1"}, {"type": "output", "text": "2"}, {"type": "text", "text": "2"}]
    monkeypatch.setattr(chat, "reply_stream", lambda *a, **kw: parts)
    feed(monkeypatch, "what is 1+1?")
    history = chat.chat_loop(*(load_model(run_dir / "sft"), Tokenizer.load(run_dir / "tokenizer")), "sft",
                             tools={"python": None})
    assert history[-1] == {"role": "assistant", "content": parts}  # the calls stay in the history
