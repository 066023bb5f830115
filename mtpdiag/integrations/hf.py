"""Multi-token-prediction heads on a Hugging Face causal LM, with Hugging Face conventions.

:class:`MTPCausalLM` wraps a ``transformers`` causal LM (GPT-2, Llama, Qwen2,
DeepSeek-V3 and other decoders laid out the same way). ``model(input_ids,
attention_mask=None, position_ids=None)`` returns an :class:`MTPCausalLMOutput`:
``.logits`` are the main head's next-token logits, as from any HF causal LM, and
the MTP predictions sit beside them (``.mtp``, ``.mtp_logits``). The output is
also a :class:`~mtpdiag.model.GPTOutput`, so mtpdiag's losses, the Probe and the
trainer run on it unchanged. ``generate`` is the wrapped model's own (the main
head decodes; the MTP heads are trained, not sampled from), and the HF plumbing
trainers call (``config``, ``generation_config``, embeddings, gradient
checkpointing) is the wrapped model's too, so TRL takes the wrapper as its model
(:mod:`mtpdiag.integrations.trl`).

Three wirings:

* ``parallel``: head k = a copy of the model's last decoder layer + a copy of its
  final norm, on the decoder output before the final norm;
* ``sequential``: module k = RMSNorm(previous hidden) and RMSNorm(embedding of
  token t+k), concatenated, Linear 2d -> d, a copy of the last decoder layer, a
  copy of the final norm;
* ``native``: transformers' own MTP modules (``transformers.modeling_layers.MtpLayer``,
  built by ``MtpModel``) for configs that declare MTP layers (``num_mtp_layers``,
  alias ``num_nextn_predict_layers``: DeepSeek-V3, GLM-4 MoE, ...): the DeepSeek-V3
  chain, which reads the decoder output after its final norm, as transformers'
  MTP decoding does. It is the default for such configs.

Every head shares the HF model's output embedding (and the sequential and
native wirings its input embedding). The MTP layers are called with an explicit
causal mask that also masks padded keys, and with the model's rotary embedding
at the same positions as the trunk, so a left-padded batch (TRL's layout) gives
every real token the predictions it would get alone.

Exact Hessian-vector products need forward-mode AD and double backward, which
fused attention kernels (SDPA flash / memory-efficient, FlashAttention, flex)
and fused mixture-of-experts kernels lack: the wrapper only accepts
``attn_implementation="eager"`` (and ``experts_implementation="eager"``) and
checks it again on every forward.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import DETACH_MODES, WIRINGS, GPTOutput, HeadPrediction
from . import require_unwrapped

NATIVE = "native"
HF_WIRINGS = (*WIRINGS, NATIVE)
# Attribute names of the final norm and of the decoder-layer list on a HF base
# model: Llama / Qwen2 / Mistral / DeepSeek use `norm` / `layers`, GPT-2 / Falcon `ln_f` / `h`.
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
_LAYER_LIST_NAMES = ("layers", "h")
# transformers < 4.48 picks an attention class per implementation at construction
# (e.g. LlamaSdpaAttention); later versions dispatch on config._attn_implementation.
_FUSED_ATTENTION_CLASS_MARKERS = ("Sdpa", "Flash", "Flex")
# config fields that make transformers' MTP head project differently from F.linear with the output embedding
_UNSUPPORTED_NATIVE_FIELDS = ("logits_mup_width_multiplier", "unpadded_vocab_size")


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


def _fused_experts(hf_model: nn.Module) -> str | None:
    """The fused mixture-of-experts kernel ``hf_model`` runs (transformers 5's ``grouped_mm`` ...), or None."""
    impl = getattr(hf_model.config, "_experts_implementation", None)
    return None if impl in (None, "eager") else f"experts_implementation={impl!r}"


def check_eager_kernels(hf_model: nn.Module, scan_modules: bool = True) -> None:
    """Raise if ``hf_model`` uses an attention or mixture-of-experts kernel without forward-mode AD /
    double backward (a fused MoE kernel also refuses float64).

    ``scan_modules=False`` reads only the config (cheap enough for every forward):
    attention classes chosen at construction do not change afterwards.
    """
    experts = _fused_experts(hf_model)
    if experts is not None:
        raise ValueError(
            f"{type(hf_model).__name__} uses {experts}: exact Hessian-vector products need forward-mode AD and double "
            "backward through every expert, which fused kernels lack. Build the model with experts_implementation="
            "\"eager\" (AutoModelForCausalLM.from_config(config, experts_implementation=\"eager\"), or "
            "MTPCausalLM.from_config(config, ...))"
        )
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
        "decoders laid out like GPT-2 or Llama (GPT-2, Llama, Qwen2, Mistral, DeepSeek-V3, ...); wrap a model of one "
        "of those families"
    )


