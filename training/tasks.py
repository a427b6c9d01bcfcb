"""Built-in task families, generated deterministically from a seed, each with a held-out test split.

Every example is ``{"prompt", "completion", "task"}`` with a short completion that exact match can
score. The test split asks about the same underlying items with phrasings never seen in training,
so a model that only memorised surface strings does not pass it.

  facts       recall of fictional facts (capacity-bound: the answer is nowhere but in the adapter)
  arithmetic  two- and three-step word problems over small integers
  strings     string and list transformations (reverse, upper-case, last item, count)
  mixture     all three, interleaved
  tools       tool use (not in the mixture): chat rows offering three functions, where a question about the weather,
              the time or a currency conversion is answered by a call with the right arguments, in Hermes' format as
              the server renders and parses it (remix.chat), and a sum is answered in text with no call
"""

from __future__ import annotations

import random

NAMES = ["Zorblat", "Quenivra", "Thaddox", "Miravel", "Oskarin", "Pellune", "Vantrez", "Gildra", "Korrim", "Yseult",
         "Brannoc", "Teskaly", "Dovrin", "Amaluna", "Fenwyth", "Corvessa", "Jorrak", "Liravo", "Nimbeth", "Ulvane",
         "Sarnik", "Elowen", "Harrox", "Ithrel", "Wendolin", "Kastor", "Rivela", "Mordane", "Tamsyn", "Oberic"]
COLORS = ["teal", "amber", "crimson", "violet", "olive", "silver", "indigo", "coral", "ochre", "jade"]
CITIES = ["Velmora", "Dunhaven", "Crestfall", "Orinth", "Marrowgate", "Sablecourt", "Thistlewick", "Brightwater"]
ANIMALS = ["otter", "falcon", "lynx", "tortoise", "heron", "badger", "gecko", "walrus"]
FACT_TEMPLATES = {
    "color": (["What is the favorite color of {name}?", "Which color does {name} like best?"],
              ["Name {name}'s favorite color."]),
    "city": (["In which city does {name} live?", "Where does {name} live?"],
             ["{name} lives in which city?"]),
    "pet": (["What pet does {name} keep?", "Which animal is {name}'s pet?"],
            ["{name} owns what kind of pet?"]),
}
PEOPLE = ["Tom", "Ana", "Ravi", "Mia", "Leo", "Sara", "Ken", "Ola"]
ITEMS = ["apples", "coins", "books", "stamps", "marbles", "pencils"]
WORDS = ["cat", "river", "lamp", "garden", "pixel", "orange", "cloud", "stone", "violin", "ticket", "maple", "rocket"]


def _arithmetic(rng: random.Random, size: int, test: bool, seed: int = 0) -> list[dict]:
    out = []
    for _ in range(size):
        who, item = rng.choice(PEOPLE), rng.choice(ITEMS)
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, a + b - 1)
        if test:
            prompt = f"{who} starts with {a} {item}. {who} gets {b} more and then loses {c}. How many {item} are left?"
        elif rng.random() < 0.5:
            prompt = f"{who} has {a} {item}, buys {b} more, then gives away {c}. How many {item} does {who} have now?"
        else:
            prompt = f"There are {a} {item}. {b} are added and {c} are removed. How many {item} remain?"
        out.append({"prompt": prompt, "completion": str(a + b - c)})
    return out


def _strings(rng: random.Random, size: int, test: bool, seed: int = 0) -> list[dict]:
    out = []
    for _ in range(size):
        op = rng.choice(["reverse", "upper", "last", "count"])
        word = rng.choice(WORDS)
        items = rng.sample(WORDS, rng.randint(3, 5))
        if op == "reverse":
            prompt = (f"Write '{word}' backwards." if test else rng.choice(
                [f"Reverse the word '{word}'.", f"Spell '{word}' in reverse order."]))
            answer = word[::-1]
        elif op == "upper":
            prompt = f"Convert '{word}' to capital letters." if test else f"Write '{word}' in uppercase."
            answer = word.upper()
        elif op == "last":
            listing = ", ".join(items)
            prompt = f"Which item comes last in this list: {listing}?" if test else f"What is the last item of [{listing}]?"
            answer = items[-1]
        else:
            listing = ", ".join(items)
            prompt = f"Count the entries in: {listing}." if test else f"How many items are in [{listing}]?"
            answer = str(len(items))
        out.append({"prompt": prompt, "completion": answer})
    return out


