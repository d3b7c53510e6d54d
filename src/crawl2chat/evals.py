"""Every metric in one place. Base model: fact recall by greedy completion of templated prompts."""
from __future__ import annotations

import re
from collections import defaultdict

from crawl2chat import world as world_mod
from crawl2chat.engine import fit_prompt, generate
from crawl2chat.model import GPT


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def completion_matches(completion: str, answer: str) -> bool:
    """The completion starts with the answer and the answer ends at a word boundary."""
    c, a = normalize(completion), normalize(answer)
    return c.startswith(a) and (len(c) == len(a) or not c[len(a)].isalnum())


def fact_recall(model: GPT, tok, world: dict, names: list[str], heldout: bool, max_new_tokens: int = 12,
                return_rows: bool = False) -> dict:
    """Share of (person, attribute) facts that greedy completion of a templated prompt gets exactly right."""
    items = world_mod.fact_prompts(world, names, heldout=heldout)
    if not items:
        return {"acc": 0.0, "n": 0}
    prompts = [[tok.bos_id] + tok.encode(it["prompt"]) for it in items]
    outs = generate(model, prompts, max_new_tokens, stop_ids=[tok.bos_id], ragged=True, batch_size=128)
    per_attr = defaultdict(list)
    rows = []
    for it, ids in zip(items, outs):
        text = tok.decode([i for i in ids if i != tok.bos_id]).split("\n")[0]
        ok = completion_matches(text, it["answer"])
        per_attr[it["attribute"]].append(ok)
        rows.append({**it, "completion": text, "correct": ok})
    allok = [ok for v in per_attr.values() for ok in v]
    out = {"acc": sum(allok) / len(allok), "n": len(allok),
           "per_attribute": {k: sum(v) / len(v) for k, v in per_attr.items()}}
    if return_rows:
        out["rows"] = rows
    return out


# ---------------------------------------------------------------- chat models

def chat_replies(model: GPT, tok, conversations: list[list[dict]], max_new_tokens: int = 64) -> list[tuple[str, bool]]:
    """Greedy replies to conversations that end with a user message: (text, ended with <|assistant_end|>)."""
    from crawl2chat.chat_template import render
    end = tok.special_id("<|assistant_end|>")
    prompts = [render(tok, c, add_generation_prompt=True)[0] for c in conversations]
    max_new_tokens = min(max_new_tokens, model.cfg.seq_len // 2)
    prompts = [fit_prompt(p, model.cfg.seq_len - max_new_tokens, tok.bos_id) for p in prompts]
    outs = generate(model, prompts, max_new_tokens, stop_ids=[end, tok.bos_id], ragged=True, batch_size=128)
    return [(tok.decode([i for i in ids if i not in (end, tok.bos_id)]), bool(ids) and ids[-1] == end) for ids in outs]


def contains_answer(reply: str, answer: str) -> bool:
    """The normalised answer appears in the normalised reply as whole words."""
    return re.search(r"(?<![\w])" + re.escape(normalize(answer)) + r"(?![\w])", normalize(reply)) is not None


def last_number(text: str) -> int | None:
    nums = re.findall(r"-?\d[\d,]*", text)
    try:
        return int(nums[-1].replace(",", "")) if nums else None
    except ValueError:
        return None


def chat_evals(model: GPT, tok, world: dict, problems: list[dict], max_people: int | None = None) -> dict:
    """fact_qa_acc on known people of half B (never in any chat), arith_acc on held-out word problems,
    end_token_rate over all of those replies."""
    from crawl2chat.conversations import fact_questions
    names = world["splits"]["known_b"][:max_people]
    qs = fact_questions(world, names)
    facts = chat_replies(model, tok, [[{"role": "user", "content": q["question"]}] for q in qs])
    fact_ok = [contains_answer(text, q["answer"]) for q, (text, _) in zip(qs, facts)]
    math = chat_replies(model, tok, [[{"role": "user", "content": p["question"]}] for p in problems], 128)
    math_ok = [last_number(text) == p["answer"] for p, (text, _) in zip(problems, math)]
    ended = [e for _, e in facts + math]
    return {
        "fact_qa_acc": sum(fact_ok) / max(1, len(fact_ok)),
        "fact_qa_n": len(fact_ok),
        "arith_acc": sum(math_ok) / max(1, len(math_ok)),
        "arith_n": len(math_ok),
        "end_token_rate": sum(ended) / max(1, len(ended)),
        "fact_qa_examples": [{"question": q["question"], "answer": q["answer"], "reply": t, "correct": ok}
                             for q, (t, _), ok in list(zip(qs, facts, fact_ok))[:8]],
        "arith_examples": [{"question": p["question"], "answer": p["answer"], "reply": t, "correct": ok}
                           for p, (t, _), ok in list(zip(problems, math, math_ok))[:4]],
    }
