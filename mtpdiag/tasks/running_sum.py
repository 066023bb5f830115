from __future__ import annotations

import random

from .base import CharTokenizer, Problem, Task


class RunningSumTask(Task):
    """``3+1+4+1=`` -> ``03,04,08,09``: every partial sum, two digits each, so the
    completion carries its intermediate results in a fixed format."""

    name = "running_sum"

    def __init__(self, terms: int = 4):
        if not 2 <= terms <= 11:
            raise ValueError(f"terms={terms}: choose 2..11 so every partial sum fits two digits")
        self.terms = terms
        self.tokenizer = CharTokenizer("0123456789+=,")

    @property
    def prompt_len(self) -> int:
        return 2 * self.terms

    @property
    def max_completion_len(self) -> int:
        return 3 * self.terms

    def sample_problem(self, rng: random.Random) -> Problem:
        prompt = "+".join(str(rng.randrange(10)) for _ in range(self.terms)) + "="
        return Problem(prompt, self.solve(prompt))

    def solve(self, prompt: str) -> str:
        total, sums = 0, []
        for term in prompt.rstrip("=").split("+"):
            total += int(term)
            sums.append(f"{total:02d}")
        return ",".join(sums)
