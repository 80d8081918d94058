"""reason_rl.py: a small length-aware RL loop (GRPO family) that teaches a reasoning model to reach the same answers
with fewer generated tokens, and when to work a problem out at all. It starts from any checkpoint train.py writes
(float, QAT, PTQ int4, LoRA/QLoRA), trained on any task corpus data/ generates.

    python reason_rl.py                                   # the default run: out/ckpt.pt -> out_rl/ (LASER-D)
    python reason_rl.py --length_reward none              # plain GRPO, the baseline
    python reason_rl.py --length_reward kimi --alpha 0.5  # another objective (see config.LENGTH_REWARDS)
    python reason_rl.py --sweep none,kimi:0.5,laser:0.5 --sweep_seeds 1337,1,2   # -> sweep.md, sweep.svg
    python reason_rl.py --eval_only --init_from out_rl/ckpt.pt

Ideas it rests on:
- Rollouts: each training prompt (a problem from the train split, untagged, so the policy picks its own style) is
  prefilled once and sampled group_size times with the KV-cached generator; the task checker gives reward 1 for a
  correct final answer. A sample that hits the token budget without its end token is truncated: it gets reward 0,
  or (--truncated mask) is left out of the loss and of its group's statistics.
- The objective (rewards.py) adds a length or style term per group: Kimi k1.5, Arora & Zanette, L1, GFPO, or a
  when-to-think term: AdaptThink's bonus for the shorter style, LASER-D's step reward under a length target each
  difficulty level sets from its own right answers. Advantages are per group (GRPO's z-score, Dr. GRPO's mean) or
  scaled over the batch (DLER). Dynamic sampling re-rolls groups whose rewards are all equal, up to a cap.
- The loss is the clipped surrogate over the generated tokens only (prompt tokens masked), normalised per sequence
  (GRPO), per token over the batch (DAPO) or by a constant (Dr. GRPO), with an optional k3 KL to the start model.
  Samples whose advantage is 0 are not run through the backward pass (they still count in the normalisation).
- Only the parameters the checkpoint trains are updated: adapters over a frozen (4-bit) base for a QLoRA
  checkpoint (--optim adamw8bit keeps 8-bit moments), everything float otherwise. Checkpoints hold the model (with
  its quantized layers and adapters described, so train.py's --lora_merge and --ptq take them), optimizer, step,
  every RNG and the config.
"""
import copy
import json
import os
import random
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

import memory
import runtime
from checkpoint import (check_data, check_out_dir, clear_run, data_marks, eval_only_path, load_checkpoint, load_model,
                        model_state, nothing_left, refuse_changes, refuse_existing, refuse_overwriting_source,
                        resume_config, run_folder_hint, run_lock, save_checkpoint)
from config import RLConfig, UserError, cli
from data.loader import open_dataset
from data.tasks import STYLES, check_answer, longest_prompt, prompt_text, sample_problems, style_of
from evaluate import decode_answer, format_table, pareto_svg, summary_line, untagged_summary
from files import atomic_write
from optim import AdamW8bit
from rewards import is_flat, policy_loss, score, token_weights


# ----------------------------------------------------------------------------- rollouts


def rollout(model, tok, problems, cfg, max_new, generator, ctx, targets=None, levels=None):
    """group_size samples per problem. Returns one dict per sample (grouped: rows g*G .. g*G+G-1 are problem g's)
    with its prompt and generated ids, length, whether it ended, whether its answer is right, its style and level."""
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
                            target=budgets[g], level=levels[g] if levels else None))
    return samples


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
                tokens_per_correct=sum(s["length"] for s in samples) / len(right) if right else None,
                styles={st: sum(s["style"] == st for s in samples) / n for st in STYLES},
                styles_by_level=styles_by_level(samples))


def styles_by_level(samples):
    """{level: {style: share of that level's samples}}: which levels the policy still works out at length."""
    out = {}
    for lv in sorted({s["level"] for s in samples if s.get("level") is not None}):
        mine = [s for s in samples if s["level"] == lv]
        out[lv] = {st: sum(s["style"] == st for s in mine) / len(mine) for st in STYLES}
    return out


# ----------------------------------------------------------------------------- checks and the policy

