"""`c2c chat`: talk to a chat model in the terminal, its replies streamed as they are generated.

Interactive: /reset clears the history, /quit (or Ctrl-D) leaves; Ctrl-C stops the reply being
generated (it is not kept), Ctrl-C at the prompt leaves. One shot: `c2c chat -p TEXT` prints the reply.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

from crawl2chat.chat_template import render
from crawl2chat.common import C2CError
from crawl2chat.engine import fit_prompt, generate_batch

CHAT_STAGES = ("rlhf", "rl", "idk", "sft")  # latest first
HINT = "(type a message; /reset to start over, /quit to leave)"


def build_chat_parser(sub) -> None:
    text = "chat with a trained model in the terminal (or answer one message with -p)"
    p = sub.add_parser("chat", help=text, description=text[0].upper() + text[1:] + ". "
                       "/reset starts over, /quit leaves; Ctrl-C stops a reply.")
    p.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run directory (default: runs/tiny)")
    p.add_argument("--stage", default=None,
                   help=f"model folder in the run directory (default: the latest of {', '.join(CHAT_STAGES)} "
                        "present; base works too, with a warning)")
    p.add_argument("--model", type=Path, default=None, help="a model folder (overrides --out/--stage)")
    p.add_argument("-p", "--prompt", default=None, metavar="TEXT", help="one message: print the reply and exit")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default: 0.6)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = all (default: 50)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default: 256)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    p.add_argument("--compile", action="store_true",
                   help="decode with torch.compile: the first reply waits for the compile (tens of seconds on "
                        "a CPU), later tokens come faster (c2c bench generate measures it)")


def reply_stream(model, tok, messages, *, temperature: float, top_k: int | None, max_tokens: int,
                 on_text: Callable[[str], None], seed: int | None = None, compile: bool = False) -> str:
    """Generate the assistant's reply to `messages`, passing the text to on_text piece by piece as it
    is generated; returns the whole reply (without <|assistant_end|>). A prompt too long for the context
    is cut from the left (keeping <|bos|>) with a warning on stderr. Ctrl-C propagates."""
    ids, _ = render(tok, messages, add_generation_prompt=True)
    seq_len = model.cfg.seq_len
    room = max(16, min(max_tokens, seq_len // 2))  # context kept free for the reply
    limit = max(2, seq_len - room)
    if len(ids) > limit:
        ids = fit_prompt(ids, limit, tok.bos_id)
        print(f"warning: the conversation is longer than the context ({seq_len} tokens): "
              f"prompt cut to the last {len(ids)} tokens", file=sys.stderr)
    stops = {tok.special_id("<|assistant_end|>"), tok.bos_id}
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    new: list[int] = []
    shown = ""

    def on_token(_b: int, t: int) -> None:
        nonlocal shown
        if t in stops:
            return
        new.append(t)
        text = tok.decode(new).rstrip("\ufffd")  # hold back a multi-byte char still incomplete
        if len(text) > len(shown) and text.startswith(shown):
            on_text(text[len(shown):])
            shown = text

    generate_batch(model, [ids], max_tokens, temperature=temperature, top_k=top_k or None,
                   stop_ids=sorted(stops), generator=gen, on_token=on_token, compile=compile)
    reply = tok.decode(new)
    if reply.startswith(shown) and len(reply) > len(shown):
        on_text(reply[len(shown):])  # whatever was held back (e.g. a cut-off multi-byte char)
    return reply


def find_model_dir(args) -> Path:
    """--model, else --out/--stage, else the latest chat stage present; base only with a warning."""
    if args.model is not None:
        return Path(args.model)
    if args.stage is not None:
        if args.stage == "base":
            print("warning: base is a pretrained model, not tuned for chat: expect rambling replies",
                  file=sys.stderr)
        return args.out / args.stage
    for stage in CHAT_STAGES:
        if (args.out / stage / "model.safetensors").exists():
            return args.out / stage
    if (args.out / "base" / "model.safetensors").exists():
        print(f"warning: no chat model in {args.out} ({', '.join(CHAT_STAGES)}): using base, a pretrained "
              "model not tuned for chat", file=sys.stderr)
        return args.out / "base"
    raise C2CError(f"{args.out}: no model to chat with (looked for {', '.join(CHAT_STAGES)}, base) — "
                   "train one first, or pass --model")


def load_chat(args):
    from crawl2chat.tokenizer import Tokenizer
    from crawl2chat.train import load_model, pick_device
    model_dir = find_model_dir(args)
    model = load_model(model_dir, pick_device()).eval()
    tok_dir = model_dir if (model_dir / "tokenizer.json").exists() else args.out / "tokenizer"
    return model_dir, model, Tokenizer.load(tok_dir)


def _print_piece(s: str) -> None:
    sys.stdout.write(s)
    sys.stdout.flush()


def cmd_chat(args) -> None:
    if args.max_tokens < 1:
        raise C2CError(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    if args.prompt is not None and not args.prompt.strip():
        raise C2CError("the message is empty")
    model_dir, model, tok = load_chat(args)
    opts = dict(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed,
                compile=getattr(args, "compile", False))
    if args.prompt is not None:
        reply_stream(model, tok, [{"role": "user", "content": args.prompt}], on_text=_print_piece, **opts)
        print()
        return
    chat_loop(model, tok, model_dir, **opts)


def chat_loop(model, tok, model_dir, **opts) -> list[dict]:
    """The interactive loop; returns the history when it ends."""
    print(f"chatting with {model_dir} — /reset to start over, /quit to leave")
    history: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return history
        if not line:
            print(HINT)
            continue
        if line == "/quit":
            return history
        if line == "/reset":
            history = []
            print("(history cleared)")
            continue
        user = {"role": "user", "content": line}
        _print_piece("bot> ")
        try:
            reply = reply_stream(model, tok, history + [user], on_text=_print_piece, **opts)
        except KeyboardInterrupt:
            print(" [stopped]")
            continue
        print()
        if reply.strip():
            history += [user, {"role": "assistant", "content": reply}]
        else:
            print("(empty reply: this exchange is not kept)")


def register_serve(sub) -> None:
    """`c2c serve`'s arguments, here so that building the CLI does not import the web server."""
    text = "serve a model over an OpenAI-compatible HTTP API, with a chat page"
    p = sub.add_parser("serve", help=text, description=text[0].upper() + text[1:] + ": POST "
                       "/v1/chat/completions (streaming too), GET /v1/models, GET /health, and the chat page "
                       "at /.")
    p.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run directory (default: runs/tiny)")
    p.add_argument("--stage", default=None,
                   help=f"model folder in the run directory (default: the latest of {', '.join(CHAT_STAGES)} "
                        "present)")
    p.add_argument("--model", type=Path, default=None, help="a model folder (overrides --out/--stage)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--tools", action=argparse.BooleanOptionalAction, default=False,
                   help="let the model call web search (the run's search index) and Python (default: off)")
