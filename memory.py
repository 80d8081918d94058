"""memory.py: where a training step's memory goes, and sharding the training state across processes (FSDP2).

    estimate_memory(model, batch, seq_len, ...)  analytic bytes per component and the step's peak
    plan_batch(model, budget, rows_per_step, ...) the largest micro-batch (and whether to checkpoint) that fits
    too_big(estimate, device)                     whether that peak can fit in the memory free here
    generation_bytes(model, rows, seq_len)        a batched KV-cached generation's bytes (RL rollouts)
    shard_model / full_state_dicts / load_optimizer_state / unsharded_copy / grad_sync   FSDP2 for train.py

Ideas it rests on:
- The estimate counts what autograd keeps for this model, tensor by tensor (see _block_bytes), and follows the
  step through its phases: the loss (all activations saved, the logits' buffers at their widest), the backward of
  the last block (a recomputed block on top when checkpointing), the end of the backward (every gradient plus
  the embedding's dense gradient) and the update. The peak is the largest phase; weights, buffers (a frozen
  4-bit base's codes and scales) and optimizer state live through all of them; on CPU a 4-bit layer's chunked
  matmul adds its dequantization temporaries in the forward and the backward. It is checked against measured
  peaks (tests/test_memory.py, `train.py --plan`).
- The planner keeps the rows per optimizer step fixed and only trades micro-batch size for accumulation steps,
  so a plan changes the memory, not the maths.
- FSDP2 (fully_shard per block, then the root) shards weights, gradients and optimizer state; checkpoints are
  gathered into the single-process format (full tensors, optimizer state keyed by parameter index), so a run saved
  under FSDP resumes under DDP, on one process, or under FSDP on another number of processes.
"""
import os
import re
import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MiB = 2 ** 20
PLAN_HEADROOM = 0.1  # of a --memory_budget, kept free for what the estimate does not count
# a step estimated to need more than this times the free memory is refused before it starts (the estimate is
# within a few percent of measured peaks, so only a run that cannot fit is stopped; one near the edge is tried)
FIT_SLACK = 1.15
# bytes per weight element of one block of rows that kernels' chunked int4 path dequantizes at a time, at its
# peak: int32 shifted and masked codes, uint8 codes, int64 table indices or fp32 codes, fp32 levels and products
# (measured with TensorPeak)
DEQUANT_BYTES = dict(int4=12, nf4=13)
UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2 ** 10, "MIB": 2 ** 20,
         "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_bytes(text):
    """'8GB' -> 8e9, '512MiB' -> 536870912, '1.5e9' -> 1.5e9; ValueError for anything else."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in UNITS:
        raise ValueError(f"{text!r} is not a memory size: write e.g. 8GB, 512MiB or 2e9")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


# ----------------------------------------------------------------------------- the estimate

def _block_bytes(c, checkpointed, s, seq_len, cpu_autocast=False):
    """Bytes one block keeps for backward, per token, activations being s bytes (2 under bf16 autocast, where
    the residual stream and the norms' inputs stay fp32). Checkpointed: its (fp32) input. Counted tensor by
    tensor with autograd's saved-tensor hook (tests/test_memory.py) for GPT-2's block and Llama's."""
    C = c.n_embd
    if checkpointed:
        return 4 * C
    q, kv = c.n_head * c.head_size, c.kv_heads * c.head_size  # widths of q (and the output) and of k, v
    if c.mlp == "swiglu":
        n = _llama_block_bytes(c, s, cpu_autocast, q, kv)
    else:
        n = _gpt2_block_bytes(c, s, cpu_autocast, q, kv)
    return n + (2 * C + 3 * (4 if cpu_autocast else s) * c.n_head * seq_len if c.dropout > 0 else 0)


def _gpt2_block_bytes(c, s, cpu_autocast, q, kv):
    """The block input (kept by ln_1) and the residual after attention (ln_2), in fp32; ln_1's and ln_2's outputs
    as c_attn and c_fc take them; q|k|v (by attention: views of one tensor), rotated q and k (when rope_heads),
    attention's output (by its backward and by c_proj: flash attention returns it in (B, T, H, hd) order, so
    .contiguous() copies nothing); c_fc's output (GELU) and GELU's output (c_proj), plus two LayerNorms' mean and
    rstd and attention's log-sum-exp per head (fp32). cpu_autocast: bf16 autocast on CPU, where model.py runs
    attention in fp32: it keeps fp32 q, k, v and output, with rope or not, and c_proj its own bf16 copy of the
    output. With dropout: two bool masks, and attention takes the math path, which keeps the probabilities, the
    dropout mask and the dropped probabilities (H x T each)."""
    C, H = c.n_embd, c.n_head
    if cpu_autocast:
        attention = 4 * (2 * q + 2 * kv) + s * q
    else:
        attention = s * (2 * q + 2 * kv + ((q + kv) if c.rope_heads else 0))
    return 4 * 2 * C + s * 2 * C + attention + s * 2 * c.mlp_hidden + 4 * (4 + H)


def _llama_block_bytes(c, s, cpu_autocast, q, kv):
    """RMSNorms (computed in fp32) keep their input, rstd and the normalised input; each projection keeps its
    input (one shared tensor in fp32; under autocast q, k, v, gate and up each cast their own bf16 copy);
    attention keeps the rotated q and k (the unrotated ones are not needed: rope multiplies by constant tables),
    v, its output and log-sum-exp (in fp32 on CPU, with o_proj's bf16 copy of the output under autocast);
    qk_norm keeps the same three per head of q and k; SwiGLU keeps gate's, up's and silu's outputs and their
    product (down_proj's input)."""
    C, H, I = c.n_embd, c.n_head, c.mlp_hidden
    norms = 2 * (4 * C + 4 + 4 * C) + (4 * 2 * C if s == 4 else s * 5 * C)
    if cpu_autocast:
        attention = 4 * (2 * q + 2 * kv) + s * q
    else:
        attention = (4 if s == 4 else s) * (2 * q + 2 * kv)
    qk_norm = 2 * 4 * (q + kv) + 4 * (H + c.kv_heads) if c.qk_norm else 0
    return norms + attention + 4 * H + qk_norm + s * 4 * I


def estimate_memory(model, batch, seq_len, world=1, optim="adamw", grad_ckpt_every=0, chunked_loss=False,
                    fsdp=False, dtype="float32", grad_accum=1, row_positions=False):
    """Bytes per component of one training step for `model` (a GPT) at micro-batch `batch` x `seq_len` tokens per
    process, and the step's peak ("peak"); with grad_accum > 1 the later micro-batches run beside the gradients
    of the earlier ones; row_positions: the batch comes with per-row positions (the loader's document-aligned
    rows), so rotary heads gather their cos/sin tables per token. fp32 weights, gradients and AdamW states
    (8-bit AdamW: ~2 bytes a parameter); activations in fp32, or for bfloat16 autocast with the weight copies
    and the activations autocast keeps in bf16 (measured on CPU; on CUDA reasoned, not yet measured). DDP adds
    its gradient buckets; FSDP divides weights, gradients and optimizer state by the world size and adds one
    gathered block."""
    s = 2 if dtype == "bfloat16" else 4   # bytes of a saved activation
    est = _resident_bytes(model, world, optim, fsdp, dtype)
    shape = _StepShape(model, batch * seq_len, seq_len, s, grad_ckpt_every, row_positions)
    est["activations"] = shape.activations()
    est["loss"] = _loss_bytes(model, shape.N, chunked_loss)
    phases = _phase_bytes(est, shape, grad_accum, world if fsdp else 1, _dequant_temporaries(model),
                          _head_grad(model))
    est["peak_phase"] = max(phases, key=phases.get)
    est["peak"] = phases[est["peak_phase"]]
    return est


def _resident_bytes(model, world, optim, fsdp, dtype):
    """What lives through the whole step: weights and buffers, gradients, optimizer state, communication
    buffers, and autocast's bf16 weight copies."""
    params = list({id(p): p for p in model.parameters()}.values())
    P = sum(p.numel() for p in params)
    Pt = sum(p.numel() for p in params if p.requires_grad)
    shard = world if fsdp else 1
    L = model.config.n_layer
    block_params = sum(p.numel() for p in model.transformer.h[0].parameters()) if L else 0
    # buffers: a frozen 4-bit base's packed codes, scales and zero points, the rotary tables (FSDP leaves them whole)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    est = dict(weights=4 * P / shard + buffers)
    est["grads"] = 4 * Pt / shard
    est["optimizer"] = (2.03 if optim == "adamw8bit" else 8.0) * Pt / shard
    est["comm_buffers"] = 4 * Pt if world > 1 and not fsdp else (2 * 4 * block_params if fsdp else 0)
    if dtype == "bfloat16":  # autocast keeps a bf16 copy of every weight it casts, for the whole step
        est["weight_copies"] = 2 * P
    return est


class _StepShape:
    """The activation bytes of one micro-batch of N tokens, block by block."""

    def __init__(self, model, N, seq_len, s, every, row_positions):
        c = self.c = model.config
        self.N, self.seq_len, self.s, self.every = N, seq_len, s, every
        self.cpu_autocast = s == 2 and next(model.parameters()).device.type == "cpu"
        L = c.n_layer
        self.adapters = [m for m in model.transformer.h[0].modules() if getattr(m, "lora_B", None) is not None] \
            if L else []
        # LoRA: each adapter keeps x A (rank wide) for B, and with adapter dropout the dropped x (for A)
        self.lora = sum(m.rank * s + (s * m.in_features if isinstance(m.dropout, torch.nn.Dropout) else 0)
                        for m in self.adapters)
        self.saved = [N * (self.block(ckpt) + (0 if ckpt else self.lora))
                      for ckpt in (bool(every) and i % every == 0 for i in range(L))]
        # kept all step: token and target ids (int64); with per-row positions, rotary cos and sin per token
        # (fp32); the embedding's dropout mask
        C = c.n_embd
        # (the tables hold one row of head_size per token when every head rotates, else one per head)
        rope = c.head_size if c.rope_heads == c.n_head else c.n_head * c.head_size
        self.whole_step = 16 * N + (4 * N * 2 * rope if row_positions and c.rope_heads else 0) + \
            (N * C if c.dropout else 0)

    def block(self, checkpointed):
        return _block_bytes(self.c, checkpointed, self.s, self.seq_len, self.cpu_autocast)

    def activations(self):
        # + ln_f's (fp32) input and stats (RMSNorm: rstd and the normalised input), its output as the head takes it
        C = self.c.n_embd
        stats = 4 + 4 * C if self.c.norm == "rmsnorm" else 8
        return sum(self.saved) + self.N * (4 * C + self.s * C + stats) + self.whole_step

    def in_blocks(self):
        """The most the backward holds in blocks: blocks 0..i still hold what they saved, and a checkpointed
        block i is recomputed whole."""
        recompute = self.N * (_block_bytes(self.c, False, self.s, self.seq_len, self.cpu_autocast) + self.lora
                              - _block_bytes(self.c, True, self.s, self.seq_len))
        every = self.every
        return max((sum(self.saved[:i + 1]) + (recompute if every and i % every == 0 else 0)
                    for i in range(self.c.n_layer)), default=0)


def _loss_bytes(model, N, chunked_loss):
    c = model.config
    V, C = c.vocab_size, c.n_embd
    if chunked_loss:  # d W and d h are made in the forward and kept; one chunk of logits at a time
        from kernels import lce_chunk_rows
        rows = min(N, lce_chunk_rows(N, C))
        return _head_grad(model) + 4 * N * C + 4 * rows * (V + C)
    # log-softmax's output, its gradient and the logits' gradient (fp32), all three at once (under bf16
    # autocast the bf16 logits are freed once cast up, and their bf16 gradient is made after these go)
    return 3 * 4 * V * N


def _head_grad(model):
    c = model.config
    return 4 * c.vocab_size * c.n_embd if model.lm_head.weight.requires_grad else 0  # (LoRA freezes it)


def _phase_bytes(est, shape, grad_accum, shard, dequant, head_grad):
    """The step's memory at each of its phases."""
    C, N = shape.c.n_embd, shape.N
    # the MLP's hidden gradient(s): GELU's counted at fp32 width (on the safe side under autocast); SwiGLU's two at
    # the activations' width (counted at fp32 they put a bf16 Qwen3 step 10% over its measured peak)
    hidden = 4 * shape.c.mlp_hidden if shape.c.mlp == "gelu" else 2 * shape.s * shape.c.mlp_hidden
    fixed = est["weights"] + est["optimizer"] + est["comm_buffers"] + est.get("weight_copies", 0)
    accumulated = est["grads"] if grad_accum > 1 else 0
    # an adapter's backward scales the gradient of its output: one more gradient as wide as the widest adapter
    lora_grad = shape.s * N * max((m.out_features for m in shape.adapters), default=0)
    return dict(
        # the last block's forward: (nearly) every activation, and one 4-bit layer's temporaries (dequant: made
        # and freed inside a 4-bit layer's forward or backward); they are freed before the loss
        forward=fixed + accumulated + est["activations"] + dequant,
        loss=fixed + accumulated + est["activations"] + est["loss"],
        # the backward of a block holds its MLP's hidden gradient (two for SwiGLU) beside what the blocks keep (and
        # an adapter's scaled one), and the gradient flowing in and the head's weight gradient exist
        backward=fixed + accumulated + shape.whole_step + shape.in_blocks() + N * (hidden + 4 * C) + lora_grad
        + head_grad + dequant,
        # a tied weight's two gradients (head, embedding) and their sum exist at once, beside the others
        backward_end=fixed + est["grads"] + (2 * head_grad / shard if shape.c.tie_embeddings else 0),
        update=fixed + est["grads"],
    )


def _dequant_temporaries(model):
    """The largest block of dequantization temporaries kernels' chunked path makes for one of the model's 4-bit
    layers on CPU (the Triton kernels on CUDA dequantize in registers), in bytes."""
    from kernels import chunk_rows
    sizes = [DEQUANT_BYTES["int4" if getattr(m, "lut", None) is None else "nf4"] * chunk_rows(p) * 8 * p.shape[1]
             for m in model.modules() for p in [getattr(m, "packed", None)]
             if isinstance(p, torch.Tensor) and p.device.type == "cpu"]
    return max(sizes, default=0)


def mib(n):
    return f"{n / MiB:,.0f}" if n >= 10 * MiB else f"{n / MiB:.2g}"


def readable(n):
    """Bytes as '3.2 GiB' or '412 MiB'."""
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / MiB:.0f} MiB"


