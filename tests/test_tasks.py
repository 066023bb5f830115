"""Verifiable tasks: tokenizer, unique targets, verifier, batch encoding."""
import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtpdiag.tasks import AdditionTask, RunningSumTask, make_task


@given(digits=st.integers(1, 5), data=st.data())
def test_addition_target_is_the_sum_with_digits_plus_one_digits(digits, data):
    a = data.draw(st.integers(0, 10**digits - 1))
    b = data.draw(st.integers(0, 10**digits - 1))
    prompt = f"{a:0{digits}d}+{b:0{digits}d}="
    forward, reverse = AdditionTask(digits, reverse=False), AdditionTask(digits, reverse=True)
    assert int(forward.solve(prompt)) == a + b
    assert len(forward.solve(prompt)) == digits + 1
    assert reverse.solve(prompt) == forward.solve(prompt)[::-1]
    assert len(prompt) == forward.prompt_len
    assert len(forward.solve(prompt)) + 1 == forward.max_completion_len


@given(terms=st.integers(2, 11), seed=st.integers(0, 2**32))
def test_running_sum_lists_every_partial_sum(terms, seed):
    task = RunningSumTask(terms)
    problem = task.sample_problem(random.Random(seed))
    numbers = [int(x) for x in problem.prompt.rstrip("=").split("+")]
    assert [int(s) for s in problem.target.split(",")] == list(itertools.accumulate(numbers))
    assert len(problem.prompt) == task.prompt_len
    assert len(problem.target) + 1 == task.max_completion_len


@pytest.mark.parametrize("task", [AdditionTask(2), RunningSumTask(3)], ids=lambda t: t.name)
def test_verifier_accepts_exactly_the_target(task):
    problem = task.sample_problem(random.Random(0))
    assert task.verify(problem.prompt, problem.target) == 1.0
    assert task.verify(problem.prompt, problem.target[:-1]) == 0.0
    assert task.verify(problem.prompt, problem.target + "0") == 0.0


@pytest.mark.parametrize("task", [AdditionTask(3), RunningSumTask(4)], ids=lambda t: t.name)
def test_encode_completions_masks_exactly_the_completion_and_its_eos(task):
    problems = task.sample_problems(random.Random(1), 5)
    completions = [p.target[: i + 1] for i, p in enumerate(problems)]  # different lengths
    ids, mask = task.encode_completions(problems, completions)
    tok = task.tokenizer
    for row, problem, completion, row_mask in zip(ids.tolist(), problems, completions, mask.tolist()):
        length = task.prompt_len + len(completion) + 1
        assert row[:length] == tok.encode(problem.prompt + completion) + [tok.eos_id]
        assert all(i == tok.pad_id for i in row[length:])
        # entry j scores token j+1: the completion tokens and EOS sit at prompt_len .. length-1
        assert [j + 1 for j, m in enumerate(row_mask) if m] == list(range(task.prompt_len, length))
    assert task.encode_prompts(problems).shape == (5, task.prompt_len)


def test_tokenizer_round_trip_and_decode_stops_at_eos():
    tok = AdditionTask().tokenizer
    assert tok.vocab_size == 14
    text = "123+456="
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.pad_id, *tok.encode("12"), tok.eos_id, *tok.encode("3")]) == "12"


def test_tokenizer_names_the_unknown_character():
    with pytest.raises(ValueError, match="'x' is not in this task's alphabet"):
        AdditionTask().tokenizer.encode("1x2")


def test_heldout_set_is_fixed_by_its_seed():
    task = AdditionTask()
    assert task.heldout_problems(20) == AdditionTask().heldout_problems(20)
    assert task.heldout_problems(20, seed=1) != task.heldout_problems(20)


def test_min_block_size_fits_a_prompt_and_the_generation_budget():
    task = AdditionTask(digits=3)  # "123+045=" then 4 answer digits and EOS
    assert task.min_block_size() == 8 + 5
    assert task.min_block_size(max_new_tokens=7) == 8 + 7
    assert RunningSumTask(terms=4).min_block_size() == 8 + 12  # "3+1+4+1=" then "03,04,08,09" and EOS


def test_make_task_builds_by_name_and_rejects_unknown_names():
    assert isinstance(make_task("addition", digits=2), AdditionTask)
    assert make_task("running_sum", terms=3).terms == 3
    with pytest.raises(ValueError, match=r"unknown task 'sorting': choose one of \['addition', 'running_sum'\]"):
        make_task("sorting")


@pytest.mark.parametrize(
    "name, options, message", [("addition", {"digits": 0}, "at least one digit"), ("running_sum", {"terms": 12}, "2..11")]
)
def test_bad_task_options_are_clear_errors(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_task(name, **options)
