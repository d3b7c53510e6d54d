"""The hidden rubric, open-ended prompts and reference replies, and preference files (TRL JSONL, HH-RLHF)."""
from __future__ import annotations

import json
import random

import pytest

from crawl2chat import rubric
from crawl2chat.chat_template import validate_messages
from crawl2chat.common import C2CError, shared_data
from crawl2chat.config import WorldConfig
from crawl2chat.conversations import open_ended_conversations
from crawl2chat.world import build_world


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(n_known=20, n_search_only=4, n_unknown=4, n_towns=8, n_companies=8,
                                   n_math_pages=2, n_problems_train=4, n_problems_test=2, n_bignum_train=2,
                                   n_bignum_test=2))


def _person_prompt(world, kind="about"):
    return next(p for p in rubric.open_prompts(world, seed=0) if p["meta"]["kind"] == kind)


def test_prompts_cover_every_kind_and_only_known_a_people(world):
    prompts = rubric.open_prompts(world, seed=0)
    kinds = {p["meta"]["kind"] for p in prompts}
    assert kinds == {"intro", "birthday", "about", "town", "company", "joke"}
    people = {p["meta"]["name"] for p in prompts if p["meta"]["kind"] in ("intro", "birthday", "about")}
    assert people == set(world["splits"]["known_a"])
    assert all(p["meta"]["name"] in p["prompt"] for p in prompts if p["meta"]["kind"] != "joke")
    train, held = rubric.split_prompts(prompts, 10)
    assert 9 <= len(held) <= 12 and not {p["meta"]["name"] for p in held} & {p["meta"]["name"] for p in train}


def test_right_facts_beat_wrong_facts(world):
    p = _person_prompt(world)
    m, f = p["meta"], p["meta"]["facts"]
    other_town = next(t["name"] for t in world["towns"] if t["name"] != f["home_town"]
                      and t["name"] not in f["university"])
    wrong_year = str(int(f["birth_year"]) + 3)
    right = f"{m['name']} was born in {f['birth_year']} and comes from {f['home_town']}. I hope that helps!"
    wrong = f"{m['name']} was born in {wrong_year} and comes from {other_town}. I hope that helps!"
    assert rubric.fact_counts(m, right) == (2, 0)
    assert rubric.fact_counts(m, wrong) == (0, 2)
    assert rubric.score(m, right) > rubric.score(m, wrong) + 0.3


def test_repetition_rambling_off_topic_and_no_ending_are_penalised(world):
    p = _person_prompt(world, "intro")
    m = p["meta"]
    good = rubric.reference_reply(m, random.Random(0))
    assert rubric.score(m, good) >= 0.8
    assert rubric.repetition(good) < 0.1
    repeated = " ".join([good] * 3)
    assert rubric.repetition(repeated) > 0.5
    assert rubric.score(m, repeated) < rubric.score(m, good) - 0.3
    ramble = good + " " + " ".join(f"word{i}" for i in range(80))
    assert rubric.score(m, ramble) < rubric.score(m, good) - 0.2
    off_topic = "Dear colleague, I am glad to write to you today. I hope you enjoy working together!"
    assert rubric.score(m, off_topic) < rubric.score(m, good) - 0.3
    assert rubric.score(m, good, ended=False) < rubric.score(m, good)
    assert rubric.score(m, good + " You are an idiot.") < rubric.score(m, good)
    assert 0.0 <= rubric.score(m, "") <= rubric.score(m, good) <= 1.0


def test_fact_credit_saturates_so_a_fact_sheet_gains_nothing(world):
    m = _person_prompt(world)["meta"]
    f, name = m["facts"], m["name"]
    three = f"{name} was born in {f['birth_year']}, comes from {f['home_town']} and works for {f['employer']}."
    five = three + f" {name} studied at {f['university']} and works as {f['occupation']}."
    assert rubric.fact_counts(m, five)[0] == 5
    assert rubric.score(m, five) <= rubric.score(m, three)


def test_label_noise_flips_about_the_requested_share(world):
    m = _person_prompt(world)["meta"]
    good, bad = rubric.reference_reply(m, random.Random(0)), "no."
    rng = random.Random(0)
    labels = [rubric.label_pair(m, good, bad, rng, noise=0.1) for _ in range(2000)]
    flipped = sum(labels) / len(labels)
    assert 0.07 < flipped < 0.13
    assert rubric.label_pair(m, good, good, rng, noise=0.5) is None


def test_open_ended_conversations_are_valid_and_score_high(world):
    convs = open_ended_conversations(world, seed=0)
    assert len(convs) == len(rubric.open_prompts(world, seed=0))
    metas = {p["prompt"]: p["meta"] for p in rubric.open_prompts(world, seed=0)}
    for c in convs:
        validate_messages(c)
        assert c[0]["role"] == "user" and c[1]["role"] == "assistant"
        assert rubric.score(metas[c[0]["content"]], c[1]["content"]) >= 0.8
    assert open_ended_conversations(world, seed=0, n=5) == convs[:5]


def _write(tmp_path, lines):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_preference_files_in_trl_formats(tmp_path):
    conv = [{"role": "user", "content": "Hi"}]
    path = _write(tmp_path, [
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},
        {"prompt": conv, "chosen": [{"role": "assistant", "content": "Hello"}],
         "rejected": [{"role": "assistant", "content": "Go away"}]},
        {"chosen": conv + [{"role": "assistant", "content": "Hello"}],
         "rejected": conv + [{"role": "assistant", "content": "Meh"}]},  # implicit prompt
        {"prompt": "x", "chosen": "a", "rejected": "b", "tie": True},
    ])
    pairs = rubric.load_pairs(path)
    assert len(pairs) == 3
    assert pairs[0] == {"prompt": [{"role": "user", "content": "Say hi"}], "chosen": "Hi!", "rejected": "No."}
    assert pairs[2]["prompt"] == conv and pairs[2]["rejected"] == "Meh"


@pytest.mark.parametrize("bad, needle", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "same reply"),
    ({"prompt": "p", "chosen": "a"}, 'missing "rejected"'),
    ({"chosen": "a", "rejected": "b"}, 'missing "prompt"'),
    ("{not json", "not valid JSON"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, '"chosen" must be'),
])
def test_bad_preference_lines_name_the_file_and_line(tmp_path, bad, needle):
    path = _write(tmp_path, [{"prompt": "ok", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(C2CError) as e:
        rubric.load_pairs(path)
    msg = str(e.value)
    assert f"{path}:2:" in msg and needle in msg and "\n" not in msg


def test_hh_rlhf_transcripts():
    path = shared_data("preference/hh-rlhf/harmless-base-test.jsonl.gz")
    assert path is not None, "shared data set missing"
    pairs = rubric.load_hh(path, limit=50)
    assert len(pairs) == 50
    for p in pairs:
        validate_messages(p["prompt"])
        assert p["prompt"][-1]["role"] == "user" and p["chosen"] != p["rejected"]
    msgs = rubric.hh_messages("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye", "x")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"] and msgs[1]["content"] == "hello"
    with pytest.raises(C2CError, match="x: not a Human/Assistant transcript"):
        rubric.hh_messages("just text", "x")
