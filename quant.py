"""quant.py: weight quantizers with a straight-through estimator, fake-quant layers for quantization-aware training
(QAT), post-training quantization (round-to-nearest and GPTQ), and export to real packed int4 / int8 weights.

    quantize_(model, "w4g32")                  nn.Linear -> FakeQuantLinear: train through the rounding (QAT)
    apply_ptq_(model, "gptq", "w4g32", calib)  PTQ: RTN, or GPTQ's error-feedback rounding on calibration batches
    convert_(model)                            FakeQuantLinear -> Int4Linear (<= 4 bits, kernels.int4_matmul)
                                               or Int8Linear (5 to 8 bits, one code per byte)

Ideas it rests on:
- Every format is codes q in 0..qmax with one scale s and one integer zero z per group of K: affine integers
  (w = (q - z) s), ternary (q in 0..2, z = 1, s = mean |w|) and NF4 (w = level[q] s, QLoRA's 16 normal quantiles).
  One function picks (s, z) from weights (`weight_qparams`), one rounds (`_codes`), one dequantizes (`_dequantize`);
  the fake-quant forward and convert_ both use them, so the exported model computes what QAT trained, bit for bit
  in the weights. Scales leave `weight_qparams` rounded to fp16, so storing them as fp16 loses nothing.
- Fake-quant forward, straight-through backward: with scales computed from the weights each step the gradient
  passes to w unchanged (BitNet, torchao); with learned scales (LSQ) w gets it only inside the grid's range and s
  gets (round(v) - v) inside, the clamp bound outside, times 1 / sqrt(N * Qp) (N weights share the scale).
- The building blocks take a plain (N, K) tensor, so a LoRA base (or anything else) can call
  weight_qparams / quantize_weight / dequantize_weight / fake_quantize directly.
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

SPEC_GRAMMAR = """spec := FORMAT [a8] [gGROUP] [-sym | -asym] [-lsq]
  FORMAT   w2 .. w8 integers; w1.58 ternary {-1, 0, +1} with an absmean scale (BitNet b1.58);
           nf4 the 16 normal-quantile levels of QLoRA with an absmax scale
  a8       also fake-quantize the layer's input to int8 per token (dynamic, symmetric)
  gGROUP   one scale per GROUP in 32, 64, 128, 256 weights along K (clamped to K); default: one per output
           channel (nf4: 64)
  -sym     integers: zero point fixed mid-range, scale from absmax; -asym (the default): scale and zero from min/max
  -lsq     learn the scales (LSQ), initialised from the weights
  examples: w8, w4g32, w4a8g32, w3g64, w2g64, w1.58, nf4g64, w4g32-lsq"""

_SPEC_RE = re.compile(r"(?:w(?P<bits>[2-8]|1\.58)|(?P<nf4>nf4))(?P<a8>a8)?(?:g(?P<group>\d+))?"
                      r"(?P<opts>(?:-(?:sym|asym|lsq))*)")
GROUP_SIZES = (32, 64, 128, 256)
SCALE_MIN = 2.0 ** -20  # exactly representable in fp16; an all-zero group gets this scale


def _nf4_levels():
    """QLoRA's NF4: 8 positive and 7 negative quantiles of N(0, 1), an exact 0, normalised to [-1, 1]."""
    offset = 0.9677083  # (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, QLoRA's choice of the outermost quantile
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()


NF4_LEVELS = _nf4_levels()
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


# ----------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class QuantSpec:
    text: str
    kind: str               # "int", "ternary" or "nf4"
    bits: int               # integer bits; 2 for ternary (codes 0..2), 4 for nf4
    group_size: int | None  # None: one scale per output channel
    symmetric: bool
    act8: bool              # int8 per-token activations
    lsq: bool               # learned scales

    @property
    def qmax(self):
        return 2 if self.kind == "ternary" else 2 ** self.bits - 1

    @property
    def qp(self):
        """LSQ's Q_P: the largest positive level in units of the scale."""
        if self.kind == "int":
            return 2 ** (self.bits - 1) - 1 if self.symmetric else self.qmax
        return 1

    def __str__(self):
        return self.text


