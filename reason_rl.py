"""reason_rl.py: a small length-aware RL loop (GRPO family) that teaches a reasoning model to reach the same answers
with fewer generated tokens. It starts from the checkpoint `python train.py` writes.

    python reason_rl.py                                   # the default run: out/ckpt.pt -> out_rl/
    python reason_rl.py --length_reward none              # plain GRPO, the baseline
    python reason_rl.py --length_reward arora --alpha 0.2 # another length objective (see LENGTH_REWARDS)
    python reason_rl.py --sweep 0.25,0.5,1                # baseline + several strengths -> out_rl/sweep.md
    python reason_rl.py --eval_only --init_from out_rl/ckpt.pt

Ideas it rests on:
- Rollouts: each training prompt (a problem from the train split, untagged, so the policy picks its own style) is
  prefilled once and sampled group_size times with the KV-cached generator; the task checker gives reward 1 for a
  correct final answer. A sample that hits the token budget without its end token is truncated: it gets reward 0,
  or (--truncated mask) is left out of the loss and of its group's statistics.
- A length term is added to that reward per group (none, Kimi k1.5, Arora & Zanette, a target length in the prompt
  in the style of L1, or GFPO filtering), only in groups whose solve rate reaches --solve_threshold, optionally
  ramped up over --penalty_warmup steps.
- Advantages are per group: the z-score of the reward (GRPO) or the reward minus the group mean (Dr. GRPO). The
  loss is the clipped surrogate over the generated tokens only (prompt tokens masked), normalised per sequence
  (GRPO), per token over the batch (DAPO) or by a constant (Dr. GRPO), with an optional k3 KL to the start model.
- Samples whose advantage is 0 add nothing to the gradient, so they are not run through the backward pass at all
  (they still count in the normalisation, so the loss is the same as with them).
- Checkpoints hold the model, optimizer, step, every RNG and the config, like train.py's: --resume is exact.
"""
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from config import UserError, cli
from data.loader import load_meta
from data.tasks import LEVELS, STYLES, TaskConfig, check_answer, prompt_text, sample_problems, style_of
from data.tokenizer import load_tokenizer
from evaluate import decode_answer, evaluate_reasoning, format_table, summarize
from model import GPT, config_from_dict
from train import (autocast_for, dataset_dir, ensure_dataset, load_checkpoint, pick_device, rng_state,
                   save_checkpoint, set_rng_state)

LENGTH_REWARDS = ("none", "kimi", "arora", "l1", "gfpo")


@dataclass
class RLConfig:
    # i/o
    init_from: str = "out/ckpt.pt"  # the checkpoint to improve (train.py's default output)
    out_dir: str = "out_rl"
    resume: bool = False            # continue out_dir/ckpt.pt exactly
    overwrite: bool = False         # allow a fresh run to replace an existing out_dir/ckpt.pt
    eval_only: bool = False         # the per-level table of init_from, and exit
    sweep: str = ""                 # comma-separated strengths: runs the no-length baseline and each one
    # rollouts
    steps: int = 40
    stop_after: int = 0             # stop (and save) at this step; --resume continues the same run
    prompts_per_step: int = 16
    group_size: int = 8             # samples per prompt
    temperature: float = 1.0
    top_k: int = 0                  # 0: off
    max_new_tokens: int = 0         # 0: whatever the model's block_size leaves after the longest prompt
    truncated: str = "zero"         # zero: a truncated sample gets reward 0 | mask: it is left out of the loss
    levels: str = ""                # levels the training prompts come from, e.g. "1,2,3" ("": all, evenly)
    # loss
    advantage: str = "zscore"       # zscore (GRPO) | mean (Dr. GRPO: no division by the group's std)
    norm: str = "token"             # seq (GRPO) | token (DAPO) | const (Dr. GRPO: by max_new_tokens)
    epochs: int = 1                 # updates per batch of rollouts; >1 uses the clipped ratio
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0            # k3 KL to the starting model (0: off, and no reference copy is kept)
    lr: float = 3e-5                # small: Adam moves every weight by ~lr a step, and the working must survive
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch: int = 64           # rows per forward/backward pass (memory, not maths)
    # length objective
    length_reward: str = "kimi"     # one of LENGTH_REWARDS
    alpha: float = 0.5              # strength of the length term (its units depend on length_reward)
    solve_threshold: float = 0.5    # apply the length term only in groups solving at least this share
    penalty_warmup: int = 0         # steps over which the length term ramps up from 0
    l1_targets: str = "16,32,64,128,192"  # l1: target lengths drawn for the prompts
    l1_eval_target: int = 32        # l1: the budget written in evaluation prompts
    gfpo_keep: int = 4              # gfpo: samples per group trained on
    gfpo_metric: str = "length"     # gfpo: keep the shortest (length) or the best reward per token (efficiency)
    # evaluation
    eval_interval: int = 0          # greedy eval on test problems every N steps (0: at the start and end only)
    eval_problems: int = 200        # per level
    # system
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1337
    threads: int = 0


