"""Bad-input cases: rl (see tests/test_bad_input.py)."""
from badworld import DATA, TINY, Case  # noqa: F401

CASES = [
]
