"""Evaluations beyond validation loss (long-context gates: needle in a haystack)."""
