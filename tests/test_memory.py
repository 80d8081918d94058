"""Memory-saving training: activation checkpointing (model.py) and the chunked linear cross-entropy (kernels.py)
give the plain gradients; memory.py's estimate meets measured peaks and its planner keeps to a budget; FSDP2 in
train.py follows DDP's loss curve and its checkpoints resume at other world sizes."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
import lora
import memory
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**kw):
    return GPTConfig(**{**dict(block_size=32, vocab_size=67, n_layer=3, n_head=2, n_embd=16, rope_heads=1), **kw})


def batch(cfg, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=g)
    y = torch.roll(x, -1, 1)
    y[:, :5] = -1  # a masked prompt, as the loader makes
    return x, y


def loss_and_grads(model, x, y, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks for every variant
    loss = model(x, y, **kw)[1]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def saved_bytes(model, x, y):
    """Bytes autograd keeps for backward (outside checkpointed blocks, whose insides are recomputed)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)
    return sum(seen.values())


# ----------------------------------------------------------------------------- exact gradients

@pytest.mark.parametrize("every", [1, 2])
def test_grad_ckpt_gives_the_plain_gradients_and_keeps_less(every):
    torch.manual_seed(0)
    model = GPT(tiny_config(dropout=0.1)).train()
    x, y = batch(model.config)
    loss0, g0 = loss_and_grads(model, x, y)
    kept0 = saved_bytes(model, x, y)
    model.grad_ckpt_every = every
    loss1, g1 = loss_and_grads(model, x, y)
    assert saved_bytes(model, x, y) < kept0  # the blocks really are checkpointed
    # the recomputation replays the same fp32 ops on the same inputs with the same dropout masks (the RNG state
    # is saved and restored), so the results agree to round-off; in practice they are bitwise equal
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-8, msg=n)


