"""Decide: pure steps from observations to weights and long-upload subsets (no I/O)."""
