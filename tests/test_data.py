"""data/tasks.py, data/loader.py, data/prepare.py: the reasoning corpus is checkable, split without overlap,
deterministic; batches mask prompts and resume exactly; prepare writes what the trainer reads."""
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest

from config import parse_config
from data import prepare
from data.loader import Batches, DataError, check_meta, load_meta, open_dataset, open_tokens, prompt_mask
from data.prepare import prepare_reasoning, prepare_text
from data.tasks import (LEVELS, STYLES, TaskConfig, answer_text, check_answer, extract_answer, make_examples,
                        prompt_text, sample_problems, split_of, style_of, held_out_problems, subtraction_task)
from data.tokenizer import byte_tokenizer, load_tokenizer


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_every_style_ends_in_the_right_checkable_answer(level):
    rng = random.Random(level)
    for ops in sample_problems(level, "train", 50, rng):
        for style in STYLES:
            text = answer_text(ops, style)
            assert style_of(text) == style
            assert extract_answer(text) == sum(ops)
            assert check_answer(text, ops)
            assert not check_answer(text.replace(f"answer: {sum(ops)}", f"answer: {sum(ops) + 1}"), ops)


def test_minimal_working_is_column_by_column_least_significant_first():
    assert answer_text((47, 85), "minimal") == "[minimal]\n7+5+0=12|2 c1\n4+8+1=13|32 c1\nanswer: 132"
    assert answer_text((47, 85), "minimal", lsd_first=False) == \
        "[minimal]\n4+8+1=13|3 c1\n7+5+0=12|32 c1\nanswer: 132"
    assert answer_text((9, 9), "direct") == "[direct]\n9+9=18\nanswer: 18"


def test_verbose_is_the_minimal_working_plus_padding():
    for ops in [(47, 85), (123, 45, 999), (3, 5)]:
        minimal = answer_text(ops, "minimal").splitlines()[1:-1]
        verbose = answer_text(ops, "verbose").splitlines()
        assert verbose[1:1 + len(minimal)] == minimal


def test_three_operand_columns_keep_a_running_sum():
    # a column of three digits is summed two at a time, each step a two-operand sum the model already knows
    assert answer_text((47, 85, 33), "minimal") == \
        "[minimal]\n7+5=12+3=15+0=15|5 c1\n4+8=12+3=15+1=16|65 c1\nanswer: 165"


def test_verbose_costs_far_more_tokens_than_minimal_working():
    # what a model generates after a forced tag (byte tokens: one per character, plus the end token)
    rng = random.Random(0)
    generated = lambda o, style: len(answer_text(o, style).split("\n", 1)[1]) + 1
    for level in LEVELS:
        ops = sample_problems(level, "train", 50, rng)
        minimal = sum(generated(o, "minimal") for o in ops)
        verbose = sum(generated(o, "verbose") for o in ops)
        assert verbose >= 1.9 * minimal  # the foundation issue asks for 1.8x


def test_levels_are_ordered_by_the_working_they_need():
    """Level k+1's minimal working is longer than level k's on average (and level 1 needs none: its direct answer is
    a restatement), so a policy that spends only the tokens a problem needs is short on easy levels, long on hard."""
    rng = random.Random(1)
    mean = lambda level, style: sum(len(answer_text(o, style)) for o in sample_problems(level, "train", 300, rng)) / 300
    minimal = [mean(level, "minimal") for level in sorted(LEVELS)]
    assert minimal == sorted(minimal) and len(set(minimal)) == len(minimal)
    assert mean(1, "direct") < minimal[0]


def test_extract_answer_takes_the_last_answer_and_none_without_one():
    assert extract_answer("answer: 3\nanswer: 12") == 12
    assert extract_answer("7+5=12") is None
    assert style_of("[fancy]\nanswer: 1") is None


def test_splits_never_overlap_and_are_stable():
    cfg = TaskConfig()
    ops = lambda prompt: tuple(sorted(map(int, prompt.strip().split("+"))))  # a+b and b+a are one problem
    train = {ops(p) for p, _ in make_examples(cfg, "train", 3000)}
    val = {ops(p) for p, _ in make_examples(cfg, "val", 500)}
    test = {ops(prompt_text(p)) for level in LEVELS for p in held_out_problems(cfg, level)}
    assert not (train & val) and not (train & test) and not (val & test)
    assert split_of((47, 85)) == split_of((47, 85))
    assert all(split_of(p) == "test" for p in held_out_problems(cfg, 2))


