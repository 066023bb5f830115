"""A small GPT with multi-token-prediction (MTP) heads, in one readable file.

Head k (k = 1..K) predicts token t+1+k from position t. Two wirings:

* ``parallel`` (Gloeckle et al. 2024): each head is one transformer block on the
  shared trunk output, followed by its own final norm and the shared unembedding.
* ``sequential`` (DeepSeek-V3, MiMo): module k combines the previous depth's
  hidden state with the embedding of token t+k (RMSNorm both, concatenate,
  Linear 2d -> d, one transformer block), then the shared output head. Training
  feeds it the true token t+k (teacher forcing); at inference a drafter knows only
  t+1 and feeds depth k >= 2 its own depth k-1 draft (``mtp_conditioning``).

Attention is written out (softmax(QK^T)V) by default so that forward-mode AD and
double backward work, which exact Hessian-vector products need (docs/theory.md s.7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

WIRINGS = ("parallel", "sequential")
DETACH_MODES = ("none", "detach", "detach_trunk_only")
ATTENTION_IMPLS = ("math", "sdpa")
# what sequential module k reads as token t+k: the sequence's own (teacher forcing,
# as training sees it) or, for k >= 2, the greedy draft of depth k-1 (as a drafter at inference)
MTP_CONDITIONING = ("teacher", "drafts")
# the two layers of a Block that write into the residual stream: GPT-2 scales their
# init by 1/sqrt(2 n_layer) so the stream's variance does not grow with depth
RESIDUAL_PROJECTIONS = ("attn.proj.weight", "mlp.2.weight")


@dataclass
class GPTConfig:
    vocab_size: int | None = None  # None until the task fills it (the trainer takes it from the task's tokenizer)
    block_size: int = 32
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    dropout: float = 0.0
    tie_embeddings: bool = True
    n_mtp: int = 1
    mtp_wiring: str = "parallel"
    attention: str = "math"

    def __post_init__(self):
        if self.mtp_wiring not in WIRINGS:
            raise ValueError(f"mtp_wiring={self.mtp_wiring!r}: choose one of {WIRINGS}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r}: choose one of {ATTENTION_IMPLS}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.n_mtp < 1:
            raise ValueError(f"n_mtp={self.n_mtp}: the model needs at least one MTP head")


@dataclass
class HeadPrediction:
    """Logits of one head together with what they predict.

    ``logits[:, i]`` scores ``targets[:, i]``, the input token at sequence
    position ``target_pos[i]``.
    """

    logits: torch.Tensor  # [B, L, V]
    targets: torch.Tensor  # [B, L]
    target_pos: torch.Tensor  # [L]


@dataclass
class GPTOutput:
    main: HeadPrediction
    mtp: list[HeadPrediction] = field(default_factory=list)
    last_logits: torch.Tensor | None = None  # [B, V], next-token logits after the last input

    @classmethod
    def from_main_logits(cls, logits: torch.Tensor, idx: torch.Tensor) -> "GPTOutput":
        """The main head's predictions from next-token ``logits`` [B, T, V] of ``idx`` [B, T]."""
        positions = torch.arange(idx.size(1), device=idx.device)
        return cls(main=HeadPrediction(logits[:, :-1], idx[:, 1:], positions[1:]), last_logits=logits[:, -1])


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.attention = cfg.attention
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        mask = torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            att = att.masked_fill(~self.causal_mask[:T, :T], float("-inf"))
            att = F.dropout(F.softmax(att, dim=-1), p, self.training)
            y = att @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ParallelMTPHead(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.block = Block(cfg)
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, trunk_hidden: torch.Tensor) -> torch.Tensor:
        return self.ln_f(self.block(trunk_hidden))


class SequentialMTPModule(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm_hidden = nn.RMSNorm(cfg.d_model)
        self.norm_embed = nn.RMSNorm(cfg.d_model)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg)
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, prev_hidden: torch.Tensor, next_token_embed: torch.Tensor):
        """Returns (hidden for the next depth, normed features for the output head)."""
        h = self.proj(torch.cat([self.norm_hidden(prev_hidden), self.norm_embed(next_token_embed)], -1))
        h = self.block(h)
        return h, self.ln_f(h)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size is None: set it to the tokenizer's vocabulary size")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        head_cls = ParallelMTPHead if cfg.mtp_wiring == "parallel" else SequentialMTPModule
        self.mtp_heads = nn.ModuleList(head_cls(cfg) for _ in range(cfg.n_mtp))
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def trunk(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        if T > self.cfg.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size={self.cfg.block_size}: raise block_size in the model config"
            )
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return x

    def forward(
        self, idx: torch.Tensor, mtp_detach: str = "none", with_mtp: bool = True, mtp_conditioning: str = "teacher"
    ) -> GPTOutput:
        """Main and MTP predictions for the token ids ``idx`` [B, T].

        ``mtp_detach``: ``none`` trains everything jointly; ``detach`` cuts MTP
        gradients from every parameter the main head uses (trunk, embedding,
        output head); ``detach_trunk_only`` cuts only the trunk output, so MTP
        gradient still reaches a shared output head / embedding.

        ``mtp_conditioning`` (sequential wiring only; parallel heads read no token
        after t): ``teacher`` feeds module k the true token t+k; ``drafts`` feeds
        module 1 the true token t+1 (the main head's, known at inference) and module
        k >= 2 the argmax of module k-1 at the same position, its own draft of t+k.
        """
        if mtp_detach not in DETACH_MODES:
            raise ValueError(f"mtp_detach={mtp_detach!r}: choose one of {DETACH_MODES}")
        if mtp_conditioning not in MTP_CONDITIONING:
            raise ValueError(f"mtp_conditioning={mtp_conditioning!r}: choose one of {MTP_CONDITIONING}")
        T = idx.size(1)
        h = self.trunk(idx)
        out = GPTOutput.from_main_logits(self.lm_head(self.ln_f(h)), idx)
        if not with_mtp:
            return out

        head_weight = self.lm_head.weight
        embed_weight = self.wte.weight
        trunk_out = h
        if mtp_detach != "none":
            trunk_out = h.detach()
        if mtp_detach == "detach":
            head_weight = head_weight.detach()
            embed_weight = embed_weight.detach()

        prev, draft = trunk_out, None
        for k, head in enumerate(self.mtp_heads, start=1):
            if T - 1 - k <= 0:
                break
            if self.cfg.mtp_wiring == "parallel":
                feats = head(trunk_out)[:, : T - 1 - k]
            else:
                # position t reads token t+k (positions 0..T-1-k); predictions are kept for 0..T-2-k
                read = idx[:, k:] if draft is None else draft[:, : T - k]
                prev, feats = head(prev[:, : T - k], F.embedding(read, embed_weight))
                if mtp_conditioning == "drafts":
                    # the next depth reads this one's draft of t+k+1 at every position it keeps, the last included
                    draft = F.linear(feats, head_weight).argmax(-1)
                feats = feats[:, : T - 1 - k]
            out.mtp.append(HeadPrediction(F.linear(feats, head_weight), idx[:, 1 + k :], out.main.target_pos[k:]))
        return out
