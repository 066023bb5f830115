"""The regret experiment (docs/theory.md s.11): is the theory's lambda* the best step, and
how far from it does each calibrator land?

On shared states along a detach trajectory (the parameters before every mini-batch
update of the scheduled RL steps), at step sizes ``eta_scale x lr``, every calibrator
chooses lambda for the joint CE-MTP step on that mini-batch, and the step's realised
change of the held-out J_true is measured exactly:

    Delta_true(lambda) = J_true(step(lambda)) - J_true(step(0)),
    regret_k          = Delta_true(lambda*_meas) - Delta_true(lambda_k),

with lambda*_meas the argmax of the measured curve (a grid around lambda*_taylor on
J_true and every calibrator's choice, refined by a bounded search), and
``gain_detach`` = J_true(step(0)) - J_true(theta), the detach step's own gain, to put
regrets on one scale. ``cost_s`` is what the choice costs beyond a detach step, timed
on the same mini-batch (``detach_s``). The detach trajectory itself is not changed: every
measurement runs on copies inside a forked RNG.

:class:`RegretHook` is a trainer callback (:data:`mtpdiag.train.Callback`) that writes
one row per (step, mini-batch, eta_scale, calibrator) into ``regret_steps.csv`` of the
run directory (the calibrator in column ``choice``); a resumed run rewrites the steps it repeats.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import regimes, schema
from .calibrators import OCC, AmortisedTaylor, CalibrationInputs, CosineGate
from .config import make_optimizer
from .diagnostics import Probe
from .diagnostics.curves import default_grid
from .diagnostics.functional import fork_rng
from .distributed import global_means, is_main_process, minibatch_rows
from .hook import CSVSink, MemorySink
from .losses import aligned_logprobs, j_true

ETA_SCALES = (0.25, 1.0, 4.0)
FIXED_LAMBDAS = (0.1, 0.5, 1.0)
# the calibrators of the experiment, in the report's order; occ readings get one entry per mini-batch
DETACH, ORACLE = schema.REGRET_DETACH, schema.REGRET_ORACLE
AMORTISED, AMORTISED_TRUE = schema.REGRET_PROPOSED  # mtpdiag's own (docs/theory.md s.5), on J_batch and on J_true
AMORTISED_EVERY = 4  # the curvature measured on the first of the four mini-batches of a step, carried over the rest
TAYLOR_BATCH, TAYLOR_TRUE = "lambda*_taylor(J_batch)", "lambda*_taylor(J_true)"
STEP_PROXY, COSINE = "occ-step", "cosine"
OCC_READINGS = {"occ-paper": OCC.paper, "occ-reference": lambda: OCC.reference(1)}
JOINT_REGIME = regimes.CE  # the paper's MTP loss, trained jointly: the step a calibrator would weight


def occ_label(reading: str, minibatch: int) -> str:
    return f"{reading}[mb{minibatch}]"


@dataclass
class _Choice:
    calibrator: str
    lam: float | None
    cost_s: float


def _timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


class RegretHook:
    """On the steps ``schedule(step)`` picks, the regret rows of every mini-batch of the
    step (see the module docstring). ``cfg`` is the detach run's config; ``out`` its
    run directory (``None``: rows kept in memory, :attr:`sink`). Single process only."""

    def __init__(self, cfg, out: str | Path | None, schedule: Callable[[int], bool],
                 eta_scales=ETA_SCALES, fixed=FIXED_LAMBDAS):
        if cfg.optimizer != "sgd" or cfg.model.n_mtp != 1:
            raise ValueError(f"the regret experiment is for one MTP head trained with SGD (the theory's step): "
                             f"got optimizer {cfg.optimizer!r}, n_mtp {cfg.model.n_mtp}")
        self.schedule = schedule
        self.eta_scales, self.fixed = tuple(float(s) for s in eta_scales), tuple(float(v) for v in fixed)
        self.joint = JOINT_REGIME.losses(replace(cfg, regime=JOINT_REGIME.name, lam=1.0))
        self.sink = CSVSink(out, prefix=schema.REGRET_PREFIX) if out is not None and is_main_process() else MemorySink()
        # one instance per (reading, eta scale), called in training order: an EMA or warning count carries over
        self.readings = {(name, s): make() for name, make in OCC_READINGS.items() for s in self.eta_scales}
        self.step_proxy = OCC(proxy="step", label=STEP_PROXY)
        self.cosine = CosineGate()
        # per eta scale and called in training order, so each carries its curvature as in a run
        self.amortised = {s: AmortisedTaylor(every=AMORTISED_EVERY) for s in self.eta_scales}
        self.amortised_true: dict[float, AmortisedTaylor] = {}  # built on the first call: it needs the J_true batch

    def __call__(self, ctx) -> None:
        if not self.schedule(ctx.step):
            return None
        with fork_rng(ctx.model), global_means():
            model = copy.deepcopy(ctx.model)
            model.train(ctx.model.training)
            batches = [{k: v[rows] for k, v in ctx.batch.items()}
                       for rows in minibatch_rows(ctx.batch["input_ids"].size(0), ctx.cfg.minibatches)]
            occ = {s: self._occ_lambdas(ctx, model, batches, s) for s in self.eta_scales}
            optimizer = _optimizer_copy(ctx.cfg, ctx.optimizer, model)
            for mb, batch in enumerate(batches):
                rows = [row for s in self.eta_scales
                        for row in self._rows(ctx, model, batch, ctx.lr * s, s, occ[s][mb], mb)]
                self.sink.write(ctx.step, mb, {"steps": [{"step": ctx.step, "minibatch": mb, **r} for r in rows]})
                _detach_update(ctx.losses, model, optimizer, batch)  # on to the trajectory's next state
        return None

    # ------------------------------------------------------------------ the choices

    def _occ_lambdas(self, ctx, start, batches, scale) -> list[dict[str, _Choice]]:
        """Each OCC reading's lambda on each mini-batch, after the detach steps of size
        ``scale x lr`` the trainer would have taken on the earlier mini-batches (pi_old
        is the rollout's: the reading on mini-batch 0 is 0 by construction)."""
        model = copy.deepcopy(start)
        optimizer = make_optimizer(replace(ctx.cfg, lr=ctx.lr * scale), model)
        chosen = []
        for mb, batch in enumerate(batches):
            with torch.no_grad():
                lp = aligned_logprobs(self.joint.forward(model, batch))  # the trainer's own forward has them
            inputs = CalibrationInputs(step=ctx.step, minibatch=mb, logprobs=lp, old_logprobs=batch["old_logprobs"],
                                       response_mask=batch["response_mask"], lr=ctx.lr * scale)
            per = {}
            for name in OCC_READINGS:
                calibration, cost = _timed(lambda: self.readings[(name, scale)](inputs))
                per[name] = _Choice(occ_label(name, mb), float(calibration.lambdas[0]), cost)
            chosen.append(per)
            _detach_update(ctx.losses, model, optimizer, batch)
        return chosen

    def _rows(self, ctx, model, batch, eta, scale, occ: dict[str, _Choice], mb) -> list[dict]:
        """The rows of one state (``model`` before mini-batch ``mb``'s update) at step size ``eta``."""
        losses, heldout = self.joint, ctx.j_true_batch
        probe = Probe(model, losses.objective, losses.aux_loss, forward=losses.forward)
        measure = dict(gg_curvature=False, line_search=False, crossfit=False)
        on_batch, t_batch = _timed(lambda: probe.measure(batch, eta, **measure))
        on_true, t_true = _timed(lambda: probe.measure(batch, eta, eval_objective=j_true, eval_batch=heldout,
                                                       **measure))
        with torch.no_grad():
            logprobs = aligned_logprobs(losses.forward(model, batch))
        inputs = CalibrationInputs(
            step=ctx.step, minibatch=mb, logprobs=logprobs,
            old_logprobs=batch["old_logprobs"], response_mask=batch["response_mask"], lr=eta, model=model,
            batch=batch, forward=losses.forward, objective=losses.objective, aux_loss=losses.aux_loss,
        )
        step_proxy, t_step = _timed(lambda: self.step_proxy(inputs))
        cosine, t_cos = _timed(lambda: self.cosine(inputs))
        if scale not in self.amortised_true:
            self.amortised_true[scale] = AmortisedTaylor(every=AMORTISED_EVERY, eval_objective=j_true,
                                                         eval_batch=heldout)
        amortised, t_amortised = _timed(lambda: self.amortised[scale](inputs))
        amortised_true, t_amortised_true = _timed(lambda: self.amortised_true[scale](inputs))
        choices = [
            _Choice(DETACH, 0.0, 0.0),
            *(_Choice(f"fixed-{lam:g}", lam, 0.0) for lam in self.fixed),
            occ["occ-paper"], occ["occ-reference"],
            _Choice(STEP_PROXY, float(step_proxy.lambdas[0]), t_step),
            _Choice(COSINE, float(cosine.lambdas[0]), t_cos),
            _Choice(TAYLOR_BATCH, on_batch.lambda_star_taylor, t_batch),
            _Choice(TAYLOR_TRUE, on_true.lambda_star_taylor, t_true),
            _Choice(AMORTISED, float(amortised.lambdas[0]), t_amortised),
            _Choice(AMORTISED_TRUE, float(amortised_true.lambdas[0]), t_amortised_true),
        ]
        known = [c.lam for c in choices if c.lam is not None and np.isfinite(c.lam)]
        eps = torch.finfo(next(model.parameters()).dtype).eps
        # every other point of the Probe's grid around lambda*_taylor (J_true) brackets lambda*_meas for the
        # search; the choices themselves are on the grid, so each Delta_true is a measured point
        grid = default_grid(on_true.lambda_star_taylor, on_true.b, on_true.g_norm, on_true.m_norm,
                            on_true.objective_value, eps)[::2]
        grid = np.unique(np.concatenate([grid, known]))
        curve_record, t_curve = _timed(lambda: probe.measure(batch, eta, eval_objective=j_true, eval_batch=heldout,
                                                             grid=grid, hvp=False, gg_curvature=False, crossfit=False))
        curve = curve_record.curve
        gain, t_detach = _detach_gain(ctx.losses, model, batch, heldout, eta)
        if curve is None:  # m = 0 on S: every lambda is the detach step
            return []
        delta_at = dict(zip(curve.lambdas.tolist(), curve.delta.tolist()))
        best = max(curve.delta_star, curve.delta.max().item(), 0.0)  # lambda = 0 is on every curve
        choices.append(_Choice(ORACLE, curve.lambda_star, t_true + t_curve))
        rows = []
        for choice in choices:
            delta = delta_at.get(choice.lam) if choice.lam is not None else None
            if choice.calibrator == ORACLE:
                delta = best
            rows.append({
                "eta_scale": scale, "eta": eta, "choice": choice.calibrator, "lambda": choice.lam,
                "delta_true": delta, "delta_best": best, "regret": None if delta is None else best - delta,
                "gain_detach": gain, "lambda_star_meas": curve.lambda_star,
                "lambda_star_taylor_true": on_true.lambda_star_taylor, "cost_s": choice.cost_s, "detach_s": t_detach,
            })
        return rows


def _optimizer_copy(cfg, optimizer, model):
    """The trainer's optimizer, state included, over ``model`` (a copy of the trained one):
    its next steps are the trainer's."""
    copied = make_optimizer(cfg, model)
    copied.load_state_dict(optimizer.state_dict())
    return copied


def _detach_update(losses, model, optimizer, batch) -> None:
    """The detach regime's update on one mini-batch, as the trainer takes it: -J_batch plus
    the MTP loss on detached inputs (which trains the head and reaches no shared parameter)."""
    optimizer.zero_grad(set_to_none=True)
    out = losses.forward(model, batch)
    (losses.aux_loss(out, batch) - losses.objective(out, batch)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _detach_gain(losses, model, batch, heldout, eta) -> tuple[float, float]:
    """J_true after one detach update of size ``eta`` (its shared parameters move as in the
    curves' step(0)) minus J_true before, and the update's time."""
    stepped = copy.deepcopy(model)
    optimizer = torch.optim.SGD(stepped.parameters(), lr=eta)
    _, elapsed = _timed(lambda: _detach_update(losses, stepped, optimizer, batch))
    stepped.eval()
    evaluated = model.training
    model.eval()
    with torch.no_grad():
        before = j_true(losses.forward(model, heldout), heldout).item()
        after = j_true(losses.forward(stepped, heldout), heldout).item()
    model.train(evaluated)
    return after - before, elapsed
