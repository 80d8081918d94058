"""Bad-input cases for reason_rl.py: flags, TOML, checkpoints, sweeps, resume (tests/test_bad_input.py).
`{w}` is the case's copy of the world (tests/badworld.py); run/ckpt.pt is a trained tiny model."""
import os

from badworld import Case, disk_full, raises

RESUME = ["--resume", "--out_dir", "rl", "--threads", "1"]


def _hold_lock(folder):
    from badcases_train import _hold_lock as hold
    hold(folder)


def _bad_rl_config(w):
    import shutil
    import torch
    shutil.copytree(os.path.join(w, "rl"), os.path.join(w, "bad_rl"))
    path = os.path.join(w, "bad_rl", "ckpt.pt")
    ck = torch.load(path, weights_only=True)
    ck["config"]["temperature"] = -1.0
    torch.save(ck, path)

def _oom(*args, **kwargs):
    import torch
    raise torch.OutOfMemoryError("CUDA out of memory")


BASE = ["--init_from", "run/ckpt.pt", "--out_dir", "new_rl", "--steps", "2", "--prompts_per_step", "2",
        "--group_size", "2", "--eval_problems", "2", "--threads", "1"]


def flag(name, value, expect, *extra):
    with_ = "".join(f"-with{e}" for e in extra if e.startswith("--"))
    return Case(f"rl-{name}-{value}{with_}".replace(" ", "_"), "rl", BASE + [f"--{name}", str(value), *extra], expect)


