"""optim.py: AdamW8bit, AdamW whose two moments are stored in 8 bits with one fp32 scale per block.

    opt = AdamW8bit(model.parameters(), lr=1e-3, weight_decay=0.1)   # a drop-in torch.optim.Optimizer

fp32 AdamW keeps 8 bytes of state per parameter; this keeps 2 + 8 / block_size (2.03 at the default 256).
Ideas it rests on (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022, for the first):
- Block-wise scales: each moment is cut into blocks of `block_size` elements with one fp32 scale per block, so an
  outlier costs precision only inside its own block. The last block of a tensor is padded.
- Codes that keep small magnitudes and quantize by arithmetic (no search over a code book):
      m, signed:    q = round(127 sign(m) sqrt(|m| / absmax))      m = absmax q|q| / 127^2
      v, unsigned:  stored as w = sqrt(v), the Adam denominator, companded once more:
                    u = max(1, round(255 sqrt(w / wmax)))          w = wmax (u / 255)^2
  Against the paper's dynamic map (measured): the m code's worst relative error is smaller above 1e-2 absmax
  (2.5% vs 6% at 0.1) and larger below (it reaches 0 under 1.5e-5 absmax, the map under 1e-6); the v code is
  finer everywhere above w / wmax = 1e-5, where the map (on v) already reads 0 below w / wmax = 3e-4. u >= 1
  puts a floor under the denominator, so a tiny v never turns into a division by eps. On the convergence runs
  of tests/test_optim.py both codes match fp32 AdamW. CODE_M and CODE_V are the shared tables.
- Stochastic rounding of the codes (default): a code is rounded up with probability equal to the value's
  distance from the level below over the step to the next level, so m and sqrt(v) are unbiased at every step.
  Rounded to nearest, a moment that changes by less than half a level per step never changes: with beta1 = 0.9
  every m code |q| <= 9 stays put when the gradient stops, and with beta2 = 0.99 every v code u < 200 can
  neither decay nor grow slowly, so late in training, as gradients shrink, v stays high and steps get too small
  (tests/test_optim.py measures m 259x and sqrt(v) 2.5x fp32 AdamW's after 60 steps of decay; 0.9x and 1.01x
  stochastically). The noise is a 32-bit hash of (element index, step, parameter index): no state, the same
  after a resume, and the same bits in all three implementations below.
- Math in fp32, memory in chunks: a tensor is updated a chunk (many blocks) at a time, dequantize -> AdamW ->
  requantize, with fp32 temporaries the size of a chunk; the moments are kept scaled by 1 / (1 - beta) inside a
  chunk so each Adam line is one fused torch op. On CUDA the same step is one Triton kernel
  (kernels.adamw8bit_step_triton), tested against this path.
- One pass on CPU: the chunked path costs ~20 torch ops per 128 KiB chunk, and op dispatch, not arithmetic,
  bounds it. For fp32 tensors of at least COMPILE_MIN elements the CPU step is the same math written once on
  whole (blocks, block_size) views and compiled by torch.compile (Inductor's C++ backend: per block one
  reduction loop for the new scales, one loop that updates and requantizes; vectorized, on torch's threads).
  It compiles once per process (dynamic shapes, ~10-40 s, cached on disk by Inductor after that), so small
  tensors, and machines where compiling fails, keep the chunked path (a warning says so once).

Non-finite gradients: a block whose gradient holds a NaN or an Inf (or whose v would overflow) is skipped for
that step: its parameters and both moments keep their old values, the other blocks update, and the count of
skipped blocks is kept in state["skipped_blocks"] (a warning is printed on the CPU path). Tensors with fewer
than `min_8bit_size` elements keep fp32 moments and count as one block.

bf16 parameters are written back with stochastic rounding by default (noise drawn from a seed made of the step
and the parameter's index, so a resumed run draws the same noise); fp16 parameters are rounded to nearest.
"""
import importlib.util
import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

M_LEVELS, V_LEVELS = 127, 255
FLT_MIN = torch.finfo(torch.float32).tiny  # the smallest normal float: keeps 0 / 0 out of the codes
# constants of the chunk loop as 0-d tensors: an op takes them without wrapping a Python number (~1.5 us less)
_FLT_MIN_T, _INV_M2_T, _V2_T = torch.tensor(FLT_MIN), torch.tensor(1 / M_LEVELS ** 2), torch.tensor(V_LEVELS ** 2.0)
_M2_T = torch.tensor(M_LEVELS ** 2.0)
CHUNK_CPU = 1 << 15      # elements per pass on CPU: 128 KiB fp32 temporaries (in L2); torch runs ops this small
                         # on the calling thread, and AdamW8bit spreads the chunks over torch's threads itself
