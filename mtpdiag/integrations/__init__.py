"""Bridges between mtpdiag and other training stacks.

``mtpdiag.integrations.hf`` (needs ``pip install "mtpdiag[hf]"``) puts MTP heads
on a Hugging Face causal LM, with Hugging Face conventions;
``mtpdiag.integrations.trl`` (needs ``pip install "mtpdiag[trl]"``) trains them in
TRL's ``GRPOTrainer`` with mtpdiag's regimes, OCC and diagnostics.
:func:`require_unwrapped` lives here because it has no third-party dependency:
every diagnostic needs the raw module.
"""
from __future__ import annotations

import torch.nn as nn


def _fsdp_classes() -> tuple[type, ...]:
    """FSDP1's wrapper class and FSDP2's ``FSDPModule`` mixin, whichever this torch has."""
    import torch.distributed as dist

    if not dist.is_available():
        return ()
    classes = []
    from torch.distributed.fsdp import FullyShardedDataParallel

    classes.append(FullyShardedDataParallel)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 keeps fully_shard's class in the private namespace
        from torch.distributed._composable.fsdp import FSDPModule
    classes.append(FSDPModule)
    return tuple(classes)


def require_unwrapped(module: nn.Module) -> nn.Module:
    """Return ``module`` if neither it nor any submodule is a DDP / FSDP wrapper; raise otherwise.

    Diagnostics call the model through ``torch.func.functional_call`` and take
    double backward / forward-mode derivatives. Through DDP that skips the
    gradient all-reduce and double backward is unsupported (pytorch issues
    47562, 63812); FSDP holds sharded parameters. Both are rejected here with
    the fix rather than failing later inside autograd.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return module
    from torch.nn.parallel import DistributedDataParallel

    fsdp_classes = _fsdp_classes()
    for name, sub in module.named_modules():
        where = f" (at submodule {name!r})" if name else ""
        if isinstance(sub, DistributedDataParallel):
            raise TypeError(
                f"got a DistributedDataParallel-wrapped module{where}; mtpdiag needs the raw module: pass "
                "`model.module` (the diagnostics run on it with torch.func.functional_call; all-reduce their dot "
                "products and norms across ranks yourself)"
            )
        if isinstance(sub, fsdp_classes):
            raise TypeError(
                f"got an FSDP-sharded module ({type(sub).__name__}{where}); mtpdiag needs the raw, unsharded module: "
                "gather the full weights (torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                "options=StateDictOptions(full_state_dict=True))), load them into an unwrapped copy of the model "
                "and pass that copy"
            )
    return module
