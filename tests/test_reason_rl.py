"""reason_rl.py: each reward and advantage formula on hand-made groups, prompt masking, the loss normalisations on a
known batch, the clipped surrogate, and short end-to-end runs on a tiny model (metrics written, exact resume)."""
import glob
import json
import math
import os

import pytest
import torch

import reason_rl as rl
import rewards
from data.prepare import prepare_reasoning
from data.tasks import TaskConfig
from model import GPT, GPTConfig
from config import UserError
from checkpoint import save_checkpoint
from config import parse_config

# ----------------------------------------------------------------------------- the loss

def test_prompt_tokens_are_masked_and_get_no_gradient():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=20, n_layer=1, n_head=2, n_embd=16))
    rows = [([1, 2, 3], [4, 5]), ([1, 2], [6, 7, 8, 9])]
    logp, mask = rl.token_logprobs(m, rows, "cpu", torch.autocast("cpu", enabled=False))
    assert mask.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
    # the masked log-probs are exactly those of the generated tokens under a plain forward
    full = torch.log_softmax(m(torch.tensor([[1, 2, 3, 4, 5]]), last_only=False)[0], -1)[0]
    torch.testing.assert_close(logp[0, 2:4], torch.stack([full[2, 4], full[3, 5]]))
    emb = m.transformer.wte.weight
    loss = rewards.policy_loss(logp, logp.detach(), torch.tensor([1.0, 1.0]), torch.ones(2), mask, 0.2, 0.2)
    g_prompt = torch.autograd.grad(loss, logp)[0]
    assert (g_prompt[mask == 0] == 0).all() and (g_prompt[mask == 1] != 0).all()
    assert emb.requires_grad


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    corpus = str(d / "corpus")
    prepare_reasoning(corpus, TaskConfig(train_examples=200, val_examples=40, test_per_level=3), verbose=False)
    with open(os.path.join(corpus, "meta.json")) as f:
        vocab = json.load(f)["vocab_size"]
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=48, vocab_size=vocab, n_layer=1, n_head=2, n_embd=32, rope_heads=1))
    path = str(d / "ckpt.pt")
    from dataclasses import asdict
    save_checkpoint(path, dict(model=m.state_dict(), model_config=asdict(m.config), dataset=corpus))
    return path


ARGS = ["--steps", "3", "--prompts_per_step", "3", "--group_size", "4", "--max_new_tokens", "12",
        "--eval_problems", "2", "--threads", "1", "--micro_batch", "5", "--lr", "1e-3"]


@pytest.fixture()
def parity_reward(monkeypatch):
    """An untrained model never finishes or answers right; this reward (ended, and an even sum of ids) gives
    groups with mixed rewards so every step really updates the model."""
    orig = rl.rollout

    def rollout(*a, **k):
        out = orig(*a, **k)
        for s in out:
            s["finished"], s["correct"] = True, sum(s["ids"]) % 2 == 0
        return out
    monkeypatch.setattr(rl, "rollout", rollout)


def test_short_run_writes_metrics_and_summary(tiny_ckpt, tmp_path, parity_reward):
    out = str(tmp_path / "run")
    summary = rl.run(*parse_config(rl.RLConfig, ARGS + ["--init_from", tiny_ckpt, "--out_dir", out]))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    steps = [r for r in recs if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("reward", "accuracy", "len_correct", "len_wrong", "truncated", "zero_variance_groups",
                "tokens_per_correct", "styles", "loss"):
        assert key in steps[0]
    assert any(r["loss"] != 0 for r in steps)  # the parity reward gives mixed groups: real updates
    evals = [r for r in recs if "eval" in r]  # the start and the end evaluation, with the field's figures
    assert [r.get("start", False) for r in evals] == [True, False] and evals[-1]["final"]
    for r in evals:
        assert set(r["eval"]["budget_accuracy"]) == {"32", "64", "128"} and "len_correct" in r["eval"]
        assert set(r["eval"]["by_level"]["1"]["chose"]) == {"direct", "minimal", "verbose"}
    with open(os.path.join(out, "summary.json")) as f:
        saved = json.load(f)
    assert saved["end"]["by_level"] and summary["token_change"] == saved["token_change"]
    assert saved["end"]["budget_accuracy"] and "tokens_per_correct" in saved["end"]
    # --dtype auto is saved as what it resolved to, so a resume on another machine keeps the precision
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]["dtype"] in ("float32", "bfloat16")


