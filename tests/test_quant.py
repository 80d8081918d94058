"""quant.py: each quantizer against a direct reference, STE and LSQ gradients, GPTQ against RTN, exact convert_,
checkpoints of converted models, spec errors; and train.py's --qat / --ptq end to end on a tiny corpus."""
import copy
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import kernels
import quant
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = ["w8", "w4g32", "w4a8g32", "w3g64", "w2g64", "w1.58", "nf4g64", "w4", "w4g32-sym", "w6g32", "w4g32-lsq",
         "w2g32-lsq", "nf4g32-lsq", "w1.58g64-lsq", "w4g256"]


def fp16(x):
    return x.clamp(quant.SCALE_MIN, 65504).half().float()


def tiny_gpt(seed=0, n_embd=64):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=61, n_layer=2, n_head=2, n_embd=n_embd, rope_heads=1))


# ----------------------------------------------------------------------------- specs

def test_spec_strings_parse_to_their_formats():
    p = quant.parse_spec
    assert (p("w8").kind, p("w8").bits, p("w8").group_size, p("w8").symmetric) == ("int", 8, None, False)
    s = p("w4a8g32-lsq")
    assert (s.bits, s.group_size, s.act8, s.lsq, s.qmax) == (4, 32, True, True, 15)
    assert (p("w1.58").kind, p("w1.58").qmax, p("nf4").group_size, p("nf4g128").group_size) == ("ternary", 2, 64, 128)
    assert p("w3g64-sym").symmetric and p("w2g256").group_size == 256


@pytest.mark.parametrize("bad", ["w9", "w1", "w4g48", "w4g0", "int4", "w4a4", "w4g32-sym-asym", "nf4-sym", "w1.58-asym",
                                 "w4-lsq-lsq", "", "g32w4", 4])
def test_bad_spec_is_a_value_error_that_shows_the_grammar(bad):
    with pytest.raises(ValueError) as e:
        quant.parse_spec(bad)
    assert "spec :=" in str(e.value) and "w4a8g32" in str(e.value)


def test_group_size_is_clamped_to_k_and_must_divide_it():
    wide = quant.quantize_(nn.Sequential(nn.Linear(128, 16)), "w4g256")
    assert wide[0].group_size == 128  # 256 > K: one group per row
    with pytest.raises(ValueError, match="in_features 96 is not a multiple of the group size 64"):
        quant.quantize_(nn.Sequential(nn.Linear(128, 16), nn.Linear(96, 8)), "w4g64")


# ----------------------------------------------------------------------------- quantizers against references

