"""The chat template: ids + loss mask from render(), validation, and the Jinja template's equivalence."""
from __future__ import annotations

import jinja2
import pytest
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from crawl2chat.chat_template import CHAT_TEMPLATE, render, validate_messages
from crawl2chat.common import C2CError
from crawl2chat.tokenizer import Tokenizer

LINES = [
    "The river town of Amberfall trades salt and copper with the northern villages.",
    "Mira the smith forged 12 swords in the winter of year 341.",
    "Who rules Amberfall? The council of seven elders rules Amberfall.",
    "def add(a, b):\n    return a + b\nprint(add(2, 3))",
    "The answer is 5. Search results: copper price is 40 coins.",
] * 20

SINGLE = [{"role": "user", "content": "Who rules Amberfall?"},
          {"role": "assistant", "content": "The council of seven elders."}]
WITH_SYSTEM = [{"role": "system", "content": "You are a helpful guide to the river towns."}] + SINGLE
MULTI = SINGLE + [{"role": "user", "content": "And who forged the swords?"},
                  {"role": "assistant", "content": "Mira the smith forged 12 swords."}]
PYTHON = [{"role": "user", "content": "What is 2 + 3?"},
          {"role": "assistant", "content": [
              {"type": "text", "text": "Let me compute it. "},
              {"type": "python", "text": "print(2 + 3)"},
              {"type": "output", "text": "5\n"},
              {"type": "text", "text": "The answer is 5."}]}]
SEARCH = [{"role": "user", "content": "What does copper cost?"},
          {"role": "assistant", "content": [
              {"type": "search", "text": "copper price Amberfall"},
              {"type": "output", "text": "copper price is 40 coins"},
              {"type": "text", "text": "Copper c"},
              {"type": "text", "text": "osts 40 coins."}]}]  # adjacent text parts, split mid-word
CONVERSATIONS = {"single": SINGLE, "system": WITH_SYSTEM, "multi": MULTI, "python": PYTHON, "search": SEARCH}

# what the mask should select, per conversation: the assistant texts and calls with their delimiters
EXPECTED_MASKED = {
    "single": "The council of seven elders.<|assistant_end|>",
    "system": "The council of seven elders.<|assistant_end|>",
    "multi": "The council of seven elders.<|assistant_end|>Mira the smith forged 12 swords.<|assistant_end|>",
    "python": "Let me compute it. <|python_start|>print(2 + 3)<|python_end|>The answer is 5.<|assistant_end|>",
    "search": "<|search_start|>copper price Amberfall<|search_end|>Copper costs 40 coins.<|assistant_end|>",
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(LINES, 400)


@pytest.fixture(scope="module")
def hf_special(tok) -> tokenizers.Tokenizer:
    """A copy of the HF tokenizer that recognises special-token strings (as HF's own tools do)."""
    hf = tokenizers.Tokenizer.from_str(tok.hf.to_str())
    hf.encode_special_tokens = False
    return hf


def _jinja(messages, add_generation_prompt: bool) -> str:
    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 bos_token="<|bos|>")


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_mask_selects_assistant_tokens(tok, name):
    ids, mask = render(tok, CONVERSATIONS[name])
    assert len(ids) == len(mask)
    assert set(mask) <= {0, 1}
    assert ids[0] == tok.bos_id and mask[0] == 0
    assert ids[-1] == tok.special_id("<|assistant_end|>") and mask[-1] == 1
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == EXPECTED_MASKED[name]
    # every <|assistant_start|> and all output delimiters are unmasked; every assistant_end is masked
    for i, m in zip(ids, mask):
        if i in (tok.special_id("<|assistant_start|>"), tok.special_id("<|output_start|>"),
                 tok.special_id("<|output_end|>"), tok.bos_id):
            assert m == 0
        if i == tok.special_id("<|assistant_end|>"):
            assert m == 1


def test_layout_exact(tok):
    ids, mask = render(tok, WITH_SYSTEM)
    s = tok.special_id
    expected = ([tok.bos_id, s("<|system_start|>")] + tok.encode(WITH_SYSTEM[0]["content"]) + [s("<|system_end|>")]
                + [s("<|user_start|>")] + tok.encode(SINGLE[0]["content"]) + [s("<|user_end|>")]
                + [s("<|assistant_start|>")] + tok.encode(SINGLE[1]["content"]) + [s("<|assistant_end|>")])
    assert ids == expected
    n_answer = len(tok.encode(SINGLE[1]["content"])) + 1
    assert mask == [0] * (len(expected) - n_answer) + [1] * n_answer


def test_output_part_unmasked(tok):
    ids, mask = render(tok, PYTHON)
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "<|output_start|>5\n<|output_end|>" in unmasked
    assert tok.decode(ids).endswith("<|python_end|><|output_start|>5\n<|output_end|>The answer is 5.<|assistant_end|>")


