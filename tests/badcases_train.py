"""Bad-input cases: train (see tests/test_bad_input.py)."""
from badworld import DATA, TINY, Case  # noqa: F401

CASES = [
]
CASES += [
    Case("train-grad-clip-negative", "train", TINY + DATA + ["--grad_clip", "-1", "--out_dir", "new"],
         r"--grad_clip must be >= 0"),
    Case("train-min-lr-nan", "train", TINY + DATA + ["--min_lr", "nan", "--out_dir", "new"], r"--min_lr .*finite"),
    Case("train-existing-run", "train", TINY + DATA + ["--out_dir", "run"], r"run/ckpt.pt already holds a run"),
]