# what runs saved before these fields existed did (a resumed run continues as it was)
BEFORE_THEY_EXISTED = dict(resample_rounds=0)
# what a resumed run keeps: where it started, its objective, its batches, its optimizer (Adam's state keeps the
# lr) and its evaluation (the end is compared with the start's, which was saved)
FIXED_ON_RESUME = ("init_from", "levels", "prompts_per_step", "group_size", "temperature", "top_k",
                   "max_new_tokens", "truncated", "advantage", "norm", "epochs", "kl_coef", "optim",
                   "length_reward", "alpha", "solve_threshold", "penalty_warmup", "l1_targets", "gfpo_keep",
                   "gfpo_metric", "laser_coverage", "resample_rounds", "lr", "weight_decay", "eval_problems",
                   "l1_eval_target")


def sweep_runs(cfg):
    """The (objective, strength) pairs --sweep names: numbers are strengths of --length_reward, run after the
    no-length baseline (--sweep 0.25,0.5); names run as given, each at --alpha or at NAME:STRENGTH
    (--sweep none,kimi:0.5,laser:0.5)."""
    items = sweep_items(cfg)
    runs = []
    for x in items:
        name, _, a = x.partition(":")
        runs.append((cfg.length_reward, float(x)) if _is_number(x) else
                    (name, 0.0 if name == "none" else float(a) if a else cfg.alpha))
    if items and all(_is_number(x) for x in items):
        runs.insert(0, ("none", 0.0))
    return runs


def sweep_items(cfg):
    """--sweep's entries, as written (RLConfig has checked them)."""
    return [x.strip() for x in cfg.sweep.split(",") if x.strip()]


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_list(text, typ=int):
    return [typ(x) for x in text.split(",") if x.strip()]


# ----------------------------------------------------------------------------- flags that would change nothing

# what --eval_only reads (run, evaluate): the evaluation is greedy, on fixed test problems, up to block_size, so
# no seed, sampling or token limit; length_reward only as l1, whose --l1_eval_target budget is in every prompt
EVAL_FLAGS = ("init_from", "out_dir", "eval_only", "eval_problems", "device", "dtype", "threads", "length_reward",
              "l1_eval_target")
# the objectives that read each objective-only flag (rewards.group_rewards and score, load_policy, evaluate):
# none adds no term; gfpo only filters samples, so it has no strength and nothing for a warm-up to ramp up
OBJECTIVE_FLAGS = dict(alpha=("kimi", "arora", "l1", "adaptthink", "laser"),
                       solve_threshold=("kimi", "arora", "l1", "gfpo", "adaptthink", "laser"),
                       penalty_warmup=("kimi", "arora", "l1", "adaptthink", "laser"),
                       l1_targets=("l1",), l1_eval_target=("l1",), gfpo_keep=("gfpo",), gfpo_metric=("gfpo",),
                       laser_coverage=("laser",))


def refuse_unused(cfg, explicit):
    """An explicit flag that would change nothing is refused (a default never is): training flags under
    --eval_only, an objective's flags where no run uses that objective, and what --sweep sets per run."""
    for problem in unused_flags(cfg, explicit):
        raise UserError(problem)


def unused_flags(cfg, explicit):
    """The messages for refuse_unused, first the most general."""
    if cfg.eval_only:
        yield from _training_only(cfg, explicit)
    yield from _set_per_run(cfg, explicit)
    for name, readers in OBJECTIVE_FLAGS.items():
        if name in explicit and not set(readers) & _objectives_taking(cfg, name):
            yield f"--{name} applies only to --length_reward {'|'.join(readers)}, " + _instead(cfg, name, explicit)


def _instead(cfg, name, explicit):
    """What the runs use instead, and what to do."""
    if cfg.sweep:
        own = " (each of its runs has its own strength)" if not _objectives_taking(cfg, name) else ""
        return f"and no run of --sweep {cfg.sweep} takes it{own}: drop it (or add such a run to --sweep)"
    whose = "" if "length_reward" in explicit else " (the run being resumed's)" if cfg.resume else " (the default)"
    return f"not {cfg.length_reward}{whose}: drop it (or change --length_reward)"


