"""evaluate.py: validation loss, and greedy evaluation of a model on the reasoning tasks' held-out test problems.

Ideas it rests on:
- One row per (difficulty level, style): accuracy and mean generated tokens; "untagged" lets the model pick its
  style (and records which it picked), a style name forces it by putting the tag in the prompt.
- Prompts of all levels and styles are batched by length together: no batch needs padding, generate() takes
  its fast path, and rows that end early leave their batch.
- train.py and the RL loop print the same table from the same function; the final evaluation writes it as JSON.
- The figures the token-efficiency literature reports come with every row: accuracy at fixed token budgets (an
  answer counts only if it is right and ends, end token included, within the budget), the mean length of right and
  of wrong answers, tokens per right answer, and (untagged) the style chosen.
"""
import json
import math
import time
from contextlib import nullcontext

import numpy as np
import torch

from data.loader import make_batches
from data.tasks import STYLES, check_answer, held_out_problems, prompt_text, style_of
from files import atomic_write

BUDGETS = (32, 64, 128)  # token budgets of the budget accuracies


@torch.no_grad()
def estimate_val_loss(model, tokens, meta, block_size, batch_size, iters, seed, device, ctx=nullcontext()):
    """Mean loss over `iters` fixed validation batches (a fresh loader seeded with `seed` each time)."""
    loader = make_batches(tokens, meta, block_size, batch_size, seed, name="val.bin")
    was_training = model.training
    model.eval()
    losses = []
    for _ in range(iters):
        x, y, pos = (None if t is None else t.to(device) for t in loader.next())
        with ctx:
            losses.append(model(x, y, pos=pos)[1].item())
    model.train(was_training)
    return float(np.mean(losses))


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
    stats = [dict(correct=0, tokens=0, right_tokens=0, chosen={s: 0 for s in STYLES}, within={b: 0 for b in BUDGETS})
             for _ in groups]
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
                st, ok = stats[g], check_answer(full, problems[i])
                st["correct"] += ok
                st["tokens"] += n
                st["right_tokens"] += n if ok else 0
                for b in BUDGETS:
                    st["within"][b] += ok and n <= b
                if style is None and style_of(full):
                    st["chosen"][style_of(full)] += 1
    rows = []
    for (level, style, problems), st in zip(groups, stats):
        n = len(problems)
        right, wrong = st["correct"], n - st["correct"]
        r = dict(level=level, style=style or "untagged", n=n, accuracy=right / n, mean_tokens=st["tokens"] / n,
                 len_correct=st["right_tokens"] / right if right else None,
                 len_wrong=(st["tokens"] - st["right_tokens"]) / wrong if wrong else None,
                 budget_accuracy={str(b): c / n for b, c in st["within"].items()})
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
    lines = [f"{'level':>5} {'style':>9} {'n':>4} {'acc':>6} {'tokens':>7} {'right':>6} {'wrong':>6} "
             + " ".join(f"{'@' + str(b):>5}" for b in BUDGETS)]
    for r in rows:
        lens = " ".join("     -" if r.get(k) is None else f"{r[k]:>6.1f}" for k in ("len_correct", "len_wrong"))
        lines.append(f"{r['level']:>5} {r['style']:>9} {r['n']:>4} {100 * r['accuracy']:>5.1f}% "
                     f"{r['mean_tokens']:>7.1f} {lens} "
                     + " ".join(f"{100 * a:>4.0f}%" for a in r.get("budget_accuracy", {}).values()))
    for style, s in summarize(rows).items():
        lines.append(f"{'all':>5} {style:>9} {s['n']:>4} {100 * s['accuracy']:>5.1f}% {s['mean_tokens']:>7.1f}")
    untagged = [r for r in rows if "chose" in r]
    if untagged:
        n = sum(r["n"] for r in untagged)
        chose = {s: sum(r["chose"][s] * r["n"] for r in untagged) / n for s in STYLES}
        lines.append("untagged prompts chose: " + ", ".join(f"{s} {100 * v:.0f}%" for s, v in chose.items()))
    return "\n".join(lines)