def format_estimate(est):
    """One line: the peak, its phase, and each component, in MiB."""
    parts = [f"{k} {mib(v)}" for k, v in est.items() if k not in ("peak", "peak_phase") and v]
    return f"estimated peak {mib(est['peak'])} MiB (at the {est['peak_phase'].replace('_', ' ')}): " + \
        ", ".join(parts) + " MiB"


def plan_batch(model, budget, rows_per_step, seq_len, **kw):
    """(micro_batch, grad_ckpt_every, estimate) for the largest micro-batch that divides rows_per_step and whose
    estimated peak fits `budget` bytes. Checkpointing is chosen only when it at least doubles the micro-batch
    (its recomputation costs about a third more compute) or when nothing fits without it. None if nothing fits."""
    def largest(every):
        for b in sorted((d for d in range(1, rows_per_step + 1) if rows_per_step % d == 0), reverse=True):
            est = estimate_memory(model, b, seq_len, grad_ckpt_every=every, grad_accum=rows_per_step // b, **kw)
            if est["peak"] <= budget:
                return b, est
        return 0, None
    b0, e0 = largest(0)
    if b0 == rows_per_step:
        return b0, 0, e0
    b1, e1 = largest(1)
    if b1 and (b0 == 0 or b1 >= 2 * b0):
        return b1, 1, e1
    return (b0, 0, e0) if b0 else None


def apply_plan(cfg, model, world, dtype, verbose=True):
    """train.py's --grad_ckpt/--grad_ckpt_every, --memory_budget and --plan on a TrainConfig `cfg` and a GPT: with a
    budget, cfg's micro-batch, accumulation and checkpointing become plan_batch's choice (PLAN_HEADROOM of the
    budget is left for what the estimate does not hold: allocator caches, the CUDA context). Returns the
    estimate for the settings that will run; ValueError for a bad or too-small budget."""
    # (per-row positions assumed, as the document-aligned corpora give: plain text over-counts a little)
    kw = dict(world=world, optim=cfg.optim, chunked_loss=cfg.chunked_loss, fsdp=cfg.fsdp, dtype=dtype,
              row_positions=True)
    if cfg.memory_budget:
        try:
            budget = parse_bytes(cfg.memory_budget)
        except ValueError as e:
            raise ValueError(f"--memory_budget: {e}")
        rows = cfg.batch_size * cfg.grad_accum
        choice = plan_batch(model, budget * (1 - PLAN_HEADROOM), rows, cfg.block_size, **kw)
        if choice is None:
            least = estimate_memory(model, 1, cfg.block_size, grad_ckpt_every=1, grad_accum=rows, **kw)["peak"]
            raise ValueError(f"--memory_budget {cfg.memory_budget}: even micro-batch 1 with checkpointing needs "
                             f"about {mib(least)} MiB; shard with --fsdp on more processes, use a smaller "
                             f"model or --block_size, or a larger budget")
        cfg.batch_size, every, _ = choice
        cfg.grad_accum = rows // cfg.batch_size
        cfg.grad_ckpt, cfg.grad_ckpt_every = bool(every), every or cfg.grad_ckpt_every
    model.grad_ckpt_every = cfg.grad_ckpt_every if cfg.grad_ckpt else 0
    est = estimate_memory(model, cfg.batch_size, cfg.block_size, grad_ckpt_every=model.grad_ckpt_every,
                          grad_accum=cfg.grad_accum, **kw)
    if verbose and (cfg.plan or cfg.memory_budget):
        ckpt = f"every {model.grad_ckpt_every} block(s)" if model.grad_ckpt_every else "off"
        print(f"memory plan: micro-batch {cfg.batch_size} x {cfg.grad_accum} accumulation per process, "
              f"checkpointing {ckpt}, chunked loss {'on' if cfg.chunked_loss else 'off'} | {format_estimate(est)}")
    return est


def generation_bytes(model, rows, seq_len, dtype="float32"):
    """Bytes of a batched KV-cached generation of rows x seq_len tokens: the weights and buffers, every layer's
    keys and values (model.KVCache, in the activation dtype) and the last position's fp32 logits and
    probabilities for every row."""
    c = model.config
    s = 2 if dtype == "bfloat16" else 4
    return weight_bytes(model) + 2 * c.n_layer * rows * seq_len * c.kv_heads * c.head_size * s + \
        2 * rows * c.vocab_size * 4


def weight_bytes(model):
    """The model's parameters and buffers (a frozen 4-bit base's codes and scales), in bytes."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def free_bytes(device, procs=1):
    """Bytes `procs` processes like this one may take for a step, counting what they hold already: on CUDA the
    device's free memory plus torch's reserve; on CPU (Linux) available memory and free swap, within the cgroup's
    limit, plus the resident set of this process (taken as every process's). None where it cannot be read."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
        room = info["MemAvailable"] + info.get("SwapFree", 0)
        held = int(_status_mb("VmRSS") * MiB)
    except (OSError, KeyError, ValueError, IndexError, StopIteration):
        return None
    limited = _cgroup_room()
    return min(room, limited if limited is not None else room) + held * procs


def _cgroup_room():
    """What the container's memory limit (cgroup v2) still allows, page cache the kernel can drop counted as
    free (as `docker stats` counts it), or None without a limit."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit, used = f.read().strip(), int(g.read())
        with open("/sys/fs/cgroup/memory.stat") as f:
            stat = dict(line.split() for line in f if len(line.split()) == 2)
        return None if limit == "max" else max(0, int(limit) - used + int(stat.get("inactive_file", 0)))
    except (OSError, ValueError):
        return None


def too_big(est, device, procs=1):
    """(needed, free) in bytes when `procs` processes of this step's estimated peak cannot fit in what is free here
    even allowing for FIT_SLACK; None when they fit or the free memory is unknown."""
    free = free_bytes(device, procs)
    needed = est["peak"] * procs
    return (needed, free) if free is not None and needed > free * FIT_SLACK else None


# ----------------------------------------------------------------------------- measuring

def _status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def reset_rss_peak():
    """Start a new peak of the process's resident memory (Linux); returns the current RSS in MiB, after giving
    freed heap memory back to the system, so that growth over it is what the measured code holds."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS (VmHWM) starts again from the current RSS
    return _status_mb("VmRSS")


def rss_peak_mb():
    return _status_mb("VmHWM")


def peak_memory_mb(device):
    """The peak so far: CUDA's allocator peak on GPU; on CPU the process's peak RSS (since the last
    reset_rss_peak, where Linux allows resetting it)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        return rss_peak_mb()
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class TensorPeak(TorchDispatchMode):
    """Peak bytes of live tensor storage on CPU, counted at the dispatcher: the figure torch.cuda's
    max_memory_allocated gives on GPU (tensors only: neither the allocator's slack nor the runtime's own memory).
    `resident` tensors (weights, optimizer state) count from the start; each new storage counts until freed."""

    def __init__(self, resident=()):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0
        for t in resident:
            self._add(t)

    def _add(self, t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.live or st.nbytes() == 0:
            return
        self.live[key] = st.nbytes()
        self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._free, key)  # fires when the storage itself is freed

    def _free(self, key):
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and type(t) is torch.Tensor:
                self._add(t)
        return out


class PeakMeter:
    """The peak memory of the steps run between start() and stop(), in bytes: CUDA's allocator peak, or on CPU a
    TensorPeak seeded with the model's and the optimizer's tensors; plus the process's peak RSS on CPU."""

    def __init__(self, device, model, optimizer):
        self.cuda = str(device).startswith("cuda")
        self.tensors = [t for t in (*model.parameters(), *model.buffers()) if type(t.data) is torch.Tensor]
        self.tensors += [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        self.mode = None

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.rss0 = reset_rss_peak()
            self.mode = TensorPeak(self.tensors)
            self.mode.__enter__()
        return self

    def stop(self):
        if self.cuda:
            return torch.cuda.max_memory_allocated(), None
        self.mode.__exit__(None, None, None)
        return self.mode.peak, (rss_peak_mb() - self.rss0) * MiB


# ----------------------------------------------------------------------------- FSDP2

def shard_model(model, world, device):
    """fully_shard each block, then the root (embeddings, final norm, the tied head), over all processes.
    Rank 0's weights are broadcast first (as DDP does): each process may have drawn its own initialisation."""
    from torch.distributed import broadcast
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    with torch.no_grad():
        for t in model.state_dict().values():
            broadcast(t, 0)
    mesh = init_device_mesh(str(device).split(":")[0], (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _param_names(model, optimizer):
    """Each optimizer parameter's name, in the order torch numbers them in optimizer.state_dict()."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_state_dicts(model, optimizer):
    """(model, optimizer) state dicts of a sharded model in the single-process format, on CPU; a collective that
    every process enters; the dicts are complete on rank 0 (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    msd = full_model_state(model)
    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not osd:
        return msd, osd
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    groups = [{**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()},  # betas come back as lists
               "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return msd, dict(state={index[n]: s for n, s in osd["state"].items()}, param_groups=groups)


def full_model_state(model):
    """A sharded model's full state dict on rank 0 (CPU); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, osd):
    """Load a single-process optimizer state dict (every process holds it whole) into a sharded model's
    optimizer: keys become parameter names, and each process keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = _param_names(model, optimizer)
    if len(names) != sum(len(g["params"]) for g in osd["param_groups"]):
        raise ValueError(f"the saved optimizer state has {sum(len(g['params']) for g in osd['param_groups'])} "
                         f"parameters, this model {len(names)}")
    by_name = dict(state={names[i]: s for i, s in osd["state"].items()},
                   param_groups=[{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]])
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def unsharded_copy(model_cls, config, full_sd, device):
    """A plain (unsharded) model from full_state_dicts()' model dict, for rank 0's evaluation and generation."""
    model = model_cls(config)
    model.load_state_dict(full_sd)
    return model.to(device)


@contextmanager
def grad_sync(model, sync):
    """Reduce gradients across processes only when `sync` (the last micro-batch of a step): DDP's no_sync(), or
    FSDP2's set_requires_gradient_sync(); nothing to do on one process."""
    if sync or not hasattr(model, "no_sync") and not hasattr(model, "set_requires_gradient_sync"):
        yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield



PLAN_STEPS = 3  # steps --plan runs and measures


def report_plan(meter, est, verbose=True):
    """Stop `meter` and print its peak next to the estimate; returns the measured peak in bytes."""
    tensors, rss = meter.stop()
    if verbose:
        extra = f"; the process's resident memory grew by {mib(rss)} MiB (tensors and allocator slack)" \
            if rss is not None else ""
        print(f"memory check over {PLAN_STEPS} steps: measured peak {mib(tensors)} MiB of tensors, estimated "
              f"{mib(est['peak'])} MiB ({100 * (est['peak'] / tensors - 1):+.1f}%){extra}", flush=True)
    return tensors
