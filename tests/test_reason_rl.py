"""reason_rl.py: each reward and advantage formula on hand-made groups, prompt masking, the loss normalisations on a
known batch, the clipped surrogate, and short end-to-end runs on a tiny model (metrics written, exact resume)."""
import glob
import json
import math
import os

import pytest
import torch

import reason_rl as rl
from data.prepare import prepare_reasoning
from data.tasks import TaskConfig
from model import GPT, GPTConfig
from config import UserError
from checkpoint import save_checkpoint
from config import parse_config

sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731


# ----------------------------------------------------------------------------- length rewards

def test_kimi_length_reward_on_hand_made_groups():
    T, F = True, False
    assert rl.kimi_length_reward([10, 20, 30], [T, T, F], [T] * 3) == [0.5, 0.0, -0.5]
    # a short wrong answer is not rewarded for being short: min(0, lambda)
    assert rl.kimi_length_reward([10, 30], [F, T], [T, T]) == [0.0, -0.5]
    assert rl.kimi_length_reward([7, 7, 7], [T, F, T], [T] * 3) == [0.0, 0.0, 0.0]  # ties: no length signal
    assert rl.kimi_length_reward([10, 40, 20], [F, F, F], [T] * 3) == [0.0, -0.5, 0.0]  # all wrong
    # a left-out sample neither sets min/max nor gets a length term
    assert rl.kimi_length_reward([5, 10, 30], [T, T, T], [F, T, T]) == [0.0, 0.5, -0.5]


def test_arora_penalty_uses_the_length_z_score_among_correct_samples():
    T, F = True, False
    a = 0.4
    out = rl.arora_length_reward([10, 30, 99], [T, T, F], [T] * 3, a)  # correct: mean 20, std 10 -> z = -1, +1
    assert out[0] == pytest.approx(-a * sig(-1)) and out[1] == pytest.approx(-a * sig(1)) and out[2] == 0.0
    assert rl.arora_length_reward([10, 20], [T, F], [T, T], a) == [pytest.approx(-a / 2), 0.0]  # one correct: z=0
    assert rl.arora_length_reward([12, 12], [T, T], [T, T], a) == [pytest.approx(-a / 2)] * 2  # ties
    assert rl.arora_length_reward([5, 9], [F, F], [T, T], a) == [0.0, 0.0]


def test_l1_reward_is_minus_alpha_times_distance_to_the_target():
    assert rl.l1_length_reward([10, 50, 32], [32, 32, 32], 0.01) == pytest.approx([-0.22, -0.18, 0.0])


def test_gfpo_keeps_the_k_shortest_or_most_efficient():
    lengths, rewards = [30, 10, 20, 10], [1.0, 0.0, 1.0, 1.0]
    assert rl.gfpo_keep_mask(lengths, rewards, [True] * 4, 2) == [False, True, False, True]
    assert rl.gfpo_keep_mask(lengths, rewards, [True] * 4, 2, "efficiency") == [False, False, True, True]
    assert rl.gfpo_keep_mask(lengths, rewards, [True, False, True, True], 2) == [False, False, True, True]


# ----------------------------------------------------------------------------- advantages and scoring

def test_group_advantages_zscore_and_mean_and_degenerate_groups():
    std = math.sqrt(4 * 0.25 / 3)  # sample std of [1, 0, 0, 1]
    assert rl.group_advantages([1, 0, 0, 1], [True] * 4) == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std,
                                                                          0.5 / std])
    assert rl.group_advantages([1, 0, 0, 1], [True] * 4, "mean") == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert rl.group_advantages([1, 1, 1], [True] * 3) == [0.0] * 3  # all correct
    assert rl.group_advantages([0, 0, 0], [True] * 3) == [0.0] * 3  # all wrong
    assert rl.group_advantages([1, 0, 5], [True, True, False], "mean") == [0.5, -0.5, 0.0]  # left out: 0, unused
    assert rl.group_advantages([1, 0], [True, False]) == [0.0, 0.0]  # one kept sample: nothing to compare


def sample(length, correct, finished=True, target=None):
    return dict(length=length, correct=correct, finished=finished, target=target, style=None)


def cfg(**kw):
    return rl.RLConfig(**{"group_size": 4, **kw})


def test_truncated_samples_get_zero_reward_or_are_masked():
    group = [sample(10, True), sample(20, False), sample(40, False, finished=False), sample(12, True)]
    rl.score(group, cfg(length_reward="none", truncated="zero"), 1.0)
    assert [s["reward"] for s in group] == [1.0, 0.0, 0.0, 1.0] and all(s["keep"] for s in group)
    rl.score(group, cfg(length_reward="none", truncated="mask"), 1.0)
    assert [s["keep"] for s in group] == [True, True, False, True] and group[2]["adv"] == 0.0
    assert group[1]["adv"] < 0 < group[0]["adv"]


