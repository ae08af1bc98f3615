"""A deterministic synthetic text corpus.

No data set can be downloaded here, and the tokenizer, the training tests and the benchmarks all
need text. Sentences drawn from a small grammar are enough: they exercise a byte-level BPE
tokenizer (words, digits, punctuation, code) and give a language model something learnable, so a
falling loss in a test means the optimizer really updates the weights.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

_SUBJECTS = (
    "the model", "a scheduler", "the tenant", "every request", "the optimizer", "a worker",
    "the cache", "our server", "the kernel", "a user", "the agent", "this batch",
)
_VERBS = (
    "reads", "writes", "moves", "schedules", "evicts", "prefetches", "serves", "counts",
    "throttles", "computes", "stores", "returns",
)
_OBJECTS = (
    "the tensor", "a block", "many tokens", "the weights", "one page", "the queue",
    "a buffer", "the gradient", "its parameters", "a prompt", "the answer", "two layers",
)
_ENDINGS = (
    "before the next step", "after the forward pass", "on the device", "from the host",
    "in order", "as fast as it can", "without waiting", "every time",
)
_CODE = (
    "def step(x):\n    return x + 1\n",
    "for i in range(8):\n    total += i\n",
    "if budget < 0:\n    raise ValueError('budget')\n",
    "class Cache:\n    pass\n",
)


def sentences(seed: int, count: int) -> Iterator[str]:
    """Yield ``count`` sentences; the same seed always yields the same text."""
    rng = random.Random(seed)
    for _ in range(count):
        kind = rng.random()
        if kind < 0.1:
            yield rng.choice(_CODE)
        elif kind < 0.2:
            a, b = rng.randrange(1000), rng.randrange(1000)
            yield f"{a} plus {b} is {a + b}."
        else:
            words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
            if rng.random() < 0.5:
                words.append(rng.choice(_ENDINGS))
            sentence = " ".join(words)
            yield sentence[0].upper() + sentence[1:] + rng.choice((".", ".", "!", "?"))


def text(seed: int, count: int) -> str:
    """The corpus as one string, sentences separated by spaces or newlines."""
    return " ".join(sentences(seed, count))
