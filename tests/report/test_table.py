"""Table 1 (mtpdiag/report/table.py): arm names from the regime registry, paired
differences over seeds, the fixed-lambda sweep of the policy arms."""
import numpy as np
import pandas as pd
import pytest

from mtpdiag import regimes, schema
from mtpdiag.report import table

from .jobs import DETACH, OCC_PAPER, POLICY, hand_built_job


@pytest.fixture
def toy_regime():
    class Toy(regimes.Regime):
        name, description, lambda_rule, display, family = "toy", "a test regime", regimes.FIXED, "Toy", "Oranges"

    yield regimes.register(Toy())
    regimes.unregister("toy")


@pytest.mark.parametrize("arm, name", [
    (schema.Arm.of("detach"), "Detach"),
    (schema.Arm.of("ce", 0.5), "CE (λ=0.5)"),
    (schema.Arm("policy", "policy"), f"Policy (λ={regimes.DEFAULT_LAMBDA:g})"),
    (schema.Arm.of("occ", calibrator="occ-paper"), "OCC paper"),
    (schema.Arm.of("occ", calibrator="occ-reference"), "OCC reference"),
    (schema.Arm.of("occ", calibrator="oracle"), "Oracle"),
    (schema.Arm.of("occ", calibrator="cosine"), "OCC cosine"),
    (schema.Arm.of("occ"), f"OCC (fixed λ={regimes.DEFAULT_LAMBDA:g})"),
])  # fmt: skip
def test_display_names_are_the_regimes(arm, name):
    assert table.display_name(arm) == name


def test_table1_pairs_seeds_against_detach(tmp_path):
    job = hand_built_job(tmp_path / "j", [DETACH, POLICY], (0, 1, 2),
                         final_j_true=lambda arm, seed: 0.3 + 0.1 * seed + (0.05 if arm == "policy-0.5" else 0))
    main, sweep = table.table1(job)
    policy = main.set_index("arm").loc["policy-0.5"]
    # the seeds differ by 0.1 each, the arms by 0.05 on every seed: the paired difference has no spread
    assert policy["delta_vs_detach"] == pytest.approx(0.05)
    assert policy["delta_vs_detach_high"] - policy["delta_vs_detach_low"] == pytest.approx(0, abs=1e-12)
    assert policy["j_true_high"] - policy["j_true_low"] > 0.1
    assert list(sweep["name"]) == ["Policy (λ=0.5)"]
    assert np.isnan(main.set_index("arm").loc["detach", "delta_vs_detach"])  # no arm is compared with itself


def test_the_sweep_is_the_policy_arms_by_lambda_and_fixed_regimes_carry_their_lambda(tmp_path, toy_regime):
    arms = [DETACH, {**POLICY, "label": "policy-2.0", "lam": 2.0}, POLICY, OCC_PAPER,
            {"label": "toy-0.1", "regime": "toy", "lam": 0.1, "calibrator": None}]
    main, sweep = table.table1(hand_built_job(tmp_path / "j", arms, (0,)))
    assert list(sweep["arm"]) == ["policy-0.5", "policy-2.0"]
    assert main.set_index("arm")["lambda"].to_dict(into=dict) == pytest.approx(
        {"detach": np.nan, "policy-2.0": 2.0, "policy-0.5": 0.5, "occ-paper": np.nan, "toy-0.1": 0.1}, nan_ok=True)
    assert list(main["name"]) == ["Detach", "Policy (λ=2)", "Policy (λ=0.5)", "OCC paper", "Toy (λ=0.1)"]


def test_write_table1_writes_both_tables(tmp_path):
    job = hand_built_job(tmp_path / "j", [DETACH, POLICY], (0, 1))
    csv, md = table.write_table1(job, tmp_path / "out")
    assert (csv.name, md.name) == (schema.TABLE1_CSV, schema.TABLE1_MD)
    assert list(pd.read_csv(csv)["table"]) == ["main", "main", "fixed_lambda_sweep"]
    text = md.read_text()
    assert text.startswith("# Table 1: j\n") and "| Policy (λ=0.5) |" in text and "## Fixed-λ sweep" in text
    _, md = table.write_table1(hand_built_job(tmp_path / "k", [DETACH], (0,)), tmp_path / "out")
    assert "No policy arm in this job." in md.read_text()


def test_formatting():
    assert table.fmt_ci(0.5, 0.25, 0.75) == "0.500 [0.250, 0.750]"
    assert table.fmt_ci(0.5, np.nan, np.nan, 1) == "0.5 (no CI)" and table.fmt_ci(np.nan, 0, 1) == "—"
    assert table.markdown_table(pd.DataFrame({"a": ["x|y"], "b": [1]})) == "| a | b |\n|---|---|\n| x\\|y | 1 |"


def test_table1_names_the_collapsed_run_of_an_arm(tmp_path):
    from .jobs import collapsed_job

    main, _ = table.table1(collapsed_job(tmp_path / "j"))
    flags = main.set_index("arm")[["collapsed_seeds", "lambda_out_of_range_seeds"]]
    assert flags.loc["occ-paper"].tolist() == ["0", "0"] and flags.loc["detach"].tolist() == ["", ""]
    md = table.write_table1(collapsed_job(tmp_path / "k"), tmp_path)[-1].read_text()
    assert "flagged runs" in md and "collapsed: seed 0; λ out of range: seed 0" in md


def test_an_adamw_arm_is_paired_with_the_adamw_detach_arm_in_table1_and_c6():
    """Table 1 paired every arm with the first detach arm, so an AdamW arm was compared with
    SGD detach; it is now compared with the detach arm of its own optimizer, and C6 reports
    the AdamW pair beside its SGD verdict."""
    import tempfile
    from pathlib import Path

    from mtpdiag.report import claims

    adamw = lambda arm: {**arm, "label": f"{arm['label']}@adamw", "optimizer": "adamw", "lr": 1e-4}  # noqa: E731
    arms = [DETACH, OCC_PAPER, adamw(DETACH), adamw(OCC_PAPER)]
    final = {"detach": 0.50, "occ-paper": 0.52, "detach@adamw": 0.70, "occ-paper@adamw": 0.75}
    with tempfile.TemporaryDirectory() as tmp:
        job = hand_built_job(Path(tmp) / "j", arms, (0, 1, 2),
                             final_j_true=lambda arm, seed: final[arm] + 0.001 * seed * (arm == "occ-paper@adamw"))
        main, _ = table.table1(job)
        rows = main.set_index("arm")
        assert rows.loc["occ-paper@adamw", "delta_vs_detach"] == pytest.approx(0.051, abs=1e-12)  # 0.75 - 0.70 (+0.001)
        assert rows.loc["occ-paper@adamw", "delta_vs_occ_paper"] != rows.loc["occ-paper@adamw", "delta_vs_occ_paper"]
        assert rows.loc["occ-paper", "delta_vs_detach"] == pytest.approx(0.02, abs=1e-12)
        assert rows.loc["detach@adamw", "name"] == "Detach, AdamW"
        verdicts = claims.claims(job)[0].set_index("claim")
        assert verdicts.loc["C6", "estimate"] == pytest.approx(0.02, abs=1e-12)  # the SGD pair decides
        assert verdicts.loc["C6.adamw", "estimate"] == pytest.approx(0.051, abs=1e-12)
        assert verdicts.loc["C6.adamw", "verdict"] == claims.REPORTED