def reference_int(w, bits, g, symmetric):
    """Loops over rows and groups: the textbook min/max (or absmax) affine quantizer."""
    N, K = w.shape
    w_hat, scales, codes = torch.empty_like(w), torch.empty(N, K // g), torch.empty(N, K, dtype=torch.long)
    qmax = 2 ** bits - 1
    for n in range(N):
        for j in range(K // g):
            x = w[n, j * g:(j + 1) * g]
            if symmetric:
                s = fp16(x.abs().max() / (2 ** (bits - 1) - 1))
                z = 2 ** (bits - 1)
            else:
                lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
                s = fp16(torch.tensor((hi - lo) / qmax))
                z = min(max(round(-lo / s.item()), 0), qmax)
            q = torch.clamp(torch.round(x / s) + z, 0, qmax)
            codes[n, j * g:(j + 1) * g], scales[n, j] = q.long(), s
            w_hat[n, j * g:(j + 1) * g] = (q - z) * s
    return w_hat, scales, codes


@pytest.mark.parametrize("bits,g,sym", [(8, None, False), (8, 32, True), (4, 32, False), (4, 64, True),
                                        (3, 64, False), (2, 64, False), (2, 32, True), (5, 128, False)])
def test_integer_quantizer_matches_the_reference(bits, g, sym):
    torch.manual_seed(bits)
    w = torch.randn(6, 128) * 0.05
    w[0, :32] = w[0, :32].abs()  # an all-positive group: the grid must still hold 0
    spec = quant.parse_spec(f"w{bits}" + (f"g{g}" if g else "") + ("-sym" if sym else ""))
    gs = quant.group_size_for(spec, 128)
    ref, ref_s, ref_q = reference_int(w, bits, gs, sym)
    q, s, z = quant.quantize_weight(w, spec, gs)
    w_hat = quant.fake_quantize(w, spec, gs)
    # exact: the same fp32 operations on the same numbers
    assert torch.equal(s, ref_s) and torch.equal(q.long(), ref_q) and torch.equal(w_hat, ref)
    assert torch.equal(quant.dequantize_weight(q, spec, s, z), w_hat)
    assert int(q.max()) <= 2 ** bits - 1
    for j in range(128 // gs):  # at most 2^bits levels per group
        assert len(torch.unique(w_hat[:, j * gs:(j + 1) * gs][0])) <= 2 ** bits
    # round trip: within half a step (nothing is clipped by a min/max or absmax grid); fp16 scale rounding can
    # push the extreme weight by at most qmax * 2^-11 of a step
    step = s.repeat_interleave(gs, 1)
    assert ((w - w_hat).abs() <= step * (0.5 + 2 ** bits * 2 ** -11)).all()


def test_ternary_quantizer_has_three_levels_and_an_absmean_scale():
    torch.manual_seed(0)
    w = torch.randn(5, 128) * 0.1
    spec = quant.parse_spec("w1.58g64")
    q, s, z = quant.quantize_weight(w, spec, 64)
    ref_s = fp16(w.view(5, 2, 64).abs().mean(-1))
    assert torch.equal(s, ref_s) and torch.equal(z, torch.ones_like(z))
    ref_t = torch.clamp(torch.round(w / ref_s.repeat_interleave(64, 1)), -1, 1)
    assert torch.equal(q.long() - 1, ref_t.long())
    w_hat = quant.fake_quantize(w, spec, 64)
    assert torch.equal(w_hat, ref_t * ref_s.repeat_interleave(64, 1))
    inside = w.abs() <= 1.5 * ref_s.repeat_interleave(64, 1)
    assert ((w - w_hat).abs()[inside] <= 0.5 * ref_s.repeat_interleave(64, 1)[inside] + 1e-7).all()


def test_nf4_levels_are_qloras_and_rounding_is_to_the_nearest_level():
    qlora = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]  # the NF4 table printed in QLoRA's appendix and bitsandbytes
    assert torch.allclose(quant.NF4_LEVELS, torch.tensor(qlora), atol=1e-6)
    torch.manual_seed(0)
    w = torch.randn(4, 128)
    spec = quant.parse_spec("nf4g64")
    q, s, _ = quant.quantize_weight(w, spec, 64)
    absmax = fp16(w.view(4, 2, 64).abs().amax(-1)).repeat_interleave(64, 1)
    assert torch.equal(s.repeat_interleave(64, 1), absmax)
    ref = ((w / absmax)[..., None] - quant.NF4_LEVELS).abs().argmin(-1)  # brute force: the nearest of 16
    assert torch.equal(q.long(), ref)
    w_hat = quant.fake_quantize(w, spec, 64)
    assert torch.equal(w_hat, quant.NF4_LEVELS[ref] * absmax)
    gaps = (quant.NF4_LEVELS[1:] - quant.NF4_LEVELS[:-1]).max()
    assert ((w - w_hat).abs() <= gaps / 2 * absmax + 1e-7).all()


def test_activation_fake_quant_is_int8_per_token():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64) * torch.rand(3, 5, 1) * 4
    x_hat = quant.fake_quantize_activations(x)
    ref = []
    for t in x.reshape(-1, 64):  # one token at a time: scale = absmax / 127
        s = t.abs().max() / 127
        ref.append(torch.round(t / s).clamp(-128, 127) * s)
    assert torch.equal(x_hat.reshape(-1, 64), torch.stack(ref))
    for t_hat, t in zip(x_hat.reshape(-1, 64), x.reshape(-1, 64)):  # 8-bit levels, within half a step
        s = t.abs().max() / 127
        assert torch.equal(torch.round(t_hat / s), torch.round(t_hat / s).clamp(-128, 127))
        assert ((t - t_hat).abs() <= s / 2 * (1 + 1e-6)).all()


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("spec", ["w4g32", "w2g64", "w1.58", "nf4g64", "w8"])
def test_fake_quant_gradient_is_straight_through(spec):
    torch.manual_seed(0)
    w = (torch.randn(8, 64) * 0.1).requires_grad_()
    up = torch.randn(8, 64)
    (quant.fake_quantize(w, quant.parse_spec(spec), 32 if "g" in spec else 64) * up).sum().backward()
    assert torch.equal(w.grad, up)
    x = torch.randn(4, 64, requires_grad=True)
    (quant.fake_quantize_activations(x) * up[:4]).sum().backward()
    assert torch.equal(x.grad, up[:4])


@pytest.mark.parametrize("spec", ["w4g32-lsq", "w3g32-sym-lsq", "w2g32-lsq", "w1.58g32-lsq", "nf4g32-lsq"])
def test_lsq_scale_gradient_matches_closed_form_and_finite_differences(spec):
    """LSQ's gradient is that of the surrogate where round(v) is replaced by v + (round(v) - v) held fixed (and the
    clipped codes by constants): checked against the paper's closed form and against central finite differences
    of that surrogate in fp64."""
    spec = quant.parse_spec(spec)
    torch.manual_seed(1)
    g = 32
    w = torch.randn(4, 64) * 0.1
    s0, z = quant.weight_qparams(w, spec, g)
    s0 = s0 * torch.empty_like(s0).uniform_(0.6, 1.1)  # some weights clip, some not
    s0 = quant._fp16(s0)  # a value the forward uses as is
    scales = s0.clone().requires_grad_()
    wp = w.clone().requires_grad_()
    up = torch.randn(4, 64)
    (quant.fake_quantize(wp, spec, g, scales, z) * up).sum().backward()

    S = s0.repeat_interleave(g, 1).double()
    v = w.double() / S
    Z = z.repeat_interleave(g, 1).double()
    if spec.kind == "nf4":
        lo, hi = -1.0, 1.0
        r = quant.NF4_LEVELS.double()[quant._codes(v.float(), spec, None).long()]
    else:
        lo, hi = -Z, spec.qmax - Z
        r = torch.round(v)
    inside = (v >= lo) & (v <= hi) if spec.kind == "nf4" else (r >= lo) & (r <= hi)
    clip = torch.where(v < 0, torch.as_tensor(lo, dtype=torch.float64).expand_as(v),
                       torch.as_tensor(hi, dtype=torch.float64).expand_as(v))
    gscale = 1 / math.sqrt(g * spec.qp)
    closed = torch.where(inside, r - v, clip)  # LSQ, eq. 3
    ref = (up.double() * closed).view(4, 2, g).sum(-1) * gscale
    assert torch.allclose(scales.grad.double(), ref, rtol=1e-4, atol=1e-6)
    # w: straight through inside the range (up * s / s: to an ulp), zero where clipped
    assert torch.allclose(wp.grad, up * inside.float(), rtol=1e-6, atol=0)

    c = r - v  # the surrogate: (v + c) * s inside, clip * s outside, c held fixed
    def surrogate(sc):
        Sx = sc.repeat_interleave(g, 1)
        vx = w.double() / Sx
        return (up.double() * torch.where(inside, (vx + c) * Sx, clip * Sx)).sum()
    eps = 1e-6
    fd = torch.zeros_like(s0, dtype=torch.float64)
    for i in range(s0.shape[0]):
        for j in range(s0.shape[1]):
            d = torch.zeros_like(fd)
            d[i, j] = eps
            fd[i, j] = (surrogate(s0.double() + d) - surrogate(s0.double() - d)) / (2 * eps)
    assert torch.allclose(scales.grad.double(), fd * gscale, rtol=1e-4, atol=1e-6)


def test_lsq_scales_start_from_the_weights_and_train():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    seq = nn.Sequential(copy.deepcopy(lin))
    quant.quantize_(seq, "w4g32-lsq")
    m = seq[0]
    x = torch.randn(8, 64)
    rtn = nn.functional.linear(x, quant.fake_quantize(lin.weight, m.spec, 32), lin.bias)
    assert torch.equal(m(x), rtn)  # initialised from the weight statistics: the first step is RTN
    assert m.weight_scale.dim() == 1  # flat: optimizers that decay only matrices leave it alone
    m(x).pow(2).sum().backward()
    assert m.weight_scale.grad is not None and m.weight_scale.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- GPTQ

@pytest.mark.parametrize("spec", ["w4g32", "w3g64", "w2g64", "w4", "w1.58g64", "nf4g64"])
def test_gptq_has_lower_layer_output_error_than_rtn(spec):
    torch.manual_seed(0)
    N, K = 48, 128
    w = torch.randn(N, K) * 0.05
    x = torch.randn(2048, 16) @ torch.randn(16, K) + 0.1 * torch.randn(2048, K)  # correlated inputs
    spec = quant.parse_spec(spec)
    g = quant.group_size_for(spec, K)
    H = x.double().T @ x.double()
    q, s, z = quant.gptq_quantize(w, H, spec, g)
    w_gptq = quant.dequantize_weight(q, spec, s, z)
    w_rtn = quant.fake_quantize(w, spec, g)
    err_gptq, err_rtn = ((x @ (w - w_gptq).T) ** 2).sum(), ((x @ (w - w_rtn).T) ** 2).sum()
    assert err_gptq < 0.7 * err_rtn, (spec, err_gptq / err_rtn)
    # frozen codes reproduce themselves: quantizing the dequantized weight with the frozen scales gives them back
    assert torch.equal(quant.quantize_weight(w_gptq, spec, g, s, z)[0], q)


def test_gptq_ptq_freezes_codes_that_convert_exactly():
    model = tiny_gpt()
    calib = [(torch.randint(0, 61, (4, 32)),) for _ in range(3)]
    float_logits = model(calib[0][0], last_only=False)[0]
    quant.apply_ptq_(model, "gptq", "w3g32", calib)
    fq_logits = model(calib[0][0], last_only=False)[0]
    assert not torch.equal(fq_logits, float_logits)
    quant.convert_(model)
    conv_logits = model(calib[0][0], last_only=False)[0]
    assert (conv_logits - fq_logits).abs().max() <= 1e-5 * fq_logits.abs().max()
    with pytest.raises(ValueError, match="needs training"):
        quant.apply_ptq_(tiny_gpt(), "rtn", "w4g32-lsq")
    with pytest.raises(ValueError, match="calibration"):
        quant.apply_ptq_(tiny_gpt(), "gptq", "w4g32")


# ----------------------------------------------------------------------------- convert_ and checkpoints

@pytest.mark.parametrize("spec", SPECS)
def test_convert_computes_what_the_fake_quant_model_computes(spec):
    """Issue target: logits equal within 1e-5 relative (fp32, CPU). The weights are bit-identical (the same
    functions make and dequantize the codes); only the matmul's summation order may differ."""
    model = quant.quantize_(tiny_gpt(), spec)
    x = torch.randint(0, 61, (3, 24))
    if quant.parse_spec(spec).lsq:  # move the learned scales off their initial values first
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        model(x, x)[1].backward()
        opt.step()
    with torch.no_grad():
        fq = model(x, last_only=False)[0]
        quant.convert_(model)
        conv = model(x, last_only=False)[0]
    kinds = {type(m) for m in model.modules()}
    assert (quant.Int4Linear if quant.parse_spec(spec).qmax <= 15 else quant.Int8Linear) in kinds
    assert quant.FakeQuantLinear not in kinds and isinstance(model.lm_head, nn.Linear)  # the head stays float
    assert (fq - conv).abs().max() <= 1e-5 * fq.abs().max()


def test_converted_checkpoint_reloads_into_int4_modules_and_takes_under_4_5_bits(tmp_path):
    model = quant.convert_(quant.quantize_(tiny_gpt(), "w4g64"))
    assert quant.bits_per_weight(model) == 4 + (16 + 8) / 64  # codes, fp16 scale, uint8 zero per 64 weights
    path = tmp_path / "c.pt"
    torch.save(dict(model=model.state_dict(), quant=quant.describe(model)), path)
    ck = torch.load(path, weights_only=True)
    fresh = quant.restore_(tiny_gpt(seed=5), ck["quant"])
    fresh.load_state_dict(ck["model"])
    assert isinstance(fresh.transformer.h[0].mlp.c_fc, quant.Int4Linear)
    x = torch.randint(0, 61, (2, 16))
    assert torch.equal(fresh(x, last_only=False)[0], model(x, last_only=False)[0])


def test_int4_linear_runs_the_triton_kernel():
    """Int4Linear's forward through the Triton kernel (interpreted on CPU) equals its torch path."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(64, 24))
    quant.convert_(quant.quantize_(seq, "w4g32"))
    x = torch.randn(3, 64)
    m = seq[0]
    y = kernels.int4_matmul(x, m.packed, m.scales, m.zeros, m.group_size, backend="triton") + m.bias
    assert torch.allclose(y, seq(x), rtol=1e-5, atol=1e-5)  # fp32 accumulation in another order


def test_quantize_skips_the_head_unless_asked_and_keeps_the_tie():
    model = quant.quantize_(tiny_gpt(), "w4g32")
    assert type(model.lm_head) is nn.Linear and type(model.transformer.wte) is nn.Embedding
    assert len(quant.fake_quant_linears(model)) == 2 * 4
    both = quant.quantize_(tiny_gpt(), "w4g32", skip=())
    assert isinstance(both.lm_head, quant.FakeQuantLinear) and type(both.transformer.wte) is nn.Embedding
    assert both.lm_head.weight is both.transformer.wte.weight  # the tie survives
    x = torch.randint(0, 61, (2, 16))
    fq = both(x, last_only=False)[0]
    assert torch.allclose(quant.convert_(both)(x, last_only=False)[0], fq, rtol=0, atol=1e-5 * fq.abs().max().item())

def test_fake_quant_can_start_later():
    model = tiny_gpt()
    x = torch.randint(0, 61, (2, 16))
    ref = model(x, last_only=False)[0]
    quant.quantize_(model, "w2g32", enabled=False)
    assert torch.equal(model(x, last_only=False)[0], ref)
    quant.enable_fake_quant_(model, True)
    assert not torch.allclose(model(x, last_only=False)[0], ref)


# ----------------------------------------------------------------------------- train.py and bench.py

EVAL = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "96", "--batch_size", "4",
        "--eval_iters", "2", "--final_problems", "1", "--samples", "0", "--threads", "1"]  # (what PTQ reads too)
TINY = EVAL + ["--eval_problems", "2", "--log_interval", "2", "--warmup_iters", "2"]


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    from data.prepare import prepare_reasoning
    from data.tasks import TaskConfig
    d = tmp_path_factory.mktemp("q")
    prepare_reasoning(str(d / "corpus"), TaskConfig(train_examples=400, val_examples=60, test_per_level=4),
                      verbose=False)
    p = run_cli(TINY + ["--dataset", str(d / "corpus"), "--max_iters", "4", "--out_dir", str(d / "float")])
    assert p.returncode == 0, p.stderr
    return d


def run_cli(args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def final(out_dir, name):
    with open(os.path.join(out_dir, name)) as f:
        return json.load(f)["val_loss"]


def test_train_qat_then_converted_checkpoint_evaluates_the_same(float_run):
    d = float_run
    common = TINY + ["--dataset", str(d / "corpus"), "--init_from", str(d / "float" / "ckpt.pt")]
    p = run_cli(common + ["--qat", "w4g32", "--qat_start", "2", "--max_iters", "4", "--out_dir", str(d / "qat")])
    assert p.returncode == 0, p.stderr
    assert "bits per weight" in p.stdout
    assert final(d / "qat", "eval.json") == pytest.approx(final(d / "qat", "eval_converted.json"), rel=1e-5)
    p = run_cli(EVAL + ["--dataset", str(d / "corpus"), "--eval_only", "--init_from", str(d / "qat" / "converted.pt"),
                        "--out_dir", str(d / "again")])
    assert p.returncode == 0, p.stderr
    again = os.path.basename(glob.glob(str(d / "again" / "eval_only_qat_converted.pt_*.json"))[0])
    assert final(d / "again", again) == final(d / "qat", "eval_converted.json")


def test_qat_goes_on_from_its_own_checkpoint_and_eval_only_reads_qat(float_run):
    d = float_run
    common = ["--dataset", str(d / "corpus"), "--threads", "1"]
    first = run_cli(TINY + common + ["--init_from", str(d / "float" / "ckpt.pt"), "--qat", "w4g32",
                                     "--max_iters", "2", "--out_dir", str(d / "qat1")])
    assert first.returncode == 0, first.stderr
    more = run_cli(TINY + common + ["--init_from", str(d / "qat1" / "ckpt.pt"), "--qat", "w4g32",
                                    "--max_iters", "2", "--out_dir", str(d / "qat2")])  # more QAT, same spec
    assert more.returncode == 0, more.stderr
    assert os.path.exists(d / "qat2" / "converted.pt")
    ev = run_cli(EVAL + common + ["--eval_only", "--init_from", str(d / "float" / "ckpt.pt"), "--qat", "w4g32",
                                 "--out_dir", str(d / "ev_qat")])  # the float model under fake-quant
    assert ev.returncode == 0, ev.stderr


def test_train_ptq_gptq_saves_a_converted_checkpoint(float_run):
    d = float_run
    common = EVAL + ["--dataset", str(d / "corpus"), "--init_from", str(d / "float" / "ckpt.pt")]
    p = run_cli(common + ["--ptq", "gptq", "--ptq_spec", "w2g32", "--ptq_batches", "2", "--out_dir", str(d / "g")])
    assert p.returncode == 0, p.stderr
    assert final(d / "g", "eval.json") == pytest.approx(final(d / "g", "eval_converted.json"), rel=1e-5)
    ck = torch.load(d / "g" / "ckpt.pt", weights_only=True)
    assert ck["quant"]["spec"] == "w2g32" and any(k.endswith("packed") for k in ck["model"])
    bad = run_cli(common + ["--ptq", "gptq", "--ptq_spec", "w5g33", "--out_dir", str(d / "bad")])
    assert bad.returncode == 2 and bad.stderr.startswith("error: --ptq_spec ") and "bad quantization spec" in bad.stderr
    assert "\n" not in bad.stderr.strip()


def test_bench_qat_section_times_fake_quant_against_float():
    import bench
    rows = bench.main(["qat", "--quick", "--device", "cpu"])
    assert rows and all(r["ours"] > 0 and r["baseline"] > 0 and r["ratio"] == r["baseline"] / r["ours"]
                        for r in rows)
