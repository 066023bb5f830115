"""Health flags of a run: a run gone wrong is flagged, not left to look like a result.

Every metrics row says whether the run has ``collapsed`` (held-out J_true below
``COLLAPSE_FRACTION`` of its post-SFT value, or a zero reward on
``ZERO_REWARD_STEPS`` steps in a row) and whether an MTP coefficient left
[-``LAMBDA_RANGE``, ``LAMBDA_RANGE``] (``lambda_out_of_range``); a warning says
so when a flag is first set, and the report lists flagged runs.
"""
from __future__ import annotations

import math
import warnings

from .distributed import is_main_process
from .rundir import RunDir
from .schema import COLLAPSED, LAMBDA_OUT_OF_RANGE, LAMBDA_PREFIX, METRICS, RUN_FLAGS

COLLAPSE_FRACTION = 0.25  # a held-out J_true below this fraction of the post-SFT one: collapsed
ZERO_REWARD_STEPS = 5  # this many RL steps in a row with reward 0: collapsed
LAMBDA_RANGE = 20.0  # |lambda| above this on a mini-batch: out of range (the fixed arms use 0.1-1)


def health_flags(rows: list[dict], minibatch_rows: list[dict]) -> dict[str, str | None]:
    """Why the newest metrics row (the last of ``rows``, the post-SFT step 0 first)
    is flagged, for each of :data:`~mtpdiag.schema.RUN_FLAGS` (None: not flagged).
    ``minibatch_rows`` are the newest step's. A collapse is judged on the latest
    evaluated J_true, so the flag stays set until an evaluation recovers."""
    why: dict[str, str | None] = dict.fromkeys(RUN_FLAGS)
    evaluated = [r["j_true"] for r in rows if math.isfinite(r.get("j_true", math.nan))]
    if len(evaluated) > 1 and evaluated[-1] < COLLAPSE_FRACTION * evaluated[0]:
        why[COLLAPSED] = (f"held-out J_true {evaluated[-1]:.4f} is below {COLLAPSE_FRACTION:g} x its post-SFT value "
                          f"{evaluated[0]:.4f}")
    recent = rows[-ZERO_REWARD_STEPS:]
    if len(recent) == ZERO_REWARD_STEPS and all(r.get("reward_mean") == 0 for r in recent):
        why[COLLAPSED] = why[COLLAPSED] or f"the reward was 0 on the last {ZERO_REWARD_STEPS} steps"
    outside = [(r.get("minibatch"), k, v) for r in minibatch_rows for k, v in r.items()
               if k.startswith(LAMBDA_PREFIX) and not abs(v) <= LAMBDA_RANGE]
    if outside:
        mb, name, value = outside[0]
        why[LAMBDA_OUT_OF_RANGE] = (f"{name} = {value:.4g} on mini-batch {mb} is outside "
                                    f"[-{LAMBDA_RANGE:g}, {LAMBDA_RANGE:g}]")
    return why


def flag_row(run: RunDir, row: dict, mb_rows: list[dict]) -> None:
    """Set the health flags of the new metrics ``row``; warn once when one turns on."""
    previous = run.rows[METRICS][-1] if run.rows[METRICS] else {}
    for flag, why in health_flags([*run.rows[METRICS], row], mb_rows).items():
        row[flag] = why is not None
        if why is not None and not previous.get(flag) and is_main_process():
            warnings.warn(f"{run.path}, step {row['step']}: {why} (flagged {flag!r} in {METRICS})", stacklevel=3)
