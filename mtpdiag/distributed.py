"""Data parallelism under ``torch.distributed``: each rank holds a shard of the batch,
and every number mtpdiag reports is the number of the whole batch.

The token-level means of the RL losses (DAPO: sum over the masked tokens of the
whole batch / their number) are not means of per-rank means when ranks hold
different numbers of tokens. So inside :func:`global_means` mtpdiag's means
divide by the count over all ranks: each rank's loss is then its *share* of the
whole-batch loss, and the shares, their gradients and their Hessian-vector
products SUM over ranks to the single-process values. The parameters are
replicated, so dot products of summed gradients need no further reduction.

Diagnostics run on the raw module (DDP's hooks do not fire for
``torch.autograd.grad``, and DDP has no double backward: pytorch issues 47562,
63812), and the Probe, the calibrators and the trainer all-reduce here.

On one process every reduction is the identity and ``global_means`` changes
nothing, so the same code runs with and without a process group.

The trainer (:func:`mtpdiag.train.train` under ``torchrun --nproc_per_node N``, or
in a process group the caller initialised): rank 0 runs the SFT warm start and
sends its weights to the other ranks (:func:`on_main_then_broadcast`); every
rank samples the whole rollout batch (same generator, same weights, so the same
batch as one process) and keeps its part of each optimiser mini-batch
(:func:`minibatch_rows`, never empty: :func:`check_shards`); losses are each
rank's share of the whole-batch loss, gradients are summed over ranks and every
rank takes the same optimiser step. Nothing is wrapped in DDP, so the
diagnostics run on the raw module. Evaluation runs whole on every rank. The
metrics equal those of one process on the same global batch (with dropout 0:
dropout masks depend on the shard); rank 0 alone writes the run directory
(:func:`rank_run_dir`), checkpoints and the SFT cache.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterable, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from .rundir import RunDir

T = TypeVar("T")
_GLOBAL_MEANS: ContextVar[bool] = ContextVar("mtpdiag_global_means", default=False)


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks (a new tensor, detached); ``tensor`` itself on one process."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_reduce_tree(tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of a dict summed over ranks, in one collective."""
    if not is_distributed() or not tree:
        return tree
    flat = all_reduce_sum(torch.cat([t.detach().reshape(-1) for t in tree.values()]))
    pieces = flat.split([t.numel() for t in tree.values()])
    return {k: p.view_as(t).to(t.dtype) for (k, t), p in zip(tree.items(), pieces)}


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Sum every ``.grad`` over ranks, in place and in one collective: after a backward
    pass of this rank's share of the loss (:func:`global_means`), the gradient of
    the whole-batch loss, so ``optimizer.step()`` moves every rank identically.
    Parameters without a gradient are skipped (the same ones on every rank)."""
    with_grad = [p for p in parameters if p.grad is not None]
    if not is_distributed() or not with_grad:
        return
    summed = all_reduce_tree({str(i): p.grad for i, p in enumerate(with_grad)})
    for p, total in zip(with_grad, summed.values()):
        p.grad.copy_(total)


@contextmanager
def global_means():
    """Inside, mtpdiag's means (``losses.masked_mean`` and the prompt mean of
    ``losses.j_true``) divide by the count over all ranks, so that on several
    ranks each loss is this rank's share of the whole-batch loss. Nests; has
    no effect on one process. Every rank must evaluate the same losses in the
    same order (each mean is one collective)."""
    token = _GLOBAL_MEANS.set(True)
    try:
        yield
    finally:
        _GLOBAL_MEANS.reset(token)


def global_count(count: torch.Tensor) -> torch.Tensor:
    """The denominator of a mean: ``count`` summed over ranks inside :func:`global_means`
    on several ranks, else ``count`` itself. Use it in a loss of your own."""
    if not _GLOBAL_MEANS.get():
        return count
    return all_reduce_sum(count)


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """``values.mean()``, or inside :func:`global_means` on several ranks this rank's
    share of the mean over every rank's values."""
    if not (_GLOBAL_MEANS.get() and is_distributed()):
        return values.mean()
    return values.sum() / global_count(torch.tensor(values.numel(), dtype=values.dtype, device=values.device))