def _training_only(cfg, explicit):
    unused = [f.name for f in fields(cfg) if f.name in explicit and not _evaluation_reads(cfg, f.name)]
    if unused:
        yield (f"{', '.join('--' + k for k in unused)} only matter{'s' * (len(unused) == 1)} for training: "
               f"--eval_only takes --init_from, --out_dir, --eval_problems, --device, --dtype, --threads "
               f"(and --length_reward l1 --l1_eval_target N for an l1-trained model); drop "
               f"{'them' if len(unused) > 1 else 'it'}")


def _evaluation_reads(cfg, name):
    return name in EVAL_FLAGS and (name != "length_reward" or cfg.length_reward == "l1")


def _set_per_run(cfg, explicit):
    items = sweep_items(cfg)
    if items and "length_reward" in explicit and not any(_is_number(x) for x in items):
        yield f"--length_reward: every run of --sweep {cfg.sweep} names its objective; drop --length_reward"
    if parse_list(cfg.sweep_seeds) and "seed" in explicit:
        yield f"--seed: --sweep_seeds {cfg.sweep_seeds} gives every run its seed; drop --seed"


def _objectives_taking(cfg, name):
    """The objectives of the runs that take `name` from its flag: every run's, but --alpha only where --sweep
    names an objective without a strength (none's is 0)."""
    if not cfg.sweep:
        return {cfg.length_reward}
    if name == "alpha":
        return {x for x in sweep_items(cfg) if not _is_number(x) and ":" not in x and x != "none"}
    return {objective for objective, _ in sweep_runs(cfg)}


@dataclass
class Policy:
    """The model RL improves, with what it was trained on and how long its answers may be."""
    model: torch.nn.Module
    ckpt: dict
    data: object        # data.loader.Dataset: tokenizer and task
    max_new: int        # tokens a rollout may generate
    targets: list       # l1: the target lengths written in training prompts (else None)
    longest: int = 0    # tokens of the longest prompt (a rollout is at most longest + max_new long)


def load_policy(path, cfg, env):
    """Any checkpoint the project writes, on the task corpus it was trained on."""
    if os.path.isdir(path) and run_folder_hint(path):
        raise UserError(f"--init_from {path} is a folder{run_folder_hint(path)}")
    if os.path.isdir(path):
        raise UserError(f"{path} is a model directory: fine-tune it on a task corpus with train.py --init_from "
                        f"first, then start RL from that checkpoint")
    model, ck = load_model(path)
    data = open_dataset(ck.get("dataset") or "reasoning")
    check_data(ck, data, path, resume=cfg.resume)  # the same tokens, and on --resume the same dataset
    if data.task is None:
        raise UserError(f"{path} was trained on {data.name}, not on a task corpus: RL needs the task checker")
    targets = parse_list(cfg.l1_targets) if cfg.length_reward == "l1" else None
    longest = longest_prompt(data.tok, data.task, budget=max(targets) if targets else None)
    room = model.config.block_size - longest - 2
    max_new = min(cfg.max_new_tokens, room) if cfg.max_new_tokens else room
    if max_new < 8:
        raise UserError(f"the model's block_size {model.config.block_size} leaves {max_new} tokens to answer in "
                        f"after the longest prompt ({longest} tokens)")
    return Policy(model.to(env.device), ck, data, max_new, targets, longest + 1)  # (+ bos)


def evaluate(policy, cfg, env):
    """Greedy accuracy and mean tokens per level on the held-out test problems (untagged prompts)."""
    budget = cfg.l1_eval_target if cfg.length_reward == "l1" else None
    return untagged_summary(policy.model, policy.data.tok, policy.data.task, env.device, cfg.eval_problems,
                            env.autocast(), budget)


# ----------------------------------------------------------------------------- the run

@dataclass
class RLState:
    """Everything the loop changes, and everything --resume restores."""
    optimizer: torch.optim.Optimizer
    ref: torch.nn.Module        # the start model for the KL term, or None
    prompt_rng: random.Random
    gen: torch.Generator
    levels: list
    step: int = 0
    history: dict = None
    log: object = None


def training_levels(cfg, task):
    levels = parse_list(cfg.levels) or list(task.levels)
    if any(lv not in task.levels for lv in levels):
        raise UserError(f"--levels {cfg.levels}: the corpus has levels {list(task.levels)}")
    return levels


