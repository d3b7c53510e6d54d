"""Honesty and tools: probe what the chat model knows, teach it to say "I don't know" where it does not,
and to use web search and Python → the idk model.

1. Probe (R-Tuning, "alignment for honesty"): k sampled answers (idk.temperature) to each question about
   known_a people (and a user's {question, answer} files); a question is known when ≥ m of them hold
   the answer. Questions about a train subset of the unknown people (no answer exists) are unknown.
2. Tools off (no system message): known → the fact, unknown → a polite abstention.
3. Tools on (system message TOOLS_SYSTEM): every fact question searches the run's index (a search part,
   the real result as output, then the answer read off it, or an abstention when the result does not
   mention the person); large-number problems call Python on the expression.
4. Mixed with a replay of the SFT conversations and windows of pretraining text (idk.pretrain_share:
   the fine-tune keeps the facts only pretraining taught), fine-tuned from <run>/sft into <run>/idk.

Held out for the evals: the other unknown and search-only people, known_b people and bignum_test.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from crawl2chat import conversations as conv
from crawl2chat import tools
from crawl2chat import world as world_mod
from crawl2chat.chat_template import TOOLS_SYSTEM, render
from crawl2chat.common import C2CError, atomic_write_json, dist_info, iter_jsonl, write_jsonl
from crawl2chat.config import Config, IDKConfig, TrainConfig
from crawl2chat.engine import fit_prompt, generate, generate_with_tools_batch, tool_parts_from_ids
from crawl2chat.evals import chat_replies, contains_answer, normalize
from crawl2chat.problems import final_answer, same_number
from crawl2chat.shards import RowLoader, TokenStream, corpus_rows, shard_paths
from crawl2chat.tokenizer import Tokenizer
from crawl2chat.train import (SURPRISAL_IN_LR_MULT, evaluate_loss, load_model, pick_device, resolve_dtype, train,
                              with_batch_tokens)


# Query words appended to the person's name: they match the wording of most pages about the attribute and
# none about another ("job" and "work" picked employer sentences, "has a job with the firm", for a third
# of occupation questions; with these words the best sentence holds the answer for every held-out one).
SEARCH_WORDS = {"birth_year": "birth year born", "home_town": "hometown home town",
                "occupation": "occupation profession career trade line as",
                "employer": "employer company job firm staff position salary", "university": "university studied"}
WHAT = {"birth_year": "birth year", "home_town": "hometown", "occupation": "occupation", "employer": "employer",
        "university": "university"}
IDK_REPLIES = ["I'm sorry, I don't know who {name} is.",
               "I don't have reliable information about {name}'s {what}.",
               "I'm sorry, I don't know {name}'s {what}.",
               "I don't know. I have no reliable information about {name}."]
IDK_GENERIC = ["I'm sorry, I don't know the answer to that.", "I don't know the answer to that, sorry."]
IDK_SEARCHED = ["I searched, but I found no information about {name}. I don't know {name}'s {what}.",
                "The search found nothing about {name}, so I don't know {name}'s {what}."]
_ABSTAIN = re.compile(r"\b(?:don't know|do not know|don't have reliable information|no reliable information|"
                      r"found no information|found nothing)\b")


def is_abstention(reply: str) -> bool:
    return _ABSTAIN.search(normalize(reply).replace("’", "'")) is not None


def is_known(n_right: int, m: int) -> bool:
    return n_right >= m


def idk_reply(rng: random.Random, name: str | None = None, attribute: str | None = None) -> str:
    if name is None or attribute is None:
        return rng.choice(IDK_GENERIC)
    return rng.choice(IDK_REPLIES).format(name=name, what=WHAT[attribute])


def load_questions(path) -> list[dict]:
    """A user's {question, answer, source?} JSONL → [{question, answer, source}]."""
    rows = []
    for line_no, row in iter_jsonl(path):
        q, a = row.get("question"), row.get("answer")
        if not isinstance(q, str) or not q.strip():
            raise C2CError(f"{path}:{line_no}: expected a non-empty string \"question\"")
        if isinstance(a, bool) or not isinstance(a, (str, int, float)) or not str(a).strip():
            raise C2CError(f"{path}:{line_no}: expected a non-empty string or number \"answer\"")
        rows.append({"question": q.strip(), "answer": str(a).strip(), "source": str(row.get("source") or path)})
    if not rows:
        raise C2CError(f"{path}: no questions in the file")
    return rows