# ----------------------------------------------------------------------------- rewards and advantages
# Each works on one group: lists of equal length, `correct` booleans, `lengths` in generated tokens, and `keep`
# (False for samples left out: truncated under --truncated mask). They return per-sample floats.


def kimi_length_reward(lengths, correct, keep):
    """Kimi k1.5: lambda = 0.5 - (len - min) / (max - min) over the group; lambda if correct, min(0, lambda) if
    wrong (a wrong answer is never rewarded for being short). All lengths equal: 0."""
    ls = [n for n, k in zip(lengths, keep) if k]
    lo, hi = (min(ls), max(ls)) if ls else (0, 0)
    out = []
    for n, c, k in zip(lengths, correct, keep):
        lam = 0.0 if hi == lo or not k else 0.5 - (n - lo) / (hi - lo)
        out.append(lam if c else min(0.0, lam))
    return out


def arora_length_reward(lengths, correct, keep, alpha):
    """Arora & Zanette: a correct sample's reward 1 becomes 1 - alpha * sigmoid(z), z its length's z-score among the
    group's correct samples; returned as the change (-alpha * sigmoid(z)); wrong samples 0. Fewer than two correct
    samples, or equal lengths: z = 0 for all (a flat -alpha/2, which moves no advantage)."""
    ls = [n for n, c, k in zip(lengths, correct, keep) if c and k]
    mean = sum(ls) / len(ls) if ls else 0.0
    std = math.sqrt(sum((n - mean) ** 2 for n in ls) / len(ls)) if ls else 0.0
    return [-alpha / (1 + math.exp(-((n - mean) / std if std > 0 else 0.0))) if c and k else 0.0
            for n, c, k in zip(lengths, correct, keep)]


def l1_length_reward(lengths, targets, alpha):
    """L1-style: -alpha * |target - len| for every sample (the prompt says the target)."""
    return [-alpha * abs(t - n) for n, t in zip(lengths, targets)]


def gfpo_keep_mask(lengths, rewards, keep, k, metric="length"):
    """GFPO: train only on the k retained samples of a group, the shortest (metric "length") or those with the
    best reward per token ("efficiency"); ties keep the earlier sample."""
    order = [i for i in range(len(lengths)) if keep[i]]
    if metric == "length":
        order.sort(key=lambda i: lengths[i])
    else:
        order.sort(key=lambda i: -rewards[i] / max(1, lengths[i]))
    chosen = set(order[:k])
    return [i in chosen for i in range(len(lengths))]


def group_advantages(rewards, keep, kind="zscore", eps=1e-6):
    """Per-group advantages over the kept samples: reward - mean (Dr. GRPO, kind "mean") or that divided by the
    group's std (GRPO, "zscore"). Left-out samples get 0; a group with equal rewards gets 0 everywhere."""
    rs = [r for r, k in zip(rewards, keep) if k]
    if len(rs) < 2:
        return [0.0] * len(rewards)
    mean = sum(rs) / len(rs)
    std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (len(rs) - 1))
    if std < eps:
        return [0.0] * len(rewards)
    scale = std if kind == "zscore" else 1.0
    return [(r - mean) / scale if k else 0.0 for r, k in zip(rewards, keep)]


def token_weights(gen_lengths, keep, norm, max_new_tokens):
    """The weight of each sample's generated tokens in the loss: 1/(n_seq * len) per sequence (GRPO), 1/(all
    tokens) per token (DAPO), or 1/(n_seq * max_new_tokens) (Dr. GRPO's constant). Left-out samples weigh 0."""
    kept = [n for n, k in zip(gen_lengths, keep) if k]
    if not kept:
        return [0.0] * len(gen_lengths)
    if norm == "seq":
        return [1.0 / (len(kept) * n) if k else 0.0 for n, k in zip(gen_lengths, keep)]
    if norm == "token":
        total = sum(kept)
        return [1.0 / total if k else 0.0 for k in keep]
    if norm == "const":
        return [1.0 / (len(kept) * max_new_tokens) if k else 0.0 for k in keep]
    raise ValueError(f"unknown norm {norm!r}")