def declared_mtp_layers(config) -> int:
    """How many MTP layers a transformers config declares (``num_mtp_layers`` /
    ``num_nextn_predict_layers``); 0 when it declares none."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "num_mtp_layers", None)
    return value if isinstance(value, int) else 0


@dataclass
class TrunkStates:
    """The decoder's last hidden states, [B, T, d], before and after its final norm."""

    before_norm: torch.Tensor
    after_norm: torch.Tensor

    @staticmethod
    def cat(states: list["TrunkStates"]) -> "TrunkStates":
        """The states of consecutive row chunks of one batch, joined along the batch."""
        return TrunkStates(torch.cat([s.before_norm for s in states]), torch.cat([s.after_norm for s in states]))


@contextmanager
def capture_trunk(final_norm: nn.Module) -> Iterator[list[TrunkStates]]:
    """Collect, for every forward of the decoder while inside, its last hidden states
    before and after ``final_norm`` (forward hooks, which work the same in every
    transformers version, unlike ``output_hidden_states``). The hooks are removed on exit."""
    states: list[TrunkStates] = []
    pending: list[torch.Tensor] = []

    def before(module, args):
        pending.append(args[0])

    def after(module, args, output):
        states.append(TrunkStates(pending.pop(), output))

    handles = [final_norm.register_forward_pre_hook(before), final_norm.register_forward_hook(after)]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class MTPCausalLMOutput(GPTOutput):
    """An HF causal-LM output that is also a :class:`~mtpdiag.model.GPTOutput`.

    ``logits`` [B, T, V]: the main head's next-token logits, as any HF causal LM
    returns them (``main.logits`` is a view of the first T-1 positions,
    ``last_logits`` of the last). ``mtp``: head k's predictions (k = 1..K), whose
    ``logits`` [B, T-1-k, V] score token t+1+k from position t; ``mtp_logits`` lists them.
    """

    logits: torch.Tensor | None = None

    @classmethod
    def from_main_logits(cls, logits: torch.Tensor, idx: torch.Tensor) -> "MTPCausalLMOutput":
        out = super().from_main_logits(logits, idx)
        out.logits = logits
        return out

    @property
    def mtp_logits(self) -> tuple[torch.Tensor, ...]:
        return tuple(pred.logits for pred in self.mtp)


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


def _native_mtp_layers(hf_model: nn.Module, n_mtp: int) -> tuple[nn.ModuleList, nn.Module | None, list | None]:
    """transformers' own MTP layers for ``hf_model``: (the ``MtpLayer`` list, the
    shared post norm or None, the per-layer rotary types or None)."""
    try:
        from transformers.modeling_layers import MtpModel
    except ImportError:
        raise ValueError(
            "wiring='native' needs transformers' MtpModel (transformers.modeling_layers, transformers 5.x): upgrade "
            "transformers, or pass wiring='sequential' for copied decoder layers"
        ) from None
    config = hf_model.config.get_text_config()
    unsupported = [name for name in _UNSUPPORTED_NATIVE_FIELDS if getattr(config, name, None) is not None]
    if unsupported:
        raise ValueError(
            f"{type(hf_model).__name__}'s config sets {unsupported}, which change how its MTP head projects to logits; "
            "mtpdiag's native wiring projects with the output embedding alone: pass wiring='sequential'"
        )
    mtp_model = MtpModel(hf_model, n_mtp)
    # MtpModel's generic initialiser skips family-specific parameters (DeepSeek-V3's experts stay
    # uninitialised memory): initialise the new layers as the family initialises its own
    mtp_model.layers.apply(hf_model._init_weights)
    # The MTP layers are the only new parameters: the embedding, output head and rotary
    # embedding MtpModel holds are the main model's own.
    post_norm = mtp_model.shared_post_norm if mtp_model.use_shared_post_norm else None
    rope_types = list(mtp_model.config.layer_types) if mtp_model.has_per_layer_rope else None
    return mtp_model.layers, post_norm, rope_types


