"""Every metric in one place. Base model: fact recall by greedy completion of templated prompts."""
from __future__ import annotations

import re
from collections import defaultdict

from crawl2chat import world as world_mod
from crawl2chat.engine import generate
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
    outs = generate(model, prompts, max_new_tokens, stop_ids=[tok.bos_id])
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
