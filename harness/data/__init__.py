"""Datasets, class-incremental splits and on-device augmentation."""
