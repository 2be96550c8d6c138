"""Write the example prompt-tuning datasets (deterministic, made up here; nothing is downloaded).

    python examples/make_datasets.py [--out examples/data]

- sentiment/  {"prompt": "Review: ...\\nSentiment:", "completion": " positive" | " negative"}
              short made-up reviews of restaurants, hotels, gadgets, films and books.
- extract/    fixed output format: {"prompt": "Text: ...\\nJSON:", "completion": ' {"name": ..., "city": ...}'}
- pirate/     style transfer in chat form: {"messages": [user: "Rewrite like a pirate: ...", assistant: ...]}

Each has train.jsonl and eval.jsonl. The eval split is built from held-out combinations (and, for
sentiment, held-out subjects), so a prompt cannot pass it by memorising training lines.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# ---- sentiment -------------------------------------------------------------------------------------
DOMAINS = {
    "restaurant": ["pasta", "soup", "service", "dessert", "waiter", "steak", "pizza", "coffee", "salad", "menu"],
    "hotel": ["room", "bed", "staff", "breakfast", "pool", "view", "shower", "lobby", "location", "check-in"],
    "gadget": ["battery", "screen", "camera", "speaker", "charger", "keyboard", "app", "headphones", "case", "remote"],
    "film": ["plot", "acting", "ending", "soundtrack", "script", "pacing", "dialogue", "cast", "director", "sequel"],
    "book": ["story", "characters", "writing", "chapter", "translation", "cover", "narrator", "twist", "prose", "author"],
}
POS_ADJ = ["excellent", "wonderful", "delightful", "fantastic", "superb", "great", "lovely", "impressive", "charming",
           "brilliant", "flawless", "outstanding"]
NEG_ADJ = ["awful", "terrible", "disappointing", "horrible", "mediocre", "dreadful", "poor", "bland", "clumsy",
           "annoying", "cheap", "forgettable"]
POS_TEMPLATES = [
    "The {n} was {a}.", "I loved the {n}, it was {a}.", "What a {a} {n}!", "The {n} was {a} and the {n2} was {a2}.",
    "Honestly, the {n} was {a}. I would come back.", "{A} {n}. Highly recommended.", "Five stars: the {n} is {a}.",
    "The {n} exceeded my expectations.", "Really happy with the {n}, {a} from start to finish.",
]
NEG_TEMPLATES = [
    "The {n} was {a}.", "I hated the {n}, it was {a}.", "What a {a} {n}.", "The {n} was {a} and the {n2} was {a2}.",
    "Honestly, the {n} was {a}. Never again.", "{A} {n}. Avoid.", "One star: the {n} is {a}.",
    "The {n} was a waste of money.", "Really unhappy with the {n}, {a} from start to finish.",
]
FILLERS = ["", "", "", "We went on a Tuesday. ", "I bought it for my sister. ", "It arrived on Monday. ",
           "My friend recommended it. ", "We tried it last weekend. "]


def _review(rng: random.Random, positive: bool, nouns: list[str]) -> str:
    n, n2 = rng.sample(nouns, 2)
    adjs = POS_ADJ if positive else NEG_ADJ
    a, a2 = rng.sample(adjs, 2)
    template = rng.choice(POS_TEMPLATES if positive else NEG_TEMPLATES)
    return rng.choice(FILLERS) + template.format(n=n, n2=n2, a=a, a2=a2, A=a.capitalize())


def sentiment(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    # Held out: the last two subjects of every domain only appear in eval.
    train_nouns = [n for nouns in DOMAINS.values() for n in nouns[:-2]]
    eval_nouns = [n for nouns in DOMAINS.values() for n in nouns[-2:]]

    def make(count: int, nouns: list[str], seen: set[str]) -> list[dict]:
        out: list[dict] = []
        while len(out) < count:
            positive = len(out) % 2 == 0  # balanced labels
            text = _review(rng, positive, nouns)
            if text in seen:
                continue
            seen.add(text)
            out.append({"prompt": f"Review: {text}\nSentiment:", "completion": " positive" if positive else " negative"})
        rng.shuffle(out)
        return out

    seen: set[str] = set()
    return make(n_train, train_nouns, seen), make(n_eval, eval_nouns, seen)


# ---- fixed output format: extraction to JSON -------------------------------------------------------
FIRST = ["Maria", "John", "Aisha", "Kenji", "Lucia", "Omar", "Elena", "Tom", "Priya", "Lars", "Fatima", "Diego",
         "Chen", "Sofia", "Ivan", "Amara", "Noah", "Yuki", "Hugo", "Zara"]
LAST = ["Lopez", "Smith", "Khan", "Tanaka", "Rossi", "Haddad", "Petrova", "Baker", "Sharma", "Berg", "Mensah",
        "Garcia", "Wei", "Costa", "Novak", "Okafor", "Miller", "Sato", "Laurent", "Ali"]
CITIES = ["Lisbon", "Chicago", "Nairobi", "Osaka", "Rome", "Beirut", "Sofia", "Denver", "Mumbai", "Oslo", "Accra",
          "Seville", "Shanghai", "Porto", "Prague", "Lagos", "Boston", "Kyoto", "Lyon", "Cairo"]
EXTRACT_TEMPLATES = [
    "{name} moved to {city} last year.", "Yesterday {name} flew to {city} for a conference.",
    "{name}, who grew up in {city}, now teaches music.", "After the wedding, {name} settled in {city}.",
    "The award went to {name} from {city}.", "In {city}, {name} opened a small bakery.",
    "{name} has lived in {city} since 2015.", "Our new colleague {name} is based in {city}.",
]


def extract(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    def make(count: int, templates: list[str], seen: set[str]) -> list[dict]:
        out = []
        while len(out) < count:
            name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
            city = rng.choice(CITIES)
            text = rng.choice(templates).format(name=name, city=city)
            if text in seen:
                continue
            seen.add(text)
            out.append({"prompt": f"Text: {text}\nJSON:", "completion": " " + json.dumps({"name": name, "city": city})})
        return out

    seen: set[str] = set()
    return make(n_train, EXTRACT_TEMPLATES[:-2], seen), make(n_eval, EXTRACT_TEMPLATES[-2:], seen)


# ---- style transfer: pirate speak (chat) -----------------------------------------------------------
PIRATE = {"hello": "ahoy", "hi": "ahoy", "my": "me", "friend": "matey", "friends": "mateys", "you": "ye",
          "your": "yer", "is": "be", "are": "be", "the": "th'", "yes": "aye", "money": "doubloons", "boat": "ship",
          "stop": "avast", "wow": "shiver me timbers", "food": "grub", "drink": "grog"}
SUBJECTS = ["my friend", "the captain", "your brother", "the cook", "my friends", "the old sailor"]
PREDICATES = ["is on the boat", "is hungry for food", "wants a drink", "is counting the money", "is asleep",
              "is waiting at the dock", "is singing loudly", "lost the map", "found your boat"]
PLURAL = {"is": "are", "wants": "want"}
OPENERS = ["", "hello, ", "hi, ", "wow, ", "yes, ", "stop, "]


def _pirate(sentence: str) -> str:
    words = []
    for token in sentence.split(" "):
        core = token.rstrip(",.?!")
        tail = token[len(core):]
        out = PIRATE.get(core.lower(), core)
        if core[:1].isupper():
            out = out[:1].upper() + out[1:]
        words.append(out + tail)
    return " ".join(words)


def pirate(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    combos = [(o, s, p) for o in OPENERS for s in SUBJECTS for p in PREDICATES]
    rng.shuffle(combos)
    examples = []
    for opener, subject, predicate in combos[: n_train + n_eval]:
        if subject.endswith("friends"):  # plural subject: "are", "want"
            verb, _, rest = predicate.partition(" ")
            predicate = PLURAL.get(verb, verb) + " " + rest
        sentence = (opener + subject + " " + predicate + ".")
        sentence = sentence[0].upper() + sentence[1:]
        examples.append({"messages": [
            {"role": "user", "content": f"Rewrite like a pirate: {sentence}"},
            {"role": "assistant", "content": _pirate(sentence)},
        ]})
    return examples[:n_train], examples[n_train:]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    out = Path(args.out)
    for name, fn, n_train, n_eval in (("sentiment", sentiment, 240, 80), ("extract", extract, 200, 60),
                                      ("pirate", pirate, 160, 40)):
        train, evals = fn(random.Random(f"{args.seed}-{name}"), n_train, n_eval)
        write(out / name / "train.jsonl", train)
        write(out / name / "eval.jsonl", evals)
        print(f"{out / name}: {len(train)} train, {len(evals)} eval")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
