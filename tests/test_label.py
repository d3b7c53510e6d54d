"""`c2c label`: scripted answers, resuming, quitting, and a run against the smoke run's model."""
from __future__ import annotations

import io
import json
import subprocess
import sys

from rich.console import Console

from crawl2chat.label import label_loop, labelled_prompts
from crawl2chat.rubric import load_pairs

ITEMS = [{"prompt": f"p{i}", "a": f"reply a{i}", "b": f"reply b{i}"} for i in range(4)]


def scripted(answers):
    it = iter(answers)
    asked = []

    def ask(question):
        asked.append(question)
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return ask, asked


def quiet():
    return Console(file=io.StringIO(), width=100)


def test_answers_are_recorded_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "prefs.jsonl"
    ask, asked = scripted(["x", "2", "t", "s", "q"])
    counts = label_loop(ITEMS, out, ask=ask, console=quiet())
    assert len(asked) == 5  # "x" is asked again
    assert counts == {"chosen": 1, "tie": 1, "skipped": 1, "already": 0, "identical": 0, "quit": True}
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert rows == [{"prompt": "p0", "chosen": "reply b0", "rejected": "reply a0"},
                    {"prompt": "p1", "chosen": "reply a1", "rejected": "reply b1", "tie": True}]
    assert labelled_prompts(out) == {"p0", "p1"}
    ask, asked = scripted(["1", "1"])  # p2 was skipped: asked again; p3 too
    counts = label_loop(ITEMS, out, ask=ask, console=quiet())
    assert counts["already"] == 2 and counts["chosen"] == 2 and len(asked) == 2
    pairs = load_pairs(out)  # the tie is left out of training
    assert [p["prompt"][0]["content"] for p in pairs] == ["p0", "p2", "p3"]


def test_end_of_input_quits_and_identical_replies_are_not_asked(tmp_path):
    out = tmp_path / "prefs.jsonl"
    items = [{"prompt": "same", "a": "x", "b": "x"}] + ITEMS
    ask, asked = scripted(["1"])
    counts = label_loop(items, out, ask=ask, console=quiet())
    assert counts["identical"] == 1 and counts["chosen"] == 1 and counts["quit"] is True and len(asked) == 2
    assert labelled_prompts(out) == {"p0"}


def test_cmd_label_with_the_smoke_model(smoke_run, tmp_path, subprocess_env):
    out = tmp_path / "prefs.jsonl"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me a joke about a pelican.\n{\"prompt\": \"Who are you?\"}\nSay hello.\n")
    code = ("import argparse, sys; from crawl2chat.label import register_label; p = argparse.ArgumentParser(); "
            "s = p.add_subparsers(); register_label(s); a = p.parse_args(sys.argv[1:]); a.func(a)")
    args = ["label", "--run", str(smoke_run), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "8"]
    proc = subprocess.run([sys.executable, "-c", code, *args], input="1\n2\nq\n", capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Tell me a joke about a pelican." in proc.stdout and "Which reply is better?" in proc.stdout
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert 1 <= len(rows) <= 2 and rows[0]["prompt"] in ("Tell me a joke about a pelican.", "Who are you?")
    proc = subprocess.run([sys.executable, "-c", code, *args, "-n", "3"], input="s\ns\ns\n", capture_output=True,
                          text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    for r in rows:  # labelled prompts are not shown again
        assert f"│ {r['prompt']}" not in proc.stdout