def test_chunked_loss_gives_the_plain_loss_and_gradients():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    x, y = batch(model.config)
    loss0, g0 = loss_and_grads(model, x, y)
    lce = lambda h, w, t: kernels.linear_cross_entropy(h, w, t, chunk_rows=16)  # 6 chunks of the 96 rows
    loss1, g1 = loss_and_grads(model, x, y, loss_fn=lce)
    assert model(x, y, loss_fn=lce)[0] is None  # no logits are made
    # fp32 sums taken in another order (per chunk, softmax by max-subtract-exp-divide): round-off only
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("N,C,V,rows", [(7, 24, 131, 3), (1, 8, 5, None), (33, 16, 200, None), (40, 8, 64, 16)])
def test_linear_cross_entropy_matches_float64_reference(backend, N, C, V, rows):
    """Awkward shapes: V not a multiple of the kernel's block (64 under the interpreter), a last chunk that is
    short, a single row, ignored rows; "triton" runs the kernel under TRITON_INTERPRET=1 on CPU."""
    g = torch.Generator().manual_seed(N * V)
    h = torch.randn(N, C, generator=g, requires_grad=True)
    w = torch.randn(V, C, generator=g, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[1::3] = -1
    ref = F.cross_entropy(F.linear(h.double(), w.double()), t, ignore_index=-1)
    rh, rw = torch.autograd.grad(ref * 1.5, (h, w))
    out = kernels.linear_cross_entropy(h, w, t, chunk_rows=rows, backend=backend)
    oh, ow = torch.autograd.grad(out * 1.5, (h, w))  # an upstream gradient other than 1
    # fp32 against fp64 on O(1) logits: a few ulps of fp32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(oh.double(), rh.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ow.double(), rw.double(), rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_edge_cases():
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    none = torch.full((4,), -1)
    out = kernels.linear_cross_entropy(h, w, none)
    assert torch.isnan(out) and torch.isnan(F.cross_entropy(h @ w.T, none, ignore_index=-1))  # as torch: 0 / 0
    out.backward()
    assert not h.grad.any() and not w.grad.any()
    with pytest.raises(ValueError, match="targets must lie"):
        kernels.linear_cross_entropy(h, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.linear_cross_entropy(h, w, torch.zeros(3, dtype=torch.long))


def test_linear_cross_entropy_under_bf16_autocast_follows_f_linear():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 32, generator=g, requires_grad=True)
    w = (0.1 * torch.randn(300, 32, generator=g)).requires_grad_()
    t = torch.randint(0, 300, (50,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t)
        out = kernels.linear_cross_entropy(h, w, t, chunk_rows=16)
    rh, rw = torch.autograd.grad(ref, (h, w))
    oh, ow = torch.autograd.grad(out, (h, w))
    assert oh.dtype == ow.dtype == torch.float32
    # both round the logits and their gradient to bf16 (8 bits): agreement to a few bf16 ulps
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(oh, rh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(ow, rw, rtol=2e-2, atol=2e-3)


# ----------------------------------------------------------------------------- the estimate and the planner

PLAN_CONFIGS = {  # (model, batch, grad_ckpt_every, chunked_loss)
    "plain": (dict(n_layer=3, n_head=4, n_embd=64, vocab_size=2000, block_size=128, rope_heads=2), 4, 0, False),
    "grad_ckpt": (dict(n_layer=3, n_head=4, n_embd=64, vocab_size=2000, block_size=128, rope_heads=2), 4, 1, False),
    "chunked": (dict(n_layer=3, n_head=4, n_embd=64, vocab_size=2000, block_size=128), 4, 0, True),
    "ckpt2+chunked": (dict(n_layer=4, n_head=2, n_embd=32, vocab_size=500, block_size=256), 8, 2, True),
    # Llama / Qwen shapes: RMSNorm, SwiGLU, grouped-query attention, rope on every head, an untied head
    "llama-gqa": (dict(n_layer=3, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=176, vocab_size=2000,
                       block_size=128, rope_heads=4, norm="rmsnorm", mlp="swiglu", learned_pos=False, tie_embeddings=False), 4, 0, False),
    "qwen3-ckpt+chunked": (dict(n_layer=3, n_head=4, n_kv_head=1, n_embd=64, head_dim=24, qk_norm=True,
                                vocab_size=2000, block_size=128, rope_heads=4, norm="rmsnorm", mlp="swiglu", learned_pos=False, tie_embeddings=False), 4, 1, True),
}
LLAMA_BLOCKS = {  # every option the Llama and Qwen families add, for the block-bytes test
    "gpt2": {},
    "llama": dict(rope_heads=4, n_kv_head=2, norm="rmsnorm", mlp="swiglu", learned_pos=False, tie_embeddings=False),
    "qwen2": dict(rope_heads=4, n_kv_head=1, qkv_bias=True, intermediate_size=96, norm="rmsnorm", mlp="swiglu", learned_pos=False, tie_embeddings=False),
    "qwen3": dict(rope_heads=4, n_kv_head=2, head_dim=24, qk_norm=True, norm="rmsnorm", mlp="swiglu", learned_pos=False, tie_embeddings=False),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family,rope_heads", [("gpt2", 0), ("gpt2", 2), ("llama", 4), ("qwen2", 4), ("qwen3", 4)])
def test_block_bytes_are_what_autograd_saves(dtype, family, rope_heads):
    """The per-token bytes a block keeps for backward, counted by autograd's saved-tensor hook (each storage
    once; the weights and, under bf16 autocast, their bf16 copies left out: the estimate counts those apart)."""
    c = GPTConfig(**{**dict(n_layer=2, n_head=4, n_embd=64, vocab_size=300, block_size=96, rope_heads=rope_heads),
                     **LLAMA_BLOCKS[family]})
    model = GPT(c)
    B, T = 3, 96
    pos = torch.arange(T).repeat(B, 1)
    rope = (model.rope_cos[pos].transpose(1, 2), model.rope_sin[pos].transpose(1, 2)) if rope_heads else None
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    block, h = model.transformer.h[0], torch.randn(B, T, c.n_embd, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(h, rope)
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *(rope or ())]}
    copies = sum(2 * p.numel() for p in block.parameters() if p.dim() == 2) if dtype == "bfloat16" else 0
    measured = (sum(n for k, n in kept.items() if k not in skip) - copies) / (B * T)
    s = 2 if dtype == "bfloat16" else 4
    assert measured == memory._block_bytes(c, False, s, T, cpu_autocast=dtype == "bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(PLAN_CONFIGS))
def test_estimate_meets_the_measured_peak(name, dtype):
    shape, B, every, chunked = PLAN_CONFIGS[name]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape))
    model.grad_ckpt_every = every
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, y = batch(model.config, B)
    meter = memory.PeakMeter("cpu", model, opt).start()
    for _ in range(2):  # the first step also makes the optimizer's state
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model(x, y, loss_fn=kernels.linear_cross_entropy if chunked else None)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured, _ = meter.stop()
    est = memory.estimate_memory(model, B, model.config.block_size, grad_ckpt_every=every, chunked_loss=chunked,
                                 dtype=dtype)
    # the estimate counts the tensors autograd keeps, phase by phase; on these shapes it lands within 1% of the
    # dispatcher-level peak (the issue asks for 15%; 5% leaves room for small tensors it does not list)
    # (Llama shapes: 10%, the planner's promise there; measured +0.0 / +1.1% for llama-gqa and -2.8 / +4.7% for
    # qwen3-ckpt+chunked in fp32 / bf16)
    tol = 0.10 if "llama" in name or "qwen" in name else 0.05
    assert abs(est["peak"] / measured - 1) < tol, (memory.format_estimate(est), measured / 2 ** 20)


@pytest.mark.parametrize("base,chunked,vocab", [("float", False, 500), ("nf4g64", False, 500), ("int4g64", False, 500),
                                               ("nf4g64", True, 500), ("int4g64", False, 8000), ("nf4g64", True, 8000)])
def test_estimate_meets_the_measured_peak_of_a_lora_run(base, chunked, vocab):
    # weights dominate this shape: a frozen 4-bit base's codes and scales (buffers) and the chunked path's
    # dequantization temporaries must be counted (before they were, the 4-bit estimates were 36% of the peak);
    # with a large vocabulary the loss is the peak, and the temporaries, freed by then, must not be added to it
    check_lora_estimate(dict(n_layer=2, n_head=4, n_embd=512, vocab_size=vocab, block_size=32, rope_heads=2), 2,
                        base=base, chunked=chunked)


@pytest.mark.parametrize("base,every,dropout", [("nf4g64", 1, 0.0), ("float", 1, 0.1), ("int4g64", 0, 0.1)])
def test_estimate_meets_the_measured_peak_of_a_lora_run_with_activations(base, every, dropout):
    # activations dominate this shape: each adapter's x A (and dropped x) and, with checkpointing, the scaled
    # gradient an adapter's backward makes (before they were counted, nf4g64 + grad_ckpt came out 12% low)
    check_lora_estimate(dict(n_layer=3, n_head=4, n_embd=64, vocab_size=300, block_size=128, rope_heads=2), 8,
                        base=base, every=every, dropout=dropout)


def check_lora_estimate(shape, B, base, chunked=False, every=0, dropout=0.0):
    torch.manual_seed(0)
    model = lora.add_lora_(GPT(GPTConfig(**shape)), 8, 16.0, base=base, dropout=dropout)
    model.grad_ckpt_every = every
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    x, y = batch(model.config, B)
    meter = memory.PeakMeter("cpu", model, opt).start()
    for _ in range(2):
        model(x, y, loss_fn=kernels.linear_cross_entropy if chunked else None)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured, _ = meter.stop()
    est = memory.estimate_memory(model, B, model.config.block_size, chunked_loss=chunked, grad_ckpt_every=every)
    assert abs(est["peak"] / measured - 1) < 0.05, (memory.format_estimate(est), measured / 2 ** 20)


def test_planner_picks_the_largest_micro_batch_that_fits():
    def est(model, b, every, rows):  # the estimate the planner weighs: b rows a micro-batch, rows a step
        return memory.estimate_memory(model, b, 256, grad_ckpt_every=every, grad_accum=rows // b)["peak"]
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=64, vocab_size=500, block_size=256))
    assert memory.plan_batch(model, 1e12, 16, 256)[:2] == (16, 0)
    assert memory.plan_batch(model, est(model, 1, 1, 16) - 1, 16, 256) is None
    budget = est(model, 4, 0, 16)
    assert est(model, 8, 1, 16) <= budget < est(model, 16, 1, 16) and budget < est(model, 8, 0, 16)
    b, every, e = memory.plan_batch(model, budget, 16, 256)
    assert (b, every) == (8, 1) and e["peak"] <= budget  # checkpointing doubles the micro-batch here
    # a model whose memory is mostly logits: checkpointing fits 2 rows as well, but not 4, so it is not chosen
    model = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=64, vocab_size=5000, block_size=256))
    budget = est(model, 2, 0, 4)
    assert est(model, 2, 1, 4) <= budget < est(model, 4, 1, 4)
    assert memory.plan_batch(model, budget, 4, 256)[:2] == (2, 0)


