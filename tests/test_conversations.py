"""SFT conversations: made from the world (kinds, splits, phrasings), chat JSONL and OpenAssistant files."""
import json
import re
from pathlib import Path

import pytest

from crawl2chat import config, world as W
from crawl2chat.chat_template import validate_messages
from crawl2chat.common import C2CError
from crawl2chat.conversations import (ASSISTANT_NAME, FACT_QUESTIONS, FOLLOW_UPS, fact_answer, fact_questions,
                                      load_chat_jsonl, load_conversations, load_oasst_trees, save_conversations,
                                      world_conversations)

OASST = Path(__file__).resolve().parents[2] / "shared/data/chat/oasst/en_100_tree.jsonl"


@pytest.fixture(scope="module")
def world():
    return W.build_world(config.get_preset("smoke").world)


@pytest.fixture(scope="module")
def convs(world):
    return world_conversations(world, seed=0, n_smalltalk=60, n_identity=40)


def _text(conv):
    return "\n".join(m["content"] for m in conv)


def _people(world, split):
    return [p for p in world["people"] if p["split"] == split]


def test_deterministic_and_valid(world, convs):
    assert world_conversations(world, seed=0, n_smalltalk=60, n_identity=40) == convs
    assert world_conversations(world, seed=1, n_smalltalk=60, n_identity=40) != convs
    for i, conv in enumerate(convs):
        validate_messages(conv, where=f"conversation {i}")
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in conv)
    n_facts = len(world["splits"]["known_a"]) * (len(W.ATTRIBUTES) + 1)
    assert len(convs) == 60 + 40 + n_facts + len(world["problems"]["train"])
    assert len(world_conversations(world, n_smalltalk=0, n_identity=0, n_math=5)) == n_facts + 5


def test_only_known_a_people(world, convs):
    text = "\n".join(_text(c) for c in convs)
    for split in ("known_b", "search_only", "unknown"):
        for p in _people(world, split):
            assert p["name"] not in text, (split, p["name"])
    for p in _people(world, "known_a"):
        assert p["name"] in text


def test_fact_answer(world):
    for p in world["people"]:
        for attr in W.ATTRIBUTES:
            ans = fact_answer(p, attr)
            assert p["name"] in ans and f" {p[attr]}." in ans
            assert ans == W.TRAIN_TEMPLATES[0][attr][0].replace("{name}", p["name"]).replace("{value}", p[attr])


def _bio_prefixes():
    sentences = [v for t in W.TRAIN_TEMPLATES for opts in t.values() for v in opts]
    sentences += list(W.HELDOUT_TEMPLATE.values())
    return {s.split(" {value}")[0] for s in sentences}


def test_fact_phrasings_are_new_and_varied(world, convs):
    questions = {q for qs in W.QUESTIONS.values() for q in qs}
    prefixes = _bio_prefixes()
    for attr, pool in FACT_QUESTIONS.items():
        assert len(set(pool)) >= 4
        for q in pool + FOLLOW_UPS[attr]:
            assert q not in questions and not any(q.startswith(pre) for pre in prefixes), q
    # in the generated conversations: every attribute asked (single-turn) in >= 4 name-free phrasings
    used = {attr: set() for attr in W.ATTRIBUTES}
    people = {p["name"]: p for p in _people(world, "known_a")}
    for conv in convs:
        for name, p in people.items():
            if name in conv[0]["content"]:
                attr = next(a for a in W.ATTRIBUTES if conv[1]["content"] == fact_answer(p, a))
                phrasing = conv[0]["content"].replace(name, "{name}")
                assert phrasing in FACT_QUESTIONS[attr]
                used[attr].add(phrasing)
    assert all(len(v) >= 4 for v in used.values()), used
    for conv in convs:
        for m in conv:
            if m["role"] == "user":
                assert m["content"] not in {q.replace("{name}", n) for q in questions for n in people}


def test_every_fact_of_known_a_is_taught(world, convs):
    answers = {m["content"] for c in convs for m in c if m["role"] == "assistant"}
    for p in _people(world, "known_a"):
        for attr in W.ATTRIBUTES:
            assert fact_answer(p, attr) in answers


def test_multi_turn_follow_ups(world, convs):
    people = {p["name"]: p for p in _people(world, "known_a")}
    multi = [c for c in convs if len(c) >= 4 and any(n in c[0]["content"] for n in people)]
    assert len(multi) == len(people)
    for conv in multi:
        p = next(p for n, p in people.items() if n in conv[0]["content"])
        pron, poss = ("she", "her") if p["gender"] == "f" else ("he", "his")
        assert 2 <= len(conv) // 2 <= 3
        for q, a in zip(conv[2::2], conv[3::2]):
            assert p["name"] not in q["content"]
            assert re.search(rf"\b({pron}|{poss})\b", q["content"]), q
            assert p["name"] in a["content"] and a["content"] in {fact_answer(p, x) for x in W.ATTRIBUTES}


def test_smalltalk_identity_math(world, convs):
    problems = {pb["question"]: pb for pb in world["problems"]["train"]}
    math = [c for c in convs if c[0]["content"] in problems]
    assert len(math) == len(problems)
    for conv in math:
        pb = problems[conv[0]["content"]]
        assert conv[1]["content"] == pb["solution"]
        assert conv[1]["content"].endswith(f"The answer is {pb['answer']}.")
    identity = [c for c in convs if any(ASSISTANT_NAME in m["content"] for m in c)]
    assert len(identity) == 40
    assert all("crawl2chat" in _text(c) for c in identity)
    assert any("I am c2c, a small assistant trained with crawl2chat" in _text(c) for c in identity)
    assert len({c[-2]["content"] for c in identity}) >= 10  # many user phrasings
    smalltalk = [c for c in convs if c[0]["content"] not in problems and c not in identity
                 and not any(n in _text(c) for n in world["splits"]["known_a"])]
    assert len(smalltalk) == 60
    assert len({c[0]["content"] for c in smalltalk}) >= 20
    assert all(len(m["content"]) < 120 for c in smalltalk for m in c)


