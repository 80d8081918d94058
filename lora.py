"""lora.py: LoRA and QLoRA fine-tuning: a frozen base (float, or 4-bit) plus trainable low-rank adapters.

    add_lora_(model, rank=8, alpha=16, base="nf4g64")   nn.Linear -> LoRALinear in place; only A and B train
    add_lora_(model, 8, 16, base="nf4g64", loftq_iters=5) LoftQ: quantize(W - sBA) and SVD(W - Q), alternating
    merge_lora_(model)                                   LoRALinear -> nn.Linear with W + s B A (float)

Ideas it rests on:
- LoRALinear(x) = base(x) + s * B (A dropout(x)), s = alpha / rank, A (r, K) random, B (N, r) zero, so training
  starts from the base's function; only A and B require grad.
- A 4-bit base (quant.Int4Linear) keeps only codes packed 8 per int32 word (kernels.pack_int4), a scale per group
  of K (fp16, or double-quantized: int8 codes of the scales' deviation from their mean, one fp32 absmax per 256
  scales, QLoRA's trick at 8 bits) and, for affine int4, a zero point per group. NF4 codes index QLoRA's 16
  normal-quantile levels (quant.NF4_LEVELS). Its forward and input gradient go through kernels.int4_matmul:
  the Triton kernels on CUDA (with the 16-level table for NF4), and on CPU the chunked torch path that
  dequantizes a block of rows at a time, in the forward and again in the backward: no dense weight is kept.
- LoftQ (Li et al., 2023): start from A = B = 0, then alternate Q = quantize(W - s B A) and s B A = the best
  rank-r approximation of W - Q (an SVD), keeping the iterate with the lowest ||W - Q - s B A||, so fine-tuning
  starts closer to the float model than quantize(W) with B = 0 does.
- Checkpoints: describe(model) records the adapters (names, rank, alpha, base format); restore_(model, desc)
  rebuilds them empty on a fresh model so the saved state_dict (frozen codes included) loads into it.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import quant

DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")  # every linear layer of the blocks (lm_head is tied to wte)
BASE_GRAMMAR = ("float, or int4gG / nf4gG with G in 32, 64, 128, 256, optionally -dq (e.g. int4g64, nf4g64-dq); "
                "int3gG / int2gG keep 3- or 2-bit codes in the same 4-bit words (a lower-bit base's quality, "
                "not its memory)")
LOFTQ_SPLITS = ("lora", "sqrt")  # how loftq_init shares the rank-r product between A and B
A_ROW_NORM = 1 / math.sqrt(3)  # expected row norm of A under nn.Linear's kaiming_uniform_(a=sqrt(5)) init
_BASE_RE = re.compile(r"(?P<kind>int[234]|nf4)g(?P<group>\d+)(?P<dq>-dq)?")


def parse_base(fmt):
    """(kind, group size, double quantization) of a base format; kind "float" has neither. ValueError otherwise."""
    if fmt == "float":
        return "float", None, False
    m = _BASE_RE.fullmatch(fmt) if isinstance(fmt, str) else None
    if m is None or int(m["group"]) not in kernels.GROUP_SIZES:
        raise ValueError(f"LoRA base {fmt!r} is not known: use {BASE_GRAMMAR}")
    return m["kind"], int(m["group"]), bool(m["dq"])


# ----------------------------------------------------------------------------- the 4-bit base

def _spec(kind, group):
    return quant.parse_spec(f"w{kind[3]}g{group}" if kind != "nf4" else f"nf4g{group}")


def quantize_base(w, fmt):
    """The buffers of a frozen base (quant.Int4Linear) holding w (N, K) in format fmt: packed, scales (or scale_codes,
    scale_absmax, scale_mean with -dq) and zeros (int4 only)."""
    kind, g, dq = parse_base(fmt)
    spec = _spec(kind, g)
    q, s, z = quant.quantize_weight(w.detach().float(), spec, g)
    out = dict(packed=kernels.pack_int4(q))
    if dq:
        out["scale_codes"], out["scale_absmax"], out["scale_mean"] = quant.double_quantize(s)
    else:
        out["scales"] = s.half()
    if kind != "nf4":  # affine integers: a zero point per group
        out["zeros"] = z.to(torch.uint8)
    return out


def frozen_base(in_features, out_features, bias, fmt, device=None):
    """An empty quant.Int4Linear for base format fmt (int4gG, nf4gG, nf4gG-dq, int3gG, int2gG), bias frozen."""
    kind, g, dq = parse_base(fmt)
    if kind == "float":
        raise ValueError("a frozen 4-bit base holds a 4-bit format, not float")
    if in_features % g:
        raise ValueError(f"in_features {in_features} is not a multiple of the group size {g} of {fmt}")
    base = quant.Int4Linear(in_features, out_features, bias, _spec(kind, g), g, device=device, double_quant=dq)
    if base.bias is not None:
        base.bias.requires_grad_(False)
    return base


def base_format(layer):
    """The base format a frozen layer holds: float, or e.g. nf4g64-dq for a quant.Int4Linear."""
    if not isinstance(layer, quant.Int4Linear):
        return "float"
    spec = layer.spec
    kind = "nf4" if spec.kind == "nf4" else f"int{spec.bits}"
    return f"{kind}g{layer.group_size}" + ("-dq" if layer.double_quant else "")


def dequantize_base(tensors, fmt, shape):
    """W (N, K) fp32 from quantize_base's buffers."""
    m = frozen_base(shape[1], shape[0], False, fmt, device=tensors["packed"].device)
    return m.load_quantized_(tensors).dequantized_weight()


