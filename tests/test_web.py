"""The chat page (web/index.html) in real headless Chromium, driven by Playwright, against a real server
on the smoke run's chat model. Needs /usr/bin/chromium (Debian's `chromium`) and the `playwright` package;
nothing is downloaded."""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import uvicorn

from crawl2chat import serve

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000


def _installing() -> bool:
    """Is apt/dpkg running (chromium may be on its way)?"""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in ("apt", "apt-get", "dpkg", "aptitude", "unattended-upgr"):
                return True
        except OSError:
            pass
    return False


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


@pytest.fixture(scope="module")
def browser():
    deadline = time.time() + 600
    while not CHROMIUM.exists() and _installing() and time.time() < deadline:
        time.sleep(2)  # apt is still installing it
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the web page tests need Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the web page tests need the playwright package (pip install playwright; "
                    "no browser download: the system chromium is used)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def app(smoke_run):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest (the model's worker thread inherits it)
    yield serve.create_app(smoke_run / "sft", smoke_run / "tokenizer", "smoke")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_url(app):
    with running(app) as url:
        yield url


@pytest.fixture
def page(browser, base_url):
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    bodies = []  # the JSON body of each completion request the page makes
    pg.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    pg.bodies = bodies
    pg.goto(base_url + "/")
    pg.evaluate("""const stopButton = document.getElementById("stop");
                   new MutationObserver(() => { if (!stopButton.hidden) window.stopWasShown = true; })
                   .observe(stopButton, {attributes: true})""")
    yield pg
    context.close()


def send(page, text: str) -> None:
    """Type a message, press Enter, wait until the reply is over; check the stop button came and went."""
    n = page.locator(".msg.assistant").count()
    page.evaluate("window.stopWasShown = false")
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length > {n} "
                           "&& !document.querySelector('.streaming')")
    assert page.evaluate("window.stopWasShown") and page.is_hidden("#stop") and page.is_visible("#send")


def test_chat_streams_an_answer_and_keeps_the_conversation(page, smoke_run, tmp_path):
    people = json.loads((smoke_run / "world" / "facts.json").read_text())["people"]
    name = next(p["name"] for p in people if p["split"].startswith("known"))
    question = f"Where was {name} born?"
    page.fill("#temperature", "0")
    assert page.text_content("#temperature-value") == "0.00"
    page.wait_for_function("document.getElementById('model').textContent.includes('smoke')")

    send(page, question)
    assert page.locator(".msg.user .body").first.inner_text() == question
    answer = page.locator(".msg.assistant .body .text").first.inner_text()
    assert answer.strip()
    assert page.locator(".msg.assistant .error").count() == 0

    send(page, "And where does he work?")  # a second turn carries the first one
    assert page.locator(".msg.user").count() == 2 and page.locator(".msg.assistant").count() == 2
    first, second = page.bodies
    assert first["stream"] is True and first["temperature"] == 0
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][0]["content"] == question
    assert second["messages"][1]["content"].strip() == answer.strip()

    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    if os.environ.get("C2C_KEEP_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["C2C_KEEP_SCREENSHOTS"]) / "chat.png")

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.is_visible("#empty")
    send(page, "hello")
    assert [m["role"] for m in page.bodies[-1]["messages"]] == ["user"]  # a new chat starts afresh


def test_stop_button_stops_the_reply(page, app, monkeypatch):
    model, tok = app.state.model, app.state.tok
    forward = model.forward
    ends = [tok.special_id("<|assistant_end|>"), tok.bos_id]

    def slow(*a, **kw):  # a reply takes seconds and never ends before the length limit: time to press stop
        time.sleep(0.1)
        logits = forward(*a, **kw)
        logits[..., ends] = float("-inf")
        return logits
    monkeypatch.setattr(model, "forward", slow)
    page.fill("#input", "tell me a long story")
    page.click("#send")
    page.wait_for_selector(".msg.assistant .text")  # the first words are in
    t0 = time.time()
    page.click("#stop")
    page.wait_for_selector("#send", state="visible")
    assert time.time() - t0 < 2
    assert page.is_hidden("#stop")
    assert page.locator(".msg.assistant .note").inner_text().startswith("stopped")


SSE = [{"delta": {"role": "assistant", "content": ""}}, {"delta": {"content": "Let me check. "}},
       {"delta": {"tool": {"index": 1, "type": "search", "text": "Bair Basla "}}},
       {"delta": {"tool": {"index": 1, "type": "search", "text": "birthplace"}}},
       {"delta": {"tool": {"index": 2, "type": "output", "text": "Bair Basla was born in Ditos."}}},
       {"delta": {"tool": {"index": 3, "type": "python", "text": "2026 - 1944"}}},
       {"delta": {"tool": {"index": 4, "type": "output", "text": "82"}}},
       {"delta": {"content": "He was born in Ditos, 82 years ago."}}, {"delta": {}, "finish_reason": "stop"}]


def test_tool_parts_are_shown_apart(page, tmp_path):
    body = "".join("data: " + json.dumps({"object": "chat.completion.chunk",
                                          "choices": [{"index": 0, "finish_reason": None, **c}]}) + "\n\n"
                   for c in SSE) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    send(page, "Where was Bair Basla born, and how long ago?")
    reply = page.locator(".msg.assistant .body")
    assert reply.locator(".tool.search pre").inner_text() == "Bair Basla birthplace"
    assert reply.locator(".tool.python pre").inner_text() == "2026 - 1944"
    assert reply.locator(".tool.output pre").all_inner_texts() == ["Bair Basla was born in Ditos.", "82"]
    assert reply.locator(".text").all_inner_texts() == ["Let me check. ", "He was born in Ditos, 82 years ago."]
    labels = reply.locator(".tool .label").all_inner_texts()
    assert [s.lower() for s in labels] == ["web search", "result", "python", "result"]
    shot = tmp_path / "tools.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("C2C_KEEP_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["C2C_KEEP_SCREENSHOTS"]) / "tools.png")

    send(page, "thanks")  # the tool parts go back to the server as the assistant's parts
    sent = page.bodies[-1]["messages"][1]["content"]
    assert [p["type"] for p in sent] == ["text", "search", "output", "python", "output", "text"]


def test_server_errors_are_shown(page):
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=400, content_type="application/json",
        body=json.dumps({"error": {"message": "messages.0.content: content is empty"}})))
    send(page, "hi")
    assert "content is empty" in page.locator(".msg.assistant .error").inner_text()
    send(page, "hi again")
    assert [m["role"] for m in page.bodies[-1]["messages"]] == ["user"]  # the failed turn was not kept