def untagged_summary(model, tok, task, device, n_per_level, ctx=nullcontext(), budget=None):
    """Greedy accuracy, mean tokens and tokens per right answer (None when none is right) over untagged prompts,
    with the per-level rows: the figures the RL loop tracks."""
    rows = evaluate_reasoning(model, tok, task, device, n_per_level, ctx=ctx, budget=budget)
    return dict(rows=rows, **pool_rows(rows))


def pool_rows(rows):
    """Accuracy, mean tokens, tokens per right answer, mean length of right and of wrong answers and the budget
    accuracies over several rows (None where no answer is right, or none wrong)."""
    n = sum(r["n"] for r in rows)
    right = sum(r["accuracy"] * r["n"] for r in rows)
    tokens = sum(r["mean_tokens"] * r["n"] for r in rows)
    right_tokens = sum(r["len_correct"] * r["accuracy"] * r["n"] for r in rows if r["len_correct"] is not None)
    return dict(accuracy=right / n, mean_tokens=tokens / n, tokens_per_correct=tokens / right if right else None,
                len_correct=right_tokens / right if right else None,
                len_wrong=(tokens - right_tokens) / (n - right) if n - right > 0.5 else None,
                budget_accuracy={b: sum(r["budget_accuracy"][b] * r["n"] for r in rows) / n
                                 for b in rows[0]["budget_accuracy"]})


def summary_line(e):
    per_right = "-" if e["tokens_per_correct"] is None else f"{e['tokens_per_correct']:.1f}"
    budgets = " ".join(f"@{b} {100 * a:.0f}%" for b, a in e.get("budget_accuracy", {}).items())
    return (f"accuracy {100 * e['accuracy']:.1f}% | {e['mean_tokens']:.1f} tokens | {per_right} tokens/correct | "
            f"within budget {budgets} | "
            + " ".join(f"L{r['level']} {100 * r['accuracy']:.0f}%/{r['mean_tokens']:.0f}" for r in e["rows"]))


def final_evaluation(model, data, val_tokens, cfg, env, path, step=None):
    """Validation loss and, on a task corpus, the level x style table and a few sampled answers; written to
    `path` as JSON (with the training step it evaluates, when given). cfg supplies block_size, batch_size,
    eval_iters, seed, final_problems and samples."""
    model.eval()
    t0 = time.perf_counter()
    ctx = env.autocast()
    result = dict(val_loss=estimate_val_loss(model, val_tokens, data.meta, cfg.block_size, cfg.batch_size,
                                             cfg.eval_iters, cfg.seed + 1, env.device, ctx))
    print(f"final val loss {result['val_loss']:.4f}")
    if data.task is not None:
        rows = evaluate_reasoning(model, data.tok, data.task, env.device, cfg.final_problems,
                                  styles=(None,) + STYLES, ctx=ctx)
        result.update(rows=rows, summary=summarize(rows))
        print(format_table(rows))
        print_samples(model, data.tok, data.task, env.device, cfg.samples)
    result["eval_seconds"] = time.perf_counter() - t0
    if step is not None:
        result["step"] = step
    print(f"final evaluation took {result['eval_seconds']:.0f}s")
    atomic_write(path, lambda f: json.dump(result, f, indent=1), "w")
    return result


def print_samples(model, tok, task, device, n):
    """One sampled answer (temperature 0.8, untagged prompt) for each of the first n levels."""
    if not n:
        return
    print("sampled answers (untagged prompts, temperature 0.8):")
    gen = torch.Generator(device=device.split(":")[0] if device.startswith("cuda") else "cpu").manual_seed(0)
    for level in task.levels[:n]:
        p = held_out_problems(task, level, 1)[0]
        prompt = tok.encode(prompt_text(p), bos=True)
        out, lens = model.generate([prompt], model.config.block_size - len(prompt), temperature=0.8,
                                   eos_id=tok.eos_id, generator=gen)
        text = decode_answer(tok, out[0, :lens[0]].tolist())
        mark = "correct" if check_answer(text, p) else "wrong"
        print(f"--- {prompt_text(p).strip()} ({mark}, {int(lens[0])} tokens)\n{text}")


