"""The shared conformance suite of panther-core, run against the plugin backend ``reference64``."""

import torch

from panther.testing import make_conformance_suite

TestReference64Conformance = make_conformance_suite(
    "reference64", dtypes=(torch.float64, torch.float32), device="cpu", max_dim=64, max_examples=10
)