CHUNK_OTHER = 1 << 22    # GPUs (the torch path, when Triton is not used): few, large launches
COMPILE_MIN = 1 << 20    # fp32 CPU tensors this large take the compiled one-pass step (backend "auto")
# the shared code tables: value / scale of each code; CODE_M is indexed by q + 128 (q = -128 is never written)
_q = torch.arange(-128, 128, dtype=torch.float64).clamp(min=-M_LEVELS)
CODE_M = (_q * _q.abs() / M_LEVELS ** 2).float()
CODE_V = (torch.arange(256, dtype=torch.float64) / V_LEVELS).pow(4).float()  # v / wmax^2 (w = wmax (u/255)^2)
del _q


# ----------------------------------------------------------------------------- the codes (whole-tensor reference)

def _blocks(x, block_size):
    """Flat fp32 copy of x padded with zeros to whole blocks, as (n_blocks, block_size)."""
    x = x.detach().reshape(-1).float()
    pad = -x.numel() % block_size
    return torch.nn.functional.pad(x, (0, pad)).view(-1, block_size)


def _round_stochastic(x, r, top):
    """x >= 0 in units of the code's value (code k stands for k^2) -> k, rounded up with probability equal to
    x's distance from k^2 over the step to (k + 1)^2, so E[k^2] = x; r uniform in (0, 1)."""
    s = x.sqrt().floor()
    return (s + (x - s * s > r * (2 * s + 1)).float()).clamp(max=top)


def quantize_m(m, block_size=256, noise=None):
    """m -> (int8 codes padded to whole blocks, fp32 absmax per block). noise (uniform in (0, 1), one per padded
    element; see code_noise): stochastic rounding that keeps the value unbiased; None: round to nearest."""
    x = _blocks(m, block_size)
    absmax = x.abs().amax(1)
    if noise is not None:
        q = _round_stochastic(x.abs() * (M_LEVELS ** 2 / absmax.clamp(min=FLT_MIN))[:, None],
                              noise.view_as(x), M_LEVELS)
        return (q * x.sign()).to(torch.int8).view(-1), absmax
    y = x / (x.abs() * (absmax / M_LEVELS ** 2)[:, None] + FLT_MIN).sqrt()
    return y.round().to(torch.int8).view(-1), absmax


def dequantize_m(codes, absmax, numel=None):
    """Inverse of quantize_m through the shared table; the first `numel` elements (default: all)."""
    x = CODE_M.to(absmax.device)[codes.long() + 128].view(absmax.numel(), -1) * absmax[:, None]
    return x.view(-1)[:numel]


def quantize_v(v, block_size=256, noise=None):
    """v >= 0 -> (uint8 codes padded to whole blocks, fp32 max of sqrt(v) per block); noise as in quantize_m
    (unbiased in sqrt(v))."""
    w = _blocks(v, block_size).sqrt()
    wmax = w.amax(1)
    x = w * (V_LEVELS ** 2 / wmax.clamp(min=FLT_MIN))[:, None]
    u = x.sqrt().round() if noise is None else _round_stochastic(x, noise.view_as(x), V_LEVELS)
    return u.clamp(min=1).to(torch.uint8).view(-1), wmax


HASH_MUL = (0x7FEB352D, 0x2C1B3C6D)  # odd, below 2^31: a product of two 32-bit values stays inside int64
MASK32 = 0xFFFFFFFF


def code_seed(step, index):
    """The noise seed (31 bits) of one tensor's step: a function of the step and the parameter's index only,
    so a resumed run draws the same noise."""
    x = (step * 1_000_003 + index * 7919 + 0x5BD1E995) & MASK32
    for mul in HASH_MUL:
        x = ((x ^ (x >> 16)) * mul) & MASK32
    return (x ^ (x >> 16)) & 0x7FFFFFFF


def _hash32(x):
    """A 32-bit integer hash (xor-shift / multiply rounds) of x int64 in [0, 2^32), in place."""
    x ^= x >> 16
    x.mul_(HASH_MUL[0]).bitwise_and_(MASK32)
    x ^= x >> 15
    x.mul_(HASH_MUL[1]).bitwise_and_(MASK32)
    x ^= x >> 16
    return x


