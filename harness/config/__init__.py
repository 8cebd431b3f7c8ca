"""Experiment files: loading, includes, overrides and validation."""