class MTPCausalLM(nn.Module):
    """A HF causal LM plus ``n_mtp`` MTP heads, with HF conventions (see the module docstring).

    Parameters are ``hf_model.*`` (the wrapped model, unchanged) and
    ``mtp_heads.*`` (and ``mtp_post_norm.*`` for a native chain with a shared
    post norm). ``wiring=None`` picks ``native`` for a config that declares MTP
    layers, else ``parallel``; ``n_mtp=None`` takes the declared number (native)
    or 1.
    """

    main_input_name = "input_ids"
    supports_gradient_checkpointing = True

    def __init__(self, hf_model: nn.Module, n_mtp: int | None = None, wiring: str | None = None):
        super().__init__()
        require_unwrapped(hf_model)
        declared = declared_mtp_layers(hf_model.config)
        wiring = wiring if wiring is not None else (NATIVE if declared else WIRINGS[0])
        if wiring not in HF_WIRINGS:
            raise ValueError(f"wiring={wiring!r}: choose one of {HF_WIRINGS}")
        if wiring == NATIVE:
            if not declared:
                raise ValueError(
                    f"wiring='native' needs a config that declares MTP layers; {type(hf_model.config).__name__} has no "
                    "num_mtp_layers: set it in the config, or pass wiring='parallel' or 'sequential'"
                )
            n_mtp = declared if n_mtp is None else n_mtp
            if n_mtp != declared:
                raise ValueError(
                    f"n_mtp={n_mtp} but the config declares num_mtp_layers={declared}: pass n_mtp={declared} or build "
                    f"the config with num_mtp_layers={n_mtp}"
                )
        n_mtp = 1 if n_mtp is None else n_mtp
        if n_mtp < 1:
            raise ValueError(f"n_mtp={n_mtp}: the model needs at least one MTP head")
        check_eager_kernels(hf_model)
        self.hf_model = hf_model
        self.n_mtp = n_mtp
        self.wiring = wiring
        base = hf_model.base_model
        self._final_norm_name = _find_child(base, _FINAL_NORM_NAMES, "final norm")
        layers = getattr(base, _find_child(base, _LAYER_LIST_NAMES, "decoder-layer list"))
        embed = hf_model.get_input_embeddings().weight
        self._rope_layer_types = None
        if wiring == NATIVE:
            heads, post_norm, self._rope_layer_types = _native_mtp_layers(hf_model, n_mtp)
            if post_norm is not None:
                self.mtp_post_norm = post_norm.to(device=embed.device, dtype=embed.dtype)
            self.mtp_heads = heads.to(device=embed.device, dtype=embed.dtype)
            return
        config = hf_model.config
        heads = []
        for _ in range(n_mtp):
            # The copies keep pointing at the model's config, so they follow its attention implementation;
            # a fresh memo per copy, as deepcopy records every object it copied there (one memo for all
            # heads gave every head the first head's parameters)
            layer = copy.deepcopy(layers[-1], {id(config): config})
            norm = copy.deepcopy(self.final_norm, {id(config): config})
            if wiring == "parallel":
                heads.append(ParallelHFHead(layer, norm))
            else:
                module = SequentialHFModule(layer, norm, config.hidden_size)
                heads.append(module.to(device=embed.device, dtype=embed.dtype))
        self.mtp_heads = nn.ModuleList(heads)

    @classmethod
    def from_config(cls, config, n_mtp: int | None = None, wiring: str | None = None) -> "MTPCausalLM":
        """A randomly initialised HF causal LM for ``config`` (eager attention and, where transformers
        has a choice of mixture-of-experts kernels, eager experts) with MTP heads."""
        from transformers import AutoModelForCausalLM

        kernels = {"attn_implementation": "eager"}
        if hasattr(config, "_experts_implementation"):  # transformers 5
            kernels["experts_implementation"] = "eager"
        return cls(AutoModelForCausalLM.from_config(config, **kernels), n_mtp, wiring)

    # ------------------------------------------------------------------ the wrapped model's HF plumbing

    @property
    def config(self):
        return self.hf_model.config

    @property
    def generation_config(self):
        return self.hf_model.generation_config

    @property
    def base_model(self) -> nn.Module:
        """The wrapped model's decoder (what TRL's fused log-prob head runs)."""
        return self.hf_model.base_model

    @property
    def device(self) -> torch.device:
        return self.hf_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf_model.dtype

    def get_input_embeddings(self) -> nn.Module:
        return self.hf_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.hf_model.get_output_embeddings()

    def generate(self, *args, **kwargs):
        """The wrapped model's ``generate``: the main head decodes."""
        return self.hf_model.generate(*args, **kwargs)

    def add_model_tags(self, tags) -> None:
        """Tags for the model card (TRL adds its own)."""
        self.hf_model.add_model_tags(tags)

    def activation_checkpointing_enable(self, *args, **kwargs):
        """Checkpoint the wrapped model's decoder layers (the MTP heads are small and keep their activations)."""
        return self.hf_model.activation_checkpointing_enable(*args, **kwargs)

    def activation_checkpointing_disable(self):
        return self.hf_model.activation_checkpointing_disable()

    def gradient_checkpointing_enable(self, *args, **kwargs):
        return self.hf_model.gradient_checkpointing_enable(*args, **kwargs)

    def gradient_checkpointing_disable(self):
        return self.hf_model.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.hf_model.is_gradient_checkpointing

    def enable_input_require_grads(self):
        return self.hf_model.enable_input_require_grads()

    def disable_input_require_grads(self):
        return self.hf_model.disable_input_require_grads()

    # ------------------------------------------------------------------ the model

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def final_norm(self) -> nn.Module:
        return getattr(self.hf_model.base_model, self._final_norm_name)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.hf_model.config, "max_position_embeddings", None)

    def capture_trunk(self):
        """A context collecting the decoder's last hidden states on every forward inside it
        (see :func:`capture_trunk`): how a trainer that runs the decoder itself (TRL's
        fused log-prob head) hands them to :meth:`mtp_predictions`."""
        return capture_trunk(self.final_norm)

    def trunk(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None) -> TrunkStates:
        """The HF decoder's last hidden states before and after its final norm."""
        T = input_ids.size(1)
        if self.max_positions is not None and T > self.max_positions:
            raise ValueError(
                f"sequence length {T} exceeds the HF model's max_position_embeddings={self.max_positions}: "
                "build its config with a larger max_position_embeddings (n_positions for GPT-2)"
            )
        check_eager_kernels(self.hf_model, scan_modules=False)
        with self.capture_trunk() as states:
            self.hf_model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        if len(states) != 1:
            raise RuntimeError(
                f"expected {type(self.hf_model.base_model).__name__}.{self._final_norm_name} to run once per forward, "
                f"it ran {len(states)} times: this decoder is not laid out like GPT-2 / Llama"
            )
        return states[0]

    def _attention_mask(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """HF eager attention's additive mask [B or 1, 1, L, L] for positions 0..L-1 of ``x``:
        causal, and blind to padded keys (``padding`` [B, >= L], 1 = a real token)."""
        L = x.size(1)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()[None, None]
        allowed = causal
        if padding is not None:
            # a padded query still sees itself: a row with every key masked turns into NaN
            # where the softmax runs in float32 on a float64 model, and NaN * 0 poisons the losses
            itself = torch.eye(L, dtype=torch.bool, device=x.device)[None, None]
            allowed = (causal & padding[:, None, None, :L].bool()) | itself
        # HF eager attention adds the mask it is given and masks nothing without one
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.where(allowed, zero, torch.finfo(x.dtype).min)

    def _layer_kwargs(self, x: torch.Tensor, padding, positions, rope_type=None) -> dict:
        """The mask, positions and rotary embedding a decoder layer (or MTP layer) runs on ``x`` with."""
        kwargs = {"attention_mask": self._attention_mask(x, padding)}
        rotary = getattr(self.hf_model.base_model, "rotary_emb", None)
        if rotary is not None:  # GPT-2's blocks take no positions (transformers 4 rejects the argument)
            extra = {} if rope_type is None else {"layer_type": rope_type}
            kwargs.update(position_ids=positions, position_embeddings=rotary(x, positions, **extra))
        return kwargs

    def _run_layer(self, layer: nn.Module, x: torch.Tensor, padding, positions) -> torch.Tensor:
        """Run one HF decoder layer causally on ``x``."""
        y = layer(x, **self._layer_kwargs(x, padding, positions))
        # transformers < 5 returns (hidden_states, ...) from a decoder layer
        return y[0] if isinstance(y, tuple) else y

    def mtp_predictions(
        self,
        input_ids: torch.Tensor,
        trunk: TrunkStates,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        mtp_detach: str = "none",
    ) -> list[HeadPrediction]:
        """Head k's predictions (k = 1..K) from the decoder's hidden states ``trunk`` of
        ``input_ids`` [B, T]: row t scores token t+1+k. ``attention_mask`` and
        ``position_ids`` are those the decoder ran with; ``mtp_detach`` as in
        :meth:`mtpdiag.model.GPT.forward`."""
        if mtp_detach not in DETACH_MODES:
            raise ValueError(f"mtp_detach={mtp_detach!r}: choose one of {DETACH_MODES}")
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)[None].expand(B, T) if position_ids is None else position_ids
        output_head = self.hf_model.get_output_embeddings()
        head_weight, head_bias = output_head.weight, output_head.bias
        embed_weight = self.hf_model.get_input_embeddings().weight
        # the native chain reads the decoder output after its final norm, the copied heads before it
        h = trunk.after_norm if self.wiring == NATIVE else trunk.before_norm
        trunk_out = h.detach() if mtp_detach != "none" else h
        if mtp_detach == "detach":
            head_weight, embed_weight = head_weight.detach(), embed_weight.detach()
            head_bias = None if head_bias is None else head_bias.detach()
        target_pos = torch.arange(T, device=input_ids.device)
        predictions = []
        prev = trunk_out
        for k, head in enumerate(self.mtp_heads, start=1):
            if T - 1 - k <= 0:
                break
            if self.wiring == "parallel":
                feats = head.norm(self._run_layer(head.block, trunk_out, attention_mask, positions))
            elif self.wiring == "sequential":
                # position t reads token t+k; keep positions 0..T-1-k
                next_embed = F.embedding(input_ids[:, k:], embed_weight)
                combined = torch.cat([head.norm_hidden(prev[:, : T - k]), head.norm_embed(next_embed)], -1)
                prev = self._run_layer(head.block, head.proj(combined), attention_mask, positions[:, : T - k])
                feats = head.norm(prev)
            else:
                prev = self._native_layer(k, head, prev[:, : T - k], F.embedding(input_ids[:, k:], embed_weight),
                                          attention_mask, positions[:, k:])  # fmt: skip
                feats = prev
            logits = F.linear(feats[:, : T - 1 - k], head_weight, head_bias)
            predictions.append(HeadPrediction(logits, input_ids[:, 1 + k :], target_pos[1 + k :]))
        return predictions

    def _native_layer(self, k, layer, prev, token_embeds, padding, positions) -> torch.Tensor:
        """transformers' ``MtpModel.forward_layer`` for depth k over a whole sequence:
        row t combines the previous depth's hidden state at t with the embedding of
        token t+k, at that token's position; padded keys are masked."""
        rope_type = None if self._rope_layer_types is None else self._rope_layer_types[k - 1]
        kwargs = self._layer_kwargs(token_embeds, padding, positions, rope_type)
        out = layer(token_embeds, prev, position_embeddings=kwargs.get("position_embeddings"), cache=None,
                    attention_mask=kwargs["attention_mask"], position_ids=positions)  # fmt: skip
        post_norm = getattr(self, "mtp_post_norm", None)
        return out if post_norm is None else post_norm(out)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        mtp_detach: str = "none",
        with_mtp: bool = True,
    ) -> MTPCausalLMOutput:
        """Main and MTP predictions for ``input_ids`` [B, T]; ``attention_mask`` [B, T]
        (1 = a real token) and ``position_ids`` as for the wrapped model; ``mtp_detach``
        as in :meth:`mtpdiag.model.GPT.forward`; ``with_mtp=False`` skips the MTP heads."""
        if mtp_detach not in DETACH_MODES:
            raise ValueError(f"mtp_detach={mtp_detach!r}: choose one of {DETACH_MODES}")
        trunk = self.trunk(input_ids, attention_mask, position_ids)
        output_head = self.hf_model.get_output_embeddings()
        out = MTPCausalLMOutput.from_main_logits(F.linear(trunk.after_norm, output_head.weight, output_head.bias), input_ids)
        if with_mtp:
            out.mtp = self.mtp_predictions(input_ids, trunk, attention_mask, position_ids, mtp_detach)
        return out


