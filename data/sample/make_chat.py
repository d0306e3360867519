"""Generate the chat sample ``chat.jsonl``: synthetic multi-turn conversations in the OpenAI
``messages`` format, for ``examples/chat_sft.yaml`` (docs/chat.md).

Each conversation has a system prompt (three in four) and one or two user/assistant exchanges (2 to
4 turns after the system message) about a short list of words: the first user turn asks for one
operation on the words ("Uppercase: apple river stone"), a second one asks for another operation on
the same words without repeating them ("Now reverse them."), so the answer needs the earlier turns.
Every answer is determined by the conversation, so exact match, BLEU and ROUGE measure learning;
no two conversations open with the same user turn, so no test conversation leaks from train.
Composed from the word lists below; nothing is copied from a corpus.

Regenerate (deterministic: same seed, byte-identical file):

    python data/sample/make_chat.py
"""

import json
import random
from pathlib import Path

SEED = 20261207
HERE = Path(__file__).parent
CONVERSATIONS = 800

SYSTEMS = ["You are a helpful assistant.", "You are a careful assistant that edits word lists.",
           "Answer with the words only."]
WORDS = ["apple", "river", "stone", "cloud", "lamp", "bread", "song", "field", "door", "bird",
         "salt", "wheel", "candle", "rope", "glass", "honey", "paper", "snow", "coin", "leaf"]
# (first-turn instruction, follow-up instruction, what it does to the words)
OPERATIONS = {
    "uppercase": ("Uppercase: {words}", "Now write them in capitals.", lambda w: [x.upper() for x in w]),
    "reverse": ("Reverse the words: {words}", "Now reverse them.", lambda w: w[::-1]),
    "sort": ("Sort alphabetically: {words}", "Now sort them alphabetically.", sorted),
    "first": ("First word of: {words}", "Which one comes first?", lambda w: w[:1]),
    "count": ("How many words: {words}", "How many are there?", lambda w: [str(len(w))]),
}


def conversation(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(3, 5))
    first, second = rng.sample(sorted(OPERATIONS), 2)
    ask, _, do = OPERATIONS[first]
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.75 else []
    messages += [{"role": "user", "content": ask.format(words=" ".join(words))},
                 {"role": "assistant", "content": " ".join(do(words))}]
    if rng.random() < 0.6:
        _, follow, do = OPERATIONS[second]
        messages += [{"role": "user", "content": follow},
                     {"role": "assistant", "content": " ".join(do(words))}]
    return {"messages": messages}


def main() -> None:
    rng = random.Random(SEED)
    rows, seen = [], set()
    while len(rows) < CONVERSATIONS:
        row = conversation(rng)
        key = next(m["content"] for m in row["messages"] if m["role"] == "user")
        if key not in seen:  # distinct first user turns: validate's leakage check compares them
            seen.add(key)
            rows.append(row)
    with (HERE / "chat.jsonl").open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} conversations to {HERE / 'chat.jsonl'}")


if __name__ == "__main__":
    main()
