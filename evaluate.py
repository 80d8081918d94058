"""evaluate.py: validation loss, and greedy evaluation of a model on the reasoning tasks' held-out test problems.

Ideas it rests on:
- One row per (difficulty level, style): accuracy and mean generated tokens; "untagged" lets the model pick its
  style (and records which it picked), a style name forces it by putting the tag in the prompt.
- Prompts of all levels and styles are batched by length together: no batch needs padding, generate() takes
  its fast path, and rows that end early leave their batch.
- train.py and the RL loop print the same table from the same function; the final evaluation writes it as JSON.
"""
import json
import time
from contextlib import nullcontext

import numpy as np
import torch

from data.loader import make_batches
from data.tasks import STYLES, check_answer, held_out_problems, prompt_text, style_of
from files import atomic_write


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


def untagged_summary(model, tok, task, device, n_per_level, ctx=nullcontext(), budget=None):
    """Greedy accuracy, mean tokens and tokens per right answer (None when none is right) over untagged prompts,
    with the per-level rows: the figures the RL loop tracks."""
    rows = evaluate_reasoning(model, tok, task, device, n_per_level, ctx=ctx, budget=budget)
    total = summarize(rows)["untagged"]
    correct = sum(r["accuracy"] * r["n"] for r in rows)
    tokens = sum(r["mean_tokens"] * r["n"] for r in rows)
    return dict(rows=rows, accuracy=total["accuracy"], mean_tokens=total["mean_tokens"],
                tokens_per_correct=tokens / correct if correct else None)


def summary_line(e):
    per_right = "-" if e["tokens_per_correct"] is None else f"{e['tokens_per_correct']:.1f}"
    return (f"accuracy {100 * e['accuracy']:.1f}% | {e['mean_tokens']:.1f} tokens | {per_right} tokens/correct | "
            + " ".join(f"L{r['level']} {100 * r['accuracy']:.0f}%/{r['mean_tokens']:.0f}" for r in e["rows"]))


def final_evaluation(model, data, val_tokens, cfg, env, path):
    """Validation loss and, on a task corpus, the level x style table and a few sampled answers; written to
    `path` as JSON. cfg supplies block_size, batch_size, eval_iters, seed, final_problems and samples."""
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