def test_fact_questions(world):
    names = world["splits"]["known_b"]
    qs = fact_questions(world, names)
    assert qs == fact_questions(world, names) and len(qs) == len(names) * len(W.ATTRIBUTES)
    people = {p["name"]: p for p in world["people"]}
    for q in qs:
        assert q["name"] in q["question"] and q["answer"] == people[q["name"]][q["attribute"]]
        assert q["question"].replace(q["name"], "{name}") in FACT_QUESTIONS[q["attribute"]]
    with pytest.raises(C2CError, match="unknown person"):
        fact_questions(world, ["Nobody Atall"])


def test_save_load_round_trip(tmp_path, convs):
    path = tmp_path / "chat.jsonl"
    save_conversations(path, convs)
    assert load_conversations(path) == convs
    assert all(set(json.loads(line)) == {"messages"} for line in path.read_text().splitlines())
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps(convs[0]) + "\n\n" + json.dumps({"messages": convs[1], "id": 7}) + "\n")
    assert load_chat_jsonl(bare) == convs[:2]


GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})


@pytest.mark.parametrize("bad, needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"conversation": []}), "messages"),
    (json.dumps({"messages": [{"role": "assistant", "content": "Hi"}]}), "expected"),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi"}]}), "expected"),
    (json.dumps({"messages": [{"role": "user", "content": "  "}]}), "empty"),
    ("42", "expected"),
])
def test_load_chat_jsonl_errors(tmp_path, bad, needle):
    path = tmp_path / "chat.jsonl"
    path.write_text(GOOD + "\n" + GOOD + "\n" + bad + "\n")
    with pytest.raises(C2CError) as e:
        load_chat_jsonl(path)
    assert f"{path}:3" in str(e.value) and needle in str(e.value)


def test_load_chat_jsonl_empty_or_missing(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(C2CError, match="no conversations"):
        load_chat_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(C2CError, match="not found"):
        load_chat_jsonl(tmp_path / "missing.jsonl")


def test_oasst_shared_file():
    if not OASST.exists():
        pytest.skip(f"{OASST} not present")
    convs = load_oasst_trees(OASST)
    assert len(convs) >= 80
    for conv in convs:
        validate_messages(conv)
        assert conv[0]["role"] == "user" and conv[-1]["role"] == "assistant"
    assert load_oasst_trees(OASST) == convs


def _msg(role, text, rank=None, replies=(), **kw):
    return {"role": role, "text": text, "rank": rank, "replies": list(replies), **kw}


def test_oasst_follows_best_rank(tmp_path):
    tree = {"message_tree_id": "t", "tree_state": "ready_for_export", "prompt": _msg("prompter", "Q1", replies=[
        _msg("assistant", "worse", rank=1),
        _msg("assistant", "synthetic best", rank=0, synthetic=True),
        _msg("assistant", "best", rank=0, replies=[
            _msg("prompter", "Q2", replies=[_msg("assistant", " ", rank=0), _msg("assistant", "A2", rank=1)])]),
    ])}
    unranked = {"prompt": _msg("prompter", "Q", replies=[_msg("assistant", "first"), _msg("assistant", "second")])}
    no_answer = {"prompt": _msg("prompter", "lonely")}
    synthetic_root = {"prompt": _msg("prompter", "Q", synthetic=True, replies=[_msg("assistant", "A", rank=0)])}
    path = tmp_path / "trees.jsonl"
    path.write_text("\n".join(json.dumps(t) for t in (tree, unranked, no_answer, synthetic_root)) + "\n")
    assert load_oasst_trees(path) == [
        [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "best"},
         {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "first"}]]


def test_bigger_world_defaults():
    cfg = config.get_preset("smoke").world
    cfg.n_known, cfg.n_problems_train = 120, 100
    world = W.build_world(cfg)
    convs = world_conversations(world, seed=3)
    assert len(convs) == 300 + 200 + len(world["splits"]["known_a"]) * 6 + 100
    assert len(world_conversations(world, seed=3, n_math=10)) == len(convs) - 90
    text = "\n".join(_text(c) for c in convs)
    assert not any(n in text for s in ("known_b", "search_only", "unknown") for n in world["splits"][s])
    for attr, pool in FACT_QUESTIONS.items():
        for q in pool:  # every phrasing used many times
            assert sum(text.count(q.split("{name}")[0] + n) for n in world["splits"]["known_a"]) >= 5, q


def test_probe_holdout_people_are_in_no_chat(world):
    """chat_people and probe_people split known_a (the probe's share capped at a third); the SFT mix of a
    world run (fact questions, follow-ups, open-ended requests) never names a probe person."""
    from crawl2chat.conversations import chat_people, probe_people
    from crawl2chat.sft import load_conversations as sft_conversations
    known_a = world["splits"]["known_a"]
    chat, probe = chat_people(world, 2), probe_people(world, 2)
    assert chat + probe == known_a and len(probe) == 2
    assert len(probe_people(world, 10_000)) == len(known_a) // 3 > 0
    assert chat_people(world, 0) == known_a and probe_people(world, 0) == []
    cfg = config.get_preset("smoke")
    cfg.chat_data.probe_holdout = 2
    text = "\n".join(_text(c) for c in sft_conversations(Path("nowhere"), cfg, world))
    assert all(name in text for name in chat)
    assert not any(name in text for name in probe)
