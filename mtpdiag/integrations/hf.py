"""Multi-token-prediction heads on a Hugging Face causal LM.

:class:`MTPCausalLM` wraps a ``transformers`` causal LM (GPT-2, Llama, Qwen2 and
other decoders laid out the same way) and returns the same
:class:`~mtpdiag.model.GPTOutput` as :class:`mtpdiag.model.GPT`, so the losses,
the probe and the trainer run on it unchanged. The wiring mirrors ``GPT``:

* the trunk output is the HF decoder's hidden state *before* its final norm
  (read with a forward pre-hook on that norm, which works the same in every
  transformers version, unlike ``output_hidden_states``);
* ``parallel``: head k = one decoder layer + its own final norm;
* ``sequential``: module k = RMSNorm(previous hidden) and RMSNorm(embedding of
  token t+k), concatenated, Linear 2d -> d, one decoder layer, its own final norm;
* every head shares the HF model's output embedding (and the sequential wiring
  its input embedding).

Each MTP layer is a copy of the model's last decoder layer, called with an
explicit causal mask (and rotary cos/sin for the Llama family), so it is the
family's own block with the model's attention implementation. On a pretrained
model the copy starts as a layer that already reads the trunk's features.

Exact Hessian-vector products need forward-mode AD and double backward, which
fused attention kernels (SDPA flash / memory-efficient, FlashAttention, flex)
lack: the wrapper only accepts ``attn_implementation="eager"`` and checks it again
on every forward.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import DETACH_MODES, WIRINGS, GPTOutput, HeadPrediction
from . import require_unwrapped

# Attribute names of the final norm and of the decoder-layer list on a HF base
# model: Llama / Qwen2 / Mistral use `norm` / `layers`, GPT-2 / Falcon `ln_f` / `h`.
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
_LAYER_LIST_NAMES = ("layers", "h")
# transformers < 4.48 picks an attention class per implementation at construction
# (e.g. LlamaSdpaAttention); later versions dispatch on config._attn_implementation.
_FUSED_ATTENTION_CLASS_MARKERS = ("Sdpa", "Flash", "Flex")


def _fused_attention(hf_model: nn.Module, scan_modules: bool) -> str | None:
    """Name of the non-eager attention ``hf_model`` runs, or None if it is eager."""
    impl = getattr(hf_model.config, "_attn_implementation", "eager")
    if impl != "eager":
        return f"attn_implementation={impl!r}"
    if not scan_modules:
        return None
    for module in hf_model.modules():
        name = type(module).__name__
        if "Attention" in name and any(marker in name for marker in _FUSED_ATTENTION_CLASS_MARKERS):
            return f"attention class {name}"
    return None


def check_eager_attention(hf_model: nn.Module, scan_modules: bool = True) -> None:
    """Raise if ``hf_model`` uses an attention kernel without forward-mode AD / double backward.

    ``scan_modules=False`` reads only the config (cheap enough for every forward):
    attention classes chosen at construction do not change afterwards.
    """
    fused = _fused_attention(hf_model, scan_modules)
    if fused is None:
        return
    switch = (
        ' or call model.set_attn_implementation("eager") before wrapping it'
        if hasattr(hf_model, "set_attn_implementation")
        else ""
    )
    raise ValueError(
        f"{type(hf_model).__name__} uses {fused}: exact Hessian-vector products need forward-mode AD and double "
        "backward, which fused attention kernels lack. Build the model with attn_implementation=\"eager\" "
        "(AutoModelForCausalLM.from_config(config, attn_implementation=\"eager\"), from_pretrained(..., "
        f"attn_implementation=\"eager\"), or MTPCausalLM.from_config(config, ...)){switch}"
    )


def _find_child(module: nn.Module, names: tuple[str, ...], what: str) -> str:
    for name in names:
        if isinstance(getattr(module, name, None), nn.Module):
            return name
    raise ValueError(
        f"{type(module).__name__} has no {what} under any of the names {names}: mtpdiag.integrations.hf supports "
        "decoders laid out like GPT-2 or Llama (GPT-2, Llama, Qwen2, Mistral, ...); wrap a model of one of those families"
    )


class ParallelHFHead(nn.Module):
    """Parameters of one parallel head; :class:`MTPCausalLM` runs it, since the HF
    layer needs the causal mask and rotary embedding the wrapper builds."""

    def __init__(self, layer: nn.Module, final_norm: nn.Module):
        super().__init__()
        self.block = layer
        self.norm = final_norm


class SequentialHFModule(nn.Module):
    """Parameters of one sequential MTP module, run by :class:`MTPCausalLM`."""

    def __init__(self, layer: nn.Module, final_norm: nn.Module, d_model: int):
        super().__init__()
        self.norm_hidden = nn.RMSNorm(d_model)
        self.norm_embed = nn.RMSNorm(d_model)
        self.proj = nn.Linear(2 * d_model, d_model, bias=False)
        self.block = layer
        self.norm = final_norm


class MTPCausalLM(nn.Module):
    """A HF causal LM plus ``n_mtp`` MTP heads; ``forward`` returns a :class:`GPTOutput`.

    Parameters are ``hf_model.*`` (the wrapped model, unchanged) and
    ``mtp_heads.*``. Sequences are right padded and need no attention mask,
    as in :class:`mtpdiag.model.GPT`.
    """

    def __init__(self, hf_model: nn.Module, n_mtp: int = 1, wiring: str = "parallel"):
        super().__init__()
        require_unwrapped(hf_model)
        if wiring not in WIRINGS:
            raise ValueError(f"wiring={wiring!r}: choose one of {WIRINGS}")
        if n_mtp < 1:
            raise ValueError(f"n_mtp={n_mtp}: the model needs at least one MTP head")
        check_eager_attention(hf_model)
        self.hf_model = hf_model
        self.n_mtp = n_mtp
        self.wiring = wiring
        base = hf_model.base_model
        self._final_norm_name = _find_child(base, _FINAL_NORM_NAMES, "final norm")
        layers = getattr(base, _find_child(base, _LAYER_LIST_NAMES, "decoder-layer list"))
        config = hf_model.config
        # The copies keep pointing at the model's config, so they follow its attention implementation.
        share_config = {id(config): config}
        d_model = config.hidden_size
        embed = hf_model.get_input_embeddings().weight
        heads = []
        for _ in range(n_mtp):
            layer = copy.deepcopy(layers[-1], share_config)
            norm = copy.deepcopy(self.final_norm, share_config)
            if wiring == "parallel":
                heads.append(ParallelHFHead(layer, norm))
            else:
                heads.append(SequentialHFModule(layer, norm, d_model).to(device=embed.device, dtype=embed.dtype))
        self.mtp_heads = nn.ModuleList(heads)

    @classmethod
    def from_config(cls, config, n_mtp: int = 1, wiring: str = "parallel") -> "MTPCausalLM":
        """A randomly initialised HF causal LM for ``config`` (eager attention) with MTP heads."""
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_config(config, attn_implementation="eager"), n_mtp, wiring)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def final_norm(self) -> nn.Module:
        return getattr(self.hf_model.base_model, self._final_norm_name)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.hf_model.config, "max_position_embeddings", None)

    def _hidden_states(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(trunk output before the final norm, after it), both [B, T, d]."""
        T = idx.size(1)
        if self.max_positions is not None and T > self.max_positions:
            raise ValueError(
                f"sequence length {T} exceeds the HF model's max_position_embeddings={self.max_positions}: "
                "build its config with a larger max_position_embeddings (n_positions for GPT-2)"
            )
        check_eager_attention(self.hf_model, scan_modules=False)
        captured = []
        handle = self.final_norm.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            after_norm = self.hf_model.base_model(input_ids=idx, use_cache=False)[0]
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(
                f"expected {type(self.hf_model.base_model).__name__}.{self._final_norm_name} to run once per forward, "
                f"it ran {len(captured)} times: this decoder is not laid out like GPT-2 / Llama"
            )
        return captured[0], after_norm

    def trunk(self, idx: torch.Tensor) -> torch.Tensor:
        """Hidden states of the HF decoder before its final norm, [B, T, d] (what the MTP heads read)."""
        return self._hidden_states(idx)[0]

    def _decoder_layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run one HF decoder layer causally on positions 0..L-1."""
        L = x.size(1)
        # HF eager attention adds the mask it is given and masks nothing without one.
        causal = torch.full((L, L), torch.finfo(x.dtype).min, device=x.device, dtype=x.dtype).triu(1)
        kwargs = {"attention_mask": causal[None, None]}
        rotary = getattr(self.hf_model.base_model, "rotary_emb", None)
        if rotary is not None:
            positions = torch.arange(L, device=x.device)[None]
            kwargs.update(position_ids=positions, position_embeddings=rotary(x, positions))
        y = layer(x, **kwargs)
        # transformers < 5 returns (hidden_states, ...) from a decoder layer
        return y[0] if isinstance(y, tuple) else y

    def forward(self, idx: torch.Tensor, mtp_detach: str = "none", with_mtp: bool = True) -> GPTOutput:
        """Main and MTP predictions for the token ids ``idx`` [B, T]; ``mtp_detach`` as in
        :meth:`mtpdiag.model.GPT.forward`."""
        if mtp_detach not in DETACH_MODES:
            raise ValueError(f"mtp_detach={mtp_detach!r}: choose one of {DETACH_MODES}")
        T = idx.size(1)
        h, after_norm = self._hidden_states(idx)
        output_head = self.hf_model.get_output_embeddings()
        head_weight, head_bias = output_head.weight, output_head.bias
        out = GPTOutput.from_main_logits(F.linear(after_norm, head_weight, head_bias), idx)
        if not with_mtp:
            return out

        embed_weight = self.hf_model.get_input_embeddings().weight
        trunk_out = h.detach() if mtp_detach != "none" else h
        if mtp_detach == "detach":
            head_weight, embed_weight = head_weight.detach(), embed_weight.detach()
            head_bias = None if head_bias is None else head_bias.detach()

        prev = trunk_out
        for k, head in enumerate(self.mtp_heads, start=1):
            if T - 1 - k <= 0:
                break
            if self.wiring == "parallel":
                feats = head.norm(self._decoder_layer(head.block, trunk_out))[:, : T - 1 - k]
            else:
                # position t reads token t+k; keep positions 0..T-1-k
                next_embed = F.embedding(idx[:, k:], embed_weight)
                combined = torch.cat([head.norm_hidden(prev[:, : T - k]), head.norm_embed(next_embed)], -1)
                prev = self._decoder_layer(head.block, head.proj(combined))
                feats = head.norm(prev)[:, : T - 1 - k]
            out.mtp.append(HeadPrediction(F.linear(feats, head_weight, head_bias), idx[:, 1 + k :], out.main.target_pos[k:]))
        return out


def shared_parameter_names(model: MTPCausalLM) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the trainable parameters that both
    the main head and the MTP heads reach with ``mtp_detach="none"``: every
    parameter of the HF model except its final norm, which only the main head reads.

    This is the set S the probe finds from the autograd graph, given without a
    forward pass (tests check the two agree).
    """
    require_unwrapped(model)
    if not isinstance(model, MTPCausalLM):
        raise TypeError(f"expected an MTPCausalLM, got {type(model).__name__}: wrap the HF model with MTPCausalLM first")
    main_only = {id(p) for p in model.final_norm.parameters()}
    return [
        name
        for name, p in model.named_parameters()
        if name.startswith("hf_model.") and p.requires_grad and id(p) not in main_only
    ]
