"""bench.py: speed and memory, ours against the obvious baseline, measured side by side in one run.

    python bench.py                      # every section that applies to this machine
    python bench.py generate matmul      # some sections
    python bench.py --json bench.json    # also write the figures as JSON

Ideas it rests on:
- every figure is a median over timed repeats after an untimed warm-up (CUDA events on GPU);
- ours and the baseline run in the same process, on the same inputs, and the table prints their ratio;
- the device, torch and triton versions are printed (and saved) with the figures.
"""
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch

import runtime
from config import BENCH_SHAPES, BenchConfig, TrainConfig, UserError, cli
from files import atomic_write

SECTIONS = {}  # name -> function(args) -> list of row dicts
USES = {}  # name -> the flags among SECTION_FLAGS that the section reads
SECTION_FLAGS = ("shape", "dtype", "init_from")  # flags that only some sections read


def section(name, uses=()):
    """Register a section under `name`; `uses` names the flags of SECTION_FLAGS it reads."""
    def register(fn):
        SECTIONS[name] = fn
        USES[name] = set(uses)
        return fn
    return register


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def alternating_medians(fns, device="cpu", rounds=5, warmup=1):
    """{name: median seconds per call} of each fn in the dict, timed in alternating rounds after `warmup`
    untimed rounds, so that a machine whose speed drifts (a shared VM) weighs on each alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(median_time(fn, device, warmup=0, iters=1))
    return {k: statistics.median(v) for k, v in times.items()}


def measure_peak(fn, device, resident=(), total=False):
    """(peak MiB of tensors during one call of fn, peak RSS growth in MiB or None): over the tensors live
    before the call, or with total=True including them; the CUDA allocator's figures, or on CPU live tensors
    counted at the dispatcher (memory.TensorPeak, seeded with `resident`) and the growth of the process's RSS."""
    import memory
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        base = 0 if total else torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20, None
    rss0 = memory.reset_rss_peak()
    with memory.TensorPeak(resident) as tp:
        start = 0 if total else tp.now
        fn()
    return (tp.peak - start) / 2 ** 20, memory.rss_peak_mb() - rss0


