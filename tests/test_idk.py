"""idk.py: the knowledge probe's decision, abstention detection, the honesty and tool-use conversations,
question files, and one end-to-end run of the stage on the smoke preset."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil

import numpy as np
import pytest
import torch

from crawl2chat import conversations, idk, tools
from crawl2chat import world as world_mod
from crawl2chat.chat_template import TOOLS_SYSTEM, validate_messages
from crawl2chat.common import C2CError
from crawl2chat.config import TrainConfig, get_preset
from crawl2chat.conversations import fact_answer
from crawl2chat.tokenizer import Tokenizer
from crawl2chat.train import load_model

PERSON = {"name": "Shossa Kerma", "gender": "f", "birth_year": "1967", "home_town": "Thedinford",
          "occupation": "an optician", "employer": "Suradra Pharma", "university": "the University of Lusford"}


def test_probe_decision():
    assert idk.is_known(2, 2) and idk.is_known(4, 2)
    assert not idk.is_known(1, 2) and not idk.is_known(0, 1)


def test_every_idk_phrasing_is_an_abstention_and_answers_are_not():
    rng = random.Random(0)
    replies = [idk.idk_reply(rng, "Shossa Kerma", a) for a in idk.WHAT for _ in range(8)]
    replies += idk.IDK_GENERIC + [t.format(name="X Y", what="job") for t in idk.IDK_SEARCHED]
    assert len(set(replies)) >= len(idk.IDK_REPLIES)
    assert all(idk.is_abstention(r) for r in replies)
    assert idk.is_abstention("I don’t know.")  # a typographic apostrophe
    for attr in idk.WHAT:
        assert not idk.is_abstention(fact_answer(PERSON, attr))
    assert not idk.is_abstention("Shossa Kerma was born in 1967, I know that.")


def test_honesty_conversations():
    rows = [{"name": PERSON["name"], "attribute": "employer", "question": "Who employs Shossa Kerma?",
             "answer": "Suradra Pharma", "known": True},
            {"name": PERSON["name"], "attribute": "birth_year", "question": "When was Shossa Kerma born?",
             "answer": "1967", "known": False},
            {"question": "Capital of France?", "answer": "Paris", "known": True},
            {"question": "Capital of Atlantis?", "answer": "Poseidonia", "known": False}]
    convs = idk.honesty_conversations(rows, {PERSON["name"]: PERSON})
    for c in convs:
        validate_messages(c)
        assert c[0] == {"role": "user", "content": c[0]["content"]}  # tools off: no system message
    replies = [c[1]["content"] for c in convs]
    assert replies[0] == fact_answer(PERSON, "employer")
    assert idk.is_abstention(replies[1]) and "Shossa Kerma" in replies[1] and "1967" not in replies[1]
    assert replies[2] == "Paris"
    assert idk.is_abstention(replies[3]) and "Poseidonia" not in replies[3]


def test_search_conversation_answers_from_the_result_or_abstains():
    q = {"name": PERSON["name"], "attribute": "home_town", "question": "Where is Shossa Kerma from?"}
    queries = []

    def found(query):
        queries.append(query)
        return "Shossa Kerma: Shossa Kerma is a native of Thedinford."
    c = idk.search_conversation(q, PERSON, found, random.Random(0))
    validate_messages(c)
    assert c[0] == {"role": "system", "content": TOOLS_SYSTEM}
    parts = c[2]["content"]
    assert [p["type"] for p in parts] == ["search", "output", "text"]
    assert parts[0]["text"] == queries[0] and queries[0].startswith("Shossa Kerma ") and "town" in queries[0]
    assert parts[1]["text"] == found("")
    assert parts[2]["text"] == "The search says: Thedinford."
    assert " Thedinford" in parts[1]["text"]  # after a space in both: the same tokens to copy
    # the value without the person, or the person without the value: nothing to answer from
    for result in ("Other Person: Other Person hails from Thedinford.", "Shossa Kerma: Shossa Kerma is a cook."):
        c = idk.search_conversation(q, PERSON, lambda query: result, random.Random(0))
        reply = c[2]["content"][2]["text"]
        assert idk.is_abstention(reply) and "Thedinford" not in reply


def test_model_search_returns_one_sentence(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "Ann Lee - Biography\nAnn Lee's profession: a watchmaker. "
                                        "Ann Lee's year of birth was 1981.", "url": "https://x.test/ann"}) + "\n")
    tools.build_index([docs], tmp_path / "search")
    out = tools.model_search(tmp_path / "search")("Ann Lee birth year born")
    assert out == "Ann Lee - Biography: Ann Lee's year of birth was 1981."


def test_python_conversation_uses_the_real_sandbox():
    pb = {"question": "A stadium sold 506294 tickets on Saturday and 185629 on Sunday. How many in total?",
          "answer": 691923, "solution": "506294 + 185629 = 691923. The answer is 691923."}
    assert idk.python_expression(pb) == "506294 + 185629"
    c = idk.python_conversations([pb])[0]
    validate_messages(c)
    assert c[2]["content"] == [{"type": "python", "text": "506294 + 185629"}, {"type": "output", "text": "691923"},
                               {"type": "text", "text": "The answer is 691923."}]
    assert idk.python_conversations([dict(pb, answer=5)]) == []  # tool and gold disagree
    assert idk.python_conversations([dict(pb, solution="no expression here")]) == []


def test_stepwise_python_conversation_computes_every_step():
    pb = {"question": "Hugo has 32 coins. Then he gives away 15. Then the number of coins triples. How many?",
          "answer": 51, "solution": "Hugo starts with 32 coins. He gives away 15: 32 - 15 = 17. The number of "
                                    "coins is multiplied by 3: 17 * 3 = 51. The answer is 51."}
    c = idk.stepwise_python_conversation(pb)
    validate_messages(c)
    parts = c[-1]["content"]
    assert [p["text"] for p in parts if p["type"] == "python"] == ["32 - 15", "17 * 3"]
    assert [p["text"] for p in parts if p["type"] == "output"] == ["17", "51"]
    assert "".join(p["text"] for p in parts if p["type"] == "text").endswith("= 51. The answer is 51.")
    assert idk.stepwise_python_conversation(dict(pb, solution=pb["solution"].replace("= 17", "= 18"))) is None
    assert idk.stepwise_python_conversation(dict(pb, solution="No steps. The answer is 51.")) is None


def test_invented_people_are_nobody_and_get_abstentions():
    from crawl2chat.config import WorldConfig
    from crawl2chat.world import build_world
    world = build_world(WorldConfig(n_known=20, n_search_only=6, n_unknown=6, n_towns=8, n_companies=8,
                                    n_math_pages=2, n_problems_train=4, n_problems_test=2, n_bignum_train=2,
                                    n_bignum_test=2))
    qs = idk.invented_people_questions(world, 40, seed=0)
    names = {p["name"] for p in world["people"]}
    firsts, lasts = {n.split()[0] for n in names}, {n.split()[-1] for n in names}
    assert len(qs) == 40 == len({q["name"] for q in qs})
    for q in qs:
        assert q["name"] not in names and q["name"] in q["question"] and q["known"] is False
        assert q["name"].split()[0] in firsts and q["name"].split()[-1] in lasts  # recombined, not new words
    assert qs == idk.invented_people_questions(world, 40, seed=0)
    half_a = world["splits"]["known_a"]
    from_a = idk.invented_people_questions(world, 40, seed=0, parts_of=half_a)
    assert len({q["name"] for q in from_a} - names) == 40
    assert all(q["name"].split()[0] in {n.split()[0] for n in half_a} and
               q["name"].split()[-1] in {n.split()[-1] for n in half_a} for q in from_a)
    assert {q["name"].split()[-1] for q in qs} - {n.split()[-1] for n in half_a}  # the default draws from all
    convs = idk.honesty_conversations(qs, {p["name"]: p for p in world["people"]})
    assert all(idk.is_abstention(c[-1]["content"]) for c in convs)


def test_invented_name_sets_are_disjoint_and_drawn_from_their_parts():
    """Tools-off names recombine the probed people's names, the searches that find nobody and the
    made-up results half A's; no name is in two sets, and a set gets what is left when names run out."""
    from crawl2chat.config import IDKConfig, WorldConfig
    from crawl2chat.world import build_world
    world = build_world(WorldConfig(n_known=40, n_search_only=6, n_unknown=6, n_towns=8, n_companies=8,
                                    n_math_pages=2, n_problems_train=4, n_problems_test=2, n_bignum_train=2,
                                    n_bignum_test=2))
    half_a = world["splits"]["known_a"]
    probed = half_a[:6]
    parts = lambda names: ({n.split()[0] for n in names}, {n.split()[-1] for n in names})  # noqa: E731
    everyone = {p["name"] for p in world["people"]}
    free_a = len([1 for f in parts(half_a)[0] for s in parts(half_a)[1] if f"{f} {s}" not in everyone])
    for n_found, expected in ((free_a - 40, free_a - 40), (free_a, free_a - 20)):
        cfg = IDKConfig(invented_people=10, invented_search=10, invented_found=n_found)
        off, nobody, found = idk.invented_name_sets(world, cfg, probed)
        names = [[q["name"] for q in qs] for qs in (off, nobody, found)]
        assert [len(n) for n in names] == [10, 10, expected]
        every = [n for ns in names for n in ns]
        assert len(set(every)) == len(every) and not everyone & set(every)
        firsts, lasts = parts(probed)
        assert all(n.split()[0] in firsts and n.split()[-1] in lasts for n in names[0])
        firsts, lasts = parts(half_a)
        assert all(n.split()[0] in firsts and n.split()[-1] in lasts for n in names[1] + names[2])


