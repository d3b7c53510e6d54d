"""The chat format: a conversation → token ids + a loss mask, and the same format as a Jinja chat template.

Layout (no spaces or newlines are inserted between segments):

    <|bos|>
    [<|system_start|> text <|system_end|>]
    <|user_start|> text <|user_end|>
    <|assistant_start|> content <|assistant_end|>
    ...
    [<|assistant_start|>]                       (add_generation_prompt=True)

An assistant's content is a string, or a list of parts {"type": ..., "text": ...} rendered in order:
    text   → its tokens
    python → <|python_start|> code <|python_end|>
    search → <|search_start|> query <|search_end|>
    output → <|output_start|> result <|output_end|>     (the tool's result: not trained on)

The mask is 1 on what the model should learn to produce: every assistant token (text, python/search calls
with their delimiters) and <|assistant_end|>; 0 on <|bos|>, system, user, <|assistant_start|> and on
output parts including their delimiters.

Text is encoded with `Tokenizer.encode`, so a special-token string inside a message (e.g. a user typing
"<|assistant_end|>") stays plain text. Caveat: the Jinja template (CHAT_TEMPLATE) produces one string, and
Hugging Face tools that encode it with special tokens recognised will turn such strings into special ids;
for ordinary text both paths give the same ids.
"""
from __future__ import annotations

from crawl2chat.common import C2CError

ROLES = ("system", "user", "assistant", "tool")
PART_TYPES = ("text", "python", "search", "output")

# part type → (start, end) delimiters; "text" has none
_DELIMS = {"python": ("<|python_start|>", "<|python_end|>"),
           "search": ("<|search_start|>", "<|search_end|>"),
           "output": ("<|output_start|>", "<|output_end|>")}


# The system message under which the model was trained to call tools (idk stage); without it, it answers
# from memory. A conversation that has its own system message keeps it.
TOOLS_SYSTEM = "Tools: search, python."


def with_tools_system(messages: list[dict]) -> list[dict]:
    """`messages` with the tools system message first, unless they begin with a system message."""
    if messages and messages[0].get("role") == "system":
        return messages
    return [{"role": "system", "content": TOOLS_SYSTEM}] + list(messages)


def _fail(where: str, msg: str) -> None:
    raise C2CError(f"{where}: {msg}")


def validate_messages(messages, where: str = "conversation") -> None:
    """Raise a one-line C2CError (prefixed with `where`) if `messages` is not a valid conversation.

    Messages are numbered from 0 (their index in the list).
    """
    if not isinstance(messages, list) or not messages:
        _fail(where, "messages must be a non-empty list")
    for n, m in enumerate(messages):
        if not isinstance(m, dict):
            _fail(where, f"message {n} is not an object (got {type(m).__name__})")
        role = m.get("role")
        if role not in ROLES:
            _fail(where, f"message {n} has role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "tool":
            _fail(where, f"message {n} has role 'tool', which this format does not use: put tool calls and "
                         f"their results in the assistant message as parts (python/search/output)")
        content = m.get("content")
        if isinstance(content, str):
            if not content.strip():
                _fail(where, f"message {n} is empty")
        elif isinstance(content, list):
            if role != "assistant":
                _fail(where, f"message {n} ({role}): content must be a string (parts lists are for assistant only)")
            if not content:
                _fail(where, f"message {n} is empty")
            for k, p in enumerate(content):
                if not isinstance(p, dict):
                    _fail(where, f"message {n} part {k} is not an object (got {type(p).__name__})")
                if p.get("type") not in PART_TYPES:
                    _fail(where, f"message {n} part {k} has type {p.get('type')!r}; "
                                 f"expected one of {', '.join(PART_TYPES)}")
                if not isinstance(p.get("text"), str):
                    _fail(where, f"message {n} part {k} ({p['type']}): \"text\" must be a string")
            if not any(p["text"].strip() for p in content):
                _fail(where, f"message {n} is empty")
        elif content is None:
            _fail(where, f"message {n} is empty")
        else:
            _fail(where, f"message {n} ({role}): content must be a string"
                         + (" or a list of parts" if role == "assistant" else "")
                         + f", got {type(content).__name__}")
        if role == "system" and n != 0:
            _fail(where, f"message {n}: a system message is only allowed as the first message")
    start = 1 if messages[0]["role"] == "system" else 0
    for n in range(start, len(messages)):
        expected = "user" if (n - start) % 2 == 0 else "assistant"
        if messages[n]["role"] != expected:
            _fail(where, f"message {n} has role {messages[n]['role']!r} but {expected!r} was expected "
                         f"(after the optional system message, user and assistant alternate, starting with user)")
    if start == 1 and len(messages) == 1:
        _fail(where, "a conversation needs a user message after the system message")


def _parts(content) -> list[tuple[str, str]]:
    """Assistant content → [(type, text)], with adjacent text parts merged (as the Jinja string would
    concatenate them, so both paths encode them as one piece)."""
    if isinstance(content, str):
        return [("text", content)]
    out: list[tuple[str, str]] = []
    for p in content:
        if p["type"] == "text" and out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + p["text"])
        else:
            out.append((p["type"], p["text"]))
    return out


def render(tok, messages, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Render a conversation (validated first) to (ids, mask); see the module docstring."""
    validate_messages(messages)
    if add_generation_prompt and messages[-1]["role"] != "user":
        raise C2CError("conversation: add_generation_prompt needs the last message to be a user message")
    sid = tok.special_id
    ids: list[int] = []
    mask: list[int] = []

    def add(new: list[int], m: int) -> None:
        ids.extend(new)
        mask.extend([m] * len(new))

    add([tok.bos_id], 0)
    for m in messages:
        role = m["role"]
        if role in ("system", "user"):
            add([sid(f"<|{role}_start|>")] + tok.encode(m["content"]) + [sid(f"<|{role}_end|>")], 0)
            continue
        add([sid("<|assistant_start|>")], 0)
        for kind, text in _parts(m["content"]):
            if kind == "text":
                add(tok.encode(text), 1)
            else:
                start, end = _DELIMS[kind]
                add([sid(start)] + tok.encode(text) + [sid(end)], 0 if kind == "output" else 1)
        add([sid("<|assistant_end|>")], 1)
    if add_generation_prompt:
        add([sid("<|assistant_start|>")], 0)
    return ids, mask


# The same layout for Hugging Face (`tokenizer_config.json` "chat_template"). Every tag strips the
# whitespace around it, so the output does not depend on trim_blocks/lstrip_blocks.
CHAT_TEMPLATE = """\
{{- '<|bos|>' -}}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}
    {{- '<|system_start|>' + message['content'] + '<|system_end|>' -}}
  {%- elif message['role'] == 'user' -%}
    {{- '<|user_start|>' + message['content'] + '<|user_end|>' -}}
  {%- elif message['role'] == 'assistant' -%}
    {{- '<|assistant_start|>' -}}
    {%- if message['content'] is string -%}
      {{- message['content'] -}}
    {%- else -%}
      {%- for part in message['content'] -%}
        {%- if part['type'] == 'text' -%}
          {{- part['text'] -}}
        {%- elif part['type'] == 'python' -%}
          {{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}
        {%- elif part['type'] == 'search' -%}
          {{- '<|search_start|>' + part['text'] + '<|search_end|>' -}}
        {%- elif part['type'] == 'output' -%}
          {{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}
        {%- else -%}
          {{- raise_exception('unknown part type: ' + part['type']) -}}
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
    {{- '<|assistant_end|>' -}}
  {%- else -%}
    {{- raise_exception('unsupported role: ' + message['role']) -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|assistant_start|>' -}}
{%- endif -%}
"""