def median_time(fn, device="cpu", warmup=2, iters=5):
    """Median wall time of fn() in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if str(device).startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def row(section_name, name, ours, baseline=None, unit="", higher_is_better=True, **extra):
    """One line of the table. ratio > 1 always means ours is better than the baseline."""
    ratio = None
    if baseline is not None and ours is not None and ours > 0 and baseline > 0:
        ratio = ours / baseline if higher_is_better else baseline / ours
    return dict(section=section_name, name=name, ours=ours, baseline=baseline, unit=unit,
                ratio=ratio, **extra)


def environment():
    env = dict(python=platform.python_version(), torch=torch.__version__,
               device="cpu", threads=torch.get_num_threads(), machine=platform.machine())
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(rows):
    head = ["section", "name", "ours", "baseline", "unit", "ratio"]
    cells = [[fmt(r.get(h)) for h in head] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for c in cells:
        print("  ".join(x.ljust(w) for x, w in zip(c, widths)))
        sys.stdout.flush()


def main(argv=None):
    return cli(BenchConfig, run, argv)


def run(args, explicit=()):
    """Every section asked for (default: all), measured and printed; the rows, also to --json."""
    names = [s for s in args.sections.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise UserError(f"--sections: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    refuse_unused_flags(args, names, explicit)
    args.device = runtime.pick_device(args.device) if args.device != "auto" else \
        ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = runtime.resolve_dtype(args.device, args.dtype)
    env = dict(environment(), dtype=args.dtype)
    args.model = None
    if args.init_from:  # loaded (and checked) once, before any section runs
        from checkpoint import load_model
        args.model = load_model(args.init_from)[0]
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    rows = []
    for name in names:
        new = SECTIONS[name](args)
        print_table(new)
        print()
        rows += new
    if args.json:
        atomic_write(args.json, lambda f: json.dump(dict(env=env, rows=rows), f, indent=1), "w")
    return rows


def refuse_unused_flags(args, names, explicit):
    """A UserError for a flag given (on the command line or in --config) that no section asked for reads: it
    would be silently ignored. --quick times tiny stand-in shapes, so it leaves --shape unread too."""
    for flag in SECTION_FLAGS:
        if flag not in explicit:
            continue
        readers = [s for s in SECTIONS if flag in USES[s]]
        if flag == "shape" and args.quick and any(s in readers for s in names):
            raise UserError(f"--shape {args.shape}: --quick times tiny stand-in shapes, not --shape; drop --quick "
                            f"to time {args.shape} (slow on CPU), or drop --shape")
        if not any(s in readers for s in names):
            raise UserError(f"--{flag} is read only by {', '.join(readers)}; the sections asked for "
                            f"({', '.join(names)}) ignore it: drop --{flag} or add one of those")


# ----------------------------------------------------------------------------- sections
# Each section registers itself with @section("name", uses=(flags of SECTION_FLAGS it reads)) and returns rows
# made by row().
# (sections are added below by the modules' issues: train, generate, matmul, adam, ...)


def default_model_config(vocab_size=259):
    """The model `python train.py` trains (its TrainConfig defaults), for a byte-level vocabulary."""
    from model import GPTConfig
    d = TrainConfig()
    return GPTConfig(block_size=d.block_size, vocab_size=vocab_size, n_layer=d.n_layer, n_head=d.n_head,
                     n_embd=d.n_embd, rope_heads=d.rope_heads, bias=d.bias), d.batch_size


def real_shape(name, block_size):
    """GPTConfig of a real model's shape (random weights): gpt2-small, or SmolLM2-135M and Qwen2.5-0.5B as their
    config.json describe them (RMSNorm, SwiGLU, grouped-query attention, rope on every head, tied embeddings)."""
    from model import GPTConfig
    llama = dict(norm="rmsnorm", mlp="swiglu", learned_pos=False, bias=False)
    shapes = {
        "gpt2-small": dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768),
        "smollm2-135m": dict(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                             rope_heads=9, rope_base=100000.0, **llama),
        "qwen2.5-0.5b": dict(vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, n_embd=896,
                             intermediate_size=4864, rope_heads=14, rope_base=1000000.0, norm_eps=1e-6, qkv_bias=True,
                             **llama),
    }
    return GPTConfig(block_size=block_size, **shapes[name])


SHAPES = BENCH_SHAPES  # (config.py holds the names: --shape is checked with the other flags)
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def train_step(model, opt, x, ctx):
    """One training step on x (its own targets): forward under ctx, backward, update, clear the gradients."""
    def step():
        with ctx:
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


@section("train", uses=("shape", "dtype"))
def bench_train(args):
    """Training throughput and peak memory: one AdamW step (forward, backward, update) on random tokens, in the
    precision of --dtype (auto: what train.py picks here, bf16 autocast on CUDA and on CPUs with native bf16)
    against the same step in fp32, in alternating rounds; on the default model and a real shape (--shape: GPT-2
    small at 1024 tokens a row, or SmolLM2-135M / Qwen2.5-0.5B at 256)."""
    from model import GPTConfig
    cuda = args.device.startswith("cuda")
    default, default_batch = default_model_config()
    shape = real_shape(args.shape, 1024 if args.shape == "gpt2-small" else 256)
    if args.quick:  # (tiny: CPUs without native bf16 emulate it some 10-50x slower than fp32)
        default.block_size, default_batch = 64, 4
        shape = GPTConfig(block_size=64, vocab_size=2048, n_layer=2, n_head=4, n_embd=128)
    configs = [("default", default, default_batch),
               (args.shape if not args.quick else "gpt2-tiny", shape, 8 if cuda else 1)]
    rows = []
    for name, cfg, batch in configs:
        rows += _train_rows(args, name, cfg, batch)
    return rows


def _train_rows(args, name, cfg, batch):
    import memory
    from model import GPT
    torch.manual_seed(0)
    model = GPT(cfg).to(args.device)
    cuda, dtype = args.device.startswith("cuda"), args.dtype
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=args.device)
    rounds = 10 if cuda else 2 if args.quick or name != "default" else 7
    steps = {dtype: train_step(model, opt, x, runtime.autocast(args.device, dtype))}
    steps[dtype]()  # (the optimizer's state is made here)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        memory.reset_rss_peak()
    steps[dtype]()
    peak = memory.peak_memory_mb(args.device)  # ours alone (on CPU the process's peak RSS since the reset)
    if dtype != "float32":
        steps["float32"] = train_step(model, opt, x, contextlib.nullcontext())
    t = alternating_medians(steps, args.device, rounds, warmup=int(dtype != "float32"))
    tps = batch * cfg.block_size / t[dtype]
    t32 = t.get("float32") if dtype != "float32" else None
    mfu = model.estimate_mfu(tps, cfg.block_size, args.device)
    shape = f"{model.get_num_params() / 1e6:.1f}M params, {batch}x{cfg.block_size} tokens"
    what = f"{dtype} vs float32" if t32 else dtype
    return [row("train", f"{name} throughput, {what} ({shape})", tps, batch * cfg.block_size / t32 if t32 else None,
                unit="tok/s", mfu=mfu, ms_per_step=1e3 * t[dtype]),
            row("train", f"{name} peak memory, {dtype}", peak, unit="MiB", higher_is_better=False,
                measured="CUDA allocator peak" if cuda else "peak RSS of the process")]


@section("generate", uses=("init_from",))
def bench_generate(args):
    """Tokens/s of generate() with the KV cache against the same model recomputing the whole prefix each step: the
    default model's shape, or with --init_from any checkpoint the project writes (within its block_size)."""
    from model import GPT
    new, prompt_len = (64 if args.quick else 256), 16
    if args.model is not None:
        model = args.model.to(args.device).eval()
        cfg = model.config
        new = min(new, cfg.block_size - prompt_len)
        if new < 1:
            return [row("generate", f"skipped: block_size {cfg.block_size} leaves no room after {prompt_len} tokens",
                        None)]
    else:
        cfg, _ = default_model_config()
        # the default model's shape; its position table grows to hold 16 + 256 tokens when block_size is shorter
        cfg.block_size = max(cfg.block_size, prompt_len + new)
        torch.manual_seed(0)
        model = GPT(cfg).to(args.device).eval()
    rows = []
    for batch in ((1, 4) if args.quick else (1, 16)):
        x = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=args.device)
        cached = median_time(lambda: model.generate(x, new, temperature=0), args.device, warmup=1, iters=3)
        full = median_time(lambda: model.generate(x, new, temperature=0, use_cache=False), args.device,
                           warmup=1, iters=3)
        rows.append(row("generate", f"KV cache vs recompute, batch {batch}, {new} new tokens", batch * new / cached,
                        batch * new / full, unit="tok/s"))
    return rows


