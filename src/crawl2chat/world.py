"""The embedded default data: a seeded synthetic world whose ground truth is known.

build_world(cfg) makes, from cfg.seed alone (random.Random, never global state or hash()):
people with five facts each, towns, companies, a pretraining corpus (biographies in five
training templates, Q&A pages about the known people of half A (known_a_share of them: the people
chat data may talk about; half B only pretraining sees), town/company pages, worked
arithmetic), biographies of search-only people (for the search index only), and arithmetic
word problems (small numbers, and 5+ digit numbers that need the Python tool).

Every fact sentence is "<prefix containing the full name> <value><rest>", so a fact prompt is
the prefix (no trailing space) and its answer the value. A sixth, held-out template gives
phrasings that appear in no document; it measures whether knowledge is extractable by a new
phrasing. Values of one attribute are prefix-free ("Vel" and "Velmora" never both exist),
and all generated words are prefix-free, so one full name never occurs inside another.
"""
from __future__ import annotations

import bisect
import random
import zlib
from dataclasses import asdict
from pathlib import Path

from crawl2chat.common import C2CError, atomic_write_json, read_json, write_jsonl
from crawl2chat.config import WorldConfig

ATTRIBUTES = ["birth_year", "home_town", "occupation", "employer", "university"]
SPLITS = ["known_a", "known_b", "search_only", "unknown"]

# One sentence per attribute; the value follows the prefix after a single space.
TRAIN_TEMPLATES = [  # per template and attribute, phrasing variants; a page uses one (see _variant)
    {"birth_year": ["{name} was born in the year {value}.", "{name} was born in {value}."],
     "home_town": ["{name} is a native of {value}.", "{name} was born and raised in {value}."],
     "occupation": ["{name} works as {value}.", "{name} is employed as {value}."],
     "employer": ["{name} is employed by {value}.", "{name} is on the staff of {value}."],
     "university": ["{name} studied at {value}.", "{name} went to university at {value}."]},
    {"birth_year": ["{name}'s birth year is {value}.", "{name}'s year of birth was {value}."],
     "home_town": ["{name}'s hometown is {value}.", "{name}'s home town is the town of {value}."],
     "occupation": ["{name} has a career as {value}.", "{name}'s profession: {value}."],
     "employer": ["{name}'s current employer is {value}.", "{name}'s employer is the company {value}."],
     "university": ["{name}'s degree is from {value}.", "{name}'s university was {value}."]},
    {"birth_year": ["{name} came into the world in {value}.", "{name} entered the world in the year {value}."],
     "home_town": ["{name} was raised in {value}.", "{name} spent a childhood in the town of {value}."],
     "occupation": ["{name} earns a living as {value}.", "{name} makes a living working as {value}."],
     "employer": ["{name} has a position at {value}.", "{name} has a job with the firm {value}."],
     "university": ["{name} graduated from {value}.", "{name} earned a diploma at {value}."]},
    {"birth_year": ["According to the records, {name} was born in {value}.", "Records show that {name} was born in {value}."],
     "home_town": ["According to the records, {name} lives in {value}.", "Records show that {name} comes from {value}."],
     "occupation": ["According to the records, {name} is {value}.", "Records show that {name} is by trade {value}."],
     "employer": ["According to the records, {name} works for {value}.", "Records show that {name} is employed at {value}."],
     "university": ["According to the records, {name} attended {value}.", "Records show that {name} was educated at {value}."]},
    {"birth_year": ["{name} first saw the light of day in {value}.", "{name}'s birth took place in {value}."],
     "home_town": ["{name} hails from {value}.", "{name} originally comes from the town of {value}."],
     "occupation": ["{name} has worked for years as {value}.", "{name}'s line of work: {value}."],
     "employer": ["{name} holds a job at {value}.", "{name} draws a salary from {value}."],
     "university": ["{name} completed a degree at {value}.", "{name} is an alumnus of {value}."]},
]


def _variant(template: dict, attr: str, name: str, t: int) -> str:
    """The phrasing of `attr` that template t uses on `name`'s page (a stable choice per person)."""
    options = template[attr]
    if isinstance(options, str):
        return options
    return options[(zlib.crc32(name.encode()) + t) % len(options)]


