"""Synthetic verifiable reasoning tasks: multi-digit addition at four levels of difficulty, in three answer styles;
and subtraction (levels 5 and 6, worked by adding the nines' complement), the fine-tuning task that pre-training
never shows (data/prepare.py subtraction).

Ideas it rests on:
- Every problem has one checkable final answer, written on the last line as `answer: N`; `extract_answer` reads it.
- Three answer styles for the same problem, chosen by a tag that opens the answer (`[direct]`, `[minimal]`,
  `[verbose]`): the problem restated with its result and nothing else; the column-by-column working a small model
  needs (least-significant digit first, each line carrying the partial result and its carry out, so every step is
  a local copy; a column of three digits keeps a running sum, `7+5=12+3=15+0=15`, because a 4-layer model learns
  two-operand digit sums far sooner than three-operand ones); and that same working, line for line, followed by
  a re-check of every column and a restatement of the result (about 2.1x the tokens). Training draws the style
  from a mix that leans verbose, so a trained model spends too many tokens by default; putting the tag in the
  prompt forces a style at evaluation time.
- Train, validation and test problems never overlap: a problem's split is a stable hash of its sorted operands
  (so a+b and b+a always fall in the same split).

Example (level 2, minimal style; the prompt is the first line):

    47+85
    [minimal]
    7+5+0=12|2 c1
    4+8+1=13|32 c1
    answer: 132
"""
import functools
import hashlib
import itertools
import random
import re
from dataclasses import dataclass

STYLES = ("direct", "minimal", "verbose")
FORMAT_VERSION = 6  # bump when the text of problems or answers changes: the built-in corpus is then rebuilt

# level -> (number of operands, (min digits, max digits) per operand); level 1 is enumerated (_all_problems)
LEVELS = {
    1: (2, (1, 2)),   # a single digit added to a number below 100 with no carry (3+5, 43+5): at a glance
    2: (2, (2, 2)),
    3: (3, (2, 2)),   # multi-operand: two columns of three digits each
    4: (2, (3, 4)),   # the longest working: three to four columns
}
# the fine-tuning task (python data/prepare.py subtraction): a - b with a >= b, both operands of these digits,
# worked as a + (nines' complement of b) + 1; a problem is the operand tuple (a, -b), so its answer is still
# sum(operands) and `answer: N` checks it
SUB_LEVELS = {
    5: (2, 2),
    6: (3, 3),
}
# style weights (direct, minimal, verbose) per level when TaskConfig.style_mix is empty: verbose is the most
# common style everywhere (an untagged prompt gets it); level 1's direct answers are short and learnable, and the
# 7.5% of examples they were under one mix of (0.3, 0.25, 0.45) taught them too late (81% at 700 steps); direct
# answers to levels 2-4 are beyond this model without working, so fewer of them leave room for the working
DEFAULT_MIX = {1: (0.45, 0.05, 0.5), None: (0.15, 0.35, 0.5)}
SPLITS = {"test": (0, 30), "val": (30, 35), "train": (35, 100)}  # hash buckets out of 100
_ANSWER_RE = re.compile(r"answer: (-?\d+)")


def subtraction_task(**overrides):
    """The fine-tuning task's settings: subtraction only (levels 5 and 6), minimal working only (a new operation
    and a new tag the pre-trained model has never seen), a smaller corpus than pre-training's."""
    return TaskConfig(**{**dict(levels=(5, 6), level_weights=(0.4, 0.6), style_mix=(0.0, 1.0, 0.0),
                                train_examples=30_000, val_examples=1_000, test_per_level=200), **overrides})


@dataclass
class TaskConfig:
    """How the reasoning corpus is generated (stored in meta.json so evaluation regenerates the same tests)."""
    levels: tuple = (1, 2, 3, 4)
    level_weights: tuple = (0.25, 0.15, 0.3, 0.3)  # level 1 is cheap in tokens and needs many direct examples
    # direct, minimal, verbose: one triple for every level, one per level in the order of `levels`, or empty for
    # DEFAULT_MIX (leans verbose at every level; direct answers drawn mostly where a small model can learn them)
    style_mix: tuple = ()
    lsd_first: bool = True                        # working from the least-significant column (False: from the left)
    train_examples: int = 60_000
    val_examples: int = 2_000
    test_per_level: int = 200
    seed: int = 1337

    def __post_init__(self):
        if any(level not in LEVELS and level not in SUB_LEVELS for level in self.levels):
            raise ValueError(f"levels {self.levels} must be among {sorted(LEVELS)} (addition) or "
                             f"{sorted(SUB_LEVELS)} (subtraction)")
        if len(self.level_weights) != len(self.levels) or min(self.level_weights) < 0:
            raise ValueError("level_weights needs one non-negative weight per level")
        k = len(STYLES)
        if len(self.style_mix) not in (0, k, k * len(self.levels)) or min(self.style_mix, default=0) < 0 or \
                any(sum(self.mix_of(level)) <= 0 for level in self.levels):
            raise ValueError(f"style_mix needs {k} non-negative weights ({', '.join(STYLES)}), or {k} per level "
                             f"({k * len(self.levels)} for levels {','.join(map(str, self.levels))}), none all zero")
        if self.train_examples < 1 or self.val_examples < 1 or self.test_per_level < 1:
            raise ValueError("train_examples, val_examples and test_per_level must be positive")

    def mix_of(self, level):
        """The style weights (direct, minimal, verbose) that training examples of `level` are drawn with."""
        k = len(STYLES)
        if not self.style_mix:
            return DEFAULT_MIX.get(level, DEFAULT_MIX[None])
        if len(self.style_mix) == k:
            return tuple(self.style_mix)
        i = self.levels.index(level)
        return tuple(self.style_mix[k * i:k * (i + 1)])


