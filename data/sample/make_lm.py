"""Generate the causal-LM samples: ``stories.txt`` (plain text) and ``pairs.csv`` (prompt, response).

Both are composed here from small hand-written word lists; nothing is copied from a corpus.

- ``stories.txt``: short documents (two to four sentences about a character, a place and an
  object), separated by blank lines: the shape of a pretraining corpus, in miniature.
- ``pairs.csv``: instructions with one right answer, so BLEU/ROUGE measure learning: "Reverse the
  words: ..." (the words in reverse order) and "Uppercase: ..." (the same words in capitals).
- ``preferences.csv``: the same prompts as preference rows (prompt, chosen, rejected) for stage
  align's DPO: chosen is the right answer, rejected a plausible wrong one (words not reversed, one
  word wrong, wrong case), drawn with its own seed so pairs.csv stays as it was.

Regenerate (deterministic: same seed, byte-identical files):

    python data/sample/make_lm.py
"""

import csv
import random
from pathlib import Path

SEED = 20261129
HERE = Path(__file__).parent
DOCUMENTS, PAIRS = 600, 1200

NAMES = ["Ada", "Bram", "Cleo", "Dara", "Emil", "Faye", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lena"]
PLACES = ["the harbour", "the old mill", "the market", "the forest", "the library", "the station",
          "the bakery", "the hill", "the river bank", "the garden"]
THINGS = ["a red kite", "a brass key", "a small boat", "a blue lantern", "an old map", "a warm loaf",
          "a paper crane", "a silver bell", "a wooden box", "a green umbrella"]
VERBS = ["found", "carried", "lost", "painted", "repaired", "sold", "hid", "shared"]
MOODS = ["happy", "tired", "curious", "quiet", "proud", "worried", "calm"]
ENDINGS = ["Then the rain began.", "By evening the wind had dropped.", "Nobody saw it again.",
           "It was a good day.", "The bells rang twice.", "The lights came on one by one."]
WORDS = ["apple", "river", "stone", "cloud", "lamp", "bread", "song", "field", "door", "bird",
         "salt", "wheel", "candle", "rope", "glass", "honey", "paper", "snow", "coin", "leaf"]


def story(rng: random.Random) -> str:
    who, where, what = rng.choice(NAMES), rng.choice(PLACES), rng.choice(THINGS)
    lines = [f"{who} went to {where} in the morning.",
             f"There {who} {rng.choice(VERBS)} {what} and felt {rng.choice(MOODS)}."]
    if rng.random() < 0.6:
        friend = rng.choice([n for n in NAMES if n != who])
        lines.append(f"{friend} came along and asked about {what}.")
    if rng.random() < 0.5:
        lines.append(rng.choice(ENDINGS))
    return "\n".join(lines)


def pair(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    if rng.random() < 0.5:
        return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))
    return f"Uppercase: {' '.join(words)}", " ".join(words).upper()


def rejected(prompt: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: the words left in order / in the wrong case, or one word wrong."""
    words = prompt.split(": ", 1)[1].split()
    if rng.random() < 0.5:  # the instruction not followed
        wrong = " ".join(words) if prompt.startswith("Reverse") else rng.choice(
            [" ".join(words), " ".join(words).title()])
        if wrong != answer:
            return wrong
    out = answer.split()
    i = rng.randrange(len(out))
    other = rng.choice([w for w in WORDS if w not in words])
    out[i] = other.upper() if out[i].isupper() else other
    return " ".join(out)


def main() -> None:
    rng = random.Random(SEED)
    docs = [story(rng) for _ in range(DOCUMENTS)]
    (HERE / "stories.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    seen, rows = set(), []
    while len(rows) < PAIRS:  # distinct prompts: a repeated prompt across splits would be leakage
        p, r = pair(rng)
        if p not in seen:
            seen.add(p)
            rows.append((p, r))
    with (HERE / "pairs.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("prompt", "response"), *rows])
    wrong = random.Random(SEED + 1)
    with (HERE / "preferences.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("prompt", "chosen", "rejected"),
                                 *((p, r, rejected(p, r, wrong)) for p, r in rows)])


if __name__ == "__main__":
    main()
