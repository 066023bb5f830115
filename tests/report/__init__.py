"""Tests of mtpdiag.report, one module per report module. A package, so that the
real micro job of conftest.py is trained once for all of them (package scope)."""