def test_free_memory_is_read_and_a_step_beyond_it_is_told_apart(monkeypatch):
    free = memory.free_bytes("cpu")
    if free is None:
        pytest.skip("no /proc/meminfo here")
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    rss = memory._status_mb("VmRSS") * memory.MiB
    assert 0 < free <= info["MemTotal"] + info.get("SwapTotal", 0) + 2 * rss
    # two processes like this one: each one's resident set counts as what it can give to its step
    assert abs(memory.free_bytes("cpu", procs=2) - free - rss) < 0.5 * rss + 256 * memory.MiB
    monkeypatch.setattr(memory, "free_bytes", lambda device, procs=1: 1000)
    assert memory.too_big({"peak": 1100}, "cpu") is None  # within FIT_SLACK: tried, not refused
    assert memory.too_big({"peak": 1200}, "cpu") == (1200, 1000)
    assert memory.too_big({"peak": 600}, "cpu", procs=2) == (1200, 1000)  # processes on one machine add up
    monkeypatch.setattr(memory, "free_bytes", lambda device, procs=1: None)
    assert memory.too_big({"peak": 10 ** 15}, "cpu") is None  # unknown: not refused


def test_parse_bytes():
    assert memory.parse_bytes("8GB") == 8 * 10 ** 9
    assert memory.parse_bytes("512MiB") == 512 * 2 ** 20
    assert memory.parse_bytes("1.5e9") == 1.5e9
    for bad in ("lots", "8 parsecs", ""):
        with pytest.raises(ValueError, match="not a memory size"):
            memory.parse_bytes(bad)


