"""kernels.py: Triton kernels, their launchers and autograd Functions, next to pure-torch references.

Int4 weight-only matmul, y = x @ W.T, with W[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g], q in 0..15:

    pack_int4(q) / unpack_int4(packed)           the packed layout below
    dequantize_int4(packed, scales, zeros, g)    pure torch: the reference, the CPU fallback and quant.py's helper
    int4_matmul(x, packed, scales, zeros, g)     the entry point; differentiable w.r.t. x (the weights are frozen)
    int4_matmul(x, packed, scales, None, g, lut=NF4_LEVELS)   NF4: W[n, k] = lut[q[n, k]] * scales[n, k // g]
    int4_matmul(..., backend="chunked")          CPU: dequantize a block of rows of W at a time, forward and backward

Three kernels, each behind a launcher (checks, grid) and one autograd Function; each has an NF4 variant (constexpr
NF4) that looks the 16 levels up in a table (a gather from 64 bytes that stay in L1) instead of subtracting a zero:
    _int4_gemv_kernel   decode, M <= 4: streams each weight word once; scale and zero applied once per group
    _int4_gemm_kernel   M > 4: dequantizes a K-block of W in registers into tl.dot (tensor cores); split-K at small M
    _int4_dx_kernel     backward, dX = dY @ W: the same packed words, now reduced over N; no repacking, no dense W

Ideas it rests on:
- Layout: int32 words of 8 nibbles along K, packed[n, j] bits 4i..4i+3 = q[n, 8j + i]; shape (N, K // 8), row-major.
  A row of W is contiguous, so every kernel reads K-contiguous words with wide loads and unpacks a word in
  registers with one shift and one mask per nibble.
- At small M the cost is weight bytes (4-bit is a quarter of bf16), so the GEMV does the least arithmetic per
  nibble: sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k) per group. At large M the cost is the
  tensor cores; the dequantized tile is the left operand of tl.dot (acc is a tile of y.T), the operand Hopper's
  wgmma can take from registers.
- fp32 accumulation everywhere; the output is rounded once to x's dtype. Autotuning is keyed on (M bucket, N, K,
  group size); under TRITON_INTERPRET=1 (CPU tests) a kernel runs one small config, so nothing is benchmarked.

Accepted: x fp32/bf16/fp16 of shape (..., K); packed int32 (N, K // 8); scales fp32/bf16/fp16 (N, K // g); zeros
the same float dtypes or uint8 (N, K // g); g in 32, 64, 128, 256; K a multiple of g; any N, any M.
"""
import os

import torch
import triton
import triton.language as tl

GROUP_SIZES = (32, 64, 128, 256)
# TODO: both thresholds are reasoned, not yet measured on an H200 (bench.py matmul measures them)
GEMV_MAX_M = 4            # rows up to which the CUDA-core GEMV beats padding M to a 16-row tensor-core tile
SPLIT_K_MAX_BUCKET = 128  # above this M there are enough output tiles to fill the GPU without splitting K
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_UPCAST_DOT = tl.constexpr(_INTERPRET)
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ZERO_DTYPES = _X_DTYPES + (torch.uint8,)


# ----------------------------------------------------------------------------- packing and the reference