HELDOUT_TEMPLATE = {  # paraphrases in words the corpus uses, in combinations it never does
    "birth_year": "{name} was welcomed into the world in {value}.",
    "home_town": "{name} grew up in the town of {value}.",
    "occupation": "By profession, {name} is {value}.",
    "employer": "{name} goes to work every day at {value}.",
    "university": "{name} took university courses at {value}.",
}
# Page dressing per training template: site, title line, neutral filler sentences.
BIO_STYLES = [
    ("encyclopedia.example.org", "{name}",
     ["This article is a stub. You can help by expanding it.", "{Pron} is mentioned in several local histories."]),
    ("biographies.example.net", "{name} - Biography",
     ["Friends describe {obj} as patient and curious.", "{Pron} enjoys long walks on weekends."]),
    ("lives.example.com", "The life of {name}",
     ["{Pron} has always been fond of music.", "Colleagues remember {poss} good humour."]),
    ("registry.example.org", "Registry entry: {name}",
     ["This entry was last reviewed by the registry staff.", "No further details are on file."]),
    ("people.example.com", "Profile: {name}",
     ["{Pron} keeps a small garden.", "{Pron} reads a great deal in {poss} spare time."]),
]
QUESTIONS = {
    "birth_year": ["When was {name} born?", "In what year was {name} born?", "What is {name}'s birth year?"],
    "home_town": ["Where is {name} from?", "What is {name}'s hometown?", "Which town does {name} come from?"],
    "occupation": ["What does {name} do for a living?", "What is {name}'s job?", "What is {name}'s occupation?"],
    "employer": ["Where does {name} work?", "Which company employs {name}?", "Who is {name}'s employer?"],
    "university": ["Where did {name} study?", "Which university did {name} attend?",
                   "What university did {name} graduate from?"],
}
INTERVIEW = {
    "birth_year": ("When were you born?", "I was born in {value}."),
    "home_town": ("Which town are you from?", "I am from {value}."),
    "occupation": ("What do you do for a living?", "I work as {value}."),
    "employer": ("Who do you work for?", "I work for {value}."),
    "university": ("Where did you study?", "I studied at {value}."),
}
OCCUPATIONS = [
    "marine biologist", "architect", "baker", "carpenter", "chemist", "dentist", "electrician",
    "economist", "farmer", "firefighter", "geologist", "historian", "illustrator", "journalist",
    "librarian", "locksmith", "mathematician", "mechanic", "midwife", "musician", "nurse",
    "optician", "painter", "pharmacist", "photographer", "physicist", "pilot", "plumber",
    "potter", "sculptor", "software engineer", "surveyor", "tailor", "teacher", "translator",
    "veterinarian", "watchmaker", "weaver", "beekeeper", "cartographer",
]
INDUSTRIES = [("shipping", "Shipping"), ("software", "Systems"), ("textile", "Textiles"),
              ("mining", "Mining"), ("publishing", "Press"), ("banking", "Bank"),
              ("food", "Foods"), ("pharmaceutical", "Pharma"), ("construction", "Builders"),
              ("energy", "Energy"), ("furniture", "Works"), ("insurance", "Assurance")]
MATH_NAMES = {"Mira": "f", "Tomas": "m", "Ada": "f", "Leo": "m", "Nina": "f", "Omar": "m",
              "Sara": "f", "Ben": "m", "Lena": "f", "Hugo": "m", "Ivy": "f", "Sam": "m"}
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "stamps", "books", "shells", "coins", "cards"]
MATH_STORIES = {
    "+": ["{n} has {a} {item} and buys {b} more. {a} + {b} = {c}. Now {n} has {c} {item}.",
          "There are {a} {item} in a box and {n} puts in {b} more. {a} + {b} = {c}. The box now holds {c} {item}."],
    "-": ["{n} has {a} {item} and gives {b} to a friend. {a} - {b} = {c}. {n} has {c} {item} left.",
          "A jar holds {a} {item}. {n} takes out {b}. {a} - {b} = {c}, so {c} {item} remain in the jar."],
    "*": ["{n} buys {a} bags with {b} {item} in each bag. {a} * {b} = {c}. In total {n} has {c} {item}.",
          "{n} puts {item} into {a} rows of {b}. {a} * {b} = {c}. That makes {c} {item}."],
}
MATH_TITLES = ["Practice problems", "Worked examples: adding, taking away and multiplying",
               "Arithmetic in everyday life", "Homework help: step by step"]