def test_resume_is_exact(tiny_ckpt, tmp_path, parity_reward):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ARGS + ["--init_from", tiny_ckpt, "--temperature", "1.0", "--kl_coef", "0.1", "--epochs", "2"]
    rl.run(*parse_config(rl.RLConfig, common + ["--out_dir", a]))
    assert rl.run(*parse_config(rl.RLConfig, common + ["--out_dir", b, "--stop_after", "1"])) is None
    rl.run(*parse_config(rl.RLConfig, ["--resume", "--out_dir", b]))
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (a, b))
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k

    def steps(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return [{k: v for k, v in r.items() if k not in ("s", "gen_s")} for r in map(json.loads, f)
                    if "reward" in r]
    assert steps(a) == steps(b) and len(steps(a)) == 3


def test_bad_input_is_a_one_line_error(tiny_ckpt, tmp_path, capsys):
    for args, needle in [(["--lenght_reward", "kimi"], "--length_reward"),
                         (["--length_reward", "short"], "must be one of"),
                         (["--init_from", str(tmp_path / "none.pt")], "no checkpoint"),
                         (["--group_size", "1"], "--group_size must be >= 2"),
                         (["--laser_coverage", "0"], "--laser_coverage"),
                         (["--resample_rounds", "-1"], "--resample_rounds"),
                         (["--optim", "sgd"], "--optim"),
                         (["--advantage", "batchwise"], "--advantage"),
                         (["--sweep_seeds", "1,x"], "--sweep_seeds"),
                         (["--sweep", "kimi:strong"], "--sweep"),
                         (["--sweep", "none,fastest"], "--sweep")]:
        with pytest.raises(SystemExit) as e:
            rl.main(args + ["--out_dir", str(tmp_path / "x")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, err


def test_eval_only_prints_the_per_level_table(tiny_ckpt, tmp_path, capsys):
    rl.main(["--eval_only", "--init_from", tiny_ckpt, "--eval_problems", "2", "--out_dir", str(tmp_path / "e")])
    out = capsys.readouterr().out
    assert "untagged" in out and "tokens/correct" in out
    assert len(glob.glob(str(tmp_path / "e" / "eval_only_*.json"))) == 1


@pytest.mark.parametrize("argv", [
    ["--sweep", "none,kimi:0.5,laser:0.5", "--laser_coverage", "0.2"],  # laser is one of the runs
    ["--sweep", "0.25,0.5", "--length_reward", "l1", "--l1_targets", "16,32", "--l1_eval_target", "64"],
    ["--sweep", "none,gfpo:0.5", "--gfpo_keep", "2", "--gfpo_metric", "efficiency", "--solve_threshold", "0.3"],
    ["--sweep", "none,kimi:0.5,adaptthink", "--alpha", "0.3", "--penalty_warmup", "5", "--sweep_seeds", "1,2"],
    ["--sweep", "0.5,kimi:0.5", "--length_reward", "laser", "--seed", "7"],  # a bare strength varies it
    ["--length_reward", "gfpo", "--gfpo_keep", "2", "--solve_threshold", "0.7"],
    ["--length_reward", "l1", "--alpha", "0.01", "--l1_targets", "16", "--penalty_warmup", "3"],
    ["--eval_only", "--init_from", "x.pt", "--out_dir", "e", "--eval_problems", "5", "--device", "cpu",
     "--dtype", "float32", "--threads", "1", "--length_reward", "l1", "--l1_eval_target", "64"],
])
def test_flags_that_apply_to_some_run_are_taken(argv):
    assert list(rl.unused_flags(*parse_config(rl.RLConfig, argv))) == []


def test_a_default_is_never_refused():
    cfg = rl.RLConfig(eval_only=True, length_reward="none", steps=3, seed=5, sweep="", laser_coverage=0.3)
    assert list(rl.unused_flags(cfg, {"eval_only"})) == []
    sweep = rl.RLConfig(sweep="none,kimi:0.5", sweep_seeds="1,2", gfpo_keep=2)
    assert list(rl.unused_flags(sweep, {"sweep", "sweep_seeds"})) == []


def test_a_resumed_run_is_held_to_its_saved_objective(tiny_ckpt, tmp_path, parity_reward):
    """Flags of the saved objective are taken on --resume (the command line's default objective is laser), and
    a flag no saved run reads is refused with the objective it was saved with."""
    out = str(tmp_path / "gfpo")
    rl.run(*parse_config(rl.RLConfig, ARGS + ["--init_from", tiny_ckpt, "--out_dir", out, "--length_reward", "gfpo",
                                              "--gfpo_keep", "2", "--stop_after", "1"]))
    with pytest.raises(UserError, match=r"--laser_coverage applies only to .* laser, not gfpo \(the run being"):
        rl.run(*parse_config(rl.RLConfig, ["--resume", "--out_dir", out, "--laser_coverage", "0.125"]))
    summary = rl.run(*parse_config(rl.RLConfig, ["--resume", "--out_dir", out, "--gfpo_keep", "2"]))
    assert summary["step"] == 3 and summary["config"]["length_reward"] == "gfpo"


def test_sweep_runs_the_baseline_and_each_strength_and_writes_the_table(tiny_ckpt, tmp_path, parity_reward):
    out = str(tmp_path / "sw")
    argv = ARGS + ["--init_from", tiny_ckpt, "--out_dir", out, "--steps", "1", "--sweep", "0.5"]
    results = rl.sweep(*parse_config(rl.RLConfig, argv))
    assert [(r["length_reward"], r["alpha"]) for r in results] == [("none", 0.0), ("laser", 0.5)]
    with open(os.path.join(out, "sweep.md")) as f:
        table = f.read().splitlines()
    assert len(table) == 2 + 1 + 2  # header, rule, the start checkpoint, one row per run
    assert table[3].startswith("| none | 0 |") and table[4].startswith("| laser | 0.5 |")
    with pytest.raises(UserError, match="already holds a run"):  # a second sweep never replaces the first
        rl.sweep(*parse_config(rl.RLConfig, argv))


def test_sweep_compares_methods_over_seeds_with_means_and_a_pareto_plot(tiny_ckpt, tmp_path, parity_reward):
    out = str(tmp_path / "methods")
    argv = ARGS + ["--init_from", tiny_ckpt, "--out_dir", out, "--steps", "1", "--eval_problems", "1",
                   "--sweep", "none,kimi:0.25,adaptthink", "--alpha", "0.3", "--sweep_seeds", "7,8"]
    results = rl.sweep(*parse_config(rl.RLConfig, argv))
    assert [(r["length_reward"], r["alpha"], r["seed"]) for r in results] == \
        [("none", 0.0, 7), ("none", 0.0, 8), ("kimi", 0.25, 7), ("kimi", 0.25, 8), ("adaptthink", 0.3, 7),
         ("adaptthink", 0.3, 8)]
    table = open(os.path.join(out, "sweep.md")).read().splitlines()
    assert len(table) == 2 + 1 + 6 + 3  # header, rule, start, a row per run, a mean row per method
    assert table[-1].startswith("| **adaptthink (mean)** | 0.3 | 2 seeds |")
    for col in ("acc @32/@64/@128", "len right/wrong", "L1 acc / tokens / style", "vs none"):
        assert col in table[0]
    svg = open(os.path.join(out, "sweep.svg")).read()
    assert svg.count("<circle") == 6 * 5 + 3  # 6 runs in 5 panels (all, 4 levels), a legend marker per method
    for name in ("none 0", "kimi 0.25", "adaptthink 0.3", "start"):
        assert f">{name}</text>" in svg
    with pytest.raises(UserError, match="neither a strength >= 0 nor one of"):
        rl.sweep(*parse_config(rl.RLConfig, argv[:-6] + ["--sweep", "kimi,shortest"]))


# ----------------------------------------------------------------------------- every kind of checkpoint

def _tiny_model(vocab, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=48, vocab_size=vocab, n_layer=1, n_head=2, n_embd=32, rope_heads=1))


def _make_kind(kind, vocab):
    """A tiny model as each writer of checkpoints leaves it: QAT's fake-quant layers, PTQ's converted int4
    layers, LoRA adapters over each kind of frozen base."""
    import lora
    import quant
    m = _tiny_model(vocab)
    if kind == "llama":  # RMSNorm, SwiGLU, grouped-query attention, rope on every head, an untied head
        torch.manual_seed(0)
        m = GPT(GPTConfig(block_size=48, vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, bias=False,
                          rope_heads=2, norm="rmsnorm", mlp="swiglu", intermediate_size=64, learned_pos=False,
                          tie_embeddings=False))
    elif kind == "qat":
        quant.quantize_(m, "w4g32")
    elif kind == "ptq_int4":
        quant.convert_(quant.apply_ptq_(m, "rtn", "w4g32"))
    elif kind.startswith("lora_"):
        lora.add_lora_(m, 4, 8.0, base=kind.removeprefix("lora_"))
    return m


CKPT_KINDS = ["float", "qat", "ptq_int4", "lora_float", "lora_int4g32", "lora_nf4g32", "lora_nf4g32-dq", "llama"]


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory):
    """{kind: checkpoint path}: one per kind on the addition corpus, and a float one on subtraction."""
    from checkpoint import model_state
    from data.tasks import subtraction_task
    d = tmp_path_factory.mktemp("kinds")
    corpora = {"add": str(d / "add"), "sub": str(d / "sub")}
    prepare_reasoning(corpora["add"], TaskConfig(train_examples=200, val_examples=40, test_per_level=2),
                      verbose=False)
    prepare_reasoning(corpora["sub"], subtraction_task(train_examples=200, val_examples=40, test_per_level=2),
                      verbose=False)
    vocab = json.load(open(os.path.join(corpora["add"], "meta.json")))["vocab_size"]
    paths = {}
    for kind in CKPT_KINDS + ["subtraction"]:
        m = _make_kind("float" if kind == "subtraction" else kind, vocab)
        paths[kind] = str(d / f"{kind}.pt")
        save_checkpoint(paths[kind], {**model_state(m), "dataset": corpora["sub" if kind == "subtraction" else "add"]})
    return paths


@pytest.mark.parametrize("kind", CKPT_KINDS + ["subtraction"])
def test_every_kind_of_checkpoint_evaluates_in_reason_rl_and_train(every_kind, kind, tmp_path, capsys):
    levels = {"subtraction": {5, 6}}.get(kind, {1, 2, 3, 4})
    e = rl.run(*parse_config(rl.RLConfig, ["--eval_only", "--init_from", every_kind[kind], "--eval_problems", "2",
                                           "--threads", "1", "--out_dir", str(tmp_path / "rl")]))
    assert {r["level"] for r in e["rows"]} == levels
    import train
    train.main(["--eval_only", "--init_from", every_kind[kind], "--final_problems", "1", "--eval_iters", "1",
                "--batch_size", "2", "--samples", "0", "--threads", "1", "--out_dir", str(tmp_path / "tr")])
    result = json.load(open(glob.glob(str(tmp_path / "tr" / "eval_only_*.json"))[0]))
    assert {r["level"] for r in result["rows"]} == levels and math.isfinite(result["val_loss"])
    import bench
    rows = bench.main(["generate", "--quick", "--device", "cpu", "--init_from", every_kind[kind]])
    assert rows and all(r["ours"] > 0 and r["baseline"] > 0 for r in rows)


@pytest.mark.parametrize("kind", ["ptq_int4", "lora_nf4g32", "subtraction", "llama"])
def test_rl_trains_from_quantized_adapter_and_subtraction_checkpoints(every_kind, kind, tmp_path, parity_reward):
    from checkpoint import load_model
    out = str(tmp_path / "run")
    rl.run(*parse_config(rl.RLConfig, ARGS + ["--init_from", every_kind[kind], "--out_dir", out, "--steps", "2"]))
    before, _ = load_model(every_kind[kind])
    after, ck = load_model(os.path.join(out, "ckpt.pt"))  # the RL checkpoint rebuilds the same kind of model
    b, a = before.state_dict(), after.state_dict()
    assert b.keys() == a.keys()
    changed = {k for k in b if not torch.equal(a[k], b[k])}
    assert changed, "two updates changed nothing"
    if kind == "lora_nf4g32":  # only the adapters train; the frozen 4-bit base and the rest stay as they were
        assert all("lora_" in k for k in changed), changed
    if kind == "ptq_int4":  # the packed int4 weights are buffers: they never change
        assert not any(k.endswith(("packed", "scales", "zeros")) for k in changed)


# ----------------------------------------------------------------------------- dynamic sampling

def test_dynamic_sampling_rerolls_flat_groups_up_to_the_cap_and_logs_them(tiny_ckpt, tmp_path, monkeypatch):
    """Every first rollout of a step is all right (flat groups); re-rolls are right on even rows only (mixed),
    except with cap 0. Each flat group is re-rolled once (then it carries signal) and counted."""
    orig, calls = rl.rollout, []

    def rollout(*a, **k):
        out = orig(*a, **k)
        calls.append(len(out))
        first = len(calls) % 2 == 1  # the batch of a step (calls 1, 3), then the re-roll of its flat groups
        for i, s in enumerate(out):
            s["finished"], s["correct"] = True, first or i % 2 == 0
        return out
    monkeypatch.setattr(rl, "rollout", rollout)
    out = str(tmp_path / "ds")
    rl.run(*parse_config(rl.RLConfig, ARGS + ["--init_from", tiny_ckpt, "--out_dir", out, "--steps", "2",
                                              "--length_reward", "none", "--resample_rounds", "3"]))
    steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in steps if "reward" in r]
    assert calls == [12, 12, 12, 12]  # per step: the batch, then one re-roll of its 3 flat groups
    for r in steps:
        assert r["flat_before_resampling"] == 1.0 and r["zero_variance_groups"] == 0.0
        assert r["resampled_groups"] == 3 and r["extra_rollouts"] == 12 and r["loss"] != 0


