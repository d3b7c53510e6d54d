"""`c2c serve`: an OpenAI-compatible HTTP API and a chat page, for one model.

    POST /v1/chat/completions   the OpenAI schema: temperature, top_p, max_tokens, stop, n, seed, stream
                                (server-sent chat.completion.chunk events, then `data: [DONE]`)
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", ...}
    GET  /                      the chat page (web/index.html)

One worker thread runs the model, one request at a time in arrival order, so concurrent requests never
mix; its tokens reach the event loop through an asyncio queue, so the server stays responsive while it
generates. A streamed request whose client goes away is stopped at its next token.

Tool calls. The assistant's reply is a list of parts in order: text, and (with --tools, or whenever the
model writes the delimiters) tool parts {"type": "search"|"python"|"output", "text": ...}, "output" being
the tool's result. OpenAI's `content` carries the text parts only, so an ordinary client sees the answer;
the tool parts travel in an extra field:
    response   choices[i].message.parts = [{"type", "text"}, ...]  (every part, text included; only
               present when the reply has a tool part)
    stream     choices[i].delta.tool = {"index": k, "type": ..., "text": piece}: append piece to part k
               (text pieces come as delta.content, as usual)
Send a reply back in a later request as an assistant message whose content is that parts list.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator

from crawl2chat.chat import CHAT_STAGES, find_model_dir, register_serve as register  # noqa: F401 (the CLI's arguments)
from crawl2chat.chat_template import render, with_tools_system
from crawl2chat.common import C2CError
from crawl2chat.engine import fit_prompt, generate_batch

log = logging.getLogger("crawl2chat.serve")
TOOL_TYPES = ("search", "python", "output")


# ---------------------------------------------------------------------------------------------- requests

class Part(BaseModel):
    type: Literal["text", "search", "python", "output"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]

    @field_validator("content")
    @classmethod
    def not_empty(cls, v):
        text = v if isinstance(v, str) else "".join(p.text for p in v)
        if not text.strip():
            raise ValueError("content is empty")
        return v


class ChatRequest(BaseModel):
    model: str | None = None  # one model is served: any name is accepted
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's, but common (vLLM); 0 or None = all tokens
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None

    @field_validator("stop")
    @classmethod
    def stop_list(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return [s for s in stops if s]


def to_conversation(req: ChatRequest) -> list[dict]:
    """Request messages → the chat template's conversation. A system/user content given as OpenAI text
    parts is joined into one string; assistant parts (text and tool parts) are kept as they are."""
    out = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):
            parts = [p.model_dump() for p in content]
            if m.role != "assistant" and all(p["type"] == "text" for p in parts):
                content = "".join(p["text"] for p in parts)
            else:
                content = parts
        out.append({"role": m.role, "content": content})
    return out


# ------------------------------------------------------------------------------------ tokens → reply

class ReplyParser:
    """One choice's generated ids → deltas as they arrive: {"content": piece} for text and
    {"tool": {"index", "type", "text"}} for tool parts. Holds back an incomplete multi-byte character and
    a text tail that may begin a stop string; cuts the text at a stop string."""

    def __init__(self, tok, stops: list[str]):
        sid = tok.special_id
        self.tok, self.stops = tok, stops
        self.opens = {sid(f"<|{k}_start|>"): k for k in TOOL_TYPES}
        self.closes = {sid(f"<|{k}_end|>") for k in TOOL_TYPES}
        self.ends = {sid("<|assistant_end|>"), tok.bos_id}
        self.parts: list[dict] = []
        self.kind, self.seg, self.shown, self.part = "text", [], "", None
        self.n_tokens = 0
        self.finish: str | None = None

    def feed(self, t: int) -> list[dict]:
        if self.finish:
            return []
        self.n_tokens += 1
        if t in self.ends or t in self.opens or t in self.closes:
            out = self._emit(final=True)
            if t in self.ends:
                self.finish = "stop"
            if not self.finish:  # a new segment begins
                self.kind, self.seg, self.shown, self.part = self.opens.get(t, "text"), [], "", None
            return out
        if self.tok.is_special(t):  # a stray role token: not shown
            return []
        self.seg.append(t)
        return self._emit(final=False)

    def close(self, reason: str = "length") -> list[dict]:
        """The generation ended without a stop: flush what was held back."""
        if self.finish:
            return []
        out = self._emit(final=True)
        self.finish = self.finish or reason
        return out

    def _emit(self, final: bool) -> list[dict]:
        text = self.tok.decode(self.seg)
        if not final:
            text = text.rstrip("\ufffd")
        if self.kind == "text" and self.stops:
            cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                text, self.finish = text[:cut], "stop"
            elif not final:
                text = text[:len(text) - _stop_prefix_len(text, self.stops)]
        if len(text) <= len(self.shown) or not text.startswith(self.shown):
            return []
        piece, self.shown = text[len(self.shown):], text
        if self.part is None:
            self.part = {"type": self.kind, "text": ""}
            self.parts.append(self.part)
        self.part["text"] += piece
        if self.kind == "text":
            return [{"content": piece}]
        return [{"tool": {"index": len(self.parts) - 1, "type": self.kind, "text": piece}}]

    def message(self) -> dict:
        msg = {"role": "assistant", "content": "".join(p["text"] for p in self.parts if p["type"] == "text")}
        if any(p["type"] != "text" for p in self.parts):
            msg["parts"] = [dict(p) for p in self.parts]
        return msg


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is the beginning of a stop string."""
    for n in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


