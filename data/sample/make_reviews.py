"""Generate ``data/sample/reviews.csv``: a synthetic product-review sentiment set (text, label).

Every review is composed here from small hand-written word lists (products, aspects, sentiment
phrases, openers, closers); nothing is copied from an existing corpus. Labels are ``negative``,
``neutral`` and ``positive``. The set is deliberately imperfect so the pipeline has work to do:
mixed-sentiment reviews, ~5% flipped labels, ~1% exact duplicate rows, typos, casing and
punctuation variants, irregular whitespace and a few non-NFKC characters (full-width letters,
ligatures) that ingest's cleaning step normalizes or drops.

The flipped rows are written beside the sample, to ``reviews_flips.csv`` (text, given label, true
label): the answer key the label audit (stage audit) is measured against.

Regenerate (deterministic: same seed, byte-identical files):

    python data/sample/make_reviews.py
"""

import csv
import random
import unicodedata
from pathlib import Path

SEED = 20240607
OUT = Path(__file__).with_name("reviews.csv")
FLIPS = Path(__file__).with_name("reviews_flips.csv")  # which rows NOISE flipped
COUNTS = {"positive": 640, "negative": 560, "neutral": 400}  # ~40/35/25 before noise
NOISE, DUPLICATES = 0.05, 0.01
MAX_CHARS = 260  # keeps every review well under prepare.max_length tokens

