"""model.py: a GPT in the nanoGPT mould that also takes the shapes of the Llama and Qwen families, with batched
KV-cached generation and local Hugging Face checkpoints in and out.

What it holds, top to bottom: rotary helpers -> norms, attention, MLPs -> block -> KV cache -> GPTConfig -> GPT
(forward, generate, from_pretrained, save_pretrained, estimate_mfu) -> generation's batch -> Hugging Face configs
and tensor names.

Ideas it rests on:
- One block, shaped by GPTConfig. The defaults are GPT-2 (LayerNorm, GELU MLP, learned positions, tied
  embeddings), so a local GPT-2 checkpoint loads as is; one addition: rotary positions on the first `rope_heads`
  heads (small models learn digit-position tasks much faster with a few beside the learned positions). The
  Llama/Qwen family is the same block with RMSNorm, a SwiGLU MLP, grouped-query attention (n_kv_head), rotary
  positions on every head and no learned table, and Qwen's q/k/v bias (Qwen2) or q/k norms (Qwen3).
- The MLP kind picks the module names: GELU keeps GPT-2's (c_attn, c_proj, c_fc), SwiGLU takes Llama's
  (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), so a Hugging Face tensor name becomes ours by
  renaming alone, and quantization and LoRA target the layers by the names people know.
- generate() left-pads a ragged batch of prompts, gives each row its own positions and a key mask, prefills once,
  then decodes one token per step against a preallocated KV cache (n_kv_head heads); rows stop at eos
  independently, and once half have ended they leave the batch.
- Nothing here imports the rest of the project: quantization swaps the nn.Linear modules from the outside.
"""
import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------- rotary embeddings

LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_frequencies(head_dim, base, scaling=None):
    """The rotation speed of each pair, base^(-2i/hd); with Llama 3's scaling (rope_type llama3) the long
    wavelengths are slowed by `factor`, the short ones kept, and those between blended smoothly."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv
    factor, low, high, old = (scaling[k] for k in LLAMA3_SCALING_KEYS)
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    return torch.where(wavelen < old / high, inv, torch.where(wavelen > old / low, inv / factor, blended))


def rope_tables(n_head, rope_heads, head_dim, max_len, base=10000.0, scaling=None):
    """cos/sin tables (max_len, n_head, head_dim); heads from rope_heads on get cos=1, sin=0 (no rotation), so
    one elementwise pass handles the rotary and the plain heads alike. When all heads (or none) rotate, the head
    axis has size 1 and broadcasts over any number of heads (grouped-query keys included). The first half of
    sin is negated: the rotation's minus sign lives in the table, not in a pass over the activations."""
    inv = rope_frequencies(head_dim, base, scaling)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv).repeat(1, 2)  # (T, hd): halves share angles
    if 0 < rope_heads < n_head:
        ang = ang[:, None, :] * (torch.arange(n_head) < rope_heads).float()[None, :, None]
    else:
        ang = ang[:, None, :] * float(rope_heads > 0)
    sign = torch.ones(head_dim)
    sign[:head_dim // 2] = -1.0
    return torch.cos(ang), torch.sin(ang) * sign


def apply_rope(x, cos, sin):
    """Rotate the pairs (x[i], x[i + hd/2]): x * cos + (x2, x1) * sin, with sin from rope_tables (sign folded
    in); x (B, H, T, hd), cos/sin broadcastable to it."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x.float() * cos, torch.cat([x2, x1], dim=-1).float(), sin).type_as(x)


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm computed in fp32 whatever comes in (as Llama's reference does), returned in the input's dtype:
    under CPU bf16 autocast q and k arrive in bf16 while the weight stays fp32."""

    def forward(self, x):
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


def make_norm(config, dim):
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, H, KV, hd = config.n_embd, config.n_head, config.kv_heads, config.head_size
        qkv_bias = config.bias or config.qkv_bias
        self.fused = config.mlp == "gelu"  # GPT-2's names and its one fused q/k/v projection
        if self.fused:
            self.c_attn = nn.Linear(C, (H + 2 * KV) * hd, bias=qkv_bias)
            self.c_proj = nn.Linear(H * hd, C, bias=config.bias)
        else:  # Llama's names, one projection each
            self.q_proj = nn.Linear(C, H * hd, bias=qkv_bias)
            self.k_proj = nn.Linear(C, KV * hd, bias=qkv_bias)
            self.v_proj = nn.Linear(C, KV * hd, bias=qkv_bias)
            self.o_proj = nn.Linear(H * hd, C, bias=config.bias)
        if config.qk_norm:  # Qwen3: each head of q and k normalised before the rotation
            self.q_norm, self.k_norm = make_norm(config, hd), make_norm(config, hd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_kv_head, self.head_dim = H, KV, hd
        self.qk_norm, self.dropout = config.qk_norm, config.dropout

    def project(self, x):
        """q (B, n_head, T, hd) and k, v (B, n_kv_head, T, hd) from x (B, T, C)."""
        B, T, _ = x.size()
        if self.fused:
            q, k, v = self.c_attn(x).split([self.n_head * self.head_dim] + [self.n_kv_head * self.head_dim] * 2, 2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, rope=None, cache=None, mask=None):
        B, T, _ = x.size()
        q, k, v = self.project(x)
        if rope is not None:  # rotary positions (identity on the heads past rope_heads)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        causal = mask is None and (cache is None or cache.len == 0)  # a decode step attends to all it has
        if cache is not None:  # write this step's keys/values, attend to everything cached so far
            k, v = cache.append(self, k, v)
        y = self.attend(q, k, v, mask, causal)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout((self.c_proj if self.fused else self.o_proj)(y))

    def attend(self, q, k, v, mask, causal):
        dtype, fp32_attention = q.dtype, q.device.type == "cpu" and q.dtype == torch.bfloat16
        if fp32_attention:  # bf16 autocast on CPU: torch's bf16 attention backward there is ~3x slower than fp32's,
            q, k, v = q.float(), k.float(), v.float()  # and autocast would cast fp32 inputs back down
        with torch.autocast("cpu", enabled=False) if fp32_attention else nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               enable_gqa=self.n_kv_head != self.n_head)
        return y.to(dtype)


class MLP(nn.Module):
    """GPT-2's: c_proj(gelu(c_fc(x)))."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = "none" if config.gelu == "exact" else "tanh"

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class SwiGLU(nn.Module):
    """Llama's: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config) if config.mlp == "gelu" else SwiGLU(config)

    def forward(self, x, rope=None, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), rope, cache, mask)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Preallocated keys/values for every layer: (B, n_kv_head, max_len, head_dim) each, filled left to right."""

    def __init__(self, model, batch, max_len, device, dtype):
        c = model.config
        shape = (batch, c.kv_heads, max_len, c.head_size)
        self.k = {id(b.attn): torch.zeros(shape, device=device, dtype=dtype) for b in model.transformer.h}
        self.v = {id(b.attn): torch.zeros(shape, device=device, dtype=dtype) for b in model.transformer.h}
        self.len = 0  # positions filled (the same for every layer once a forward pass is done)

    def append(self, attn, k, v):
        key = id(attn)
        end = self.len + k.size(2)
        self.k[key][:, :, self.len:end] = k
        self.v[key][:, :, self.len:end] = v
        return self.k[key][:, :, :end], self.v[key][:, :, :end]

    def take(self, rows):
        """Keep (or repeat) the batch rows given by the index tensor rows."""
        for key in self.k:
            self.k[key], self.v[key] = self.k[key][rows], self.v[key][rows]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())


# ----------------------------------------------------------------------------- the model

GELU_KINDS = ("exact", "tanh")
NORM_KINDS = ("layernorm", "rmsnorm")
MLP_KINDS = ("gelu", "swiglu")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True          # a bias on every linear layer and LayerNorm
    rope_heads: int = 0        # heads (from the first) that also use rotary positions; 0 = plain GPT-2
    rope_base: float = 10000.0
    gelu: str = "exact"        # exact (erf; about half the CPU time of tanh) or tanh (GPT-2's, for its weights)
    # the Llama / Qwen family (the defaults keep GPT-2's shape)
    norm: str = "layernorm"    # layernorm or rmsnorm
    norm_eps: float = 1e-5     # > 0
    mlp: str = "gelu"          # gelu (GPT-2's c_fc/c_proj, fused c_attn) or swiglu (Llama's names, see above)
    intermediate_size: int = 0  # the MLP's hidden width; 0 = 4 * n_embd
    n_kv_head: int = 0         # key/value heads, dividing n_head (1 = multi-query); 0 = n_head
    head_dim: int = 0          # 0 = n_embd // n_head
    learned_pos: bool = True   # GPT-2's learned position table (Llama: none, rope_heads = n_head instead)
    rope_scaling: dict = None  # None, or Llama 3's {"rope_type": "llama3", *LLAMA3_SCALING_KEYS}
    tie_embeddings: bool = True  # lm_head shares wte's weight
    qkv_bias: bool = False     # a bias on q, k and v even when bias=False (Qwen2)
    qk_norm: bool = False      # a norm over each head of q and k, before the rotation (Qwen3)

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def head_size(self):
        return self.head_dim or self.n_embd // self.n_head

    @property
    def mlp_hidden(self):
        return self.intermediate_size or 4 * self.n_embd


def check_config(c):
    """ValueError, in one line, for a GPTConfig no model can be built from."""
    def need(ok, why):
        if not ok:
            raise ValueError(f"GPTConfig: {why}")
    for f in fields(c):  # the types the fields declare (a config.json or a saved dict may hold anything)
        v, typ = getattr(c, f.name), f.type
        if typ in (int, float, bool, str):
            number = typ in (int, float) and not isinstance(v, bool)
            ok = isinstance(v, (int, float) if typ is float else typ) and (typ is bool or number or typ is str)
            need(ok and (not number or math.isfinite(v)), f"{f.name}={v!r} must be a finite {typ.__name__}")
    need(c.vocab_size > 0 and c.block_size > 0, "vocab_size and block_size must be positive")
    need(0 <= c.dropout < 1, f"dropout={c.dropout} must be in [0, 1)")
    need(c.rope_base > 0, f"rope_base={c.rope_base} must be positive")
    for name, kinds in (("gelu", GELU_KINDS), ("norm", NORM_KINDS), ("mlp", MLP_KINDS)):
        need(getattr(c, name) in kinds, f"{name}={getattr(c, name)!r} must be {' or '.join(kinds)}")
    need(c.n_head > 0 and c.n_embd > 0 and c.n_layer >= 0, "n_head and n_embd must be positive")
    need(c.head_dim > 0 or c.n_embd % c.n_head == 0, f"n_embd={c.n_embd} must be a multiple of "
         f"n_head={c.n_head} (or set head_dim)")
    need(c.head_dim >= 0 and c.intermediate_size >= 0, "head_dim and intermediate_size must be >= 0")
    need(c.n_kv_head >= 0 and c.n_head % c.kv_heads == 0,
         f"n_kv_head={c.n_kv_head} must divide n_head={c.n_head}")
    need(0 <= c.rope_heads <= c.n_head, f"rope_heads={c.rope_heads} must be between 0 and n_head={c.n_head}")
    need(not c.rope_heads or c.head_size % 2 == 0, f"rotary heads need an even head dimension, "
         f"not {c.head_size}")
    need(c.rope_heads in (0, c.n_head) or c.kv_heads == c.n_head,
         "grouped-query attention takes rotary positions on all heads or none")
    need(c.norm_eps > 0, f"norm_eps={c.norm_eps} must be positive")
    s = c.rope_scaling
    need(s is None or (isinstance(s, dict) and s.get("rope_type") == "llama3"
                       and all(k in s for k in LLAMA3_SCALING_KEYS)),
         f"rope_scaling must be None or llama3's {{rope_type, {', '.join(LLAMA3_SCALING_KEYS)}}}, not {s!r}")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        check_config(config)
        self.config = config
        parts = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.learned_pos:
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        parts.update(drop=nn.Dropout(config.dropout), h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                     ln_f=make_norm(config, config.n_embd))
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        cos, sin = rope_tables(config.n_head, config.rope_heads, config.head_size, config.block_size,
                               config.rope_base, config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # activation checkpointing: every k-th block keeps only its input and recomputes the rest in backward
        # (0: off). A training option, not part of the architecture, so not in GPTConfig or the checkpoint.
        self.grad_ckpt_every = 0
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameters, with the frozen weight of a quantized layer (quant.Int4Linear and Int8Linear mark themselves
        with stores_codes) counted at its logical size in x out, not as its packed buffers.
        non_embedding leaves out the position table and an untied token embedding (a lookup, not a matmul)."""
        n = sum(p.numel() for p in self.parameters())
        n += sum(m.in_features * m.out_features for m in self.modules() if getattr(m, "stores_codes", False))
        if non_embedding and self.config.learned_pos:
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    def embed(self, idx, pos=None):
        """Token (+ learned position) embeddings of idx (B, T), and the rotary tables for its positions: 0..T-1
        (training), or pos (B, T) per row (generation, left padding)."""
        T = idx.size(1)
        x, rope = self.transformer.wte(idx), None
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
            if self.config.learned_pos:
                x = x + self.transformer.wpe.weight[:T]
            if self.config.rope_heads:
                rope = (self.rope_cos[:T].transpose(0, 1), self.rope_sin[:T].transpose(0, 1))  # (H, T, hd)
        else:
            if self.config.learned_pos:
                x = x + self.transformer.wpe(pos)
            if self.config.rope_heads:
                rope = (self.rope_cos[pos].transpose(1, 2), self.rope_sin[pos].transpose(1, 2))  # (B, H, T, hd)
        return self.transformer.drop(x), rope

    def forward(self, idx, targets=None, pos=None, cache=None, mask=None, last_only=None, loss_fn=None):
        """idx (B, T) -> (logits, loss). targets == -1 are ignored. pos (B, T) gives per-row positions
        (generation); cache/mask are generate()'s. Without targets only the last position's logits are computed
        unless last_only=False. loss_fn(hidden, lm_head_weight, targets) -> loss, when given with targets,
        replaces the full-logits loss and logits come back as None (train.py's --chunked_loss passes
        kernels.linear_cross_entropy); it runs inside forward so DDP and FSDP see the weight used there."""
        x, rope = self.embed(idx, pos)
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
        rows = prompt_rows(idx, max_new_tokens, num_samples, self.config.block_size)
        if not use_cache and num_samples > 1:  # the baseline has no prefill to share: repeat the prompts
            rows, num_samples = [r for r in rows for _ in range(num_samples)], 1
        was_training = self.training
        self.eval()
        batch = RaggedBatch(rows, max_new_tokens, eos_id, self.transformer.wte.weight.device)
        cache = KVCache(self, len(rows), batch.seq.size(1), batch.seq.device, self.activation_dtype()) \
            if use_cache else None
        logits = self.next_logits(batch, cache)  # the prefill: every prompt token at once
        if num_samples > 1:  # one prefill per prompt, then G rows per prompt
            rows_g = torch.arange(len(rows), device=logits.device).repeat_interleave(num_samples)
            logits = logits[rows_g]
            batch.repeat(rows_g)
            cache.take(rows_g)
        for n in range(max_new_tokens):
            nxt = sample_next(logits[:, -1, :], temperature, top_k, generator)
            if batch.append(nxt) or n == max_new_tokens - 1:  # every row has ended, or the budget is spent
                break
            kept = batch.drop_finished()
            if kept is not None and cache is not None:
                cache.take(kept)
            logits = self.next_logits(batch, cache)
        self.train(was_training)
        return batch.result()

    def next_logits(self, batch, cache):
        """Logits at the last position of every row: the whole prefix without a cache (or on an empty one, the
        prefill), else only the newest token against the cached keys and values."""
        t = batch.t
        t0 = 0 if cache is None or cache.len == 0 else t - 1
        logits, _ = self(batch.seq[:, t0:t], pos=batch.pos[:, t0:t], cache=cache, mask=batch.mask(t0, t))
        if cache is not None:
            cache.len = t
        return logits

    def activation_dtype(self):
        """The dtype the layers compute in (the KV cache's): autocast's when it is on, else the weights'."""
        device = self.transformer.wte.weight.device
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return next(self.parameters()).dtype

    # ------------------------------------------------------------------------- Hugging Face directories

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a local Hugging Face directory: config.json (model_type gpt2, llama, mistral, qwen2 or qwen3) and
        model.safetensors, the shards model.safetensors.index.json lists, or pytorch_model.bin; fp32, bf16 or
        fp16 weights become an fp32 model. Nothing is downloaded. overrides (e.g. dropout=0.1, block_size=2048)
        change the config before the weights load."""
        path = os.fspath(path)
        config = config_from_hf(read_hf_config(path), os.path.join(path, "config.json"))
        for k, v in overrides.items():
            setattr(config, k, v)
        model = cls(config)
        load_hf_weights_(model, read_hf_tensors(path), path)
        return model

    def save_pretrained(self, path):
        """Write this float model as a Hugging Face directory that from_pretrained and the Hugging Face libraries
        load: config.json (model_type gpt2, llama, qwen2 or qwen3, from the config's shape) and model.safetensors
        in Hugging Face's tensor names, in the weights' dtype. Files are written to a temporary name and renamed."""
        from safetensors.torch import save_file  # here, so that importing model.py needs no safetensors
        hf = hf_config(self.config)
        hf["torch_dtype"] = str(self.lm_head.weight.dtype).removeprefix("torch.")
        odd = next(((n, m) for n, m in self.named_modules() if n and type(m) not in FLOAT_MODULES), None)
        if odd is not None:
            raise ValueError(f"save_pretrained takes a float model, but {odd[0]} is a {type(odd[1]).__name__}: "
                             "merge LoRA adapters (lora.merge_lora_) first; quantized layers cannot be exported")
        tensors = {hf_name(n, self.config): (t.t() if self.config.mlp == "gelu" and n.endswith(GPT2_CONV1D) else t)
                   .detach().contiguous() for n, t in self.state_dict().items()
                   if not (n == "lm_head.weight" and self.config.tie_embeddings)}
        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, "model.safetensors.tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(path, "model.safetensors.tmp"), os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json.tmp"), "w") as f:
            json.dump(hf, f, indent=2)
        os.replace(os.path.join(path, "config.json.tmp"), os.path.join(path, "config.json"))

    # ------------------------------------------------------------------------- accounting

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N for the matmuls plus attention's 12 * L * H * hd * T (PaLM appendix B)."""
        c = self.config
        return 6 * self.get_num_params() + 12 * c.n_layer * c.n_head * c.head_size * seq_len

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


def config_from_dict(d):
    """A GPTConfig from a saved dict, ignoring keys this version does not know. Checkpoints from before the gelu
    field were trained with the tanh approximation; those from before the Llama fields get their GPT-2 defaults."""
    names = {f.name for f in fields(GPTConfig)}
    return GPTConfig(**{"gelu": "tanh", **{k: v for k, v in d.items() if k in names}})


# ----------------------------------------------------------------------------- generation's batch

def prompt_rows(idx, max_new_tokens, num_samples, block_size):
    """generate()'s prompts as a list of 1-D long tensors, after checking what it was asked for."""
    if isinstance(idx, torch.Tensor) and idx.dim() == 2:
        rows = list(idx)
    else:
        rows = [torch.as_tensor(r, dtype=torch.long) for r in idx]
    if not rows or min(len(r) for r in rows) == 0:
        raise ValueError("generate() needs at least one prompt, each with at least one token")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, not {num_samples}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > block_size:
        raise ValueError(f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds block_size "
                         f"{block_size}; ask for fewer new tokens")
    return rows


class RaggedBatch:
    """The rows generate() decodes: prompts left-padded to one length T0 in seq (B, T0 + max_new), each row's own
    positions (its first real token at 0) and which keys are real (pads never are), how far each has got, and,
    once rows that ended have left, the full-size result they were moved to."""

    def __init__(self, rows, max_new_tokens, eos_id, device):
        B, T0 = len(rows), max(len(r) for r in rows)
        pad = T0 - torch.tensor([len(r) for r in rows], device=device)
        self.seq = torch.zeros(B, T0 + max_new_tokens, dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            self.seq[b, pad[b]:T0] = r.to(device)
        steps = torch.arange(T0 + max_new_tokens, device=device)
        self.pos = (steps[None, :] - pad[:, None]).clamp(min=0)
        self.key_ok = steps[None, :] >= pad[:, None]
        self.ragged = bool((pad > 0).any())
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.lengths = torch.full((B,), max_new_tokens, device=device)
        self.index = torch.arange(B, device=device)  # each row's place in the result
        self.eos_id, self.fill = eos_id, eos_id if eos_id is not None else 0
        self.T0 = self.t = T0
        self.ended, self.out_seq, self.out_len = 0, None, None

    def mask(self, q0, q1):
        """(B, 1, q, k) boolean mask for queries q0..q1-1 over keys 0..q1-1; None when no row is padded (plain
        causal attention)."""
        if not self.ragged:
            return None
        if q1 - q0 == 1:  # a decode step: every cached key but the padding
            return self.key_ok[:, None, None, :q1]
        steps = torch.arange(q1, device=self.seq.device)
        m = (steps[q0:q1, None] >= steps[None, :])[None] & self.key_ok[:, None, :q1]
        # a pad query may see itself, so that no row of the mask is empty (its output is never used)
        return (m | (steps[q0:q1, None] == steps[None, :])[None])[:, None]

    def take(self, rows):
        self.seq, self.pos, self.key_ok, self.done, self.lengths, self.index = (
            a[rows] for a in (self.seq, self.pos, self.key_ok, self.done, self.lengths, self.index))

    def repeat(self, rows):
        """num_samples: the rows become rows (an index that repeats each prompt), each a row of the result."""
        self.take(rows)
        self.index = torch.arange(len(rows), device=self.seq.device)

    def append(self, nxt):
        """Write each row's next token (the fill for rows that have ended); True once every row has ended."""
        nxt = torch.where(self.done, torch.full_like(nxt, self.fill), nxt)
        self.seq[:, self.t] = nxt
        self.t += 1
        if self.eos_id is None:
            return False
        hit = (nxt == self.eos_id) & ~self.done
        self.lengths[hit] = self.t - self.T0
        self.done |= hit
        self.ended = int(self.done.sum())  # one host sync a step, for this check and drop_finished's
        return self.ended == len(self.done)

    def drop_finished(self):
        """Once half the rows (of at least 8) have ended, move them to the result and out of the batch: the rest
        decode at the smaller size. Returns the index of the rows kept (for the cache), or None."""
        if not 2 * self.ended >= len(self.done) >= 8:
            return None
        if self.out_seq is None:
            self.out_seq, self.out_len = torch.full_like(self.seq, self.fill), self.lengths.clone()
        fin, keep = self.done.nonzero().squeeze(1), (~self.done).nonzero().squeeze(1)
        self.out_seq[self.index[fin], :self.t] = self.seq[fin, :self.t]
        self.out_len[self.index[fin]] = self.lengths[fin]
        self.take(keep)
        self.ended = 0
        return keep

    def result(self):
        """(tokens (B, n), lengths (B,)) of every row, in the order of the prompts."""
        seq, lengths = self.seq, self.lengths
        if self.out_seq is not None:  # put the rows still running back among those that ended early
            self.out_seq[self.index, :self.t] = seq[:, :self.t]
            self.out_len[self.index] = lengths
            seq, lengths = self.out_seq, self.out_len
        return seq[:, self.T0:self.t], lengths


# ----------------------------------------------------------------------------- Hugging Face configs and names

HF_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # (in, out)
GPT2_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "exact"}
LLAMA_RENAMES = (("transformer.wte.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."),
                 ("transformer.h.", "model.layers."), (".ln_1.", ".input_layernorm."),
                 (".ln_2.", ".post_attention_layernorm."), (".attn.", ".self_attn."))
FLOAT_MODULES = (nn.ModuleDict, nn.ModuleList, nn.Embedding, nn.Dropout, nn.LayerNorm, RMSNorm, nn.Linear,
                 Block, CausalSelfAttention, MLP, SwiGLU)


def hf_name(name, config):
    """Our state_dict name -> Hugging Face's: GPT2LMHeadModel's are ours; Llama's and Qwen's rename the parts."""
    if config.mlp == "swiglu":
        for ours, theirs in LLAMA_RENAMES:
            name = name.replace(ours, theirs)
    return name


def read_hf_config(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({type(e).__name__}): download it again") from None


def config_from_hf(hf, cfg_path):
    """A GPTConfig from a Hugging Face config.json's dict; ValueError (naming cfg_path) for what we cannot run."""
    kind = hf.get("model_type", "gpt2")  # GPT-2 configs written by hand (this loader's first kind) may lack it
    if kind not in HF_MODEL_TYPES:
        raise ValueError(f"{cfg_path}: model_type {kind!r} is not supported; this loads "
                         f"{', '.join(HF_MODEL_TYPES)}")
    try:
        config = gpt2_config(hf) if kind == "gpt2" else llama_config(hf)
    except KeyError as e:
        raise ValueError(f"{cfg_path} lacks {e.args[0]!r}, which a {kind} config needs") from None
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    check_config(config)
    return config


def gpt2_config(hf):
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_GELU:
        raise ValueError(f"activation_function {act!r} is not supported (only {', '.join(GPT2_GELU)})")
    return GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True, gelu=GPT2_GELU[act],
                     norm_eps=hf.get("layer_norm_epsilon", 1e-5), intermediate_size=hf.get("n_inner") or 0,
                     tie_embeddings=hf.get("tie_word_embeddings", True))


def llama_config(hf):
    """Llama, Mistral, Qwen2 and Qwen3: the differences are q/k/v bias (Qwen2) and q/k norms (Qwen3)."""
    kind, n_head = hf["model_type"], hf["num_attention_heads"]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    window = hf.get("sliding_window") if kind == "mistral" or hf.get("use_sliding_window") else None
    if window is not None and window < hf.get("max_position_embeddings", 2048):
        raise ValueError(f"sliding-window attention ({window} tokens) is not supported")
    bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if bias != mlp_bias or (bias and kind == "qwen3"):
        raise ValueError("a bias on the attention but not the MLP (or the other way) is not supported")
    rope = hf.get("rope_parameters") or {}  # transformers 5 writes rope_theta and the scaling in here
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        kind_of = scaling.get("rope_type", scaling.get("type"))
        if kind_of != "llama3":
            raise ValueError(f"rope_scaling of type {kind_of!r} is not supported (only llama3)")
        scaling = {"rope_type": "llama3", **{k: scaling[k] for k in LLAMA3_SCALING_KEYS}}
    return GPTConfig(block_size=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
                     n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=hf["hidden_size"], bias=bias,
                     rope_heads=n_head, rope_base=float(theta), norm="rmsnorm",
                     norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
                     intermediate_size=hf["intermediate_size"], n_kv_head=hf.get("num_key_value_heads") or 0,
                     head_dim=hf.get("head_dim") or 0, learned_pos=False, rope_scaling=scaling,
                     tie_embeddings=hf.get("tie_word_embeddings", False), qkv_bias=kind == "qwen2",
                     qk_norm=kind == "qwen3")


def hf_config(c):
    """The Hugging Face config.json dict for a GPTConfig; ValueError for a shape no Hugging Face family has."""
    def need(ok, why):
        if not ok:
            raise ValueError(f"this model has no Hugging Face form: {why}")
    if c.mlp == "gelu":
        need(c.norm == "layernorm" and c.bias and c.learned_pos and not c.rope_heads and not c.qk_norm
             and c.kv_heads == c.n_head and c.head_size * c.n_head == c.n_embd,
             "GPT-2 has LayerNorm with biases, learned positions, no rotary heads, no q/k norms and full heads")
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                    n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                    n_inner=c.intermediate_size or None, layer_norm_epsilon=c.norm_eps,
                    activation_function="gelu_new" if c.gelu == "tanh" else "gelu",
                    resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                    tie_word_embeddings=c.tie_embeddings)
    need(c.norm == "rmsnorm" and not c.learned_pos and c.rope_heads == c.n_head,
         "Llama and Qwen have RMSNorm, rotary positions on every head and no learned positions")
    kind = "qwen3" if c.qk_norm else "qwen2" if c.qkv_bias and not c.bias else "llama"
    need(not (kind == "qwen3" and (c.bias or c.qkv_bias)), "Qwen3 (q/k norms) has no biases")
    hf = dict(model_type=kind, architectures=[{"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
                                              + "ForCausalLM"],
              vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
              num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
              head_dim=c.head_size, hidden_act="silu", max_position_embeddings=c.block_size,
              rms_norm_eps=c.norm_eps, rope_theta=c.rope_base, rope_scaling=c.rope_scaling,
              tie_word_embeddings=c.tie_embeddings, attention_dropout=c.dropout)
    if kind != "qwen2":
        hf["attention_bias"] = c.bias
    if kind == "llama":
        hf["mlp_bias"] = c.bias
    return hf


def read_hf_tensors(path):
    """{Hugging Face name: (tensor, the file it came from)} from model.safetensors, the shards listed in
    model.safetensors.index.json, or pytorch_model.bin."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = [os.path.join(path, s) for s in sorted(set(json.load(f).get("weight_map", {}).values()))]
        lost = next((s for s in files if not os.path.isfile(s)), None)
        if lost is not None:
            raise FileNotFoundError(f"{index} lists the shard {os.path.basename(lost)}, which is not in {path}: "
                                    "download it")
    elif os.path.isfile(binary):
        return {n: (t, binary) for n, t in torch.load(binary, map_location="cpu", weights_only=True).items()}
    else:
        raise FileNotFoundError(f"{path} holds neither model.safetensors (nor its index) nor pytorch_model.bin")
    from safetensors import safe_open  # here, so that importing model.py needs no safetensors
    out = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as st:
                out.update({n: (st.get_tensor(n), file) for n in st.keys()})
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file, whatever the reader calls it
            raise ValueError(f"{file} is not a readable safetensors file ({type(e).__name__}): download it "
                             "again") from None
    return out


@torch.no_grad()
def load_hf_weights_(model, tensors, path):
    """Copy Hugging Face tensors into model (cast to its dtype); a missing or extra tensor, or a shape that does
    not fit, is a ValueError that names the file."""
    c, ours = model.config, model.state_dict()
    if c.mlp == "gelu":  # hub GPT-2 files name tensors without "transformer." and hold the causal-mask buffers
        tensors = {n if n.startswith(("transformer.", "lm_head.")) else "transformer." + n: v
                   for n, v in tensors.items() if not n.endswith((".attn.bias", ".attn.masked_bias"))}
    wanted = {hf_name(n, c): n for n in ours if not (n == "lm_head.weight" and c.tie_embeddings)}
    if c.tie_embeddings and "lm_head.weight" in tensors:  # a tied checkpoint may store the head too
        tensors.setdefault(hf_name("transformer.wte.weight", c), tensors.pop("lm_head.weight"))
    missing = [n for n in wanted if n not in tensors]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors that its config.json needs, e.g. {missing[0]!r}")
    extra = [n for n in tensors if n not in wanted]
    if extra:
        raise ValueError(f"{tensors[extra[0]][1]} holds {len(extra)} tensors that its config.json has no place "
                         f"for, e.g. {extra[0]!r}")
    for theirs, name in wanted.items():
        w, file = tensors[theirs]
        if c.mlp == "gelu" and name.endswith(GPT2_CONV1D):
            w = w.t()  # HF's Conv1D stores (in, out)
        if w.shape != ours[name].shape:
            raise ValueError(f"{file}: {theirs} has shape {tuple(w.shape)}, but its config.json makes it "
                             f"{tuple(ours[name].shape)}")
        ours[name].copy_(w)
