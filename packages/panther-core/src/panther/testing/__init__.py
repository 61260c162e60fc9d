"""Testing helpers: naive float64 references and the backend conformance suite."""

from panther.testing import naive
from panther.testing.conformance import TOLERANCES, assert_close_to_reference, make_conformance_suite

__all__ = ["naive", "make_conformance_suite", "assert_close_to_reference", "TOLERANCES"]
