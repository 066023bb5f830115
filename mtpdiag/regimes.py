"""Training regimes: how the MTP heads meet the RL objective (docs/theory.md, section 5).

A :class:`Regime` holds, in one place, everything that distinguishes one way of
training the MTP heads from another:

* how the MTP heads' graph is cut from the parameters the main head uses
  (:meth:`Regime.mtp_detach`);
* its MTP loss as a pure function of (model output, batch) (:meth:`Regime.aux_loss`);
* how its coefficient lambda is chosen (``lambda_rule``): ``UNIT`` (no lambda to
  choose: weight 1, the heads only keep learning; ``frozen`` overrides it with 0),
  ``FIXED`` (the config's ``lam``) or ``CALIBRATED`` (a :mod:`~mtpdiag.calibrators`
  calibrator on every mini-batch);
* which parameters the update leaves untouched (:meth:`Regime.frozen_parameters`);
* which config fields apply to it (:meth:`Regime.validate`);
* how a report names and colours its arms (:meth:`Regime.display_name`,
  :meth:`Regime.colour_family`).

Trainer, experiment and report read regimes from :data:`REGIMES` and never
compare a regime's name. A new regime is one subclass and one :func:`register`
call.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from .calibrators import CALIBRATORS, DEFAULT_LAMBDA, FixedLambda, make_calibrator
from .losses import (
    ADVANTAGES,
    clip_fraction,
    mtp_ce_loss,
    mtp_kl_loss,
    mtp_policy_loss,
    mtp_tv_loss,
    rl_objective,
    rl_objective_unclipped,
)

UNIT, FIXED, CALIBRATED = "unit", "fixed", "calibrated"
LAMBDA_RULES = (UNIT, FIXED, CALIBRATED)
# GPT.forward's mtp_detach argument for each detach_mode a config may name
DETACH_MODES = {"full": "detach", "trunk_only": "detach_trunk_only"}


def fixed_lambda(lam: float | None) -> float:
    """The fixed MTP coefficient of a config's ``lam`` (None: :data:`DEFAULT_LAMBDA`)."""
    return DEFAULT_LAMBDA if lam is None else float(lam)


@dataclass(frozen=True)
class RegimeLosses:
    """What the trainer optimises on one mini-batch, as pure functions of
    (model output, batch): loss = -objective(out, batch) + aux_loss(out, batch, lambdas).
    ``aux_loss`` with no head weights is L_MTP summed over heads with weight 1;
    ``lambda_placement`` is where a policy-loss regime puts lambda (docs/theory.md s.4)."""

    regime: "Regime"
    mtp_detach: str
    eps_low: float
    eps_high: float
    lambda_placement: str = ADVANTAGES

    def forward(self, model, batch: dict):
        return model(batch["input_ids"], mtp_detach=self.mtp_detach)

    def objective(self, out, batch: dict) -> torch.Tensor:
        return rl_objective(out, batch, self.eps_low, self.eps_high)

    def unclipped_objective(self, out, batch: dict) -> torch.Tensor:
        """J_batch without the clip (the curve objective ``j_unclipped``)."""
        return rl_objective_unclipped(out, batch)

    def clip_fraction(self, out, batch: dict) -> torch.Tensor:
        """The share of response tokens whose ratio leaves [1 - eps_low, 1 + eps_high]."""
        return clip_fraction(out, batch, self.eps_low, self.eps_high)

    def aux_loss(self, out, batch: dict, head_weights=None) -> torch.Tensor:
        placed = {"placement": self.lambda_placement} if self.regime.placement_applies else {}
        return self.regime.aux_loss(out, batch, head_weights, self.eps_low, self.eps_high, **placed)

    @property
    def aux_sign_dependent(self) -> bool:
        """Whether the MTP loss at a negative lambda is not minus the loss at -lambda (lambda
        on the advantages: the clip acts on the other side), so the Probe measures both sides."""
        return self.regime.placement_applies and self.lambda_placement == ADVANTAGES


