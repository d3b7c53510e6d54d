"""Problems with known numeric answers: loading (world, GSM8K, user JSONL) and the final-answer parser
shared by the RL rewards and the evals."""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from crawl2chat.common import C2CError, iter_jsonl

# a number as people write it: sign, currency, thousands separators, decimals ("-$1,234.50", "3.", ".5")
_NUMBER = r"-?[$€£]?\s?-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?"
_NUMBER_RE = re.compile(r"(?<![\w.])(" + _NUMBER + r")")
_MARKED = [re.compile(p, re.IGNORECASE) for p in (
    r"####\s*(" + _NUMBER + r")",
    r"\\boxed\{\s*(" + _NUMBER + r")",
    r"answer is[:\s]*(" + _NUMBER + r")",
)]


def to_number(s: str) -> Decimal | None:
    """'$1,234.50' → Decimal('1234.50'); None when s holds no digits."""
    s = re.sub(r"[\s$€£,]", "", s)
    neg = s.count("-") % 2 == 1
    s = s.replace("-", "")
    if not re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", s):
        return None
    try:
        value = Decimal(s.rstrip(".") if s.endswith(".") else s)
    except InvalidOperation:
        return None
    return -value if neg else value


def final_answer(text: str) -> Decimal | None:
    """The final number of a solution: after '####', in \\boxed{}, after 'the answer is', else the last
    number in the text. Units and trailing words are ignored ('18 dollars', '50%', '3 cm.')."""
    for pattern in _MARKED:
        found = [to_number(m) for m in pattern.findall(text)]
        found = [f for f in found if f is not None]
        if found:
            return found[-1]
    numbers = [n for n in (to_number(m) for m in _NUMBER_RE.findall(text)) if n is not None]
    return numbers[-1] if numbers else None


def same_number(a: Decimal | None, b: Decimal | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= Decimal("1e-6") * max(1, abs(b))


def gold_answer(answer, where: str) -> Decimal:
    """A problem's answer field (a number, a numeric string, or a GSM8K solution ending in '#### N')."""
    if isinstance(answer, bool) or answer is None:
        raise C2CError(f"{where}: missing answer")
    if isinstance(answer, (int, float)):
        return Decimal(str(answer))
    if not isinstance(answer, str) or not answer.strip():
        raise C2CError(f"{where}: missing answer")
    value = final_answer(answer) if "####" in answer else to_number(answer.strip())
    if value is None:
        raise C2CError(f"{where}: answer {answer[:40]!r} is not a number")
    return value


def load_problems(path: Path) -> list[dict]:
    """{question, answer} JSONL (world problems, GSM8K, or a user's) → [{question, answer: Decimal, solution?}]."""
    path = Path(path)
    if not path.exists():
        raise C2CError(f"{path}: no such problem file")
    out = []
    for line_no, row in iter_jsonl(path):
        where = f"{path}:{line_no}"
        if not isinstance(row, dict):
            raise C2CError(f"{where}: expected an object with question and answer")
        q = row.get("question")
        if not isinstance(q, str) or not q.strip():
            raise C2CError(f"{where}: empty question")
        out.append({"question": q.strip(), "answer": gold_answer(row.get("answer"), where),
                    "solution": row.get("solution") or (row["answer"] if isinstance(row.get("answer"), str) else None)})
    if not out:
        raise C2CError(f"{path}: no problems")
    return out