# ----------------------------------------------------------------------------- the trainer and the bench

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "96", "--batch_size", "4",
        "--eval_iters", "2", "--eval_problems", "2", "--final_problems", "1", "--samples", "1",
        "--log_interval", "2", "--threads", "1", "--warmup_iters", "2", "--eval_interval", "100"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data.prepare import prepare_reasoning
    from data.tasks import TaskConfig
    d = tmp_path_factory.mktemp("reasoning")
    prepare_reasoning(str(d), TaskConfig(train_examples=400, val_examples=60, test_per_level=4), verbose=False)
    return str(d)


def run_cli(args, procs=0, port=29541):
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(port)] \
        if procs else []
    return subprocess.run([sys.executable, *launcher, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=300, errors="replace")


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_plan_fits_a_budget_measures_it_and_writes_nothing(corpus, tmp_path):
    out = tmp_path / "plan"
    p = run_cli(TINY + ["--dataset", corpus, "--out_dir", str(out), "--plan", "--memory_budget", "2MB",
                        "--batch_size", "16", "--chunked_loss"])
    assert p.returncode == 0, p.stderr
    b, accum = map(int, re.search(r"micro-batch (\d+) x (\d+) accumulation", p.stdout).groups())
    assert b * accum == 16 and b < 16  # rows per step kept, the micro-batch cut to fit
    est = re.search(r"estimated (\S+) MiB \(([-+0-9.]+)%\)", p.stdout)
    assert est and abs(float(est.group(2))) < 15, p.stdout
    assert float(est.group(1)) <= 2e6 / 2 ** 20
    assert not out.exists()
    p = run_cli(TINY + ["--dataset", corpus, "--out_dir", str(out), "--plan", "--memory_budget", "10kB"])
    assert p.returncode == 2 and p.stderr.startswith("error: --memory_budget 10kB") and "\n" not in p.stderr.strip()


@pytest.mark.slow
def test_fsdp_follows_ddp_and_its_checkpoints_resume_at_other_world_sizes(corpus, tmp_path):
    """FSDP2 (with activation checkpointing) on 2 gloo processes, stopped and resumed, against DDP; then the FSDP
    checkpoint resumed on one process with twice the accumulation (the loader gives it the same batches)."""
    common = TINY + ["--dataset", corpus, "--max_iters", "6", "--dtype", "float32"]  # (fp32 tolerances below)
    ddp, fsdp, one = (str(tmp_path / d) for d in ("ddp", "fsdp", "one"))
    p = run_cli(common + ["--out_dir", ddp], procs=2, port=29541)
    assert p.returncode == 0, p.stderr
    p = run_cli(common + ["--out_dir", fsdp, "--fsdp", "--grad_ckpt", "--stop_after", "3"], procs=2, port=29542)
    assert p.returncode == 0, p.stderr
    shutil.copytree(fsdp, one)
    p = run_cli(["--resume", "--out_dir", fsdp], procs=2, port=29543)
    assert p.returncode == 0, p.stderr
    p = run_cli(["--resume", "--out_dir", one, "--fsdp", "false", "--grad_accum", "2"])
    assert p.returncode == 0, p.stderr
    a, b, c = losses(ddp), losses(fsdp), losses(one)
    assert list(a) == list(b) == list(c) == list(range(1, 7))
    for step in a:  # the same sums in another order (reduce-scatter vs all-reduce): fp32 round-off
        assert abs(a[step] - b[step]) < 1e-5 and abs(a[step] - c[step]) < 1e-5, (step, a[step], b[step], c[step])
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (ddp, fsdp))
    assert list(ca["model"]) == list(cb["model"]) and list(ca["optimizer"]["state"]) == list(cb["optimizer"]["state"])
    for k in ca["model"]:
        torch.testing.assert_close(cb["model"][k], ca["model"][k], rtol=1e-4, atol=1e-6)
    for i, s in ca["optimizer"]["state"].items():
        for k in s:
            torch.testing.assert_close(cb["optimizer"]["state"][i][k], s[k], rtol=1e-4, atol=1e-7)