def code_noise(index, seed):
    """Two independent uniform noises in (0, 1), fp32, for the m and the v code of the elements at positions
    `index` (int64) of a tensor: 16 bits each of one hash of (index, seed). The chunked path, the compiled step
    and the Triton kernel compute the same bits."""
    x = _hash32((index ^ seed).bitwise_and_(MASK32))
    return (((x & 0xFFFF).float() + 0.5) * 2 ** -16, ((x >> 16).float() + 0.5) * 2 ** -16)


def dequantize_v(codes, wmax, numel=None):
    """Inverse of quantize_v (returns v, not sqrt(v)) through the shared table."""
    x = CODE_V.to(wmax.device)[codes.long()].view(wmax.numel(), -1) * (wmax * wmax)[:, None]
    return x.view(-1)[:numel]


# ----------------------------------------------------------------------------- the chunked step


class _Scratch:
    """fp32 temporaries of one chunk, reused across tensors and steps (never part of the state), with their views
    made once: making a view costs as much as a small op."""

    def __init__(self, chunk, device):
        self.chunk = chunk
        f32 = dict(dtype=torch.float32, device=device)
        self.bufs = [torch.empty(chunk, **f32) for _ in range(5)]
        self.p, self.g = torch.empty(chunk, **f32), torch.empty(chunk, **f32)  # a chunk of a non-fp32 tensor
        self.i16 = torch.empty(chunk, dtype=torch.int16, device=device)
        self.k = torch.empty(chunk // 16, **f32)  # per-block factors (block_size >= 16)
        # stochastic rounding of the codes: element indices, the hash and its temporary, the two noises, a mask
        self.index = torch.arange(chunk, dtype=torch.int64, device=device)
        self.h, self.t = torch.empty(chunk, dtype=torch.int64, device=device), torch.empty_like(self.index)
        self.rm, self.rv, self.e = (torch.empty(chunk, **f32) for _ in range(3))
        self.up = torch.empty(chunk, dtype=torch.bool, device=device)
        self._views = {}

    def views(self, n, B):
        """(f, a, b, m, d) flat, (f, a, b, d) as (n // B, B), k as (n // B,) and (n // B, 1), int16: for n elements."""
        if (n, B) not in self._views:
            flat = [t[:n] for t in self.bufs]
            nb = n // B
            blocks = [flat[i].view(nb, B) for i in (0, 1, 2, 4)]
            self._views[n, B] = (*flat, *blocks, self.k[:nb], self.k[:nb, None], self.i16[:n])
        return self._views[n, B]

    def noise(self, n, first, seed):
        """code_noise for the n elements from position `first` of a tensor, into rm, rv; returns (rm, rv, e, up)
        views of n elements (e and up are temporaries of the rounding)."""
        h, t, rm, rv = self.h[:n], self.t[:n], self.rm[:n], self.rv[:n]
        torch.add(self.index[:n], first, out=h).bitwise_xor_(seed).bitwise_and_(MASK32)
        for shift, mul in zip((16, 15), HASH_MUL):
            h.bitwise_xor_(torch.bitwise_right_shift(h, shift, out=t)).mul_(mul).bitwise_and_(MASK32)
        h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=t))
        rm.copy_(torch.bitwise_and(h, 0xFFFF, out=t)).add_(0.5).mul_(2 ** -16)
        rv.copy_(torch.bitwise_right_shift(h, 16, out=t)).add_(0.5).mul_(2 ** -16)
        return rm, rv, self.e[:n], self.up[:n]


def _round_stochastic_(x, s, r, e, up, top):
    """In place, the chunk form of _round_stochastic: x (value units) is overwritten, s receives the code (a float
    in [0, top]), r the threshold; e, up temporaries."""
    torch.sqrt(x, out=s).floor_()
    torch.add(s, s, out=e).add_(1)
    r.mul_(e)
    x.addcmul_(s, s, value=-1)
    return s.add_(torch.gt(x, r, out=up)).clamp_(max=top)


