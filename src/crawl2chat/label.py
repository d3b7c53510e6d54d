"""`c2c label`: show a prompt and two of the model's replies, record which one the person prefers.

Answers: 1 or 2 (that reply is better), t (tie), s (skip), q (quit). Each answer is appended at once to a
preference JSONL ({prompt, chosen, rejected}, TRL's format; a tie adds "tie": true and is left out of
training), so a later run resumes where this one stopped: prompts already in the file are not asked
again (skipped ones are)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from rich.console import Console
from rich.panel import Panel

from crawl2chat.common import C2CError

CHOICES = {"1", "2", "t", "s", "q"}


def labelled_prompts(path: Path) -> set[str]:
    """Prompts already answered in a preference file (a line cut short by a crash is ignored)."""
    done = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                done.add(obj["prompt"])
    return done


def label_loop(items: Iterable[dict], out_path: Path, ask: Callable[[str], str] = input,
               console: Console | None = None) -> dict:
    """items: {prompt, a, b}. Asks about each unlabelled prompt and appends the answer to out_path.
    Returns counts of each outcome. End of input counts as quit."""
    console = console or Console()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = labelled_prompts(out_path)
    counts = {"chosen": 0, "tie": 0, "skipped": 0, "already": 0, "identical": 0, "quit": False}
    with open(out_path, "a", encoding="utf-8") as f:
        for item in items:
            if item["prompt"] in done:
                counts["already"] += 1
                continue
            if item["a"].strip() == item["b"].strip():
                counts["identical"] += 1
                continue
            console.print(Panel(item["prompt"], title="prompt", style="bold"))
            console.print(Panel(item["a"] or "(empty)", title="1"))
            console.print(Panel(item["b"] or "(empty)", title="2"))
            answer = ""
            while answer not in CHOICES:
                try:
                    answer = ask("Which reply is better? [1/2/t(ie)/s(kip)/q(uit)] ").strip().lower()
                except EOFError:
                    answer = "q"
            if answer == "q":
                counts["quit"] = True
                break
            if answer == "s":
                counts["skipped"] += 1
                continue
            chosen, rejected = (item["b"], item["a"]) if answer == "2" else (item["a"], item["b"])
            row = {"prompt": item["prompt"], "chosen": chosen, "rejected": rejected}
            if answer == "t":
                row["tie"] = True
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            done.add(item["prompt"])
            counts["tie" if answer == "t" else "chosen"] += 1
    return counts


def read_prompts(path: Path) -> list[str]:
    """One prompt per line: plain text, or JSON objects with a "prompt" string."""
    path = Path(path)
    if not path.is_file():
        raise C2CError(f"{path}: file not found")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise C2CError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj.get("prompt"), str):
                raise C2CError(f"{path}:{lineno}: missing \"prompt\" string")
            out.append(obj["prompt"])
        else:
            out.append(line.strip())
    return out


def model_items(run_dir: Path, model: str, prompts: list[str], max_new_tokens: int, seed: int) -> Iterable[dict]:
    """Two replies per prompt sampled at temperature 1 from the run's model."""
    from crawl2chat.rl import sample_completions
    from crawl2chat.rm import init_dir
    from crawl2chat.tokenizer import Tokenizer
    from crawl2chat.train import load_model
    tok = Tokenizer.load(Path(run_dir) / "tokenizer")
    policy = load_model(init_dir(Path(run_dir), model)).eval()
    for i in range(0, len(prompts), 8):
        chunk = prompts[i:i + 8]
        samples = sample_completions(policy, tok, chunk, 2, max_new_tokens, 1.0, seed + i)
        for j, p in enumerate(chunk):
            yield {"prompt": p, "a": samples[2 * j][2], "b": samples[2 * j + 1][2]}


def register_label(sub) -> None:
    p = sub.add_parser("label", help="compare two of the model's replies per prompt and record your preference",
                       description="Show a prompt and two sampled replies; answer 1, 2, t (tie), s (skip) or "
                                   "q (quit). Answers are appended to a preference JSONL; a later run resumes.")
    p.add_argument("--run", required=True, help="run directory (its tokenizer and chat model are used)")
    p.add_argument("--model", default="", help="model folder (default: the run's rl model, else sft)")
    p.add_argument("--prompts", default="", help="prompts file (text lines or {prompt} JSONL); default: the "
                                                  "world's open-ended prompts")
    p.add_argument("--out", default="", help="preference file (default: <run>/preferences.jsonl)")
    p.add_argument("-n", type=int, default=20, help="prompts to offer (default 20)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_label)


def cmd_label(args) -> None:
    run_dir = Path(args.run)
    if args.prompts:
        prompts = read_prompts(Path(args.prompts))
    else:
        from crawl2chat import world as world_mod
        from crawl2chat.rubric import open_prompts
        prompts = [p["prompt"] for p in open_prompts(world_mod.load_world(run_dir / "world"), seed=args.seed)]
    out = Path(args.out) if args.out else run_dir / "preferences.jsonl"
    done = labelled_prompts(out)
    todo = [p for p in dict.fromkeys(prompts) if p not in done][:args.n]
    console = Console()
    if not todo:
        console.print(f"every prompt is already labelled in {out}")
        return
    counts = label_loop(model_items(run_dir, args.model, todo, args.max_new_tokens, args.seed), out, console=console)
    console.print(f"{counts['chosen']} preferences and {counts['tie']} ties recorded in {out} "
                  f"({counts['skipped']} skipped)")