# ------------------------------------------------------------------------------------------ generation

class Done(Exception):
    """Stop generating: the request was cancelled, or every choice being generated has finished."""


@dataclass
class Job:
    ids: list[int]  # the prompt, already fitted to the context
    n: int
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stops: list[str]
    emit: Callable[[tuple], None]  # called from the worker thread with ("delta", i, delta) / ("finish", i, reason)
    cancel: threading.Event = field(default_factory=threading.Event)


def run_job(model, tok, job: Job, tools: dict | None) -> list[ReplyParser]:
    """Generate job.n replies to one prompt (in the worker thread), emitting deltas as they come."""
    parsers = [ReplyParser(tok, job.stops) for _ in range(job.n)]
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(job.seed) if job.seed is not None else None
    opts = dict(temperature=job.temperature, top_k=job.top_k or None, top_p=job.top_p, generator=gen)

    def feed(i: int, t: int, active: range) -> None:
        if job.cancel.is_set():
            raise Done
        p = parsers[i]
        was_done = p.finish is not None
        for d in p.feed(t):
            job.emit(("delta", i, d))
        if p.finish and not was_done:
            job.emit(("finish", i, p.finish))
        if all(parsers[j].finish for j in active):
            raise Done  # e.g. a stop string: no need to go on

    stop_ids = sorted(parsers[0].ends)
    if tools is None:
        try:
            generate_batch(model, [job.ids] * job.n, job.max_tokens, stop_ids=stop_ids,
                           on_token=lambda i, t: feed(i, t, range(job.n)), **opts)
        except Done:
            pass
    else:
        from crawl2chat.engine import generate_with_tools
        for i in range(job.n):  # one conversation at a time: each choice calls its own tools
            if job.cancel.is_set():
                break
            try:
                generate_with_tools(model, tok, job.ids, job.max_tokens, tools,
                                    on_token=lambda t, *_, i=i: feed(i, t, range(i, i + 1)), **opts)
            except Done:
                pass
            _close(parsers[i], i, job)
    for i, p in enumerate(parsers):
        _close(p, i, job)
    return parsers


def _close(p: ReplyParser, i: int, job: Job) -> None:
    if p.finish:
        return
    for d in p.close("length"):
        job.emit(("delta", i, d))
    job.emit(("finish", i, p.finish))