def policy_loss(logp, old_logp, adv, weight, mask, clip_low, clip_high, ref_logp=None, kl_coef=0.0):
    """The clipped surrogate (PPO with separate low/high clip, as DAPO) on generated tokens.
    logp, old_logp, ref_logp, mask: (B, T) per target token; adv, weight: (B,) per sample. Returns a scalar whose
    normalisation is in `weight` (see token_weights)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surr = torch.minimum(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    per_token = -surr
    if ref_logp is not None and kl_coef:
        d = ref_logp - logp
        per_token = per_token + kl_coef * (torch.exp(d) - d - 1)  # k3: unbiased, always >= 0
    return (per_token * mask * weight[:, None]).sum()


# ----------------------------------------------------------------------------- rollouts


def rollout(model, tok, problems, cfg, max_new, generator, ctx, targets=None):
    """group_size samples per problem. Returns one dict per sample (grouped: rows g*G .. g*G+G-1 are problem g's)
    with its prompt and generated ids, length, whether it ended, and whether its answer is right."""
    G = cfg.group_size
    budgets = targets if targets is not None else [None] * len(problems)
    prompts = [tok.encode(prompt_text(p, budget=b), bos=True) for p, b in zip(problems, budgets)]
    with ctx:
        out, lens = model.generate(prompts, max_new, temperature=cfg.temperature, top_k=cfg.top_k or None,
                                   eos_id=tok.eos_id, generator=generator, num_samples=G)
    samples = []
    for i, (row, n) in enumerate(zip(out.tolist(), lens.tolist())):
        g = i // G
        ids = row[:n]
        finished = bool(ids) and ids[-1] == tok.eos_id
        text = decode_answer(tok, ids)
        samples.append(dict(group=g, prompt=prompts[g], ids=ids, length=n, finished=finished,
                            correct=finished and check_answer(text, problems[g]), style=style_of(text),
                            target=budgets[g]))
    return samples


def score(samples, cfg, scale):
    """Fill in each sample's reward, advantage and keep flag, group by group; scale in [0, 1] is the warm-up of
    the length term. Returns the share of groups whose rewards were all equal (they teach nothing)."""
    G, flat = cfg.group_size, 0
    for start in range(0, len(samples), G):
        grp = samples[start:start + G]
        keep = [s["finished"] or cfg.truncated == "zero" for s in grp]
        correct = [s["correct"] for s in grp]
        lengths = [s["length"] for s in grp]
        rewards = [float(c) for c in correct]
        solved = sum(c for c, k in zip(correct, keep) if k) / max(1, sum(keep))
        if cfg.length_reward != "none" and solved >= cfg.solve_threshold and scale > 0:
            if cfg.length_reward == "kimi":
                extra = [cfg.alpha * x for x in kimi_length_reward(lengths, correct, keep)]
            elif cfg.length_reward == "arora":
                extra = arora_length_reward(lengths, correct, keep, cfg.alpha)
            elif cfg.length_reward == "l1":
                extra = l1_length_reward(lengths, [s["target"] for s in grp], cfg.alpha)
            else:  # gfpo: the reward stays 1[correct]; only the retained samples are trained on
                extra = [0.0] * len(grp)
                keep = [k and r for k, r in zip(keep, gfpo_keep_mask(lengths, rewards, keep, cfg.gfpo_keep,
                                                                     cfg.gfpo_metric))]
            rewards = [r + scale * e for r, e in zip(rewards, extra)]
        adv = group_advantages(rewards, keep, cfg.advantage)
        flat += all(a == 0 for a in adv)
        for s, r, a, k in zip(grp, rewards, adv, keep):
            s.update(reward=r, adv=a, keep=k)
    return flat / (len(samples) // G)


# ----------------------------------------------------------------------------- the update


def token_logprobs(model, rows, device, ctx):
    """(logp, mask) of each row's generated tokens: rows are (prompt ids, generated ids), right-padded."""
    seqs = [p + g for p, g in rows]
    T = max(len(s) for s in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T)
    for i, ((p, g), s) in enumerate(zip(rows, seqs)):
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
        y[i, :len(s) - 1] = torch.tensor(s[1:])
        mask[i, len(p) - 1:len(s) - 1] = 1.0  # targets that are generated tokens; the prompt is masked
    x, y, mask = x.to(device), y.to(device), mask.to(device)
    with ctx:
        logits, _ = model(x, last_only=False)
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, y[..., None]).squeeze(-1)
    return logp, mask