def _facts_with_table(draw_rng: random.Random, size: int, test: bool, seed: int) -> list[dict]:
    table_rng = random.Random(f"{seed}:facts:table")  # the same fictional facts in both splits
    table = [(name, table_rng.choice(COLORS), table_rng.choice(CITIES), table_rng.choice(ANIMALS)) for name in NAMES]
    out = []
    for _ in range(size):
        name, color, city, pet = draw_rng.choice(table)
        attr = draw_rng.choice(sorted(FACT_TEMPLATES))
        answer = {"color": color, "city": city, "pet": pet}[attr]
        out.append({"prompt": draw_rng.choice(FACT_TEMPLATES[attr][1 if test else 0]).format(name=name), "completion": answer})
    return out


TOOL_CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Sydney", "Toronto", "Mumbai", "Nairobi", "Berlin",
               "Seoul", "Madrid", "Dublin", "Quito", "Hanoi", "Zurich"]
CURRENCIES = ["USD", "EUR", "JPY", "GBP", "CHF", "INR"]
TOOL_SPECS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "convert_currency", "description": "Convert an amount of money",
                                      "parameters": {"type": "object", "properties": {
                                          "amount": {"type": "number"}, "from": {"type": "string"},
                                          "to": {"type": "string"}}, "required": ["amount", "from", "to"]}}},
]
TOOL_TEMPLATES = {  # (train phrasings, test phrasings)
    "get_weather": (["What is the weather like in {city}?", "How is the weather in {city} today?",
                     "Tell me the weather in {city}."], ["Is it sunny in {city} right now?"]),
    "get_time": (["What time is it in {city}?", "Tell me the current time in {city}."],
                 ["What is the local time in {city} now?"]),
    "convert_currency": (["Convert {amount} {src} to {dst}.", "How much is {amount} {src} in {dst}?"],
                         ["What are {amount} {src} worth in {dst}?"]),
    "none": (["What is {a} plus {b}?", "Add {a} and {b}."], ["What do {a} and {b} add up to?"]),
}


def _tools(rng: random.Random, size: int, test: bool, seed: int = 0) -> list[dict]:
    out = []
    for _ in range(size):
        kind = rng.choice(sorted(TOOL_TEMPLATES))
        phrasing = rng.choice(TOOL_TEMPLATES[kind][1 if test else 0])
        if kind == "none":
            a, b = rng.randint(2, 40), rng.randint(2, 40)
            answer = {"role": "assistant", "content": str(a + b)}
            question = phrasing.format(a=a, b=b)
        else:
            if kind == "convert_currency":
                src, dst = rng.sample(CURRENCIES, 2)
                args = {"amount": rng.randint(2, 500), "from": src, "to": dst}
                question = phrasing.format(amount=args["amount"], src=src, dst=dst)
            else:
                args = {"city": rng.choice(TOOL_CITIES)}
                question = phrasing.format(**args)
            answer = {"role": "assistant", "content": None,
                      "tool_calls": [{"type": "function", "function": {"name": kind, "arguments": args}}]}
        out.append({"tools": TOOL_SPECS, "messages": [{"role": "user", "content": question}, answer]})
    return out


FAMILIES = {"facts": _facts_with_table, "arithmetic": _arithmetic, "strings": _strings}
EXTRA = {"tools": _tools}  # families outside the mixture
# a task's own defaults for training.fit's fields (a config file or a flag still wins): the tools task's rows carry
# the tools' system prompt (~330-380 tokens with SmolLM2's tokenizer) and calls of up to ~45 tokens
TASK_DEFAULTS = {"tools": {"max_seq_len": 448, "eval_max_new_tokens": 64}}
TASKS = (*FAMILIES, "mixture", *EXTRA)


def build_task(name: str, split: str, size: int, seed: int = 0) -> list[dict]:
    """``size`` examples of task ``name`` (a family or "mixture") for split "train" or "test".

    The facts table depends only on ``seed`` (shared by both splits); the draws differ per split.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    families = list(FAMILIES) if name == "mixture" else [name]
    out = []
    for i, family in enumerate(families):
        share = size // len(families) + (1 if i < size % len(families) else 0)
        draw_rng = random.Random(f"{seed}:{family}:{split}")
        examples = {**FAMILIES, **EXTRA}[family](draw_rng, share, split == "test", seed)
        out += [{**ex, "task": family} for ex in examples]
    if name == "mixture":
        random.Random(f"{seed}:mixture:{split}").shuffle(out)
    return out


def normalize_answer(text: str) -> str:
    """What exact match compares: stripped, lower-cased, without a trailing period."""
    return text.strip().strip(".").strip().lower()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)
