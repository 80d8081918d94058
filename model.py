"""model.py: a GPT in the nanoGPT mould, with batched KV-cached generation.

What it holds, top to bottom: rotary helpers -> attention -> MLP -> block -> GPTConfig -> GPT (forward, generate,
from_pretrained, estimate_mfu).

Ideas it rests on:
- GPT-2's architecture (learned positions, pre-norm blocks, GELU MLP, tied embeddings), so a local Hugging Face
  GPT-2 checkpoint loads as is. One addition: rotary position embeddings on the first `rope_heads` heads. Small
  models learn digit-position tasks much faster with a few rotary heads beside the learned positions.
- generate() left-pads a ragged batch of prompts, gives each row its own positions and a key mask, prefills once,
  then decodes one token per step against a preallocated KV cache; rows stop at eos independently.
- Nothing here imports the rest of the project: quantization swaps the nn.Linear modules from the outside.
"""
import json
import math
import os
import struct
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------- rotary embeddings

def rope_tables(n_head, rope_heads, head_dim, max_len, base=10000.0):
    """cos/sin tables (max_len, n_head, head_dim); heads from rope_heads on get cos=1, sin=0 (no rotation), so
    one elementwise pass handles the rotary and the plain heads alike. The first half of sin is negated: the
    rotation's minus sign lives in the table, not in a pass over the activations."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv).repeat(1, 2)  # (T, hd): halves share angles
    ang = ang[:, None, :] * (torch.arange(n_head) < rope_heads).float()[None, :, None]
    sign = torch.ones(head_dim)
    sign[:head_dim // 2] = -1.0
    return torch.cos(ang), torch.sin(ang) * sign


def apply_rope(x, cos, sin):
    """Rotate the pairs (x[i], x[i + hd/2]): x * cos + (x2, x1) * sin, with sin from rope_tables (sign folded
    in); x (B, H, T, hd), cos/sin broadcastable to it."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x.float() * cos, torch.cat([x2, x1], dim=-1).float(), sin).type_as(x)


