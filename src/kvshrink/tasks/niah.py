"""`niah`: needles in a haystack (RULER's multi-key / multi-value variants). Many `key: value` pairs are
hidden in filler; the question asks for the values of some keys.

    ... The special magic number for amber-falcon is 48213. ...
    Question: what are the special magic numbers for amber-falcon and quiet-river?
    amber-falcon: 48213 / quiet-river: 90211 / Answer: 48213 90211

difficulty = keys asked (one value each, answered in the order asked); odd problem seeds use the
multi-value variant instead: one key asked, holding `difficulty` values (answered in text order).
About 2 + 2 * difficulty distractor pairs; filler brings the context to ~ 512 + 64 * difficulty tokens.
"""

from __future__ import annotations

from .common import MARKER, Problem, scatter

DEFAULT_DIFFICULTY = 2
MAX_DIFFICULTY = 100  # ~7K tokens of context
ANSWER_KIND = "list"
SENTENCE_TOKENS = 6
FACTS = r"The special magic number for [a-z]+-[a-z]+ is \d+\."  # the key-value sentences
ADJECTIVES = ["amber", "quiet", "brave", "silver", "hidden", "gentle", "rapid", "golden", "lucky", "misty", "proud",
              "sunny", "wild", "calm", "bold", "icy", "noble", "rusty", "swift", "tiny"]
NOUNS = ["falcon", "river", "garden", "lantern", "meadow", "harbor", "comet", "forest", "pebble", "canyon", "orchid",
         "glacier", "thunder", "willow", "beacon", "island", "summit", "ember", "valley", "anchor"]


def generate(rng, difficulty: int) -> Problem:
    multi_value = rng.random() < 0.5
    n_keys = (1 if multi_value else difficulty) + 2 + 2 * difficulty
    keys = rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], n_keys)
    asked = keys[:1] if multi_value else keys[:difficulty]
    numbers = iter(rng.sample(range(10_000, 100_000), n_keys + difficulty))
    pairs = [(asked[0], next(numbers)) for _ in range(difficulty)] if multi_value else [(k, next(numbers)) for k in asked]
    pairs += [(k, next(numbers)) for k in keys[len(asked):]]
    rng.shuffle(pairs)
    sentences = [f"The special magic number for {k} is {v}." for k, v in pairs]
    text = scatter(sentences, (512 + 64 * difficulty) // SENTENCE_TOKENS, rng)
    what = "all special magic numbers for" if multi_value else "the special magic numbers for"
    prompt = f"Read the text below.\n\n{text}\n\nQuestion: what are {what} {' and '.join(asked)}?"
    facts = {"sentences": sentences, "asked": asked}
    answer = solve(facts)
    lines = [f"{k}: {v}" for k, v in pairs if k in asked]
    lines.sort(key=lambda line: asked.index(line.split(":")[0]))  # stable: text order within a key
    return Problem("niah", difficulty, prompt, "\n".join(lines) + f"\n{MARKER} {' '.join(answer)}", answer, ANSWER_KIND, facts)


def solve(facts: dict) -> tuple:
    """Values of the asked keys, keys in the order asked, each key's values in text order."""
    found = [s[len("The special magic number for "):].rstrip(".").split(" is ") for s in facts["sentences"]]
    return tuple(v for k in facts["asked"] for key, v in found if key == k)
