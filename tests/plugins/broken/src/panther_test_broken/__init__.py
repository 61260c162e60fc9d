"""Test-only plugin that fails to import, as a plugin with a missing dependency would."""

raise ImportError("panther_test_broken is deliberately broken: libfoo.so not found")