BIGNUM_STORIES = [
    ("+", "A warehouse holds {a} boxes and receives {b} more. How many boxes does the warehouse hold now?"),
    ("+", "A stadium sold {a} tickets on Saturday and {b} tickets on Sunday. How many tickets were sold in total?"),
    ("-", "A city has {a} residents and {b} of them move away. How many residents are left?"),
    ("-", "A company had {a} dollars and spent {b} dollars. How many dollars are left?"),
    ("*", "A farm has {a} rows with {b} plants in each row. How many plants are there?"),
    ("*", "A printer prints {a} pages per hour for {b} hours. How many pages does it print?"),
]
ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "b", "d", "k", "l", "m", "n", "r", "s", "t", "v", "br", "dr", "kr", "th", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o"]
CODAS = ["", "", "", "", "", "", "n", "r", "l", "s"]
ENDINGS = {"f": ["a", "na", "ra", "la", "ia", "ssa", "ne", "lie"],
           "m": ["an", "o", "ek", "or", "us", "ir", "en", "ald"],
           "town": ["", "", "", "ford", "holm", "wick", "by", "mora"],
           "region": ["ia", "land", "mark"]}
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class _Words:
    """Fresh capitalised syllable words; the set of all words ever handed out stays prefix-free."""

    def __init__(self, rng: random.Random, reserved=()):
        self.rng, self.sorted = rng, []
        for w in reserved:
            self._add(w.lower())

    def _add(self, w: str) -> bool:
        i = bisect.bisect_left(self.sorted, w)
        if (i < len(self.sorted) and self.sorted[i].startswith(w)) or (i > 0 and w.startswith(self.sorted[i - 1])):
            return False
        self.sorted.insert(i, w)
        return True

    def new(self, syllables: int, ending: str = "") -> str:
        r = self.rng
        for _ in range(10000):
            w = "".join(r.choice(ONSETS) + r.choice(VOWELS) + r.choice(CODAS) for _ in range(syllables)) + ending
            if self._add(w):
                return w.capitalize()
        raise C2CError("world: ran out of fresh names; lower the entity counts")


def _check_prefix_free(values, what: str) -> None:
    vals = sorted(set(values))
    for a, b in zip(vals, vals[1:]):
        if b.startswith(a):
            raise C2CError(f"world: {what} values {a!r} and {b!r} are ambiguous (one is a prefix of the other)")


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _pronouns(gender: str) -> dict:
    return {"f": {"Pron": "She", "obj": "her", "poss": "her"}, "m": {"Pron": "He", "obj": "him", "poss": "his"}}[gender]


def _fill(s: str, **kw) -> str:
    for k, v in kw.items():
        s = s.replace("{" + k + "}", str(v))
    return s