# ----------------------------------------------------------------------------- layers

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, rope=None, cache=None, mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:  # rotary positions (identity on the heads past rope_heads)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        causal = mask is None and (cache is None or cache.len == 0)  # a decode step attends to all it has
        if cache is not None:  # write this step's keys/values, attend to everything cached so far
            k, v = cache.append(self, k, v)
        dtype, fp32_attention = q.dtype, q.device.type == "cpu" and q.dtype == torch.bfloat16
        if fp32_attention:  # bf16 autocast on CPU: torch's bf16 attention backward there is ~3x slower than fp32's,
            q, k, v = q.float(), k.float(), v.float()  # and autocast would cast fp32 inputs back down
        with torch.autocast("cpu", enabled=False) if fp32_attention else nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.to(dtype).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = "none" if config.gelu == "exact" else "tanh"

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), rope, cache, mask)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Preallocated keys/values for every layer: (B, H, max_len, head_dim) each, filled left to right."""

    def __init__(self, model, batch, max_len, device, dtype):
        c = model.config
        shape = (batch, c.n_head, max_len, c.n_embd // c.n_head)
        self.k = {id(b.attn): torch.zeros(shape, device=device, dtype=dtype) for b in model.transformer.h}
        self.v = {id(b.attn): torch.zeros(shape, device=device, dtype=dtype) for b in model.transformer.h}
        self.len = 0  # positions filled (the same for every layer once a forward pass is done)

    def append(self, attn, k, v):
        key = id(attn)
        end = self.len + k.size(2)
        self.k[key][:, :, self.len:end] = k
        self.v[key][:, :, self.len:end] = v
        return self.k[key][:, :, :end], self.v[key][:, :, :end]


# ----------------------------------------------------------------------------- the model

GELU_KINDS = ("exact", "tanh")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    rope_heads: int = 0        # heads (from the first) that also use rotary positions; 0 = plain GPT-2
    rope_base: float = 10000.0
    gelu: str = "exact"        # exact (erf; about half the CPU time of tanh) or tanh (GPT-2's, for its weights)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not 0 <= config.rope_heads <= config.n_head:
            raise ValueError(f"rope_heads={config.rope_heads} must be between 0 and n_head={config.n_head}")
        if config.gelu not in GELU_KINDS:
            raise ValueError(f"gelu={config.gelu!r} must be {' or '.join(GELU_KINDS)}")
        if config.rope_heads and (config.n_embd // config.n_head) % 2:
            raise ValueError("rotary heads need an even head dimension (n_embd / n_head)")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings
        cos, sin = rope_tables(config.n_head, config.rope_heads, config.n_embd // config.n_head, config.block_size,
                               config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # activation checkpointing: every k-th block keeps only its input and recomputes the rest in backward
        # (0: off). A training option, not part of the architecture, so not in GPTConfig or the checkpoint.
        self.grad_ckpt_every = 0
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameters, with the frozen weight of a quantized layer (quant.Int4Linear, lora.Frozen4bitLinear: they mark
        themselves with stores_codes) counted at its logical size in x out, not as its packed buffers."""
        n = sum(p.numel() for p in self.parameters())
        n += sum(m.in_features * m.out_features for m in self.modules() if getattr(m, "stores_codes", False))
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, pos=None, cache=None, mask=None, last_only=None, loss_fn=None):
        """idx (B, T) -> (logits, loss). targets == -1 are ignored. pos (B, T) gives per-row positions
        (generation); cache/mask are generate()'s. Without targets only the last position's logits are computed
        unless last_only=False. loss_fn(hidden, lm_head_weight, targets) -> loss, when given with targets,
        replaces the full-logits loss and logits come back as None (train.py's --chunked_loss passes
        kernels.linear_cross_entropy); it runs inside forward so DDP and FSDP see the weight used there."""
        B, T = idx.size()
        rope = None
        if pos is None:  # training: every row at positions 0..T-1
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
            pos_emb = self.transformer.wpe.weight[:T]
            if self.config.rope_heads:
                rope = (self.rope_cos[:T].transpose(0, 1), self.rope_sin[:T].transpose(0, 1))  # (H, T, hd)
        else:  # generation: per-row positions (left padding)
            pos_emb = self.transformer.wpe(pos)
            if self.config.rope_heads:
                rope = (self.rope_cos[pos].transpose(1, 2), self.rope_sin[pos].transpose(1, 2))  # (B, H, T, hd)
        x = self.transformer.drop(self.transformer.wte(idx) + pos_emb)
        every = self.grad_ckpt_every if self.training and cache is None and torch.is_grad_enabled() else 0
        for i, block in enumerate(self.transformer.h):
            if every and i % every == 0:  # non-reentrant: exact gradients, dropout masks replayed from saved RNG
                x = checkpoint(block, x, rope, None, mask, use_reentrant=False)
            else:
                x = block(x, rope, cache, mask)
        x = self.transformer.ln_f(x)
        if targets is not None and loss_fn is not None:
            return None, loss_fn(x, self.lm_head.weight, targets)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        if last_only is False:
            return self.lm_head(x), None
        return self.lm_head(x[:, [-1], :]), None

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_id=None, use_cache=True,
                 generator=None, num_samples=1):
        """Sample continuations for a batch of prompts.

        idx: a (B, T) tensor, or a list of 1-D token sequences of different lengths (left-padded here).
        temperature=0 is greedy. Rows stop independently at eos_id. Returns (tokens, lengths): tokens (B, n)
        with n <= max_new_tokens, positions after a row's end filled with eos_id (or 0); lengths (B,) counts each
        row's new tokens including its eos. use_cache=False recomputes the whole prefix every step (the
        baseline that bench.py and the tests compare against).
        num_samples=G: G continuations per prompt (rows b*G .. b*G+G-1 belong to prompt b); each prompt is
        prefilled once and its cache copied to its G rows (the rollouts of GRPO-style RL).
        Once half the rows have ended, they leave the batch (and the cache): the rest decode at the smaller size.
        """
        device = self.transformer.wte.weight.device
        if isinstance(idx, torch.Tensor) and idx.dim() == 2:
            rows = list(idx)
        else:
            rows = [torch.as_tensor(r, dtype=torch.long) for r in idx]
        if not rows or min(len(r) for r in rows) == 0:
            raise ValueError("generate() needs at least one prompt, each with at least one token")
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, not {num_samples}")
        if not use_cache and num_samples > 1:  # the baseline has no prefill to share: repeat the prompts
            rows, num_samples = [r for r in rows for _ in range(num_samples)], 1
        B, T0 = len(rows), max(len(r) for r in rows)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if T0 + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt length {T0} + max_new_tokens {max_new_tokens} exceeds block_size "
                             f"{self.config.block_size}; ask for fewer new tokens")
        lens = torch.tensor([len(r) for r in rows], device=device)
        pad = T0 - lens                                              # left padding per row
        seq = torch.zeros(B, T0 + max_new_tokens, dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            seq[b, pad[b]:T0] = r.to(device)
        steps = torch.arange(T0 + max_new_tokens, device=device)
        positions = (steps[None, :] - pad[:, None]).clamp(min=0)      # (B, T_total)
        key_ok = steps[None, :] >= pad[:, None]                      # pad keys are never attended to
        causal = steps[:, None] >= steps[None, :]

        ragged = bool((pad > 0).any())

        def attn_mask(q0, q1):  # (B, 1, q, k) boolean, None when no row is padded (plain causal attention)
            if not ragged:
                return None
            if q1 - q0 == 1:  # a decode step: every cached key but the padding
                return key_ok[:, None, None, :q1]
            m = causal[q0:q1, :q1][None] & key_ok[:, None, :q1]
            # a pad query may see itself, so that no row of the mask is empty (its output is never used)
            return (m | torch.eye(q1, dtype=torch.bool, device=device)[q0:q1][None])[:, None]

        was_training = self.training
        self.eval()
        dtype = next(self.parameters()).dtype
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        cache = KVCache(self, B, T0 + max_new_tokens, device, dtype) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out_len = torch.full((B,), max_new_tokens, device=device)
        fill = eos_id if eos_id is not None else 0
        active = full_seq = full_len = None  # set once rows that ended are dropped from the batch
        t, n = T0, 0
        for n in range(max_new_tokens):
            if cache is None:  # the baseline: the whole prefix again, every step
                logits, _ = self(seq[:, :t], pos=positions[:, :t], mask=attn_mask(0, t))
            elif n == 0:
                logits, _ = self(seq[:, :t], pos=positions[:, :t], cache=cache, mask=attn_mask(0, t))
            else:
                logits, _ = self(seq[:, t - 1:t], pos=positions[:, t - 1:t], cache=cache,
                                 mask=attn_mask(t - 1, t))
            if cache is not None:
                cache.len = t
            if n == 0 and num_samples > 1:  # one prefill per prompt, then G rows per prompt
                G = num_samples
                logits, seq, positions, key_ok, done, out_len = (
                    a.repeat_interleave(G, 0) for a in (logits, seq, positions, key_ok, done, out_len))
                for key in cache.k:
                    cache.k[key] = cache.k[key].repeat_interleave(G, 0)
                    cache.v[key] = cache.v[key].repeat_interleave(G, 0)
            nxt = sample_next(logits[:, -1, :], temperature, top_k, generator)
            nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
            seq[:, t] = nxt
            t += 1
            if eos_id is not None:
                hit = (nxt == eos_id) & ~done
                out_len[hit] = n + 1
                done |= hit
                ended = int(done.sum())  # one host sync a step, for both checks
                if ended == len(done):
                    break
                if 2 * ended >= len(done) >= 8:  # half the rows have ended: stop computing them
                    if active is None:
                        active, full_seq, full_len = torch.arange(len(done), device=device), seq, out_len
                    fin, keep = done.nonzero().squeeze(1), (~done).nonzero().squeeze(1)
                    full_seq[active[fin]] = seq[fin]
                    full_seq[active[fin], t:] = fill
                    full_len[active[fin]] = out_len[fin]
                    active, seq, positions, key_ok, done, out_len = (
                        a[keep] for a in (active, seq, positions, key_ok, done, out_len))
                    if cache is not None:
                        for key in cache.k:
                            cache.k[key], cache.v[key] = cache.k[key][keep], cache.v[key][keep]
        self.train(was_training)
        if active is not None:  # put the rows still running back among those that ended early
            full_seq[active], full_len[active] = seq, out_len
            seq, out_len = full_seq, full_len
        return seq[:, T0:t], out_len

    # ------------------------------------------------------------------------- loading and accounting

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a local Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin).
        Nothing is downloaded. overrides (e.g. dropout=0.1) change the config before the weights load."""
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path} is not a Hugging Face GPT-2 directory (no config.json)")
        with open(cfg_path) as f:
            hf = json.load(f)
        config = GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=hf["vocab_size"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True,
                           gelu="tanh")  # GPT-2 was trained with the tanh approximation
        for k, v in overrides.items():
            setattr(config, k, v)
        st, binf = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
        if os.path.isfile(st):
            sd = read_safetensors(st)
        elif os.path.isfile(binf):
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
        model = cls(config)
        ours = model.state_dict()
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        loaded = set()
        for name, w in sd.items():
            name = name.removeprefix("transformer.")
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # HF's causal-mask buffers
            if name == "lm_head.weight":
                name = "transformer.wte.weight" if "wte.weight" not in sd else None
                if name is None:
                    continue  # tied: the same tensor as wte
            else:
                name = "transformer." + name
            if name not in ours:
                raise ValueError(f"unexpected tensor {name!r} in {path}: not a GPT-2 checkpoint?")
            if name.endswith(conv1d):
                w = w.t()  # HF's Conv1D stores (in, out)
            if w.shape != ours[name].shape:
                raise ValueError(f"{name}: shape {tuple(w.shape)} in {path}, model expects {tuple(ours[name].shape)}")
            with torch.no_grad():
                ours[name].copy_(w)
            loaded.add(name)
        missing = [k for k in ours if k not in loaded and k != "lm_head.weight"]
        if missing:
            raise ValueError(f"{path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
        return model

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N for the matmuls plus attention's 12 * L * H * hd * T (PaLM appendix B)."""
        c = self.config
        return 6 * self.get_num_params() + 12 * c.n_layer * c.n_embd * seq_len

    def estimate_mfu(self, tokens_per_s, seq_len, device):
        """Model FLOPs utilisation against the device's dense bf16 peak, or None when the peak is unknown."""
        peak = peak_flops(device)
        return None if peak is None else self.flops_per_token(seq_len) * tokens_per_s / peak


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """One token per row from (B, V) logits; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched in order by substring of the device
# name (more specific names first). SXM figures: a PCIe card's lower clocks make its MFU read low.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12,
              "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 125e12, "RTX 4090": 165e12,
              "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device):
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file as a dict of tensors: 8-byte header length, JSON header, raw little-endian data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        lo, hi = meta["data_offsets"]
        t = torch.frombuffer(bytearray(data[lo:hi]), dtype=_ST_DTYPES[meta["dtype"]]) if hi > lo else \
            torch.empty(0, dtype=_ST_DTYPES[meta["dtype"]])
        out[name] = t.reshape(meta["shape"])
    return out


def config_from_dict(d):
    """A GPTConfig from a saved dict, ignoring keys this version does not know. Checkpoints from before the gelu
    field were trained with the tanh approximation."""
    names = {f.name for f in fields(GPTConfig)}
    return GPTConfig(**{"gelu": "tanh", **{k: v for k, v in d.items() if k in names}})
