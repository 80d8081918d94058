"""data/tasks.py, data/loader.py, data/prepare.py: the reasoning corpus is checkable, split without overlap,
deterministic; batches mask prompts and resume exactly; prepare writes what the trainer reads."""
import json
import random

import numpy as np
import pytest

from data.loader import Batches, DataError, load_meta, open_tokens, prompt_mask
from data.prepare import prepare_reasoning, prepare_text
from data.tasks import (LEVELS, STYLES, TaskConfig, answer_text, check_answer, extract_answer, make_examples,
                        prompt_text, sample_problems, split_of, style_of, held_out_problems)
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