def test_fresh_names_are_nobody_and_in_no_training_set():
    """The fresh names of halluc_rate_fresh recombine every person's name parts (a surname only half B
    bears included), and are neither a person's name nor in any of the training sets."""
    from crawl2chat.config import IDKConfig, WorldConfig
    from crawl2chat.world import build_world
    world = build_world(WorldConfig(n_known=40, n_search_only=6, n_unknown=6, n_towns=8, n_companies=8,
                                    n_math_pages=2, n_problems_train=4, n_problems_test=2, n_bignum_train=2,
                                    n_bignum_test=2))
    probed = world["splits"]["known_a"][:6]
    cfg = IDKConfig(invented_people=30, invented_search=30, invented_found=30)
    fresh = idk.fresh_name_questions(world, cfg, probed, 60)
    names = [q["name"] for q in fresh]
    assert len(names) == 60 == len(set(names)) and all(q["known"] is False for q in fresh)
    trained = {q["name"] for qs in idk.invented_name_sets(world, cfg, probed) for q in qs}
    assert not set(names) & (trained | {p["name"] for p in world["people"]})
    assert {n.split()[-1] for n in names} - {n.split()[-1] for n in world["splits"]["known_a"]}
    assert fresh == idk.fresh_name_questions(world, cfg, probed, 60)