def _int4_weight(N, K, group_size, device, nf4=False):
    """A random packed weight as int4_matmul takes it: (packed, scales, zeros), zeros None for NF4 (and its lut)."""
    import kernels
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=device)
    scales = 0.01 + 0.04 * torch.rand(N, K // group_size, device=device)
    zeros = None if nf4 else 15 * torch.rand(N, K // group_size, device=device)
    return kernels.pack_int4(q), scales, zeros


def _rotating(tensors, device):
    """Enough copies of `tensors` to overflow L2 four times, cycled, so each timed call reads its weights from
    memory as a real model's layers do (8192x8192 int4 weights would otherwise sit in an H200's L2)."""
    import itertools
    nbytes = sum(t.nbytes for t in tensors if t is not None)
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    copy = lambda: tuple(None if t is None else t.clone() for t in tensors)
    copies = [tensors] + [copy() for _ in range(-(-4 * l2 // nbytes) - 1)]
    return itertools.cycle(copies)


def _copy_bandwidth(device, nbytes=1 << 30):
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * nbytes / median_time(lambda: b.copy_(a), device, warmup=3, iters=10) / 1e9  # read + write


# the matmul section's figures on CUDA; args may override each (scripts/gpu_check.py sets them)
MATMUL_SHAPES = ((4096, 4096), (8192, 8192))  # (N, K)
MATMUL_MS = (1, 16, 128, 4096)
MATMUL_GROUPS = (64, 128)
MATMUL_FORMATS = ("int4", "nf4")


def _matmul_options(args):
    quick = args.quick
    return (getattr(args, "matmul_shapes", None) or (MATMUL_SHAPES[:1] if quick else MATMUL_SHAPES),
            getattr(args, "matmul_ms", None) or ((1, 16, 4096) if quick else MATMUL_MS),
            getattr(args, "matmul_groups", None) or ((128,) if quick else MATMUL_GROUPS),
            getattr(args, "matmul_formats", None) or MATMUL_FORMATS)


def _bench_matmul_cpu(s):
    import kernels
    M, N, K, g = 4, 512, 512, 128
    packed, scales, zeros = _int4_weight(N, K, g, "cpu")
    w = kernels.dequantize_int4(packed, scales, zeros, g)
    x = torch.randn(M, K)
    ours = median_time(lambda: kernels.int4_matmul(x, packed, scales, zeros, g, backend="torch"))
    dense = median_time(lambda: x @ w.T)
    return [row(s, "cpu: reference only; Triton kernels need CUDA for timing", ours * 1e3, dense * 1e3, "ms",
                higher_is_better=False, M=M, N=N, K=K, group_size=g)]


def _bench_matmul_weight(s, dev, N, K, g, fmt, ms, copy_gbs, timing):
    """Rows for one weight: int4_matmul at each M against the bf16 matmul and dequantize-then-matmul, with the
    bytes moved (weights, x and y) per second as a share of the device's copy bandwidth; dX at the largest M."""
    import kernels
    import quant
    lut = quant.NF4_LEVELS.to(dev) if fmt == "nf4" else None
    int4 = _rotating(_int4_weight(N, K, g, dev, nf4=lut is not None), dev)
    dense = _rotating((kernels.dequantize_int4(*next(int4), g, torch.bfloat16, lut=lut),), dev)
    wbytes = sum(t.nbytes for t in next(int4) if t is not None)
    ours = lambda x: kernels.int4_matmul(x, *next(int4), g, backend="triton", lut=lut)
    rows, what = [], dict(N=N, K=K, group_size=g, format=fmt)
    for M in ms:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        t = median_time(lambda: ours(x), dev, *timing)
        t_bf16 = median_time(lambda: x @ next(dense)[0].T, dev, *timing)
        t_deq = median_time(lambda: x @ kernels.dequantize_int4(*next(int4), g, torch.bfloat16, lut=lut).T,
                            dev, *timing)
        moved = wbytes + x.nbytes + 2 * M * N
        extra = dict(M=M, tflops=2 * M * N * K / t / 1e12, gbs=moved / t / 1e9,
                     pct_copy_bw=100 * moved / t / 1e9 / copy_gbs, **what)
        name = f"M={M} {N}x{K} {fmt} g{g}"
        rows.append(row(s, f"{name} vs bf16 matmul", t * 1e3, t_bf16 * 1e3, "ms", higher_is_better=False, **extra))
        rows.append(row(s, f"{name} vs dequantize+matmul", t * 1e3, t_deq * 1e3, "ms", higher_is_better=False,
                        M=M, **what))
    M = max(ms)  # the backward dX = dY @ W, against the bf16 matmul it replaces
    dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    t = median_time(lambda: kernels.int4_matmul_dx_triton(dy, *next(int4), g, lut=lut), dev, *timing)
    t_bf16 = median_time(lambda: dy @ next(dense)[0], dev, *timing)
    rows.append(row(s, f"dX M={M} {N}x{K} {fmt} g{g} vs bf16 matmul", t * 1e3, t_bf16 * 1e3, "ms",
                    higher_is_better=False, M=M, tflops=2 * M * N * K / t / 1e12, **what))
    return rows


@section("matmul")
def bench_matmul(args):
    """int4 and NF4 weight-only matmul (kernels.int4_matmul, groups 64 and 128) vs bf16 torch.matmul and
    dequantize-then-matmul, and its dX backward; bytes per second as a share of a device-to-device copy."""
    s, dev = "matmul", args.device
    if not str(dev).startswith("cuda"):
        return _bench_matmul_cpu(s)
    timing = (3, 5) if args.quick else (10, 50)  # the first call autotunes, inside the untimed warm-up
    copy_gbs = _copy_bandwidth(dev)
    rows = [row(s, "device copy bandwidth (read + write)", copy_gbs, unit="GB/s")]
    shapes, ms, groups, formats = _matmul_options(args)
    for N, K in shapes:
        for fmt in formats:
            for g in groups:
                rows += _bench_matmul_weight(s, dev, N, K, g, fmt, ms, copy_gbs, timing)
    return rows


@section("qat", uses=("dtype",))
def bench_qat(args):
    """QAT overhead: a training step (forward, backward, AdamW) with fake-quant linears against the float step on
    the same model and batch; the steps alternate, so drift on a shared machine hits both alike."""
    import copy
    import quant
    from model import GPT
    cfg, batch = default_model_config()
    specs = ("w4g32", "w4a8g32", "w4g32-lsq")
    if args.quick:
        cfg.n_layer, cfg.block_size, batch, specs = 1, 64, 4, ("w4g32",)
    ctx = runtime.autocast(args.device, args.dtype)
    torch.manual_seed(0)
    base = GPT(cfg).to(args.device)
    models = {"float": base, **{s: quant.quantize_(copy.deepcopy(base), s) for s in specs}}
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=args.device)

    steps = {k: train_step(m, torch.optim.AdamW(m.parameters(), lr=1e-4), x, ctx) for k, m in models.items()}
    times = alternating_medians(steps, args.device, 3 if args.quick else 10)
    t_float = times["float"]
    rows = []
    for s in specs:
        t = times[s]
        rows.append(row("qat", f"{s} fake-quant step vs float step ({batch}x{cfg.block_size} tokens)", 1e3 * t,
                        1e3 * t_float, "ms", higher_is_better=False, overhead=t / t_float))
    return rows


@section("lora", uses=("shape", "dtype"))
def bench_lora(args):
    """Fine-tuning memory and speed on a real model's shape (--shape: GPT-2 small by default, SmolLM2-135M or
    Qwen2.5-0.5B; random weights) at short rows (1 x 128 tokens on CPU, 8 x 128 on CUDA): full fine-tuning with fp32 AdamW, LoRA (rank 16 on every block linear) on
    the frozen float model, QLoRA (the same adapters on an nf4g64 base) with fp32 AdamW, and QLoRA with
    optim.AdamW8bit. Memory is one training step's peak of live tensors, resident ones (weights, buffers,
    optimizer state) included: the CUDA allocator's, or on CPU counted at the dispatcher (memory.TensorPeak); on
    CPU the growth of the process's peak RSS during the step over its RSS before it is reported beside it
    (rss_growth_mib: gradients, activations and temporaries; all four models live in the one process, so the
    total RSS is not per variant). Step times are medians of steps that alternate between the variants."""
    import lora
    import optim
    from model import GPT, GPTConfig
    dev, cuda, s = args.device, args.device.startswith("cuda"), "lora"
    cfg, batch, rank, rounds = real_shape(args.shape, 128), (8 if cuda else 1), 16, (5 if cuda else 3)
    if args.quick:
        cfg, rank, rounds = GPTConfig(block_size=32, vocab_size=512, n_layer=1, n_head=2, n_embd=64), 4, 1
    ctx = runtime.autocast(dev, args.dtype)
    gen = torch.Generator(dev).manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=dev, generator=gen)

    def build(base, opt_cls):
        torch.manual_seed(0)
        model = GPT(cfg).to(dev)
        if base:
            targets = lora.DEFAULT_TARGETS if cfg.mlp == "gelu" else LLAMA_LINEARS
            lora.add_lora_(model, rank, 2.0 * rank, targets=targets, base=base)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, opt_cls(params, lr=1e-4) if opt_cls is optim.AdamW8bit else opt_cls(params, lr=1e-4, fused=True)
    variants = {"full FT, fp32 AdamW": build(None, torch.optim.AdamW),
                "LoRA, float base, fp32 AdamW": build("float", torch.optim.AdamW),
                "QLoRA nf4g64, fp32 AdamW": build("nf4g64", torch.optim.AdamW),
                "QLoRA nf4g64, AdamW8bit": build("nf4g64", optim.AdamW8bit)}
    steps = {k: train_step(m, o, x, ctx) for k, (m, o) in variants.items()}
    peaks = {}
    for k, (model, opt) in variants.items():
        steps[k]()  # the optimizer's state exists from here on
        resident = [*model.parameters(), *model.buffers(),
                    *(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t))]
        peaks[k] = measure_peak(steps[k], dev, resident, total=True)
    ms = {k: 1e3 * t for k, t in alternating_medians(steps, dev, rounds, warmup=0).items()}
    full = "full FT, fp32 AdamW"
    n_params = sum(p.numel() for p in variants[full][0].parameters())
    shape = f"{n_params / 1e6:.0f}M params, {batch}x{cfg.block_size} tokens, rank {rank}"
    measured = "CUDA allocator peak" if cuda else "peak of live tensors (memory.TensorPeak)"
    rows = []
    for k in variants:
        if k != full:
            rows.append(row(s, f"peak training memory, {k} vs full FT" + (f" ({shape})" if not rows else ""),
                            peaks[k][0], peaks[full][0], "MiB", higher_is_better=False, measured=measured,
                            rss_growth_mib=peaks[k][1], full_rss_growth_mib=peaks[full][1],
                            trainable=lora.trainable_parameters(variants[k][0])))
    for k in variants:
        if k != full:
            rows.append(row(s, f"step time, {k} vs full FT", ms[k], ms[full], "ms", higher_is_better=False))
    return rows


@section("memory", uses=("shape", "dtype"))
def bench_memory(args):
    """Activation checkpointing and the chunked loss, on and off in the same run, for a real model's shape
    (--shape: GPT-2 small by default) at 1024 tokens a row: one training step's peak memory and tokens/s for each option, then the two
    parts they shrink, measured alone: the loss step (lm_head + cross-entropy, forward and backward) and the
    blocks' activation memory (the peak of a forward and backward over weights, gradients and optimizer state,
    with gradients already allocated and the tied embedding frozen, so what is left is activations). Memory is
    the peak of live tensors over those already resident (measure_peak); on CPU the growth of the process's peak
    RSS is reported beside it (rss_mib). Times are medians of steps that alternate between the options."""
    from model import GPT, GPTConfig
    cuda = args.device.startswith("cuda")
    cfg = real_shape(args.shape, 1024)
    batch, rounds = (8 if cuda else 1), (5 if cuda else 2)
    if args.quick:
        cfg, rounds = GPTConfig(block_size=256, vocab_size=8192, n_layer=2, n_head=4, n_embd=128), 1
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=args.device)
    model = GPT(cfg).to(args.device)
    opts = dict(device=args.device, ctx=runtime.autocast(args.device, args.dtype), rounds=rounds)
    return (_memory_step_rows(model, x, **opts) + _memory_loss_rows(model, x, **opts)
            + _memory_trunk_rows(model, x, **opts))


def _memory_step_rows(model, x, device, ctx, rounds):
    """A training step as train.py takes it, with each option."""
    from kernels import linear_cross_entropy
    c = model.config
    shape = f"{c.n_layer}x{c.n_embd}, vocab {c.vocab_size}, {x.shape[0]}x{x.shape[1]} tokens"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step_with(every, chunked):
        def step():
            model.grad_ckpt_every = every
            with ctx:
                loss = model(x, x, loss_fn=linear_cross_entropy if chunked else None)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    options = {"plain": (0, False), "grad_ckpt": (1, False), "chunked_loss": (0, True), "both": (1, True)}
    steps = {k: step_with(*v) for k, v in options.items()}
    steps["plain"]()  # the optimizer's state exists from here on
    resident = [*model.parameters(), *(t for st in opt.state.values() for t in st.values())]
    peaks = {k: measure_peak(fn, device, resident) for k, fn in steps.items()}
    times = alternating_medians(steps, device, rounds)
    rows = []
    for k in ("grad_ckpt", "chunked_loss", "both"):
        rows.append(row("memory", f"train step peak memory, {k} vs plain ({shape})", peaks[k][0],
                        peaks["plain"][0], "MiB", higher_is_better=False, rss_mib=peaks[k][1],
                        plain_rss_mib=peaks["plain"][1]))
        rows.append(row("memory", f"train step tokens/s, {k} vs plain", x.numel() / times[k],
                        x.numel() / times["plain"], "tok/s", step_time_ratio=times[k] / times["plain"]))
    opt.state.clear()  # its memory is not needed below
    model.grad_ckpt_every = 0
    return rows


def _memory_loss_rows(model, x, device, ctx, rounds):
    """The loss step alone: lm_head + cross-entropy on the final hidden states, forward and backward."""
    import torch.nn.functional as F
    from kernels import linear_cross_entropy
    w, t = model.lm_head.weight, x.view(-1)
    h = torch.randn(x.numel(), model.config.n_embd, device=device, requires_grad=True)

    def loss_step(chunked):
        def step():
            w.grad = h.grad = None
            with ctx:
                loss = linear_cross_entropy(h, w, t) if chunked else F.cross_entropy(F.linear(h, w).float(), t)
            loss.backward()
            w.grad = h.grad = None
        return step
    steps = {"full": loss_step(False), "chunked": loss_step(True)}
    peaks = {k: measure_peak(fn, device, [*model.parameters(), h]) for k, fn in steps.items()}
    times = alternating_medians(steps, device, rounds)
    return [row("memory", f"loss step peak memory, chunked vs full logits ({x.numel()} x {model.config.vocab_size})",
                peaks["chunked"][0], peaks["full"][0], "MiB", higher_is_better=False, rss_mib=peaks["chunked"][1],
                full_rss_mib=peaks["full"][1]),
            row("memory", "loss step time, chunked vs full logits", 1e3 * times["chunked"], 1e3 * times["full"],
                "ms", higher_is_better=False)]


def _memory_trunk_rows(model, x, device, ctx, rounds):
    """The blocks' activations: gradients kept allocated, embedding frozen, a fixed gradient on the hidden states."""
    model.lm_head.weight.requires_grad_(False)
    g = torch.randn(*x.shape, model.config.n_embd, device=device)

    def trunk_step(every):
        def step():
            model.grad_ckpt_every = every
            with ctx:
                model(x, x, loss_fn=lambda hidden, weight, targets: (hidden.float() * g).sum())[1].backward()
        return step
    steps = {"plain": trunk_step(0), "grad_ckpt": trunk_step(1)}
    steps["plain"]()  # allocates the gradients, which stay
    resident = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None)]
    peaks = {k: measure_peak(fn, device, resident) for k, fn in steps.items()}
    times = alternating_medians(steps, device, rounds)
    return [row("memory", f"activation memory of the {model.config.n_layer} blocks, grad_ckpt vs plain",
                peaks["grad_ckpt"][0], peaks["plain"][0], "MiB", higher_is_better=False,
                rss_mib=peaks["grad_ckpt"][1], plain_rss_mib=peaks["plain"][1]),
            row("memory", "blocks forward + backward time, grad_ckpt vs plain", 1e3 * times["grad_ckpt"],
                1e3 * times["plain"], "ms", higher_is_better=False)]


