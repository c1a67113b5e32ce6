"""Experiments that reproduce figures of the seed papers (scripts run with python -m)."""