class _Constants:
    """Scalars of one tensor's step, in the units used inside a chunk: m~ = m / (1 - b1), v~ = v / (1 - b2)."""

    def __init__(self, lr, beta1, beta2, eps, weight_decay, step):
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        self.lr, self.beta1, self.beta2, self.eps, self.bc1, self.bc2 = lr, beta1, beta2, eps, bc1, bc2
        scale = math.sqrt(bc2 / (1 - beta2))  # sqrt(v_hat) = sqrt(v~) / scale
        self.decay = 1 - lr * weight_decay
        self.step_size = lr * (1 - beta1) / bc1 * scale  # p -= step_size * m~ / (sqrt(v~) + eps2)
        self.eps2 = eps * scale
        self.km = beta1 / ((1 - beta1) * M_LEVELS ** 2)  # b1 m_old / (1 - b1) = q|q| absmax km
        self.kv = math.sqrt(beta2 / (1 - beta2))  # b2 v_old / (1 - b2) = (u^2 wmax kv / 255^2)^2
        self.out_m, self.out_v = 1 - beta1, math.sqrt(1 - beta2)  # chunk maxima -> the stored absmax, wmax
        self.eps2_t, self.decay_t = torch.tensor(self.eps2), torch.tensor(self.decay)


def _update_chunk(pc, gc, qm, qv, km, kv, amax, wmax, c, views, noise=None):
    """nb whole blocks: pc, gc fp32 (nb * B,) updated in place, codes qm int8 / qv uint8 (nb * B,) requantized
    in place, dequantize factors km, kv (nb, 1); amax, wmax (nb,) receive max |m~| and max sqrt(v~) per block;
    noise: (rm, rv, e, up) from _Scratch.noise for stochastic rounding of the codes, None to round to nearest.
    Returns the indices of the blocks skipped for a non-finite value, or None. Each line is one pass over
    L2-resident data (the kernel in kernels.py does the same operations in the same order)."""
    f, a, b, m, d, f2, a2, b2, d2, k, k2, i16 = views
    # m~ = g + b1 / (1 - b1) m_old, m_old = absmax q|q| / 127^2
    f.copy_(qm)
    torch.abs(f, out=a)
    torch.mul(a2, km, out=b2)
    torch.addcmul(gc, f, b, out=m)
    # v~ = g^2 + b2 / (1 - b2) v_old, sqrt(v_old) = wmax (u / 255)^2; then d = sqrt(v~)
    f.copy_(qv)
    torch.mul(f2, kv, out=a2)
    a.mul_(a)
    torch.mul(a, a, out=d)
    d.addcmul_(gc, gc).sqrt_()
    # the new scales; a NaN or an Inf in g shows in d, so in its block's maximum
    torch.abs(m, out=a)
    torch.amax(a2, 1, out=amax)
    torch.amax(d2, 1, out=wmax)
    saved = None
    if not math.isfinite(wmax.max()):
        bad = (~(amax.isfinite() & wmax.isfinite())).nonzero()[:, 0]
        nb = amax.numel()
        saved = [(t.view(nb, -1), t.view(nb, -1)[bad].clone()) for t in (pc, qm, qv)]
    # u = max(1, round(sqrt(d * 255^2 / max d)))
    torch.div(_V2_T, torch.clamp(wmax, min=FLT_MIN, out=k), out=k)
    torch.mul(d2, k2, out=b2)
    if noise is None:
        u = b.sqrt_().round_()
    else:  # x = b in units of the code's value (u^2); f receives u
        u = _round_stochastic_(b, f, noise[1], noise[2], noise[3], V_LEVELS)
    qv.copy_(i16.copy_(u).clamp_(min=1))  # float -> int16 -> uint8 is 4x faster than float -> uint8
    # AdamW
    d.add_(c.eps2_t)
    if c.decay != 1:
        pc.mul_(c.decay_t)
    pc.addcdiv_(m, d, value=-c.step_size)
    if noise is None:  # q = round(127 sign(m) sqrt(|m| / absmax)) = round(m / sqrt(|m| absmax / 127^2))
        torch.mul(amax, _INV_M2_T, out=k)
        torch.mul(a2, k2, out=b2)
        b.add_(_FLT_MIN_T).sqrt_()
        torch.div(m, b, out=a)
        qm.copy_(a.round_())
    else:  # x = |m| 127^2 / absmax, in units of the code's value (q^2); f receives |q|
        torch.div(_M2_T, torch.clamp(amax, min=FLT_MIN, out=k), out=k)
        torch.mul(a2, k2, out=b2)
        _round_stochastic_(b, f, noise[0], noise[2], noise[3], M_LEVELS)
        qm.copy_(torch.copysign(f, m, out=f))
    if saved is None:
        return None
    for view, old in saved:
        view[bad] = old
    return bad


