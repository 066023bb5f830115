"""Exact diagnostics of an MTP loss's effect on an RL objective, in layers:

* :mod:`.functional`: the model as a pure function of its parameters
  (:class:`FunctionalModel`), the isolation context (:func:`isolated`), S
  discovery (:func:`find_shared`), a loss as a function of S and the shared
  gradients of several losses; the Probe and the calibrators both stand on it;
* :mod:`.hvp`: exact Hessian-vector products (:class:`HessianAt`), the same
  Hessian as a scipy ``LinearOperator`` (:class:`HessianOperator`) and the top
  curvature on it;
* :mod:`.quantities`: the decomposition's formulas as pure functions, and the
  table of derived record fields (adding a quantity: see there);
* :mod:`.curves`: the measured curve Delta(lambda) of the trained update: the
  replay of the optimizer's step, the grid, both quadratic fits, the refined search;
* :mod:`.gradients`: the gradients one update is made of (:class:`UpdateGradients`), taken
  once over the trainer's forward and shared with its calibrator and the Probe;
* :mod:`.precond`: Adam's step through a frozen diagonal preconditioner;
* :mod:`.probe`: the :class:`Probe` (orchestration), its :class:`MeasureOptions`
  and its :class:`ProbeRecord`.
"""
from .curves import GRID_MULTIPLIERS, Curve, Fit, Replay
from .functional import FunctionalModel, default_forward, find_shared, isolated, values_and_gradients
from .gradients import UpdateGradients, training_differs
from .hvp import HVP_MODES, HessianAt, HessianOperator, top_curvature, tree_dot
from .probe import NO_MTP_SIGNAL, NOT_CONCAVE, PROBE_HVP_MODES, MeasureOptions, Probe, ProbeRecord, block_of

__all__ = [
    "GRID_MULTIPLIERS", "HVP_MODES", "NOT_CONCAVE", "NO_MTP_SIGNAL", "PROBE_HVP_MODES", "Curve", "Fit", "FunctionalModel", "HessianAt",
    "HessianOperator", "MeasureOptions", "Probe", "ProbeRecord", "Replay", "block_of", "default_forward", "find_shared",
    "UpdateGradients", "isolated", "top_curvature", "training_differs", "tree_dot", "values_and_gradients",
]
