"""C6: end to end, OCC with the paper's reading ends above Detach in J_true
(paired over seeds: the same seed starts every arm from the same SFT weights).
The verdict is on every seed; where a run of either arm collapsed, the reason
also gives the difference without those seeds, so no collapse is averaged in
silently."""
from __future__ import annotations

from ... import regimes
from ...schema import COLLAPSED, FIGURE_FILES
from ..data import PAPER_CALIBRATOR, final_values, flagged_runs
from ..stats import t_interval
from ..table import display_name, paired_difference
from .base import INCONCLUSIVE, Claim, InsufficientData, Part, Threshold, at_least, ci


class EndToEnd(Claim):
    id = "C6"
    statement = "End to end: OCC (paper) ends above Detach in J_true"
    figure = f"{FIGURE_FILES['F5']}, table1"
    statistic = "paired final J_true, OCC paper − Detach"

    MIN_SEEDS = Threshold(3, "seeds both OCC paper and Detach need")
    MIN_GAIN = Threshold(0.0, "the CI of the paired final J_true difference OCC paper − Detach lies above this")

    def test(self, job, details):
        detach = next(iter(job.arms_of(regimes.DETACH)), None)
        occ = next((a for a in job.arms if a.calibrator == PAPER_CALIBRATOR), None)
        if detach is None or occ is None:
            raise InsufficientData("the job needs a detach arm and an occ-paper arm")
        finals = final_values(job, "j_true", "claim C6")
        mean, low, high, n = paired_difference(finals, occ.label, detach.label)
        flagged = flagged_runs(job)
        collapsed = flagged[flagged[COLLAPSED]]
        dropped = sorted(set(collapsed.loc[collapsed["arm"].isin([occ.label, detach.label]), "seed"]))
        without = ""
        if dropped:
            kept = finals[~finals["seed"].isin(dropped)]
            w_mean, w_low, w_high, w_n = paired_difference(kept, occ.label, detach.label)
            without = (f" (with the collapsed run(s) of seeds {dropped}; without them {ci(w_mean, w_low, w_high)} "
                       f"over {w_n} seeds)")
        if n < self.MIN_SEEDS:
            parts = [Part(f"only {n} seeds with both arms (need {self.MIN_SEEDS}){without}", INCONCLUSIVE)]
        else:
            parts = [Part(f"OCC paper − Detach {ci(mean, low, high)} vs {self.MIN_GAIN}{without}",
                          at_least(low, high, self.MIN_GAIN))]

        def final(arm) -> str:
            seeds = sorted(collapsed.loc[collapsed["arm"] == arm.label, "seed"])
            text = f"{display_name(arm)} {ci(*t_interval(finals[finals['arm'] == arm.label]['value'])[:3])}"
            return text + (f" (seed {','.join(map(str, seeds))} collapsed)" if seeds else "")

        per_arm = "; ".join(final(arm) for arm in job.arms)
        return self.result(parts, mean, low, high, n,
                           f"paired final J_true, OCC paper − Detach; final J_true: {per_arm}")
