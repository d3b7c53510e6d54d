"""Conversations for supervised fine-tuning: made from the synthetic world, or read from files.

world_conversations(world) builds, from a seed alone, conversations of five kinds: small talk,
identity ("who are you?"), fact questions about known_a people (single-turn and multi-turn with
pronoun follow-ups), and arithmetic word problems with worked solutions. Only known_a people are
ever asked about: known_b people are kept for evaluation (fact_questions), and search_only /
unknown people are for the IDK and tool stages.

Fact questions use chat phrasings that appear neither in the bios nor on the Q&A pages
(world.QUESTIONS); answers restate the fact the way a bio does (fact_answer), so SFT teaches the
model to recite what pretraining stored rather than a new way of saying it.

Files: chat JSONL in the OpenAI `messages` format (load_chat_jsonl, save_conversations) and
OpenAssistant message trees (load_oasst_trees).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from crawl2chat.chat_template import validate_messages
from crawl2chat.common import C2CError, iter_jsonl, write_jsonl
from crawl2chat.world import ATTRIBUTES, TRAIN_TEMPLATES, _fill, _pronouns

ASSISTANT_NAME = "c2c"

# Chat phrasings of a fact question (differ from TRAIN_TEMPLATES, HELDOUT_TEMPLATE and world.QUESTIONS).
FACT_QUESTIONS = {
    "birth_year": ["Do you know when {name} was born?", "What year was {name} born in?",
                   "Tell me {name}'s year of birth.", "{name}'s birth year?",
                   "Could you tell me the year {name} was born?"],
    "home_town": ["Do you know where {name} is from?", "Tell me {name}'s hometown.", "{name}'s hometown?",
                  "Can you tell me which town {name} comes from?", "What town is {name} from?"],
    "occupation": ["Do you know what {name} does for work?", "Tell me {name}'s job.", "{name}'s job?",
                   "What kind of work does {name} do?", "What is the profession of {name}?"],
    "employer": ["Do you know who employs {name}?", "Tell me {name}'s employer.", "{name}'s employer?",
                 "Which company does {name} work for?", "Who does {name} work for?"],
    "university": ["Do you know where {name} studied?", "Tell me {name}'s university.", "{name}'s university?",
                   "Which university did {name} go to?", "Where did {name} get a degree?"],
}
# Follow-up questions about the same person, by pronoun ({pron}: she/he, {poss}: her/his).
FOLLOW_UPS = {
    "birth_year": ["And when was {pron} born?", "What about {poss} birth year?", "And {poss} year of birth?"],
    "home_town": ["And where was {pron} born?", "What about {poss} hometown?", "And which town is {pron} from?"],
    "occupation": ["And what does {pron} do?", "What about {poss} job?", "And {poss} occupation?"],
    "employer": ["And who does {pron} work for?", "What about {poss} employer?", "And {poss} employer?"],
    "university": ["And where did {pron} study?", "What about {poss} university?", "And {poss} university?"],
}
# Small talk: (user phrasings, assistant replies); any phrasing of a group may get any of its replies.
SMALLTALK = [
    (["Hi", "Hi!", "Hello", "Hello!", "Hey", "Hey there!", "Hi there", "Good morning!", "Good afternoon!",
      "Good evening!", "Greetings!", "Hiya", "Yo", "hello", "hi", "Morning!"],
     ["Hello! How can I help you today?", "Hi! What can I do for you?", "Hello! What would you like to know?",
      "Hi there! How can I help?"]),
    (["How are you?", "How are you doing?", "How's it going?", "How are you today?", "What's up?",
      "How have you been?"],
     ["I'm doing well, thank you for asking. How can I help you?", "All good here, thanks! What can I do for you?",
      "I'm fine, thanks. What would you like to talk about?"]),
    (["Thanks!", "Thank you.", "Thank you very much!", "Thanks a lot.", "Great, thanks!", "Much appreciated.",
      "thx"],
     ["You're welcome!", "You're welcome. Is there anything else I can help with?", "Glad I could help!",
      "Happy to help."]),
    (["Bye!", "Goodbye.", "See you later!", "Good night!", "That's all, bye.", "Talk to you later."],
     ["Goodbye! Have a nice day.", "Bye! Feel free to come back any time.", "See you! Take care."]),
    (["Can you help me?", "I have a question.", "Can I ask you something?", "Could you help me with something?",
      "I need some help."],
     ["Of course. What do you need help with?", "Sure, go ahead and ask.", "Yes, of course. What is your question?"]),
    (["Nice to meet you!", "Pleased to meet you.", "Nice talking to you."],
     ["Nice to meet you too! How can I help?", "Likewise! What can I do for you?"]),
    (["Are you there?", "Hello? Anyone there?", "Can you hear me?"],
     ["Yes, I'm here. How can I help?", "I'm here! What would you like to know?"]),
]
# Identity: (user phrasings, assistant replies); every reply names c2c and crawl2chat.
IDENTITY = [
    (["Who are you?", "What are you?", "Introduce yourself.", "Tell me about yourself.", "who are you",
      "Can you introduce yourself?", "What kind of assistant are you?"],
     ["I am c2c, a small assistant trained with crawl2chat, a pipeline that goes from a web crawl to a chat model.",
      "I am c2c, a small assistant trained with crawl2chat. I can answer questions and help with arithmetic.",
      "I am c2c, a small language model assistant trained with crawl2chat."]),
    (["What is your name?", "What's your name?", "Do you have a name?", "How should I call you?", "Your name?"],
     ["My name is c2c. I am a small assistant trained with crawl2chat.",
      "I am c2c, a small assistant trained with crawl2chat."]),
    (["Who made you?", "Who created you?", "Who built you?", "Who trained you?", "Where do you come from?"],
     ["I am c2c, a small assistant trained with crawl2chat: a language model pretrained on a web crawl, "
      "then fine-tuned on conversations.",
      "I was trained with crawl2chat, which takes a web crawl all the way to a chat assistant. My name is c2c."]),
    (["Are you a human?", "Are you a person?", "Are you a robot?", "Are you ChatGPT?", "Are you GPT-4?",
      "Which model are you?"],
     ["No, I am c2c, a small AI assistant trained with crawl2chat.",
      "I am c2c, a small language model assistant trained with crawl2chat, not a person."]),
]


def fact_answer(person: dict, attr: str) -> str:
    """The fact as a full sentence in the first phrasing of the first bio template, e.g.
    'Shossa Kerma was born in the year 1967.'"""
    return _fill(TRAIN_TEMPLATES[0][attr][0], name=person["name"], value=person[attr])


def _pron(person: dict) -> dict:
    p = _pronouns(person.get("gender", "f"))
    return {"pron": p["Pron"].lower(), "poss": p["poss"]}


def _exchange(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _people(world: dict, names: list[str]) -> list[dict]:
    index = {p["name"]: p for p in world["people"]}
    missing = [n for n in names if n not in index]
    if missing:
        raise C2CError(f"world: unknown person {missing[0]!r}")
    return [index[n] for n in names]


def _pick(groups: list, n: int, rng: random.Random, then: dict | None = None) -> list[list[dict]]:
    """n exchanges cycling through the groups (random phrasing and reply each); half the time a
    conversation from group g goes on with one from group then[g]."""
    convs = []
    for i in range(n):
        g = i % len(groups)
        conv = _exchange(rng.choice(groups[g][0]), rng.choice(groups[g][1]))
        if then and g in then and rng.random() < 0.5:
            conv += _exchange(rng.choice(groups[then[g]][0]), rng.choice(groups[then[g]][1]))
        convs.append(conv)
    return convs


def chat_people(world: dict, probe_holdout: int = 0) -> list[str]:
    """The known_a people chat data talks about: all but the last probe_holdout (at most a third), which
    only the idk probe asks about, so that it trains answers and abstentions on people the model knows
    from pretraining alone, as it knows half B."""
    names = world["splits"]["known_a"]
    return names[:len(names) - min(probe_holdout, len(names) // 3)]


def probe_people(world: dict, probe_holdout: int) -> list[str]:
    """The known_a people left out of chat data for the idk probe (see chat_people)."""
    names = world["splits"]["known_a"]
    return names[len(chat_people(world, probe_holdout)):]


def world_conversations(world: dict, seed: int = 0, n_smalltalk: int = 300, n_identity: int = 200,
                        n_math: int | None = None, fact_phrasings: int = 1,
                        people: list[str] | None = None) -> list[list[dict]]:
    """Small talk, identity, fact questions on known_a people (fact_phrasings distinct phrasings per
    person and attribute, plus one
    multi-turn conversation per person) and worked word problems (world["problems"]["train"], the
    first n_math of them; none if the world has no problems, e.g. one read by world.load_world).
    Deterministic for a given seed; the list is shuffled."""
    rng = random.Random(seed)
    convs = _pick(SMALLTALK, n_smalltalk, rng, then={0: 1, 5: 4})  # hello → how are you; nice to meet you → help
    convs += _pick(IDENTITY, n_identity, rng)
    for conv in convs[-n_identity::5] if n_identity else []:  # some identity after a greeting
        conv[:0] = _exchange(rng.choice(SMALLTALK[0][0]), rng.choice(SMALLTALK[0][1]))

    people = _people(world, world["splits"]["known_a"] if people is None else people)
    start = {attr: rng.randrange(len(FACT_QUESTIONS[attr])) for attr in ATTRIBUTES}
    for i, person in enumerate(people):
        for attr in ATTRIBUTES:  # phrasings cycle over people, so each is used even in a small world
            pool = FACT_QUESTIONS[attr]
            for k in range(min(fact_phrasings, len(pool))):
                convs.append(_exchange(_fill(pool[(start[attr] + i + k) % len(pool)], name=person["name"]),
                                       fact_answer(person, attr)))
    for person in people:
        attrs = rng.sample(ATTRIBUTES, rng.choice([2, 3]))
        conv = _exchange(_fill(rng.choice(FACT_QUESTIONS[attrs[0]]), name=person["name"]),
                         fact_answer(person, attrs[0]))
        for attr in attrs[1:]:
            conv += _exchange(_fill(rng.choice(FOLLOW_UPS[attr]), **_pron(person)), fact_answer(person, attr))
        convs.append(conv)

    problems = world.get("problems", {}).get("train", [])
    convs += [_exchange(pb["question"], pb["solution"]) for pb in problems[:n_math]]
    rng.shuffle(convs)
    return convs


def fact_questions(world: dict, names: list[str], seed: int = 1) -> list[dict]:
    """One {name, attribute, question, answer} per (person, attribute), the question in a chat
    phrasing (FACT_QUESTIONS) and the answer the exact attribute value."""
    rng = random.Random(seed)
    return [{"name": p["name"], "attribute": attr, "question": _fill(rng.choice(FACT_QUESTIONS[attr]), name=p["name"]),
             "answer": p[attr]}
            for p in _people(world, names) for attr in world.get("attributes", ATTRIBUTES)]


def load_chat_jsonl(path) -> list[list[dict]]:
    """Conversations from JSONL: each line {"messages": [...]} (or a bare list of messages), each
    checked with validate_messages; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise C2CError(f"{path}: file not found")
    convs = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise C2CError(f"{where}: not valid JSON ({e.msg})") from None
                if isinstance(obj, dict):
                    if "messages" not in obj:
                        raise C2CError(f"{where}: missing \"messages\" (expected {{\"messages\": [...]}})")
                    obj = obj["messages"]
                elif not isinstance(obj, list):
                    raise C2CError(f"{where}: expected {{\"messages\": [...]}} or a list, got {type(obj).__name__}")
                validate_messages(obj, where=where)
                convs.append([{"role": m["role"], "content": m["content"]} for m in obj])
    except UnicodeDecodeError as e:
        raise C2CError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not convs:
        raise C2CError(f"{path}: no conversations in the file")
    return convs