def update(model, ref, optimizer, samples, cfg, max_new, device, ctx):
    """One batch of rollouts -> cfg.epochs optimizer steps. Returns the mean loss of the last epoch."""
    weights = token_weights([s["length"] for s in samples], [s["keep"] for s in samples], cfg.norm, max_new)
    # a sample with advantage 0 adds nothing (its surrogate is 0 whatever the ratio) unless the KL term is on
    live = [(s, w) for s, w in zip(samples, weights) if w > 0 and (s["adv"] != 0 or cfg.kl_coef)]
    if not live:
        return 0.0
    chunks = [live[i:i + cfg.micro_batch] for i in range(0, len(live), cfg.micro_batch)]
    old, refs, loss_total = [None] * len(chunks), [None] * len(chunks), 0.0
    for epoch in range(cfg.epochs):
        loss_total = 0.0
        for c, chunk in enumerate(chunks):
            rows = [(s["prompt"], s["ids"]) for s, _ in chunk]
            logp, mask = token_logprobs(model, rows, device, ctx)
            if epoch == 0:  # the rollout policy is the model before this batch's first step
                old[c] = logp.detach()
                if ref is not None:
                    with torch.no_grad():
                        refs[c] = token_logprobs(ref, rows, device, ctx)[0]
            adv = torch.tensor([s["adv"] for s, _ in chunk], device=device)
            w = torch.tensor([w for _, w in chunk], device=device)
            loss = policy_loss(logp, old[c], adv, w, mask, cfg.clip_low, cfg.clip_high, refs[c], cfg.kl_coef)
            loss.backward()
            loss_total += loss.item()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss_total


def step_metrics(samples, flat):
    n = len(samples)
    right = [s for s in samples if s["correct"]]
    wrong = [s for s in samples if not s["correct"]]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return dict(reward=mean([s["reward"] for s in samples]), accuracy=len(right) / n,
                len_correct=mean([s["length"] for s in right]), len_wrong=mean([s["length"] for s in wrong]),
                truncated=sum(not s["finished"] for s in samples) / n, zero_variance_groups=flat,
                tokens_per_correct=sum(s["length"] for s in samples) / max(1, len(right)),
                styles={st: sum(s["style"] == st for s in samples) / n for st in STYLES})


# ----------------------------------------------------------------------------- evaluation


def evaluate(model, tok, task, cfg, device, ctx):
    """Greedy accuracy and mean tokens per level on the held-out test problems (untagged prompts)."""
    budget = cfg.l1_eval_target if cfg.length_reward == "l1" else None
    rows = evaluate_reasoning(model, tok, task, device, cfg.eval_problems, ctx=ctx, budget=budget)
    total = summarize(rows)["untagged"]
    correct = sum(r["accuracy"] * r["n"] for r in rows)
    tokens = sum(r["mean_tokens"] * r["n"] for r in rows)
    return dict(rows=rows, accuracy=total["accuracy"], mean_tokens=total["mean_tokens"],
                tokens_per_correct=tokens / max(1e-9, correct))


def eval_line(e):
    return (f"accuracy {100 * e['accuracy']:.1f}% | {e['mean_tokens']:.1f} tokens | "
            f"{e['tokens_per_correct']:.1f} tokens/correct | " +
            " ".join(f"L{r['level']} {100 * r['accuracy']:.0f}%/{r['mean_tokens']:.0f}" for r in e["rows"]))


# ----------------------------------------------------------------------------- the run

CHOICES = dict(truncated=("zero", "mask"), advantage=("zscore", "mean"), norm=("seq", "token", "const"),
               length_reward=LENGTH_REWARDS, gfpo_metric=("length", "efficiency"))
POSITIVE = ("steps", "prompts_per_step", "group_size", "epochs", "micro_batch", "eval_problems", "gfpo_keep")


