"""Testing helpers: naive float64 references and the backend conformance suite (one row per op)."""

from panther.testing import naive
from panther.testing.conformance import (
    SPECS,
    TOLERANCES,
    Case,
    Limits,
    NamedCase,
    OpSpec,
    Tolerance,
    assert_close_to_reference,
    check_case,
    make_conformance_suite,
    register_spec,
)
from panther.testing import specs  # noqa: E402,F401  (registers the rows of the built-in ops)

__all__ = [
    "naive", "make_conformance_suite", "assert_close_to_reference", "TOLERANCES", "SPECS", "OpSpec", "Case",
    "NamedCase", "Limits", "Tolerance", "check_case", "register_spec",
]
