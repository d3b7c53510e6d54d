import contextlib
import io
import json
import re

import pytest

from crawl2chat import cli
from crawl2chat.engine import generate
from crawl2chat.tokenizer import Tokenizer
from crawl2chat.train import load_model

STAGES = ["world", "data", "index", "tokenizer", "tokenize", "pretrain", "sft", "idk", "rl", "rm", "rlhf"]


def subcommands() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return list(sub.choices)


def test_help(c2c):
    top = c2c("--help")
    assert top.returncode == 0 and top.stderr == ""
    assert top.stdout.startswith("usage: c2c")
    names = subcommands()
    assert set(STAGES + ["run", "sample", "show-tokens", "bench"]) <= set(names)
    for name in names:  # in-process: one interpreter start is enough to prove the entry point works
        assert name in top.stdout
        out = io.StringIO()
        with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(out):
            cli.build_parser().parse_args([name, "--help"])
        assert e.value.code == 0, name
        assert out.getvalue().startswith(f"usage: c2c {name}"), out.getvalue()[:200]


def test_no_command_is_a_usage_error(c2c):
    p = c2c()
    assert p.returncode == 2 and "usage: c2c" in p.stderr and "Traceback" not in p.stderr


def test_report(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    assert list(report) == STAGES
    for name in STAGES:
        assert isinstance(report[name]["wall_s"], (int, float)) and report[name]["wall_s"] >= 0
        assert "fingerprint" not in report[name]
    pre = report["pretrain"]
    assert 0 < pre["val_bpb"] < 20 and pre["steps"] == 30
    for key in ("fact_recall_seen", "fact_recall_unseen"):
        assert 0.0 <= pre[key] <= 1.0
    assert report["tokenizer"]["vocab_size"] == 512
    sft = report["sft"]
    assert sft["steps"] == 10 and 0 < sft["val_loss"] < 20
    for key in ("fact_qa_acc", "arith_acc", "end_token_rate"):
        assert 0.0 <= sft[key] <= 1.0
    assert 0.0 <= sft["pack_padding_share"] < 0.5 and sft["pack_trained_tokens"] > 0
    assert (smoke_run / "sft" / "model.safetensors").is_file()
    assert report["tokenize"]["train_tokens"] > 0
    assert (smoke_run / "base" / "model.safetensors").is_file()
    assert json.loads((smoke_run / "config.json").read_text())["preset"] == "smoke"


def mtimes(run, *rel):
    return {r: (run / r).stat().st_mtime_ns for r in rel}


def test_rerun_skips_then_reruns_only_pretrain(smoke_run, copy_run, c2c, capsys, metrics_rows):
    run = copy_run(smoke_run)
    files = ["world/corpus.jsonl", "tokenizer/tokenizer.json", "tokens/train_000000.bin", "base/model.safetensors"]
    before = mtimes(run, *files)

    again = c2c("run", "--preset", "smoke", "--out", run)
    assert again.returncode == 0, again.stderr
    out = again.stdout + again.stderr
    for name in STAGES:
        assert f"{name}: complete, skipped" in out, out
    assert out.count("skipped") == len(STAGES)
    assert mtimes(run, *files) == before

    capsys.readouterr()
    cli.main(["run", "--preset", "smoke", "--out", str(run), "--set", "pretrain.steps=31"])
    out = "".join(capsys.readouterr())
    for name in ("world", "tokenizer", "tokenize"):
        assert f"{name}: complete, skipped" in out
    assert "pretrain: complete, skipped" not in out
    after = mtimes(run, *files)
    assert {k: after[k] for k in files[:3]} == {k: before[k] for k in files[:3]}
    assert after["base/model.safetensors"] != before["base/model.safetensors"]
    assert [r["step"] for r in metrics_rows(run / "base" / "metrics.jsonl")] == list(range(1, 32))
    assert json.loads((run / "report.json").read_text())["pretrain"]["steps"] == 31
    assert json.loads((run / "config.json").read_text())["pretrain"]["steps"] == 31


@pytest.mark.parametrize("how", ["empty", "missing"])
def test_error_corpus(smoke_run, copy_run, c2c, assert_one_line_error, how):
    run = copy_run(smoke_run)
    corpus = run / "data" / "corpus.jsonl"
    if how == "empty":
        corpus.write_text("")
    else:
        corpus.unlink()
    before = (run / "tokenizer" / "tokenizer.json").read_bytes()
    msg = assert_one_line_error(c2c("tokenizer", "--out", run, "--force"), str(corpus))
    assert ("empty" if how == "empty" else "not found") in msg
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == before  # the old tokenizer is left alone


def test_error_corrupt_tokenizer(smoke_run, copy_run, c2c, assert_one_line_error):
    run = copy_run(smoke_run)
    tj = run / "tokenizer" / "tokenizer.json"
    tj.write_text(tj.read_text()[:500])
    assert_one_line_error(c2c("tokenize", "--out", run, "--force"), str(tj), "not a valid tokenizer")


def test_error_truncated_shard(smoke_run, copy_run, c2c, assert_one_line_error):
    run = copy_run(smoke_run)
    shard = run / "tokens" / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert_one_line_error(c2c("pretrain", "--out", run, "--force"), str(shard), "does not match its header")


def test_error_unknown_preset(tmp_path, c2c, assert_one_line_error):
    assert_one_line_error(c2c("run", "--preset", "huge", "--out", tmp_path / "r"), "unknown preset 'huge'", "smoke")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("item, needle", [
    ("pretrain.nope=1", "no field 'nope'"),
    ("nosection.steps=1", "no config section 'nosection'"),
    ("pretrain.steps=many", "'many' is not a valid int"),
    ("pretrain.steps", "expects section.field=value"),
])
def test_error_bad_set(tmp_path, c2c, assert_one_line_error, item, needle):
    assert_one_line_error(c2c("world", "--preset", "smoke", "--out", tmp_path / "r", "--set", item), needle)
    assert not (tmp_path / "r").exists()


def test_sample(smoke_run, c2c):
    p = c2c("sample", "--out", smoke_run, "--prompt", "X", "--max-tokens", "5", "--temperature", "0")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("X")
    # the same greedy continuation, computed here
    tok = Tokenizer.load(smoke_run / "tokenizer")
    model = load_model(smoke_run / "base").eval()
    ids = generate(model, [[tok.bos_id] + tok.encode("X")], 5, temperature=0.0, stop_ids=[tok.bos_id])[0]
    assert 1 <= len(ids) <= 5
    assert p.stdout == "X" + tok.decode([t for t in ids if t != tok.bos_id]) + "\n"


def test_sample_without_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--out", str(tmp_path), "--prompt", "X"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("c2c: error: ") and err.count("\n") == 1
    assert str(tmp_path / "base" / "model.safetensors") in err and "no model" in err


def test_show_tokens(smoke_run, c2c):
    p = c2c("show-tokens", "hello world", "--out", smoke_run)
    assert p.returncode == 0, p.stderr
    expected = Tokenizer.load(smoke_run / "tokenizer").encode("hello world")
    m = re.search(r"ids: (\[[0-9, ]*\])", p.stdout)
    assert m and json.loads(m.group(1)) == expected
    assert "hello" in p.stdout and f"{len(expected)} tokens, 11 bytes" in p.stdout


def test_doctor_reports_the_sandbox(c2c):
    r = c2c("doctor")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["torch"] and isinstance(info["cuda_devices"], list)
    assert set(info["sandbox"]) >= {"network_isolation", "filesystem_jail", "rlimits"}