def test_threshold_for_budget_answers_at_most_the_budget():
    answered = np.array([True, False, False, False, False, False, False, False, False, False])
    flips = np.array([False, True, True, True, False, True, True, True, True, True])
    mass = np.array([0.0, 0.9, 0.6, 0.7, 0.3, 0.95, 0.99, 0.8, 0.97, 0.98])
    # 10 questions, 1 answered already: a budget of 0.3 lets the two abstentions opened least surely go
    t = idk.threshold_for_budget(answered, flips, mass, 0.3)
    assert t == 0.8 and ((mass < t) & flips).sum() == 2
    assert idk.threshold_for_budget(answered, flips, mass, 0.1) == 0.6  # nothing more may be answered
    assert idk.threshold_for_budget(answered, flips, mass, 0.05) == 0.0  # over budget without a threshold
    assert idk.threshold_for_budget(answered, flips, mass, 1.0) == 1.0
    # an abstention that stays one when ruled out (mass 0.3 at index 4) never counts
    assert idk.threshold_for_budget(answered, flips, mass, 0.2) == 0.7


def test_invented_found_conversations_copy_a_made_up_result():
    from crawl2chat.config import WorldConfig
    from crawl2chat.world import build_world
    world = build_world(WorldConfig(n_known=20, n_search_only=6, n_unknown=6, n_towns=8, n_companies=8,
                                    n_math_pages=2, n_problems_train=4, n_problems_test=2, n_bignum_train=2,
                                    n_bignum_test=2))
    qs = idk.invented_people_questions(world, 30, seed=0)
    convs = idk.invented_found_conversations(world, qs, seed=0)
    assert len(convs) == len(qs) and convs == idk.invented_found_conversations(world, qs, seed=0)
    values = set()
    for q, c in zip(qs, convs):
        validate_messages(c)
        assert c[0] == {"role": "system", "content": TOOLS_SYSTEM}
        search, output, text = c[2]["content"]
        assert search == {"type": "search", "text": idk.search_query(q["name"], q["attribute"])}
        # a title and one sentence naming the person, repeated in the reply
        value = text["text"].removeprefix("The search says: ").removesuffix(".")
        assert value in {p[q["attribute"]] for p in world["people"]}  # a value of the world's kind
        # a title and a sentence naming the person, the value after a space as a real result has it
        assert output["text"].count(q["name"]) == 2 and output["text"].endswith(f" {value}.")
        values.add(value)
    assert len(values) > 5  # drawn at random: no name has a value to learn by heart


