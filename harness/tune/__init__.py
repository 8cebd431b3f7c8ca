"""Optuna search over an arm's recipe, every trial recorded in MLflow."""