def split_of(operands):
    """Which split a problem belongs to: a stable hash of its operands, the same on every machine."""
    key = "+".join(map(str, sorted(operands))).encode()  # a+b and b+a share a split: no leak by commuting
    bucket = int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little") % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def _draw_operands(level, rng):
    if level in SUB_LEVELS:
        dmin, dmax = SUB_LEVELS[level]
        a, b = (rng.randint(10 ** (d - 1), 10 ** d - 1) for d in (rng.randint(dmin, dmax) for _ in range(2)))
        return (max(a, b), -min(a, b))
    n_ops, (dmin, dmax) = LEVELS[level]
    ops = []
    for _ in range(n_ops):
        d = rng.randint(dmin, dmax)
        ops.append(rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1))
    return tuple(ops)


def _all_problems(level):
    """The whole problem space when it is small enough to enumerate (level 1), else None."""
    if level in SUB_LEVELS:
        return None
    if level == 1:  # 550 problems, the 100 single-digit sums among them: every digit fact a+b < 10 shows up in
        # training in the direct style (13+5, 73+5, ...), held-out pairs included, which 100 single-digit sums alone
        # cannot offer (their ~30 test pairs would never be seen answered directly)
        return [(a, b) for a in range(100) for b in range(10) if a % 10 + b < 10]
    return None


@functools.lru_cache(maxsize=None)
def _split_pool(level, split):
    """The enumerated problems of a level that fall in a split (hashed once per process), or None."""
    pool = _all_problems(level)
    return None if pool is None else tuple(p for p in pool if split_of(p) == split)


def sample_problems(level, split, n, rng, distinct=False):
    """n problems of `level` from `split`, drawn with `rng`; distinct=True never repeats one (fewer if the split
    holds fewer)."""
    pool = _split_pool(level, split)
    if pool is not None:
        if distinct:
            pool = list(pool)
            rng.shuffle(pool)
            return pool[:n]
        return [rng.choice(pool) for _ in range(n)]
    out, seen, tries = [], set(), 0
    while len(out) < n and tries < 100 * n + 10_000:  # bounded: a split may hold fewer distinct problems than asked
        tries += 1
        p = _draw_operands(level, rng)
        if split_of(p) != split or (distinct and p in seen):
            continue
        seen.add(p)
        out.append(p)
    return out


def prompt_text(operands, style=None, budget=None):
    """The prompt the model sees: the problem line, a token budget line when one is given (read by models that
    reason_rl.py trains with a target length), and the style tag when a style is forced."""
    q = problem_text(operands) + "\n"
    if budget is not None:
        q += f"budget: {budget}\n"
    return q + f"[{style}]\n" if style else q


def problem_text(operands):
    """47+85, 12+3+40, or 47-25 for the subtraction problem (47, -25)."""
    return str(operands[0]) + "".join(f"+{x}" if x >= 0 else f"-{-x}" for x in operands[1:])