def test_search_words_find_the_asked_fact(tmp_path):
    """A person's five pages (one per page style) each hold every fact; the query for one attribute must
    bring back that attribute's sentence. ("job" and "work" once brought back employer sentences, "has a
    job with the firm", for occupation questions.)"""
    people = [dict(PERSON, name=f"{first} Lee", gender="f") for first in ("Ann", "Bea", "Cara", "Dina")]
    docs = tmp_path / "docs.jsonl"
    rng = random.Random(0)
    docs.write_text("".join(json.dumps({"text": world_mod._bio(p, t, rng), "url": f"https://x.test/{i}/{t}"}) + "\n"
                            for i, p in enumerate(people) for t in range(len(world_mod.BIO_STYLES))))
    tools.build_index([docs], tmp_path / "search")
    search = tools.model_search(tmp_path / "search")
    for p in people:
        for a in world_mod.ATTRIBUTES:
            result = search(idk.search_query(p["name"], a))
            assert p["name"] in result and p[a] in result, (p["name"], a, result)


def test_split_people_is_disjoint_and_stable():
    world = {"splits": {"unknown": [f"p{i}" for i in range(10)]}}
    train, held = idk.split_people(world, "unknown", 0.3, seed=0)
    assert len(train) == 3 and len(held) == 7 and set(train) | set(held) == set(world["splits"]["unknown"])
    assert (train, held) == idk.split_people(world, "unknown", 0.3, seed=0)
    assert idk.split_people(world, "unknown", 0.3, seed=1) != (train, held)