# ----------------------------------------------------------------------------- adapters

class LoRALinear(nn.Module):
    """base(x) + (alpha / rank) * B A dropout(x); base frozen (nn.Linear or quant.Int4Linear), A and B train."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dev = base.packed.device if isinstance(base, quant.Int4Linear) else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init for a (rank x K) layer
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def fmt(self):
        return base_format(self.base)

    def base_weight(self, dtype=torch.float32):
        if isinstance(self.base, quant.Int4Linear):
            return self.base.dequantized_weight(dtype)
        return self.base.weight.detach().to(dtype)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}"


@torch.no_grad()
def loftq_init(w, rank, fmt, iters=5, scaling=1.0, split="lora"):
    """LoftQ for one (N, K) weight: (quantize_base buffers, A (r, K), B (N, r), errors), where errors[t] is
    ||W - Q_t - s B_t A_t||_F / ||W||_F after iteration t (t = 0 is one quantization and one SVD). The iterate
    with the lowest error is returned: the quantizer picks each group's scale from its min and max, not the
    scale nearest W - s B A, so at 2 bits the error can rise again after a few iterations.
    split: how s B A = U_r S_r V_r^T is shared: "lora" (A = V_r^T at the row norm of LoRA's random A, B = U_r S_r
    / (s * that norm): A at the scale LoRA's training starts from, so an update of B moves the product as much as
    in plain LoRA) or "sqrt" (the paper's, sqrt(S_r) each side: both small, so the product starts slower; on the
    subtraction task its val loss was behind "lora" in 3 of 3 seeds, see the README)."""
    W = w.detach().float()
    N, K = W.shape
    if not torch.isfinite(W).all():
        raise ValueError("LoftQ got a weight holding NaN or inf: check the checkpoint this model came from")
    if rank > min(N, K):
        raise ValueError(f"LoftQ's rank-{rank} SVD needs rank <= {min(N, K)}, this layer's smaller dimension "
                         f"({N} x {K}): lower the LoRA rank")
    low = torch.zeros_like(W)  # s B A
    norm, errors, best = W.norm().clamp_min(1e-30), [], None  # (an all-zero W has error 0, not 0 / 0)
    for _ in range(max(1, iters)):
        tensors = quantize_base(W - low, fmt)
        Q = dequantize_base(tensors, fmt, (N, K))
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        if split == "sqrt":  # LoftQ's split: sqrt(S) on each side
            root = S[:rank].sqrt() / math.sqrt(scaling)
            B, A = U[:, :rank] * root, root[:, None] * Vh[:rank]
        else:  # A's rows at the norm of LoRA's random init (1/sqrt(3), nn.Linear's kaiming), B takes the rest
            A = Vh[:rank] * A_ROW_NORM
            B = U[:, :rank] * (S[:rank] / (scaling * A_ROW_NORM))
        low = scaling * (B @ A)
        errors.append(float((W - Q - low).norm() / norm))
        if best is None or errors[-1] <= min(errors):
            best = tensors, A, B
    return (*best, errors)


def _targets(targets):
    return tuple(t.strip() for t in targets.split(",") if t.strip()) if isinstance(targets, str) else tuple(targets)


def add_lora_(model, rank=8, alpha=16.0, targets=DEFAULT_TARGETS, base="float", dropout=0.0, loftq_iters=0,
              loftq_split="lora"):
    """In place: every nn.Linear whose last name is in targets -> LoRALinear over a frozen base of format base
    (float, int4g64, nf4g64, nf4g64-dq, ...); loftq_iters > 0 initialises a 4-bit base and its adapters by LoFTQ
    (loftq_split: see loftq_init). Every other parameter of the model is frozen. Returns the model."""
    kind, _, _ = parse_base(base)
    targets = _targets(targets)
    if loftq_split not in LOFTQ_SPLITS:
        raise ValueError(f"loftq_split={loftq_split!r} must be {' or '.join(LOFTQ_SPLITS)}")
    if loftq_iters and kind == "float":
        raise ValueError("LoftQ initialises a quantized base: give a 4-bit base (e.g. nf4g64), or drop LoftQ")
    if quant.is_quantized(model) or describe(model) is not None:
        raise ValueError("the model already holds quantized or LoRA layers: start from a float model")
    for p in model.parameters():
        p.requires_grad_(False)

    def swap(name, m):
        if type(m) is not nn.Linear or name.split(".")[-1] not in targets:
            return None
        if rank > min(m.in_features, m.out_features):  # a wider adapter adds parameters, not expressiveness
            raise ValueError(f"--lora_rank {rank} exceeds {name}'s smaller dimension "
                             f"{min(m.in_features, m.out_features)}: choose a rank at most that")
        if kind == "float":
            return LoRALinear(m, rank, alpha, dropout)
        frozen = frozen_base(m.in_features, m.out_features, m.bias is not None, base, device=m.weight.device)
        if m.bias is not None:
            frozen.bias.data.copy_(m.bias.detach())
        new = LoRALinear(frozen, rank, alpha, dropout)
        if loftq_iters:
            tensors, A, B, new.loftq_errors = loftq_init(m.weight, rank, base, loftq_iters, new.scaling, loftq_split)
            new.lora_A.data.copy_(A)
            new.lora_B.data.copy_(B)
        else:
            tensors = quantize_base(m.weight, base)
        frozen.load_quantized_(tensors)
        return new
    try:
        done = quant._swap(model, swap)
    except ValueError as e:
        raise ValueError(f"add_lora_ with base {base}: {e}") from None
    if not done:
        raise ValueError(f"no nn.Linear named {', '.join(targets)} in the model: choose other LoRA targets")
    return model


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def merge_lora_(model):
    """In place: every LoRALinear -> nn.Linear holding W_base + (alpha / rank) B A in fp32 (a 4-bit base is
    dequantized), trainable like any float layer. Returns the model."""
    def swap(name, m):
        if not isinstance(m, LoRALinear):
            return None
        w = m.base_weight() + m.scaling * (m.lora_B.float() @ m.lora_A.float())
        bias = m.base.bias
        new = nn.Linear(m.in_features, m.out_features, bias is not None, device=w.device)
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
        return new
    quant._swap(model, swap)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------- checkpoints and reporting

def describe(model):
    """What restore_ needs to rebuild the adapters: dict(rank, alpha, dropout, base, targets=[names]), or None."""
    layers = lora_layers(model)
    if not layers:
        return None
    m = layers[0][1]
    p = m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0
    return dict(rank=m.rank, alpha=m.alpha, dropout=p, base=m.fmt, targets=[n for n, _ in layers])


def restore_(model, desc):
    """In place: give a freshly built float model the (empty) LoRA layers describe() recorded, so that the saved
    state_dict loads into it. desc None: nothing to do. Returns the model."""
    if not desc:
        return model
    names, kind = set(desc["targets"]), parse_base(desc["base"])[0]
    for p in model.parameters():
        p.requires_grad_(False)

    def swap(name, m):
        if name not in names:
            return None
        base = m if kind == "float" else frozen_base(m.in_features, m.out_features, m.bias is not None,
                                                     desc["base"], device=m.weight.device)
        return LoRALinear(base, desc["rank"], desc["alpha"], desc["dropout"])
    quant._swap(model, swap)
    return model


def trainable_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summary(model):
    """One line: adapters, base, trainable parameters, LoftQ's relative error of W (first -> kept iteration)."""
    layers = lora_layers(model)
    d = describe(model)
    line = (f"LoRA rank {d['rank']} alpha {d['alpha']:g} on {len(layers)} layers, base {d['base']}: "
            f"{trainable_parameters(model):,} trainable parameters")
    errs = [m.loftq_errors for _, m in layers if hasattr(m, "loftq_errors")]
    if errs:
        first, best = sum(e[0] for e in errs) / len(errs), sum(min(e) for e in errs) / len(errs)
        line += f" | LoftQ ({len(errs[0])} iterations): mean relative error of W {first:.4f} -> {best:.4f}"
    return line