CASES = [
    flag("temperature", "nan", r"--temperature must be a finite"),
    flag("temperature", 0, r"--temperature must be > 0"),
    flag("temperature", -1, r"--temperature must be > 0"),
    flag("top_k", -1, r"--top_k must be >= 0"),
    flag("steps", 0, r"--steps must be >= 1"),
    flag("stop_after", 5, r"--stop_after 5 is beyond --steps 2"),
    flag("prompts_per_step", 0, r"--prompts_per_step must be >= 1"),
    flag("group_size", 1, r"--group_size must be >= 2"),
    flag("max_new_tokens", -4, r"--max_new_tokens must be >= 0"),
    flag("max_new_tokens", 4, r"--max_new_tokens 4: too few tokens to answer in: give at least 8, or 0"),
    flag("truncated", "drop", r"--truncated must be one of zero, mask"),
    flag("levels", "1,x", r"--levels '1,x': must be comma-separated ints"),
    flag("levels", "0", r"--levels '0': every value must be a finite number >= 1"),
    flag("levels", "2,2", r"--levels '2,2': a value is repeated"),
    flag("levels", "9", r"--levels 9: the corpus has levels"),
    flag("advantage", "rank", r"--advantage must be one of zscore, mean, batch"),
    flag("norm", "batch", r"--norm must be one of seq, token, const"),
    flag("epochs", 0, r"--epochs must be >= 1"),
    flag("clip_low", 1.2, r"--clip_low must be < 1"),
    flag("clip_high", -0.1, r"--clip_high must be >= 0"),
    flag("kl_coef", -1, r"--kl_coef must be >= 0"),
    flag("lr", "nan", r"--lr must be a finite"),
    flag("lr", 0, r"--lr must be > 0"),
    flag("weight_decay", -1, r"--weight_decay must be >= 0"),
    flag("grad_clip", -1, r"--grad_clip must be >= 0"),
    flag("micro_batch", 0, r"--micro_batch must be >= 1"),
    flag("length_reward", "short", r"--length_reward must be one of"),
    flag("alpha", -0.5, r"--alpha must be >= 0"),
    flag("alpha", "inf", r"--alpha must be a finite"),
    flag("solve_threshold", 1.5, r"--solve_threshold must be <= 1"),
    flag("penalty_warmup", -1, r"--penalty_warmup must be >= 0"),
    flag("l1_targets", "16,-4", r"--l1_targets '16,-4': every value"),
    flag("l1_eval_target", 0, r"--l1_eval_target must be >= 1"),
    flag("gfpo_keep", 3, r"--gfpo_keep 3 exceeds --group_size 2", "--length_reward", "gfpo"),
    flag("gfpo_metric", "speed", r"--gfpo_metric must be one of length, efficiency"),
    flag("eval_interval", -1, r"--eval_interval must be >= 0"),
    flag("eval_problems", 0, r"--eval_problems must be >= 1"),
    flag("device", "tpu", r"--device 'tpu'"),
    flag("dtype", "float16", r"--dtype must be one of"),
    flag("seed", -2, r"--seed must be >= 0"),
    flag("threads", -1, r"--threads must be >= 0"),
    flag("sweep", "-1,0.5", r"--sweep '-1,0.5': '-1' is neither a strength >= 0"),
    flag("sweep", "0.5,0.5", r"--sweep '0.5,0.5': a run is repeated"),
    flag("sweep", "a,b", r"--sweep 'a,b': 'a' is neither"),
    flag("sweep", "kimi:-2", r"--sweep 'kimi:-2': the strength after kimi: must be"),
    flag("sweep", "kimi:nan", r"--sweep 'kimi:nan'"),
    flag("sweep", "laser:", r"--sweep 'laser:'"),
    flag("sweep", "0.5,kimi:0.5", r"two runs would both write", "--length_reward", "kimi"),
    flag("sweep_seeds", "1,1", r"--sweep_seeds '1,1': a value is repeated", "--sweep", "none,kimi"),
    flag("sweep_seeds", "-3", r"--sweep_seeds '-3'", "--sweep", "none"),
    flag("laser_coverage", 0, r"--laser_coverage must be > 0"),
    flag("laser_coverage", 1.5, r"--laser_coverage must be <= 1"),
    flag("resample_rounds", -1, r"--resample_rounds must be >= 0"),
    flag("optim", "sgd", r"--optim must be one of adamw, adamw8bit"),
    flag("advantage", "batchwise", r"--advantage must be one of zscore, mean, batch"),
    flag("sweep", "0.5", r"--sweep runs each of its runs to the end", "--resume"),
    Case("rl-unknown-flag", "rl", BASE + ["--lenght_reward", "kimi"], r"unknown flag --lenght_reward; did you mean"),
    Case("rl-positional", "rl", BASE + ["go"], r"unexpected argument 'go'"),
    Case("rl-init-missing", "rl", BASE + ["--init_from", "none.pt"], r"no checkpoint at none.pt"),
    Case("rl-init-text", "rl", BASE + ["--init_from", "notes.txt"], r"notes.txt is corrupt"),
    Case("rl-init-empty", "rl", BASE + ["--init_from", ""], r"--init_from '': must not be empty"),
    Case("rl-out-dir-is-file", "rl", BASE + ["--out_dir", "notes.txt"], r"--out_dir notes.txt is a file"),
    Case("rl-existing-run-folder", "rl", BASE + ["--out_dir", "run"], r"run/ckpt.pt already holds a run"),
    Case("rl-resume-nothing", "rl", BASE + ["--resume", "--out_dir", "empty"], r"no checkpoint at empty/ckpt.pt"),
    Case("rl-resume-train-run", "rl", BASE + ["--resume", "--out_dir", "run"], r"not a reason_rl.py checkpoint"),
    Case("rl-resume-eval-only", "rl", BASE + ["--resume", "--eval_only"], r"--resume and --eval_only"),
    Case("rl-locked", "rl", RESUME + ["--steps", "4"], r"rl is in use by another run",
         lambda w: _hold_lock(os.path.join(w, "rl"))),
    Case("rl-overwrite-bad-init", "rl", BASE + ["--out_dir", "rl", "--overwrite", "--init_from", "notes.txt"],
         r"notes.txt is corrupt"),
    Case("rl-ctrl-c", "rl", BASE, r"interrupted", patch={"reason_rl.rl_step": raises(KeyboardInterrupt)},
         leaves=r"^new_rl/(\.lock|metrics\.jsonl)$"),
    Case("rl-disk-full", "rl", BASE, r"No space left on device: .*new_rl/ckpt.pt", patch={"torch.save": disk_full},
         leaves=r"^new_rl/(\.lock|metrics\.jsonl)$"),
    Case("rl-resume-saved-config-bad", "rl", ["--resume", "--out_dir", "bad_rl"],
         r"bad_rl/ckpt.pt: its saved config is not valid \(--temperature must be > 0", _bad_rl_config),
]

# a resumed RL run trains what it trained
CASES += [Case(f"rl-resume-{k}", "rl", RESUME + [f"--{k}", v], rf"--{k} .*differs from the run being resumed")
          for k, v in (("init_from", "other.pt"), ("length_reward", "kimi"), ("alpha", "0.9"), ("optim", "adamw8bit"),
                       ("group_size", "4"), ("levels", "1"), ("kl_coef", "0.1"), ("advantage", "mean"),
                       ("norm", "seq"), ("resample_rounds", "3"), ("temperature", "0.7"))]
