"""evaluate.py: the figures of the greedy evaluation on a scripted model whose answers are known (accuracy within
each token budget, mean length of right and wrong answers, the style chosen), and the hand-written Pareto SVG."""
import re
from types import SimpleNamespace

import pytest
import torch

from data.tasks import TaskConfig, answer_text, held_out_problems
from data.tokenizer import byte_tokenizer
from evaluate import BUDGETS, evaluate_reasoning, pareto_svg, pool_rows


class Scripted:
    """A stand-in for GPT: level 1 answers directly, level 2 verbosely, and the first problem of each level gets
    a wrong final answer."""
    config = SimpleNamespace(block_size=256)

    def __init__(self, tok, wrong):
        self.tok, self.wrong = tok, wrong

    def answer(self, prompt):
        ops = tuple(int(x) for x in re.findall(r"\d+", prompt))
        text = answer_text(ops, "direct" if max(ops) < 10 or min(ops) < 10 else "verbose")
        return re.sub(r"answer: \d+$", "answer: 0", text) if ops in self.wrong else text

    def generate(self, prompts, max_new, temperature=0, eos_id=None):
        rows = [self.tok.encode(self.answer(self.tok.decode(p[1:]))) + [eos_id] for p in prompts]
        width = max(map(len, rows))
        return torch.tensor([r + [eos_id] * (width - len(r)) for r in rows]), torch.tensor([len(r) for r in rows])


def test_budget_accuracy_and_lengths_of_right_and_wrong_answers():
    tok = byte_tokenizer()
    task = TaskConfig(levels=(1, 2), level_weights=(0.5, 0.5), test_per_level=4)
    probs = {lv: held_out_problems(task, lv, 4) for lv in (1, 2)}
    model = Scripted(tok, wrong={probs[1][0], probs[2][0]})
    rows = evaluate_reasoning(model, tok, task, "cpu", 4)
    lengths = {lv: [len(tok.encode(model.answer(f"{p[0]}+{p[1]}"))) + 1 for p in probs[lv]] for lv in (1, 2)}
    assert max(lengths[1]) <= 32 and 64 < min(lengths[2]) <= 128  # direct answers short, verbose ones long
    for r in rows:
        n = lengths[r["level"]]
        assert r["accuracy"] == 0.75 and r["mean_tokens"] == pytest.approx(sum(n) / 4)
        assert r["len_correct"] == pytest.approx(sum(n[1:]) / 3) and r["len_wrong"] == n[0]
        want = {b: sum(x <= b for x in n[1:]) / 4 for b in BUDGETS}  # right *and* ended within the budget
        assert r["budget_accuracy"] == {str(b): pytest.approx(v) for b, v in want.items()}
        assert r["chose"] == {"direct": float(r["level"] == 1), "minimal": 0.0, "verbose": float(r["level"] == 2)}
    assert rows[0]["budget_accuracy"] == {"32": 0.75, "64": 0.75, "128": 0.75}
    assert rows[1]["budget_accuracy"] == {"32": 0.0, "64": 0.0, "128": 0.75}
    pooled = pool_rows(rows)
    assert pooled["budget_accuracy"] == {"32": 0.375, "64": 0.375, "128": 0.75}
    assert pooled["len_correct"] == pytest.approx((sum(lengths[1][1:]) + sum(lengths[2][1:])) / 6)
    assert pooled["len_wrong"] == pytest.approx((lengths[1][0] + lengths[2][0]) / 2)
    assert pooled["tokens_per_correct"] == pytest.approx((sum(lengths[1]) + sum(lengths[2])) / 6)


def test_pareto_svg_has_a_panel_per_key_and_a_marker_per_point(tmp_path):
    pts = [dict(label="start", xy={"all": (119.0, 98.0), "level 1": (91.0, 97.0)})] + \
        [dict(label=f"m{i % 2}", xy={"all": (50.0 + i, 97.0 + i / 10), "level 1": (28.0, 99.0)}) for i in range(4)]
    svg = pareto_svg(pts, str(tmp_path / "p.svg"))
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert (tmp_path / "p.svg").read_text() == svg
    assert svg.count(">all</text>") == 1 and svg.count(">level 1</text>") == 1
    assert svg.count("<circle") == 2 * 4 + 2  # 4 runs x 2 panels, plus a legend marker per method
    assert svg.count("<path") == 2 + 1  # the start: a cross in each panel and in the legend
    assert svg.count("mean generated tokens") == 2 and ">m0</text>" in svg and ">m1</text>" in svg