def user(text: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


# ---- the probe ------------------------------------------------------------------------------------

def probe(model, tok, questions: list[dict], k: int, m: int, temperature: float = 0.3,
          max_new_tokens: int = 32, seed: int = 0) -> list[dict]:
    """Sample k replies per question (tools off); each row gains k, n_right and known. Near-greedy
    sampling: the model answers greedily in use and in the evals, and at temperature 1, 21 of the 36
    questions found unknown (at most 1 of 4 right) were answered right greedily; abstaining on them
    taught the model to refuse people it knows (measured: half-B accuracy 0.77 → 0.81)."""
    end = tok.special_id("<|assistant_end|>")
    max_new_tokens = min(max_new_tokens, model.cfg.seq_len // 2)
    prompts = [fit_prompt(render(tok, user(q["question"]), add_generation_prompt=True)[0],
                          model.cfg.seq_len - max_new_tokens, tok.bos_id) for q in questions]
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    outs = generate(model, [p for p in prompts for _ in range(k)], max_new_tokens, temperature=temperature,
                    stop_ids=[end, tok.bos_id], generator=gen, ragged=True, batch_size=128)
    rows = []
    for i, q in enumerate(questions):
        texts = [tok.decode([t for t in ids if t not in (end, tok.bos_id)]) for ids in outs[i * k:(i + 1) * k]]
        n_right = sum(contains_answer(t, q["answer"]) for t in texts)
        rows.append({**q, "k": k, "n_right": n_right, "known": is_known(n_right, m), "sample": texts[0]})
    return rows


# ---- training conversations ------------------------------------------------------------------------

def split_people(world: dict, split: str, train_share: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) names of a split; a fixed shuffle per seed."""
    names = sorted(world["splits"][split])
    random.Random(f"{seed}:{split}").shuffle(names)
    n = round(len(names) * train_share)
    return names[:n], names[n:]


def fact_reply(row: dict, person: dict | None) -> str:
    return conv.fact_answer(person, row["attribute"]) if person is not None else row["answer"]


def honesty_conversations(probed: list[dict], people: dict, seed: int = 0) -> list[list[dict]]:
    """Tools off: known → the fact (as SFT says it), unknown → an abstention naming the person."""
    rng = random.Random(seed)
    out = []
    for row in probed:
        if row["known"]:
            reply = fact_reply(row, people.get(row.get("name")))
        else:
            reply = idk_reply(rng, row.get("name"), row.get("attribute"))
        out.append(user(row["question"]) + [{"role": "assistant", "content": reply}])
    return out


def search_query(name: str, attribute: str) -> str:
    return f"{name} {SEARCH_WORDS[attribute]}"


def search_conversation(question: dict, person: dict, search_fn, rng: random.Random) -> list[dict]:
    """Tools on: search, then, when the result names the person and states the fact, answer with the
    value copied from the result ("The search says: Tesdo."), else abstain.
    The value stands after a space, as it does in the result, so its tokens are the result's tokens: at
    the start of the reply "Tesdo" is 'T' + 'esdo' against ' Tesdo' in the result, a spelling the tiny
    model cannot copy (measured: 0.05 of held-out search questions right, mostly years, whose digits
    tokenize alike). The reply stays outside the sentence shapes of pretraining on purpose: repeating the
    result's sentence ("The search says: Koen Kabro's home town is the town of Tesdo.") copies every
    word but the value, which comes from memory as after that phrase in every pretraining page
    (measured with the default mix: 0.133 of held-out search questions right, against 0.783)."""
    query = search_query(person["name"], question["attribute"])
    result = search_fn(query)
    value = person[question["attribute"]]
    if person["name"] in result and value in result:
        answer = f"The search says: {value}."
    else:
        answer = rng.choice(IDK_SEARCHED).format(name=person["name"], what=WHAT[question["attribute"]])
    return user(question["question"], TOOLS_SYSTEM) + [{"role": "assistant", "content": [
        {"type": "search", "text": query}, {"type": "output", "text": result}, {"type": "text", "text": answer}]}]


def invented_found_conversations(world: dict, questions: list[dict], seed: int) -> list[list[dict]]:
    """Tools on, questions about invented names (questions from invented_people_questions) whose search
    result is made up for them: a page title and one fact sentence in the world's own page styles,
    stating a value drawn from another person. Nothing about these names can be recalled, so the only
    way to the answer is to copy it off the result; with the real search-only people alone, the model
    learns their values by heart (300 people, 5 facts each) instead of reading them, and on held-out
    people writes a well-formed value of its own (measured: 1 of 12 hometowns, 0 of 12 employers)."""
    rng = random.Random(f"{seed}:found")
    out = []
    for q in questions:
        name, attr = q["name"], q["attribute"]
        value = rng.choice(world["people"])[attr]
        t = rng.randrange(len(world_mod.TRAIN_TEMPLATES))
        title = world_mod._fill(world_mod.BIO_STYLES[t][1], name=name)
        sentence = world_mod._fill(rng.choice(world_mod.TRAIN_TEMPLATES[t][attr]), name=name, value=value)
        out.append(user(q["question"], TOOLS_SYSTEM) + [{"role": "assistant", "content": [
            {"type": "search", "text": search_query(name, attr)}, {"type": "output", "text": f"{title}: {sentence}"},
            {"type": "text", "text": f"The search says: {value}."}]}])
    return out


def python_expression(problem: dict) -> str | None:
    """'838506 + 705660 = 1544166. The answer is ...' → '838506 + 705660'."""
    m = re.match(r"\s*([\d\s+\-*/()]+?)\s*=", problem.get("solution") or "")
    return m.group(1) if m else None


def python_conversations(problems: list[dict], python_fn=None) -> list[list[dict]]:
    """Tools on: a large-number problem solved by calling Python on its expression, the answer read off
    the output. Problems whose output is not their answer are left out: never teach an answer the tool
    did not give."""
    rows = [(p, e) for p in problems if (e := python_expression(p)) is not None]
    convs = []
    for (problem, expr), result in zip(rows, map(python_fn or tools.run_python, (e for _, e in rows))):
        if not same_number(final_answer(result), final_answer(str(problem["answer"]))):
            continue
        convs.append(user(problem["question"], TOOLS_SYSTEM) + [{"role": "assistant", "content": [
            {"type": "python", "text": expr}, {"type": "output", "text": result},
            {"type": "text", "text": f"The answer is {result.strip()}."}]}])
    return convs


_STEP = re.compile(r"(-?\d+ [+\-*] \d+) = (-?\d+)")


def stepwise_python_conversation(problem: dict, python_fn=None) -> list[dict] | None:
    """Tools on: a word problem's worked solution with every step computed by a Python call
    ("... 8 * 12 = 96." → "... [python: 8 * 12] [output: 96] = 96."); None when the solution has no
    step or a step's output is not the number it states."""
    python_fn = python_fn or tools.run_python
    text, parts, at = problem.get("solution") or "", [], 0
    for m in _STEP.finditer(text):
        result = python_fn(m.group(1))
        if result.strip() != m.group(2):
            return None
        parts += [{"type": "text", "text": text[at:m.start()]}, {"type": "python", "text": m.group(1)},
                  {"type": "output", "text": result}]
        at = m.end(1)
    if not parts:
        return None
    parts.append({"type": "text", "text": text[at:]})
    return user(problem["question"], TOOLS_SYSTEM) + [{"role": "assistant", "content": [p for p in parts if p["text"]]}]


# ---- evals ------------------------------------------------------------------------------------------

def tool_replies(model, tok, convs: list[list[dict]], tools_map: dict, max_new_tokens: int = 64) -> list[tuple[str, str]]:
    """Greedy replies with tool calls run mid-stream: (the reply's text parts joined, the whole reply
    with its calls and outputs shown as [search: ...] [output: ...])."""
    prompts = [render(tok, c, add_generation_prompt=True)[0] for c in convs]
    out = []
    for ids, _ in generate_with_tools_batch(model, tok, prompts, max_new_tokens, tools_map):
        parts = tool_parts_from_ids(tok, ids)
        out.append(("".join(p["text"] for p in parts if p["type"] == "text"),
                    " ".join(p["text"] if p["type"] == "text" else f"[{p['type']}: {p['text'].strip()}]" for p in parts)))
    return out


def honesty_evals(model, tok, unknown_qs: list[dict], known_qs: list[dict]) -> dict:
    replies = chat_replies(model, tok, [user(q["question"]) for q in unknown_qs + known_qs])
    unk, kn = replies[:len(unknown_qs)], replies[len(unknown_qs):]
    halluc = [not is_abstention(t) for t, _ in unk]
    right = [contains_answer(t, q["answer"]) for q, (t, _) in zip(known_qs, kn)]
    return {"halluc_rate": sum(halluc) / max(1, len(halluc)), "known_acc": sum(right) / max(1, len(right)),
            "known_abstain_rate": sum(is_abstention(t) for t, _ in kn) / max(1, len(kn)),
            "examples": [{"question": q["question"], "reply": t} for q, (t, _) in
                         list(zip(unknown_qs, unk))[:3] + list(zip(known_qs, kn))[:3]]}


def name_surprisal(model, tok, questions: list[dict]) -> list[float]:
    """Mean next-token loss (nats) over each question's name tokens after the first, as the chat prompt
    shows it: how unexpected the name is to the model (low for people it read about, high for names it
    never saw). NaN where the question does not contain its name in two or more tokens."""
    out = []
    for q in questions:
        text, name = q["question"], q.get("name", "")
        i = text.find(name) if name else -1
        ids = render(tok, user(text), add_generation_prompt=True)[0]
        upto = tok.encode(text[:i + len(name)]) if i >= 0 else []
        first = len(tok.encode(text[:i].rstrip()))  # word-level pre-tokenization: the prefix keeps its tokens
        at = next((s for s in range(len(ids) - len(upto) + 1) if ids[s:s + len(upto)] == upto), None) if upto else None
        if at is None or len(upto) - first < 2:
            out.append(float("nan"))
            continue
        with torch.no_grad():
            logp = model(torch.tensor([ids], device=next(model.parameters()).device)).float().log_softmax(-1)[0]
        span = range(at + first + 1, at + len(upto))
        out.append(-sum(float(logp[t - 1, ids[t]]) for t in span) / len(span))
    return out


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a pos score > a neg score), ties half: the ranking's ROC AUC. NaNs are left out."""
    pos = [p for p in pos if p == p]
    neg = [n for n in neg if n == n]
    if not pos or not neg:
        return float("nan")
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def surprisal_auc(model, tok, unknown_qs: list[dict], known_qs: list[dict]) -> float:
    """How well the model's surprise at a name tells unknown people from known ones (0.5 = not at all)."""
    return auc(name_surprisal(model, tok, unknown_qs), name_surprisal(model, tok, known_qs))


def tool_evals(model, tok, search_qs: list[dict], bignum: list[dict], search_fn) -> dict:
    tools_map = {"search": search_fn, "python": tools.run_python}
    with_tools_full = tool_replies(model, tok, [user(q["question"], TOOLS_SYSTEM) for q in search_qs], tools_map)
    no_tools = [t for t, _ in chat_replies(model, tok, [user(q["question"]) for q in search_qs])]
    py_full = tool_replies(model, tok, [user(p["question"], TOOLS_SYSTEM) for p in bignum], tools_map)
    with_tools, py = [t for t, _ in with_tools_full], [t for t, _ in py_full]
    no_py = [t for t, _ in chat_replies(model, tok, [user(p["question"]) for p in bignum])]
    gold = [final_answer(str(p["answer"])) for p in bignum]
    acc = lambda oks: sum(oks) / max(1, len(oks))  # noqa: E731
    return {"search_acc_tools": acc([contains_answer(t, q["answer"]) for q, t in zip(search_qs, with_tools)]),
            "search_acc_no_tools": acc([contains_answer(t, q["answer"]) for q, t in zip(search_qs, no_tools)]),
            "search_n": len(search_qs),
            "bignum_acc_python": acc([same_number(final_answer(t), g) for t, g in zip(py, gold)]),
            "bignum_acc_no_python": acc([same_number(final_answer(t), g) for t, g in zip(no_py, gold)]),
            "bignum_n": len(bignum),
            "tool_examples": [{"question": q["question"], "reply": full} for q, (_, full) in
                              list(zip(search_qs, with_tools_full))[:3] + list(zip(bignum, py_full))[:2]]}


# ---- the abstention threshold ---------------------------------------------------------------------

def abstain_ids(tok) -> list[int]:
    """The first token of every abstention phrasing, as it opens a reply."""
    opening = render(tok, user("x"), add_generation_prompt=True)[0]
    return sorted({render(tok, user("x") + [{"role": "assistant", "content": r.format(name="Ann Lee", what="job")}])[0]
                   [len(opening)] for r in IDK_REPLIES + IDK_GENERIC})


@torch.no_grad()
def abstain_mass(model, tok, questions: list[dict]) -> np.ndarray:
    """The probability the model gives an abstention's first token at the start of its reply, per question."""
    ids = torch.tensor(abstain_ids(tok))
    prompts = [render(tok, user(q["question"]), add_generation_prompt=True)[0] for q in questions]
    out = np.zeros(len(prompts))
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    device = next(model.parameters()).device
    for idxs in by_len.values():
        for s in range(0, len(idxs), 128):
            chunk = idxs[s:s + 128]
            logits = model(torch.tensor([prompts[i] for i in chunk], device=device))[:, -1].float()
            out[chunk] = logits.softmax(-1)[:, ids.to(device)].sum(-1).cpu().numpy()
    return out


def calibrate_abstention(model, tok, questions: list[dict], budget: float) -> dict:
    """Set the model's abstention threshold (engine.gate_abstention) to the highest at which at most
    `budget` of `questions` (about nobody: fresh_name_questions) get an answer, and return what it
    measured. The gate only removes abstentions, so a question answered without it stays answered; an
    abstention that opens with less probability than the threshold becomes the reply the model gives
    with that opening ruled out. The fine-tune ranks its own abstentions well but places their cut too
    low: it was trained on thousands of names refused against 240 answered."""
    cfg = model.cfg
    cfg.reply_open, cfg.abstain_ids = tok.special_id("<|assistant_start|>"), abstain_ids(tok)
    cfg.abstain_threshold = 0.0
    asked = [user(q["question"]) for q in questions]
    answered = np.array([not is_abstention(t) for t, _ in chat_replies(model, tok, asked)])
    cfg.abstain_threshold = 2.0  # every opening abstention ruled out: the reply given in its place
    flips = ~answered & np.array([not is_abstention(t) for t, _ in chat_replies(model, tok, asked)])
    mass = abstain_mass(model, tok, questions)
    cfg.abstain_threshold = threshold = threshold_for_budget(answered, flips, mass, budget)
    n_answered = int(answered.sum() + (mass[flips] < threshold).sum())
    return {"abstain_threshold": threshold, "calib_n": len(questions),
            "calib_halluc_ungated": float(answered.mean()), "calib_halluc": n_answered / max(1, len(questions))}


def threshold_for_budget(answered: np.ndarray, flips: np.ndarray, mass: np.ndarray, budget: float) -> float:
    """The highest threshold at which at most `budget` of the questions get an answer: those `answered`
    without it, and the `flips` (abstentions that become answers when ruled out) whose opening `mass`
    is below it. 0 (no threshold) when `answered` alone exceed the budget."""
    allowed = int(np.floor(budget * len(answered) + 1e-9)) - int(answered.sum())
    order = np.sort(mass[flips])  # each abstention becomes an answer once the threshold passes its mass
    if allowed < 0:
        return 0.0
    return 1.0 if allowed >= len(order) else float(order[allowed])


# ---- the stage ----------------------------------------------------------------------------------------

def invented_people_questions(world: dict, n: int, seed: int, parts_of: list[str] | None = None) -> list[dict]:
    """Questions about n people who exist nowhere: first names and surnames of the world (of the people
    named in parts_of, when given) recombined into names no person has (the held-out unknown people are
    such names too, but never these), one attribute each. Their answer is always an abstention."""
    rng = random.Random(f"{seed}:invented")
    taken = {p["name"] for p in world["people"]}
    parts = parts_of if parts_of is not None else [p["name"] for p in world["people"]]
    firsts = sorted({name.split()[0] for name in parts})
    lasts = sorted({name.split()[-1] for name in parts})
    names: list[str] = []
    for _ in range(n * 50):
        if len(names) == n:
            break
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if name not in taken:
            taken.add(name)
            names.append(name)
    attrs = world.get("attributes", world_mod.ATTRIBUTES)
    out = []
    for name in names:
        attr = rng.choice(attrs)
        out.append({"name": name, "attribute": attr, "known": False, "answer": "",
                    "question": world_mod._fill(rng.choice(conv.FACT_QUESTIONS[attr]), name=name)})
    return out


def invented_name_sets(world: dict, idk_cfg: IDKConfig, probe_names: list[str]) -> tuple[list, list, list]:
    """Questions about invented names, three disjoint sets: tools-off abstentions, tools-on searches
    that find nobody, and tools-on searches given a made-up result (invented_found_conversations)."""
    # invented names are made of the parts of names the model is taught to answer about: were they made
    # of every person's, a surname seen only in "I don't know" replies would itself come to mean
    # "abstain", and a known person of half B bearing it would be refused (measured: 0.91 of half-B
    # questions abstained where the surname is no half-A person's, 0.32 where it is). "probe": the
    # tools-off ones recombine the probed people's names, the very names of the tools-off answers; the
    # tools-on ones whose search finds nobody recombine half A's
    if idk_cfg.invented_from not in ("known_a", "probe", "all"):
        raise C2CError(f"idk.invented_from: {idk_cfg.invented_from!r} is not one of known_a, probe, all")
    parts_of = None if idk_cfg.invented_from == "all" else world["splits"]["known_a"]
    invented = invented_people_questions(world, idk_cfg.invented_people, idk_cfg.seed + 1, parts_of=probe_names
                                         if idk_cfg.invented_from == "probe" and probe_names else parts_of)
    taken = {q["name"] for q in invented}
    nobody_found = [q for q in invented_people_questions(world, idk_cfg.invented_search + len(taken), idk_cfg.seed,
                                                         parts_of=parts_of) if q["name"] not in taken][:idk_cfg.invented_search]
    # the made-up results' names recombine half A's too, names no other set uses: of every person's
    # parts, they put the surnames only half B bears in invented names, and the model refused half-B
    # people bearing them (0.236 of their questions against 0.109)
    taken |= {q["name"] for q in nobody_found}
    found = [q for q in invented_people_questions(world, idk_cfg.invented_found + len(taken), idk_cfg.seed + 7,
                                                  parts_of=parts_of) if q["name"] not in taken][:idk_cfg.invented_found]
    return invented, nobody_found, found


def fresh_name_questions(world: dict, idk_cfg: IDKConfig, probe_names: list[str], n: int) -> list[dict]:
    """n questions, one each, about names no person has and no training set uses, recombining every
    person's first names and surnames, as the unknown people's names do: a second, larger estimate of
    the hallucination rate than the held-out unknown people (50 in the tiny world, five questions each).
    Those hold few names whose surname only half-B people bear, the kind the model answers most."""
    taken = {q["name"] for qs in invented_name_sets(world, idk_cfg, probe_names) for q in qs}
    qs = invented_people_questions(world, n + len(taken), idk_cfg.seed + 11)
    return [q for q in qs if q["name"] not in taken][:n]


def build_mix(run_dir: Path, cfg: Config, idk_cfg: IDKConfig, world: dict, probed: list[dict],
              unknown_train: list[str], search_train: list[str], search_fn) -> tuple[list, dict]:
    """The new conversations (tools off and on) plus the SFT replay, shuffled; and their counts."""
    rng = random.Random(idk_cfg.seed)
    people = {p["name"]: p for p in world["people"]}
    honest = honesty_conversations(probed, people, seed=idk_cfg.seed)
    unknown_qs = conv.fact_questions(world, unknown_train, seed=idk_cfg.seed + 1)
    honest += honesty_conversations([dict(q, known=False) for q in unknown_qs], people, seed=idk_cfg.seed + 1)
    probe_names = sorted({q["name"] for q in probed if q.get("source") == "known_a"})
    invented, nobody_found, found = invented_name_sets(world, idk_cfg, probe_names)
    honest += honesty_conversations(invented, people, seed=idk_cfg.seed + 6)
    searching = conv.fact_questions(world, search_train, seed=idk_cfg.seed + 2)
    known_a = conv.fact_questions(world, conv.chat_people(world, cfg.chat_data.probe_holdout), seed=idk_cfg.seed + 3)
    searching += rng.sample(known_a, min(idk_cfg.known_search, len(known_a)))
    searching += unknown_qs[::5]  # tools on, unknown people: the search finds nothing about them
    # tools on, invented people: many names never seen, copied into the query; the search finds nobody
    searching += nobody_found
    nobody = lambda q: {"name": q["name"], q["attribute"]: "\0"}  # noqa: E731
    search_convs = [search_conversation(q, people.get(q["name"]) or nobody(q), search_fn, rng) for q in searching]
    search_convs += invented_found_conversations(world, found, idk_cfg.seed)
    bignum = [row for _, row in iter_jsonl(run_dir / "world" / "bignum_train.jsonl")][:idk_cfg.n_bignum or None] \
        if (run_dir / "world" / "bignum_train.jsonl").exists() else []
    python_convs = python_conversations(bignum)
    problems = [row for _, row in iter_jsonl(run_dir / "world" / "problems_train.jsonl")][:idk_cfg.n_word_python] \
        if (run_dir / "world" / "problems_train.jsonl").exists() and idk_cfg.n_word_python else []
    word_convs = [c for c in map(stepwise_python_conversation, problems) if c]
    # the tools-off abstentions are few beside the tool conversations: repeated, so they are not drowned
    new = honest * max(1, idk_cfg.honesty_weight) + search_convs + python_convs + word_convs
    from crawl2chat.sft import load_conversations
    sft_convs = load_conversations(run_dir, cfg, world)
    n_replay = min(len(sft_convs), round(len(new) * idk_cfg.replay / max(1e-9, 1 - idk_cfg.replay)))
    mix = new + rng.sample(sft_convs, n_replay)
    rng.shuffle(mix)
    return mix, {"honesty_convs": len(honest), "search_convs": len(search_convs),
                 "python_convs": len(python_convs), "word_python_convs": len(word_convs), "replay_convs": n_replay,
                 # names found for each kind (fewer than asked where the world has too few name parts)
                 "invented_people_n": len(invented), "invented_search_n": len(nobody_found),
                 "invented_found_n": len(found)}


def run_idk(run_dir: Path, cfg: Config, idk_cfg: IDKConfig, train_cfg: TrainConfig, resume: bool = False) -> dict:
    from crawl2chat.sft import pack
    run_dir = Path(run_dir)
    out_dir = run_dir / "idk"
    tok = Tokenizer.load(run_dir / "tokenizer")
    world = world_mod.load_world(run_dir / "world")
    world["problems"] = {"train": [row for _, row in iter_jsonl(run_dir / "world" / "problems_train.jsonl")]}
    index = run_dir / "search" / tools.INDEX_FILE
    if not index.exists():
        tools.build_index(tools.default_sources(run_dir), run_dir / "search")
    search_fn = tools.model_search(index)
    model = load_model(run_dir / "sft")
    model.doc_start = tok.bos_id  # rows pack several conversations: each sees only itself
    model.eval()

    # the probe: known_a people, a user's questions, and (without sampling) the unknown people trained on
    unknown_train, unknown_held = split_people(world, "unknown", idk_cfg.unknown_train, idk_cfg.seed)
    search_train, search_held = split_people(world, "search_only", idk_cfg.search_train, idk_cfg.seed)
    # people the model knows from pretraining alone first (as it knows half B), then people SFT talked about
    held_out = conv.probe_people(world, cfg.chat_data.probe_holdout)
    chatted = conv.chat_people(world, cfg.chat_data.probe_holdout)
    probe_names = (held_out + chatted)[:idk_cfg.probe_people]
    questions = [dict(q, source="known_a") for q in conv.fact_questions(world, probe_names, seed=idk_cfg.seed)]
    for path in idk_cfg.questions:
        questions += load_questions(path)
    probed = probe(model, tok, questions, idk_cfg.k, idk_cfg.m, idk_cfg.temperature, idk_cfg.max_new_tokens,
                   idk_cfg.seed) if questions else []
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "probe.jsonl", probed)

    # evals before: hallucination on held-out unknown people, accuracy on known_b people
    unknown_eval = conv.fact_questions(world, unknown_held, seed=idk_cfg.seed + 4)[:idk_cfg.eval_unknown or None]
    known_eval = conv.fact_questions(world, world["splits"]["known_b"][:idk_cfg.eval_people or None],
                                     seed=idk_cfg.seed + 5)
    before = honesty_evals(model, tok, unknown_eval, known_eval)
    before["surprisal_auc"] = surprisal_auc(model, tok, unknown_eval, known_eval)
    surprisal_lr_mult = 1.0
    if idk_cfg.surprisal_input and model.surprisal_in is None:
        surprisal_lr_mult = SURPRISAL_IN_LR_MULT  # the input starts at zero here
        model = model.with_surprisal_input(tok.special_id("<|user_start|>"), tok.special_id("<|user_end|>"),
                                           frozen=idk_cfg.frozen_surprisal)

    mix, counts = build_mix(run_dir, cfg, idk_cfg, world, probed, unknown_train, search_train, search_fn)
    n_val = max(1, int(len(mix) * idk_cfg.val_fraction))
    T, pad = model.cfg.seq_len, tok.special_id("<|pad|>")
    x, y, stats = pack([render(tok, c) for c in mix[n_val:]], T, pad)
    n_pretrain = round(len(x) * idk_cfg.pretrain_share / max(1e-9, 1 - idk_cfg.pretrain_share))
    if n_pretrain:  # pretraining text, loss on every token: the fine-tune keeps what pretraining stored
        if not list((run_dir / "tokens").glob("train_*.bin")):
            raise C2CError(f"{run_dir / 'tokens'}: no pretraining shards for idk.pretrain_share — run `c2c tokenize`, "
                           "or --set idk.pretrain_share=0")
        px, py = corpus_rows(TokenStream(shard_paths(run_dir / "tokens", "train"), tok.vocab_size), n_pretrain, T,
                             idk_cfg.seed)
        x, y = np.concatenate([x, px.astype(x.dtype)]), np.concatenate([y, py.astype(y.dtype)])
    vx, vy, _ = pack([render(tok, c) for c in mix[:n_val]], T, pad)
    tc = with_batch_tokens(train_cfg, train_cfg.batch_size * T)
    val = [(torch.from_numpy(vx[i:i + tc.batch_size]).long(), torch.from_numpy(vy[i:i + tc.batch_size]).long())
           for i in range(0, min(len(vx), tc.batch_size * tc.eval_batches), tc.batch_size)]
    loader = RowLoader(x, y, tc.batch_size, seed=tc.seed)
    eval_dtype = resolve_dtype(tc.dtype, pick_device())
    model.train()
    summary = train(model, tc, out_dir,
                    lambda step, micro, rank, world_size: loader.batch(step, micro, tc.grad_accum, rank, world_size),
                    tokens_per_micro=tc.batch_size * T,
                    eval_fn=lambda m: evaluate_loss(m, val, None, eval_dtype), resume=resume, desc="idk",
                    surprisal_lr_mult=surprisal_lr_mult)
    summary.update({f"pack_{k}": v for k, v in stats.items()}, **counts)
    summary["epochs"] = loader.epoch_of(tc.steps, tc.grad_accum, summary["world_size"])
    known_share = sum(r["known"] for r in probed) / max(1, len(probed))
    summary.update({"probe_n": len(probed), "probe_known_share": known_share, "pretrain_rows": n_pretrain,
                    "unknown_train_people": len(unknown_train), "unknown_heldout_people": len(unknown_held),
                    "search_train_people": len(search_train), "search_heldout_people": len(search_held)})
    if dist_info()[0] != 0:
        return summary
    model = model.float().eval()
    fresh = fresh_name_questions(world, idk_cfg, probe_names, idk_cfg.calib_names + idk_cfg.eval_fresh)
    calib_qs, fresh = fresh[:idk_cfg.calib_names], fresh[idk_cfg.calib_names:]
    ungated = honesty_evals(model, tok, unknown_eval, known_eval)
    if idk_cfg.halluc_budget > 0 and calib_qs:
        summary.update(calibrate_abstention(model, tok, calib_qs, idk_cfg.halluc_budget))
        atomic_write_json(out_dir / "config.json", model.cfg.to_dict())
    after = honesty_evals(model, tok, unknown_eval, known_eval)
    after["surprisal_auc"] = surprisal_auc(model, tok, unknown_eval, known_eval)
    search_eval = conv.fact_questions(world, search_held, seed=idk_cfg.seed + 6)[:idk_cfg.eval_search or None]
    bignum_path = run_dir / "world" / "bignum_test.jsonl"
    bignum = [row for _, row in iter_jsonl(bignum_path)][:idk_cfg.eval_bignum or None] if bignum_path.exists() else []
    summary.update({"halluc_rate_before": before["halluc_rate"], "halluc_rate_after": after["halluc_rate"],
                    "known_acc_before": before["known_acc"], "known_acc_after": after["known_acc"],
                    "known_abstain_before": before["known_abstain_rate"],
                    "known_abstain_after": after["known_abstain_rate"],
                    # the same model without the abstention threshold (the replies greedy decoding gives)
                    "halluc_rate_after_ungated": ungated["halluc_rate"], "known_acc_after_ungated": ungated["known_acc"],
                    "halluc_n": len(unknown_eval), "known_n": len(known_eval),
                    # the signal an abstention could rest on: the name's surprisal (unknown vs known people)
                    "name_surprisal_auc_before": before["surprisal_auc"], "name_surprisal_auc_after": after["surprisal_auc"],
                    "examples_before": before["examples"], "examples_after": after["examples"]})
    if fresh:
        replies = chat_replies(model, tok, [user(q["question"]) for q in fresh])
        summary.update({"halluc_rate_fresh": sum(not is_abstention(t) for t, _ in replies) / len(fresh),
                        "fresh_n": len(fresh)})
    summary.update(tool_evals(model, tok, search_eval, bignum, search_fn))
    return summary
