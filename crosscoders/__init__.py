"""Sparse crosscoders over several activation sources (snapshots, layers, models)."""