GENERIC = ["price", "delivery", "packaging", "customer service"]  # apply to every product
PRODUCTS = {  # category -> (product names, "|"-separated aspects that make sense for it)
    "pair of headphones": (["AuraBeat X2", "Quietline 300", "PulsePods"],
                           "sound|battery|comfort|noise cancelling|build quality"),
    "blender": (["VortexMix Pro", "Kitchenly B5"], "motor|noise level|cleanup|instructions"),
    "backpack": (["Trailhand 28L", "UrbanPack Lite"], "zippers|straps|pockets|size|design"),
    "novel": (["Glass Orchard", "Salt and Ember"], "plot|characters|ending|pacing"),
    "phone case": (["ArmorShell", "SlimGuard Clear"], "grip|fit|protection|design"),
    "coffee maker": (["BrewMate 12", "Morning Drip S"], "coffee|carafe|setup|cleanup|instructions"),
    "desk lamp": (["Lumo Arc", "BrightDesk Mini"], "brightness|design|setup|build quality"),
    "pair of running shoes": (["Strider 5", "CloudStep Run"], "cushioning|sizing|materials|design"),
    "vacuum": (["DustHawk V8", "Sweeply Cordless"], "suction|battery|cleanup|noise level|setup"),
    "smartwatch": (["Tempo Fit 2", "Orbit Watch"], "battery|screen|app|fit|setup"),
}
ASPECTS = {  # aspect -> its own positive and negative phrases, "|"-separated
    "battery": ("lasts all day|charges quickly", "dies fast|barely lasts a day"),
    "sound": ("is crisp and clear|has deep bass", "is muddy|crackles at high volume"),
    "comfort": ("is great for long sessions", "hurts after an hour"),
    "noise cancelling": ("blocks out the train", "barely does anything"),
    "build quality": ("feels sturdy", "feels cheap|feels flimsy"),
    "instructions": ("are easy to follow", "are confusing|are missing steps"),
    "price": ("is fair|is a steal", "is way too high|is hard to justify"),
    "delivery": ("arrived early|was quick", "took three weeks|was late"),
    "customer service": ("was very helpful", "never replied|was rude"),
    "motor": ("crushes ice easily", "burned out in a month"),
    "noise level": ("is surprisingly quiet", "is painfully loud"),
    "protection": ("survived several drops", "cracked on the first drop"),
    "straps": ("are well padded", "dig into my shoulders"),
    "pockets": ("are well thought out", "are too shallow"),
    "brightness": ("is easy on the eyes", "flickers"),
    "design": ("looks great", "looks dated"), "cleanup": ("takes seconds", "is a chore"),
    "zippers": ("glide smoothly", "snag constantly"), "plot": ("kept me hooked", "goes nowhere"),
    "size": ("is just right", "is bulkier than shown"), "characters": ("feel real", "are flat"),
    "ending": ("is perfect", "feels rushed"), "pacing": ("is tight", "drags in the middle"),
    "grip": ("is secure", "is slippery"), "fit": ("is snug", "is loose"),
    "coffee": ("tastes rich", "tastes burnt"), "carafe": ("pours cleanly", "drips everywhere"),
    "setup": ("took two minutes", "was a nightmare"), "app": ("syncs reliably", "keeps crashing"),
    "cushioning": ("feels springy", "is too thin"), "sizing": ("runs true", "runs small"),
    "materials": ("feel premium", "smell like plastic"), "screen": ("is sharp", "scratches easily"),
    "suction": ("picks up everything", "is weak"), "packaging": ("was neat", "was crushed"),
}
PLURAL = ("instructions", "zippers", "straps", "pockets", "characters", "materials")
# Phrase lists are "|"-separated strings to keep the tables compact; pick() draws one.
PRED = {  # generic predicates; {be} is is/are or was/were, so negation reads "{be}n't"
    "pos": "{be} fantastic|{be} excellent|{be} honestly amazing|{be} superb|{be} pretty good"
    "|exceeded my expectations|{be} solid|{be} not bad at all|{be} better than expected"
    "|{be} really nice|{be} a pleasant surprise",
    "neu": "{be} okay|{be} fine|{be} average|{be} about what I expected|{be} nothing special"
    "|{be} acceptable|{be} so-so|{be} neither good nor bad|{be} fine I suppose"
    "|{be} not the worst|{be} pretty standard",
    "neg": "{be} terrible|{be} awful|{be} a total letdown|{be} useless|{be} really poor"
    "|{be}n't great|{be} a bit disappointing|could be better|{be} underwhelming"
    "|{be} weaker than advertised|{be} not good at all",
}
OPENERS = {
    "any": "Bought the {name} for my {who}.|Got this {cat} last month.|Ordered the {name} on sale."
    "|I've been using the {name} for {n} weeks.|This is my second {cat}."
    "|Picked up the {name} after reading reviews.",
    "pos": "Love this {cat}!|Really happy with the {name}.|What a great {cat}.",
    "neu": "Mixed feelings about the {name}.|Not sure how I feel about this {cat}.",
    "neg": "Really wanted to like the {name}.|Regret buying this {cat}.|Ugh, this {cat}.",
}
CLOSERS = {
    "pos": "Would buy again.|Highly recommend.|Five stars.|Very happy with it.|No regrets."
    "|Worth every penny.",
    "neu": "It does the job.|Three stars.|Fine for the price.|Might keep it, might not."
    "|It's alright, I guess.|Nothing to write home about.",
    "neg": "Returning it.|Would not recommend.|Save your money.|One star.|Never again."
    "|Sending it back.",
}
SHORT = {  # 3-5 word one-liners (a two-word category makes a few longer)
    "pos": "Great {cat}, love it!|Excellent {cat}, very happy.|Really solid {cat}."
    "|Works perfectly, love it.",
    "neu": "It's an okay {cat}.|Average {cat}, nothing more.|Meh, it's fine.|It does the job.",
    "neg": "Broke within a week.|Terrible {cat}, avoid.|Do not buy this.|Total waste of money.",
}
HEDGES = "I think|Honestly,|To be fair,|Overall|I guess|For what it's worth,"
WHO = "wife|son|commute|office|gym|dad|dorm|trip"
MIX = {  # clause polarity odds per true label: off-label clauses keep the task non-trivial
    "positive": {"pos": 90, "neu": 7, "neg": 3},
    "negative": {"pos": 3, "neu": 7, "neg": 90},
    "neutral": {"pos": 12, "neu": 76, "neg": 12},
}
POL = {"positive": "pos", "negative": "neg", "neutral": "neu"}
TYPOS = {"the": "teh", "really": "realy", "quality": "qualty", "recommend": "reccomend",
         "disappointing": "dissapointing", "terrible": "terible", "expected": "expectd"}


def pick(rng: random.Random, options: str) -> str:
    return rng.choice(options.split("|"))


def clause(rng: random.Random, aspects: list[str], pol: str) -> str:
    """One judgement of an aspect not yet used in this review, e.g. 'the battery dies fast'."""
    aspect = aspects.pop()  # popped so a review never contradicts itself about one aspect
    specific = dict(zip(("pos", "neg"), ASPECTS[aspect], strict=True)).get(pol)
    if specific and rng.random() < 0.4:
        return f"the {aspect} {pick(rng, specific)}"
    be = pick(rng, "are|were" if aspect in PLURAL else "is|was")
    return f"the {aspect} " + pick(rng, PRED[pol]).format(be=be)


def sentence(rng: random.Random, aspects: list[str], label: str) -> str:
    """A sentence of one clause, or a contrast 'A but B' whose second half carries the label."""
    odds = MIX[label]
    pol = rng.choices(list(odds), weights=list(odds.values()))[0]
    if rng.random() < 0.15:  # contrast: the part after "but" is what the reviewer lands on
        flip = {"pos": "neg", "neg": "pos"}
        first = flip.get(pol, pick(rng, "pos|neg"))  # neutral: a genuinely mixed pair
        last = pol if label != "neutral" else flip[first]
        text = f"{clause(rng, aspects, first)} but {clause(rng, aspects, last)}"
    else:
        text = clause(rng, aspects, pol)
    if rng.random() < 0.2:  # hedges soften without changing the meaning
        text = f"{pick(rng, HEDGES)} {text}"
    return text[0].upper() + text[1:] + "."