def shard(n: int, device=None) -> torch.Tensor:
    """This rank's rows of ``n``: the ``rank()``-th of ``world_size()`` consecutive
    parts, as equal as possible (``torch.tensor_split``)."""
    return torch.arange(n, device=device).tensor_split(world_size())[rank()]


def run_on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; every rank returns its result (which must pickle),
    or raises its exception, so that a failure on rank 0 does not leave the others
    waiting in a collective."""
    if not is_distributed():
        return fn()
    box: list = [None]
    if rank() == 0:
        try:
            box = [(True, fn())]
        except Exception as err:
            dist.broadcast_object_list([(False, err)], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (in place) with rank ``src``'s values, e.g. a model's
    ``state_dict().values()``."""
    if is_distributed():
        for tensor in tensors:
            dist.broadcast(tensor, src=src)


@contextmanager
def process_group_from_env(device: str | torch.device):
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) and with no process
    group yet, initialise the one torchrun describes for the duration: gloo on CPU;
    on CUDA, this rank's ``LOCAL_RANK`` GPU as the current device, NCCL for CUDA
    tensors and gloo for CPU ones. A group the caller initialised is used as is."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched or not dist.is_available() or dist.is_initialized():
        yield
        return
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the trainer's plumbing


class RowsInMemory(RunDir):
    """The run directory of a rank other than 0: rows in memory (the trainer returns
    them), no file written."""

    def write_config(self, config: dict) -> None:
        """Rank 0 writes config.json."""

    def save_checkpoint(self, state: dict) -> None:
        """Rank 0 writes checkpoint.pt."""

    def mark_complete(self) -> None:
        """Rank 0 removes the marker."""

    def _write_csv(self) -> None:
        """Rank 0 writes the CSV files."""


def rank_run_dir(path) -> RunDir:
    """The run directory on rank 0 (or the only process), its rows in memory elsewhere."""
    return RunDir(path) if is_main_process() else RowsInMemory(path)


def on_main_then_broadcast(
    train_on_main: Callable[[], tuple[nn.Module, T]], build_elsewhere: Callable[[], nn.Module]
) -> tuple[nn.Module, T]:
    """``train_on_main()`` -> (module, summary) on rank 0 only (one SFT run, one writer
    of its cache); the other ranks build the same module with ``build_elsewhere()``
    and receive rank 0's weights. Every rank returns (its module, rank 0's summary)."""
    trained = {}

    def on_main():
        trained["module"], summary = train_on_main()
        return summary

    summary = run_on_main(on_main)
    module = trained["module"] if is_main_process() else build_elsewhere()
    broadcast_tensors(module.state_dict().values())
    return module, summary


def minibatch_rows(n: int, minibatches: int, device=None) -> list[torch.Tensor]:
    """This rank's rows of each optimiser mini-batch: the mini-batches are consecutive
    chunks of the step's ``n`` rollouts, as on one process, and each is split into
    one consecutive part per rank (:func:`shard`)."""
    return [index[shard(index.numel(), device)] for index in torch.arange(n, device=device).chunk(minibatches)]


def check_shards(rollouts_per_step: int, minibatches: int, heldout_prompts: int) -> None:
    """Every rank needs at least one rollout of every mini-batch and one held-out prompt."""
    ranks = world_size()
    smallest = min(chunk.numel() for chunk in torch.arange(rollouts_per_step).chunk(minibatches))
    if smallest < ranks:
        raise ValueError(
            f"a mini-batch of {smallest} rollouts cannot give each of the {ranks} ranks one: raise "
            f"--prompts-per-step or --group-size, or lower --minibatches (or the number of ranks)"
        )
    if heldout_prompts < ranks:
        raise ValueError(
            f"eval_prompts={heldout_prompts} cannot give each of the {ranks} ranks a held-out prompt: "
            "raise --eval-prompts"
        )
