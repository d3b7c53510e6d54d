"""`c2c chat`: talk to a chat model in the terminal, its replies streamed as they are generated.

Interactive: /reset clears the history, /quit (or Ctrl-D) leaves; Ctrl-C stops the reply being
generated (it is not kept), Ctrl-C at the prompt leaves. One shot: `c2c chat -p TEXT` prints the reply.
With tools (the default for models trained to use them), web search and Python run as the model calls
them, and each call and its output is shown in brackets: `[search: query] [output: result] reply`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

from crawl2chat.chat_template import render, with_tools_system
from crawl2chat.common import C2CError
from crawl2chat.engine import fit_prompt, generate_batch, generate_with_tools

CHAT_STAGES = ("rlhf", "rl", "idk", "sft")  # latest first
TOOL_STAGES = ("rlhf", "rl", "idk")  # trained to call tools: chat turns them on by default
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
    p.add_argument("--abstain-threshold", type=float, default=None, metavar="P",
                   help="a reply may open with \"I don't know\" only where the model gives that opening at "
                        "least this probability; 0 = plain decoding (default: the threshold `c2c idk` set for "
                        "its hallucination budget, saved with the model)")
    p.add_argument("--tools", action=argparse.BooleanOptionalAction, default=None,
                   help="let the model call web search (the run's search index) and Python, each call and "
                        f"its output shown as it happens (default: on for the {', '.join(TOOL_STAGES)} "
                        "models, which were trained to use them; --no-tools turns them off)")


def prompt_ids(model, tok, messages, max_tokens: int) -> list[int]:
    """The conversation's ids with the generation prompt; one too long for the context is cut from the
    left (keeping <|bos|>), leaving room for the reply, with a warning on stderr."""
    ids, _ = render(tok, messages, add_generation_prompt=True)
    seq_len = model.cfg.seq_len
    room = max(16, min(max_tokens, seq_len // 2))  # context kept free for the reply
    limit = max(2, seq_len - room)
    if len(ids) > limit:
        ids = fit_prompt(ids, limit, tok.bos_id)
        print(f"warning: the conversation is longer than the context ({seq_len} tokens): "
              f"prompt cut to the last {len(ids)} tokens", file=sys.stderr)
    return ids


class TextStream:
    """Token ids → text pieces as they come, holding back a multi-byte character still incomplete."""

    def __init__(self, tok, on_text: Callable[[str], None]):
        self.tok, self.on_text, self.ids, self.shown = tok, on_text, [], ""

    def add(self, t: int) -> None:
        self.ids.append(t)
        text = self.tok.decode(self.ids).rstrip("\ufffd")
        if len(text) > len(self.shown) and text.startswith(self.shown):
            self.on_text(text[len(self.shown):])
            self.shown = text

    def close(self) -> str:
        """Show whatever was held back; returns the whole text."""
        text = self.tok.decode(self.ids)
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.on_text(text[len(self.shown):])
        self.ids, self.shown = [], ""
        return text


class ToolEcho:
    """A reply with tool calls shown as it is generated: its text streamed, each call and each output
    as `[search: query] ` / `[output: result] ` once complete. Fed (id, kind) by generate_with_tools."""

    def __init__(self, tok, on_text: Callable[[str], None]):
        self.tok, self.on_text = tok, on_text
        self.kind, self.text, self.tool_ids = "text", TextStream(tok, on_text), []

    def __call__(self, t: int, kind: str) -> None:
        if kind != self.kind or kind == "end":
            self.close()
            self.kind = kind
        if self.tok.is_special(t):
            return
        if kind == "text":
            self.text.add(t)
        else:
            self.tool_ids.append(t)

    def close(self) -> None:
        if self.kind == "text":
            self.text.close()
        elif self.kind != "end":
            self.on_text(f"[{self.kind}: {self.tok.decode(self.tool_ids).strip()}] ")
        self.tool_ids = []


def reply_stream(model, tok, messages, *, temperature: float, top_k: int | None, max_tokens: int,
                 on_text: Callable[[str], None], seed: int | None = None, compile: bool = False,
                 tools: dict | None = None) -> str | list[dict]:
    """Generate the assistant's reply to `messages`, passing the text to on_text piece by piece as it
    is generated; returns the whole reply (without <|assistant_end|>). A prompt too long for the context
    is cut from the left (keeping <|bos|>) with a warning on stderr. Ctrl-C propagates.
    With `tools` ({"search": fn, "python": fn}), the tools system message is added unless the
    conversation has a system message, calls run as the model makes them and are shown by ToolEcho, and
    a reply that called a tool is returned as its parts (the chat template's assistant content)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    if tools:
        ids = prompt_ids(model, tok, with_tools_system(messages), max_tokens)
        echo = ToolEcho(tok, on_text)
        new, parts = generate_with_tools(model, tok, ids, max_tokens, tools, temperature=temperature,
                                         top_k=top_k or None, generator=gen, on_token=echo, compile=compile)
        echo.close()
        if all(p["type"] == "text" for p in parts):
            return "".join(p["text"] for p in parts)
        return parts
    ids = prompt_ids(model, tok, messages, max_tokens)
    stops = {tok.special_id("<|assistant_end|>"), tok.bos_id}
    stream = TextStream(tok, on_text)
    generate_batch(model, [ids], max_tokens, temperature=temperature, top_k=top_k or None,
                   stop_ids=sorted(stops), generator=gen, compile=compile,
                   on_token=lambda _b, t: None if t in stops else stream.add(t))
    return stream.close()


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
    threshold = getattr(args, "abstain_threshold", None)
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise C2CError(f"--abstain-threshold must be between 0 and 1 (got {threshold})")
        if threshold > 0 and not model.cfg.abstain_ids:
            raise C2CError(f"{model_dir}: this model has no abstention threshold to set (models from idk on have)")
        model.cfg.abstain_threshold = threshold
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
    use_tools = getattr(args, "tools", None)
    if use_tools is None:
        use_tools = model_dir.name in TOOL_STAGES
    tools = None
    if use_tools:
        from crawl2chat.tools import chat_tools
        tools = chat_tools(model_dir.parent, lambda msg: print(f"warning: {msg}", file=sys.stderr))
    opts = dict(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed,
                compile=getattr(args, "compile", False), tools=tools)
    if args.prompt is not None:
        reply_stream(model, tok, [{"role": "user", "content": args.prompt}], on_text=_print_piece, **opts)
        print()
        return
    chat_loop(model, tok, model_dir, **opts)


def chat_loop(model, tok, model_dir, **opts) -> list[dict]:
    """The interactive loop; returns the history when it ends."""
    tools = ", ".join(sorted(opts.get("tools") or {})) or "off"
    print(f"chatting with {model_dir} (tools: {tools}) — /reset to start over, /quit to leave")
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
        if reply if isinstance(reply, list) else reply.strip():
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