@section("adam")
def bench_adam(args):
    """optim.AdamW8bit against torch.optim.AdamW (foreach and fused) on the same 25M-parameter set (an 8192x1024
    embedding and 16 Linear(1024, 1024)), and on CUDA also a 1.07B set (32 x 8192x4096) against fused: median
    step time (the optimizers' steps alternate, so drift on a shared machine hits all alike), state bytes per
    parameter, and the memory the step itself adds, i.e. its peak over what was resident before it (CUDA
    allocator; on CPU the process's peak RSS over its RSS), also in units of the largest tensor's fp32 size."""
    cuda = args.device.startswith("cuda")
    sets = [("25M", [(8192, 1024)] + [(1024, 1024), (1024,)] * 16, ("foreach", "fused"))]
    if args.quick:
        sets = [("quick", [(1024, 256)] + [(256, 256), (256,)] * 4, ("foreach", "fused"))]
    elif cuda:
        sets.append(("1B", [(8192, 4096)] * 32, ("fused",)))
    rows = []
    for name, shapes, baselines in sets:
        rows += _bench_adam_set(args, name, shapes, baselines)
    return rows


def _step_growth_mb(fn, device):
    """MiB that one call of fn adds at its peak over what was resident before it: the CUDA allocator's, or on CPU
    the process's peak RSS over its RSS (the compiled CPU step's buffers are not tensors TensorPeak sees)."""
    import memory
    sync(device)
    if str(device).startswith("cuda"):
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    base = memory.reset_rss_peak()
    fn()
    return memory.rss_peak_mb() - base


