"""c2c serve: the OpenAI-compatible API driven by the official openai client against a real uvicorn server,
on the smoke run's chat model."""
from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn

from crawl2chat import engine, serve
from crawl2chat.common import C2CError

QUESTIONS = ["Where was {} born?", "What does {} do for a living?", "Who employs {}?",
             "Tell me about {}.", "When was {} born?"]


@contextmanager
def running(app):
    """Serve app with uvicorn on a free port in a background thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on busy cores (the model's worker thread is
    started by the first request and keeps the setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def names(smoke_run):
    people = json.loads((smoke_run / "world" / "facts.json").read_text())["people"]
    return [p["name"] for p in people if p["split"].startswith("known")]


@pytest.fixture(scope="module")
def app(smoke_run, tmp_path_factory):
    """The smoke chat model's shape and tokenizer with seeded random weights: these tests are about the
    server, and their replies must run on to max_tokens, which the 10-step smoke SFT model does not
    promise (it may answer everything in five tokens)."""
    from crawl2chat.train import load_model, save_model
    model = load_model(smoke_run / "sft")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    model_dir = tmp_path_factory.mktemp("serve_model")
    save_model(model, model_dir)
    return serve.create_app(model_dir, smoke_run / "tokenizer", "smoke")


@pytest.fixture(scope="module")
def base_url(app):
    with running(app) as url:
        yield url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)


def ask(client, text, **kw):
    return client.chat.completions.create(model="smoke", messages=[{"role": "user", "content": text}], **kw)


def ask_stream(client, text, **kw) -> tuple[str, list]:
    chunks = list(ask(client, text, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_completion_and_stream_agree(client, names):
    q = QUESTIONS[0].format(names[0])
    r = ask(client, q, temperature=0, max_tokens=20)
    assert r.object == "chat.completion" and r.model == "smoke" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 20 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    text, chunks = ask_stream(client, q, temperature=0, max_tokens=20)
    assert text == choice.message.content
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) > 3  # the reply came in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [choice.finish_reason]
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def long_reply_question(client, names, min_tokens: int, min_chars: int = 0) -> tuple[str, str]:
    """A question whose greedy 30-token reply has at least min_tokens tokens and min_chars characters
    (the smoke model ends some replies after a few tokens), and that reply."""
    seen = []
    for name in names[:8]:
        for q in QUESTIONS:
            r = ask(client, q.format(name), temperature=0, max_tokens=30)
            reply = r.choices[0].message.content
            if r.usage.completion_tokens >= min_tokens and len(reply) >= min_chars:
                return q.format(name), reply
            seen.append(reply)
    pytest.fail(f"premise: no greedy reply of the smoke model has {min_tokens} tokens: {seen}")


def test_stream_usage_and_done(base_url, client, names):
    q, _ = long_reply_question(client, names, 7)
    body = {"messages": [{"role": "user", "content": q}], "temperature": 0,
            "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6


def test_n_choices_and_seed(client, names):
    q = QUESTIONS[2].format(names[2])
    greedy = ask(client, q, temperature=0, max_tokens=12, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content  # greedy: identical

    sampled = ask(client, q, temperature=1.0, max_tokens=12, n=3, seed=7)
    again = ask(client, q, temperature=1.0, max_tokens=12, n=3, seed=7)
    texts = [c.message.content for c in sampled.choices]
    assert texts == [c.message.content for c in again.choices]  # seeded: reproducible
    assert len(set(texts)) > 1  # but the choices differ from each other
    assert sampled.usage.completion_tokens >= 3  # counted over all choices

    chunks = list(ask(client, q, temperature=0, max_tokens=12, n=2, stream=True))
    streamed = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
                for i in (0, 1)}
    assert streamed == {0: greedy.choices[0].message.content, 1: greedy.choices[1].message.content}


def test_stop_cuts_the_text(client, names):
    q, full = long_reply_question(client, names, 2, min_chars=6)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    expected = full[:full.find(stop)]
    r = ask(client, q, temperature=0, max_tokens=30, stop=[stop, "\x00never"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= 30
    text, chunks = ask_stream(client, q, temperature=0, max_tokens=30, stop=stop)  # a string works too
    assert text == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_gives_length(client, names):
    q = QUESTIONS[4].format(names[4])
    full = ask(client, q, temperature=0, max_tokens=20)
    assert full.usage.completion_tokens > 3  # the reply is longer than the limit below
    r = ask(client, q, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert full.choices[0].message.content.startswith(r.choices[0].message.content)


def test_prompt_longer_than_context_is_cut(client, app):
    long = " ".join(f"word{i}" for i in range(400))
    r = ask(client, long, temperature=0, max_tokens=8)
    assert r.choices[0].message.content is not None
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= app.state.model.cfg.seq_len


def test_content_as_text_parts_and_system_message(client, names):
    q = QUESTIONS[0].format(names[1])
    plain = ask(client, q, temperature=0, max_tokens=10).choices[0].message.content
    parts = client.chat.completions.create(
        model="smoke", temperature=0, max_tokens=10,
        messages=[{"role": "user", "content": [{"type": "text", "text": q[:5]}, {"type": "text", "text": q[5:]}]}])
    assert parts.choices[0].message.content == plain
    r = client.chat.completions.create(model="smoke", temperature=0, max_tokens=10, messages=[
        {"role": "system", "content": "You answer questions about people."}, {"role": "user", "content": q},
        {"role": "assistant", "content": plain}, {"role": "user", "content": "Are you sure?"}])
    assert r.usage.prompt_tokens > parts.usage.prompt_tokens  # the whole conversation was read


def test_models_health_and_page(client, base_url):
    assert [m.id for m in client.models.list().data] == ["smoke"]
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"
    page = httpx.get(f"{base_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text and "<textarea" in page.text


USER = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("body, needle", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "   "}]}, "empty"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": USER, "temperature": -0.5}, "temperature"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER + [{"role": "assistant", "content": "hi"}]}, "user"),
    ({"messages": USER + USER}, "assistant"),
    ("{\"messages\": [", "JSON"),
    ("[1, 2]", "object"),
])
def test_bad_requests_get_400_with_a_message(base_url, body, needle):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) \
        else {"json": body}
    r = httpx.post(f"{base_url}/v1/chat/completions", timeout=30, **kw)
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert needle.lower() in msg.lower(), msg


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        ask(client, "hi", temperature=-1)


def test_concurrent_streams_do_not_mix(client, names):
    # seeded sampling: each request's reply is fixed by its seed, and different requests differ
    prompts = [q.format(n) for q, n in zip(QUESTIONS, names)]
    alone = [ask(client, p, temperature=1.0, seed=i, max_tokens=24).choices[0].message.content
             for i, p in enumerate(prompts)]
    assert len(set(alone)) > 1  # different replies: mixing would show
    gate = threading.Barrier(len(prompts))

    def streamed(i):
        gate.wait()
        return ask_stream(client, prompts[i], temperature=1.0, seed=i, max_tokens=24)[0]

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(streamed, range(len(prompts))))
    assert together == alone


@pytest.fixture
def slow_model(app, monkeypatch):
    """Every forward pass of the served model takes 50 ms more, and its replies never end before the
    length limit (the end tokens are masked)."""
    model, tok = app.state.model, app.state.tok
    forward = model.forward
    ends = [tok.special_id("<|assistant_end|>"), tok.bos_id]

    def slow(*a, **kw):
        time.sleep(0.05)
        logits = forward(*a, **kw)
        logits[..., ends] = float("-inf")
        return logits
    monkeypatch.setattr(model, "forward", slow)


def test_generation_does_not_block_the_server(base_url, slow_model):
    body = {"messages": USER, "temperature": 0, "max_tokens": 40, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk: generation is under way
        t0 = time.perf_counter()
        assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
        assert time.perf_counter() - t0 < 0.5  # answered while the model generates (~2 s in all)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and len(rest) > 20  # most of the reply came after /health answered


def test_a_closed_stream_stops_its_generation(base_url, slow_model):
    body = {"messages": USER, "temperature": 0, "max_tokens": 40, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        for _ in range(3):
            next(events)
    t0 = time.perf_counter()  # the client went away after 2 of up to 40 tokens (~2 s if left to run)
    r = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": USER, "max_tokens": 1}, timeout=60)
    assert r.status_code == 200
    assert time.perf_counter() - t0 < 1.2


def test_tool_parts_are_shown(smoke_run, monkeypatch):
    """A scripted sampler makes the model call Python; the real engine runs it; the server shows the call
    and its output as parts, and keeps them out of `content`."""
    app = serve.create_app(smoke_run / "sft", smoke_run / "tokenizer", "smoke-tools", tools=True)
    tok = app.state.tok
    sid = tok.special_id
    script = ([*tok.encode("Let me compute."), sid("<|python_start|>"), *tok.encode("6*7"),
               sid("<|python_end|>"), *tok.encode("It is 42."), sid("<|assistant_end|>")])

    state = {"next": iter(script)}
    monkeypatch.setattr(engine, "sample_next", lambda *a, **kw: torch.tensor([next(state["next"])]))
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        r = ask(client, "what is six times seven?", max_tokens=40)
        state["next"] = iter(script)
        chunks = list(ask(client, "what is six times seven?", max_tokens=40, stream=True))
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert msg.content == "Let me compute.It is 42."
    parts = msg.model_extra["parts"]
    assert [p["type"] for p in parts] == ["text", "python", "output", "text"]
    assert parts[1]["text"] == "6*7" and parts[2]["text"].strip() == "42"  # the sandbox really ran it
    tools = [c.choices[0].delta.model_extra.get("tool") for c in chunks]
    streamed: dict[int, dict] = {}
    for t in filter(None, tools):
        streamed.setdefault(t["index"], {"type": t["type"], "text": ""})["text"] += t["text"]
    assert streamed == {1: parts[1], 2: parts[2]}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content


def test_cli(smoke_run, tmp_path, monkeypatch):
    parser = argparse.ArgumentParser(prog="c2c")
    serve.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--out", str(smoke_run), "--port", "0"])
    assert (args.host, args.tools, args.stage) == ("127.0.0.1", False, None)
    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: seen.update(app=self.config.app,
                                                                                  sock=sockets[0]))
    serve.cmd_serve(args)
    assert seen["app"].state.model.cfg.seq_len > 0 and seen["sock"].getsockname()[1] > 0
    seen["sock"].close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args.port = busy.getsockname()[1]
        with pytest.raises(C2CError, match="cannot listen"):
            serve.cmd_serve(args)
    args.port = 70000
    with pytest.raises(C2CError, match="--port"):
        serve.cmd_serve(args)
    with pytest.raises(C2CError, match="no model"):
        serve.cmd_serve(parser.parse_args(["serve", "--out", str(tmp_path)]))

