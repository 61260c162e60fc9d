"""The docstring examples run (as Sphinx's doctest builder runs them) and the API page documents every layer."""

import doctest
import re
from pathlib import Path

import pytest
import torch

import panther.nn
from panther.nn import attention, conv, conversion, linear

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", [linear, conv, attention, conversion], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(module, module.__name__) if t.examples]
    assert tests, f"{module.__name__} has no examples"
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0 and result.attempted >= 5


def test_every_public_layer_has_a_documented_example():
    for name in panther.nn.__all__:
        obj = getattr(panther.nn, name)
        doc = obj.__doc__
        if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):  # conversion functions and reports
            assert "Args:" in doc or "Attributes:" in doc, name
            continue
        assert "Args:" in doc and "Shape:" in doc, name
        if name != "SKLinear_triton":  # needs the triton backend to construct
            assert "Examples:\n" in doc and ">>> " in doc and "Attributes:" in doc, name


def test_api_page_autodocs_every_layer():
    page = (ROOT / "docs" / "api" / "nn.rst").read_text(encoding="utf-8")
    assert ".. automodule:: panther.nn" in page
    documented = re.findall(r"^\.\. auto(?:class|function):: (\w+)", page, flags=re.M)
    assert sorted(documented) == sorted(panther.nn.__all__)