def _update_blocks(p, g, qm, qv, amax_old, wmax_old, k, seed=None):
    """The chunked step's math on whole tensors, written for torch.compile (one fused loop per block): p, g fp32
    and the codes qm int8 / qv uint8 as (nblocks, B) views, updated in place with the scales amax_old, wmax_old
    (nblocks,); k holds the step's constants (a tensor, so a new learning rate does not recompile); seed (an int64
    0-d tensor, or None to round to nearest): stochastic rounding of the codes with code_noise. A block with a
    non-finite value keeps its parameters, codes and scales. Returns the number of such blocks (a 0-d tensor)."""
    km, kv, eps2, decay, step_size, out_m, out_v = k.unbind()
    fm, fv = qm.float(), qv.float()
    m = g + fm * fm.abs() * (amax_old * km)[:, None]      # m~ = g + b1 / (1 - b1) m_old
    w = fv * fv * (wmax_old * kv)[:, None]                # sqrt(b2 / (1 - b2) v_old)
    dd = w * w + g * g                                    # v~
    amax, wmax = m.abs().amax(1), dd.amax(1).sqrt()       # max sqrt = sqrt max, one sqrt a block (5% faster)
    d = dd.sqrt()
    ok = amax.isfinite() & wmax.isfinite()
    okc = ok[:, None]
    xv = d * (V_LEVELS ** 2 / wmax.clamp(min=FLT_MIN))[:, None]
    if seed is None:
        u = xv.sqrt().round().clamp(min=1)
        q = (m / (m.abs() * (amax * (1 / M_LEVELS ** 2))[:, None] + FLT_MIN).sqrt()).round()
    else:
        rm, rv = code_noise(torch.arange(p.numel(), device=p.device).view(p.shape), seed)
        u = _round_stochastic(xv, rv, V_LEVELS).clamp(min=1)
        q = _round_stochastic(m.abs() * (M_LEVELS ** 2 / amax.clamp(min=FLT_MIN))[:, None], rm, M_LEVELS)
        q = q.copysign(m)
    p.copy_(torch.where(okc, p * decay - step_size * m / (d + eps2), p))
    qm.copy_(torch.where(okc, q, fm).to(torch.int8))
    qv.copy_(torch.where(okc, u, fv).to(torch.uint8))  # straight to uint8: an int16 hop would stop vectorizing
    amax_old.copy_(torch.where(ok, amax * out_m, amax_old))
    wmax_old.copy_(torch.where(ok, wmax * out_v, wmax_old))
    return (~ok).sum()


_COMPILED = {}  # "fn": the compiled _update_blocks, or None once compiling has failed in this process


def _compiled_step(p, g, st, c, code_seed=None):
    """One fp32 tensor through the compiled step; returns the number of skipped blocks, or None when torch.compile
    is not available here (the caller then takes the chunked path)."""
    if _COMPILED.get("fn", 0) is None:
        return None
    B = st["m_codes"].numel() // st["m_absmax"].numel()
    k = torch.tensor([c.km, c.kv / V_LEVELS ** 2, c.eps2, c.decay, c.step_size, c.out_m, c.out_v])
    args = (p.view(-1, B), g.view(-1, B), st["m_codes"].view(-1, B), st["v_codes"].view(-1, B),
            st["m_absmax"], st["v_wmax"], k, None if code_seed is None else torch.tensor(code_seed))
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_update_blocks, dynamic=True)
        try:
            return int(_COMPILED["fn"](*args))  # compiles here; a failure raises before anything is written
        except Exception as e:  # no C++ compiler, an unsupported platform, ...
            _COMPILED["fn"] = None
            warnings.warn(f"AdamW8bit: torch.compile is not usable here ({type(e).__name__}: {str(e)[:200]}); "
                          "the CPU step takes the slower chunked path")
            return None
    return int(_COMPILED["fn"](*args))


def _write_back(dst, src, noise_gen):
    """dst (a bf16 / fp16 / fp32 view) <- src (fp32 scratch, overwritten). bf16 with a generator: stochastic
    rounding, i.e. add uniform noise below bf16's last mantissa bit, then truncate (now exactly representable)."""
    if dst.dtype == torch.bfloat16 and noise_gen is not None:
        bits = src.view(torch.int32)
        bits.add_(torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=noise_gen))
        bits.bitwise_and_(-65536)
    dst.copy_(src)