CASES += [
    Case("rl-toml-bad-value", "rl", BASE + ["--config", "r.toml"], r"--temperature must be > 0",
         lambda w: open(os.path.join(w, "r.toml"), "w").write("temperature = -1.0\n")),
    Case("rl-toml-unknown", "rl", BASE + ["--config", "r.toml"], r"unknown flag --temp",
         lambda w: open(os.path.join(w, "r.toml"), "w").write("temp = 1.0\n")),
]

CASES += [
    Case("rl-overwrite-own-source", "rl", BASE + ["--out_dir", "run", "--overwrite"],
         r"--init_from run/ckpt.pt is in --out_dir run"),
    Case("rl-resume-steps-below", "rl", RESUME + ["--steps", "1"], r"--steps 1 is below step 2"),
    Case("rl-resume-stop-after-below", "rl", RESUME + ["--steps", "5", "--stop_after", "1"],
         r"--stop_after 1 is below step 2"),
]

CASES += [
    flag("sweep", "none", r"--sweep runs each of its runs to the end", "--stop_after", "1"),
    flag("sweep", ",", r"--sweep ',': names no run"),
    flag("sweep", "0.5", r"--sweep with strengths varies --length_reward", "--length_reward", "none"),
    flag("sweep", "none,gfpo:0.5", r"--gfpo_keep 4 exceeds --group_size 2"),
    flag("sweep_seeds", "1,2", r"--sweep_seeds needs --sweep"),
    flag("l1_targets", ",", r"--length_reward l1 needs --l1_targets", "--length_reward", "l1"),
    Case("rl-resume-lr", "rl", RESUME + ["--lr", "0.1"], r"--lr 0.1 differs from the run being resumed"),
    Case("rl-resume-weight-decay", "rl", RESUME + ["--weight_decay", "0.5"], r"--weight_decay 0.5 differs"),
    Case("rl-resume-eval-problems", "rl", RESUME + ["--eval_problems", "3"], r"--eval_problems 3 differs"),
]

# rollouts or an update that cannot fit in memory are refused before the run starts
CASES += [
    flag("prompts_per_step", 10 ** 8, r"--prompts_per_step 100000000 x --group_size 2 \(--micro_batch 64\): a step "
         r"needs about [\d.]+ GiB, more than the [\d.]+ GiB free here: lower --prompts_per_step"),
    Case("rl-step-cannot-fit-small-machine", "rl", BASE, r"a step needs about \d+ MiB, more than the 0 MiB free",
         patch={"memory.free_bytes": lambda device, procs=1: 2 ** 16}),
    Case("rl-out-of-memory", "rl", BASE, r"out of memory \(CUDA out of memory\)",
         patch={"reason_rl.rollout": _oom}, leaves=r"^new_rl/(\.lock|metrics\.jsonl)$"),
]

# a flag that would change nothing is refused: training flags under --eval_only (an evaluation is greedy, on fixed
# problems, up to block_size; it reads --length_reward only as l1, for --l1_eval_target's budget) ...
EVAL = ["--eval_only", "--init_from", "run/ckpt.pt", "--out_dir", "ev", "--eval_problems", "2", "--threads", "1"]
CASES += [Case(f"rl-eval-only-{name}", "rl", EVAL + argv, expect) for name, argv, expect in [
    ("training-flags", ["--steps", "100", "--lr", "1", "--length_reward", "kimi", "--levels", "1"],
     r"--steps, --levels, --lr, --length_reward only matter for training: --eval_only takes --init_from, "
     r"--out_dir, --eval_problems, --device, --dtype, --threads \(and --length_reward l1 --l1_eval_target N"),
    ("seed", ["--seed", "3"], r"--seed only matters for training: --eval_only takes"),
    ("max-new-tokens", ["--max_new_tokens", "16"], r"--max_new_tokens only matters for training"),
    ("temperature", ["--temperature", "0.5"], r"--temperature only matters for training"),
    ("overwrite", ["--overwrite"], r"--overwrite only matters for training"),
    ("length-reward-none", ["--length_reward", "none"], r"--length_reward only matters for training"),
    ("l1-targets", ["--length_reward", "l1", "--l1_targets", "16"], r"--l1_targets only matters for training"),
    ("l1-eval-target-without-l1", ["--l1_eval_target", "64"],
     r"--l1_eval_target applies only to --length_reward l1, not laser \(the default\): drop it"),
]]
CASES += [Case("rl-eval-only-toml-steps", "rl", EVAL + ["--config", "e.toml"], r"--steps only matters for training",
               lambda w: open(os.path.join(w, "e.toml"), "w").write("steps = 5\n"))]