def pack_int4(q):
    """uint8 (N, K) in 0..15 -> int32 (N, K // 8); word j of row n holds q[n, 8j + i] in bits 4i..4i+3."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.uint8:
        raise TypeError(f"pack_int4 wants a uint8 tensor, got {getattr(q, 'dtype', type(q))}")
    if q.dim() != 2 or q.shape[1] % 8:
        raise ValueError(f"pack_int4 wants (N, K) with K a multiple of 8, got {tuple(q.shape)}; pad K")
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"pack_int4: values must be in 0..15, got max {int(q.max())}")
    N, K = q.shape
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (q.view(N, K // 8, 8).to(torch.int64) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement: nibble 7 owns the sign bit
    return words.to(torch.int32).contiguous()


def unpack_int4(packed):
    """int32 (N, K // 8) -> uint8 (N, K) in 0..15; the inverse of pack_int4."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32:
        got = getattr(packed, "dtype", type(packed))
        raise TypeError(f"unpack_int4 wants an int32 tensor from pack_int4, got {got}")
    if packed.dim() != 2:
        raise ValueError(f"unpack_int4 wants a 2-D (N, K // 8) tensor, got shape {tuple(packed.shape)}")
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    q = (packed.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift; the mask drops the sign bits
    return q.reshape(packed.shape[0], packed.shape[1] * 8).to(torch.uint8)


def dequantize_int4(packed, scales, zeros, group_size, dtype=torch.float32, lut=None):
    """W (N, K) in `dtype`, computed in fp32 (fp64 when dtype is fp64) and rounded once.
    lut: a 16-entry level table (NF4): W = lut[q] * s, and zeros is ignored (None)."""
    q = unpack_int4(packed)
    N, K = q.shape
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if lut is not None:
        q = lut.to(compute)[q.long()].view(N, K // group_size, group_size)
        return (q * scales.to(compute).unsqueeze(-1)).view(N, K).to(dtype)
    q = q.view(N, K // group_size, group_size).to(compute)
    w = (q - zeros.to(compute).unsqueeze(-1)) * scales.to(compute).unsqueeze(-1)
    return w.view(N, K).to(dtype)


def int4_matmul_reference(x, packed, scales, zeros, group_size, lut=None):
    """x @ W.T in x's dtype through a dense dequantized W; autograd gives dX = dY @ W."""
    return x @ dequantize_int4(packed, scales, zeros, group_size, x.dtype, lut).T


CHUNK_ELEMENTS = 1 << 20  # weights dequantized at a time by the chunked torch path (4 MiB in fp32)


def chunk_rows(packed):
    """Rows of W the chunked path dequantizes at a time (memory.estimate_memory sizes its temporaries by it)."""
    return max(1, min(CHUNK_ELEMENTS // max(1, packed.shape[1] * 8), packed.shape[0]))  # >= 1 (N = 0 too)


def int4_matmul_chunked(x, packed, scales, zeros, group_size, lut=None):
    """y = x @ W.T (2-D x) dequantizing W a block of rows at a time: no dense W is ever held whole."""
    N = packed.shape[0]
    y = x.new_empty(x.shape[0], N)
    rows = chunk_rows(packed)
    for n0 in range(0, N, rows):
        sl = slice(n0, n0 + rows)
        w = dequantize_int4(packed[sl], scales[sl], None if zeros is None else zeros[sl], group_size, x.dtype, lut)
        torch.matmul(x, w.T, out=y[:, sl])
    return y


def int4_matmul_dx_chunked(dy, packed, scales, zeros, group_size, lut=None):
    """dX = dY @ W (2-D dY), W dequantized a block of rows at a time."""
    dx = dy.new_zeros(dy.shape[0], packed.shape[1] * 8)
    rows = chunk_rows(packed)
    for n0 in range(0, packed.shape[0], rows):
        sl = slice(n0, n0 + rows)
        w = dequantize_int4(packed[sl], scales[sl], None if zeros is None else zeros[sl], group_size, dy.dtype, lut)
        dx.addmm_(dy[:, sl], w)
    return dx


def _check_args(x, packed, scales, zeros, group_size, lut=None):
    """One-line errors for everything a kernel would otherwise get wrong silently."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise TypeError(f"packed must be a 2-D int32 tensor from pack_int4, got {packed.dtype} {tuple(packed.shape)}")
    N, K = packed.shape[0], packed.shape[1] * 8
    if K % group_size:
        raise ValueError(f"K={K} is not a multiple of group_size={group_size}; pad K (zero columns of x and W)")
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x has shape {tuple(x.shape)} but the packed weight has K={K} (its last dim * 8)")
    if lut is not None and (lut.shape != (16,) or lut.dtype != torch.float32):
        raise ValueError(f"lut must be a float32 table of 16 levels, got {lut.dtype} {tuple(lut.shape)}")
    if lut is None and zeros is None:
        raise ValueError("zeros is None: give the zero points, or a 16-level lut (NF4) instead")
    pairs = (("scales", scales, _X_DTYPES),) + ((("zeros", zeros, _ZERO_DTYPES),) if lut is None else ())
    for name, t, ok in pairs:
        if t.dtype not in ok:
            raise TypeError(f"{name} must have dtype in {ok}, got {t.dtype}")
        if tuple(t.shape) != (N, K // group_size):
            raise ValueError(f"{name} must have shape (N, K // group_size) = {(N, K // group_size)}, "
                             f"got {tuple(t.shape)}")
    devices = {t.device for t in (x, packed, scales, zeros if lut is None else lut)}
    if len(devices) > 1:
        raise ValueError(f"x, packed, scales and zeros must be on one device, got {sorted(map(str, devices))}")
    return N, K


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _unpack_nibbles(words, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """[ROWS, BLOCK_K // 8] int32 words -> [ROWS, BLOCK_K] int32 codes 0..15 in K order.
    Three rounds of tl.join put nibble i = 4 a + 2 b + c of a word at [.., a, b, c]: each a new minor dimension
    held by the thread that holds the word, so no value moves between threads and the reshape is free (a 3-D
    broadcast of shifts instead spread the nibbles over threads: 255 registers and spills for a 64x64 tile)."""
    n0, n1, n2, n3 = words & 0xF, (words >> 4) & 0xF, (words >> 8) & 0xF, (words >> 12) & 0xF
    n4, n5, n6, n7 = (words >> 16) & 0xF, (words >> 20) & 0xF, (words >> 24) & 0xF, (words >> 28) & 0xF
    a0, a1, a2, a3 = tl.join(n0, n4), tl.join(n1, n5), tl.join(n2, n6), tl.join(n3, n7)
    return tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), (ROWS, BLOCK_K))


@triton.jit
def _levels(q, lut_ptr, NF4: tl.constexpr):
    """int32 codes -> fp32 levels. NF4: the table's level (a gather from 16 fp32 values that stay in L1, indexed
    by the integer code); else the code itself, converted without a conversion instruction: 0x4B000000 is 2**23
    in fp32 and OR-ing q into its mantissa gives exactly 2**23 + q (the mask and the OR can fuse into one LOP3)."""
    if NF4:
        return tl.load(lut_ptr + q)
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _dequant_tile(words, s, z, lut_ptr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, NF4: tl.constexpr):
    """[ROWS, BLOCK_K // 8] words and one scale (and zero) per row -> [ROWS, BLOCK_K] fp32 weights."""
    q = _levels(_unpack_nibbles(words, ROWS, BLOCK_K), lut_ptr, NF4)
    if NF4:
        return q * s[:, None]
    return (q - z[:, None]) * s[:, None]


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    # the CPU interpreter (triton 3.9) multiplies bf16 bit patterns as integers; fp32 holds bf16 values exactly
    if _UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _grouped_tile(pid, num_rows, num_cols, GROUP: tl.constexpr):
    """Program id -> (row tile, col tile), walking GROUP row tiles down every column, so that programs running
    together share their tiles in L2."""
    per_group = GROUP * num_cols
    first = (pid // per_group) * GROUP
    rows = tl.minimum(num_rows - first, GROUP)
    return first + (pid % per_group) % rows, (pid % per_group) // rows


def _config(num_warps, num_stages, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


def _gemv_configs(interpret=None):
    if _INTERPRET if interpret is None else interpret:
        return [_config(4, 1, BLOCK_N=16, BLOCK_K=256)]
    # [BLOCK_N, BLOCK_K] words per iteration: 8..32 rows of 128..512 contiguous bytes, many loads in flight;
    # 8 warps from 16384 weights a step (NF4's gathers came within a few registers of spilling with 4)
    return [_config(8 if bn * bk >= 16384 else 4, 2, BLOCK_N=bn, BLOCK_K=bk)
            for bn in (8, 16, 32) for bk in (256, 512, 1024)]


def _distinct(configs):
    seen = {}
    for c in configs:
        seen.setdefault((tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages), c)
    return list(seen.values())


def _with(c, **kw):
    return triton.Config({**c.kwargs, **kw}, num_warps=c.num_warps, num_stages=c.num_stages)


def _prune_gemv(configs, named_args, **kwargs):
    # a K-step holds whole groups; the per-step tile is bounded so it stays in registers (sm_90 builds of
    # BLOCK_M=4 spill above 8192 elements). NF4 halves it: its table gathers spilled on sm_90a at 16384 (1 row,
    # 16x1024 on 8 warps, 4 B at 128 registers) and at 8192 (4 rows, 16x512, 8 B at 255; its other 8192-element
    # tiles reached 255 too), triton 3.9
    g, bm = kwargs["GROUP_SIZE"], kwargs["BLOCK_M"]
    budget = 16384 // max(1, bm // 2) // (2 if kwargs.get("NF4", False) else 1)
    keep = [_with(c, BLOCK_K=max(c.kwargs["BLOCK_K"], g)) for c in configs]
    return _distinct(_gemv_warps(c, bm) for c in keep if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= budget)


def _gemv_warps(c, block_m):
    # 4 rows of an 8x512 tile on 4 warps spilled 4 B on sm_90a (ptxas held it at 96 registers, groups 32 and
    # 256, triton 3.9); on 2 warps it takes 156 registers and no spill
    if block_m == 4 and c.kwargs["BLOCK_N"] == 8 and c.kwargs["BLOCK_K"] == 512 and c.num_warps == 4:
        return triton.Config(dict(c.kwargs), num_warps=2, num_stages=c.num_stages)
    return c


@triton.autotune(configs=_gemv_configs(), key=["M_BUCKET", "N", "K", "GROUP_SIZE", "NF4"],
                 prune_configs_by={"early_config_prune": _prune_gemv})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, lut_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                      stride_ym, M_BUCKET, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, NF4: tl.constexpr = False):
    """y[:M, n-block] for M <= BLOCK_M <= 4 rows; each program streams BLOCK_N rows of W once, over all of K.
    NF4: W = lut[q] * s (a 16-entry table, no zeros) instead of (q - z) * s."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rw = tl.arange(0, BLOCK_K // 8)
    rk = tl.arange(0, BLOCK_K)
    rg = tl.arange(0, BLOCK_K // GROUP_SIZE)
    n_ok, m_ok = rn < N, rm < M
    w_ptrs = w_ptr + rn[:, None] * stride_wn + rw[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    sz_offs = rn[:, None] * stride_sn + rg[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # no K tail: masks constant along K, so the loads vectorize
            w_ok, x_ok, sz_ok = n_ok[:, None], m_ok[:, None], n_ok[:, None]
        else:
            w_ok = n_ok[:, None] & (k0 + rw * 8 < K)[None, :]
            x_ok = m_ok[:, None] & (k0 + rk < K)[None, :]
            sz_ok = n_ok[:, None] & (k0 + rg * GROUP_SIZE < K)[None, :]
        words = tl.load(w_ptrs + k0 // 8, mask=w_ok, other=0)
        q = _levels(_unpack_nibbles(words, BLOCK_N, BLOCK_K), lut_ptr, NF4)
        q = tl.reshape(q, (BLOCK_N, BLOCK_K // GROUP_SIZE, GROUP_SIZE))
        s = tl.load(s_ptr + sz_offs + k0 // GROUP_SIZE, mask=sz_ok, other=0.0).to(tl.float32)
        if NF4:
            z = tl.zeros((BLOCK_N, BLOCK_K // GROUP_SIZE), dtype=tl.float32)
        else:
            z = tl.load(z_ptr + sz_offs + k0 // GROUP_SIZE, mask=sz_ok, other=0.0).to(tl.float32)
        xs = tl.load(x_ptrs + k0, mask=x_ok, other=0.0).to(tl.float32)
        for m in tl.static_range(BLOCK_M):
            x = tl.sum(tl.where(rm[:, None] == m, xs, 0.0), axis=0)  # row m of the [BLOCK_M, BLOCK_K] x block
            x = tl.reshape(x, (BLOCK_K // GROUP_SIZE, GROUP_SIZE))
            qx = tl.sum(q * x[None, :, :], axis=2)  # [BLOCK_N, groups]: sum of q * x within each group
            part = tl.sum(s * (qx - z * tl.sum(x, axis=1)[None, :]), axis=1)
            acc += tl.where(rm[:, None] == m, part[None, :], 0.0)
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _gemm_configs(interpret=None):
    # CPU: two configs, and the pruner keeps exactly one, so both store paths are tested on CPU
    if _INTERPRET if interpret is None else interpret:
        return [_config(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=sk) for sk in (1, 2)]
    # a dequantized [BLOCK_N, BLOCK_K] tile of 16384 weights takes 8 warps, else NF4's gathers spill on sm_80
    small = [_config(8 if bn * bk > 8192 else 4, 4, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk)
             for bm in (16, 32) for bn in (64, 128) for bk in (64, 128) for sk in (1, 2, 4, 8)]
    # (BLOCK_N, BLOCK_M, BLOCK_K, warps, stages): the fp32 accumulator and the dequantized tile share the
    # registers, so tiles stop at 128x128x64 with 8 warps (256-wide tiles and BLOCK_K=128 spilled on sm_80
    # and sm_90a: scripts/compile_check.py); 64-wide tiles with 4 warps for small grids
    tiles = [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3),
             (64, 64, 64, 4, 4), (64, 64, 32, 4, 4)]
    large = [_config(w, st, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk)
             for bn, bm, bk, w, st in tiles for sk in (1, 2, 4)]
    return small + large


def _prune_gemm(configs, named_args, **kwargs):
    bucket, g, K = named_args["M_BUCKET"], kwargs["GROUP_SIZE"], named_args["K"]
    if _INTERPRET:
        return [c for c in configs if (c.kwargs["SPLIT_K"] > 1) == (bucket <= 32)]
    return _keep_gemm(configs, bucket, g, K, kwargs.get("NF4", False))


def _keep_gemm(configs, bucket, g, K, nf4=False):
    """The GPU rule of _prune_gemm."""
    def fits(c):  # tiles sized to the M bucket; split K only at small M and with >= 2 K-steps per split
        bm, bk, sk = c.kwargs["BLOCK_M"], min(c.kwargs["BLOCK_K"], g), c.kwargs["SPLIT_K"]
        m_ok = bm == max(16, bucket) if bucket <= 32 else 64 <= bm <= bucket
        # NF4's gathers at 128x128x64 spilled 208 B on sm_80 under triton 3.6; its 128x128 tile steps K by 32,
        # unsplit (split K 2 and 4 spilled 4 B at 255 registers on sm_80 under triton 3.9)
        big_nf4 = nf4 and bm * c.kwargs["BLOCK_N"] >= 16384 and (bk > 32 or sk > 1)
        # int4's 16x128x128 on 8 warps spilled 4 B on sm_80 when split (ptxas held it at 128 registers; NF4's
        # took 188 and did not), triton 3.9: a small tile of 16384 weights is not split for int4
        big_split = not nf4 and sk > 1 and bm <= 32 and c.kwargs["BLOCK_N"] * bk >= 16384
        # int4's 64x64x64 on 4 warps spilled 4 B on sm_80 (groups 64 to 256, at 128 registers), triton 3.9
        int4_64 = not nf4 and bm == 64 and c.kwargs["BLOCK_N"] == 64 and bk == 64 and c.num_warps == 4
        # 32-row tiles stepping K by 128 spilled 4-28 B on sm_80 with fp16 activations (groups 128 and 256; int4
        # when split, NF4 always), triton 3.9: they step K by 64 at most
        deep32 = bm == 32 and bk > 64
        return m_ok and not big_nf4 and not big_split and not int4_64 and not deep32 and (
            sk == 1 or (bucket <= SPLIT_K_MAX_BUCKET and sk * bk <= K // 2))
    # BLOCK_K is clamped to the group size: one scale per row per K-step
    return _distinct(_with(c, BLOCK_K=min(c.kwargs["BLOCK_K"], g)) for c in configs if fits(c))


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "GROUP_SIZE", "NF4"], reset_to_zero=["y_ptr"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _int4_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, lut_ptr, M, N, K, stride_xm, stride_wn, stride_sn,
                      stride_ym, M_BUCKET, GROUP_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                      GROUP_N: tl.constexpr = 8, NF4: tl.constexpr = False):
    """A [BLOCK_N, BLOCK_M] tile of y.T = W @ x.T; program axis 1 splits K (atomic fp32 adds when SPLIT_K > 1).
    BLOCK_K divides GROUP_SIZE, so a K-block has one scale and one zero per row, and K needs no mask."""
    pid_n, pid_m = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok, m_ok = rn < N, rm < M
    w_ptrs = w_ptr + rn[:, None] * stride_wn + tl.arange(0, BLOCK_K // 8)[None, :]
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(tl.program_id(1) * BLOCK_K, K, SPLIT_K * BLOCK_K):
        words = tl.load(w_ptrs + k0 // 8, mask=n_ok[:, None], other=0)
        s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP_SIZE, mask=n_ok, other=0.0).to(tl.float32)
        z = s  # NF4: unused
        if not NF4:
            z = tl.load(z_ptr + rn * stride_sn + k0 // GROUP_SIZE, mask=n_ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptrs + k0, mask=m_ok[:, None], other=0.0)
        w = _dequant_tile(words, s, z, lut_ptr, BLOCK_N, BLOCK_K, NF4).to(x.dtype)
        acc = _dot(w, tl.trans(x), acc, DOT_PRECISION)
    y_ptrs = y_ptr + rm.to(tl.int64)[None, :] * stride_ym + rn[:, None]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])
    else:
        tl.atomic_add(y_ptrs, acc, mask=n_ok[:, None] & m_ok[None, :], sem="relaxed")


def _dx_configs(interpret=None):
    if _INTERPRET if interpret is None else interpret:
        return [_config(4, 1, BLOCK_M=16, BLOCK_K=32, BLOCK_N=32)]
    # (BLOCK_M, BLOCK_K, BLOCK_N, warps, stages); BLOCK_K <= group size keeps one scale column per program
    # (256-row tiles, and 128x64 with 4 warps, spilled on sm_80)
    tiles = [(128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 4), (128, 128, 32, 8, 4),
             (64, 64, 64, 4, 4), (16, 64, 128, 4, 4), (32, 128, 64, 4, 4)]
    return [_config(w, st, BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn) for bm, bk, bn, w, st in tiles]


def _prune_dx(configs, named_args, **kwargs):
    bucket, g = named_args["M_BUCKET"], kwargs["GROUP_SIZE"]
    return _distinct(_with(c, BLOCK_K=min(c.kwargs["BLOCK_K"], g)) for c in configs
                     if c.kwargs["BLOCK_M"] <= max(bucket, 16))


@triton.autotune(configs=_dx_configs(), key=["M_BUCKET", "N", "K", "GROUP_SIZE", "NF4"],
                 prune_configs_by={"early_config_prune": _prune_dx})
@triton.jit
def _int4_dx_kernel(dy_ptr, w_ptr, s_ptr, z_ptr, dx_ptr, lut_ptr, M, N, K, stride_dym, stride_wn, stride_sn,
                    stride_dxm, M_BUCKET, GROUP_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr = 8,
                    NF4: tl.constexpr = False):
    """A [BLOCK_M, BLOCK_K] tile of dX = dY @ W, looping over N; W's words are read in the forward's layout."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), K // BLOCK_K, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rw = pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    m_ok = rm < M
    group = pid_k * BLOCK_K // GROUP_SIZE  # the one group column this K-block lies in
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        words = tl.load(w_ptr + rn[:, None] * stride_wn + rw[None, :], mask=n_ok[:, None], other=0)
        s = tl.load(s_ptr + rn * stride_sn + group, mask=n_ok, other=0.0).to(tl.float32)
        z = s  # NF4: unused
        if not NF4:
            z = tl.load(z_ptr + rn * stride_sn + group, mask=n_ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rm.to(tl.int64)[:, None] * stride_dym + rn[None, :],
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w = _dequant_tile(words, s, z, lut_ptr, BLOCK_N, BLOCK_K, NF4).to(dy.dtype)
        acc = _dot(dy, w, acc, DOT_PRECISION)
    dx_ptrs = dx_ptr + rm.to(tl.int64)[:, None] * stride_dxm + rk[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None])


# ----------------------------------------------------------------------------- launchers

def _m_bucket(M):
    """The M_BUCKET kernel argument: it only keys the autotuner (and its pruners), one tuning per power of two."""
    return min(triton.next_power_of_2(M), 4096)


def gpu_configs(kernel, M, K, group_size, nf4=False):
    """The configs that the autotuner of `kernel` ("gemv", "gemm" or "dx") tries on a GPU for a launch with M rows
    and K columns: its candidates after its pruner, as the launcher calls it (the same under TRITON_INTERPRET=1,
    which changes only what the kernels run on the CPU). scripts/compile_check.py compiles each of them."""
    bucket = _m_bucket(M)
    if kernel == "gemv":
        return _prune_gemv(_gemv_configs(False), dict(M_BUCKET=bucket), GROUP_SIZE=group_size, BLOCK_M=bucket,
                           NF4=nf4)
    if kernel == "gemm":
        return _keep_gemm(_gemm_configs(False), bucket, group_size, K, nf4)
    if kernel == "dx":
        return _prune_dx(_dx_configs(False), dict(M_BUCKET=bucket), GROUP_SIZE=group_size)
    raise ValueError(f"kernel must be 'gemv', 'gemm' or 'dx', got {kernel!r}")


def _dot_precision(dtype):
    # fp32 inputs follow torch's own matmul setting: exact fp32 unless TF32 was allowed
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _prepare(a, packed, scales, zeros, lut=None):
    """Contiguous operands; with a lut (NF4) the kernels get it, and the scales in place of the unused zeros."""
    if not (a.is_cuda or _INTERPRET):
        raise ValueError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                         "imported); use backend='torch' or 'auto' on CPU")
    a = a if a.stride(-1) == 1 else a.contiguous()
    scales = scales.contiguous()
    zeros = scales if lut is not None else zeros.contiguous()
    return a, packed.contiguous(), scales, zeros, (scales if lut is None else lut.contiguous())


def int4_matmul_triton(x, packed, scales, zeros, group_size, lut=None):
    """y = x @ W.T for a 2-D x (M, K), by the GEMV (M <= 4) or the GEMM kernel; no autograd."""
    N, K = _check_args(x, packed, scales, zeros, group_size, lut)
    nf4 = lut is not None
    x, packed, scales, zeros, lut = _prepare(x, packed, scales, zeros, lut)
    M = x.shape[0]
    if M == 0:
        return x.new_zeros(0, N)
    bucket = _m_bucket(M)
    if M <= GEMV_MAX_M:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
        _int4_gemv_kernel[grid](x, packed, scales, zeros, y, lut, M, N, K, x.stride(0), packed.stride(0),
                                scales.stride(0), y.stride(0), bucket,
                                GROUP_SIZE=group_size, BLOCK_M=bucket, NF4=nf4)
        return y
    # split-K programs add into a zeroed fp32 buffer; large M stores straight into the output dtype
    if bucket <= SPLIT_K_MAX_BUCKET:
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(M, meta["BLOCK_M"]), meta["SPLIT_K"])
    _int4_gemm_kernel[grid](x, packed, scales, zeros, y, lut, M, N, K, x.stride(0), packed.stride(0),
                            scales.stride(0), y.stride(0), bucket,
                            GROUP_SIZE=group_size, DOT_PRECISION=_dot_precision(x.dtype), NF4=nf4)
    return y.to(x.dtype)


def int4_matmul_dx_triton(dy, packed, scales, zeros, group_size, lut=None):
    """dX = dY @ W for a 2-D dY (M, N), in dY's dtype; no autograd."""
    N, K = packed.shape[0], packed.shape[1] * 8
    if dy.dim() != 2 or dy.shape[1] != N:
        raise ValueError(f"dy must have shape (M, N={N}), got {tuple(dy.shape)}")
    _check_args(dy.new_empty(0, K), packed, scales, zeros, group_size, lut)
    nf4 = lut is not None
    dy, packed, scales, zeros, lut = _prepare(dy, packed, scales, zeros, lut)
    M = dy.shape[0]
    dx = torch.empty(M, K, dtype=dy.dtype, device=dy.device)
    if M == 0:
        return dx
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * (K // meta["BLOCK_K"]),)
    _int4_dx_kernel[grid](dy, packed, scales, zeros, dx, lut, M, N, K, dy.stride(0), packed.stride(0),
                          scales.stride(0), dx.stride(0), _m_bucket(M),
                          GROUP_SIZE=group_size, DOT_PRECISION=_dot_precision(dy.dtype), NF4=nf4)
    return dx


class Int4MatmulFunction(torch.autograd.Function):
    """y = x @ W.T through the Triton kernels (or, chunked=True, the chunked torch path), gradient w.r.t. the 2-D x
    only (the weights are frozen buffers); only the packed weight is kept for backward, never a dense W."""

    @staticmethod
    def forward(ctx, x, packed, scales, zeros, group_size, lut=None, chunked=False):
        ctx.save_for_backward(packed, scales, zeros, lut)
        ctx.group_size, ctx.chunked = group_size, chunked
        fn = int4_matmul_chunked if chunked else int4_matmul_triton
        return fn(x, packed, scales, zeros, group_size, lut)

    @staticmethod
    def backward(ctx, dy):
        packed, scales, zeros, lut = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            fn = int4_matmul_dx_chunked if ctx.chunked else int4_matmul_dx_triton
            dx = fn(dy.contiguous(), packed, scales, zeros, ctx.group_size, lut)
        return dx, None, None, None, None, None, None


def int4_matmul(x, packed, scales, zeros, group_size, backend="auto", lut=None):
    """y (..., N) = x (..., K) @ W.T in x's dtype, W from the packed int4 weight (see the module docstring).

    backend: "triton" always runs the Triton kernels (on CPU only under TRITON_INTERPRET=1), "torch" the
    dequantize-then-matmul reference, "chunked" the torch path that dequantizes a block of rows of W at a time in
    the forward and again in the backward (no dense W kept between them: the CPU path of LoRA's 4-bit bases),
    "auto" Triton for CUDA tensors and the reference elsewhere.
    lut: a float32 table of 16 levels for NF4 codes (W = lut[q] * s; zeros is then None).
    """
    if backend not in ("auto", "triton", "torch", "chunked"):
        raise ValueError(f"backend must be 'auto', 'triton', 'torch' or 'chunked', got {backend!r}")
    N, K = _check_args(x, packed, scales, zeros, group_size, lut)
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return int4_matmul_reference(x, packed, scales, zeros, group_size, lut)
    y = Int4MatmulFunction.apply(x.reshape(-1, K), packed, scales, zeros, group_size, lut, backend == "chunked")
    return y.view(*x.shape[:-1], N)



# ---- chunked linear cross-entropy
# loss = cross_entropy(h @ W.T, targets) without the (tokens x vocab) logits: rows go through in chunks; each chunk's
# logits are made, turned in place into d loss / d logits by one kernel (softmax minus one-hot, times 1 / n_valid),
# and folded at once into d h (chunk @ W) and d W (chunk.T @ h). The gradients are thus finished in the forward and
# kept for backward, which only scales them by the incoming gradient. The idea of Liger-Kernel's fused linear
# cross-entropy; peak memory is one chunk of logits on top of d W, which any method needs.

LCE_IGNORE_INDEX = -1


@triton.jit
def _softmax_loss_grad_kernel(z_ptr, t_ptr, loss_ptr, stride_row, V, scale, ignore_index, BLOCK_V: tl.constexpr):
    """One row z of logits: loss = logsumexp(z) - z[t]; z is overwritten with scale * (softmax(z) - onehot(t)), and
    with zeros (loss 0) where t == ignore_index. Two passes: an online max and sum of exp, then the gradient."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_row
    t = tl.load(t_ptr + row)
    ignored = t == ignore_index
    m = float("-inf")
    s = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_t = tl.load(z_row + tl.where(ignored, 0, t)).to(tl.float32)  # read before the row is overwritten
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - z_t))
    w = tl.where(ignored, 0.0, scale)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        g = (tl.exp(z - lse) - tl.where(cols == t, 1.0, 0.0)) * w
        tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=cols < V)


def softmax_loss_grad_triton(logits, targets, scale, ignore_index=LCE_IGNORE_INDEX):
    """Per-row losses (fp32); logits (rows, V), row-contiguous, become d loss / d logits in place."""
    if not (logits.is_cuda or _INTERPRET):
        raise ValueError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1); use backend='torch'")
    rows, V = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block = min(triton.next_power_of_2(V), 64 if _INTERPRET else 8192)  # small under the interpreter: tails
        _softmax_loss_grad_kernel[(rows,)](logits, targets.contiguous(), loss, logits.stride(0), V, float(scale),
                                          ignore_index, BLOCK_V=block, num_warps=1 if _INTERPRET else 16)
    return loss


def softmax_loss_grad_torch(logits, targets, scale, ignore_index=LCE_IGNORE_INDEX):
    """The reference and CPU path of softmax_loss_grad_triton, in place on fp32 logits (no (rows, V) temporary)."""
    z = logits.float()  # the same tensor when logits are fp32
    ignored = targets == ignore_index
    t = targets.masked_fill(ignored, 0)[:, None]
    z_t = z.gather(1, t).squeeze(1)
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m).exp_()
    s = z.sum(dim=1, keepdim=True)
    z.div_(s)  # softmax
    loss = (m + s.log()).squeeze(1) - z_t
    z.scatter_add_(1, t, torch.full_like(z_t, -1.0)[:, None])
    z.mul_(torch.where(ignored, 0.0, scale)[:, None])
    if z is not logits:
        logits.copy_(z)
    return loss.masked_fill(ignored, 0.0)


def lce_chunk_rows(n_rows, n_embd):
    """Rows per chunk: a chunk's logits hold at most a quarter as many numbers as W (V x C), so d W dominates the
    loss step's memory, but at least n_rows / 16, so that a large batch runs in few, large matmuls."""
    quarter = 1 << max(4, (max(1, n_embd // 4)).bit_length() - 1)
    return max(quarter, triton.next_power_of_2(max(1, -(-n_rows // 16))))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """mean cross-entropy of h @ W.T over the rows whose target is not ignore_index; 2-D h (N, C), W (V, C)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows, ignore_index, backend, dtype, grad_enabled):
        N, C = h.shape
        hc, wc = h.to(dtype), weight.to(dtype)  # the autocast dtype (no copy when it is already theirs)
        valid = targets != ignore_index
        bad = valid & ((targets < 0) | (targets >= weight.shape[0]))
        n_valid, n_bad = torch.stack([valid.sum(), bad.sum()]).tolist()  # one device sync for both
        if n_bad:
            raise ValueError(f"targets must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}")
        scale = 1.0 / max(n_valid, 1)
        # (needs_input_grad is True even under no_grad, so the caller says whether a backward can come)
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        step = softmax_loss_grad_triton if backend == "triton" else softmax_loss_grad_torch
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, N, chunk_rows):
            h_i = hc[i:i + chunk_rows]
            logits = h_i @ wc.T
            total += step(logits, targets[i:i + chunk_rows], scale, ignore_index).sum()
            if need_h:
                grad_h[i:i + chunk_rows] = logits @ wc
            if need_w and grad_w.dtype == logits.dtype:
                grad_w.addmm_(logits.T, h_i)
            elif need_w:
                grad_w += logits.T @ h_i  # low-precision matmul, fp32 accumulation across chunks
            del logits  # before the next chunk's logits exist, not after
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / n_valid if n_valid else total * float("nan")  # like F.cross_entropy: nan with no targets

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        # scaled in place: the saved gradients are ours alone, and a copy of d W would double the peak
        if grad_h is not None:
            grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def linear_cross_entropy(h, weight, targets, ignore_index=LCE_IGNORE_INDEX, chunk_rows=None, backend="auto"):
    """F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=ignore_index), mean over the kept rows,
    without ever holding more than chunk_rows rows of logits. h (..., C), weight (V, C), targets (...) int64.

    backend: "triton" runs the softmax-loss-gradient kernel (CPU: only under TRITON_INTERPRET=1), "torch" the
    reference, "auto" Triton for CUDA tensors. Under autocast the matmuls run in the autocast dtype, as F.linear's.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if h.shape[-1] != weight.shape[1] or h.shape[:-1] != targets.shape:
        raise ValueError(f"h {tuple(h.shape)}, weight {tuple(weight.shape)} and targets {tuple(targets.shape)} "
                         f"do not fit: want h (..., C), weight (V, C), targets (...)")
    if backend == "auto":
        backend = "triton" if h.is_cuda else "torch"
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    h2, t1 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    rows = chunk_rows or lce_chunk_rows(h2.shape[0], h2.shape[1])
    with torch.autocast(dev, enabled=False):
        return LinearCrossEntropyFunction.apply(h2, weight, t1, rows, ignore_index, backend, dtype,
                                                torch.is_grad_enabled())


# ---- fused 8-bit AdamW step
# One pass per block of the 8-bit AdamW step of optim.AdamW8bit: load the codes and scales, dequantize, update
# m, v and the parameter in fp32, requantize, store. Its pure-torch reference is optim.py's chunked path
# (optim._update_chunk), which it follows op for op, with IEEE-rounded sqrt and division as torch's; tests/
# test_optim.py compares the two (under the interpreter on CPU).
# Codes: m = absmax q|q| / 127^2 (q int8), sqrt(v) = wmax (u / 255)^2 (u uint8), one fp32 scale per block.

@triton.jit
def _rint(x):
    """Round half to even, as torch.round (libdevice.rint is missing under the interpreter)."""
    r = tl.floor(x)
    d = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


@triton.jit
def _round_stochastic(x, r, top):
    """optim._round_stochastic: x in units of the code's value (k^2) -> k, unbiased in value."""
    s = tl.floor(tl.sqrt_rn(x))
    return tl.minimum(s + ((x - s * s) > r * (2.0 * s + 1.0)).to(tl.float32), top)


@triton.jit
def _adamw8bit_kernel(p_ptr, g_ptr, qm_ptr, am_ptr, qv_ptr, wv_ptr, skipped_ptr, n, nblocks,
                      decay, step_size, eps2, km, kv, out_m, out_v, seed, code_seed,
                      BLOCK: tl.constexpr, BLOCKS: tl.constexpr, BF16: tl.constexpr, STOCHASTIC: tl.constexpr,
                      SR_CODES: tl.constexpr):
    """BLOCKS quantization blocks of BLOCK elements per program; temporaries are [BLOCKS, BLOCK] registers."""
    rb = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    b_ok = rb < nblocks
    offs = rb.to(tl.int64)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    e_ok = offs < n
    g = tl.load(g_ptr + offs, mask=e_ok, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=e_ok, other=0.0).to(tl.float32)
    f = tl.load(qm_ptr + offs, mask=b_ok[:, None], other=0).to(tl.float32)
    amax = tl.load(am_ptr + rb, mask=b_ok, other=0.0)
    m = g + f * (tl.abs(f) * (amax * km)[:, None])                     # m~ = m / (1 - b1)
    u = tl.load(qv_ptr + offs, mask=b_ok[:, None], other=0).to(tl.float32)
    wmax = tl.load(wv_ptr + rb, mask=b_ok, other=0.0)
    c = u * (tl.sqrt_rn(wmax * kv) * (1.0 / 255.0))[:, None]
    c = c * c
    d = tl.sqrt_rn(c * c + g * g)                                        # sqrt(v~), v~ = v / (1 - b2)
    new_am = tl.max(tl.abs(m), axis=1)
    new_wv = tl.max(d, axis=1)
    finite = (tl.abs(m) < float("inf")) & (d < float("inf"))             # False for NaN too (tl.max drops NaN)
    ok = b_ok & (tl.min(finite.to(tl.int32), axis=1) == 1)
    v2 = tl.full((BLOCKS,), 65025.0, tl.float32)
    xv = d * tl.div_rn(v2, tl.maximum(new_wv, 1.1754943508222875e-38))[:, None]
    if SR_CODES:  # optim.code_noise: a 32-bit hash of (element index, seed) in int64 arithmetic, as torch's
        h = (offs ^ code_seed) & 0xFFFFFFFF
        h = ((h ^ (h >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
        h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
        h = h ^ (h >> 16)
        rm = ((h & 0xFFFF).to(tl.float32) + 0.5) * 0.0000152587890625  # 2^-16
        rv = ((h >> 16).to(tl.float32) + 0.5) * 0.0000152587890625
        m2 = tl.full((BLOCKS,), 16129.0, tl.float32)
        xm = tl.abs(m) * tl.div_rn(m2, tl.maximum(new_am, 1.1754943508222875e-38))[:, None]
        q = _round_stochastic(xm, rm, 127.0)
        q = tl.where(m < 0, -q, q)
        u = tl.maximum(_round_stochastic(xv, rv, 255.0), 1.0)
    else:
        y = tl.sqrt_rn(tl.abs(m) * (new_am * (1.0 / 16129.0))[:, None] + 1.1754943508222875e-38)
        q = _rint(tl.div_rn(m, y))
        u = tl.maximum(_rint(tl.sqrt_rn(xv)), 1.0)
    p = p * decay - step_size * tl.div_rn(m, d + eps2)
    if BF16:  # round by hand (the interpreter's cast truncates): add below bf16's last mantissa bit, truncate
        bits = p.to(tl.int32, bitcast=True)
        if STOCHASTIC:  # 16 random bits: rounds up with probability equal to the dropped fraction
            r = (tl.randint(seed, offs) & 0xFFFF).to(tl.int32)
        else:  # to nearest, ties to even
            r = 0x7FFF + ((bits >> 16) & 1)
        p = ((bits + r) & -65536).to(tl.float32, bitcast=True)
    w_ok = ok[:, None]
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=w_ok & e_ok)
    tl.store(qm_ptr + offs, q.to(tl.int8), mask=w_ok)
    tl.store(qv_ptr + offs, u.to(tl.uint8), mask=w_ok)
    tl.store(am_ptr + rb, new_am * out_m, mask=ok)
    tl.store(wv_ptr + rb, new_wv * out_v, mask=ok)
    n_bad = tl.sum((b_ok & ~ok).to(tl.int64), axis=0)
    tl.atomic_add(skipped_ptr, n_bad, mask=n_bad > 0)


def adamw8bit_step_triton(p, g, m_codes, m_absmax, v_codes, v_wmax, skipped, c, seed=None, code_seed=None):
    """One AdamW8bit step of the tensor p in place (optim.AdamW8bit's state layout); c holds the step's
    scalars (optim._Constants). seed: stochastic rounding of a bf16 p with this seed, None rounds to nearest;
    code_seed (31 bits): stochastic rounding of the codes (optim.code_noise), None rounds them to nearest."""
    if not (p.is_cuda or _INTERPRET):
        raise ValueError("the Triton 8-bit AdamW step needs CUDA tensors (or TRITON_INTERPRET=1)")
    if p.dtype not in _X_DTYPES or g.shape != p.shape:
        raise ValueError(f"p must be fp32/bf16/fp16 with a gradient of its shape, got {p.dtype} {tuple(g.shape)}")
    nblocks = m_absmax.numel()
    B = m_codes.numel() // nblocks
    if not p.is_contiguous():
        raise ValueError("the Triton 8-bit AdamW step wants a contiguous parameter")
    g = g.contiguous()
    blocks = 1 if _INTERPRET else max(1, 2048 // B)  # TODO: measure on an H200 (2048 elements per program)
    grid = (triton.cdiv(nblocks, blocks),)
    bf16 = p.dtype == torch.bfloat16
    _adamw8bit_kernel[grid](p, g, m_codes, m_absmax, v_codes, v_wmax, skipped, p.numel(), nblocks,
                            c.decay, c.step_size, c.eps2, c.km, c.kv, c.out_m, c.out_v,
                            (seed or 0) % (1 << 31), code_seed or 0, BLOCK=B, BLOCKS=blocks, BF16=bf16,
                            STOCHASTIC=bf16 and seed is not None, SR_CODES=code_seed is not None)