class _Chunked:
    """One tensor's 8-bit step, cut into chunks of whole blocks that may run in any order on any thread
    (run), then finish() writes the new scales. Chunks never share elements or blocks."""

    def __init__(self, p, g, st, c, seed, chunk, code_seed=None):
        self.p, self.st, self.c, self.seed, self.code_seed = p, st, c, seed, code_seed
        self.n, nblocks = p.numel(), st["m_absmax"].numel()
        self.B = B = st["m_codes"].numel() // nblocks
        self.pflat = p.view(-1) if p.is_contiguous() else p.reshape(-1)  # a copy when p is not contiguous
        gflat = g.reshape(-1)
        self.fp32 = self.pflat.dtype == gflat.dtype == torch.float32
        km = (st["m_absmax"] * c.km)[:, None]
        kv = (st["v_wmax"] * c.kv).sqrt_().mul_(1 / V_LEVELS)[:, None]
        self.new = torch.empty(2, nblocks, dtype=torch.float32, device=p.device)
        per = max(1, chunk // B)
        parts = zip(self.pflat.split(per * B), gflat.split(per * B), st["m_codes"].split(per * B),
                    st["v_codes"].split(per * B), km.split(per), kv.split(per), self.new[0].split(per),
                    self.new[1].split(per))
        self.parts = [(i * per, part) for i, part in enumerate(parts)]  # (first block, views); no cycle to self
        self.bad = []

    def run(self, b0, part, s):
        pc, gc, qm, qv, km, kv, amax, wmax = part
        n, real = qm.numel(), pc.numel()  # real < n: the last block is padding past the tensor's end
        through = not self.fp32 or real < n
        if through:  # another dtype or the padded end: through fp32 scratch
            p_out, g_in = pc, gc
            pc, gc = s.p[:n], s.g[:n]
            pc[:real].copy_(p_out)
            gc[:real].copy_(g_in)
            if real < n:
                pc[real:].zero_()
                gc[real:].zero_()
        noise = None if self.code_seed is None else s.noise(n, b0 * self.B, self.code_seed)
        bad = _update_chunk(pc, gc, qm, qv, km, kv, amax, wmax, self.c, s.views(n, self.B), noise)
        if bad is not None:
            self.bad.append(bad + b0)
        if through:
            gen = None if self.seed is None else _generator(pc.device, (self.seed * 7919 + b0) % (1 << 63))
            _write_back(p_out, pc[:real], gen)

    def finish(self):
        """The new scales (the skipped blocks keep theirs); returns the number of skipped blocks."""
        st, p = self.st, self.p
        if self.pflat.data_ptr() != p.data_ptr():
            p.copy_(self.pflat.view(p.shape))
        bad = torch.cat(self.bad) if self.bad else None
        old = None if bad is None else (st["m_absmax"][bad].clone(), st["v_wmax"][bad].clone())
        torch.mul(self.new[0], self.c.out_m, out=st["m_absmax"])
        torch.mul(self.new[1], self.c.out_v, out=st["v_wmax"])
        if bad is None:
            return 0
        st["m_absmax"][bad], st["v_wmax"][bad] = old
        return bad.numel()


def _run_chunks(chunks, scratches, pool):
    """Every chunk once, on len(scratches) threads (this one included) that take the next chunk when done: no
    barrier per operation, so a busy machine slows the step down gracefully. Chunks are small enough that each
    torch op runs on its calling thread (below torch's grain size) and releases the GIL while it runs."""
    order = iter(range(len(chunks)))

    def work(s):
        with torch.no_grad():  # grad mode is per thread
            for i in order:  # next() on a shared iterator: each chunk is taken once
                tensor, b0, part = chunks[i]
                tensor.run(b0, part, s)

    futures = [pool.submit(work, s) for s in scratches[1:]] if pool is not None else []
    work(scratches[0])
    for f in futures:
        f.result()


def _step_fp32(p, g, st, c, noise_gen):
    """Plain AdamW for a small tensor, moments in fp32 (stored as m and v); all or nothing on a non-finite g."""
    g = g.float()
    if not torch.isfinite(g).all():
        return 1
    m, v = st["exp_avg"], st["exp_avg_sq"]
    m.lerp_(g, 1 - c.beta1)
    v.mul_(c.beta2).addcmul_(g, g, value=1 - c.beta2)
    pf = p.detach().float() if p.dtype != torch.float32 else p
    if c.decay != 1:
        pf.mul_(c.decay)
    pf.addcdiv_(m, v.sqrt().div_(math.sqrt(c.bc2)).add_(c.eps), value=-c.lr / c.bc1)
    if pf is not p:
        _write_back(p, pf, noise_gen)
    return 0


# ----------------------------------------------------------------------------- the optimizer

_STATE_8BIT = {"m_codes": torch.int8, "m_absmax": torch.float32, "v_codes": torch.uint8, "v_wmax": torch.float32}
_STATE_FP32 = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32}


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) with 8-bit block-wise quantized moments.

    Per-group options: lr, betas, eps, weight_decay, block_size (a power of two, 16..4096) and min_8bit_size
    (tensors with fewer elements keep fp32 moments). stochastic_rounding: bf16 parameters are written back with
    stochastic rounding. stochastic_codes: the 8-bit codes are rounded stochastically (False: to nearest).
    backend: "auto" (the Triton kernel for CUDA tensors; on CPU the compiled one-pass step for fp32 tensors of
    COMPILE_MIN elements or more, the chunked torch path for the rest), "torch" (chunked only), "compile"
    (compiled wherever it applies) or "triton" (on CPU only under TRITON_INTERPRET=1, for tests).
    State per parameter: step, skipped_blocks, and either m_codes (int8), m_absmax, v_codes (uint8), v_wmax
    (fp32 per block) or exp_avg, exp_avg_sq (fp32); all plain tensors, so torch.load(weights_only=True) works.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, block_size=256,
                 min_8bit_size=4096, stochastic_rounding=True, stochastic_codes=True, backend="auto"):
        if backend not in ("auto", "torch", "triton", "compile"):
            raise ValueError(f"backend must be 'auto', 'torch', 'triton' or 'compile', got {backend!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block_size=block_size,
                        min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)  # checks each group through add_param_group
        self.stochastic_rounding, self.stochastic_codes = stochastic_rounding, stochastic_codes
        self.backend = backend
        self._scratch, self._pool, self._pool_size = {}, None, 0

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    def _init_state(self, p, group):
        n, B = p.numel(), group["block_size"]
        zeros = lambda size, dtype: torch.zeros(size, dtype=dtype, device=p.device)
        st = {"step": torch.tensor(0.0), "skipped_blocks": zeros((), torch.int64)}  # step on the CPU, as torch's
        if n >= max(1, group["min_8bit_size"]):
            nblocks = -(-n // B)
            st.update(m_codes=zeros(nblocks * B, torch.int8), m_absmax=zeros(nblocks, torch.float32),
                      v_codes=zeros(nblocks * B, torch.uint8), v_wmax=zeros(nblocks, torch.float32))
        else:
            st.update(exp_avg=zeros(p.shape, torch.float32), exp_avg_sq=zeros(p.shape, torch.float32))
        return st

    def _scratches(self, device):
        """Chunk temporaries: one set per thread on CPU (as many threads as torch uses), one set elsewhere."""
        threads = max(1, torch.get_num_threads()) if device.type == "cpu" else 1
        have = self._scratch.setdefault(device, [])
        while len(have) < threads:
            have.append(_Scratch(CHUNK_CPU if device.type == "cpu" else CHUNK_OTHER, device))
        if threads > 1 and (self._pool is None or self._pool_size < threads - 1):
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool, self._pool_size = ThreadPoolExecutor(threads - 1, thread_name_prefix="adamw8bit"), threads - 1
        return have[:threads]

    def _use_compiled(self, p):
        """The one-pass compiled step: large contiguous fp32 CPU tensors of whole blocks (or backend "compile")."""
        B = self.state[p]["m_codes"].numel() // self.state[p]["m_absmax"].numel()
        fits = (p.device.type == "cpu" and p.dtype == p.grad.dtype == torch.float32 and p.is_contiguous()
                and p.grad.is_contiguous() and p.numel() % B == 0)
        return fits and (self.backend == "compile" or self.backend == "auto" and p.numel() >= COMPILE_MIN)

    def _use_triton(self, p):
        if self.backend != "auto":
            return self.backend == "triton"
        fits = p.is_cuda and p.is_contiguous() and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        return fits and importlib.util.find_spec("triton") is not None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        chunked = {}  # device -> tensors stepped by the chunked torch path, run together at the end
        index = -1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                st = self.state[p]
                if not st:
                    st.update(self._init_state(p, group))
                st["step"] += 1
                step = int(st["step"])
                c = _Constants(float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"], step)
                seed = None
                if self.stochastic_rounding and p.dtype == torch.bfloat16:
                    seed = (step * 1_000_003 + index) % (1 << 62)  # the same noise after a resume
                cseed = code_seed(step, index) if self.stochastic_codes else None
                if "m_codes" not in st:
                    gen = None if seed is None else _generator(p.device, seed)
                    self._count_skipped(p, st, _step_fp32(p, p.grad, st, c, gen))
                elif self._use_compiled(p) and (n := _compiled_step(p, p.grad, st, c, cseed)) is not None:
                    self._count_skipped(p, st, n)
                elif self._use_triton(p):
                    import kernels  # blocks with a non-finite gradient are counted on the device, without a sync
                    kernels.adamw8bit_step_triton(p, p.grad, st["m_codes"], st["m_absmax"], st["v_codes"],
                                                  st["v_wmax"], st["skipped_blocks"], c, seed=seed, code_seed=cseed)
                else:
                    chunk = CHUNK_CPU if p.device.type == "cpu" else CHUNK_OTHER
                    chunked.setdefault(p.device, []).append(_Chunked(p, p.grad, st, c, seed, chunk, cseed))
        for device, tensors in chunked.items():
            scratches = self._scratches(device)
            _run_chunks([(t, *part) for t in tensors for part in t.parts], scratches,
                        self._pool if len(scratches) > 1 else None)
            for t in tensors:
                self._count_skipped(t.p, t.st, t.finish())
        return loss

    @staticmethod
    def _count_skipped(p, st, skipped):
        if skipped:
            st["skipped_blocks"] += skipped
            warnings.warn(f"AdamW8bit: {skipped} block(s) of a {tuple(p.shape)} tensor had a non-finite gradient "
                          f"at step {int(st['step'])}; their parameters and moments were kept")

    def __setstate__(self, state):  # unpickled or deep-copied: the scratch and the threads are not carried
        super().__setstate__(state)
        self.__dict__.setdefault("stochastic_rounding", True)
        self.__dict__.setdefault("stochastic_codes", True)
        self.__dict__.setdefault("backend", "auto")
        self._scratch, self._pool, self._pool_size = {}, None, 0

    def __getstate__(self):
        return {**super().__getstate__(), "stochastic_rounding": self.stochastic_rounding,
                "stochastic_codes": self.stochastic_codes, "backend": self.backend}

    def load_state_dict(self, state_dict):
        """As torch's, but the state keeps its own dtypes (torch would cast the codes and the fp32 moments to
        the parameter's dtype) and is checked against the parameters it is loaded into."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        saved = dict(state_dict["state"])
        super().load_state_dict(state_dict)
        for i, p in zip(saved_ids, params):
            if i not in saved:
                continue
            st = {k: v.to(p.device, copy=True) if torch.is_tensor(v) else v for k, v in saved[i].items()}
            st["step"] = torch.tensor(float(st.get("step", 0)))  # on the CPU, as torch keeps it
            _check_state(st, p)
            self.state[p] = st


def _generator(device, seed):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _check_group(group):
    B, lr, eps, wd = group["block_size"], group["lr"], group["eps"], group["weight_decay"]
    if not (isinstance(B, int) and 16 <= B <= 4096 and B & (B - 1) == 0):
        raise ValueError(f"block_size must be a power of two from 16 to 4096, got {B!r}")
    if not 0 <= group["min_8bit_size"]:
        raise ValueError(f"min_8bit_size must be >= 0, got {group['min_8bit_size']}")
    if not all(0.0 <= b < 1.0 for b in group["betas"]) or len(group["betas"]) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {group['betas']}")
    if float(lr) < 0 or eps < 0 or wd < 0:
        raise ValueError(f"lr, eps and weight_decay must be >= 0, got {float(lr)}, {eps}, {wd}")
    for p in group["params"]:
        if not p.is_floating_point() or p.is_complex():
            raise TypeError(f"AdamW8bit optimizes real floating-point tensors, got {p.dtype}")


def _check_state(st, p):
    """A loaded state must fit its parameter: dtypes, and code sizes that match the parameter's size."""
    kinds = _STATE_8BIT if "m_codes" in st else _STATE_FP32
    for key, dtype in kinds.items():
        if key not in st or not torch.is_tensor(st[key]) or st[key].dtype != dtype:
            raise ValueError(f"optimizer state for a {tuple(p.shape)} parameter lacks {key} ({dtype})")
    if "m_codes" in st:
        nblocks = st["m_absmax"].numel()
        B = st["m_codes"].numel() // max(1, nblocks)
        ok = (st["v_wmax"].numel() == nblocks and st["m_codes"].numel() == st["v_codes"].numel() == nblocks * B
              and B >= 1 and -(-p.numel() // B) == nblocks)
    else:
        ok = st["exp_avg"].shape == st["exp_avg_sq"].shape == p.shape
    if not ok:
        raise ValueError(f"optimizer state does not fit a parameter of shape {tuple(p.shape)}")
