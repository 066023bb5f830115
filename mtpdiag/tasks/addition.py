from __future__ import annotations

import random

from .base import CharTokenizer, Problem, Task


class AdditionTask(Task):
    """``123+045=`` -> the sum with ``digits + 1`` digits, least significant first
    when ``reverse`` (the order a left-to-right model can carry in)."""

    name = "addition"

    def __init__(self, digits: int = 3, reverse: bool = True):
        if digits < 1:
            raise ValueError(f"digits={digits}: addition needs at least one digit")
        self.digits, self.reverse = digits, reverse
        self.tokenizer = CharTokenizer("0123456789+=")

    @property
    def prompt_len(self) -> int:
        return 2 * self.digits + 2

    @property
    def max_completion_len(self) -> int:
        return self.digits + 2

    def sample_problem(self, rng: random.Random) -> Problem:
        a, b = rng.randrange(10**self.digits), rng.randrange(10**self.digits)
        prompt = f"{a:0{self.digits}d}+{b:0{self.digits}d}="
        return Problem(prompt, self.solve(prompt))

    def solve(self, prompt: str) -> str:
        a, b = prompt.rstrip("=").split("+")
        total = f"{int(a) + int(b):0{self.digits + 1}d}"
        return total[::-1] if self.reverse else total