def _bench_adam_set(args, name, shapes, baselines):
    import optim
    dev, s = args.device, "adam"
    torch.manual_seed(0)
    params = [torch.nn.Parameter((0.02 * torch.randn(shape, device=dev)) if len(shape) > 1 else
                                 torch.zeros(shape, device=dev)) for shape in shapes]
    for p in params:
        p.grad = 1e-3 * torch.randn_like(p)
    n = sum(p.numel() for p in params)
    largest = max(p.numel() for p in params) * 4 / 2 ** 20  # MiB of the largest tensor in fp32
    opts = {"ours": optim.AdamW8bit(params, lr=1e-4)}
    opts.update({k: torch.optim.AdamW(params, lr=1e-4, **{k: True}) for k in baselines})
    first = {}
    for k, opt in opts.items():  # creates the state (and on CPU compiles ours' one-pass step, once per process)
        first[k] = median_time(opt.step, dev, warmup=0, iters=1)
    growth = {k: _step_growth_mb(opt.step, dev) for k, opt in opts.items()}
    times = alternating_medians({k: opt.step for k, opt in opts.items()}, dev, 2 if args.quick else 7, warmup=0)
    ms = {k: 1e3 * t for k, t in times.items()}
    state = {k: sum(t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t)) / n
             for k, opt in opts.items()}
    shape = f"{n / 1e6:.1f}M params in {len(params)} tensors"
    rows = [row(s, f"{name}: step time vs AdamW {k}" + (f" ({shape})" if i == 0 else ""), ms["ours"], ms[k], "ms",
                higher_is_better=False) for i, k in enumerate(baselines)]
    rows.append(row(s, f"{name}: first step (state creation, compile) vs AdamW {baselines[0]}", 1e3 * first["ours"],
                    1e3 * first[baselines[0]], "ms", higher_is_better=False))
    rows.append(row(s, f"{name}: state bytes per parameter vs AdamW", state["ours"], state[baselines[0]], "B/param",
                    higher_is_better=False))
    for k in baselines:
        rows.append(row(s, f"{name}: memory added by a step vs AdamW {k}", growth["ours"], growth[k], "MiB",
                        higher_is_better=False, largest_tensor_copies=growth["ours"] / largest,
                        baseline_largest_tensor_copies=growth[k] / largest,
                        measured="CUDA allocator" if dev.startswith("cuda") else "peak RSS over RSS"))
    del opts, params
    return rows


if __name__ == "__main__":
    main()
