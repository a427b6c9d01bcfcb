"""Training: python -m training.fit (see issue 3)."""
