"""lora.py, the NF4 table variant of the int4 kernels, the subtraction fine-tuning task, train.py's LoRA flags and
bench.py's lora section: LoRA against a dense reference, frozen bases, merges, LoftQ, exact resume, DDP."""
import copy
import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import kernels
import lora
import memory
import quant
import train
from config import TrainConfig, UserError
from data.prepare import prepare_reasoning
from data.tasks import (STYLES, SUB_LEVELS, answer_text, check_answer, held_out_problems, make_examples,
                        prompt_text, sample_problems, split_of, subtraction_task)
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASES = ["float", "int4g64", "nf4g64", "nf4g64-dq", "int3g64", "int2g64"]


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=61, n_layer=2, n_head=2, n_embd=64, rope_heads=1))


def nf4_weight(N, K, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
    return kernels.pack_int4(q), 0.01 + 0.04 * torch.rand(N, K // g, generator=gen)


# ----------------------------------------------------------------------------- the NF4 kernels

# (M, N, K, g): M <= 4 the GEMV (K=96 leaves a partial K-step), 17 the split-K GEMM, 64 the plain GEMM
@pytest.mark.parametrize("M,N,K,g", [(1, 24, 256, 64), (3, 40, 96, 32), (17, 24, 256, 64), (64, 40, 128, 64)])
def test_nf4_table_kernels_and_chunked_path_match_the_reference(M, N, K, g):
    packed, scales = nf4_weight(N, K, g)
    lut = quant.NF4_LEVELS
    w = kernels.dequantize_int4(packed, scales, None, g, torch.float64, lut)
    assert torch.equal(w.float(), quant.dequantize_weight(kernels.unpack_int4(packed), quant.parse_spec("nf4g64"),
                                                          scales, None))  # the table is quant's NF4
    x = torch.randn(M, K, dtype=torch.float64)
    dy = torch.randn(M, N, dtype=torch.float64)
    exact_y, exact_dx = x @ w.T, dy @ w
    for backend in ("triton", "chunked"):
        xb = x.float().requires_grad_()
        y = kernels.int4_matmul(xb, packed, scales, None, g, backend=backend, lut=lut)
        y.backward(dy.float())
        # fp32 products summed over at most K=256 terms in another order than fp64: far below 1e-5 of the scale
        bound_y = 1e-5 * (x.abs() @ w.abs().T).max()
        bound_dx = 1e-5 * (dy.abs() @ w.abs()).max()
        assert (y.double() - exact_y).abs().max() <= bound_y, backend
        assert (xb.grad.double() - exact_dx).abs().max() <= bound_dx, backend


def test_nf4_kernel_would_catch_a_table_read_as_affine_codes():
    # the bound above must reject codes used as affine levels (q - 8) / 8 instead of the table's normal quantiles
    packed, scales = nf4_weight(24, 256, 64)
    x = torch.randn(3, 256)
    y = kernels.int4_matmul(x, packed, scales, None, 64, backend="triton", lut=quant.NF4_LEVELS)
    wrong = kernels.int4_matmul(x, packed, scales, None, 64, backend="triton", lut=(torch.arange(16.0) - 8) / 8)
    assert (y - wrong).abs().max() > 1e-2 * y.abs().max()


def test_int4_matmul_refuses_a_bad_table_and_missing_zeros():
    packed, scales = nf4_weight(8, 64, 32)
    with pytest.raises(ValueError, match="16 levels"):
        kernels.int4_matmul(torch.randn(2, 64), packed, scales, None, 32, lut=torch.zeros(8))
    with pytest.raises(ValueError, match="zeros is None"):
        kernels.int4_matmul(torch.randn(2, 64), packed, scales, None, 32)


def test_chunked_path_keeps_no_dense_weight_between_forward_and_backward(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 4096)  # 16 rows of 256 at a time
    N = K = 256
    dense = N * K * 4
    layer = lora.frozen_base(K, N, False, "nf4g64")
    layer.load_quantized_(lora.quantize_base(torch.randn(N, K), "nf4g64"))
    x = torch.randn(4, K, requires_grad=True)
    kept = {}
    for backend in ("chunked", "torch"):
        with memory.TensorPeak([*layer.buffers(), x]) as tp:
            start = tp.now
            y = kernels.int4_matmul(x, layer.packed, layer.scales, None, 64, backend, layer.lut)
            kept[backend] = tp.now - start  # what the graph holds until backward: y and saved tensors
            peak = tp.peak - start
            y.sum().backward()
        if backend == "chunked":  # a chunk is 1/16 of W; unpacking it takes ~4.5x its fp32 size (int32, int64)
            assert kept[backend] < dense / 8 and peak < dense / 2
    assert kept["torch"] >= dense  # the reference path keeps a dense W for backward: the test can fail


# ----------------------------------------------------------------------------- LoRALinear

@pytest.mark.parametrize("base", BASES)
def test_lora_forward_and_backward_match_a_dense_reference(base):
    torch.manual_seed(1)
    lin = nn.Linear(128, 48)
    m = lora.add_lora_(nn.Sequential(lin), rank=4, alpha=8.0, targets=("0",), base=base)[0]
    with torch.no_grad():
        m.lora_B.normal_()  # B = 0 at the start would hide A's gradient
    w = m.base_weight().detach()
    if base == "float":
        assert torch.equal(w, lin.weight)
    A, B = m.lora_A.detach().clone().requires_grad_(), m.lora_B.detach().clone().requires_grad_()
    x = torch.randn(2, 5, 128)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = m(x1)
    ref = x2 @ (w + 2.0 * B @ A).T + lin.bias.detach()
    dy = torch.randn_like(ref)
    y.backward(dy)
    ref.backward(dy)
    # fp32, the same products summed in another order (K = 128 terms, then rank 4): 1e-5 of each tensor's scale
    for ours, theirs in ((y, ref), (x1.grad, x2.grad), (m.lora_A.grad, A.grad), (m.lora_B.grad, B.grad)):
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    assert all(p.grad is None for p in m.base.parameters())


@pytest.mark.parametrize("base", BASES)
def test_add_lora_trains_only_the_adapters_and_stores_4_bit_bases(base):
    model = lora.add_lora_(tiny_gpt(), rank=4, alpha=8.0, base=base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 2 * 4  # 2 blocks x (c_attn, attn c_proj, c_fc, mlp c_proj) x (A, B)
    x = torch.randint(0, 61, (2, 16))
    model(x, x)[1].backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    if base != "float":
        for _, m in lora.lora_layers(model):
            nbytes = sum(b.numel() * b.element_size() for b in m.base.buffers() if b is not None) - 16 * 4 * (
                m.base.lut is not None)  # the 16-level table is shared by value, not per weight
            NK, G = m.in_features * m.out_features, m.out_features * m.in_features // 64
            # 4 + 16/64 (fp16 scale) [+ 8/64 (int4 zero)]; -dq: 4 + 8/64 (int8 scale), an fp32 absmax per 256
            # scales and one fp32 mean
            expected = 4 + 8 / 64 + 32 * (-(-G // 256) + 1) / NK if base.endswith("-dq") else \
                4 + 16 / 64 + 8 / 64 * base.startswith("int")
            assert 8 * nbytes / NK == pytest.approx(expected)
            assert not any(p.numel() >= m.in_features * m.out_features for p in m.base.parameters())


@pytest.mark.parametrize("base", ["float", "nf4g64", "int4g64"])
def test_num_params_counts_4_bit_weights_at_their_logical_size(base):
    n_float = tiny_gpt().get_num_params()
    m = lora.add_lora_(tiny_gpt(), 4, base=base)
    n_lora = sum(p.numel() for name, p in m.named_parameters() if "lora_" in name)
    assert m.get_num_params() == n_float + n_lora
    q = tiny_gpt()
    quant.quantize_(q, "w4g32")
    quant.convert_(q)
    assert q.get_num_params() == n_float


def test_add_lora_rejects_bad_input():
    with pytest.raises(ValueError, match="nf4g64"):
        lora.add_lora_(tiny_gpt(), 4, base="nf4g48")
    with pytest.raises(ValueError, match="LoftQ"):
        lora.add_lora_(tiny_gpt(), 4, base="float", loftq_iters=2)
    with pytest.raises(ValueError, match="targets"):
        lora.add_lora_(tiny_gpt(), 4, targets=("q_proj",))
    with pytest.raises(ValueError, match="already"):
        lora.add_lora_(lora.add_lora_(tiny_gpt(), 4), 4)
    with pytest.raises(ValueError, match="loftq_split"):
        lora.add_lora_(tiny_gpt(), 4, base="nf4g64", loftq_iters=2, loftq_split="half")
    width = tiny_gpt().config.n_embd  # a rank beyond a layer's smaller side adds parameters, not expressiveness
    for base, iters in (("float", 0), ("nf4g64", 2)):
        with pytest.raises(ValueError, match=f"exceeds .*smaller dimension {width}"):
            lora.add_lora_(tiny_gpt(), width + 1, base=base, loftq_iters=iters)
    model = tiny_gpt()
    model.transformer.h[0].attn.c_attn.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        lora.add_lora_(model, 4, base="nf4g64", loftq_iters=2)


def test_loftq_of_an_all_zero_weight_is_exact():  # (its relative error was 0 / 0 and no iterate was kept)
    tensors, A, B, errors = lora.loftq_init(torch.zeros(16, 64), 2, "int4g64", iters=2)
    assert errors == [0.0, 0.0] and not (B @ A).any()
    assert not lora.dequantize_base(tensors, "int4g64", (16, 64)).any()


@pytest.mark.parametrize("base", ["float", "nf4g64"])
def test_merge_gives_the_same_function_and_requantize_gives_a_4_bit_model(base):
    model = lora.add_lora_(tiny_gpt(), rank=4, alpha=8.0, base=base, loftq_iters=2 if base != "float" else 0)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B.add_(0.05 * torch.randn_like(m.lora_B))  # as after fine-tuning
    x = torch.randint(0, 61, (2, 16))
    before = model(x)[0]
    merged = lora.merge_lora_(copy.deepcopy(model))
    assert not lora.lora_layers(merged) and all(p.requires_grad for p in merged.parameters())
    # one fp32 matrix W + s B A instead of two products: 1e-5 of the logits' scale
    assert (merged(x)[0] - before).abs().max() <= 1e-5 * before.abs().max()
    served = quant.convert_(quant.apply_ptq_(lora.merge_lora_(copy.deepcopy(model)), "rtn", "nf4g64"))
    assert sum(isinstance(m, quant.Int4Linear) for m in served.modules()) == 8
    assert quant.bits_per_weight(served) == pytest.approx(4.25)


def test_restore_rebuilds_a_saved_lora_model():
    model = lora.add_lora_(tiny_gpt(), rank=4, alpha=8.0, base="nf4g64-dq", loftq_iters=1)
    sd, desc = model.state_dict(), lora.describe(model)
    assert desc == dict(rank=4, alpha=8.0, dropout=0.0, base="nf4g64-dq", targets=desc["targets"])
    fresh = lora.restore_(tiny_gpt(seed=5), desc)
    fresh.load_state_dict(sd)
    x = torch.randint(0, 61, (2, 16))
    assert torch.equal(fresh(x)[0], model(x)[0])
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- LoftQ and double quantization

@pytest.mark.parametrize("fmt", ["int4g64", "nf4g64", "int2g64"])
def test_loftq_lowers_the_reconstruction_error_with_each_iteration(fmt):
    torch.manual_seed(0)
    W = torch.randn(96, 128) * 0.02 + 0.05 * torch.randn(96, 3) @ torch.randn(3, 128) / 3  # weights + a low-rank part
    rank, s = 8, 2.0
    tensors, A, B, errors = lora.loftq_init(W, rank, fmt, iters=5, scaling=s, split="sqrt")
    plain = (W - lora.dequantize_base(lora.quantize_base(W, fmt), fmt, W.shape)).norm() / W.norm()
    assert len(errors) == 5 and errors[0] < plain
    if fmt != "int2g64":  # at 2 bits the min-max scales make the error rise again after a few iterations
        assert all(b < a for a, b in zip(errors, errors[1:])), errors
    Q = lora.dequantize_base(tensors, fmt, W.shape)  # the best iterate is the one returned
    assert float((W - Q - s * B @ A).norm() / W.norm()) == pytest.approx(min(errors), rel=1e-4)
    # the other split of the same product: A's rows at the norm of LoRA's random init, the same errors
    _, A2, B2, errors2 = lora.loftq_init(W, rank, fmt, iters=5, scaling=s, split="lora")
    assert errors2 == pytest.approx(errors, rel=1e-4)
    assert torch.allclose(A2.norm(dim=1), torch.full((rank,), lora.A_ROW_NORM), rtol=1e-5)
    assert torch.allclose(B2 @ A2, B @ A, atol=1e-6 * float((B @ A).abs().max()) + 1e-9)


@pytest.mark.parametrize("bits", [2, 3])
def test_lower_bit_bases_hold_their_codes_in_4_bit_words(bits):
    torch.manual_seed(0)
    W = torch.randn(24, 128)
    fmt = f"int{bits}g64"
    tensors = lora.quantize_base(W, fmt)
    q = kernels.unpack_int4(tensors["packed"])
    assert int(q.max()) <= 2 ** bits - 1 and int(tensors["zeros"].max()) <= 2 ** bits - 1
    Q = lora.dequantize_base(tensors, fmt, W.shape)
    assert all(len(g.unique()) <= 2 ** bits for g in Q.reshape(-1, 64))  # at most 2^bits levels per group
    assert torch.allclose(Q, quant.fake_quantize(W, quant.parse_spec(f"w{bits}g64"), 64), atol=1e-6)
    wider = lora.dequantize_base(lora.quantize_base(W, f"int{bits + 1}g64"), f"int{bits + 1}g64", W.shape)
    assert (W - wider).norm() < 0.6 * (W - Q).norm()  # one bit fewer: about twice the rounding error


def test_double_quantized_scales_stay_within_half_a_step():
    s = quant._fp16(0.01 + 0.05 * torch.rand(40, 7))  # 280 scales: one full block of 256 and a partial one
    codes, absmax, mean = quant.double_quantize(s)
    back = quant.double_dequantize(codes, absmax, mean, s.shape)
    assert codes.dtype == torch.int8 and absmax.numel() == 2
    step = (absmax / 127).repeat_interleave(256)[:280].view(40, 7)
    assert ((back - s).abs() <= 0.5 * step + 1e-7).all()


# ----------------------------------------------------------------------------- the fine-tuning task

def test_subtraction_answers_check_and_complement_working_is_exact():
    # 305 - 298 = 305 + 701 + 1 - 1000: the addition lines, the nines' complement of 298, a first carry of 1
    assert answer_text((305, -298), "minimal") == \
        "[minimal]\n5+1+1=07|7 c0\n0+0+0=00|07 c0\n3+7+0=10|007 c1\nanswer: 7"
    assert prompt_text((47, -25)) == "47-25\n" and prompt_text((47, 25)) == "47+25\n"
    rng = random.Random(0)
    for level in SUB_LEVELS:
        for ops in sample_problems(level, "train", 50, rng):
            assert ops[0] >= -ops[1] >= 0
            for style in STYLES:
                text = answer_text(ops, style)
                assert check_answer(text, ops) and not check_answer(text + "\nanswer: -1", ops)


def test_subtraction_task_has_its_own_held_out_problems():
    cfg = subtraction_task(train_examples=2000, val_examples=10, test_per_level=50)
    train_ops = {tuple(int(v) for v in p.strip().split("-")) for p, _ in make_examples(cfg, "train", 2000)}
    for level in cfg.levels:
        test = held_out_problems(cfg, level)
        assert len(test) == 50 and all(split_of(p) == "test" for p in test)
        assert not {(a, -b) for a, b in train_ops} & set(test)


# ----------------------------------------------------------------------------- train.py and bench.py

def test_lora_flags_give_one_line_errors():
    bad = [dict(lora_rank=4), dict(lora_rank=4, init_from="x.pt", lora_base="nf4"),
           dict(lora_rank=4, init_from="x.pt", qat="w4g32"), dict(loftq=True, lora_rank=4, init_from="x.pt"),
           dict(lora_merge=True), dict(lora_rank=-1, init_from="x.pt"),
           dict(lora_rank=4, init_from="x.pt", lora_base="nf4g64", loftq=True, loftq_split="half")]
    for kw in bad:
        with pytest.raises(UserError) as e:
            TrainConfig(**kw)
        assert "\n" not in str(e.value) and "--" in str(e.value), kw
    TrainConfig(lora_rank=4, init_from="x.pt", lora_base="nf4g64", loftq=True)


def run_cli(args, module=("train.py",)):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *module, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "64", "--block_size", "64", "--batch_size", "4",
        "--eval_iters", "2", "--eval_problems", "2", "--final_problems", "2", "--samples", "1", "--log_interval", "2",
        "--threads", "1", "--warmup_iters", "2"]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny subtraction corpus and a tiny model trained for 2 steps on it: what LoRA runs start from."""
    d = tmp_path_factory.mktemp("lora")
    prepare_reasoning(str(d / "sub"), subtraction_task(train_examples=300, val_examples=60, test_per_level=2),
                      verbose=False)
    p = run_cli(TINY + ["--dataset", str(d / "sub"), "--max_iters", "2", "--out_dir", str(d / "base")])
    assert p.returncode == 0, p.stderr
    return str(d / "sub"), str(d / "base" / "ckpt.pt")


def test_qlora_run_resumes_exactly(start, tmp_path):
    data, ckpt = start
    common = ["--dataset", data, "--init_from", ckpt, "--lora_rank", "4", "--lora_base", "nf4g64", "--loftq",
              "--loftq_iters", "2", "--lora_dropout", "0.1", "--max_iters", "6", "--eval_interval", "3",
              "--eval_problems", "1", "--eval_iters", "1", "--final_problems", "1", "--samples", "0", "--threads", "1",
              "--log_interval", "3", "--batch_size", "4", "--warmup_iters", "2"]
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    p = run_cli(common + ["--out_dir", straight])
    assert p.returncode == 0, p.stderr
    assert "LoftQ (2 iterations)" in p.stdout and "trainable parameters" in p.stdout
    assert run_cli(common + ["--out_dir", split, "--stop_after", "3"]).returncode == 0
    p = run_cli(["--resume", "--out_dir", split])
    assert p.returncode == 0, p.stderr
    a, b = losses(straight), losses(split)
    assert list(a) == list(range(1, 7)) and a == b  # fp32 on CPU, dropout RNG restored: identical to the last bit
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (straight, split))
    assert ca["lora"]["base"] == "nf4g64" and ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    base = torch.load(ckpt, weights_only=True)["model"]
    assert torch.equal(ca["model"]["transformer.wte.weight"], base["transformer.wte.weight"])  # frozen
    # evaluating the QLoRA checkpoint after merging its adapters into float weights
    p = run_cli(["--eval_only", "--init_from", os.path.join(straight, "ckpt.pt"), "--lora_merge",
                 "--out_dir", str(tmp_path / "merged"), "--final_problems", "1", "--samples", "0"])
    assert p.returncode == 0, p.stderr
    assert "merged" in p.stdout and "untagged" in p.stdout


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 1e-3)])
def test_lora_ddp_two_processes_match_one_process_with_adamw8bit(start, tmp_path, dtype, tol):
    data, ckpt = start  # (bf16: DDP must not re-broadcast the 4-bit base's uint8 buffers under CPU autocast)
    common = ["--dataset", data, "--init_from", ckpt, "--lora_rank", "4", "--lora_base", "int4g64",
              "--optim", "adamw8bit", "--max_iters", "4", "--eval_interval", "100", "--eval_iters", "1",
              "--final_problems", "1", "--samples", "0", "--threads", "1", "--batch_size", "4", "--warmup_iters", "1",
              "--dtype", dtype]
    one = run_cli(common + ["--out_dir", str(tmp_path / "one"), "--grad_accum", "2"])
    assert one.returncode == 0, one.stderr
    two = run_cli(common + ["--out_dir", str(tmp_path / "two"), "--grad_accum", "1"],
                  module=("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                          "train.py"))
    assert two.returncode == 0, two.stderr
    a, b = losses(str(tmp_path / "one")), losses(str(tmp_path / "two"))
    assert list(a) == list(b) == list(range(1, 5))
    for step in a:  # the same sums in another order: fp32 round-off, which bf16 rounding of the weights can amplify
        assert abs(a[step] - b[step]) < tol, (step, a[step], b[step])


def test_bench_lora_section_measures_the_four_variants():
    import bench
    rows = bench.main(["lora", "--quick", "--device", "cpu"])
    by = {r["name"].split(" (")[0]: r for r in rows}
    q8 = by["peak training memory, QLoRA nf4g64, AdamW8bit vs full FT"]
    assert q8["ours"] < q8["baseline"] and q8["measured"].startswith("peak of live tensors")
    assert by["step time, LoRA, float base, fp32 AdamW vs full FT"]["ours"] > 0


def test_one_frozen_4bit_class_serves_lora_bases_and_converted_models():
    """LoRA's frozen bases are quant.Int4Linear, the class convert_ makes; quant.describe leaves them to
    lora.describe, so a QLoRA checkpoint is not taken for a converted model."""
    model = lora.add_lora_(tiny_gpt(), rank=4, alpha=8.0, base="nf4g64-dq")
    bases = [m.base for _, m in lora.lora_layers(model)]
    assert bases and all(type(b) is quant.Int4Linear and b.double_quant for b in bases)
    assert quant.describe(model) is None and lora.describe(model)["base"] == "nf4g64-dq"
    assert all(not p.requires_grad for b in bases for p in b.parameters())