def test_question_files(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text('{"question": "Capital of France?", "answer": "Paris"}\n\n'
                    '{"question": "6 x 7?", "answer": 42, "source": "quiz"}\n')
    assert idk.load_questions(good) == [
        {"question": "Capital of France?", "answer": "Paris", "source": str(good)},
        {"question": "6 x 7?", "answer": "42", "source": "quiz"}]
    bad = tmp_path / "bad.jsonl"
    for text, msg in [('{"question": "a", "answer": "b"}\n{oops\n', r"bad\.jsonl:2: not valid JSON"),
                      ('{"question": "a", "answer": "b"}\n{"question": "c"}\n', r"bad\.jsonl:2: .*\"answer\""),
                      ('{"question": " ", "answer": "b"}\n', r"bad\.jsonl:1: .*\"question\""),
                      ('{"question": "a", "answer": true}\n', r"bad\.jsonl:1: .*\"answer\""),
                      ("\n", r"bad\.jsonl: no questions")]:
        bad.write_text(text)
        with pytest.raises(C2CError, match=msg) as e:
            idk.load_questions(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(C2CError, match="file not found"):
        idk.load_questions(tmp_path / "missing.jsonl")


def test_run_idk_end_to_end(smoke_run, copy_run, tmp_path):
    run = copy_run(smoke_run)
    assert (run / "sft" / "model.safetensors").is_file()
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What is the capital of France?", "answer": "Paris"}) + "\n")
    cfg = get_preset("smoke")
    cfg.chat_data.probe_holdout = 2
    icfg = idk.IDKConfig(questions=[str(questions)], probe_people=3, k=2, m=1, max_new_tokens=12, known_search=3, invented_people=30,
                         n_bignum=3, n_word_python=4, eval_people=2, eval_search=3, eval_bignum=2,
                         pretrain_share=0.5, eval_fresh=7, calib_names=20, halluc_budget=0.5)
    tc = TrainConfig(steps=3, batch_size=4, lr=1e-4, warmup_steps=1, eval_every=3, eval_batches=1,
                     ckpt_every=3, dtype="fp32")
    out = idk.run_idk(run, cfg, icfg, tc)
    assert (run / "idk" / "model.safetensors").is_file() and (run / "search" / "index.sqlite").is_file()
    probe = [json.loads(line) for line in (run / "idk" / "probe.jsonl").read_text().splitlines()]
    assert len(probe) == 3 * 5 + 1 == out["probe_n"]
    assert probe[-1]["question"] == "What is the capital of France?"
    # people the model knows from pretraining alone come first: those SFT left out for the probe
    names = conversations.probe_people(world_mod.load_world(run / "world"), 2)
    names += conversations.chat_people(world_mod.load_world(run / "world"), 2)[:1]
    assert [r["name"] for r in probe[:15]] == [n for n in names for _ in range(5)]
    for row in probe:
        assert row["k"] == 2 and 0 <= row["n_right"] <= 2 and row["known"] == (row["n_right"] >= 1)
    assert out["probe_known_share"] == sum(r["known"] for r in probe) / len(probe)
    for key in ["halluc_rate_before", "halluc_rate_after", "known_acc_before", "known_acc_after",
                "search_acc_tools", "search_acc_no_tools", "bignum_acc_python", "bignum_acc_no_python",
                "name_surprisal_auc_before", "name_surprisal_auc_after", "halluc_rate_fresh"]:
        assert 0.0 <= out[key] <= 1.0, key
    assert out["fresh_n"] == 7 and out["calib_n"] == 20
    # the abstention threshold: set where at most the budget of the calibration names get an answer,
    # saved with the model, and the evals ran with it
    assert 0.0 <= out["abstain_threshold"] <= 1.0 and out["calib_halluc"] <= 0.5 or out["abstain_threshold"] == 0.0
    assert out["calib_halluc"] >= out["calib_halluc_ungated"]
    saved = load_model(run / "idk").cfg
    assert saved.abstain_threshold == out["abstain_threshold"] and list(saved.abstain_ids) == idk.abstain_ids(
        Tokenizer.load(run / "tokenizer")) and saved.reply_open == Tokenizer.load(run / "tokenizer").special_id("<|assistant_start|>")
    for key in ["halluc_rate_after_ungated", "known_acc_after_ungated"]:
        assert 0.0 <= out[key] <= 1.0, key
    assert out["known_n"] == 2 * 5 and out["search_n"] == 3 and out["bignum_n"] == 2
    assert out["halluc_n"] == 5 * out["unknown_heldout_people"] > 0
    assert out["python_convs"] == 3 and out["word_python_convs"] == 4 and out["search_convs"] > 0 and out["replay_convs"] > 0
    assert out["steps"] == 3 and out["examples_after"] and out["tool_examples"]
    assert out["pretrain_rows"] == out["pack_rows"] > 0  # half the rows are pretraining text
    # the idk model reads its own surprisal at user tokens; the weights it learned for that are not zero
    model = load_model(run / "idk")
    assert model.cfg.surprisal_open == Tokenizer.load(run / "tokenizer").special_id("<|user_start|>")
    assert float(model.surprisal_in.weight.detach().abs().sum()) > 0
    # it reads it from the SFT model as it was (a frozen copy, saved with it), while its own weights moved
    sft = load_model(run / "sft").state_dict()
    assert model.cfg.surprisal_frozen and model.num_params() == load_model(run / "sft").num_params() + model.surprisal_in.weight.numel()
    for name, t in model.surprisal_model.state_dict().items():
        torch.testing.assert_close(t, sft[name], atol=0, rtol=0)
    assert any(not torch.equal(t, sft[name]) for name, t in model.state_dict().items() if name in sft)


def test_run_idk_without_pretraining_shards_says_what_to_do(smoke_run, copy_run):
    run = copy_run(smoke_run)
    shutil.rmtree(run / "tokens")
    cfg = get_preset("smoke")
    tc = TrainConfig(steps=1, batch_size=4, lr=1e-4, warmup_steps=1, eval_every=1, eval_batches=1, ckpt_every=1,
                     dtype="fp32")
    with pytest.raises(C2CError, match="pretrain_share=0"):
        idk.run_idk(run, cfg, dataclasses.replace(cfg.idk, pretrain_share=0.2), tc)


def test_name_surprisal_reads_the_models_surprise_at_the_name(smoke_run):
    """A stand-in model that predicts each next token only when it is a familiar one: a name made of
    familiar tokens scores ~0 nats, an unfamiliar one ~log(vocab); the AUC ranks them."""
    tok = Tokenizer.load(smoke_run / "tokenizer")
    known = {"name": "Ann Bakerton", "question": "When was Ann Bakerton born?"}
    unknown = {"name": "Ann Quzzyj", "question": "When was Ann Quzzyj born?"}  # no letter of the known question
    familiar = set(tok.encode("When was Ann Bakerton born?"))

    class Knows(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            logits = torch.zeros(1, x.shape[1], tok.vocab_size)
            for t in range(x.shape[1] - 1):
                if int(x[0, t + 1]) in familiar:
                    logits[0, t, int(x[0, t + 1])] = 30.0
            return logits
    model = Knows()
    s_known, s_unknown = idk.name_surprisal(model, tok, [known, unknown])
    assert len(tok.encode(" Quzzyj")) >= 2  # the name has tokens after its first
    name_tokens = tok.encode("When was Ann Quzzyj")[len(tok.encode("When was")) + 1:]  # after the first
    expected = sum(0.0 if t in familiar else math.log(tok.vocab_size) for t in name_tokens) / len(name_tokens)
    assert s_known < 1e-6 and s_unknown > 1.0 and abs(s_unknown - expected) < 1e-3
    assert idk.surprisal_auc(model, tok, [unknown], [known]) == 1.0
    assert idk.auc([1.0, 2.0], [1.0]) == 0.75 and math.isnan(idk.name_surprisal(model, tok, [{"question": "Hi?"}])[0])
