"""Load tests: python -m loadtests (see issue 6)."""