def review(rng: random.Random, label: str) -> str:
    """Short one-liners for ~8% of rows, else opener? + 1-3 sentences + closer?."""
    cat = rng.choice(list(PRODUCTS))
    names, own = PRODUCTS[cat]
    aspects = own.split("|") + GENERIC
    rng.shuffle(aspects)
    fill = {"cat": cat, "name": rng.choice(names), "who": pick(rng, WHO), "n": rng.randint(2, 9)}
    pol = POL[label]
    if rng.random() < 0.08:
        return pick(rng, SHORT[pol]).format(**fill)
    parts = []
    if rng.random() < 0.5:
        parts.append(pick(rng, OPENERS["any" if rng.random() < 0.6 else pol]).format(**fill))
    parts += [sentence(rng, aspects, label) for _ in range(rng.choice([1, 1, 2, 2, 3]))]
    if rng.random() < 0.5 and len(parts) < 4:  # at most 4 sentences in all
        parts.append(pick(rng, CLOSERS[pol if rng.random() < 0.85 else "neu"]))
    return " ".join(parts)


def quirks(rng: random.Random, text: str) -> str:
    """Rare surface noise real reviews have: typos, casing, punctuation, whitespace, Unicode."""
    r, words = rng.random(), text.split(" ")
    if r < 0.04:  # a common misspelling of a random word, else two of its letters swapped
        i = rng.choice([k for k, w in enumerate(words) if len(w) > 2] or [0])
        w, j = words[i], rng.randrange(1, max(2, len(words[i]) - 2))  # never the last char
        words[i] = TYPOS.get(w.lower()) or w[:j] + w[j + 1 :][:1] + w[j] + w[j + 2 :]
        return " ".join(words)
    if r < 0.07:
        return text.lower()
    if r < 0.08:
        return text.upper()
    if r < 0.13 and text.endswith("."):
        return text[:-1] + rng.choice(["!!", "...", "!!!", " ..", "?!"])
    if r < 0.14:  # a double space somewhere in the middle
        i = rng.randrange(1, len(words))
        return " ".join(words[:i]) + "  " + " ".join(words[i:])
    if r < 0.15:
        return rng.choice([" ", "  ", ""]) + text + rng.choice([" ", "\t", "  "])
    if r < 0.16:  # compatibility characters (ligatures, full-width) that NFKC folds back
        if "fi" in text or "fl" in text:
            return text.replace("fi", "\ufb01").replace("fl", "\ufb02")
        i = rng.randrange(len(words))
        words[i] = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in words[i])
        return " ".join(words)
    return text


def key(text: str) -> str:
    """The text as ingest sees it after cleaning, case-folded: no two rows may collide here."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).lower()


def generate(seed: int = SEED) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """The rows (text, label), shuffled, and the flipped ones as (text, given label, true label)."""
    rng = random.Random(seed)
    seen, rows = set(), []  # seen is only tested, never iterated: hash order cannot leak in
    for label, count in COUNTS.items():
        while sum(1 for _, x in rows if x == label) < count:
            text = quirks(rng, review(rng, label))
            if len(text) <= MAX_CHARS and key(text) not in seen:  # distinct: no split leakage
                seen.add(key(text))
                rows.append((text, label))
    labels, truth = list(COUNTS), {}
    for i in rng.sample(range(len(rows)), round(NOISE * len(rows))):  # flipped labels
        text, label = rows[i]
        rows[i] = (text, rng.choice([x for x in labels if x != label]))
        truth[text] = label  # texts are distinct: the text names the row
    rows += rng.sample(rows, round(DUPLICATES * len(rows)))  # exact (text, label) repeats
    rng.shuffle(rows)
    flips = [(text, label, truth[text]) for text, label in rows if text in truth]
    return rows, flips


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def main() -> None:
    rows, flips = generate()
    write_csv(OUT, ["text", "label"], rows)
    # The answer key of the label noise, in the sample's row order (a duplicated row appears twice):
    # what the label audit's precision and recall are measured against.
    write_csv(FLIPS, ["text", "label", "true_label"], flips)
    print(f"wrote {len(rows)} rows to {OUT}, {len(flips)} flipped ones to {FLIPS}")


if __name__ == "__main__":
    main()