def apply_flags_(model, cfg):
    """train.py's --lora_rank (adapters on a model that has none yet: a resumed run restored its own) and
    --lora_merge; returns a line to print, or None."""
    if cfg.lora_rank and describe(model) is None:
        add_lora_(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_base, cfg.lora_dropout,
                  cfg.loftq_iters if cfg.loftq else 0, cfg.loftq_split)
    if cfg.lora_merge:
        if describe(model) is None:
            raise ValueError("--lora_merge: the --init_from checkpoint holds no LoRA adapters")
        line = summary(model)
        merge_lora_(model)
        return f"merged into float weights: {line}"
    return summary(model) if describe(model) else None


def check_flags(cfg):
    """A one-line message for an inconsistent set of train.py's LoRA flags, or None."""
    try:
        kind = parse_base(cfg.lora_base)[0]
    except ValueError as e:
        return f"--lora_base: {e}"
    if cfg.lora_rank < 0 or cfg.loftq_iters < 1 or cfg.lora_alpha <= 0 or not 0 <= cfg.lora_dropout < 1:
        return "--lora_rank must be >= 0, --lora_alpha > 0, --loftq_iters >= 1 and --lora_dropout in [0, 1)"
    if (cfg.lora_rank or cfg.lora_merge) and not (cfg.init_from or cfg.resume):
        return "LoRA fine-tunes a trained model: give --init_from CHECKPOINT"
    if cfg.lora_rank and (cfg.qat or cfg.fsdp or cfg.lora_merge):
        return "--lora_rank does not combine with --qat, --fsdp or --lora_merge: drop one (use DDP for LoRA)"
    if cfg.loftq_split not in LOFTQ_SPLITS:
        return f"--loftq_split must be {' or '.join(LOFTQ_SPLITS)}, not {cfg.loftq_split!r}"
    if cfg.loftq and (not cfg.lora_rank or kind == "float"):
        return "--loftq needs --lora_rank R and a quantized --lora_base (e.g. nf4g64, int4g64, int3g64)"
    if not _targets(cfg.lora_targets):
        return "--lora_targets is empty: name linear layers, e.g. c_attn,c_proj,c_fc"
    return None
