"""A small synthetic world used for memft's bundled data.

Everything here is generated from a fixed seed, so the bundled files can be rebuilt bit-for-bit
(`python scripts/make_assets.py`). The world has invented countries, capitals, rivers and
animals, simple arithmetic and word games: facts a tiny model can learn in a few minutes on a
CPU, so that a falling loss means something.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "vo", "zu", "bel", "dra", "sen", "pol", "ri", "no", "ta", "gor", "ish"]
_ANIMALS = ["otter", "heron", "badger", "lynx", "falcon", "beetle", "salmon", "marten", "crane", "viper"]
_COLOURS = ["red", "green", "blue", "amber", "grey", "violet", "white", "black"]
_WORDS = ["river", "stone", "candle", "garden", "window", "ladder", "harbor", "meadow", "lantern", "forest",
          "pepper", "silver", "basket", "mirror", "thunder", "pillow", "orchard", "compass", "anchor", "valley"]


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    river: str
    animal: str
    colour: str
    population: int


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def make_world(seed: int = 0, n_countries: int = 40) -> list[Country]:
    """Invented countries with unique names and attributes."""
    rng = random.Random(seed)
    names: set[str] = set()
    world = []
    while len(world) < n_countries:
        name, capital, river = _name(rng, 3), _name(rng, 2), _name(rng, 2)
        if {name, capital, river} & names or len({name, capital, river}) < 3:
            continue
        names |= {name, capital, river}
        world.append(Country(name, capital, river, rng.choice(_ANIMALS), rng.choice(_COLOURS), rng.randint(2, 90)))
    return world


def fact_sentences(c: Country) -> list[str]:
    return [
        f"The capital of {c.name} is {c.capital}.",
        f"{c.capital} is the capital city of {c.name}.",
        f"The river {c.river} flows through {c.name}.",
        f"The national animal of {c.name} is the {c.animal}.",
        f"The flag of {c.name} is {c.colour}.",
        f"About {c.population} million people live in {c.name}.",
    ]


def instruction_examples(world: list[Country], rng: random.Random, n: int) -> list[dict]:
    """Alpaca-style records: instruction, input, output."""
    out = []
    for _ in range(n):
        kind = rng.randrange(6)
        c = rng.choice(world)
        if kind == 0:
            out.append({"instruction": f"What is the capital of {c.name}?", "input": "", "output": c.capital})
        elif kind == 1:
            out.append({"instruction": "Name the national animal of the country.", "input": c.name, "output": c.animal})
        elif kind == 2:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            out.append({"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)})
        elif kind == 3:
            w = rng.choice(_WORDS)
            out.append({"instruction": "Reverse the letters of the word.", "input": w, "output": w[::-1]})
        elif kind == 4:
            words = rng.sample(_WORDS, 3)
            out.append({"instruction": "Sort the words alphabetically.", "input": ", ".join(words),
                        "output": ", ".join(sorted(words))})
        else:
            out.append({"instruction": f"Which river flows through {c.name}?", "input": "", "output": c.river})
    return out


def chat_examples(instructions: list[dict]) -> list[dict]:
    """The same content as chat `messages` with roles."""
    chats = []
    for ex in instructions:
        user = ex["instruction"] + (f"\n{ex['input']}" if ex["input"] else "")
        chats.append({"messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": user},
            {"role": "assistant", "content": ex["output"]},
        ]})
    return chats


def text_corpus(world: list[Country], rng: random.Random, n_paragraphs: int) -> list[str]:
    """Plain-text paragraphs mixing world facts, arithmetic and word games."""
    paragraphs = []
    for _ in range(n_paragraphs):
        c = rng.choice(world)
        sentences = rng.sample(fact_sentences(c), 4)
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        sentences.append(f"{a} plus {b} equals {a + b}.")
        w = rng.choice(_WORDS)
        sentences.append(f"The word {w} reversed is {w[::-1]}.")
        paragraphs.append(" ".join(sentences))
    return paragraphs
