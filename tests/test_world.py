"""The synthetic world: determinism, hidden splits, fact prompts, problems, round trip."""
import json
import re

import pytest

from crawl2chat.common import C2CError
from crawl2chat.config import WorldConfig
from crawl2chat.world import (ATTRIBUTES, BIO_STYLES, HELDOUT_TEMPLATE, TRAIN_TEMPLATES, build_world, fact_prompts,
                              load_world, write_world)

CFG = dict(n_known=20, n_search_only=6, n_unknown=6, n_towns=8, n_companies=8, n_math_pages=20,
           n_problems_train=40, n_problems_test=10, n_bignum_train=10, n_bignum_test=5, val_fraction=0.05)


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(seed=7, **CFG))


@pytest.fixture(scope="module")
def bigger():
    return build_world(WorldConfig(seed=3, n_known=200, n_search_only=40, n_unknown=40, n_towns=30,
                                   n_companies=30, n_math_pages=60, n_problems_train=300, n_problems_test=60,
                                   n_bignum_train=40, n_bignum_test=20, val_fraction=0.1))


def _titles(name):
    return {title.replace("{name}", name) for _, title, _ in BIO_STYLES}


def _docs_of(world, name, kind):
    return [d for d in world["documents"] if d["kind"] == kind and name in d["text"]]


def test_deterministic_and_seed_dependent():
    a = json.dumps(build_world(WorldConfig(seed=11, **CFG)))
    b = json.dumps(build_world(WorldConfig(seed=11, **CFG)))
    c = json.dumps(build_world(WorldConfig(seed=12, **CFG)))
    assert a == b
    assert a != c


def test_json_serialisable_and_config(world):
    assert json.loads(json.dumps(world))["config"]["seed"] == 7


@pytest.mark.parametrize("w", ["world", "bigger"])
def test_splits(w, request):
    world = request.getfixturevalue(w)
    cfg = world["config"]
    s = world["splits"]
    assert len(s["known_a"]) + len(s["known_b"]) == cfg["n_known"]
    assert len(s["known_a"]) == round(cfg["n_known"] * cfg["known_a_share"]) < cfg["n_known"]
    assert len(s["search_only"]) == cfg["n_search_only"] and len(s["unknown"]) == cfg["n_unknown"]
    all_names = [n for v in s.values() for n in v]
    assert len(all_names) == len(set(all_names)) == len(world["people"])
    for p in world["people"]:
        assert p["name"] in s[p["split"]]
        assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", p["name"])
        assert p["gender"] in ("f", "m") and 1940 <= int(p["birth_year"]) <= 2005
    towns = {t["name"] for t in world["towns"]}
    companies = {c["name"] for c in world["companies"]}
    for p in world["people"]:
        assert p["home_town"] in towns and p["employer"] in companies
        assert p["university"].startswith("the University of ") and p["university"][18:] in towns
        assert re.fullmatch(r"an? [a-z ]+", p["occupation"])


@pytest.mark.parametrize("w", ["world", "bigger"])
def test_values_prefix_free(w, request):
    world = request.getfixturevalue(w)
    for attr in ATTRIBUTES:
        vals = sorted({p[attr] for p in world["people"]})
        for x, y in zip(vals, vals[1:]):
            assert not y.startswith(x), (attr, x, y)


@pytest.mark.parametrize("w", ["world", "bigger"])
def test_bios_and_visibility(w, request):
    world = request.getfixturevalue(w)
    docs, s = world["documents"], world["splits"]
    texts = [d["text"] for d in docs]
    for name in s["known_a"] + s["known_b"]:
        bios = [d for d in docs if d["kind"] == "bio" and d["text"].split("\n")[0] in _titles(name)]
        assert len(bios) == 5 and len({d["url"].split("/")[2] for d in bios}) == 5
        assert all(d["split"] == "train" for d in bios)
    for name in s["search_only"] + s["unknown"]:
        assert not any(name in t for t in texts), name
    for name in s["known_b"]:
        assert not _docs_of(world, name, "qa"), name
    for name in s["known_a"]:
        qa = _docs_of(world, name, "qa")
        assert 1 <= len(qa) <= 2
        p = next(p for p in world["people"] if p["name"] == name)
        for attr in ATTRIBUTES:
            assert all(p[attr].lower() in d["text"].lower() for d in qa), (name, attr)
    so = world["search_only_documents"]
    assert len(so) == 5 * len(s["search_only"])
    for name in s["search_only"]:
        assert sum(d["text"].split("\n")[0] in _titles(name) for d in so) == 5


def test_doc_fields_and_val_split(bigger):
    docs = bigger["documents"]
    assert len({d["id"] for d in docs}) == len(docs)
    for d in docs:
        assert set(d) == {"id", "url", "kind", "text", "split"} and d["url"].startswith("https://")
        assert d["split"] in ("train", "val")
    for kind in ("bio", "qa"):
        assert all(d["split"] == "train" for d in docs if d["kind"] == kind)
    for kind in ("town", "company", "math"):
        ks = [d for d in docs if d["kind"] == kind]
        n_val = sum(d["split"] == "val" for d in ks)
        assert 1 <= n_val < len(ks) and n_val <= max(1, round(0.1 * len(ks)))
    assert sum(d["kind"] == "math" for d in docs) == 60
    assert sum(d["kind"] == "town" for d in docs) == 30 and sum(d["kind"] == "company" for d in docs) == 30


