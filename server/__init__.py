"""Serving: python -m server (see issues 4 and 5)."""