def check_config(cfg):
    for k, allowed in CHOICES.items():
        if getattr(cfg, k) not in allowed:
            raise UserError(f"--{k} {getattr(cfg, k)!r} is not one of {', '.join(allowed)}")
    bad = [k for k in POSITIVE if getattr(cfg, k) < 1]
    if bad:
        raise UserError(f"--{bad[0]} must be at least 1, not {getattr(cfg, bad[0])}")
    if cfg.group_size < 2:
        raise UserError("--group_size must be at least 2: advantages compare samples within a group")
    if cfg.stop_after and cfg.stop_after > cfg.steps:
        raise UserError(f"--stop_after {cfg.stop_after} is beyond --steps {cfg.steps}")
    if cfg.gfpo_keep > cfg.group_size:
        raise UserError(f"--gfpo_keep {cfg.gfpo_keep} exceeds --group_size {cfg.group_size}")
    if cfg.temperature <= 0:
        raise UserError("--temperature must be positive: rollouts are sampled")
    for name in ("levels", "l1_targets", "sweep"):
        try:
            parse_list(getattr(cfg, name), float if name == "sweep" else int)
        except ValueError:
            raise UserError(f"--{name} {getattr(cfg, name)!r} must be comma-separated numbers, e.g. 1,2,3")


def parse_list(text, typ=int):
    return [typ(x) for x in text.split(",") if x.strip()]


def load_policy(path, device):
    """(model, checkpoint dict, task, tokenizer) from a train.py or reason_rl.py checkpoint."""
    ck = load_checkpoint(path)
    model = GPT(config_from_dict(ck["model_config"]))
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not fit its model config: {str(e).splitlines()[0]}")
    name = ck.get("dataset") or "reasoning"
    if name == "reasoning":
        data_dir, meta = ensure_dataset(SimpleNamespace(dataset=name), master=True)
    else:
        data_dir = dataset_dir(name)
        meta = load_meta(data_dir)
    if meta.get("kind") != "reasoning":
        raise UserError(f"{path} was trained on {name}, not on a reasoning corpus: RL needs the task checker")
    task = TaskConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["task"].items()})
    try:
        tok = load_tokenizer(meta["tokenizer"], data_dir)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise UserError(str(e))
    return model.to(device), ck, task, tok