class Regime:
    """One way of training the MTP heads alongside the RL objective.

    Subclasses set the class attributes and override :meth:`aux_loss`, and where
    they differ :meth:`mtp_detach`, :meth:`validate` and :meth:`display_name`.
    """

    name: str
    description: str
    lambda_rule: str
    display: str  # the report's name of the regime
    family: str  # a matplotlib colormap name: the report shades the regime's arms from it
    # a policy loss, whose lambda multiplies the advantages or the objective (TrainConfig.lambda_placement)
    placement_applies: bool = False

    def aux_loss(self, out, batch: dict, head_weights=None, eps_low: float = 0.2, eps_high: float = 0.28):
        raise NotImplementedError

    def mtp_detach(self, detach_mode: str) -> str:
        """GPT.forward's ``mtp_detach`` for this regime (``detach_mode`` is the config's)."""
        return "none"

    def frozen_parameters(self, model) -> list[torch.nn.Parameter]:
        """The parameters of ``model`` this regime never updates (the trainer stops their
        gradients and leaves them out of the optimiser); none by default."""
        return []

    @property
    def joint(self) -> bool:
        """True when the MTP loss reaches the shared parameters S (it is not cut from them)."""
        return self.mtp_detach("full") == "none"

    def losses(self, cfg) -> RegimeLosses:
        return RegimeLosses(self, self.mtp_detach(cfg.detach_mode), cfg.eps_low, cfg.eps_high, cfg.lambda_placement)

    def lambdas(self, lam: float | None, num_heads: int, dtype=torch.float32) -> torch.Tensor:
        """The per-head MTP coefficients of a UNIT or FIXED regime."""
        if self.lambda_rule == CALIBRATED:
            raise ValueError(f"regime {self.name!r} chooses lambda with a calibrator on every mini-batch")
        value = 1.0 if self.lambda_rule == UNIT else fixed_lambda(lam)
        return torch.full((num_heads,), value, dtype=dtype)

    def calibrator(self, cfg, given=None):
        """The calibrator that sets lambda on every mini-batch: ``given``, else the
        config's ``calibrator`` by name, else one fixed at the config's ``lam``.
        None for a regime that does not calibrate (which ``given`` may not be)."""
        if self.lambda_rule != CALIBRATED:
            if given is not None:
                raise ValueError(f"a calibrator only applies to regimes {names(CALIBRATED)}, not {self.name!r}")
            return None
        if given is not None:
            return given
        return make_calibrator(cfg.calibrator, cfg.model.n_mtp) if cfg.calibrator else FixedLambda(fixed_lambda(cfg.lam))

    def validate(self, cfg) -> None:
        """Reject config fields that do not apply to this regime, naming the fix."""
        if self.lambda_rule == UNIT and cfg.lam is not None:
            raise ValueError(
                f"lam does not apply to regime {self.name!r} ({self.description}): drop --lam, or choose one of "
                f"{names(FIXED, CALIBRATED)}"
            )
        if self.lambda_rule != CALIBRATED and cfg.calibrator is not None:
            raise ValueError(f"calibrator applies only to regimes {names(CALIBRATED)}, not {self.name!r}: drop --calibrator")
        if cfg.detach_mode != "full" and self.mtp_detach("full") == "none":
            raise ValueError(f"detach_mode applies only to a detached regime, not {self.name!r}: drop --detach-mode")
        if cfg.lambda_placement != ADVANTAGES and not self.placement_applies:
            placed = [name for name, regime in REGIMES.items() if regime.placement_applies]
            raise ValueError(
                f"lambda_placement applies only to the policy-loss regimes {placed}, not {self.name!r}: "
                "drop --lambda-placement"
            )

    def display_name(self, lam: float | None = None, calibrator: str | None = None) -> str:
        if self.lambda_rule == FIXED:
            return f"{self.display} (λ={fixed_lambda(lam):g})"
        return self.display

    def colour_family(self, calibrator: str | None = None) -> str:
        return self.family

    def __repr__(self) -> str:
        return f"<regime {self.name}>"


class Detach(Regime):
    name = "detach"
    description = "MTP heads read a detached trunk; their cross-entropy keeps them learning with weight 1"
    lambda_rule = UNIT
    display = "Detach"
    family = "Greys"

    def aux_loss(self, out, batch, head_weights=None, eps_low=0.2, eps_high=0.28):
        return mtp_ce_loss(out, batch, head_weights)

    def mtp_detach(self, detach_mode: str) -> str:
        if detach_mode not in DETACH_MODES:
            raise ValueError(f"unknown detach_mode {detach_mode!r}: choose one of {list(DETACH_MODES)}")
        return DETACH_MODES[detach_mode]


class CrossEntropy(Regime):
    name = "ce"
    description = "MTP cross-entropy on the sampled rollouts, fixed lambda"
    lambda_rule = FIXED
    display = "CE"
    family = "Reds"

    def aux_loss(self, out, batch, head_weights=None, eps_low=0.2, eps_high=0.28):
        return mtp_ce_loss(out, batch, head_weights)


class Policy(Regime):
    name = "policy"
    description = "the main head's clipped policy loss on the MTP heads' log-probs, fixed lambda"
    lambda_rule = FIXED
    display = "Policy"
    family = "Blues"
    placement_applies = True

    def aux_loss(self, out, batch, head_weights=None, eps_low=0.2, eps_high=0.28, placement=ADVANTAGES):
        return mtp_policy_loss(out, batch, head_weights, eps_low, eps_high, placement)