def parse_spec(text):
    """A QuantSpec from a spec string; ValueError with the grammar for anything else."""
    if isinstance(text, QuantSpec):
        return text
    m = _SPEC_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    def bad(why):
        return ValueError(f"bad quantization spec {text!r}: {why}\n{SPEC_GRAMMAR}")
    if m is None:
        raise bad("it does not match the grammar")
    opts = [o for o in m["opts"].split("-") if o]
    if len(set(opts)) < len(opts) or {"sym", "asym"} <= set(opts):
        raise bad("repeated or conflicting options")
    group = int(m["group"]) if m["group"] else (64 if m["nf4"] else None)
    if group is not None and group not in GROUP_SIZES:
        raise bad(f"group size {group} is not one of {GROUP_SIZES}")
    kind = "nf4" if m["nf4"] else "ternary" if m["bits"] == "1.58" else "int"
    if kind != "int" and ({"sym", "asym"} & set(opts)):
        raise bad(f"-sym/-asym apply to integer formats, not {kind}")
    bits = 4 if kind == "nf4" else 2 if kind == "ternary" else int(m["bits"])
    return QuantSpec(text.strip(), kind, bits, group, "sym" in opts or kind != "int", bool(m["a8"]), "lsq" in opts)


def group_size_for(spec, K):
    """The group size used on a K-wide weight: the spec's, clamped to K (per output channel: K itself)."""
    g = min(spec.group_size or K, K)
    if K % g:
        raise ValueError(f"in_features {K} is not a multiple of the group size {g} of spec {spec.text!r}")
    return g


# ----------------------------------------------------------------------------- the quantizer

def _fp16(s):
    return s.clamp(SCALE_MIN, 65504.0).half().float()


def _ste(value, x):
    """value in the forward, the gradient of x in the backward (exactly value: x - x.detach() is 0)."""
    return value.detach() + (x - x.detach())


def weight_qparams(w, spec, group_size):
    """(scales, zeros) of an (N, K) weight, each (N, K // group_size) fp32; scales are fp16 values, zeros integers."""
    N, K = w.shape
    wg = w.detach().float().reshape(N, K // group_size, group_size)
    if spec.kind == "int" and not spec.symmetric:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)  # the grid holds 0 exactly
        s = _fp16((hi - lo) / spec.qmax)
        return s, (-lo / s).round().clamp(0, spec.qmax)
    if spec.kind == "ternary":
        s, z = wg.abs().mean(-1), 1.0
    elif spec.kind == "nf4":
        s, z = wg.abs().amax(-1), 0.0
    else:
        half = 2 ** (spec.bits - 1)  # codes 0..2^b - 1 are the signed levels -half..half - 1
        s, z = wg.abs().amax(-1) / (half - 1), float(half)
    s = _fp16(s)
    return s, torch.full_like(s, z)


def _codes(v, spec, zeros):
    """Nearest grid codes (as floats in 0..qmax) of v = w / s; zeros broadcast to v."""
    if spec.kind == "nf4":
        return torch.bucketize(v.clamp(-1, 1), _NF4_MIDPOINTS.to(v.device)).to(v.dtype)
    return (torch.round(v) + zeros).clamp(0, spec.qmax)


def _dequantize(q, spec, scales, zeros):
    """w from codes; scales and zeros broadcast to q."""
    if spec.kind == "nf4":
        return NF4_LEVELS.to(q.device)[q.long()] * scales
    return (q - zeros) * scales