def run(cfg, explicit, start_eval=None):
    check_config(cfg)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume:
        saved = load_checkpoint(ckpt_path)
        if "rl" not in saved:
            raise UserError(f"{ckpt_path} is not a reason_rl.py checkpoint; use --init_from to start from it")
        cfg = RLConfig(**{**saved["config"], "resume": True, "overwrite": False, "stop_after": 0,
                          **{k: getattr(cfg, k) for k in explicit}})
        check_config(cfg)
    elif not cfg.eval_only and os.path.exists(ckpt_path) and not cfg.overwrite:
        raise UserError(f"{ckpt_path} already holds a run: --resume to continue it, --out_dir DIR for a new one, "
                        f"or --overwrite to replace it")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg)
    ctx, dtype_name = autocast_for(device, cfg.dtype)
    model, start_ck, task, tok = load_policy(ckpt_path if cfg.resume else cfg.init_from, device)
    if cfg.eval_only:
        e = evaluate(model, tok, task, cfg, device, ctx)
        print(format_table(e["rows"]) + "\n" + eval_line(e))
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
            json.dump(e, f, indent=1)
        return e

    torch.manual_seed(cfg.seed)
    prompt_rng = random.Random(cfg.seed)
    gen = torch.Generator(device=device.split(":")[0] if device.startswith("cuda") else "cpu")
    gen.manual_seed(cfg.seed)
    levels = parse_list(cfg.levels) or list(task.levels)
    if any(lv not in task.levels for lv in levels):
        raise UserError(f"--levels {cfg.levels}: the corpus has levels {list(task.levels)}")
    targets = parse_list(cfg.l1_targets) if cfg.length_reward == "l1" else None
    widest = [(10 ** LEVELS[lv][1][1] - 1,) * LEVELS[lv][0] for lv in task.levels]  # the longest prompt per level
    longest = max(len(tok.encode(prompt_text(p, budget=max(targets) if targets else None), bos=True)) for p in widest)
    room = model.config.block_size - longest - 2
    max_new = min(cfg.max_new_tokens, room) if cfg.max_new_tokens else room
    if max_new < 8:
        raise UserError(f"the model's block_size {model.config.block_size} leaves {max_new} tokens to answer in")

    ref = None
    if cfg.kl_coef:
        ref = GPT(model.config).to(device)
        ref.load_state_dict(start_ck["rl"]["ref"] if cfg.resume else model.state_dict())
        ref.requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    step, history = 0, {}
    if cfg.resume:
        rl = start_ck["rl"]
        optimizer.load_state_dict(start_ck["optimizer"])
        step, history = start_ck["step"], rl["history"]
        set_rng_state(start_ck["rng"], 0, device)
        prompt_rng.setstate(_to_tuple(rl["prompt_rng"]))
        gen.set_state(rl["generator"])
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics = _open_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), step if cfg.resume else None)
    t_start = time.perf_counter()
    if "start" not in history:
        history["start"] = start_eval or evaluate(model, tok, task, cfg, device, ctx)
        print(f"start  | {eval_line(history['start'])}", flush=True)

    def checkpoint():
        rl = dict(history=history, prompt_rng=prompt_rng.getstate(), generator=gen.get_state(),
                  ref=ref.state_dict() if ref is not None else None)
        save_checkpoint(ckpt_path, dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                                        config=asdict(cfg), model_config=asdict(model.config),
                                        rng=[rng_state(device)], dataset=start_ck.get("dataset", "reasoning"),
                                        rl=rl))

    model.train()
    last = cfg.stop_after or cfg.steps
    while step < last:
        t0 = time.perf_counter()
        problems = [sample_problems(prompt_rng.choice(levels), "train", 1, prompt_rng)[0]
                    for _ in range(cfg.prompts_per_step)]
        budget = [prompt_rng.choice(targets) for _ in problems] if targets else None
        samples = rollout(model, tok, problems, cfg, max_new, gen, ctx, budget)
        scale = min(1.0, (step + 1) / cfg.penalty_warmup) if cfg.penalty_warmup else 1.0
        flat = score(samples, cfg, scale)
        t_gen = time.perf_counter() - t0
        model.train()
        loss = update(model, ref, optimizer, samples, cfg, max_new, device, ctx)
        step += 1
        m = dict(step=step, loss=loss, **step_metrics(samples, flat), gen_s=t_gen, s=time.perf_counter() - t0)
        metrics.write(json.dumps(m) + "\n")
        metrics.flush()
        print(f"step {step:>4}/{cfg.steps} | reward {m['reward']:.3f} | acc {100 * m['accuracy']:.0f}% | "
              f"len ok/wrong {_f(m['len_correct'])}/{_f(m['len_wrong'])} | trunc {100 * m['truncated']:.0f}% | "
              f"flat {100 * flat:.0f}% | tok/correct {m['tokens_per_correct']:.0f} | " +
              "/".join(f"{st[0]}{100 * v:.0f}" for st, v in m["styles"].items()) +
              f" | {m['s']:.1f}s", flush=True)
        if cfg.eval_interval and step % cfg.eval_interval == 0 and step < cfg.steps:
            e = evaluate(model, tok, task, cfg, device, ctx)
            history[f"step_{step}"] = e
            metrics.write(json.dumps(dict(step=step, eval=_brief(e))) + "\n")
            print(f"eval {step} | {eval_line(e)}", flush=True)
            checkpoint()
    if step < cfg.steps:  # --stop_after: save, and let --resume finish the run
        checkpoint()
        metrics.close()
        print(f"stopped at step {step}: --resume continues -> {ckpt_path}")
        return None
    history["end"] = evaluate(model, tok, task, cfg, device, ctx)
    checkpoint()
    start, end = history["start"], history["end"]
    summary = dict(config=asdict(cfg), start=_brief(start), end=_brief(end), seconds=time.perf_counter() - t_start,
                   token_change=end["mean_tokens"] / start["mean_tokens"] - 1,
                   accuracy_change=end["accuracy"] - start["accuracy"],
                   tokens_per_correct_change=end["tokens_per_correct"] / start["tokens_per_correct"] - 1)
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    metrics.write(json.dumps(dict(step=step, final=True, eval=_brief(end))) + "\n")
    metrics.close()
    print(format_table(end["rows"]))
    print(f"end    | {eval_line(end)}")
    print(f"tokens {100 * summary['token_change']:+.1f}% | accuracy {100 * summary['accuracy_change']:+.1f} points | "
          f"tokens per correct answer {100 * summary['tokens_per_correct_change']:+.1f}% | "
          f"{summary['seconds']:.0f}s -> {cfg.out_dir}")
    return summary