# ... an objective's flags where no run uses that objective (rewards.py: none adds no term, gfpo no strength) ...
CASES += [
    flag("laser_coverage", 0.2, r"--laser_coverage applies only to --length_reward laser, not kimi: drop it",
         "--length_reward", "kimi"),
    flag("gfpo_keep", 2, r"--gfpo_keep applies only to --length_reward gfpo, not laser \(the default\)"),
    flag("gfpo_metric", "efficiency", r"--gfpo_metric applies only to --length_reward gfpo, not none",
         "--length_reward", "none"),
    flag("l1_targets", "16,32", r"--l1_targets applies only to --length_reward l1, not kimi",
         "--length_reward", "kimi"),
    flag("l1_eval_target", 64, r"--l1_eval_target applies only to --length_reward l1, not arora",
         "--length_reward", "arora"),
    flag("alpha", 0.3, r"--alpha applies only to --length_reward kimi\|arora\|l1\|adaptthink\|laser, not none",
         "--length_reward", "none"),
    flag("alpha", 0.4, r"--alpha applies only to .*, not gfpo", "--length_reward", "gfpo", "--gfpo_keep", "2"),
    flag("solve_threshold", 0.3, r"--solve_threshold applies only to .*, not none", "--length_reward", "none"),
    flag("penalty_warmup", 2, r"--penalty_warmup applies only to .*, not gfpo", "--length_reward", "gfpo",
         "--gfpo_keep", "2"),
    # under --sweep a flag applies when any of its runs uses the objective
    flag("laser_coverage", 0.3, r"--laser_coverage applies only to --length_reward laser, and no run of --sweep "
         r"none,kimi:0.5 takes it", "--sweep", "none,kimi:0.5"),
    flag("gfpo_keep", 1, r"no run of --sweep 0.25,0.5 takes it",
         "--sweep", "0.25,0.5", "--length_reward", "kimi"),
    flag("alpha", 0.2, r"--alpha .* --sweep 0.25,0.5 takes it \(each of its runs has its own strength\)",
         "--sweep", "0.25,0.5", "--length_reward", "kimi"),
    flag("alpha", 0.25, r"--alpha .* no run of --sweep none,gfpo takes it", "--sweep", "none,gfpo"),
    # ... and what --sweep sets per run
    flag("length_reward", "kimi", r"--length_reward: every run of --sweep none,kimi:0.5 names its objective",
         "--sweep", "none,kimi:0.5"),
    flag("seed", 3, r"--seed: --sweep_seeds 1,2 gives every run its seed",
         "--sweep", "none", "--sweep_seeds", "1,2"),
    # a resumed run is held to its saved objective (rl/ is a laser run), not to the default
    Case("rl-resume-unused-gfpo-keep", "rl", RESUME + ["--steps", "4", "--gfpo_keep", "4"],
         r"--gfpo_keep applies only to --length_reward gfpo, not laser \(the run being resumed's\)"),
]


def _rl_with_marks(edit):
    """setup: a copy of the rl/ run at bad_rl/ whose checkpoint's data marks edit() changes."""
    def setup(w):
        import shutil
        import torch
        shutil.copytree(os.path.join(w, "rl"), os.path.join(w, "bad_rl"))
        path = os.path.join(w, "bad_rl", "ckpt.pt")
        ck = torch.load(path, weights_only=True)
        edit(ck["data_marks"])
        torch.save(ck, path)
    return setup


# a run resumed on a dataset rebuilt since, or on data in other tokens
CASES += [
    Case("rl-resume-data-rebuilt", "rl", ["--resume", "--out_dir", "bad_rl", "--threads", "1", "--steps", "4"],
         r"has changed since bad_rl/ckpt.pt was saved \(its meta.json differs\)",
         _rl_with_marks(lambda m: m.update(meta="0" * 40))),
    Case("rl-resume-other-tokens", "rl", ["--resume", "--out_dir", "bad_rl", "--threads", "1", "--steps", "4"],
         r"bad_rl/ckpt.pt was trained on text in other tokens", _rl_with_marks(lambda m: m.update(probe=[1]))),
]

CASES += [
    Case("rl-init-from-run-folder", "rl", BASE + ["--init_from", "run"],
         r"--init_from run is a folder \(a run folder: give run/ckpt.pt\)"),
]