@pytest.mark.parametrize("w", ["world", "bigger"])
def test_seen_prompts_in_bios(w, request):
    world = request.getfixturevalue(w)
    s = world["splits"]
    names = s["known_a"] + s["known_b"]
    rows = fact_prompts(world, names, heldout=False)
    assert len(rows) == len(names) * len(ATTRIBUTES)
    used = set()
    bio_texts = [d["text"] for d in world["documents"] if d["kind"] == "bio"]
    for r in rows:
        assert not r["prompt"].endswith(" ") and r["name"] in r["prompt"]
        hits = [t for t in bio_texts if r["prompt"] + " " + r["answer"] in t]
        assert hits, r
        assert all(r["name"] in t.split("\n")[0] for t in hits)
        used.add(next((i, v) for i, t in enumerate(TRAIN_TEMPLATES) for v in t[r["attribute"]]
                      if v.split(" {value}")[0].replace("{name}", r["name"]) == r["prompt"]))
    assert {i for i, _ in used} == set(range(5))
    assert len(used) > 5  # more than one phrasing variant per template gets used


@pytest.mark.parametrize("w", ["world", "bigger"])
def test_heldout_prompts_never_in_documents(w, request):
    world = request.getfixturevalue(w)
    names = [p["name"] for p in world["people"]]
    rows = fact_prompts(world, names, heldout=True)
    seen = {r["prompt"] for r in fact_prompts(world, names, heldout=False)}
    all_text = "\n".join(d["text"] for d in world["documents"] + world["search_only_documents"])
    for r in rows:
        assert r["prompt"] not in all_text and r["prompt"] not in seen
    # the phrasing itself (name-free parts) appears nowhere either
    for sentence in HELDOUT_TEMPLATE.values():
        part = max(sentence.split(" {value}")[0].split("{name}"), key=len).strip()
        assert len(part) >= 10 and part not in all_text, part


def test_prompts_unambiguous_across_attributes():
    """No prompt of one attribute is a prefix of a prompt of another attribute (same name)."""
    templates = [{a: v for a, v in t.items()} for t in TRAIN_TEMPLATES] + [{a: [v] for a, v in HELDOUT_TEMPLATE.items()}]
    prefixes = [(a, v.split(" {value}")[0]) for t in templates for a in ATTRIBUTES for v in t[a]]
    for a, x in prefixes:
        for b, y in prefixes:
            if a != b:
                assert not y.startswith(x), (x, y)


_EQ = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def _check_solution(pb):
    eqs = _EQ.findall(pb["solution"])
    assert eqs, pb
    for a, op, b, c in eqs:
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, pb
    assert int(eqs[-1][3]) == pb["answer"]
    assert pb["solution"].endswith(f"The answer is {pb['answer']}.")
    return eqs


def test_problems(bigger):
    p = bigger["problems"]
    assert len(p["train"]) == 300 and len(p["test"]) == 60
    n_ops = set()
    for pb in p["train"] + p["test"]:
        assert set(pb) == {"question", "answer", "solution"} and isinstance(pb["answer"], int)
        eqs = _check_solution(pb)
        n_ops.add(len(eqs))
        assert 0 < pb["answer"] < 1000 and pb["question"].endswith("?")
        for a, _, b, _ in eqs[:1]:
            assert a in pb["question"]
    assert n_ops == {1, 2, 3}
    train_q = {pb["question"] for pb in p["train"]}
    assert len(train_q) == len(p["train"]) and not train_q & {pb["question"] for pb in p["test"]}


def test_bignum(bigger):
    b = bigger["bignum"]
    assert len(b["train"]) == 40 and len(b["test"]) == 20
    for pb in b["train"] + b["test"]:
        _check_solution(pb)
        nums = re.findall(r"\d+", pb["question"])
        assert len(nums) >= 2 and all(len(n) >= 5 for n in nums)
    assert not {pb["question"] for pb in b["train"]} & {pb["question"] for pb in b["test"]}


def test_write_load_round_trip(world, tmp_path):
    stats = write_world(world, tmp_path)
    for f in ("corpus.jsonl", "search_only.jsonl", "facts.json", "problems_train.jsonl", "problems_test.jsonl",
              "bignum_train.jsonl", "bignum_test.jsonl"):
        assert (tmp_path / f).exists(), f
    assert stats["people"]["known_a"] == 16 and stats["documents"]["bio"] == 100
    lines = (tmp_path / "corpus.jsonl").read_text().splitlines()
    assert len(lines) == len(world["documents"]) and json.loads(lines[0]) == world["documents"][0]
    loaded = load_world(tmp_path)
    names = [p["name"] for p in world["people"]]
    for heldout in (False, True):
        assert fact_prompts(loaded, names, heldout) == fact_prompts(world, names, heldout)
    with pytest.raises(C2CError):
        fact_prompts(loaded, ["Nobody Atall"], False)


def test_load_errors(tmp_path):
    with pytest.raises(C2CError, match="facts.json"):
        load_world(tmp_path)
    (tmp_path / "facts.json").write_text("{not json")
    with pytest.raises(C2CError, match="facts.json"):
        load_world(tmp_path)
    (tmp_path / "facts.json").write_text('{"people": []}')
    with pytest.raises(C2CError, match="facts.json"):
        load_world(tmp_path)
