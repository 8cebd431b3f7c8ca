"""GEM reproduction harness: GEM and its references trained side by side on identical class-incremental
splits, tracked in MLflow and tuned with Optuna."""

__version__ = "0.1.0"
