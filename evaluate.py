"""evaluate.py: greedy evaluation of a model on the reasoning tasks' held-out test problems.

Ideas it rests on:
- One row per (difficulty level, style): accuracy and mean generated tokens; "untagged" lets the model pick its
  style (and records which it picked), a style name forces it by putting the tag in the prompt.
- Prompts of all levels and styles are batched by length together: no batch needs padding, generate() takes
  its fast path, and rows that end early leave their batch.
- train.py and the RL loop print the same table from the same function.
"""
from contextlib import nullcontext

import torch

from data.tasks import STYLES, check_answer, held_out_problems, prompt_text, style_of


@torch.no_grad()
def evaluate_reasoning(model, tok, task, device, n_per_level, styles=(None,), batch=256, ctx=nullcontext(),
                       budget=None):
    """Greedy answers to the held-out test problems: one row per (level, style) with accuracy, mean generated
    tokens, and (untagged) the share of answers that chose each style. Prompts of every level and style are
    batched by length, so no batch needs padding (the fast path of generate()) and there are few batches: on a
    small model a decode step costs mostly its fixed overhead, so fewer, fuller batches are faster. budget: a
    token budget written in every prompt (for models trained by reason_rl.py with a target length)."""
    groups = [(level, style, held_out_problems(task, level, n_per_level)) for level in task.levels
              for style in styles]
    items = [(g, i, tok.encode(prompt_text(p, style, budget), bos=True))
             for g, (_, style, problems) in enumerate(groups) for i, p in enumerate(problems)]
    by_len = {}
    for item in items:
        by_len.setdefault(len(item[2]), []).append(item)
    stats = [dict(correct=0, tokens=0, chosen={s: 0 for s in STYLES}) for _ in groups]
    for length, same in sorted(by_len.items()):
        for c in range(0, len(same), batch):
            part = same[c:c + batch]
            with ctx:
                out, lens = model.generate([prompt for _, _, prompt in part], model.config.block_size - length,
                                           temperature=0, eos_id=tok.eos_id)
            for (g, i, _), row, n in zip(part, out.tolist(), lens.tolist()):
                _, style, problems = groups[g]
                text = decode_answer(tok, row[:n])
                full = f"[{style}]\n{text}" if style else text
                st = stats[g]
                st["correct"] += check_answer(full, problems[i])
                st["tokens"] += n
                if style is None and style_of(full):
                    st["chosen"][style_of(full)] += 1
    rows = []
    for (level, style, problems), st in zip(groups, stats):
        n = len(problems)
        r = dict(level=level, style=style or "untagged", n=n, accuracy=st["correct"] / n, mean_tokens=st["tokens"] / n)
        if style is None:
            r["chose"] = {s: c / n for s, c in st["chosen"].items()}
        rows.append(r)
    return rows


def decode_answer(tok, ids):
    """Text of generated ids up to the end token; ids past the tokenizer's vocabulary (a model whose embedding
    table is padded, e.g. GPT-2's) are dropped."""
    if tok.eos_id in ids:
        ids = ids[:ids.index(tok.eos_id)]
    return tok.decode([i for i in ids if i < tok.n_vocab])


def summarize(rows):
    """Accuracy and mean tokens over all problems of each style."""
    out = {}
    for style in dict.fromkeys(r["style"] for r in rows):
        rs = [r for r in rows if r["style"] == style]
        n = sum(r["n"] for r in rs)
        out[style] = dict(accuracy=sum(r["accuracy"] * r["n"] for r in rs) / n,
                          mean_tokens=sum(r["mean_tokens"] * r["n"] for r in rs) / n, n=n)
    return out


def format_table(rows):
    lines = [f"{'level':>5} {'style':>9} {'n':>4} {'acc':>6} {'tokens':>7}"]
    for r in rows:
        lines.append(f"{r['level']:>5} {r['style']:>9} {r['n']:>4} {100 * r['accuracy']:>5.1f}% "
                     f"{r['mean_tokens']:>7.1f}")
    for style, s in summarize(rows).items():
        lines.append(f"{'all':>5} {style:>9} {s['n']:>4} {100 * s['accuracy']:>5.1f}% {s['mean_tokens']:>7.1f}")
    untagged = [r for r in rows if "chose" in r]
    if untagged:
        n = sum(r["n"] for r in untagged)
        chose = {s: sum(r["chose"][s] * r["n"] for r in untagged) / n for s in STYLES}
        lines.append("untagged prompts chose: " + ", ".join(f"{s} {100 * v:.0f}%" for s, v in chose.items()))
    return "\n".join(lines)