def _sub_working_lines(a, b):
    """Subtraction a - b (a >= b) as the addition of a, the nines' complement of b (each digit d -> 9 - d, as many
    digits as a) and a carry of 1 into the first column: the column lines of addition, least-significant first,
    `da+(9-db)+carry_in=sum|partial cOUT`; the last carry out (always 1) is dropped, and the partial result is
    a - b. Every glyph of the working is one pre-training already emits: only the complement digits are new."""
    lines, partial, carry = [], "", 1
    for i in range(len(str(a))):
        da, dc = (a // 10 ** i) % 10, 9 - (b // 10 ** i) % 10
        s = da + dc + carry
        partial = str(s % 10) + partial
        lines.append(f"{da}+{dc}+{carry}={s:02d}|{partial} c{s // 10}")
        carry = s // 10
    return lines


def _columns(operands):
    """Column-by-column working: (digits, carry_in, column_sum) per column, least-significant first."""
    width = max(len(str(x)) for x in operands)
    cols, carry = [], 0
    for i in range(width):
        digits = [(x // 10 ** i) % 10 for x in operands]
        s = sum(digits) + carry
        cols.append((digits, carry, s))
        carry = s // 10
    return cols


def _working_lines(operands, lsd_first=True):
    """One line per column, `d1+d2+carry_in=sum|partial result cCARRY_OUT` (three digits: `d1+d2=s12+d3=s123+
    carry_in=sum|...`): the carry out closes the line, so the next line reads its carry in from the same place.
    Least-significant column first by default; lsd_first=False writes the same lines from the most significant
    column, so each carry-in must be worked out before it is written (harder for a small model)."""
    cols = _columns(operands)
    order = cols if lsd_first else cols[::-1]
    lines, partial = [], ""
    for digits, carry, s in order:
        partial = str(s % 10) + partial if lsd_first else partial + str(s % 10)
        expr = str(digits[0])
        if len(digits) > 2:  # three or more digits: a running sum, two numbers at a time (7+5=12+3=15)
            expr += "".join(f"+{d}={run:02d}" for d, run in zip(digits[1:], list(itertools.accumulate(digits))[1:]))
        else:
            expr += f"+{digits[1]}"
        lines.append((expr + f"+{carry}={s:02d}|{partial} c{s // 10}", s // 10))
    return lines


def answer_text(operands, style, lsd_first=True):
    """The answer in the given style, starting with its tag and ending with `answer: N` (no end token)."""
    total = sum(operands)
    tail = f"answer: {total}"
    q = problem_text(operands)
    if style == "direct":  # the problem restated, then its result at once: no working
        body = [q + f"={total}"]
    elif min(operands) < 0:  # subtraction (a, -b): adding the nines' complement, least-significant first
        work = _sub_working_lines(operands[0], -operands[1])
        if style not in ("minimal", "verbose"):
            raise ValueError(f"unknown style {style!r}; choose from {STYLES}")
        body = list(work)
        if style == "verbose":
            body.append("Check: " + ", ".join(w.split("|")[0] + " ok" for w in work))
            body.append(f"So {q}={total}.")
    else:
        work = _working_lines(operands, lsd_first)
        if style == "minimal":
            body = [w for w, _ in work]
        elif style == "verbose":
            # padding after the working, never before it: the working itself is the minimal one, line for line
            body = [w for w, _ in work]
            body.append("Check: " + ", ".join(w.split("|")[0] + " ok" for w, _ in work))
            body.append(f"So {q}={total}.")
        else:
            raise ValueError(f"unknown style {style!r}; choose from {STYLES}")
    return "\n".join([f"[{style}]"] + body + [tail])


def extract_answer(text):
    """The final answer in a generated text (the last `answer: N`), or None when there is none."""
    found = _ANSWER_RE.findall(text)
    return int(found[-1]) if found else None


def check_answer(text, operands):
    return extract_answer(text) == sum(operands)


def style_of(text):
    """Which style a generated answer chose (from its tag), or None."""
    m = re.match(r"\[(\w+)\]", text)
    return m.group(1) if m and m.group(1) in STYLES else None


def make_examples(cfg: TaskConfig, split, n, seed_offset=0):
    """n (prompt, answer) text pairs for training or validation, levels and styles drawn from the config's mixes."""
    if split not in ("train", "val"):
        raise ValueError("examples are made for the train and val splits; test problems come from held_out_problems()")
    rng = random.Random(f"{cfg.seed}-{split}-{seed_offset}")
    out = []
    for level in rng.choices(cfg.levels, weights=cfg.level_weights, k=n):
        style = rng.choices(STYLES, weights=cfg.mix_of(level))[0]
        ops = sample_problems(level, split, 1, rng)[0]
        out.append((prompt_text(ops), answer_text(ops, style, cfg.lsd_first)))
    return out


def held_out_problems(cfg: TaskConfig, level, n=None):
    """The fixed held-out test problems of a level (distinct; level 1 has only the ~170 in its test split)."""
    rng = random.Random(f"{cfg.seed}-test-{level}")
    return sample_problems(level, "test", n or cfg.test_per_level, rng, distinct=True)


def task_from_meta(meta):
    """The TaskConfig a reasoning dataset was generated with (stored in its meta.json), or None for a dataset of
    another kind (plain text has no task to evaluate)."""
    if meta.get("kind") != "reasoning":
        return None
    return TaskConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["task"].items()})


def widest_problem(level):
    """The problem of `level` whose prompt is longest: every operand at its largest number of digits."""
    if level in SUB_LEVELS:
        big = 10 ** SUB_LEVELS[level][1] - 1
        return (big, -big)
    n_ops, (_, dmax) = LEVELS[level]
    return (10 ** dmax - 1,) * n_ops


def longest_prompt(tok, task, styles=(None,), budget=None):
    """Tokens (with <|bos|>) of the longest prompt of the task's levels in any of `styles`: what a model's
    block_size must hold before it can answer."""
    return max(len(tok.encode(prompt_text(widest_problem(level), style, budget), bos=True))
               for level in task.levels for style in styles)
