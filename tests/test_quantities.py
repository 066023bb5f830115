"""The decomposition's formulas: hand values, the argmax properties, and the derived-field table."""
import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtpdiag.diagnostics import ProbeRecord, quantities as q

finite = st.floats(-10.0, 10.0, allow_nan=False)
positive = st.floats(1e-3, 10.0)


def test_hand_values():
    assert q.cosine(3.0, 4.0, 9.0) == 0.5 and q.cosine(1.0, 0.0, 1.0) is None and q.cosine(1.0, 1.0, 0.0) is None
    assert q.curvature(-6.0, 3.0) == 2.0 and q.curvature(1.0, 0.0) is None
    assert q.taylor_coefficients(0.1, 2.0, 10.0, -40.0) == (q.taylor_a(0.1, 2.0, 10.0), q.taylor_b(0.1, -40.0))
    assert q.taylor_a(0.1, 2.0, 10.0) == pytest.approx(0.3) and q.taylor_b(0.1, -40.0) == pytest.approx(0.2)
    assert q.concave(-1e-300) is True and q.concave(0.0) is False
    assert q.lambda_star_taylor(0.3, 0.2) == pytest.approx(0.75) and q.lambda_star_taylor(0.3, 0.0) is None
    assert q.harm_threshold(0.75) == 1.5 and q.harm_threshold(None) is None
    assert q.best_gain(0.3, 0.2) == pytest.approx(0.1125) and q.best_gain(0.3, -1.0) is None
    assert q.taylor_delta(None, 0.2, 1.0) is None
    assert q.lambda_star_smooth(0.1, 2.0, None, 5.0, 4.0) == pytest.approx((2.0 - 0.5 * 2.0) / (0.5 * 4.0))
    assert q.lambda_star_smooth(0.1, 2.0, 3.0, 5.0, 4.0) == pytest.approx((3.0 - 0.5 * 2.0) / (0.5 * 4.0))
    assert q.lambda_star_smooth(0.1, 2.0, None, 0.0, 4.0) is None and q.lambda_star_smooth(0.1, 2.0, None, 1.0, 0.0) is None
    assert q.smooth_delta(0.1, 2.0, None, None, 4.0, 1.0) is None
    assert q.precond_a(0.3, -0.1) == pytest.approx(0.2) and q.precond_b(-0.8) == pytest.approx(0.4)


@settings(max_examples=50, deadline=None)
@given(a=finite, b=positive)
def test_lambda_star_maximises_the_taylor_quadratic_with_the_best_gain(a, b):
    lam = q.lambda_star_taylor(a, b)
    assert q.taylor_delta(a, b, lam) == pytest.approx(q.best_gain(a, b), rel=1e-12, abs=1e-15)
    for step in (1e-3, 1.0):
        assert q.taylor_delta(a, b, lam + step) < q.taylor_delta(a, b, lam) + 1e-15
    assert q.taylor_delta(a, b, q.harm_threshold(lam)) == pytest.approx(0.0, abs=1e-12 * (1 + abs(a * lam)))


@settings(max_examples=50, deadline=None)
@given(lr=st.floats(0.1, 1.0), c=finite, c_eval=finite, L=st.floats(0.1, 10.0), v2=st.floats(0.1, 10.0))
def test_lambda_star_smooth_maximises_the_smooth_expression(lr, c, c_eval, L, v2):
    lam = q.lambda_star_smooth(lr, c, c_eval, L, v2)
    step = 0.1 * max(1.0, abs(lam))
    below, top, above = q.smooth_delta(lr, c, c_eval, L, v2, np.array([lam - step, lam, lam + step]))
    assert below < top and above < top
    assert q.smooth_delta(lr, c, c_eval, L, v2, 0.0) == 0.0


def test_derive_fills_every_field_and_propagates_what_was_not_measured():
    full = q.derive({"lr": 0.1, "c": 2.0, "g2": 4.0, "v2": 9.0, "c_e": 2.0, "h_gm": 10.0, "h_mm": -40.0, "h_gg": -8.0, "L": 5.0})
    assert list(full) == [quantity.field for quantity in q.QUANTITIES]
    assert full["cos"] == pytest.approx(2.0 / 6.0) and full["kappa_m"] == pytest.approx(40.0 / 9.0)
    assert full["kappa_g"] == 2.0 and full["concave"] is True
    assert full["lambda_star_taylor"] == pytest.approx(0.75) and full["harm_threshold"] == pytest.approx(1.5)
    assert full["lambda_star_smooth"] == pytest.approx((2.0 - 0.5 * 2.0) / (0.5 * 9.0))
    assert all(full[k] is None for k in ("a_precond", "b_precond", "lambda_star_precond"))  # not an Adam step
    adam = q.derive({"lr": 0.1, "c": 2.0, "g2": 4.0, "v2": 9.0, "c_e": 2.0, "c_eq": 0.3, "h_uq": -0.1, "h_qq": -0.8})
    assert adam["lambda_star_precond"] == pytest.approx(0.2 / (2 * 0.4))
    gradients_only = q.derive({"lr": 0.1, "c": 2.0, "g2": 4.0, "v2": 9.0, "c_e": 2.0})
    assert gradients_only["cos"] == full["cos"]
    assert all(gradients_only[k] is None for k in gradients_only if k != "cos")
    with pytest.raises(ValueError, match="add them there first"):
        q.derive({"lr": 0.1, "h_mgm": 1.0})


def test_every_quantity_is_a_record_field_and_reads_only_what_exists_before_it():
    """The extension rule: a quantity is one formula with its line in QUANTITIES and one ProbeRecord field."""
    fields = {f.name for f in dataclasses.fields(ProbeRecord)}
    available = set(q.MEASURED)
    for quantity in q.QUANTITIES:
        assert quantity.field in fields, f"add {quantity.field}: float | None = None to ProbeRecord"
        assert set(quantity.inputs) <= available, quantity
        assert callable(quantity.formula) and len(quantity.inputs) == quantity.formula.__code__.co_argcount
        available.add(quantity.field)
    assert len({quantity.field for quantity in q.QUANTITIES}) == len(q.QUANTITIES)
    assert math.isclose(q.derive({"lr": 1.0, "c": 1.0, "g2": 1.0, "v2": 1.0, "c_e": 1.0})["cos"], 1.0)
