"""Expert corrections: sample the model's answers into a review file, let an expert (a person in an
editor, or for the world an oracle built from the ground truth) fill in `corrected`, and train on them.

Review file: JSONL of {"prompt", "model_answer", "corrected"}; an empty `corrected` means the answer
stands and nothing is trained from that line."""
from __future__ import annotations

from pathlib import Path

from crawl2chat import world as world_mod
from crawl2chat.chat_template import validate_messages
from crawl2chat.common import C2CError, iter_jsonl, write_jsonl
from crawl2chat.conversations import fact_answer, fact_questions
from crawl2chat.evals import chat_replies, contains_answer


def review_rows(model, tok, prompts: list[str]) -> list[dict]:
    replies = chat_replies(model, tok, [[{"role": "user", "content": p}] for p in prompts])
    return [{"prompt": p, "model_answer": text, "corrected": ""} for p, (text, _) in zip(prompts, replies)]


def world_review(model, tok, world: dict, oracle: bool, limit: int | None = None,
                 names: list[str] | None = None) -> tuple[list[dict], dict]:
    """Fact questions about known people of half A (the half chat training may use; `names` narrows
    them to the people chat data talks about); with `oracle`,
    wrong answers get the ground-truth sentence as their correction and every row the expected answer."""
    qs = fact_questions(world, (world["splits"]["known_a"] if names is None else names)[:limit], seed=2)
    rows = review_rows(model, tok, [q["question"] for q in qs])
    people = {p["name"]: p for p in world["people"]}
    wrong = 0
    for q, row in zip(qs, rows):
        if oracle:
            row["answer"] = q["answer"]
        if not contains_answer(row["model_answer"], q["answer"]):
            wrong += 1
            if oracle:
                row["corrected"] = fact_answer(people[q["name"]], q["attribute"])
    return rows, {"reviewed": len(rows), "wrong": wrong, "corrected": sum(bool(r["corrected"]) for r in rows)}


def load_corrections(path) -> list[list[dict]]:
    """Corrected lines of a review file as conversations; a malformed line is a one-line error."""
    convs = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        for key in ("prompt", "corrected"):
            if not isinstance(row.get(key), str):
                raise C2CError(f"{where}: \"{key}\" must be a string")
        if not row["corrected"].strip():
            continue
        conv = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["corrected"]}]
        validate_messages(conv, where)
        convs.append(conv)
    return convs


def run_correct(run_dir: Path, stage: str, oracle: bool, review: Path | None, limit: int | None) -> dict:
    from crawl2chat.tokenizer import Tokenizer
    from crawl2chat.train import load_model
    run_dir = Path(run_dir)
    if not (run_dir / "world" / "facts.json").exists():
        raise C2CError(f"{run_dir}: no world here; for your own data, write a review file by hand")
    model = load_model(run_dir / stage).eval()
    tok = Tokenizer.load(run_dir / "tokenizer")
    rows, stats = world_review(model, tok, world_mod.load_world(run_dir / "world"), oracle, limit)
    review = review or run_dir / stage / "review.jsonl"
    write_jsonl(review, rows)
    return {**stats, "review": str(review)}
