"""Sketched layers (filled in by the layers work)."""
