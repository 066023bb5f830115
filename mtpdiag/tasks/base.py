"""Verifiable tasks: a character tokenizer, a prompt sampler, a code verifier and a
unique target completion per prompt (so J_true = mean_x pi(y*(x)|x) is exact)."""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

PAD, EOS = "<pad>", "<eos>"


class CharTokenizer:
    """One id per character; id 0 is padding, id 1 ends a completion."""

    def __init__(self, alphabet: str):
        self.itos = [PAD, EOS, *alphabet]
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.eos_id = 0, 1

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in this task's alphabet {self.itos[2:]}") from None

    def decode(self, ids) -> str:
        """Text up to (not including) the first EOS; padding is dropped."""
        chars = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i != self.pad_id:
                chars.append(self.itos[i])
        return "".join(chars)


@dataclass(frozen=True)
class Problem:
    prompt: str
    target: str  # the unique correct completion, without EOS


class Task(ABC):
    """A verifiable task whose prompts all have the same length (no left padding)."""

    name: str
    tokenizer: CharTokenizer

    @abstractmethod
    def sample_problem(self, rng: random.Random) -> Problem: ...

    @abstractmethod
    def solve(self, prompt: str) -> str:
        """The correct completion, computed from the prompt text alone."""

    @property
    @abstractmethod
    def prompt_len(self) -> int: ...

    @property
    @abstractmethod
    def max_completion_len(self) -> int:
        """Longest correct completion in tokens, EOS included."""

    def verify(self, prompt: str, completion: str) -> float:
        """Reward 1.0 for an exact match with the computed answer, else 0.0."""
        return float(completion == self.solve(prompt))

    def min_block_size(self, max_new_tokens: int | None = None) -> int:
        """The context a model needs: a prompt and ``max_new_tokens`` sampled tokens
        (default: the longest correct completion)."""
        return self.prompt_len + (self.max_completion_len if max_new_tokens is None else max_new_tokens)

    def sample_problems(self, rng: random.Random, n: int) -> list[Problem]:
        return [self.sample_problem(rng) for _ in range(n)]

    def heldout_problems(self, n: int, seed: int = 12345) -> list[Problem]:
        """A fixed evaluation set: same seed, same problems, on every machine."""
        return self.sample_problems(random.Random(f"{self.name}-heldout-{seed}"), n)

    def encode_prompts(self, problems: list[Problem], device=None) -> torch.Tensor:
        return torch.tensor([self.tokenizer.encode(p.prompt) for p in problems], dtype=torch.long, device=device)

    def encode_completions(self, problems: list[Problem], completions: list[str], device=None):
        """Prompt + completion + EOS, right-padded.

        Returns ``input_ids`` [B, T] and ``response_mask`` [B, T-1], the latter
        aligned with next-token predictions (entry i scores token i+1) and true
        on completion tokens and their EOS.
        """
        rows = [self.tokenizer.encode(p.prompt + c) + [self.tokenizer.eos_id] for p, c in zip(problems, completions)]
        return pad_rows(rows, self.prompt_len, self.tokenizer.pad_id, device)


def pad_rows(rows: list[list[int]], prompt_len: int, pad_id: int, device=None):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T - 1)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, prompt_len - 1 : len(r) - 1] = 1.0
    return ids.to(device), mask.to(device)
