"""Tests for kernels.py: the int4 matmul's packing, its Triton kernels (under TRITON_INTERPRET=1 on CPU) against a
float64 reference, its gradient, and its errors.

Tolerance: every comparison uses the worst-case rounding bound of the computation, elementwise, not a fudge factor.
For y = a @ b with a (M, L) exact in its dtype and b the dequantized weight:
    |y_computed - y_exact| <= (u_w + L * 2**-24) * (|a| @ |b|) * (1 + u) + u * |y_exact|
u_w: b rounded to the input dtype before the dot (bf16 2**-8, fp16 2**-11; fp32 2 * 2**-24 for (q - z) * s);
L * 2**-24: fp32 accumulation over L terms; u: the output rounded once to its dtype (unit roundoff as above).
Triton 3.9's CPU interpreter truncates fp32 -> bf16 instead of rounding to nearest, so there a bf16 cast errs by
up to one ulp (2**-7), not half; on a GPU the bound is the round-to-nearest one.
test_tolerance_rejects_a_wrong_nibble_order checks that this bound still catches a layout bug.
"""
import os

import pytest
import torch

import kernels

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
if os.environ.get("TRITON_INTERPRET") == "1":
    UNIT_ROUNDOFF[torch.bfloat16] = 2.0**-7  # the interpreter's truncating bf16 cast (module docstring)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def make_weight(N, K, g, seed=0, zero_dtype=torch.float32, scale_dtype=torch.float32):
    """Random packed weight; float zero points are non-integer unless zero_dtype is uint8."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
    scales = (0.01 + 0.04 * torch.rand(N, K // g, generator=gen)).to(scale_dtype)
    if zero_dtype == torch.uint8:
        zeros = torch.randint(0, 16, (N, K // g), dtype=torch.uint8, generator=gen)
    else:
        zeros = (15 * torch.rand(N, K // g, generator=gen)).to(zero_dtype)
    return kernels.pack_int4(q), scales, zeros


def rounding_bound(a, b, dtype):
    """Elementwise worst-case error of a @ b computed as the kernels do (see the module docstring)."""
    u = UNIT_ROUNDOFF[dtype]
    u_w = 2 * 2.0**-24 if dtype == torch.float32 else u
    a, b = a.double(), b.double()
    mag = a.abs() @ b.abs()
    return (u_w + a.shape[-1] * 2.0**-24) * mag * (1 + u) + u * (a @ b).abs()


def assert_within(actual, exact, bound, what):
    err = (actual.double() - exact).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: error reaches {worst:.3g} x the rounding bound (max abs err {err.max():.3g})"


# ----------------------------------------------------------------------------- packing and the reference

def test_pack_unpack_round_trip_random_and_edge_values():
    gen = torch.Generator().manual_seed(1)
    cases = [torch.randint(0, 16, (24, 64), dtype=torch.uint8, generator=gen),
             torch.zeros(3, 8, dtype=torch.uint8), torch.full((5, 16), 15, dtype=torch.uint8),
             torch.tensor([[0, 15] * 8], dtype=torch.uint8)]
    for q in cases:
        packed = kernels.pack_int4(q)
        assert packed.dtype == torch.int32 and packed.shape == (q.shape[0], q.shape[1] // 8)
        assert torch.equal(kernels.unpack_int4(packed), q)


def test_pack_layout_is_eight_nibbles_along_k_low_first():
    q = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 15, 15, 15, 15, 15, 15, 15, 15]], dtype=torch.uint8)
    packed = kernels.pack_int4(q)
    assert packed[0, 0].item() == 0x76543210
    assert packed[0, 1].item() == -1  # 0xFFFFFFFF: nibble 7 owns the sign bit of the int32 word


def test_pack_rejects_bad_input():
    with pytest.raises(TypeError):
        kernels.pack_int4(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.pack_int4(torch.zeros(2, 12, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        kernels.pack_int4(torch.full((2, 8), 16, dtype=torch.uint8))
    with pytest.raises(TypeError):
        kernels.unpack_int4(torch.zeros(2, 8, dtype=torch.int64))


def test_dequantize_follows_the_contract_formula():
    N, K, g = 5, 64, 32
    packed, scales, zeros = make_weight(N, K, g)
    q = kernels.unpack_int4(packed).double()
    expected = torch.empty(N, K, dtype=torch.float64)
    for k in range(K):
        expected[:, k] = (q[:, k] - zeros[:, k // g].double()) * scales[:, k // g].double()
    assert torch.equal(kernels.dequantize_int4(packed, scales, zeros, g, torch.float64), expected)
    # fp32 output is the fp64 value rounded at most twice (subtraction, product): 2 * 2^-24 relative
    w32 = kernels.dequantize_int4(packed, scales, zeros, g, torch.float32)
    assert ((w32.double() - expected).abs() <= 2 * 2.0**-24 * expected.abs() + 1e-30).all()


def test_reference_gradient_passes_gradcheck_in_float64():
    packed, scales, zeros = make_weight(8, 64, 32)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    f = lambda x: kernels.int4_matmul_reference(x, packed, scales, zeros, 32)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def test_tolerance_rejects_a_wrong_nibble_order():
    # a kernel that read the nibbles of each word high-first must fail the bound used by every test below
    N, K, g = 24, 256, 64
    packed, scales, zeros = make_weight(N, K, g)
    x = torch.randn(3, K).bfloat16()
    w = kernels.dequantize_int4(packed, scales, zeros, g, torch.float64)
    q_wrong = kernels.unpack_int4(packed).view(N, K // 8, 8).flip(-1).reshape(N, K)
    w_wrong = kernels.dequantize_int4(kernels.pack_int4(q_wrong), scales, zeros, g, torch.float64)
    exact = x.double() @ w.T
    with pytest.raises(AssertionError):
        assert_within((x.double() @ w_wrong.T).bfloat16(), exact, rounding_bound(x, w.T, torch.bfloat16), "bug")


# ----------------------------------------------------------------------------- Triton against the reference

# (M, N, K, group_size, dtype): M <= 4 runs the GEMV, 5..32 the split-K GEMM, 64 the plain GEMM;
# N is not a power of two; K=96 and K=384 leave a partial K-step in the GEMV (it steps 256 on CPU)
FORWARD_CASES = [
    (1, 24, 256, 32, torch.float32),
    (1, 40, 256, 256, torch.bfloat16),
    (1, 24, 96, 32, torch.float32),
    (2, 40, 384, 128, torch.bfloat16),
    (3, 40, 256, 64, torch.bfloat16),
    (3, 24, 512, 128, torch.float32),
    (5, 24, 256, 128, torch.float16),
    (17, 40, 256, 128, torch.bfloat16),
    (17, 24, 256, 32, torch.float32),
    (64, 24, 256, 256, torch.bfloat16),
    (64, 40, 128, 64, torch.float32),
]


@pytest.mark.parametrize("M,N,K,g,dtype", FORWARD_CASES)
def test_triton_forward_matches_float64_reference(M, N, K, g, dtype):
    packed, scales, zeros = make_weight(N, K, g, seed=M + N + K)
    x = torch.randn(M, K).to(dtype)
    y = kernels.int4_matmul(x, packed, scales, zeros, g, backend="triton")
    assert y.shape == (M, N) and y.dtype == dtype
    w = kernels.dequantize_int4(packed, scales, zeros, g, torch.float64)
    assert_within(y, x.double() @ w.T, rounding_bound(x, w.T, dtype), f"y M={M} N={N} K={K} g={g}")


@pytest.mark.parametrize("zero_dtype,scale_dtype", [(torch.uint8, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.float16, torch.float16)])
def test_triton_accepts_integer_and_half_precision_quant_params(zero_dtype, scale_dtype):
    N, K, g = 24, 256, 64
    packed, scales, zeros = make_weight(N, K, g, zero_dtype=zero_dtype, scale_dtype=scale_dtype)
    w = kernels.dequantize_int4(packed, scales, zeros, g, torch.float64)
    for M in (1, 17):  # GEMV and GEMM
        x = torch.randn(M, K)
        y = kernels.int4_matmul(x, packed, scales, zeros, g, backend="triton")
        assert_within(y, x.double() @ w.T, rounding_bound(x, w.T, torch.float32), f"y M={M} {zero_dtype}")


# (M, N, K, group_size, dtype) for the backward kernel dX = dY @ W
GRAD_CASES = [
    (1, 24, 256, 32, torch.float32),
    (3, 40, 256, 256, torch.bfloat16),
    (17, 40, 128, 64, torch.bfloat16),
    (64, 24, 256, 128, torch.float32),
    (20, 40, 256, 128, torch.float16),
]


@pytest.mark.parametrize("M,N,K,g,dtype", GRAD_CASES)
def test_triton_grad_x_matches_reference(M, N, K, g, dtype):
    packed, scales, zeros = make_weight(N, K, g, seed=7 * M + K)
    x = torch.randn(M, K).to(dtype)
    dy = torch.randn(M, N).to(dtype)
    grads = {}
    for backend in ("triton", "torch"):
        xb = x.clone().requires_grad_(True)
        kernels.int4_matmul(xb, packed, scales, zeros, g, backend=backend).backward(dy)
        grads[backend] = xb.grad
    assert grads["triton"].dtype == dtype and grads["triton"].shape == (M, K)
    w = kernels.dequantize_int4(packed, scales, zeros, g, torch.float64)
    bound = rounding_bound(dy, w, dtype)
    assert_within(grads["triton"], dy.double() @ w, bound, f"dx M={M} N={N} K={K} g={g}")
    # the reference backend's own gradient obeys the same bound, so the two differ by at most twice it
    assert_within(grads["triton"], grads["torch"].double(), 2 * bound, "dx triton vs torch backward")


def test_triton_handles_leading_batch_dims_and_strided_x():
    N, K, g = 40, 256, 128
    packed, scales, zeros = make_weight(N, K, g)
    w = kernels.dequantize_int4(packed, scales, zeros, g, torch.float64)
    x = torch.randn(2, 3, K, dtype=torch.bfloat16, requires_grad=True)
    y = kernels.int4_matmul(x, packed, scales, zeros, g, backend="triton")
    assert y.shape == (2, 3, N) and y.dtype == torch.bfloat16
    assert_within(y, x.detach().double() @ w.T, rounding_bound(x.detach(), w.T, torch.bfloat16), "batched y")
    dy = torch.randn(2, 3, N, dtype=torch.bfloat16)
    y.backward(dy)
    assert x.grad.shape == x.shape
    assert_within(x.grad, dy.double() @ w, rounding_bound(dy, w, torch.bfloat16), "batched dx")
    # a column-strided view (last stride 2) is copied to contiguous rows before the kernel
    xs = torch.randn(3, 2 * K)[:, ::2]
    ys = kernels.int4_matmul(xs, packed, scales, zeros, g, backend="triton")
    assert_within(ys, xs.double() @ w.T, rounding_bound(xs, w.T, torch.float32), "strided y")


def test_empty_batch_gives_empty_output():
    packed, scales, zeros = make_weight(24, 64, 32)
    for backend in ("triton", "torch"):
        y = kernels.int4_matmul(torch.randn(0, 64), packed, scales, zeros, 32, backend=backend)
        assert y.shape == (0, 24)
    for backend in ("torch", "chunked"):  # and a weight with no rows
        y = kernels.int4_matmul(torch.randn(3, 64), packed[:0], scales[:0], zeros[:0], 32, backend=backend)
        assert y.shape == (3, 0)


# ----------------------------------------------------------------------------- dispatch and errors

def test_auto_backend_runs_the_reference_on_cpu(monkeypatch):
    packed, scales, zeros = make_weight(24, 64, 32)
    x = torch.randn(3, 64)

    def no_triton(*args, **kwargs):
        raise AssertionError("auto must not run Triton on CPU")
    monkeypatch.setattr(kernels, "int4_matmul_triton", no_triton)
    y = kernels.int4_matmul(x, packed, scales, zeros, 32)
    assert torch.equal(y, kernels.int4_matmul_reference(x, packed, scales, zeros, 32))


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "_INTERPRET", False)
    packed, scales, zeros = make_weight(24, 64, 32)
    with pytest.raises(ValueError, match="CUDA"):
        kernels.int4_matmul(torch.randn(3, 64), packed, scales, zeros, 32, backend="triton")


def test_bad_arguments_raise_clear_errors():
    packed, scales, zeros = make_weight(24, 128, 64)
    x = torch.randn(3, 128)
    call = lambda *a, **kw: kernels.int4_matmul(*a, **kw)
    with pytest.raises(ValueError, match="group_size"):
        call(x, packed, scales, zeros, 48)
    with pytest.raises(ValueError, match="pad K"):  # K=96 is no multiple of 64
        call(torch.randn(3, 96), kernels.pack_int4(torch.zeros(24, 96, dtype=torch.uint8)),
             torch.ones(24, 1), torch.zeros(24, 1), 64)
    with pytest.raises(ValueError, match="K=128"):
        call(torch.randn(3, 64), packed, scales, zeros, 64)
    with pytest.raises(TypeError, match="x must be"):
        call(x.double(), packed, scales, zeros, 64)
    with pytest.raises(TypeError, match="x must be"):
        call(x.to(torch.int32), packed, scales, zeros, 64)
    with pytest.raises(TypeError, match="packed"):
        call(x, packed.to(torch.int64), scales, zeros, 64)
    with pytest.raises(ValueError, match="scales must have shape"):
        call(x, packed, scales[:, :1], zeros, 64)
    with pytest.raises(TypeError, match="scales must have dtype"):
        call(x, packed, scales.to(torch.int32), zeros, 64)
    with pytest.raises(TypeError, match="zeros must have dtype"):
        call(x, packed, scales, zeros.to(torch.int64), 64)
    with pytest.raises(ValueError, match="backend"):
        call(x, packed, scales, zeros, 64, backend="cuda")


# ----------------------------------------------------------------------------- the GPU build, without a GPU

# compiles each kernel for sm_90 (Hopper) with triton's bundled ptxas, in a process without TRITON_INTERPRET, with
# the pointer/int alignment hints that a real launch gets; prints the PTX features the kernels are written for
HOPPER_BUILD = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels

def ptx_for_hopper(kernel, constexprs, num_warps, num_stages):
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn  # unwrap autotune / heuristics
    ptrs = {"w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*fp32", "lut_ptr": "*fp32"}
    sig = {a: "constexpr" if a in constexprs else ptrs.get(a, "*bf16") if a.endswith("_ptr") else "i32"
           for a in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names)
               if sig[a] != "constexpr" and a not in ("M", "M_BUCKET")}
    src = ASTSource(kernel, sig, constexprs=constexprs, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages)).asm["ptx"]

gemv = ptx_for_hopper(kernels._int4_gemv_kernel, dict(GROUP_SIZE=128, BLOCK_M=1, BLOCK_N=16, BLOCK_K=512,
                                                       EVEN_K=True, NF4=False), 4, 2)
gemm = ptx_for_hopper(kernels._int4_gemm_kernel, dict(GROUP_SIZE=128, DOT_PRECISION="tf32", BLOCK_M=128,
                                                       BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_N=8, NF4=False), 8, 3)
dx = ptx_for_hopper(kernels._int4_dx_kernel, dict(GROUP_SIZE=128, DOT_PRECISION="tf32", BLOCK_M=128,
                                                   BLOCK_K=128, BLOCK_N=64, GROUP_M=8, NF4=False), 8, 3)
nf4 = ptx_for_hopper(kernels._int4_gemm_kernel, dict(GROUP_SIZE=64, DOT_PRECISION="tf32", BLOCK_M=128,
                                                      BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_N=8, NF4=True), 8, 3)
print("gemv_v4_loads", gemv.count("ld.global.v4"))
print("gemv_cvt_from_int", gemv.count("cvt.rn.f32.s32") + gemv.count("cvt.rn.f32.u32"))
print("gemm_wgmma", gemm.count("wgmma.mma_async"))
print("gemm_async_16B", gemm.count("cp.async.cg.shared.global"))
print("dx_wgmma", dx.count("wgmma.mma_async"))
print("nf4_wgmma", nf4.count("wgmma.mma_async"))
'''


def test_kernels_build_for_hopper_with_wgmma_and_wide_loads(tmp_path):
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", HOPPER_BUILD], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this triton install has no ptxas")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {k: int(v) for k, v in (line.split() for line in proc.stdout.split("\n") if line)}
    assert found["gemv_v4_loads"] > 0, "the GEMV should read weights with 16-byte loads"
    assert found["gemv_cvt_from_int"] == 0, "nibbles should become floats by the exponent trick, not cvt"
    assert found["gemm_wgmma"] > 0 and found["dx_wgmma"] > 0, "tl.dot should lower to Hopper's wgmma"
    assert found["nf4_wgmma"] > 0, "the NF4 table variant should build and still use wgmma"
    assert found["gemm_async_16B"] > 0, "GEMM tiles should be staged by 16-byte cp.async"


def run_compile_check(tmp_path, *args, timeout):
    """scripts/compile_check.py in a process without TRITON_INTERPRET -> its records (one per compile)."""
    import json
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, "scripts/compile_check.py", "--quiet", "--json", str(out), *args],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if not out.exists() and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this triton install has no ptxas")
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())["results"]


def assert_all_compile_without_spills(proc, results):
    assert {r["target"] for r in results} == {"sm_90a", "sm_80"}
    assert {r["name"] for r in results} == {"gemv", "gemm", "dx", "loss", "adam"}
    errors = [f"{r['target']} {r['name']} {r['constexprs']}: {r['error']}" for r in results if r["error"]]
    assert not errors, "\n".join(errors[:5])
    spills = [f"{r['target']} {r['name']} w{r['num_warps']} s{r['num_stages']} {r['constexprs']}: "
              f"{r['spill_stores']} B spilled at {r['regs']} registers"
              for r in results if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "\n".join(spills)
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_kept_configs_compile_for_sm90a_and_sm80_without_spills(tmp_path):
    # the representative subset (about 60 compiles, ~1-2 min on 2 cores); the full set: -m compile_full
    assert_all_compile_without_spills(*run_compile_check(tmp_path, timeout=600))


@pytest.mark.compile_full
def test_kept_configs_for_every_shape_compile_without_spills(tmp_path, request):
    if "compile_full" not in (request.config.option.markexpr or ""):
        pytest.skip("about 1800 compiles: run with -m compile_full (make compile-check-full)")
    assert_all_compile_without_spills(*run_compile_check(tmp_path, "--full", timeout=7200))


def _short(c):
    return tuple(c.kwargs[k] for k in sorted(c.kwargs)) + (c.num_warps, c.num_stages)


def test_pruners_keep_the_pinned_configs_for_representative_shapes():
    # what each autotuner tries on a GPU; make compile-check-triton36 runs this under triton 3.6 too, so both
    # versions are pinned to the same lists. Columns: the config's kwargs by name, then num_warps, num_stages.
    # 4 rows: the 8x512 tile on 2 warps (on 4 it spilled 4 B on sm_90a); 1 row: on 4, with 8 warps above 8192 weights
    gemv = [(256, 8, 4, 2), (512, 8, 2, 2), (1024, 8, 4, 2), (256, 16, 4, 2), (512, 16, 4, 2), (256, 32, 4, 2)]
    gemv_1 = [(256, 8, 4, 2), (512, 8, 4, 2), (1024, 8, 4, 2), (256, 16, 4, 2), (512, 16, 4, 2), (1024, 16, 8, 2),
              (256, 32, 4, 2), (512, 32, 8, 2)]
    gemm_16 = [(32, 16, 64, sk, 4, 4) for sk in (1, 2, 4, 8)] + [(32, 16, 128, sk, w, 4)
                                                                 for w in (4, 8) for sk in (1, 2, 4, 8)]
    gemm_4096 = [(64, 128, 128, 1, 8, 3), (32, 128, 128, 1, 8, 4), (64, 64, 128, 1, 8, 3), (64, 128, 64, 1, 8, 3),
                 (32, 64, 64, 1, 4, 4)]  # int4: no 64x64x64 on 4 warps (it spilled on sm_80 under triton 3.9)
    dx = [(64, 128, 64, 8, 3), (64, 64, 64, 8, 4), (64, 128, 32, 8, 4), (64, 64, 64, 4, 4), (64, 16, 128, 4, 4),
          (64, 32, 64, 4, 4)]
    assert [_short(c) for c in kernels.gpu_configs("gemv", 4, 4096, 256)] == gemv          # BLOCK_K, BLOCK_N
    assert [_short(c) for c in kernels.gpu_configs("gemv", 1, 4096, 32)] == gemv_1
    # NF4: half the tile (its gathers spilled on sm_90a at 16x1024 for 1 row and at 16x512 for 4)
    assert [_short(c) for c in kernels.gpu_configs("gemv", 4, 4096, 128, nf4=True)] == gemv[:2] + gemv[3:4]
    assert [_short(c) for c in kernels.gpu_configs("gemv", 1, 4096, 32, nf4=True)] == gemv_1[:5] + gemv_1[6:7]
    assert [_short(c) for c in kernels.gpu_configs("gemm", 16, 4096, 32)] == gemm_16      # K, M, N, SPLIT_K
    assert [_short(c) for c in kernels.gpu_configs("gemm", 4096, 4096, 128)] == gemm_4096
    nf4 = kernels.gpu_configs("gemm", 4096, 4096, 128, nf4=True)
    # NF4: no 128x128x64 (it spilled on sm_80 under triton 3.6), and the 64x64x64 on 4 warps
    assert [_short(c) for c in nf4] == gemm_4096[1:4] + [(64, 64, 64, 1, 4, 4)] + gemm_4096[4:]
    assert [_short(c) for c in kernels.gpu_configs("dx", 4096, 4096, 64)] == dx           # BLOCK_K, M, N
    # int4's small 128x128-weight tile is not split (it spilled on sm_80 when split); NF4's is
    def big_splits(nf4):
        return [c.kwargs["SPLIT_K"] for c in kernels.gpu_configs("gemm", 16, 4096, 128, nf4)
                if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] == 16384]
    big, big_nf4 = big_splits(False), big_splits(True)
    assert big == [1] and big_nf4 == [1, 2, 4, 8]
    # NF4's 128x128 tile (at K-steps of 32) is not split either: split, it spilled on sm_80
    nf4_128 = [_short(c) for c in kernels.gpu_configs("gemm", 128, 4096, 32, True)
               if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == 16384]
    assert nf4_128 == [(32, 128, 128, 1, 8, 3), (32, 128, 128, 1, 8, 4)]
    # 32-row tiles step K by 64 at most (by 128 they spilled on sm_80 with fp16 activations)
    rows32 = kernels.gpu_configs("gemm", 32, 4096, 256) + kernels.gpu_configs("gemm", 32, 4096, 256, True)
    assert rows32 and all(c.kwargs["BLOCK_M"] == 32 and c.kwargs["BLOCK_K"] <= 64 for c in rows32)
    # split K only while it leaves every split two K-steps: none for a K of two groups of 32
    assert {c.kwargs["SPLIT_K"] for c in kernels.gpu_configs("gemm", 16, 64, 32)} == {1}


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 2, 4, 5, 16, 33, 128, 4097])
def test_gpu_large_shapes_every_m_bucket(M):
    N, K, g = 4096, 4096, 128
    packed, scales, zeros = (t.cuda() for t in make_weight(N, K, g))
    w = kernels.dequantize_int4(packed, scales, zeros, g, torch.float64)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = kernels.int4_matmul(x, packed, scales, zeros, g)  # auto: Triton on CUDA, autotuned per M bucket
    assert_within(y, x.detach().double() @ w.T, rounding_bound(x.detach(), w.T, torch.bfloat16), f"y M={M}")
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_within(x.grad, dy.double() @ w, rounding_bound(dy, w, torch.bfloat16), f"dx M={M}")


@pytest.mark.gpu
@pytest.mark.parametrize("g", kernels.GROUP_SIZES)
def test_gpu_every_group_size_and_fp32_input(g):
    N, K = 1000, 2048
    packed, scales, zeros = (t.cuda() for t in make_weight(N, K, g))
    w = kernels.dequantize_int4(packed, scales, zeros, g, torch.float64)
    for M in (1, 16, 300):
        x = torch.randn(M, K, device="cuda")  # fp32: exact fp32 dot unless TF32 is allowed (it is not by default)
        y = kernels.int4_matmul(x, packed, scales, zeros, g, backend="triton")
        assert_within(y, x.double() @ w.T, rounding_bound(x, w.T, torch.float32), f"y M={M} g={g}")


@pytest.mark.gpu
def test_gpu_decode_matmul_is_faster_than_bf16_dense():
    # a sanity floor, not the target (bench.py measures that): int4 moves a quarter of bf16's weight bytes
    import triton.testing
    N = K = 8192
    packed, scales, zeros = (t.cuda() for t in make_weight(N, K, 128))
    w = kernels.dequantize_int4(packed, scales, zeros, 128, torch.bfloat16)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    kernels.int4_matmul(x, packed, scales, zeros, 128)  # autotune outside the timing
    t_int4 = triton.testing.do_bench(lambda: kernels.int4_matmul(x, packed, scales, zeros, 128))
    t_bf16 = triton.testing.do_bench(lambda: x @ w.T)
    assert t_int4 < t_bf16, f"int4 {t_int4:.4f} ms vs bf16 {t_bf16:.4f} ms"