def start_state(policy, cfg, env, resumed):
    model, task = policy.model, policy.data.task
    levels = training_levels(cfg, task)
    runtime.seed_everything(cfg.seed)
    ref = copy.deepcopy(model).requires_grad_(False).eval() if cfg.kl_coef else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW8bit if cfg.optim == "adamw8bit" else torch.optim.AdamW
    optimizer = opt(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=env.device.split(":")[0] if env.device.startswith("cuda") else "cpu")
    st = RLState(optimizer, ref, random.Random(cfg.seed), gen.manual_seed(cfg.seed), levels, history={})
    if resumed:
        ck, rl = policy.ckpt, policy.ckpt["rl"]
        optimizer.load_state_dict(ck["optimizer"])
        if ref is not None:
            ref.load_state_dict(rl["ref"])
        st.step, st.history = ck["step"], rl["history"]
        runtime.set_rng_state(ck["rng"], 0, env.device)
        st.prompt_rng.setstate(runtime.as_tuple(rl["prompt_rng"]))
        gen.set_state(rl["generator"])
    os.makedirs(cfg.out_dir, exist_ok=True)
    st.log = runtime.MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), st.step if resumed else None)
    return st


def save_rl(policy, st, cfg, env):
    rl = dict(history=st.history, prompt_rng=st.prompt_rng.getstate(), generator=st.gen.get_state(),
              ref=st.ref.state_dict() if st.ref is not None else None)
    save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"),
                    {**model_state(policy.model), "optimizer": st.optimizer.state_dict(), "step": st.step,
                     "config": asdict(cfg), "rng": [runtime.rng_state(env.device)],
                     "dataset": policy.ckpt.get("dataset", "reasoning"), "data_marks": data_marks(policy.data),
                     "rl": rl})


def draw_rollouts(policy, st, cfg, ctx, levels):
    """One fresh training problem of each level given (untagged; with a target length under l1), group_size
    samples of each."""
    problems = [sample_problems(lv, "train", 1, st.prompt_rng)[0] for lv in levels]
    budget = [st.prompt_rng.choice(policy.targets) for _ in problems] if policy.targets else None
    return rollout(policy.model, policy.data.tok, problems, cfg, policy.max_new, st.gen, ctx, budget, levels)