def test_length_term_waits_for_the_solve_threshold_and_ramps_with_warmup():
    def rewards(group, **kw):
        rl.score(group, cfg(length_reward="kimi", alpha=1.0, **kw), kw.pop("scale", 1.0))
        return [s["reward"] for s in group]
    solved = [sample(10, True), sample(30, True), sample(20, False), sample(20, True)]
    assert rewards(solved, solve_threshold=0.5) == [1.5, 0.5, 0.0, 1.0]
    assert rewards(solved, solve_threshold=0.8) == [1.0, 1.0, 0.0, 1.0]  # 75% solved: no length term yet
    rl.score(solved, cfg(length_reward="kimi", alpha=1.0, solve_threshold=0.5), 0.5)  # half-way through warm-up
    assert [s["reward"] for s in solved] == [1.25, 0.75, 0.0, 1.0]


def test_all_equal_groups_are_counted_as_flat():
    group = [sample(10, True)] * 4 + [sample(10, True), sample(9, False), sample(10, True), sample(10, True)]
    flat = rl.score([dict(s) for s in group], cfg(length_reward="none"), 1.0)
    assert flat == 0.5


# ----------------------------------------------------------------------------- the loss

def test_token_weights_for_each_normalisation():
    lengths, keep = [2, 4, 6], [True, True, False]
    assert rl.token_weights(lengths, keep, "seq", 10) == pytest.approx([1 / 4, 1 / 8, 0.0])
    assert rl.token_weights(lengths, keep, "token", 10) == pytest.approx([1 / 6, 1 / 6, 0.0])
    assert rl.token_weights(lengths, keep, "const", 10) == pytest.approx([1 / 20, 1 / 20, 0.0])


def test_on_policy_loss_is_the_normalised_advantage_weighted_token_count():
    # ratio 1 everywhere: loss = -sum_i w_i * A_i * (tokens of i), the normalisations above on a known batch
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]])
    logp = torch.zeros(2, 4)
    adv = torch.tensor([1.0, -0.25])
    # seq: the mean over sequences of each one's mean token term; token: over all 6 tokens; const: over 2 x 8
    for norm, want in [("seq", -(1.0 - 0.25) / 2), ("token", -(2 * 1.0 - 4 * 0.25) / 6),
                       ("const", -(2 * 1.0 - 4 * 0.25) / (2 * 8))]:
        w = torch.tensor(rl.token_weights([2, 4], [True, True], norm, 8))
        loss = rl.policy_loss(logp, logp, adv, w, mask, 0.2, 0.28)
        assert loss.item() == pytest.approx(want)


def test_clipping_stops_the_gradient_outside_the_trust_region():
    mask, w = torch.ones(1, 2), torch.ones(1)
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)  # ratios 1.5 (clipped) and 1.1
    rl.policy_loss(logp, old, torch.tensor([1.0]), w, mask, 0.2, 0.28).backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == pytest.approx(-1.1)
    logp.grad = None
    low = torch.tensor([[math.log(0.7), math.log(0.9)]], requires_grad=True)  # negative advantage, below 1 - 0.2
    rl.policy_loss(low, old, torch.tensor([-1.0]), w, mask, 0.2, 0.28).backward()
    assert low.grad[0, 0] == 0 and low.grad[0, 1] == pytest.approx(0.9)


def test_k3_kl_is_zero_at_the_reference_and_positive_away_from_it():
    mask, w, adv = torch.ones(1, 3), torch.ones(1), torch.zeros(1)
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    assert rl.policy_loss(logp, logp, adv, w, mask, 0.2, 0.2, logp, 1.0).item() == pytest.approx(0.0)
    assert rl.policy_loss(logp, logp, adv, w, mask, 0.2, 0.2, logp - 0.3, 1.0).item() > 0


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
    loss = rl.policy_loss(logp, logp.detach(), torch.tensor([1.0, 1.0]), torch.ones(2), mask, 0.2, 0.2)
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
    with open(os.path.join(out, "summary.json")) as f:
        saved = json.load(f)
    assert saved["end"]["by_level"] and summary["token_change"] == saved["token_change"]
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
                         (["--group_size", "1"], "--group_size must be >= 2")]:
        with pytest.raises(SystemExit) as e:
            rl.main(args + ["--out_dir", str(tmp_path / "x")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, err


def test_eval_only_prints_the_per_level_table(tiny_ckpt, tmp_path, capsys):
    rl.main(["--eval_only", "--init_from", tiny_ckpt, "--eval_problems", "2", "--out_dir", str(tmp_path / "e")])
    out = capsys.readouterr().out
    assert "untagged" in out and "tokens/correct" in out
    assert os.path.exists(tmp_path / "e" / "eval.json")


def test_sweep_runs_the_baseline_and_each_strength_and_writes_the_table(tiny_ckpt, tmp_path, parity_reward):
    out = str(tmp_path / "sw")
    argv = ARGS + ["--init_from", tiny_ckpt, "--out_dir", out, "--steps", "1", "--sweep", "0.5"]
    results = rl.sweep(*parse_config(rl.RLConfig, argv))
    assert [(r["length_reward"], r["alpha"]) for r in results] == [("none", 0.0), ("kimi", 0.5)]
    with open(os.path.join(out, "sweep.md")) as f:
        table = f.read().splitlines()
    assert len(table) == 2 + 1 + 2  # header, rule, the start checkpoint, one row per run
    assert table[3].startswith("| none | 0 |") and table[4].startswith("| kimi | 0.5 |")
    with pytest.raises(UserError, match="already holds a run"):  # a second sweep never replaces the first
        rl.sweep(*parse_config(rl.RLConfig, argv))


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