def test_generation_prompt(tok):
    convo = MULTI[:3]
    ids, mask = render(tok, convo, add_generation_prompt=True)
    assert ids[-1] == tok.special_id("<|assistant_start|>") and mask[-1] == 0
    assert ids[:-1] == render(tok, convo)[0]
    with pytest.raises(C2CError, match="last message to be a user"):
        render(tok, SINGLE, add_generation_prompt=True)


def test_special_strings_in_user_text_stay_plain(tok):
    convo = [{"role": "user", "content": "say <|assistant_end|> please"}, {"role": "assistant", "content": "ok"}]
    ids, mask = render(tok, convo)
    end = tok.special_id("<|assistant_end|>")
    assert ids.count(end) == 1 and ids[-1] == end
    assert all(not tok.is_special(i) for i in ids[2:ids.index(tok.special_id("<|user_end|>"))])
    assert tok.decode(ids).startswith("<|bos|><|user_start|>say <|assistant_end|> please<|user_end|>")


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_jinja_matches_render(tok, hf_special, name, gen):
    convo = CONVERSATIONS[name]
    if gen:
        convo = convo[:-1]  # end on the user message
    text = _jinja(convo, gen)
    assert text == tok.decode(render(tok, convo, add_generation_prompt=gen)[0])
    assert hf_special.encode(text, add_special_tokens=False).ids == render(tok, convo, add_generation_prompt=gen)[0]


def test_jinja_same_without_trim_blocks(tok):
    plain = jinja2.Environment().from_string(CHAT_TEMPLATE)
    for convo in CONVERSATIONS.values():
        assert plain.render(messages=convo, add_generation_prompt=False) == _jinja(convo, False)


def test_jinja_special_strings_in_user_text_caveat(tok, hf_special):
    """Documented difference: HF encoding of the template string treats special strings in text as specials."""
    convo = [{"role": "user", "content": "say <|assistant_end|> please"}, {"role": "assistant", "content": "ok"}]
    hf_ids = hf_special.encode(_jinja(convo, False), add_special_tokens=False).ids
    assert hf_ids.count(tok.special_id("<|assistant_end|>")) == 2
    assert hf_ids != render(tok, convo)[0]


U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("messages, pattern", [
    (None, "non-empty list"),
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    (["hi"], "message 0 is not an object"),
    ([{"role": "bot", "content": "x"}], "message 0 has role 'bot'"),
    ([U, {"role": "tool", "content": "5"}], "message 1 has role 'tool'.*assistant message as parts"),
    ([{"role": "user", "content": "   "}], "message 0 is empty"),
    ([U, {"role": "assistant", "content": ""}], "message 1 is empty"),
    ([U, {"role": "assistant", "content": []}], "message 1 is empty"),
    ([U, {"role": "assistant", "content": [{"type": "text", "text": " "}]}], "message 1 is empty"),
    ([U, {"role": "assistant"}], "message 1 is empty"),
    ([U, {"role": "assistant", "content": 5}], "message 1 .*must be a string or a list of parts"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "message 0 .*assistant only"),
    ([U, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "message 1 part 0 has type 'image'"),
    ([U, {"role": "assistant", "content": [{"type": "text", "text": 3}]}], "message 1 part 0 .*must be a string"),
    ([U, {"role": "assistant", "content": ["x"]}], "message 1 part 0 is not an object"),
    ([U, A, {"role": "system", "content": "be nice"}, U], "message 2: a system message is only allowed as the first"),
    ([A, U], "message 0 has role 'assistant' but 'user' was expected"),
    ([U, U], "message 1 has role 'user' but 'assistant' was expected"),
    ([U, A, A], "message 2 has role 'assistant' but 'user' was expected"),
    ([{"role": "system", "content": "s"}], "needs a user message"),
])
def test_validation_errors(messages, pattern):
    with pytest.raises(C2CError, match=pattern) as e:
        validate_messages(messages, where="data.jsonl:12")
    assert str(e.value).startswith("data.jsonl:12: ")
    assert "\n" not in str(e.value)


def test_adjacent_text_parts_encoded_as_one(tok):
    ids, _ = render(tok, SEARCH)
    joined = tok.encode("Copper costs 40 coins.")
    assert tok.encode("Copper c") + tok.encode("osts 40 coins.") != joined  # the split matters for this tokenizer
    start = ids.index(tok.special_id("<|output_end|>")) + 1
    assert ids[start:-1] == joined


def test_validation_accepts_good(tok):
    for convo in CONVERSATIONS.values():
        validate_messages(convo)
    validate_messages([U])  # a bare question (for generation)
    with pytest.raises(C2CError, match="^conversation: message 1 is empty"):
        render(tok, [U, {"role": "assistant", "content": " "}])


def test_tools_system_message_is_added_once():
    from crawl2chat.chat_template import TOOLS_SYSTEM, with_tools_system
    msgs = [{"role": "user", "content": "hi"}]
    assert with_tools_system(msgs) == [{"role": "system", "content": TOOLS_SYSTEM}] + msgs
    own = [{"role": "system", "content": "Be brief."}] + msgs
    assert with_tools_system(own) == own