def _brief(e):
    return dict(accuracy=e["accuracy"], mean_tokens=e["mean_tokens"], tokens_per_correct=e["tokens_per_correct"],
                by_level={r["level"]: dict(accuracy=r["accuracy"], mean_tokens=r["mean_tokens"], chose=r.get("chose"))
                          for r in e["rows"]})


def _f(x):
    return "-" if x is None else f"{x:.0f}"


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _open_metrics(path, resume_step):
    """metrics.jsonl: a fresh run starts it anew; a resumed one keeps the records up to its step."""
    if resume_step is not None and os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step
                    and not json.loads(line).get("final")]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
        return open(path, "a")
    return open(path, "w")


# ----------------------------------------------------------------------------- the sweep


def sweep(cfg, explicit):
    """The no-length baseline and one run per strength, same steps and samples; a table of accuracy against
    mean tokens (sweep.md, sweep.json) and, when matplotlib is installed, sweep.png."""
    strengths = parse_list(cfg.sweep, float)
    runs = [("none", 0.0)] + [(cfg.length_reward, a) for a in strengths]
    dirs = [os.path.join(cfg.out_dir, "sweep", f"{name}_{a:g}") for name, a in runs]
    taken = [d for d in dirs if os.path.exists(os.path.join(d, "ckpt.pt"))]
    if taken and not cfg.overwrite:
        raise UserError(f"{taken[0]} already holds a run: --out_dir DIR for a new sweep, or --overwrite")
    results, start = [], None
    for (name, a), d in zip(runs, dirs):
        sub = RLConfig(**{**asdict(cfg), "sweep": "", "length_reward": name, "alpha": a, "out_dir": d,
                          "overwrite": True})
        print(f"=== {name} alpha={a:g} -> {d}", flush=True)
        s = run(sub, explicit, start_eval=start)
        start = start or _load_start(d)
        results.append(dict(length_reward=name, alpha=a, **s["end"], seconds=s["seconds"], start=s["start"]))
    base = results[0]
    lines = ["| objective | alpha | accuracy | mean tokens | tokens/correct | vs no-length tokens/correct | "
             + " | ".join(f"L{lv} acc/tokens" for lv in base["by_level"]) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(base["by_level"])]
    first = results[0]["start"]
    lines.append(f"| start checkpoint | - | {100 * first['accuracy']:.1f}% | {first['mean_tokens']:.1f} | "
                 f"{first['tokens_per_correct']:.1f} | - | " +
                 " | ".join(f"{100 * v['accuracy']:.0f}% / {v['mean_tokens']:.0f}" for v in first["by_level"].values())
                 + " |")
    for r in results:
        rel = r["tokens_per_correct"] / base["tokens_per_correct"] - 1
        lines.append(f"| {r['length_reward']} | {r['alpha']:g} | {100 * r['accuracy']:.1f}% | {r['mean_tokens']:.1f}"
                     f" | {r['tokens_per_correct']:.1f} | {100 * rel:+.0f}% | " +
                     " | ".join(f"{100 * v['accuracy']:.0f}% / {v['mean_tokens']:.0f}" for v in r["by_level"].values())
                     + " |")
    table = "\n".join(lines)
    with open(os.path.join(cfg.out_dir, "sweep.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(cfg.out_dir, "sweep.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table)
    _plot(results, os.path.join(cfg.out_dir, "sweep.png"))
    return results


def _load_start(d):
    """The start evaluation a finished run recorded (the same checkpoint starts every run of a sweep)."""
    return load_checkpoint(os.path.join(d, "ckpt.pt"))["rl"]["history"]["start"]


def _plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no sweep.png)")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        label = f"{r['length_reward']} {r['alpha']:g}"
        a.scatter(r["mean_tokens"], 100 * r["accuracy"], label=label)
        levels = list(r["by_level"])
        b.plot(levels, [r["by_level"][lv]["mean_tokens"] for lv in levels], marker="o", label=label)
    s = results[0]["start"]
    a.scatter(s["mean_tokens"], 100 * s["accuracy"], marker="x", color="k", label="start")
    a.set(xlabel="mean generated tokens (test)", ylabel="greedy accuracy (%)", title="accuracy vs tokens")
    b.set(xlabel="level", ylabel="mean tokens", title="length by difficulty")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv=None):
    cli(RLConfig, lambda cfg, explicit: sweep(cfg, explicit) if cfg.sweep else run(cfg, explicit), argv)


if __name__ == "__main__":
    main()