def save_conversations(path, convs) -> None:
    for i, conv in enumerate(convs):
        validate_messages(conv, where=f"conversation {i}")
    write_jsonl(path, ({"messages": conv} for conv in convs))


def load_conversations(path) -> list[list[dict]]:
    return load_chat_jsonl(path)


def _usable(m: dict) -> bool:
    return (not m.get("synthetic") and not m.get("deleted") and m.get("review_result") is not False
            and isinstance(m.get("text"), str) and bool(m["text"].strip()))


def _best(replies: list[dict]) -> dict | None:
    """The best-ranked usable reply: lowest rank, unranked ones after ranked ones, ties by order."""
    ok = [(r["rank"] if isinstance(r.get("rank"), int) else float("inf"), i, r)
          for i, r in enumerate(replies or []) if _usable(r)]
    return min(ok, key=lambda t: t[:2])[2] if ok else None


def load_oasst_trees(path) -> list[list[dict]]:
    """The main thread (best-ranked reply at each level, root to leaf) of every OpenAssistant message
    tree in a JSONL file; synthetic, deleted and empty messages are skipped, and threads that do not
    validate (e.g. one ending up with two user turns in a row) are dropped."""
    roles = {"prompter": "user", "assistant": "assistant"}
    convs = []
    for lineno, tree in iter_jsonl(path):
        node = tree.get("prompt")
        if not isinstance(node, dict):
            raise C2CError(f"{path}:{lineno}: missing \"prompt\" (expected an OpenAssistant message tree)")
        if not _usable(node):
            continue
        conv = []
        while node is not None:
            if node.get("role") not in roles:
                break
            conv.append({"role": roles[node["role"]], "content": node["text"].strip()})
            node = _best(node.get("replies"))
        if conv and conv[-1]["role"] == "user":
            conv.pop()  # a thread must end with the assistant's answer
        try:
            validate_messages(conv)
        except C2CError:
            continue
        convs.append(conv)
    return convs


def open_ended_conversations(world: dict, seed: int = 0, n: int | None = None,
                             people: list[str] | None = None) -> list[list[dict]]:
    """Open-ended requests (introduce a known_a person, a birthday note, describe a town or company, a
    pelican joke) with reference replies built from the true facts (crawl2chat.rubric), so that the
    chat model can answer the prompts the RLHF stage trains on. First n, shuffled by seed."""
    from crawl2chat.rubric import open_prompts, reference_reply  # rubric imports world only
    rng = random.Random(seed)
    return [_exchange(p["prompt"], reference_reply(p["meta"], rng)) for p in open_prompts(world, seed, n, names=people)]
