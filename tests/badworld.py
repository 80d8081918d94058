"""The small world the bad-input suite (tests/test_bad_input.py) copies into every case's folder, and the row
type of its tables.

    data_tiny/          a tiny reasoning dataset (data/prepare.py's format)
    text_tiny/          a tiny plain-text dataset
    run/                a finished training run on data_tiny: ckpt.pt, metrics.jsonl, eval.json
    rl/                 a finished reason_rl.py run from run/ckpt.pt (two steps)
    empty/              an empty folder
    notes.txt           a plain file (where a folder is expected)

Paths in a case's argv may name `{w}`, the case's own copy of this world (also its working directory).
"""
import os
from dataclasses import dataclass, field

from data.prepare import prepare_reasoning, prepare_text
from data.tasks import TaskConfig

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "96", "--batch_size", "4",
        "--eval_iters", "2", "--eval_problems", "2", "--final_problems", "2", "--samples", "0",
        "--log_interval", "2", "--threads", "1", "--warmup_iters", "2", "--max_iters", "4"]
DATA = ["--dataset", "{w}/data_tiny"]


@dataclass
class Case:
    id: str
    entry: str              # train | rl | prepare | bench
    argv: list
    expect: str             # a regular expression the one-line message must match
    setup: object = None    # setup(world_dir): files to make or damage first
    patch: dict = field(default_factory=dict)  # "module.attr" -> a stand-in during the run (faults: Ctrl-C, disk)
    leaves: str = ""        # a pattern for new files the case may leave (a fault after the run began writing)
    env: dict = field(default_factory=dict)  # environment variables set during the run (e.g. a stray RANK)


def _train():
    import train
    return train.main


def _rl():
    import reason_rl
    return reason_rl.main


def _prepare():
    from data import prepare
    return prepare.main


def _bench():
    import bench
    return bench.main


ENTRIES = dict(train=_train, rl=_rl, prepare=_prepare, bench=_bench)


def build_world(root):
    import train
    prepare_reasoning(os.path.join(root, "data_tiny"),
                      TaskConfig(train_examples=400, val_examples=60, test_per_level=4), verbose=False)
    with open(os.path.join(root, "story.txt"), "w") as f:
        f.write("Once upon a time there was a small model that learned to add numbers.\n" * 60)
    prepare_text(os.path.join(root, "story.txt"), os.path.join(root, "text_tiny"), verbose=False)
    os.makedirs(os.path.join(root, "empty"))
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not a folder\n")
    cwd = os.getcwd()
    try:
        os.chdir(root)
        train.main(TINY + ["--dataset", os.path.join(root, "data_tiny"), "--out_dir", os.path.join(root, "run")])
        import reason_rl
        reason_rl.main(["--init_from", "run/ckpt.pt", "--out_dir", "rl", "--steps", "2", "--prompts_per_step", "2",
                        "--group_size", "2", "--eval_problems", "2", "--threads", "1", "--max_new_tokens", "24"])
    finally:
        os.chdir(cwd)
    return root


def raises(exc):
    """A stand-in for any function: it raises exc (e.g. KeyboardInterrupt for a Ctrl-C at that point)."""
    def stand_in(*args, **kwargs):
        raise exc
    return stand_in


def disk_full(obj, f, *args, **kwargs):
    """A stand-in for torch.save(obj, f) that writes part of the file, then finds the disk full."""
    f.write(b"half a checkpoint")
    raise OSError(28, "No space left on device")