def test_dynamic_sampling_stops_at_the_cap(tiny_ckpt, tmp_path, monkeypatch):
    orig, calls = rl.rollout, []

    def rollout(*a, **k):  # always all right: every group stays flat
        out = orig(*a, **k)
        calls.append(len(out))
        for s in out:
            s["finished"], s["correct"] = True, True
        return out
    monkeypatch.setattr(rl, "rollout", rollout)
    out = str(tmp_path / "cap")
    rl.run(*parse_config(rl.RLConfig, ARGS + ["--init_from", tiny_ckpt, "--out_dir", out, "--steps", "1",
                                              "--length_reward", "none", "--resample_rounds", "2"]))
    rec = next(r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "reward" in r)
    assert calls == [12, 12, 12] and rec["resampled_groups"] == 6 and rec["extra_rollouts"] == 24
    assert rec["zero_variance_groups"] == 1.0 and rec["loss"] == 0.0  # nothing to learn from: no update


def test_rl_on_a_qlora_checkpoint_with_adamw8bit_then_merge_and_requantize(every_kind, tmp_path, parity_reward):
    """RL on a 4-bit base trains only the adapters, with 8-bit Adam moments; train.py merges its checkpoint into
    float weights and requantizes it (--lora_merge --ptq)."""
    import train
    from checkpoint import load_checkpoint, load_model
    out = str(tmp_path / "rl")
    rl.run(*parse_config(rl.RLConfig, ARGS + ["--init_from", every_kind["lora_nf4g32"], "--out_dir", out,
                                              "--steps", "2", "--optim", "adamw8bit"]))
    ck = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ck["config"]["optim"] == "adamw8bit" and ck["optimizer"]["state"]
    before, _ = load_model(every_kind["lora_nf4g32"])
    after, _ = load_model(os.path.join(out, "ckpt.pt"))
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert changed and all("lora_" in k for k in changed), changed
    train.main(["--init_from", os.path.join(out, "ckpt.pt"), "--lora_merge", "--ptq", "rtn", "--ptq_spec", "nf4g32",
                "--final_problems", "1", "--eval_iters", "1", "--batch_size", "2", "--samples", "0",
                "--threads", "1", "--out_dir", str(tmp_path / "merged")])
    merged, _ = load_model(str(tmp_path / "merged" / "ckpt.pt"))
    assert not any("lora_" in k for k in merged.state_dict())
    assert any(k.endswith("packed") for k in merged.state_dict())  # requantized to packed 4-bit weights


def test_the_memory_check_counts_rollouts_as_long_as_they_can_be_and_one_reference_copy(tiny_ckpt, monkeypatch):
    import memory
    import runtime
    seen = []
    monkeypatch.setattr(memory, "too_big", lambda est, device, procs=1: seen.append(est["peak"]))
    env = runtime.setup("cpu", "float32", 1, 0, distributed=False)

    def needed(*flags):
        cfg, _ = parse_config(rl.RLConfig, ["--init_from", tiny_ckpt, "--prompts_per_step", "64", *flags])
        policy = rl.load_policy(tiny_ckpt, cfg, env)
        rl.refuse_what_cannot_fit(policy, cfg, env)
        return seen[-1], policy
    whole, policy = needed()
    capped, capped_policy = needed("--max_new_tokens", "8")
    assert policy.longest + policy.max_new == policy.model.config.block_size - 1
    assert capped < whole  # rows of longest prompt + 8 tokens, not of block_size
    with_ref, _ = needed("--kl_coef", "0.1")
    assert with_ref - whole == memory.weight_bytes(policy.model)  # the frozen copy: its weights, nothing more
