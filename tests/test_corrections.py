import json

import pytest

from crawl2chat import cli, world
from crawl2chat.common import C2CError
from crawl2chat.corrections import load_corrections


def test_oracle_review_then_sft_on_corrections(smoke_run, copy_run, capsys):
    run = copy_run(smoke_run)
    cli.main(["correct", "--out", str(run), "--oracle"])
    stats = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in (run / "sft" / "review.jsonl").read_text().splitlines()]
    w = world.load_world(run / "world")
    assert stats["reviewed"] == len(rows) == len(w["splits"]["known_a"]) * len(world.ATTRIBUTES)
    people = {p["name"]: p for p in w["people"]}
    for row in rows:
        assert set(row) == {"prompt", "model_answer", "corrected", "answer"}  # the oracle's answer is shown
        if row["corrected"]:
            assert row["answer"] in row["corrected"]  # the oracle's sentence states the ground truth about the person asked
            name = next(n for n in w["splits"]["known_a"] if n in row["prompt"])
            assert name in row["corrected"]
            assert any(people[name][a] in row["corrected"] for a in world.ATTRIBUTES)
    assert stats["corrected"] == stats["wrong"] == sum(bool(r["corrected"]) for r in rows)

    before = json.loads((run / "sft" / "metrics.json").read_text())["pack_conversations"]
    cli.main(["sft", "--out", str(run), "--corrections", str(run / "sft" / "review.jsonl")])
    after = json.loads((run / "sft" / "metrics.json").read_text())["pack_conversations"]
    assert after > before  # the corrections joined the training mix


def test_default_run_applies_one_oracle_round(smoke_run):
    """c2c run's SFT reviews half-A answers, corrects the wrong ones and trains on: the effect is reported."""
    sft = json.loads((smoke_run / "sft" / "metrics.json").read_text())
    w = world.load_world(smoke_run / "world")
    rows = [json.loads(line) for line in (smoke_run / "sft" / "review.jsonl").read_text().splitlines()]
    assert sft["corrections_reviewed"] == len(rows) == len(w["splits"]["known_a"]) * len(world.ATTRIBUTES)
    assert sft["corrections_wrong"] == sum(bool(r["corrected"]) for r in rows)
    assert 0 <= sft["fact_qa_acc_before_corrections"] <= 1 and 0 <= sft["fact_qa_acc"] <= 1
    assert sft["corrections_wrong"] > 0  # the smoke model is wrong often enough to need a round
    steps = [json.loads(line)["step"] for line in (smoke_run / "sft" / "corrections" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == sft["corrections_steps"] > 0
    # one pass over the corrections and their replay, capped by correction_steps
    cfg = json.loads((smoke_run / "config.json").read_text())
    batch = cfg["sft"]["batch_size"]
    assert sft["corrections_steps"] == min(cfg["chat_data"]["correction_steps"], -(-sft["corrections_rows"] // batch))
    assert 0 <= sft["corrections_fixed"] <= 1


def test_corrections_file_errors(tmp_path):
    f = tmp_path / "review.jsonl"
    f.write_text('{"prompt": "hi", "model_answer": "x", "corrected": "Hello!"}\n'
                 '{"prompt": "ok", "model_answer": "y", "corrected": ""}\n')
    assert load_corrections(f) == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]]
    for bad, reason in [('{"prompt": "hi"}', "corrected"), ("not json", "JSON"),
                        ('{"prompt": " ", "corrected": "fine"}', "empty")]:
        f.write_text('{"prompt": "a", "corrected": "b"}\n' + bad + "\n")
        with pytest.raises(C2CError, match=rf"review.jsonl:2: .*{reason}"):
            load_corrections(f)