# ----------------------------------------------------------------------------- the Pareto plot (SVG, by hand)

COLORS = ("#222222", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def _ticks(lo, hi, n=4):
    """About n round tick values between lo and hi."""
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    return [step * k for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _panel(name, pts, colors, x0, w, h):
    """One panel's SVG elements: frame, ticks, axis labels, one marker per point (x tokens, y accuracy %)."""
    xs, ys = [p["xy"][name][0] for p in pts], [p["xy"][name][1] for p in pts]
    xhi = max(xs) * 1.08 or 1
    ylo, yhi = min(math.floor(min(ys) - 1), 99), 100.5
    L, T, R, B = x0 + 48, 24, x0 + w - 8, h - 40
    sx = lambda x: L + x / xhi * (R - L)  # noqa: E731
    sy = lambda y: B - (y - ylo) / (yhi - ylo) * (B - T)  # noqa: E731
    out = [f'<rect x="{L}" y="{T}" width="{R - L}" height="{B - T}" fill="none" stroke="#888"/>',
           f'<text x="{(L + R) / 2}" y="16" text-anchor="middle" font-weight="bold">{name}</text>',
           f'<text x="{(L + R) / 2}" y="{h - 8}" text-anchor="middle">mean generated tokens</text>',
           f'<text transform="translate({x0 + 12},{(T + B) / 2}) rotate(-90)" text-anchor="middle">'
           f'accuracy (%)</text>']
    out += [f'<text x="{sx(t):.1f}" y="{B + 14}" text-anchor="middle">{t:g}</text>' for t in _ticks(0, xhi)]
    out += [f'<text x="{L - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>' for t in _ticks(ylo, 100)]
    for p, x, y in zip(pts, xs, ys):
        X, Y, c = sx(x), sy(y), colors[p["label"]]
        if p["label"] == "start":
            out.append(f'<path d="M{X - 5:.1f},{Y - 5:.1f}l10,10m0,-10l-10,10" stroke="{c}" stroke-width="2"/>')
        else:
            out.append(f'<circle cx="{X:.1f}" cy="{Y:.1f}" r="4" fill="{c}" fill-opacity="0.7"/>')
    return out


def pareto_svg(points, path, w=280, h=240):
    """Accuracy against mean generated tokens as an SVG written by hand (no plotting library): one panel per key
    of each point's "xy" ({panel: (mean tokens, accuracy %)}), one marker per point coloured by its "label"
    (a method; one point per seed), a black cross for the label "start", and a legend."""
    panels = list(points[0]["xy"])
    labels = list(dict.fromkeys(p["label"] for p in points))
    colors = {lab: COLORS[i % len(COLORS)] for i, lab in enumerate(sorted(labels, key=lambda s: s != "start"))}
    body = []
    for i, name in enumerate(panels):
        body += _panel(name, points, colors, i * w, w, h)
    for i, lab in enumerate(labels):
        x, c = 20 + 150 * i, colors[lab]
        mark = (f'<path d="M{x - 4},{h + 10}l8,8m0,-8l-8,8" stroke="{c}" stroke-width="2"/>' if lab == "start"
                else f'<circle cx="{x}" cy="{h + 14}" r="4" fill="{c}"/>')
        body.append(mark + f'<text x="{x + 8}" y="{h + 18}">{lab}</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(panels)}" height="{h + 30}" '
           f'font-family="sans-serif" font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n'
           + "\n".join(body) + "\n</svg>\n")
    atomic_write(path, lambda f: f.write(svg), "w")
    return svg