class KL(Regime):
    name = "kl"
    description = ("forward KL(p_main.detach() || q_k) at the aligned position (SkyRL's soft distillation of the "
                   "MTP heads from the main head), fixed lambda")
    lambda_rule = FIXED
    display = "KL"
    family = "Oranges"

    def aux_loss(self, out, batch, head_weights=None, eps_low=0.2, eps_high=0.28):
        return mtp_kl_loss(out, batch, head_weights)


class TotalVariation(Regime):
    name = "tv"
    description = "TV(p_main.detach(), q_k) at the aligned position (one minus the draft's acceptance), fixed lambda"
    lambda_rule = FIXED
    display = "TV"
    family = "RdPu"

    def aux_loss(self, out, batch, head_weights=None, eps_low=0.2, eps_high=0.28):
        return mtp_tv_loss(out, batch, head_weights)


class Frozen(Regime):
    """MiMo's RL recipe: the MTP heads keep their SFT weights. The update gives the MTP
    loss weight 0 and the heads no gradient, so nothing of it reaches S; the heads'
    cross-entropy through a joint graph is still the aux loss, logged as ``loss_mtp``
    and measured by the Probe: m on S is the direction the frozen heads would pull
    the shared parameters in if their cross-entropy were trained jointly."""

    name = "frozen"
    description = "MTP heads frozen (no update); their cross-entropy is measured, with weight 0 in the update"
    lambda_rule = UNIT
    display = "Frozen"
    family = "cividis"  # khaki: distinct from KL's orange and detach's grey at the shades the report uses

    def aux_loss(self, out, batch, head_weights=None, eps_low=0.2, eps_high=0.28):
        return mtp_ce_loss(out, batch, head_weights)

    def lambdas(self, lam, num_heads, dtype=torch.float32):
        return torch.zeros(num_heads, dtype=dtype)

    def frozen_parameters(self, model):
        return list(model.mtp_heads.parameters())


# the report's names of the calibrators an OCC arm may train with
CALIBRATOR_DISPLAY = {"occ-paper": "OCC paper", "occ-reference": "OCC reference", "oracle": "Oracle",
                      "amortised-taylor": "Amortised Taylor"}
CALIBRATOR_FAMILIES = {"oracle": "Purples"}


class OCC(Policy):
    name = "occ"
    description = "the policy loss with lambda_t from a calibrator on every mini-batch (a fixed lam without one)"
    lambda_rule = CALIBRATED
    display = "OCC"
    family = "Greens"

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if cfg.calibrator is not None:
            if cfg.calibrator not in CALIBRATORS:
                raise ValueError(f"unknown calibrator {cfg.calibrator!r}: choose one of {sorted(CALIBRATORS)}")
            if cfg.lam is not None:
                raise ValueError(f"lam does not apply when calibrator {cfg.calibrator!r} sets lambda_t: drop --lam")

    def display_name(self, lam=None, calibrator=None) -> str:
        if calibrator is None:
            return f"{self.display} (fixed λ={fixed_lambda(lam):g})"
        return CALIBRATOR_DISPLAY.get(calibrator, f"{self.display} {calibrator}")

    def colour_family(self, calibrator=None) -> str:
        return CALIBRATOR_FAMILIES.get(calibrator, self.family)


REGIMES: dict[str, Regime] = {}


def register(regime: Regime) -> Regime:
    """Add ``regime`` to the registry under its name (the trainer, the experiment and the report read it there)."""
    if not isinstance(regime, Regime):
        raise TypeError(f"register() takes a Regime instance, got {type(regime).__name__}")
    if regime.lambda_rule not in LAMBDA_RULES:
        raise ValueError(f"regime {regime.name!r}: lambda_rule {regime.lambda_rule!r} is not one of {LAMBDA_RULES}")
    REGIMES[regime.name] = regime
    return regime


def unregister(name: str) -> None:
    REGIMES.pop(name, None)


def names(*lambda_rules: str) -> list[str]:
    """The registered regimes' names, in registration order; only those whose
    ``lambda_rule`` is one of ``lambda_rules`` when any are given."""
    return [name for name, regime in REGIMES.items() if not lambda_rules or regime.lambda_rule in lambda_rules]


def get(name: "str | Regime") -> Regime:
    """The registered regime of that name (a Regime is returned as is)."""
    if isinstance(name, Regime):
        return name
    if name not in REGIMES:
        raise ValueError(f"unknown regime {name!r}: choose one of {names()}")
    return REGIMES[name]


DETACH = register(Detach())
CE = register(CrossEntropy())
POLICY = register(Policy())
OCC_REGIME = register(OCC())
KL_REGIME = register(KL())
TV_REGIME = register(TotalVariation())
FROZEN = register(Frozen())