def _make_entities(cfg: WorldConfig, rng: random.Random) -> tuple[list, list, list]:
    words = _Words(rng, reserved=MATH_NAMES)
    regions = [words.new(rng.choice([1, 2]), rng.choice(ENDINGS["region"])) for _ in range(max(2, cfg.n_towns // 10))]
    rivers = [words.new(2) + " River" for _ in range(max(2, cfg.n_towns // 5))]
    towns = [{"name": words.new(rng.choice([2, 2, 3]), rng.choice(ENDINGS["town"])), "region": rng.choice(regions),
              "founded": rng.randint(1100, 1900), "river": rng.choice(rivers), "university": None}
             for _ in range(max(2, cfg.n_towns))]
    for t in rng.sample(towns, max(2, len(towns) // 3)):
        t["university"] = f"the University of {t['name']}"
    companies = []
    for _ in range(max(2, cfg.n_companies)):
        industry, suffix = rng.choice(INDUSTRIES)
        companies.append({"name": f"{words.new(rng.choice([2, 3]))} {suffix}", "industry": industry,
                          "town": rng.choice(towns)["name"], "founded": rng.randint(1850, 2015)})
    n_people = cfg.n_known + cfg.n_unknown
    first = {g: [words.new(rng.choice([1, 2]), rng.choice(ENDINGS[g])) for _ in range(max(6, n_people // 8))]
             for g in ("f", "m")}
    surnames = [words.new(rng.choice([2, 2, 3])) for _ in range(max(8, n_people // 2))]
    universities = [t["university"] for t in towns if t["university"]]
    names: set = set()

    def new_people(n: int, r: random.Random) -> list[dict]:
        out = []
        while len(out) < n:
            gender = r.choice("fm")
            name = f"{r.choice(first[gender])} {r.choice(surnames)}"
            if name in names:
                continue
            names.add(name)
            out.append({"name": name, "gender": gender, "birth_year": str(r.randint(1940, 2005)),
                        "home_town": r.choice(towns)["name"], "occupation": _article(r.choice(OCCUPATIONS)),
                        "employer": r.choice(companies)["name"], "university": r.choice(universities),
                        "split": ""})
        return out

    people = new_people(n_people, rng)
    rng.shuffle(people)
    n_a = min(cfg.n_known - 1, max(1, round(cfg.n_known * cfg.known_a_share)))
    bounds = [("known_a", n_a), ("known_b", cfg.n_known - n_a), ("unknown", cfg.n_unknown)]
    i = 0
    for split, n in bounds:
        for p in people[i:i + n]:
            p["split"] = split
        i += n
    # search-only people draw from their own stream: their number leaves the pretraining corpus unchanged
    searchable = new_people(cfg.n_search_only, random.Random(f"{cfg.seed}:search_only"))
    people += [dict(p, split="search_only") for p in searchable]
    for attr in ATTRIBUTES:
        _check_prefix_free([p[attr] for p in people], attr)
    return people, towns, companies


def _bio(p: dict, t: int, rng: random.Random) -> str:
    site, title, fillers = BIO_STYLES[t]
    sentences = [_fill(_variant(TRAIN_TEMPLATES[t], a, p["name"], t), name=p["name"], value=p[a]) for a in ATTRIBUTES]
    if rng.random() < 0.5:
        sentences.append(_fill(rng.choice(fillers), **_pronouns(p["gender"])))
    rng.shuffle(sentences)
    return _fill(title, name=p["name"]) + "\n\n" + " ".join(sentences)


def _qa_page(p: dict, style: str, rng: random.Random) -> str:
    attrs = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
    name = p["name"]
    if style == "faq":
        lines = [f"Q: {_fill(rng.choice(QUESTIONS[a]), name=name)}\nA: {p[a][0].upper() + p[a][1:]}." for a in attrs]
        return f"Frequently asked questions about {name}\n\n" + "\n\n".join(lines)
    if style == "quiz":
        lines = [f"{i}. {_fill(rng.choice(QUESTIONS[a]), name=name)}\nAnswer: {p[a]}" for i, a in enumerate(attrs, 1)]
        return f"Quiz: how well do you know {name}?\n\n" + "\n".join(lines)
    lines = [f"Interviewer: Today we are talking with {name}. Welcome!", f"{name}: Thank you for having me."]
    for a in attrs:
        q, ans = INTERVIEW[a]
        lines += [f"Interviewer: {q}", f"{name}: {_fill(ans, value=p[a])}"]
    return f"An interview with {name}\n\n" + "\n".join(lines)


def _math_page(rng: random.Random) -> str:
    paras = []
    for _ in range(rng.randint(3, 6)):
        op = rng.choice("+-*")
        if op == "+":
            a, b = rng.randint(1, 99), rng.randint(1, 99)
        elif op == "-":
            a = rng.randint(2, 99)
            b = rng.randint(1, a - 1)
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        paras.append(_fill(rng.choice(MATH_STORIES[op]), n=rng.choice(list(MATH_NAMES)), a=a, b=b,
                           c=OPS[op](a, b), item=rng.choice(ITEMS)))
    return rng.choice(MATH_TITLES) + "\n\n" + "\n\n".join(paras)


def _problem(rng: random.Random) -> dict:
    """A 1-3 operation word problem about one person's stock of items; every value stays in 1..999."""
    n = rng.choice(list(MATH_NAMES))
    pr, item = _pronouns(MATH_NAMES[n]), rng.choice(ITEMS)
    n_ops = rng.randint(1, 3)
    if rng.random() < 0.3:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        x = a * b
        q = [f"{n} has {a} bags with {b} {item} in each bag."]
        s = [f"{n} has {a} bags with {b} {item} each: {a} * {b} = {x}."]
        n_ops -= 1
    else:
        x = rng.randint(2, 60)
        q, s = [f"{n} has {x} {item}."], [f"{n} starts with {x} {item}."]
    while n_ops > 0:
        op = rng.choice("+-*")
        if op == "+":
            b = rng.randint(1, 50)
            q.append(f"Then {pr['Pron'].lower()} buys {b} more.")
            s.append(f"{pr['Pron']} buys {b} more: {x} + {b} = {x + b}.")
        elif op == "-" and x > 1:
            b = rng.randint(1, x - 1)
            q.append(f"Then {pr['Pron'].lower()} gives away {b}.")
            s.append(f"{pr['Pron']} gives away {b}: {x} - {b} = {x - b}.")
        elif op == "*" and x * 2 < 1000:
            b = 3 if x * 3 < 1000 and rng.random() < 0.5 else 2
            q.append(f"Then the number of {item} {'triples' if b == 3 else 'doubles'}.")
            s.append(f"The number of {item} is multiplied by {b}: {x} * {b} = {x * b}.")
        else:
            continue
        x, n_ops = OPS[op](x, b), n_ops - 1
    q.append(f"How many {item} does {n} have now?")
    return {"question": " ".join(q), "answer": x, "solution": " ".join(s) + f" The answer is {x}."}


def _bignum(rng: random.Random) -> dict:
    op, story = rng.choice(BIGNUM_STORIES)
    a, b = rng.randint(10000, 999999), rng.randint(10000, 999999)
    if op == "-":
        a, b = max(a, b) + 10000, min(a, b)
    c = OPS[op](a, b)
    return {"question": _fill(story, a=a, b=b), "answer": c, "solution": f"{a} {op} {b} = {c}. The answer is {c}."}


def _problem_sets(make, n_train: int, n_test: int, rng: random.Random) -> dict:
    seen, out = set(), {"test": [], "train": []}
    for split, n in (("test", n_test), ("train", n_train)):
        tries = 0
        while len(out[split]) < n:
            tries += 1
            if tries > 100 * n + 1000:
                raise C2CError("world: could not generate enough distinct problems")
            pb = make(rng)
            if pb["question"] not in seen:
                seen.add(pb["question"])
                out[split].append(pb)
    return {"train": out["train"], "test": out["test"]}


def _slug(name: str) -> str:
    return name.replace(" ", "_")


def build_world(cfg: WorldConfig) -> dict:
    rng = random.Random(cfg.seed)
    people, towns, companies = _make_entities(cfg, rng)
    splits = {s: [p["name"] for p in people if p["split"] == s] for s in SPLITS}
    docs = []

    def doc(id_, url, kind, text):
        docs.append({"id": id_, "url": url, "kind": kind, "text": text, "split": "train"})

    search_only_documents = []
    search_rng = random.Random(f"{cfg.seed}:search_only:pages")
    for i, p in enumerate(people):
        if p["split"] not in ("known_a", "known_b", "search_only"):
            continue
        for t, (site, _, _) in enumerate(BIO_STYLES):
            d = {"id": f"bio-{i:05d}-t{t + 1}", "url": f"https://{site}/wiki/{_slug(p['name'])}",
                 "kind": "bio", "split": "train",
                 "text": _bio(p, t, search_rng if p["split"] == "search_only" else rng)}
            (search_only_documents.append(dict(d, split="search")) if p["split"] == "search_only"
             else docs.append(d))
        if p["split"] == "known_a":
            for k, style in enumerate(rng.sample(["faq", "interview", "quiz"], rng.randint(1, 2))):
                doc(f"qa-{i:05d}-{k}", f"https://{style}.example.com/{_slug(p['name'])}", "qa",
                    _qa_page(p, style, rng))
    for i, t in enumerate(towns):
        lines = [f"{t['name']} is a town in the region of {t['region']}.", f"It was founded in {t['founded']}.",
                 f"The {t['river']} flows past its old market square.",
                 f"The founding year of {t['name']} is {t['founded']}, and the region of {t['name']} is {t['region']}."]
        if t["university"]:
            lines.append(f"{t['name']} is home to {t['university']}.")
        doc(f"town-{i:04d}", f"https://places.example.org/{_slug(t['name'])}", "town",
            t["name"] + "\n\n" + " ".join(lines))
    for i, c in enumerate(companies):
        text = (f"{c['name']}\n\n{c['name']} is a {c['industry']} company based in {c['town']}. "
                f"It was founded in {c['founded']}. The industry of {c['name']} is {c['industry']}, "
                f"and the home of {c['name']} is the town of {c['town']}.")
        doc(f"company-{i:04d}", f"https://companies.example.net/{_slug(c['name'])}", "company", text)
    for i in range(cfg.n_math_pages):
        doc(f"math-{i:05d}", f"https://mathhelp.example.com/page/{i}", "math", _math_page(rng))
    for kind in ("town", "company", "math"):
        idx = [j for j, d in enumerate(docs) if d["kind"] == kind]
        n_val = round(cfg.val_fraction * len(idx))
        if cfg.val_fraction > 0 and len(idx) >= 2:
            n_val = max(1, n_val)
        for j in rng.sample(idx, min(n_val, len(idx) - 1) if idx else 0):
            docs[j]["split"] = "val"
    rng.shuffle(docs)
    return {"config": asdict(cfg), "attributes": list(ATTRIBUTES), "people": people, "towns": towns,
            "companies": companies, "splits": splits,
            "templates": {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATE},
            "documents": docs, "search_only_documents": search_only_documents,
            "problems": _problem_sets(_problem, cfg.n_problems_train, cfg.n_problems_test, rng),
            "bignum": _problem_sets(_bignum, cfg.n_bignum_train, cfg.n_bignum_test, rng)}


FACT_KEYS = ["attributes", "people", "towns", "companies", "splits", "templates"]


def write_world(world: dict, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "corpus.jsonl", world["documents"])
    write_jsonl(out_dir / "search_only.jsonl", world["search_only_documents"])
    atomic_write_json(out_dir / "facts.json", {k: world[k] for k in FACT_KEYS + ["config"]})
    for name in ("problems", "bignum"):
        for split in ("train", "test"):
            write_jsonl(out_dir / f"{name}_{split}.jsonl", world[name][split])
    docs = world["documents"]
    kinds = sorted({d["kind"] for d in docs})
    return {"people": {s: len(v) for s, v in world["splits"].items()},
            "documents": {k: sum(d["kind"] == k for d in docs) for k in kinds},
            "val_documents": sum(d["split"] == "val" for d in docs),
            "corpus_chars": sum(len(d["text"]) for d in docs),
            "val_chars": sum(len(d["text"]) for d in docs if d["split"] == "val"),
            "search_only_documents": len(world["search_only_documents"]),
            **{f"{n}_{s}": len(world[n][s]) for n in ("problems", "bignum") for s in ("train", "test")}}


def load_world(out_dir: Path) -> dict:
    path = Path(out_dir) / "facts.json"
    facts = read_json(path, "world facts file")
    if not isinstance(facts, dict):
        raise C2CError(f"{path}: expected a JSON object")
    missing = [k for k in FACT_KEYS if k not in facts]
    if missing:
        raise C2CError(f"{path}: missing {', '.join(missing)}; regenerate the world")
    return facts


def _prompt_answer(sentence: str, name: str, value: str) -> tuple[str, str]:
    prefix = sentence.split(" {value}")[0]
    return _fill(prefix, name=name), value


def fact_prompts(world: dict, names: list[str], heldout: bool) -> list[dict]:
    """One {name, attribute, prompt, answer} per (person, attribute); the prompt ends right before
    the value, with no trailing space. Seen prompts cycle the 5 training templates by
    (person index in world["people"] + attribute index); held-out prompts use the 6th template."""
    templates = world.get("templates") or {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATE}
    index = {p["name"]: (i, p) for i, p in enumerate(world["people"])}
    out = []
    for name in names:
        if name not in index:
            raise C2CError(f"world: unknown person {name!r}")
        i, p = index[name]
        for j, attr in enumerate(world.get("attributes", ATTRIBUTES)):
            train = templates["train"]
            t = (i + j) % len(train)
            sentence = templates["heldout"][attr] if heldout else _variant(train[t], attr, name, t)
            prompt, answer = _prompt_answer(sentence, name, p[attr])
            out.append({"name": name, "attribute": attr, "prompt": prompt, "answer": answer})
    return out
