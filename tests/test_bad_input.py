"""The bad-input suite: every entry point, fed what a new user gets wrong, must answer with one line naming the
flag or file, a non-zero exit, no traceback, and leave every file saved before exactly as it was.

Each case is a row of a table (tests/badcases_*.py): the entry point, its arguments, what must be set up first,
and a pattern the one-line message must match. The runner builds a small world once per module (a dataset, a
trained checkpoint, a finished run folder), copies it into each case's own folder, hashes every file, runs the
entry point in this process (its `main(argv)`, as `python X.py` would), and compares.
"""
import hashlib
import os
import re
import shutil

import pytest

import badcases_bench
import badcases_data
import badcases_rl
import badcases_train
from badworld import ENTRIES, build_world

CASES = badcases_train.CASES + badcases_rl.CASES + badcases_data.CASES + badcases_bench.CASES


def file_hashes(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(str(tmp_path_factory.mktemp("world")))


def run_entry(entry, argv, capsys):
    """(exit status, stderr) of an entry point's main(argv); an exception that escapes is a traceback."""
    try:
        ENTRIES[entry]()(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    err = capsys.readouterr().err
    return code, err


def test_the_suite_is_large_and_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    assert len(CASES) >= 150, len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, world, tmp_path, monkeypatch, capsys):
    here = str(tmp_path / "w")
    shutil.copytree(world, here, symlinks=True)
    monkeypatch.chdir(here)
    if case.setup:
        case.setup(here)
    before = file_hashes(here)
    for target, stand_in in case.patch.items():
        monkeypatch.setattr(target, stand_in)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    argv = [a.format(w=here) for a in case.argv]
    code, err = run_entry(case.entry, argv, capsys)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert code != 0, f"exit 0 for {argv}; stderr: {err[-500:]}"
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(("error: ", "interrupted: ")), err[-1000:]
    assert re.search(case.expect, lines[0]), f"{lines[0]!r} does not match {case.expect!r}"
    assert len(lines[0]) <= 400, lines[0]
    after = file_hashes(here)
    changed = [p for p in before if before[p] != after.get(p)]
    assert not changed, f"changed or removed: {changed}"
    left = [p for p in after if p not in before and not (case.leaves and re.search(case.leaves, p))]
    assert not left, f"left behind: {left}"


@pytest.fixture(autouse=True)
def _release_held_locks():
    yield
    while badcases_train.HELD:
        badcases_train.HELD.pop().close()


@pytest.mark.parametrize("entry,argv,field", [("train", [], "--grad_clip"), ("rl", [], "--temperature"),
                                               ("bench", [], "--shape"), ("prepare", ["reasoning"], "--levels"),
                                               ("prepare", ["text"], "--val_fraction")])
def test_every_entry_point_answers_help_with_its_fields(entry, argv, field, capsys):
    try:
        ENTRIES[entry]()(argv + ["--help"])
    except SystemExit as e:
        assert not e.code
    out = capsys.readouterr().out
    assert field in out and "default" in out, out[:500]
