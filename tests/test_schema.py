"""The on-disk schema: arm labels (format and parse as one pair), shadow columns,
file names and the atomic write."""
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtpdiag import regimes, schema
from mtpdiag.calibrators import CALIBRATORS
from mtpdiag.schema import Arm, atomic_write, format_arm_label, parse_arm_label

CALIBRATED = [name for name, r in regimes.REGIMES.items() if r.lambda_rule == regimes.CALIBRATED]
lambdas = st.floats(allow_nan=False, allow_infinity=False)


@given(regime=st.sampled_from(sorted(regimes.REGIMES)), lam=lambdas)
def test_a_fixed_lambda_label_parses_back_to_its_regime_and_lambda(regime, lam):
    assert parse_arm_label(format_arm_label(regime, lam), regimes.REGIMES, CALIBRATORS) == (regime, lam, None)


def test_negative_and_exponent_lambdas_parse_back():
    """A label's lambda may carry a "-" of its own (policy--0.5, ce-1e-05): the regime is the name it starts with."""
    assert parse_arm_label("policy--0.5", regimes.REGIMES, CALIBRATORS) == ("policy", -0.5, None)
    assert parse_arm_label("ce-1e-05", regimes.REGIMES, CALIBRATORS) == ("ce", 1e-5, None)


@pytest.mark.parametrize("calibrator", sorted(set(CALIBRATORS) - set(regimes.REGIMES)))
def test_a_calibrator_label_belongs_to_the_calibrated_regime(calibrator):
    label = format_arm_label(CALIBRATED[0], None, calibrator)
    assert label == calibrator
    assert parse_arm_label(label, regimes.REGIMES, CALIBRATORS) == (CALIBRATED[0], None, calibrator)


def test_a_regime_label_is_its_name_and_arm_of_formats_it():
    assert [parse_arm_label(format_arm_label(name), regimes.REGIMES, CALIBRATORS) for name in regimes.REGIMES] == [
        (name, None, None) for name in regimes.REGIMES]
    assert Arm.of("policy", 0.5) == Arm("policy-0.5", "policy", 0.5, None)
    assert Arm.of("occ", calibrator="oracle") == Arm("oracle", "occ", None, "oracle")
    assert Arm.of("policy", 1).label == "policy-1.0"  # one spelling of a lambda, whatever type it came as


def test_an_unreadable_label_is_named_with_what_it_could_be():
    with pytest.raises(ValueError, match=r"arm label 'policy-much' is neither a regime \(\[.*'policy'.*\]\), nor "
                                         r"<regime>-<lambda>, nor a calibrator \(\[.*'occ-paper'"):
        parse_arm_label("policy-much", regimes.REGIMES, CALIBRATORS)


@given(reading=st.text(st.characters(codec="ascii", categories=["L", "N"], include_characters="_-"), min_size=1),
       heads=st.booleans())
def test_a_shadow_lambda_column_parses_back_to_its_reading(reading, heads):
    key = "lambda_0" if heads else "lambda"
    assert schema.parse_shadow_lambda_column(schema.shadow_column(reading, key)) == reading


@pytest.mark.parametrize("column", ["calib_lambda_plus", "calib_shadow_paper_lambda_plus", "lambda_0",
                                    "calib_shadow_paper_lambda_raw", "calib_lambda_star_taylor", "shadow_paper_lambda"])
def test_other_columns_are_not_shadow_lambdas(column):
    assert schema.parse_shadow_lambda_column(column) is None


def test_file_names():
    assert [schema.diag_file(t) for t in schema.DIAG_TABLES] == ["diag_steps.csv", "diag_curves.csv",
                                                                 "diag_blocks.csv"]
    with pytest.raises(ValueError, match=r"diagnostics table 'step': choose one of \('steps', 'curves', 'blocks'\)"):
        schema.diag_file("step")
    assert schema.run_dir("job", "ce-0.5", 2).as_posix() == "job/runs/ce-0.5/seed2"
    assert schema.figure_data_file(schema.FIGURE_FILES["F1"]) == "F1_concave_curves_data.csv"
    assert set(schema.ETA_SWEEP_SERIES) < set(schema.ETA_SWEEP_COLUMNS)


def test_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "table.csv"
    assert atomic_write(path, lambda tmp: tmp.write_text("old\n")) == path

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["table.csv"]  # no temporary file left
    atomic_write(path, lambda tmp: tmp.write_text("new\n"))
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["table.csv"]
