"""Generate the shipped support-ticket intent dataset (support_tickets_{train,val,test}.csv).

Synthetic customer messages in four intents, deliberately imbalanced (billing 40 %, shipping
30 %, technical 20 %, account 10 %) and with cross-intent distractors ("my order", "my
account", "the app", "refund" next to a delivery problem ...), so a bag-of-keywords is not
enough: the intent is set by the problem phrase, not by the nouns around it. 4 % of the
rows of every split carry a random wrong label (mislabelled tickets, as in real data), so the
best possible accuracy is about 96 %. Every message
comes from templates below; no text was copied from anywhere. Released under CC0-1.0
(support_tickets_LICENSE). Re-create byte-identical files with:

    python -m lmforge.data.corpora.make_support_tickets
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

SHARES = {"billing": 0.4, "shipping": 0.3, "technical": 0.2, "account": 0.1}
SIZES = {"train": 1600, "val": 300, "test": 400}
SEEDS = {"train": 1, "val": 2, "test": 3}
NOISE = 0.04  # share of rows given a random other label, as mislabelled tickets in real data

PROBLEMS = {
    "billing": [
        "I was charged twice for {thing}",
        "the invoice for {thing} shows the wrong amount",
        "I still have not received the refund for {thing}",
        "my card was billed even though I cancelled {thing}",
        "why did the price of {thing} go up on my statement",
        "there is a payment I do not recognise for {thing}",
        "can I get a receipt for {thing}",
        "the discount code was not applied to {thing}",
    ],
    "shipping": [
        "{thing} has not arrived yet",
        "the tracking number for {thing} does not work",
        "{thing} was delivered to the wrong address",
        "the parcel with {thing} arrived damaged",
        "when will {thing} be shipped",
        "the courier says {thing} is lost",
        "can I change the delivery date for {thing}",
        "only half of {thing} was in the box",
    ],
    "technical": [
        "the app crashes when I open {thing}",
        "I get an error code when I try to use {thing}",
        "{thing} stopped syncing after the update",
        "the page for {thing} will not load",
        "{thing} keeps freezing on my phone",
        "the download of {thing} fails halfway",
        "{thing} shows a blank screen",
        "the button for {thing} does nothing when I click it",
    ],
    "account": [
        "I cannot log in to my account to see {thing}",
        "please reset my password, I need {thing}",
        "how do I change the email address on my profile for {thing}",
        "I want to delete my account and {thing}",
        "my account was locked while I was looking at {thing}",
        "the two-factor code never arrives so I cannot reach {thing}",
        "someone else may have accessed my account and {thing}",
        "how do I update my username for {thing}",
    ],
}
THINGS = [
    "my order",
    "my last order",
    "the headphones",
    "my subscription",
    "the blue jacket",
    "order 4471",
    "the gift card",
    "my account",
    "the premium plan",
    "the coffee machine",
    "the app",
    "the monthly box",
    "the laptop stand",
    "my refund",
    "the running shoes",
]
OPENERS = [
    "",
    "hi,",
    "hello,",
    "hey there,",
    "good morning,",
    "urgent:",
    "quick question:",
    "sorry to bother you,",
]
CLOSERS = [
    "",
    "please help.",
    "thanks.",
    "what should I do?",
    "this is frustrating.",
    "can you check?",
    "thank you in advance.",
]


def message(rng: random.Random, intent: str) -> str:
    body = rng.choice(PROBLEMS[intent]).format(thing=rng.choice(THINGS))
    text = " ".join(p for p in (rng.choice(OPENERS), body, rng.choice(CLOSERS)) if p)
    return text[0].upper() + text[1:]


def split(name: str) -> list[tuple[str, str]]:
    rng = random.Random(SEEDS[name])
    rows = [
        (message(rng, intent), intent)
        for intent, share in SHARES.items()
        for _ in range(round(SIZES[name] * share))
    ]
    rng.shuffle(rows)
    intents = list(SHARES)
    for i, (text, intent) in enumerate(rows):
        if rng.random() < NOISE:
            rows[i] = (text, rng.choice([x for x in intents if x != intent]))
    return rows


def main(out_dir: Path = Path(__file__).parent) -> None:
    for name in SIZES:
        with open(out_dir / f"support_tickets_{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["text", "label"])
            writer.writerows(split(name))


if __name__ == "__main__":
    main()