def quantize_weight(w, spec, group_size, scales=None, zeros=None):
    """(codes (N, K) uint8, scales, zeros) of an (N, K) weight; scales/zeros from weight_qparams unless given."""
    N, K = w.shape
    if scales is None:
        scales, zeros = weight_qparams(w, spec, group_size)
    scales = _fp16(scales.detach().float())  # learned scales are fp32 parameters: fake_quantize rounds them too
    wg = w.detach().float().reshape(N, K // group_size, group_size)
    q = _codes(wg / scales[..., None], spec, None if zeros is None else zeros[..., None])
    return q.reshape(N, K).to(torch.uint8), scales, zeros


def dequantize_weight(q, spec, scales, zeros):
    """(N, K) fp32 weight from uint8 codes and per-group scales/zeros (the group size is K // scales.shape[1])."""
    N, K = q.shape
    G = scales.shape[1]
    w = _dequantize(q.float().reshape(N, G, K // G), spec, scales.float()[..., None],
                    None if zeros is None else zeros.float()[..., None])
    return w.reshape(N, K)


def fake_quantize(w, spec, group_size, scales=None, zeros=None):
    """The quantized weight, shaped like w, differentiable.

    scales=None: scales and zeros from weight_qparams(w), and the gradient passes straight through to w.
    Given scales (learned, LSQ, or frozen by GPTQ): w gets the gradient only inside the grid's range, and scales,
    if they require grad, get LSQ's gradient scaled by 1 / sqrt(group_size * Qp).
    """
    N, K = w.shape
    wg = w.reshape(N, K // group_size, group_size)
    if scales is None:
        s, z = weight_qparams(w, spec, group_size)
        s, z = s[..., None], z[..., None]
        q = _codes(wg.detach().float() / s, spec, z)
        return _ste(_dequantize(q, spec, s, z).reshape(N, K).to(w.dtype), w)
    s = _ste(_fp16(scales.detach()), scales)  # the stored fp16 value, the fp32 parameter's gradient
    if scales.requires_grad:
        g = 1.0 / math.sqrt(group_size * spec.qp)
        s = _ste(s, s * g)  # LSQ's gradient scale: the value of s, the gradient of s * g
    s = s[..., None]
    v = wg.float() / s
    if spec.kind == "nf4":
        u = v.clamp(-1, 1)
        w_hat = _ste(_dequantize(_codes(u.detach(), spec, None), spec, 1.0, None), u) * s
    else:
        z = zeros[..., None]
        q = (_ste(torch.round(v), v) + z).clamp(0, spec.qmax)  # clamp: no gradient to w outside the range
        w_hat = (q - z) * s
    return w_hat.reshape(N, K).to(w.dtype)


class _ActivationFakeQuant(torch.autograd.Function):
    """round(x / s) * s per token with s = absmax / qmax (so |x / s| <= qmax: no clamp needed); gradient straight
    through. A Function rather than the _ste expression: two fewer passes over the activations."""

    @staticmethod
    def forward(ctx, x, qmax):
        absmax = torch.maximum(x.amax(-1, keepdim=True), -x.amin(-1, keepdim=True))  # no |x| temporary: faster
        s = absmax.clamp_(min=1e-8) / qmax
        return torch.round(x / s).mul_(s)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize_activations(x, bits=8):
    """Dynamic per-token symmetric int quantization of x (..., K) to 2^bits levels, straight-through gradient."""
    return _ActivationFakeQuant.apply(x, 2 ** (bits - 1) - 1)


# ----------------------------------------------------------------------------- fake-quant modules

class FakeQuantLinear(nn.Linear):
    """nn.Linear computing with its quantized weight (and int8 activations with a8); trains through the rounding.

    Scales come from the current weights at every step, unless they are learned (-lsq: a parameter, initialised
    from the weights at the first forward with fake-quant on) or frozen by GPTQ (buffers). The LSQ scale is kept
    flat (1-D) so that optimizers that decay only matrices leave it alone.
    """

    def __init__(self, in_features, out_features, bias=True, spec="w4g32", device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.spec = parse_spec(spec)
        self.group_size = group_size_for(self.spec, in_features)
        self.enabled = True
        shape = (out_features, in_features // self.group_size)
        if self.spec.lsq:
            self.weight_scale = nn.Parameter(torch.ones(shape[0] * shape[1], device=device))
            self.register_buffer("weight_zero", torch.zeros(shape, device=device))
            self.register_buffer("lsq_ready", torch.tensor(False, device=device))
        else:  # None: computed from the weights each step; freeze_() fills them
            self.register_buffer("weight_scale", None)
            self.register_buffer("weight_zero", None)

    def qparams(self):
        """(scales, zeros) this layer quantizes with, or (None, None) when they follow the weights."""
        if self.spec.lsq and not self.lsq_ready:
            with torch.no_grad():
                s, z = weight_qparams(self.weight, self.spec, self.group_size)
                self.weight_scale.copy_(s.flatten())
                self.weight_zero.copy_(z)
                self.lsq_ready.fill_(True)
        if self.weight_scale is None:
            return None, None
        return self.weight_scale.view(self.out_features, -1), self.weight_zero

    def quantized_weight(self):
        return fake_quantize(self.weight, self.spec, self.group_size, *self.qparams())

    def forward(self, x):
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        if self.spec.act8:
            x = fake_quantize_activations(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    @torch.no_grad()
    def freeze_(self, q, scales, zeros):
        """Fix the codes (GPTQ's): the weight becomes their dequantized value and the scales/zeros buffers."""
        self.weight.copy_(dequantize_weight(q, self.spec, scales, zeros).to(self.weight.dtype))
        self.register_buffer("weight_scale", scales.float().flatten().clone())
        self.register_buffer("weight_zero", zeros.float().clone())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint frozen by GPTQ carries scale/zero buffers this freshly built layer does not have yet
        if not self.spec.lsq and prefix + "weight_scale" in state_dict and self.weight_scale is None:
            self.register_buffer("weight_scale", torch.empty_like(state_dict[prefix + "weight_scale"]))
            self.register_buffer("weight_zero", torch.empty_like(state_dict[prefix + "weight_zero"]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return f"{super().extra_repr()}, spec={self.spec.text}, group_size={self.group_size}"


def _swap(model, fn):
    """Replace every submodule m (by name) with fn(name, m) where that is not None; returns the names replaced."""
    done = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            new = fn(name, child)
            if new is not None:
                setattr(parent, child_name, new)
                done.append(name)
    return done


def quantize_(model, spec, skip=("lm_head",), enabled=True):
    """In place: every nn.Linear (but those named in skip) -> FakeQuantLinear sharing its parameters.
    enabled=False leaves fake-quant off until enable_fake_quant_(model, True), e.g. to start QAT after N steps.
    Returns the model."""
    spec = parse_spec(spec)

    def swap(name, m):
        if name in skip or type(m) is not nn.Linear:
            return None
        new = FakeQuantLinear(m.in_features, m.out_features, m.bias is not None, spec, device=m.weight.device)
        new.weight, new.bias = m.weight, m.bias  # the same Parameters: ties and references survive
        new.enabled = enabled
        return new
    try:
        _swap(model, swap)
    except ValueError as e:
        raise ValueError(f"quantize_ with {spec.text!r}: {e}") from None
    return model


def enable_fake_quant_(model, enabled=True):
    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            m.enabled = enabled


# ----------------------------------------------------------------------------- post-training quantization

class _Captured(Exception):
    """Raised by the calibration hook once it has a layer's input: the rest of the forward is not needed."""


@torch.no_grad()
def layer_hessian(model, layer, calib):
    """H = sum over calibration tokens of x x^T for the input x of `layer` (fp64, K x K), running the model on
    each batch of calib (a tuple of positional or a dict of keyword arguments) only as far as the layer."""
    K = layer.in_features
    H = torch.zeros(K, K, dtype=torch.float64, device=layer.weight.device)

    def hook(mod, args):
        x = args[0]
        if mod.spec.act8:
            x = fake_quantize_activations(x)
        x = x.reshape(-1, K).double()
        H.addmm_(x.T, x)
        raise _Captured

    handle = layer.register_forward_pre_hook(hook)
    try:
        for batch in calib:
            try:
                model(**batch) if isinstance(batch, dict) else model(*batch)
            except _Captured:
                pass
    finally:
        handle.remove()
    return H


@torch.no_grad()
def gptq_quantize(w, H, spec, group_size, damp=0.01, block=128):
    """GPTQ (Frantar et al., 2022) for one (N, K) weight and its input Hessian H (K x K): quantize column by column,
    spreading each column's error over the columns not yet quantized through the upper Cholesky factor of H^-1;
    updates are applied lazily per block of columns. Group scales come from the updated weights as each group
    starts. Returns (codes uint8 (N, K), scales, zeros) as quantize_weight does."""
    W = w.detach().double().clone()
    N, K = W.shape
    H = H.double().clone()
    dead = H.diagonal() == 0  # inputs that are always 0: their weights do nothing
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    G = K // group_size
    Q = torch.zeros(N, K, dtype=torch.uint8, device=w.device)
    scales, zeros = torch.zeros(N, G, device=w.device), torch.zeros(N, G, device=w.device)
    block = group_size * max(1, block // group_size)  # a group never straddles two blocks
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err = torch.zeros(N, i2 - i1, dtype=torch.float64, device=w.device)
        for i in range(i2 - i1):
            c = i1 + i
            if c % group_size == 0:
                s, z = weight_qparams(W1[:, i:i + group_size], spec, group_size)
                scales[:, c // group_size], zeros[:, c // group_size] = s[:, 0], z[:, 0]
            s, z = scales[:, c // group_size], zeros[:, c // group_size]
            q = _codes(W1[:, i].float() / s, spec, z)
            Q[:, c] = q.to(torch.uint8)
            e = (W1[:, i] - _dequantize(q, spec, s, z).double()) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return Q, scales, zeros


def fake_quant_linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]


def apply_ptq_(model, method, spec, calib=(), skip=("lm_head",), damp=0.01):
    """In place: post-training quantization of a trained model. method "rtn" rounds each weight to the nearest grid
    point (quantize_ alone); "gptq" quantizes the linear layers in forward order, each with the Hessian of its
    inputs on the calibration batches as the earlier layers already quantized produce them, and freezes the codes.
    Returns the model (FakeQuantLinear modules; convert_ packs them)."""
    spec = parse_spec(spec)
    if method not in ("rtn", "gptq"):
        raise ValueError(f"PTQ method must be 'rtn' or 'gptq', not {method!r}")
    if spec.lsq:
        raise ValueError(f"spec {spec.text!r} learns scales (-lsq), which needs training: PTQ takes it without -lsq")
    quantize_(model, spec, skip=skip)
    if method == "rtn":
        return model
    calib = list(calib)
    if not calib:
        raise ValueError("GPTQ needs calibration batches")
    was_training = model.training
    model.eval()
    for _, layer in fake_quant_linears(model):
        H = layer_hessian(model, layer, calib)
        layer.freeze_(*gptq_quantize(layer.weight, H, layer.spec, layer.group_size, damp))
    model.train(was_training)
    return model


# ----------------------------------------------------------------------------- real low-bit modules

def _kernel_group(K, g):
    """A group size the int4 kernel takes that divides g (the scales are repeated to it), or ValueError."""
    for kg in reversed(kernels.GROUP_SIZES):
        if g % kg == 0:
            return kg
    raise ValueError(f"the int4 kernel needs groups of {kernels.GROUP_SIZES} along K, and group {g} (K={K}) "
                     f"is a multiple of none: give the spec a group size, or skip this layer")


DQ_BLOCK = 256  # scales per fp32 absmax in double quantization


def double_quantize(scales):
    """int8 codes of (scales - mean) per block of DQ_BLOCK scales, their fp32 absmax and the fp32 mean."""
    flat = scales.float().flatten()
    mean = flat.mean()
    pad = (-flat.numel()) % DQ_BLOCK
    dev = F.pad(flat - mean, (0, pad)).view(-1, DQ_BLOCK)
    absmax = dev.abs().amax(1).clamp(min=1e-12)
    codes = torch.round(dev / absmax[:, None] * 127).to(torch.int8).flatten()[:flat.numel()]
    return codes, absmax, mean.reshape(1)


def double_dequantize(codes, absmax, mean, shape):
    n = codes.numel()
    pad = (-n) % DQ_BLOCK
    dev = F.pad(codes.float(), (0, pad)).view(-1, DQ_BLOCK) * (absmax[:, None] / 127)
    return (dev.flatten()[:n] + mean).view(shape)


class Int4Linear(nn.Module):
    """A frozen linear layer of 4-bit codes packed 8 per int32 word (kernels.pack_int4), a scale per group of K
    (fp16, or with double_quant int8 codes of the scales' deviation from their mean, one fp32 absmax per
    DQ_BLOCK scales: QLoRA's trick at 8 bits) and, for affine codes, a uint8 zero per group, all buffers. 2-, 3-bit
    and ternary codes use the same nibbles; NF4 codes carry no zeros: the kernels look their 16 levels up in
    NF4_LEVELS. Forward and input gradient go through kernels.int4_matmul: the Triton kernels on CUDA, elsewhere
    the chunked torch path that dequantizes a block of rows at a time (no dense W is kept). It serves models
    converted by convert_ and the frozen 4-bit bases of lora.py's adapters."""

    stores_codes = True  # GPT.get_num_params counts its weight at in x out

    def __init__(self, in_features, out_features, bias, spec, group_size, device=None, double_quant=False):
        super().__init__()
        if in_features % group_size or in_features % 8:
            raise ValueError(f"in_features {in_features} must be a multiple of 8 and of the group size {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.group_size, self.double_quant = parse_spec(spec), group_size, double_quant
        N, G = out_features, in_features // group_size
        self.register_buffer("packed", torch.zeros(N, in_features // 8, dtype=torch.int32, device=device))
        if double_quant:
            self.register_buffer("scale_codes", torch.zeros(N * G, dtype=torch.int8, device=device))
            self.register_buffer("scale_absmax", torch.ones(-(-N * G // DQ_BLOCK), device=device))
            self.register_buffer("scale_mean", torch.zeros(1, device=device))
        else:
            self.register_buffer("scales", torch.ones(N, G, dtype=torch.float16, device=device))
        nf4 = self.spec.kind == "nf4"
        self.register_buffer("zeros", None if nf4 else torch.zeros(N, G, dtype=torch.uint8, device=device))
        # NF4's 16 levels, moved with the module (not copied to the device at every call), not saved
        self.register_buffer("lut", NF4_LEVELS.to(device) if nf4 else None, persistent=False)
        self.bias = nn.Parameter(torch.zeros(N, device=device)) if bias else None

    @torch.no_grad()
    def load_quantized_(self, tensors):
        """Copy in buffers by name (packed, scales or scale_codes/scale_absmax/scale_mean, zeros)."""
        for k, v in tensors.items():
            getattr(self, k).copy_(v)
        return self

    def group_scales(self):
        """(N, K // g) scales: the fp16 buffer, or dequantized from the double quantization (1/g of W's size)."""
        if not self.double_quant:
            return self.scales
        return double_dequantize(self.scale_codes, self.scale_absmax, self.scale_mean,
                                 (self.out_features, self.in_features // self.group_size))

    def dequantized_weight(self, dtype=torch.float32):
        return kernels.dequantize_int4(self.packed, self.group_scales(), self.zeros, self.group_size, dtype, self.lut)

    def forward(self, x):
        if self.spec.act8:
            x = fake_quantize_activations(x)
        if torch.is_autocast_enabled(x.device.type):  # what autocast does to F.linear's input
            x = x.to(torch.get_autocast_dtype(x.device.type))
        backend = "triton" if x.is_cuda else "chunked"
        y = kernels.int4_matmul(x, self.packed, self.group_scales(), self.zeros, self.group_size, backend, self.lut)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        dq = ", double_quant=True" if self.double_quant else ""
        return f"{self.in_features}, {self.out_features}, spec={self.spec.text}, group_size={self.group_size}{dq}"


class Int8Linear(nn.Module):
    """A frozen linear layer for 5 to 8 bits: one uint8 code per weight, fp16 scales and uint8 zeros per group;
    forward dequantizes in torch and multiplies."""

    stores_codes = True  # GPT.get_num_params counts its weight at in x out

    def __init__(self, in_features, out_features, bias, spec, group_size, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.group_size = parse_spec(spec), group_size
        G = in_features // group_size
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, G, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, G, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def dequantized_weight(self, dtype=torch.float32):
        return dequantize_weight(self.codes, self.spec, self.scales, self.zeros).to(dtype)

    def forward(self, x):
        if self.spec.act8:
            x = fake_quantize_activations(x)
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, spec={self.spec.text}, group_size={self.group_size}"


@torch.no_grad()
def convert_linear(m):
    """The Int4Linear / Int8Linear computing what FakeQuantLinear m computes (the same codes, scales and zeros)."""
    q, s, z = quantize_weight(m.weight, m.spec, m.group_size, *m.qparams())
    N, K = q.shape
    cls = Int4Linear if m.spec.qmax <= 15 else Int8Linear
    g = m.group_size
    if cls is Int4Linear:
        if K % 8:
            raise ValueError(f"int4 packing needs in_features to be a multiple of 8, got {K}")
        kg = _kernel_group(K, g)
        s, z = s.repeat_interleave(g // kg, 1), z.repeat_interleave(g // kg, 1)  # the same values, finer groups
        g = kg
    new = cls(K, N, m.bias is not None, m.spec, g, device=m.weight.device)
    if cls is Int4Linear:
        new.packed.copy_(kernels.pack_int4(q))
    else:
        new.codes.copy_(q)
    new.scales.copy_(s.half())
    if new.zeros is not None:
        new.zeros.copy_(z.to(torch.uint8))
    if m.bias is not None:
        new.bias.copy_(m.bias)
    return new


def convert_(model):
    """In place: every FakeQuantLinear -> Int4Linear (4 bits and below) or Int8Linear (5 to 8 bits).
    Returns the model."""
    def swap(name, m):
        if isinstance(m, FakeQuantLinear):
            try:
                return convert_linear(m)
            except ValueError as e:
                raise ValueError(f"convert_ {name}: {e}") from None
        return None
    _swap(model, swap)
    return model


# ----------------------------------------------------------------------------- checkpoints and accounting

def describe(model):
    """What a checkpoint needs to rebuild the model's quantized modules: dict(spec, fake_quant=[names],
    converted=[names]), or None for a float model."""
    kinds = dict(fake_quant=FakeQuantLinear, converted=(Int4Linear, Int8Linear))
    own = _outside_adapters(model)
    found = {k: [n for n, m in own if isinstance(m, c)] for k, c in kinds.items()}
    specs = {m.spec.text for _, m in own if isinstance(getattr(m, "spec", None), QuantSpec)}
    if not specs:
        return None
    if len(specs) > 1:
        raise ValueError(f"the model mixes quantization specs {sorted(specs)}; describe() records one")
    return dict(spec=specs.pop(), **found)


def _outside_adapters(model):
    """(name, module) pairs but the frozen bases of LoRA adapters (the modules holding lora_A): lora.describe
    records those, with the adapters."""
    bases = {f"{n}.base" for n, m in model.named_modules() if hasattr(m, "lora_A")}
    return [(n, m) for n, m in model.named_modules() if n not in bases]


def restore_(model, desc):
    """In place: give a freshly built float model the quantized modules describe() recorded, so that the saved
    state_dict loads into it (Int4Linear buffers, LSQ scales, GPTQ's frozen scales). desc None: nothing to do."""
    if not desc:
        return model
    layers = set(desc["fake_quant"]) | set(desc["converted"])
    every = {n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)}
    if desc.get("embeddings"):  # (an early version could fake-quantize embeddings; none of its checkpoints did)
        raise ValueError("the checkpoint holds fake-quant embeddings, which this version no longer builds")
    quantize_(model, desc["spec"], skip=tuple(every - layers))
    converted = set(desc["converted"])
    _swap(model, lambda n, m: convert_linear(m) if n in converted and isinstance(m, FakeQuantLinear) else None)
    return model


def is_quantized(model):
    return describe(model) is not None


def bits_per_weight(model):
    """Storage bits per weight of the 4- to 8-bit linear layers (converted ones and LoRA's frozen bases): codes,
    scales and zeros (biases excluded)."""
    bits = weights = 0
    for m in model.modules():
        if isinstance(m, (Int4Linear, Int8Linear)):
            bits += 8 * sum(b.numel() * b.element_size() for name, b in m.named_buffers() if name != "lut")
            weights += m.in_features * m.out_features
    return bits / weights if weights else None