def test_distinct_sampling_stops_when_the_split_runs_out():
    assert len(sample_problems(1, "test", 500, random.Random(0), distinct=True)) < 0.4 * 550
    assert len(sample_problems(2, "test", 4000, random.Random(0), distinct=True)) < 4000  # 90*90 pairs, 30% test


def test_level_one_is_every_held_out_carry_free_single_digit_addition():
    probs = held_out_problems(TaskConfig(), 1)
    assert len(probs) == len(set(probs)) >= 120  # about 30% of 550
    assert all(a < 100 and b < 10 and a % 10 + b < 10 for a, b in probs)
    assert any(a < 10 for a, _ in probs)  # the single-digit sums are among them
    # every digit fact a held-out problem needs is answered in the direct style by some training problem (13+5 for
    # a held-out 3+5): with single-digit sums alone, the held-out pairs would never be seen answered at a glance
    train = sample_problems(1, "train", 10_000, random.Random(0), distinct=True)
    facts = {(a % 10, b) for a, b in train}
    assert all((a % 10, b) in facts for a, b in probs)


def test_corpus_is_deterministic_and_the_style_mix_is_respected():
    cfg = TaskConfig(style_mix=(0.0, 0.2, 0.8))
    a, b = make_examples(cfg, "train", 2000), make_examples(cfg, "train", 2000)
    assert a == b
    styles = [style_of(ans) for _, ans in a]
    assert styles.count("direct") == 0
    assert 0.75 < styles.count("verbose") / len(styles) < 0.85