def shared_parameter_names(model: MTPCausalLM) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the trainable parameters that both
    the main head and the MTP heads reach with ``mtp_detach="none"``: every
    parameter of the HF model, except its final norm when the heads read the
    decoder output before it (the copied wirings; the native chain reads it after).

    This is the set S the probe finds from the autograd graph, given without a
    forward pass (tests check the two agree).
    """
    require_unwrapped(model)
    if not isinstance(model, MTPCausalLM):
        raise TypeError(f"expected an MTPCausalLM, got {type(model).__name__}: wrap the HF model with MTPCausalLM first")
    main_only = set() if model.wiring == NATIVE else {id(p) for p in model.final_norm.parameters()}
    return [
        name
        for name, p in model.named_parameters()
        if name.startswith("hf_model.") and p.requires_grad and id(p) not in main_only
    ]


def hf_tokenizer(tokenizer):
    """A ``transformers.PreTrainedTokenizerFast`` with exactly the ids of an mtpdiag task's
    :class:`~mtpdiag.tasks.base.CharTokenizer` (one token per character, ``<pad>`` = 0,
    ``<eos>`` = 1), built in code: nothing is downloaded."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ..tasks.base import EOS, PAD

    vocab = dict(tokenizer.stoi)
    backend = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, padding_side="left")
