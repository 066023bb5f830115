"""Offline evidence for issue #16: how much of lambda*_meas on J_true a trainer-side proxy can explain.

Reads a finished job's diag_steps.csv / minibatch.csv (default: the committed
figures/job) and prints, per seed (the unit of replication), Spearman rho of
lambda*_meas (objective j_true) with proxies a trainer holds or can get, and the
median regret of each proxy on the held-out curve. Not a test: numbers for the lead.

Proxies (all from the J_batch row of the same diagnosed mini-batch unless named):

* ``c/v2``          c / |m|^2 (gradients only);
* ``taylor_batch``  lambda*_taylor on J_batch, (c + eta h_gm) / (-eta h_mm): what
                    AmortisedTaylor gives on a call where it re-measures (every=1);
* ``amortised``     AmortisedTaylor's formula with c, |g|, |m| of this mini-batch and the
                    curvatures kappa_m = -h_mm/|m|^2, r_gm = h_gm/(|g||m|) carried from the
                    previous diagnosed J_batch row of the same run (the previous mini-batch,
                    or, on mini-batch 0, the last one diag_every steps earlier);
* ``crossfit``      (c_crossfit + eta h_gm) / (-eta h_mm) on J_batch: the same-sample
                    covariance of c removed (s.8; costs two half-batch gradient pairs);
* ``occ_paper``     the paper reading's lambda on that mini-batch, where a run logged it
                    (occ-paper: trained; occ-reference, oracle: shadow);
* ``c_true+curv``   (c_true + eta h_gm) / (-eta h_mm) with J_batch's curvatures of this mini-batch
                    and the held-out c_true = <grad J_true, m>;
* ``amortised_true`` AmortisedTaylor(eval_objective=J_true): c_true, |g|, |m| fresh, J_true's
                    kappa_m and r_gm carried from the previous diagnosed row (as ``amortised``);
* ``taylor_true``   lambda*_taylor on J_true (the held-out gradient and HVP on every
                    mini-batch: the best any Taylor-type proxy can do).

The last three need a gradient of a held-out objective, which a trainer with a
verifiable dev set has; the first five need only the rollout batch.

Regret of a proxy lambda on a mini-batch: Delta_fit(vertex) - Delta_fit(lambda) with the
free quadratic fit of the measured J_true curve (fit_a2, fit_a1, fit_a0; rows with
fit_a2 < 0 only; its R^2 is printed). A second table uses the oracle arm's minibatch.csv
(every mini-batch has c, v2, h_mm and lambda*_taylor on J_batch) to measure how fast the
curvature along m decorrelates across calls, i.e. what amortising the HVP over k calls costs.

    PYTHONPATH=$PWD python benchmarks/offline_amortised_taylor.py [--job figures/job]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

PROXIES = ("c/v2", "taylor_batch", "amortised", "crossfit", "occ_paper", "c_true+curv", "amortised_true",
           "taylor_true")
OCC_LOGGED = {"occ-paper": "lambda_trained", "occ-reference": "calib_shadow_paper_lambda",
              "oracle": "calib_shadow_paper_lambda"}


def taylor(c, h_gm, h_mm, eta):
    """lambda*_taylor, NaN where the direction is not concave."""
    return np.where(h_mm < 0, (c + eta * h_gm) / np.where(h_mm < 0, -eta * h_mm, np.nan), np.nan)


def arm_rows(run: Path, arm: str) -> pd.DataFrame:
    diag = pd.read_csv(run / "diag_steps.csv").sort_values(["step", "minibatch"])
    batch = diag[diag.objective == "j_batch"].set_index(["step", "minibatch"])
    true = diag[diag.objective == "j_true"].set_index(["step", "minibatch"])
    eta = batch.lr
    out = pd.DataFrame(index=true.index)
    out["target"] = true.lambda_star_meas
    out["c/v2"] = batch.c / batch.v2.where(batch.v2 > 0)
    out["taylor_batch"] = taylor(batch.c, batch.h_gm, batch.h_mm, eta)
    kappa = (-batch.h_mm / batch.v2.where(batch.v2 > 0))
    r_gm = batch.h_gm / (batch.g_norm * batch.m_norm).where(batch.v2 > 0)
    kappa_prev, r_prev = kappa.shift(1), r_gm.shift(1)  # the previous diagnosed mini-batch of this run
    out["amortised"] = np.where(
        kappa_prev > 0, (batch.c + eta * r_prev * batch.g_norm * batch.m_norm) / (eta * kappa_prev * batch.v2), np.nan)
    out["crossfit"] = taylor(batch.c_crossfit, batch.h_gm, batch.h_mm, eta)
    out["taylor_true"] = taylor(true.c_eval, true.h_gm, true.h_mm, eta)
    out["c_true+curv"] = taylor(true.c_eval, batch.h_gm, batch.h_mm, eta)
    kappa_t = (-true.h_mm / true.v2.where(true.v2 > 0)).shift(1)
    r_t = (true.h_gm / (batch.g_norm * batch.m_norm).where(batch.v2 > 0)).shift(1)
    out["amortised_true"] = np.where(
        kappa_t > 0, (true.c_eval + eta * r_t * batch.g_norm * batch.m_norm) / (eta * kappa_t * batch.v2), np.nan)
    out["c_batch"], out["c_true"] = batch.c, true.c_eval
    out["occ_paper"] = np.nan
    if arm in OCC_LOGGED:
        mb = pd.read_csv(run / "minibatch.csv").set_index(["step", "minibatch"])
        source = mb[OCC_LOGGED[arm]] if OCC_LOGGED[arm] in mb else batch.lambda_trained
        out["occ_paper"] = source.reindex(out.index)
    for key in ("fit_a2", "fit_a1", "fit_a0", "fit_r2"):
        out[key] = true[key]
    out["arm"] = arm
    return out.reset_index()


def regret(rows: pd.DataFrame, lam: pd.Series) -> pd.Series:
    a2, a1, a0 = rows.fit_a2, rows.fit_a1, rows.fit_a0
    ok = (a2 < 0) & lam.notna()
    vertex = -a1 / (2 * a2)
    value = lambda x: a2 * x**2 + a1 * x + a0  # noqa: E731
    return (value(vertex) - value(lam)).where(ok)


def spearman(x: pd.Series, y: pd.Series) -> tuple[float, int]:
    ok = x.notna() & y.notna() & np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan"), int(ok.sum())
    return float(spearmanr(x[ok], y[ok]).statistic), int(ok.sum())


def diagnosed_table(job: Path) -> None:
    arms = [a["label"] for a in json.loads((job / "job.json").read_text())["preset"]["arms"] if a["diagnostics"]]
    seeds = sorted(p.name for p in (job / "runs" / arms[0]).iterdir())
    for subset, chosen in (("all diagnosed arms", arms), ("arms that logged OCC-paper's lambda", list(OCC_LOGGED))):
        print(f"\n== lambda*_meas on J_true vs proxies: {subset} ({', '.join(chosen)}) ==")
        print(f"{'seed':6s} {'n':>3s} " + " ".join(f"{p:>14s}" for p in PROXIES)
              + f" {'c vs c_true':>12s}   (Spearman rho, n)")
        medians = {p: [] for p in PROXIES}
        for seed in seeds:
            rows = pd.concat([arm_rows(job / "runs" / arm / seed, arm) for arm in chosen], ignore_index=True)
            rows = rows[rows.target.notna()]
            cells = []
            for p in PROXIES:
                rho, n = spearman(rows[p], rows.target)
                cells.append(f"{rho:7.2f} ({n:3d}) ")
                medians[p].append(float(regret(rows, rows[p]).median()))
            rho_c, _ = spearman(rows.c_batch, rows.c_true)
            print(f"{seed:6s} {len(rows):3d} " + " ".join(f"{c:>14s}" for c in cells) + f" {rho_c:12.2f}")
            r2 = rows.fit_r2[rows.fit_a2 < 0]
            medians.setdefault("_r2", []).append(float(r2.median()))
            medians.setdefault("_zero", []).append(float(regret(rows, rows.target * 0).median()))
        if chosen == arms:  # mini-batch 1 carries from mini-batch 0 of the same step: the lag an online every=2 has
            lag1 = []
            for seed in seeds:
                rows = pd.concat([arm_rows(job / "runs" / arm / seed, arm) for arm in chosen], ignore_index=True)
                rows = rows[rows.target.notna() & (rows.minibatch == 1)]
                lag1.append(" ".join(f"{p} {spearman(rows[p], rows.target)[0]:.2f}"
                                     for p in ("amortised", "taylor_batch", "amortised_true", "taylor_true")))
            print("mini-batch 1 rows only (carried one call back), seeds 0/1/2:\n  " + "\n  ".join(lag1))
        print("median regret on the J_true fit, seeds 0/1/2:")
        occ = np.array(medians["occ_paper"])
        for p in PROXIES:
            # a fair ratio only where every proxy is judged on the rows that logged OCC's lambda
            ratio = "" if chosen != list(OCC_LOGGED) else "   / OCC-paper's: " + "/".join(
                f"{v:.2f}" for v in np.array(medians[p]) / occ)
            print(f"  {p:14s} " + "/".join(f"{v:.2e}" for v in medians[p]) + ratio)
        print("  lambda=0 (detach) " + "/".join(f"{v:.2e}" for v in medians["_zero"])
              + "; median fit R^2 " + "/".join(f"{v:.3f}" for v in medians["_r2"]))


def amortisation_table(job: Path) -> None:
    """On the oracle arm, every mini-batch has c, v2, h_mm and lambda*_taylor on J_batch."""
    print("\n== oracle arm, every mini-batch (J_batch): kappa_m carried k calls ==")
    print(f"{'seed':6s} {'n':>3s} {'sd log kappa':>12s} {'rho(log k_t, log k_t-1)':>24s} "
          + " ".join(f"{'rho k=' + str(k):>9s}" for k in (2, 4, 8)) + "  (rho of amortised with lambda*_taylor)")
    for run in sorted((job / "runs" / "oracle").iterdir()):
        mb = pd.read_csv(run / "minibatch.csv").sort_values(["step", "minibatch"]).reset_index(drop=True)
        cfg = json.loads((run / "config.json").read_text())
        eta = float(cfg.get("lr", cfg.get("train", {}).get("lr", 0.005)))
        v2 = mb.calib_v2.where(mb.calib_v2 > 0)
        kappa = -mb.calib_h_mm / v2
        target = mb.calib_lambda_star_taylor
        # h_gm from the logged lambda*_taylor: lambda* (-eta h_mm) = c + eta h_gm
        h_gm = (target * (-eta * mb.calib_h_mm) - mb.calib_c) / eta
        ok = kappa > 0
        logk = np.log(kappa.where(ok))
        cells = []
        for k in (2, 4, 8):
            measured = (mb.index % k) == 0  # re-measure every k-th call, carry in between
            carried_k = kappa.where(measured & ok).ffill()
            carried_r = (h_gm / np.sqrt(v2)).where(measured & ok).ffill()  # h_gm / |m| (|g| not logged)
            lam = (mb.calib_c + eta * carried_r * np.sqrt(v2)) / (eta * carried_k * v2)
            rho, _ = spearman(lam.where(~measured), target.where(~measured))
            cells.append(f"{rho:9.2f}")
        rho1, _ = spearman(logk, logk.shift(1))
        print(f"{run.name:6s} {int(ok.sum()):3d} {float(logk.std()):12.2f} {rho1:24.2f} " + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", type=Path, default=Path("figures/job"))
    args = parser.parse_args()
    diagnosed_table(args.job)
    amortisation_table(args.job)


if __name__ == "__main__":
    main()