def resample_flat(policy, st, cfg, ctx, samples, scale):
    """Dynamic sampling (DAPO, DLER): every group whose rewards are all equal is replaced by the samples of a fresh
    problem of the same level, and the batch rescored, up to cfg.resample_rounds times. Returns how many groups
    were re-rolled (each costs group_size extra rollouts)."""
    G, extra = cfg.group_size, 0
    for _ in range(cfg.resample_rounds):
        flat = [g for g in range(len(samples) // G)
                if is_flat(*zip(*[(s["reward"], s["keep"]) for s in samples[g * G:(g + 1) * G]]))]
        if not flat:
            break
        new = draw_rollouts(policy, st, cfg, ctx, [samples[g * G]["level"] for g in flat])
        for j, g in enumerate(flat):
            samples[g * G:(g + 1) * G] = [dict(s, group=g) for s in new[j * G:(j + 1) * G]]
        extra += len(flat)
        score(samples, cfg, scale)
    return extra


def rl_step(policy, st, cfg, env):
    """Rollouts (re-rolling flat groups under dynamic sampling), rewards, one update; returns the step's metrics."""
    t0 = time.perf_counter()
    ctx = env.autocast()
    levels = [st.prompt_rng.choice(st.levels) for _ in range(cfg.prompts_per_step)]
    samples = draw_rollouts(policy, st, cfg, ctx, levels)
    scale = min(1.0, (st.step + 1) / cfg.penalty_warmup) if cfg.penalty_warmup else 1.0
    flat_before = score(samples, cfg, scale)
    extra = resample_flat(policy, st, cfg, ctx, samples, scale)
    flat = score(samples, cfg, scale) if extra else flat_before
    t_gen = time.perf_counter() - t0
    policy.model.train()
    loss = update(policy.model, st.ref, st.optimizer, samples, cfg, policy.max_new, env.device, ctx)
    st.step += 1
    return dict(step=st.step, loss=loss, **step_metrics(samples, flat), flat_before_resampling=flat_before,
                resampled_groups=extra, extra_rollouts=extra * cfg.group_size, gen_s=t_gen,
                s=time.perf_counter() - t0)


def print_step(m, cfg):
    print(f"step {m['step']:>4}/{cfg.steps} | reward {m['reward']:.3f} | acc {100 * m['accuracy']:.0f}% | "
          f"len ok/wrong {_f(m['len_correct'])}/{_f(m['len_wrong'])} | trunc {100 * m['truncated']:.0f}% | "
          f"flat {100 * m['zero_variance_groups']:.0f}% (+{m['resampled_groups']} re-rolled) | "
          f"tok/correct {_f(m['tokens_per_correct'])} | " +
          "/".join(f"{st[0]}{100 * v:.0f}" for st, v in m["styles"].items()) + f" | {m['s']:.1f}s", flush=True)


def train_rl(policy, st, cfg, env):
    policy.model.train()
    last = cfg.stop_after or cfg.steps
    while st.step < last:
        m = rl_step(policy, st, cfg, env)
        st.log.write(m)
        print_step(m, cfg)
        if cfg.eval_interval and st.step % cfg.eval_interval == 0 and st.step < cfg.steps:
            e = evaluate(policy, cfg, env)
            st.history[f"step_{st.step}"] = e
            st.log.write(dict(step=st.step, eval=_brief(e)))
            print(f"eval {st.step} | {summary_line(e)}", flush=True)
            save_rl(policy, st, cfg, env)


def finish_rl(policy, st, cfg, env, t_start):
    """The end evaluation, the checkpoint and summary.json."""
    st.history["end"] = evaluate(policy, cfg, env)
    save_rl(policy, st, cfg, env)
    start, end = st.history["start"], st.history["end"]
    summary = dict(config=asdict(cfg), step=st.step, start=_brief(start), end=_brief(end),
                   seconds=time.perf_counter() - t_start,
                   token_change=end["mean_tokens"] / start["mean_tokens"] - 1,
                   accuracy_change=end["accuracy"] - start["accuracy"],
                   tokens_per_correct_change=_ratio(end["tokens_per_correct"], start["tokens_per_correct"]))
    atomic_write(os.path.join(cfg.out_dir, "summary.json"), lambda f: json.dump(summary, f, indent=1), "w")
    st.log.write(dict(step=st.step, final=True, eval=_brief(end)))
    st.log.close()
    print(format_table(end["rows"]))
    print(f"end    | {summary_line(end)}")
    per_right = summary["tokens_per_correct_change"]
    print(f"tokens {100 * summary['token_change']:+.1f}% | accuracy {100 * summary['accuracy_change']:+.1f} points | "
          f"tokens per correct answer {'-' if per_right is None else f'{100 * per_right:+.1f}%'} | "
          f"{summary['seconds']:.0f}s -> {cfg.out_dir}")
    return summary


def rl_config(cfg, explicit):
    """The run's config (a resumed run's saved one with the flags given now on top), whether it was saved with
    an unresolved --dtype auto (before runs recorded the precision auto resolved to: fp32 on every CPU), and the
    step a resumed run's checkpoint is at (None for a fresh run)."""
    check_out_dir(cfg.out_dir)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not cfg.resume:
        if not cfg.eval_only:
            refuse_existing(cfg.out_dir, cfg.overwrite)
            if cfg.overwrite:
                refuse_overwriting_source(cfg.out_dir, cfg.init_from)
        return cfg, False, None
    saved = load_checkpoint(path)
    if "rl" not in saved:
        raise UserError(f"{path} is not a reason_rl.py checkpoint; use --init_from to start from it")
    refuse_changes({**BEFORE_THEY_EXISTED, **saved["config"]}, cfg, explicit, FIXED_ON_RESUME, path)
    legacy = runtime.saved_before_resolving(saved["config"], explicit)
    cfg = resume_config(RLConfig, {**saved["config"], "out_dir": cfg.out_dir, "resume": True, "overwrite": False},
                        cfg, explicit,
                        reset=("stop_after",), source=path, legacy=BEFORE_THEY_EXISTED)
    refuse_unused(cfg, explicit)  # against the saved objective (refuse_changes kept the flags equal to it)
    for k in ("steps", "stop_after"):
        if k in explicit and 0 < getattr(cfg, k) < saved["step"]:
            raise UserError(f"--{k} {getattr(cfg, k)} is below step {saved['step']}, where {path} already is: "
                            f"give a later step")
    return cfg, legacy, saved["step"]


def run(cfg, explicit, start_eval=None, checked=False):
    """One run (checked: one run of a sweep, whose flags were checked against the whole sweep)."""
    if not (checked or cfg.resume):  # (a resumed run's are checked against its saved config, in rl_config)
        refuse_unused(cfg, explicit)
    cfg, legacy_dtype, saved_step = rl_config(cfg, explicit)
    if cfg.resume and nothing_left(cfg.out_dir, saved_step, cfg.stop_after or cfg.steps, cfg.steps,
                                   "summary.json", "--steps"):
        return None
    env = runtime.setup(cfg.device, cfg.dtype, cfg.threads, cfg.seed, distributed=False,
                        legacy_auto=legacy_dtype)
    cfg.dtype = env.dtype  # saved resolved: --resume keeps the precision on a machine where auto means another
    policy = load_policy(os.path.join(cfg.out_dir, "ckpt.pt") if cfg.resume else cfg.init_from, cfg, env)
    if cfg.eval_only:
        e = evaluate(policy, cfg, env)
        print(format_table(e["rows"]) + "\n" + summary_line(e))
        how = f"l1-{cfg.l1_eval_target}" if cfg.length_reward == "l1" else ""  # a budget in every prompt
        atomic_write(eval_only_path(cfg.out_dir, cfg.init_from, how), lambda f: json.dump(e, f, indent=1), "w")
        return e
    training_levels(cfg, policy.data.task)  # (checked before the out_dir is taken)
    refuse_what_cannot_fit(policy, cfg, env)
    with run_lock(cfg.out_dir):
        if not cfg.resume:
            refuse_existing(cfg.out_dir, cfg.overwrite)  # again: a run may have ended here since the first check
        if cfg.overwrite and not cfg.resume:
            clear_run(cfg.out_dir)  # only now: the policy and its data have loaded
        return train_and_finish(policy, cfg, env, start_eval)


def refuse_what_cannot_fit(policy, cfg, env):
    """Rollouts (every prompt's group decoded at once) or an update that cannot fit in this machine's memory are
    refused before the run starts, instead of being killed by the system."""
    model, rows = policy.model, cfg.prompts_per_step * cfg.group_size
    T = min(model.config.block_size, policy.longest + policy.max_new)  # the longest a rollout can be
    micro = min(cfg.micro_batch, rows)
    step = memory.estimate_memory(model, micro, T, optim=cfg.optim, dtype=env.dtype, grad_accum=-(-rows // micro))
    # later steps' rollouts run beside the optimizer's state and the gradients' memory
    rollouts = memory.generation_bytes(model, rows, T, env.dtype) + step["optimizer"] + step["grads"]
    ref = memory.weight_bytes(model) if cfg.kl_coef else 0  # the frozen reference copy
    over = memory.too_big({"peak": max(rollouts, step["peak"]) + ref}, env.device)
    if over:
        needed, free = map(memory.readable, over)
        raise UserError(f"--prompts_per_step {cfg.prompts_per_step} x --group_size {cfg.group_size} (--micro_batch "
                        f"{cfg.micro_batch}): a step needs about {needed}, more than the {free} free here: lower "
                        f"--prompts_per_step or --group_size (or --micro_batch)")


def train_and_finish(policy, cfg, env, start_eval=None):
    st = start_state(policy, cfg, env, cfg.resume)
    t_start = time.perf_counter()
    print(f"policy {sum(p.numel() for p in policy.model.parameters() if p.requires_grad):,} trainable parameters | "
          f"{env.device} {env.dtype} | up to {policy.max_new} new tokens | task levels {list(policy.data.task.levels)}")
    if "start" not in st.history:
        st.history["start"] = start_eval or evaluate(policy, cfg, env)
        st.log.write(dict(step=0, start=True, eval=_brief(st.history["start"])))
        print(f"start  | {summary_line(st.history['start'])}", flush=True)
    train_rl(policy, st, cfg, env)
    if st.step < cfg.steps:  # --stop_after: save, and let --resume finish the run
        save_rl(policy, st, cfg, env)
        st.log.close()
        print(f"stopped at step {st.step}: --resume continues -> {os.path.join(cfg.out_dir, 'ckpt.pt')}")
        return None
    return finish_rl(policy, st, cfg, env, t_start)


BRIEF = ("accuracy", "mean_tokens", "tokens_per_correct", "len_correct", "len_wrong", "budget_accuracy")


def _brief(e):
    """An evaluation's figures, overall and per level (with the style the greedy policy chose)."""
    return dict({k: e.get(k) for k in BRIEF},
                by_level={r["level"]: dict({k: r.get(k) for k in BRIEF[:2] + BRIEF[3:]}, chose=r.get("chose"))
                          for r in e["rows"]})


def _ratio(a, b):
    return None if a is None or b is None else a / b - 1


def _f(x):
    return "-" if x is None else f"{x:.0f}"


def _num(x):
    return "-" if x is None else f"{x:.1f}"


# ----------------------------------------------------------------------------- the sweep


def sweep(cfg, explicit):
    """Objectives (or strengths) compared at the same steps, samples and seeds: every run of --sweep once per seed
    of --sweep_seeds; a table (sweep.md, sweep.json) and a Pareto plot of accuracy against mean tokens, one point
    per run, one panel per level and one overall (sweep.svg)."""
    refuse_unused(cfg, explicit)  # once, for the whole sweep: a flag may apply to only some of its runs
    seeds = parse_list(cfg.sweep_seeds) or [cfg.seed]
    jobs = [(name, a, seed, os.path.join(cfg.out_dir, "sweep", f"{name}_{a:g}" + (f"_s{seed}" if len(seeds) > 1
                                                                                   else "")))
            for name, a in sweep_runs(cfg) for seed in seeds]
    dirs = [d for *_, d in jobs]
    twins = sorted({d for d in dirs if dirs.count(d) > 1})
    if twins:
        raise UserError(f"--sweep {cfg.sweep}: two runs would both write {twins[0]}; name each run once")
    check_out_dir(cfg.out_dir)
    taken = [d for d in dirs if os.path.exists(os.path.join(d, "ckpt.pt"))]
    if taken and not cfg.overwrite:
        raise UserError(f"{taken[0]} already holds a run: --out_dir DIR for a new sweep, or --overwrite")
    subs = [RLConfig(**{**asdict(cfg), "sweep": "", "sweep_seeds": "", "length_reward": name, "alpha": a,
                        "seed": seed, "out_dir": d, "overwrite": True}) for name, a, seed, d in jobs]  # all checked
    results, starts = [], {}
    for (name, a, seed, d), sub in zip(jobs, subs):
        print(f"=== {name} alpha={a:g} seed={seed} -> {d}", flush=True)
        key = sub.l1_eval_target if name == "l1" else None  # l1 evaluates with a budget in its prompts
        s = run(sub, explicit, start_eval=starts.get(key), checked=True)
        starts[key] = starts.get(key) or _load_start(d)
        results.append(dict(length_reward=name, alpha=a, seed=seed, **s["end"], seconds=s["seconds"],
                            start=s["start"]))
    table = sweep_table(results)
    atomic_write(os.path.join(cfg.out_dir, "sweep.md"), lambda f: f.write(table + "\n"), "w")
    atomic_write(os.path.join(cfg.out_dir, "sweep.json"), lambda f: json.dump(results, f, indent=1), "w")
    pareto_svg(pareto_points(results), os.path.join(cfg.out_dir, "sweep.svg"))
    print(table + f"\nwrote {os.path.join(cfg.out_dir, 'sweep.svg')}")
    return results


def sweep_table(results):
    """The markdown table of a sweep: the start checkpoint, one row per run, and (several seeds) the mean of each
    objective over its seeds. Tokens per right answer are compared with the no-length run of the same seed."""
    levels = list(results[0]["start"]["by_level"])
    lines = ["| objective | alpha | seed | accuracy | mean tokens | tokens/correct | vs none | len right/wrong | "
             "acc @32/@64/@128 | " + " | ".join(f"L{lv} acc / tokens / style" for lv in levels) + " | seconds |",
             "|---" * (10 + len(levels)) + "|"]
    lines.append(_row("start checkpoint", "-", "-", results[0]["start"], None, "-"))
    base = {r["seed"]: r["tokens_per_correct"] for r in results if r["length_reward"] == "none"}
    for r in results:
        lines.append(_row(r["length_reward"], f"{r['alpha']:g}", r["seed"], r, base.get(r["seed"]),
                          f"{r['seconds']:.0f}"))
    if len({r["seed"] for r in results}) > 1:
        for (name, a), rs in _by_method(results).items():
            lines.append(_row(f"**{name} (mean)**", f"{a:g}", f"{len(rs)} seeds", _mean_brief(rs),
                              _mean([base.get(r["seed"]) for r in rs]), f"{_mean([r['seconds'] for r in rs]):.0f}"))
    return "\n".join(lines)


def _row(name, alpha, seed, r, base_tpc, seconds):
    rel = _ratio(r["tokens_per_correct"], base_tpc)
    lens = f"{_num(r.get('len_correct'))} / {_num(r.get('len_wrong'))}"
    budget = " / ".join(f"{100 * v:.1f}%" for v in (r.get("budget_accuracy") or {}).values()) or "-"
    per_level = " | ".join(f"{100 * v['accuracy']:.1f}% / {v['mean_tokens']:.1f} / {_style(v.get('chose'))}"
                           for v in r["by_level"].values())
    return (f"| {name} | {alpha} | {seed} | {100 * r['accuracy']:.1f}% | {r['mean_tokens']:.1f} | "
            f"{_num(r['tokens_per_correct'])} | {'-' if rel is None else f'{100 * rel:+.1f}%'} | {lens} | "
            f"{budget} | {per_level} | {seconds} |")


def _style(chose):
    """The style most answers chose and its share, e.g. "direct 97%"."""
    if not chose:
        return "-"
    st = max(chose, key=chose.get)
    return f"{st} {100 * chose[st]:.0f}%"


def _by_method(results):
    out = {}
    for r in results:
        out.setdefault((r["length_reward"], r["alpha"]), []).append(r)
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _mean_brief(rs):
    """The mean over seeds of each figure of _brief (overall and per level)."""
    keys = [k for k in BRIEF if k != "budget_accuracy"]
    out = {k: _mean([r[k] for r in rs]) for k in keys}
    out["budget_accuracy"] = {b: _mean([r["budget_accuracy"][b] for r in rs]) for b in rs[0]["budget_accuracy"]}
    out["by_level"] = {}
    for lv, v in rs[0]["by_level"].items():
        chose = {st: _mean([(r["by_level"][lv]["chose"] or {}).get(st) for r in rs]) for st in (v["chose"] or {})}
        out["by_level"][lv] = dict(accuracy=_mean([r["by_level"][lv]["accuracy"] for r in rs]),
                                   mean_tokens=_mean([r["by_level"][lv]["mean_tokens"] for r in rs]), chose=chose)
    return out


def pareto_points(results):
    """The sweep's points for pareto_svg: the start checkpoint, then one per run (objective and strength as the
    label, one point per seed), each overall and per level."""
    def xy(r):
        return {"all": (r["mean_tokens"], 100 * r["accuracy"]),
                **{f"level {lv}": (v["mean_tokens"], 100 * v["accuracy"]) for lv, v in r["by_level"].items()}}
    return [dict(label="start", xy=xy(results[0]["start"]))] + \
        [dict(label=f"{r['length_reward']} {r['alpha']:g}", xy=xy(r)) for r in results]


def _load_start(d):
    """The start evaluation a finished run recorded (the same checkpoint starts every run of a sweep)."""
    return load_checkpoint(os.path.join(d, "ckpt.pt"))["rl"]["history"]["start"]


def main(argv=None):
    cli(RLConfig, lambda cfg, explicit: sweep(cfg, explicit) if cfg.sweep else run(cfg, explicit), argv)


if __name__ == "__main__":
    main()
