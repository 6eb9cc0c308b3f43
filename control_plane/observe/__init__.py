"""Observe: what the engines' metrics and the Envoys' try logs say (scrapes, parsing, tracking)."""