def test_bench_memory_section_runs_quick():
    import bench
    rows = {r["name"].split(" (")[0]: r for r in bench.main(["memory", "--quick", "--device", "cpu"])}
    assert all(r["ours"] > 0 and r["baseline"] > 0 for r in rows.values())
    assert rows["loss step peak memory, chunked vs full logits"]["ratio"] > 2
    assert rows["activation memory of the 2 blocks, grad_ckpt vs plain"]["ratio"] > 1


@pytest.mark.slow
def test_ddp_and_fsdp_train_a_llama_shaped_model_alike(corpus, tmp_path):
    """A Llama-shaped checkpoint (RMSNorm, SwiGLU, GQA, untied head) fine-tuned on 2 gloo processes with DDP and
    with FSDP2: the same losses to fp32 round-off, and both checkpoints load as the same kind of model."""
    from checkpoint import load_model, model_state, save_checkpoint
    with open(os.path.join(corpus, "meta.json")) as f:
        vocab = json.load(f)["vocab_size"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=96, vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, bias=False,
                          rope_heads=4, norm="rmsnorm", mlp="swiglu", intermediate_size=64, learned_pos=False,
                          tie_embeddings=False))
    start = str(tmp_path / "llama.pt")
    save_checkpoint(start, {**model_state(model), "dataset": corpus})
    common = ["--init_from", start, "--max_iters", "4", "--batch_size", "4", "--eval_iters", "2",
              "--final_problems", "1", "--samples", "0", "--threads", "1", "--warmup_iters", "2",
              "--dtype", "float32", "--log_interval", "2"]
    ddp, fsdp = str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    p = run_cli(common + ["--out_dir", ddp], procs=2, port=29544)
    assert p.returncode == 0, p.stderr
    p = run_cli(common + ["--out_dir", fsdp, "--fsdp", "--grad_ckpt"], procs=2, port=29545)
    assert p.returncode == 0, p.stderr
    a, b = losses(ddp), losses(fsdp)
    assert list(a) == list(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    for d in (ddp, fsdp):
        m, _ = load_model(os.path.join(d, "ckpt.pt"))
        assert m.config.mlp == "swiglu" and m.config.kv_heads == 2