def fit_job_prompt(ids: list[int], seq_len: int, max_tokens: int | None, bos_id: int) -> tuple[list[int], int]:
    """Cut a prompt too long for the context from the left, keeping room for the reply (as `c2c chat`
    does); returns (ids, max new tokens). No max_tokens: keep room for 256, generate while the context
    lasts."""
    room = max(16, min(max_tokens or 256, seq_len // 2))
    limit = max(2, seq_len - room)
    if len(ids) > limit:
        log.warning("prompt of %d tokens cut to the last %d (context %d)", len(ids), limit, seq_len)
        ids = fit_prompt(ids, limit, bos_id)
    return ids, min(max_tokens or seq_len, seq_len - len(ids))


# ---------------------------------------------------------------------------------------------- the app

def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": None}}, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    e = exc.errors()[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({e.get('msg')})", None
    where = ".".join(loc) or "body"
    msg = e.get("msg", "invalid value").removeprefix("Value error, ")
    return f"{where}: {msg}", where


def load_tools(run_dir: Path) -> dict[str, Callable[[str], str]]:
    """The tools the model may call: Python always, web search when the run has a search index."""
    try:
        from crawl2chat import tools
        from crawl2chat.engine import generate_with_tools  # noqa: F401 - checked here, used in run_job
    except ImportError as e:
        raise C2CError(f"tool calls are not available in this installation ({e})") from None
    return tools.chat_tools(run_dir, log.warning)


def create_app(model_dir: Path, tokenizer_dir: Path, model_name: str, tools: bool = False) -> FastAPI:
    from crawl2chat.tokenizer import Tokenizer
    from crawl2chat.train import load_model, pick_device
    model = load_model(Path(model_dir), pick_device()).eval()
    tok = Tokenizer.load(tokenizer_dir)
    tool_fns = load_tools(Path(model_dir).parent) if tools else None
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="c2c-model")
    page = resources.files("crawl2chat").joinpath("web/index.html").read_text(encoding="utf-8")
    created = int(time.time())

    app = FastAPI(title="crawl2chat", docs_url=None, redoc_url=None)
    app.state.model, app.state.tok, app.state.worker = model, tok, worker

    @app.exception_handler(RequestValidationError)
    async def bad_request(_req: Request, exc: RequestValidationError):
        return _error(400, *_validation_message(exc))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "tools": sorted(tool_fns or {})}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "crawl2chat", "context_length": model.cfg.seq_len,
                                            "tools": sorted(tool_fns or {})}]}

    @app.post("/v1/chat/completions")
    async def completions(req: ChatRequest):
        conversation = to_conversation(req)
        if tool_fns:  # the model calls tools only under the system message it was trained with
            conversation = with_tools_system(conversation)
        try:
            ids, _ = render(tok, conversation, add_generation_prompt=True)
        except C2CError as e:
            return _error(400, str(e).removeprefix("conversation: "), "messages")
        ids, max_new = fit_job_prompt(ids, model.cfg.seq_len, req.max_tokens or req.max_completion_tokens,
                                      tok.bos_id)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(ids=ids, n=req.n, max_tokens=max_new, temperature=req.temperature,
                  top_p=req.top_p if req.top_p < 1 else None, top_k=req.top_k, seed=req.seed, stops=req.stop,
                  emit=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))

        def work():
            try:
                return run_job(model, tok, job, tool_fns)
            finally:
                job.emit(None)  # the end of the events

        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_name}
        future = loop.run_in_executor(worker, work)
        if not req.stream:
            while await queue.get() is not None:
                pass
            parsers = await future
            return {**head, "object": "chat.completion",
                    "choices": [{"index": i, "message": p.message(), "finish_reason": p.finish}
                                for i, p in enumerate(parsers)],
                    "usage": _usage(len(ids), parsers)}
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(head, job, queue, future, len(ids), include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _usage(prompt_tokens: int, parsers: list[ReplyParser]) -> dict:
    done = sum(p.n_tokens for p in parsers)  # over all choices; the prompt is counted once, as OpenAI does
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}


async def _sse(head: dict, job: Job, queue: asyncio.Queue, future, prompt_tokens: int, include_usage: bool):
    def chunk(choices: list[dict], **extra) -> str:
        return "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": choices,
                                      **extra}) + "\n\n"
    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(job.n)])
        while (ev := await queue.get()) is not None:
            kind, i, value = ev
            if kind == "delta":
                yield chunk([{"index": i, "delta": value, "finish_reason": None}])
            else:
                yield chunk([{"index": i, "delta": {}, "finish_reason": value}])
        try:
            parsers = await future
        except Exception as e:  # noqa: BLE001 - the stream has begun: report the error in it
            log.exception("generation failed")
            yield "data: " + json.dumps({"error": {"message": f"generation failed: {e}",
                                                   "type": "server_error"}}) + "\n\n"
            return
        if include_usage:
            yield chunk([], usage=_usage(prompt_tokens, parsers))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # the client went away (or all is sent): stop generating


# ------------------------------------------------------------------------------------------------- CLI

def serve(args) -> None:
    import socket
    import uvicorn
    model_dir = find_model_dir(args)
    tok_dir = model_dir if (model_dir / "tokenizer.json").exists() else args.out / "tokenizer"
    name = f"{model_dir.parent.name}/{model_dir.name}"
    app = create_app(model_dir, tok_dir, name, tools=args.tools)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise C2CError(f"{args.host}:{args.port}: cannot listen ({e.strerror})") from None
    print(f"serving {model_dir} as {name!r} on http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def cmd_serve(args) -> None:
    if not 0 <= args.port <= 65535:
        raise C2CError(f"--port must be between 0 and 65535 (got {args.port})")
    serve(args)