def test_style_mix_per_level_and_the_default_leans_verbose_at_every_level():
    cfg = TaskConfig(levels=(1, 4), level_weights=(1, 1), style_mix=(1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    for prompt, ans in make_examples(cfg, "train", 300):
        a, b = map(int, prompt.split("+"))
        assert style_of(ans) == ("direct" if b < 10 else "verbose")  # level 1 adds one digit, level 4 three+
    by_level = {}
    for prompt, ans in make_examples(TaskConfig(), "train", 4000):
        by_level.setdefault(int(prompt.split("+")[1]) < 10, []).append(style_of(ans))
    for styles in by_level.values():  # level 1 (second operand one digit) and the rest: verbose is the commonest
        assert max(STYLES, key=styles.count) == "verbose"
    assert by_level[True].count("direct") > 2 * by_level[False].count("direct") * len(by_level[True]) / len(
        by_level[False])  # the default draws direct answers mostly where they are learnable


def test_task_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="style_mix"):
        TaskConfig(style_mix=(1.0, 0.0))
    with pytest.raises(ValueError, match="3 per level"):
        TaskConfig(levels=(1, 2), level_weights=(1, 1), style_mix=(1.0, 0.0, 0.0, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="levels"):
        TaskConfig(levels=(1, 9), level_weights=(1, 1))


# ----------------------------------------------------------------------------- loader

def doc_stream():
    tok = byte_tokenizer()
    ids = []
    for p, a in [("12+3\n", "[direct]\nanswer: 15"), ("4+4\n", "[minimal]\n4+4+0=08|8\nanswer: 8")] * 20:
        ids += [tok.bos_id] + tok.encode(p + a) + [tok.eos_id]
    return tok, np.array(ids, dtype=np.uint16)


def test_prompt_mask_covers_bos_through_the_question_line():
    tok, ids = doc_stream()
    mask = prompt_mask(ids, tok.bos_id, ord("\n"))
    first = tok.decode([int(t) for t, m in zip(ids[:40], mask[:40]) if m])
    assert first.startswith("<|bos|>12+3\n<|bos|>4+4\n")


def test_doc_aligned_rows_start_at_bos_and_mask_prompt_targets():
    tok, ids = doc_stream()
    b = Batches(ids, 16, 8, seed=0, doc_aligned=True, bos_id=tok.bos_id, prompt_end_id=ord("\n"))
    x, y, pos = b.next()
    assert (x[:, 0] == tok.bos_id).all()
    assert (pos[x == tok.bos_id] == 0).all() and (pos[:, 1] == 1).all()
    for row_x, row_y in zip(x, y):
        text = tok.decode(row_x.tolist())
        n_prompt = text.index("\n") + 1 - len("<|bos|>") + 1  # bos + question + newline, in tokens
        assert (row_y[:n_prompt - 1] == -1).all() and row_y[n_prompt - 1] != -1
        kept = row_y[row_y >= 0]
        assert torch_equal_positions(row_x, row_y)
        assert len(kept) > 0


def torch_equal_positions(x, y):
    """Unmasked targets are the next input token."""
    ok = y[:-1] >= 0
    return bool((y[:-1][ok] == x[1:][ok]).all())


def test_loader_state_restores_the_same_batches():
    tok, ids = doc_stream()
    mk = lambda: Batches(ids, 16, 4, seed=5, doc_aligned=True, bos_id=tok.bos_id, prompt_end_id=ord("\n"))
    a = mk()
    for _ in range(3):
        a.next()
    state = a.state_dict()
    want = [a.next() for _ in range(3)]
    b = mk()
    b.load_state_dict(state)
    for (x1, y1, _), (x2, y2, _) in zip(want, [b.next() for _ in range(3)]):
        assert (x1 == x2).all() and (y1 == y2).all()


def test_two_ranks_see_exactly_the_batches_of_one_process_with_double_accumulation():
    ids = np.arange(1000, dtype=np.uint16)
    one = Batches(ids, 8, 3, seed=1)
    r0, r1 = Batches(ids, 8, 3, seed=1, rank=0, world_size=2), Batches(ids, 8, 3, seed=1, rank=1, world_size=2)
    single = [one.next()[0] for _ in range(6)]
    pairs = [(r0.next()[0], r1.next()[0]) for _ in range(3)]
    for i, (a, b) in enumerate(pairs):
        assert (single[2 * i] == a).all() and (single[2 * i + 1] == b).all()


def test_too_small_data_is_a_clear_error():
    with pytest.raises(DataError, match="lower --block_size"):
        Batches(np.arange(10, dtype=np.uint16), 16, 2, seed=0, name="val.bin")


# ----------------------------------------------------------------------------- prepare

def test_prepare_reasoning_writes_what_the_trainer_reads(tmp_path):
    cfg = TaskConfig(train_examples=300, val_examples=50)
    meta = prepare_reasoning(str(tmp_path), cfg, verbose=False)
    assert load_meta(str(tmp_path)) == json.loads((tmp_path / "meta.json").read_text()) == json.loads(json.dumps(meta))
    assert meta["kind"] == "reasoning" and meta["dtype"] == "uint16"
    tok = load_tokenizer(meta["tokenizer"], str(tmp_path))
    train = open_tokens(str(tmp_path), "train", meta)
    assert len(train) == meta["train_tokens"]
    assert int((np.asarray(train) == tok.bos_id).sum()) == 300
    first = tok.decode(train[:80].tolist())
    assert first.startswith("<|bos|>") and "\n[" in first


def test_prepare_text_with_trained_bpe_round_trips(tmp_path):
    src = tmp_path / "in.txt"
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    src.write_text(" ".join(rng.choice(words) for _ in range(3000)) + "\n")
    meta = prepare_text(str(src), str(tmp_path / "ds"), tokenizer="bpe", vocab_size=300, verbose=False)
    tok = load_tokenizer(meta["tokenizer"], str(tmp_path / "ds"))
    train, val = (open_tokens(str(tmp_path / "ds"), s, meta) for s in ("train", "val"))
    text = src.read_text()
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == text
    assert meta["train_tokens"] < len(text) * 0.9 * 0.5  # merges learned: well under one token per byte


def test_prepare_text_rejects_an_empty_file_and_keeps_the_old_dataset(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("hello world\n" * 50)
    prepare_text(str(good), str(tmp_path / "ds"), verbose=False)
    before = (tmp_path / "ds" / "train.bin").read_bytes()
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(ValueError, match="empty"):
        prepare_text(str(empty), str(tmp_path / "ds"))
    assert (tmp_path / "ds" / "train.bin").read_bytes() == before


# ----------------------------------------------------------------------------- checked when opened

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny") / "ds")
    prepare_reasoning(d, TaskConfig(train_examples=200, val_examples=40, test_per_level=2), verbose=False)
    return d


def copy_of(tiny, tmp_path, **meta_changes):
    d = str(tmp_path / "copy")
    shutil.copytree(tiny, d)
    meta = json.load(open(os.path.join(d, "meta.json")))
    meta.update(meta_changes)
    for key in [k for k, v in meta_changes.items() if v is DROP]:
        del meta[key]
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f)
    return d


DROP = object()


def test_a_dataset_older_versions_wrote_still_opens(tiny, tmp_path):
    # before counts, prompt_end_id, format_version and settings were recorded
    d = copy_of(tiny, tmp_path, train_tokens=DROP, val_tokens=DROP, prompt_end_id=DROP, format_version=DROP,
                settings=DROP, built_as_default=DROP)
    data = open_dataset(d, build_default=False)
    assert data.task == TaskConfig(train_examples=200, val_examples=40, test_per_level=2)
    assert len(data.tokens("train")) == load_meta(tiny)["train_tokens"]


def test_a_train_bin_cut_short_is_refused_with_both_counts(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    n = load_meta(d)["train_tokens"]
    with open(os.path.join(d, "train.bin"), "r+b") as f:
        f.truncate(2 * (n - 5))
    with pytest.raises(DataError, match=f"train.bin holds {n - 5} tokens, meta.json says {n}: re-run"):
        open_dataset(d, build_default=False)


def test_ids_outside_the_vocabulary_are_found_by_the_sample(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    ids = np.fromfile(os.path.join(d, "val.bin"), dtype=np.uint16)
    ids[len(ids) // 2] = 259  # linspace hits the middle of the file
    ids.tofile(os.path.join(d, "val.bin"))
    with pytest.raises(DataError, match="val.bin holds token id 259 at position"):
        open_dataset(d, build_default=False)


@pytest.mark.parametrize("changes, words", [
    (dict(dtype="uint32"), None),  # wider than needed is fine (bins must then match it: checked by size)
    (dict(vocab_size=2 ** 16 + 1), "too narrow"),
    (dict(kind="reasoning", task=DROP), "no valid task"),
    (dict(prompt_end_id=-1), "prompt_end_id -1"),
    (dict(train_tokens="12"), "train_tokens '12'"),
])
def test_meta_entries_are_held_to_the_schema(tiny, tmp_path, changes, words):
    d = copy_of(tiny, tmp_path, **changes)
    if words is None:
        check_meta(load_meta(tiny) | {"dtype": "uint32"}, d)
        return
    with pytest.raises(DataError, match=words):
        load_meta(d)


# ----------------------------------------------------------------------------- written as a whole

def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def files_of(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def test_a_failure_mid_write_leaves_the_old_dataset_and_no_temporary(tiny, tmp_path, monkeypatch):
    d = copy_of(tiny, tmp_path)
    before = files_of(d)
    real = prepare.atomic_write

    def fail_at_meta(path, *a, **k):
        if path.endswith("meta.json"):
            raise OSError("disk full")
        return real(path, *a, **k)
    monkeypatch.setattr(prepare, "atomic_write", fail_at_meta)
    with pytest.raises(OSError, match="disk full"):
        prepare_reasoning(d, TaskConfig(train_examples=50, val_examples=10), verbose=False, overwrite=True)
    assert files_of(d) == before
    assert sorted(os.listdir(tmp_path)) == ["copy"]


def test_a_rebuild_swaps_the_whole_folder_and_clears_dead_temporaries(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    stale = tmp_path / f".copy.tmp-{dead_pid()}"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"half")
    (tmp_path / "copy" / "val.bin").write_bytes(b"\0\0")  # damaged: the same settings rebuild it
    prepare_reasoning(d, TaskConfig(train_examples=200, val_examples=40, test_per_level=2), verbose=False)
    assert files_of(d) == files_of(tiny) | {"meta.json": files_of(d)["meta.json"]}
    assert sorted(os.listdir(tmp_path)) == ["copy"]
    open_dataset(d, build_default=False)


def test_a_dataset_set_aside_by_a_killed_swap_is_put_back(tiny, tmp_path):
    aside = tmp_path / f".copy.old-{dead_pid()}"
    shutil.copytree(tiny, aside)
    (tmp_path / f".copy.tmp-{aside.name.split('-')[-1]}").mkdir()  # the new one, perhaps incomplete
    prepare.recover(str(tmp_path / "copy"))
    assert sorted(os.listdir(tmp_path)) == ["copy"]
    assert files_of(str(tmp_path / "copy")) == files_of(tiny)


def test_a_dataset_set_aside_by_a_killed_swap_opens_as_it_was(tiny, tmp_path):
    aside = tmp_path / f".copy.old-{dead_pid()}"
    shutil.copytree(tiny, aside)
    half = tmp_path / f".copy.tmp-{dead_pid()}"
    half.mkdir()
    data = open_dataset(str(tmp_path / "copy"), build_default=False)  # no prepare run in between
    assert data.meta == load_meta(tiny) and sorted(os.listdir(tmp_path)) == [half.name, "copy"]  # (a reader
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # leaves half-built ones)
    try:
        live = tmp_path / f".live.old-{writer.pid}"  # a writer still at work: left to it
        shutil.copytree(tiny, live)
        with pytest.raises(DataError):
            open_dataset(str(tmp_path / "live"), build_default=False)
        assert live.exists()
    finally:
        writer.kill()
        writer.wait()


def test_other_settings_need_overwrite_and_a_foreign_folder_is_never_replaced(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    before = files_of(d)
    other = TaskConfig(levels=(1, 2), level_weights=(0.5, 0.5), train_examples=50, val_examples=10)
    with pytest.raises(DataError, match=r"other settings \(levels: \[1, 2, 3, 4\] -> \[1, 2\]; level_weights"):
        prepare_reasoning(d, other, verbose=False)
    assert files_of(d) == before
    prepare_reasoning(d, other, verbose=False, overwrite=True)
    assert load_meta(d)["task"]["levels"] == [1, 2]
    (tmp_path / "copy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds files that are not a dataset's \(notes.txt\)"):
        prepare_reasoning(d, other, verbose=False, overwrite=True)
    assert (tmp_path / "copy" / "notes.txt").read_text() == "mine"


def test_a_legacy_meta_without_settings_compares_by_what_it_recorded(tiny, tmp_path):
    d = copy_of(tiny, tmp_path, settings=DROP)
    prepare_reasoning(d, TaskConfig(train_examples=200, val_examples=40, test_per_level=2), verbose=False)
    with pytest.raises(DataError, match=r"other settings \(train_examples: 200 -> 100"):
        prepare_reasoning(d, TaskConfig(train_examples=100, val_examples=40, test_per_level=2), verbose=False)


def test_a_custom_corpus_in_the_default_place_is_refused_not_regenerated(tmp_path):
    d = str(tmp_path / "reasoning")
    prepare.main(["reasoning", "--levels", "1,2", "--level_weights", "0.5,0.5", "--train_examples", "60",
                  "--val_examples", "10", "--out", d])
    before = files_of(d)
    with pytest.raises(DataError, match="other settings than the default corpus"):
        prepare.ensure_default_corpus(d)
    assert files_of(d) == before


def test_only_an_older_default_corpus_is_rebuilt(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(prepare, "prepare_reasoning", lambda *a, **k: calls.append(k))
    d = copy_of(tiny, tmp_path, built_as_default=True, format_version=1)
    prepare.ensure_default_corpus(d)
    assert calls == [dict(default=True, overwrite=True)]


def test_the_default_corpus_made_by_hand_in_its_place_stays_rebuildable(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(prepare, "prepare_reasoning", lambda out, cfg, **k: calls.append(k["default"]))
    monkeypatch.setattr(prepare, "dataset_dir", lambda name: str(tmp_path / name))
    prepare.main(["reasoning", "--out", str(tmp_path / "reasoning")])
    prepare.main(["reasoning", "--out", str(tmp_path / "reasoning"), "--seed", "1"])
    prepare.main(["reasoning", "--out", str(tmp_path / "elsewhere")])
    assert calls == [True, False, False]


# ----------------------------------------------------------------------------- text input and flags

@pytest.mark.parametrize("data, words", [
    (b"abc\0def", "NUL byte at byte offset 3"),
    ("naïve".encode("utf-8")[:3] + b"x", r"not UTF-8 text \(byte 0xc3 at byte offset 2\)"),
    (b"", "is empty"),
])
def test_prepare_text_refuses_what_is_not_utf8_text(tmp_path, data, words):
    src = tmp_path / "in.txt"
    src.write_bytes(data)
    with pytest.raises(DataError, match=words):
        prepare_text(str(src), str(tmp_path / "ds"), verbose=False)
    assert not (tmp_path / "ds").exists()


def test_the_flag_classes_default_to_the_task_configs():
    assert prepare.ReasoningFlags().task() == TaskConfig()
    assert prepare.SubtractionFlags().task() == subtraction_task()
    assert [f.name for f in fields(prepare.SubtractionFlags)] == [f.name for f in fields(prepare.ReasoningFlags)]


def test_prepare_flags_come_from_toml_and_help_lists_modes_and_fields(tmp_path, capsys):
    toml = tmp_path / "p.toml"
    toml.write_text("levels = [1, 2]\nlevel_weights = [1, 3]\ntrain_examples = 40\n")
    cfg, _ = parse_config(prepare.ReasoningFlags, ["--config", str(toml), "--val_examples", "9"])
    assert cfg.task() == TaskConfig(levels=(1, 2), level_weights=(1.0, 3.0), train_examples=40, val_examples=9)
    prepare.main(["--help"])
    out = capsys.readouterr().out
    assert all(m in out for m in ("reasoning", "subtraction", "text"))
    prepare.main(["text", "--help"])
    out = capsys.readouterr().out
    assert all(f"--{f}" in out for f in ("input", "out", "tokenizer", "vocab_size", "val_fraction", "overwrite"))
