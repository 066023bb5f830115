"""Exact diagnostics of an MTP loss's effect on an RL objective.

* :mod:`.probe`: the :class:`Probe` (orchestration) and its :class:`ProbeRecord`;
* :mod:`.hvp`: exact Hessian-vector products and the top curvature;
* :mod:`.quantities`: the decomposition's formulas as pure functions.
"""
from .hvp import HVP_MODES, HessianAt, top_curvature, tree_dot
from .probe import GRID_MULTIPLIERS, NO_MTP_SIGNAL, NOT_CONCAVE, Curve, Probe, ProbeRecord, block_of, default_forward

__all__ = [
    "GRID_MULTIPLIERS", "HVP_MODES", "NOT_CONCAVE", "NO_MTP_SIGNAL", "Curve", "HessianAt", "Probe", "ProbeRecord",
    "block_of", "default_forward", "top_curvature", "tree_dot",
]
