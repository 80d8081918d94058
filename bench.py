"""bench.py: speed and memory, ours against the obvious baseline, measured side by side in one run.

    python bench.py                      # every section that applies to this machine
    python bench.py generate matmul      # some sections
    python bench.py --json bench.json    # also write the figures as JSON

Ideas it rests on:
- every figure is a median over timed repeats after an untimed warm-up (CUDA events on GPU);
- ours and the baseline run in the same process, on the same inputs, and the table prints their ratio;
- the device, torch and triton versions are printed (and saved) with the figures.
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch

SECTIONS = {}  # name -> function(args) -> list of row dicts


def section(name):
    def register(fn):
        SECTIONS[name] = fn
        return fn
    return register


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_times(fns, device="cpu", warmup=1, iters=5):
    """Median wall time of each of fns, timed in alternating rounds so that a machine whose speed drifts (a shared
    VM) weighs on each alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    rounds = [[median_time(fn, device, warmup=0, iters=1) for fn in fns] for _ in range(iters)]
    return [statistics.median(r[i] for r in rounds) for i in range(len(fns))]


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sections", nargs="*", help=f"which sections (default: all): {', '.join(SECTIONS)}")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats (for tests)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    env = environment()
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    rows = []
    for name in args.sections or list(SECTIONS):
        new = SECTIONS[name](args)
        print_table(new)
        print()
        rows += new
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
    return rows


# ----------------------------------------------------------------------------- sections
# Each section registers itself with @section("name") and returns rows made by row().
# (sections are added below by the modules' issues: train, generate, matmul, adam, ...)


def reset_peak_memory(device):
    """Start a new peak: CUDA allocator statistics on GPU, the process's peak RSS (VmHWM) on Linux CPUs."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS


def peak_memory_mb(device):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def default_model_config(vocab_size=259):
    """The model `python train.py` trains (its TrainConfig defaults), for a byte-level vocabulary."""
    from model import GPTConfig
    from train import TrainConfig
    d = TrainConfig()
    return GPTConfig(block_size=d.block_size, vocab_size=vocab_size, n_layer=d.n_layer, n_head=d.n_head,
                     n_embd=d.n_embd, rope_heads=d.rope_heads, bias=d.bias), d.batch_size


def train_step(model, opt, x, ctx):
    """One training step on x (its own targets): forward under ctx, backward, update, clear the gradients."""
    def step():
        with ctx:
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


@section("train")
def bench_train(args):
    """Training throughput and peak memory: one AdamW step (forward, backward, update) on random tokens, in the
    precision train.py's `--dtype auto` picks here (bf16 autocast on CUDA and on AMX CPUs) against fp32."""
    from model import GPT, GPTConfig
    from train import autocast_for
    cuda = args.device.startswith("cuda")
    default, default_batch = default_model_config()
    gpt2 = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768)
    if args.quick:
        gpt2 = GPTConfig(block_size=128, vocab_size=50304, n_layer=2, n_head=12, n_embd=768)
    configs = [("default", default, default_batch), ("gpt2-small" if not args.quick else "gpt2-small-2layer",
                                                     gpt2, 8 if cuda else 1)]
    ctx, dtype_name = autocast_for(args.device, "auto", cpu_bf16=True)
    rows = []
    for name, cfg, batch in configs:
        torch.manual_seed(0)
        model = GPT(cfg).to(args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=args.device)
        iters = 10 if cuda else 2 if args.quick or name != "default" else 7
        step = train_step(model, opt, x, ctx)
        step()  # (the optimizer's state is made here)
        reset_peak_memory(args.device)
        step()
        peak = peak_memory_mb(args.device)  # ours alone (on CPU the process's peak so far)
        if dtype_name == "float32":
            t, t32 = median_time(step, args.device, warmup=0, iters=iters), None
        else:  # against the same step in fp32, in alternating rounds
            t, t32 = median_times([step, train_step(model, opt, x, contextlib.nullcontext())], args.device,
                                  warmup=1, iters=iters)
        tps = batch * cfg.block_size / t
        mfu = model.estimate_mfu(tps, cfg.block_size, args.device)
        shape = f"{model.get_num_params() / 1e6:.1f}M params, {batch}x{cfg.block_size} tokens"
        what = f"{dtype_name} vs float32" if t32 else dtype_name
        rows.append(row("train", f"{name} throughput, {what} ({shape})", tps,
                        batch * cfg.block_size / t32 if t32 else None, unit="tok/s", mfu=mfu, ms_per_step=1e3 * t))
        rows.append(row("train", f"{name} peak memory, {dtype_name}", peak, unit="MiB",
                        higher_is_better=False, measured="CUDA allocator peak" if cuda else "peak RSS of the process"))
        del model, opt
    return rows


@section("generate")
def bench_generate(args):
    """Tokens/s of generate() with the KV cache against the same model recomputing the whole prefix each step."""
    from model import GPT
    cfg, _ = default_model_config()
    new, prompt_len = (64 if args.quick else 256), 16
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


@section("qat")
def bench_qat(args):
    """QAT overhead: a training step (forward, backward, AdamW) with fake-quant linears against the float step on
    the same model and batch; the steps alternate, so drift on a shared machine hits both alike."""
    import copy
    import quant
    from model import GPT
    cfg, batch = default_model_config()
    specs = ("w4g32", "w4a8g32", "w4g32-lsq")
    if args.quick:
        cfg.n_layer, batch, specs = 1, 4, ("w4g32",)
    cuda = args.device.startswith("cuda")
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    torch.manual_seed(0)
    base = GPT(cfg).to(args.device)
    models = {"float": base, **{s: quant.quantize_(copy.deepcopy(base), s) for s in specs}}
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=args.device)

    steps = {k: train_step(m, torch.optim.AdamW(m.parameters(), lr=1e-4), x, ctx) for k, m in models.items()}
    times = {k: [] for k in steps}
    for r in range(1 + (3 if args.quick else 10)):  # round 0 is the untimed warm-up
        for k, step in steps.items():
            t = median_time(step, args.device, warmup=0, iters=1)
            if r:
                times[k].append(t)
    t_float = statistics.median(times["float"])
    rows = []
    for s in specs:
        t = statistics.median(times[s])
        rows.append(row("qat", f"{s} fake-quant step vs float step ({batch}x{cfg.block_size} tokens)", 1e3 * t,
                        1e3 * t_float, "ms", higher_is_better=False, overhead=t / t_float))
    return rows


@section("lora")
def bench_lora(args):
    """Fine-tuning memory and speed on a GPT-2-small-shaped model (12 x 768, vocab 50257) at short rows (1 x 128
    tokens on CPU, 8 x 128 on CUDA): full fine-tuning with fp32 AdamW, LoRA (rank 16 on every block linear) on
    the frozen float model, QLoRA (the same adapters on an nf4g64 base) with fp32 AdamW, and QLoRA with
    optim.AdamW8bit. Memory is one training step's peak of live tensors, resident ones (weights, buffers,
    optimizer state) included: the CUDA allocator's, or on CPU counted at the dispatcher (memory.TensorPeak); on
    CPU the growth of the process's peak RSS during the step over its RSS before it is reported beside it
    (rss_growth_mib: gradients, activations and temporaries; all four models live in the one process, so the
    total RSS is not per variant). Step times are medians of steps that alternate between the variants."""
    import lora
    import memory
    import optim
    from model import GPT, GPTConfig
    dev, cuda, s = args.device, args.device.startswith("cuda"), "lora"
    cfg, batch, rank, rounds = GPTConfig(block_size=128, vocab_size=50257, n_layer=12, n_head=12, n_embd=768), \
        (8 if cuda else 1), 16, (5 if cuda else 3)
    if args.quick:
        cfg, rank, rounds = GPTConfig(block_size=32, vocab_size=512, n_layer=1, n_head=2, n_embd=64), 4, 1
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    gen = torch.Generator(dev).manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=dev, generator=gen)

    def build(base, opt_cls):
        torch.manual_seed(0)
        model = GPT(cfg).to(dev)
        if base:
            lora.add_lora_(model, rank, 2.0 * rank, base=base)
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
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            steps[k]()
            peaks[k] = (torch.cuda.max_memory_allocated() / 2 ** 20, None)
        else:
            rss0 = memory.reset_rss_peak()
            with memory.TensorPeak(resident) as tp:
                steps[k]()
            peaks[k] = (tp.peak / 2 ** 20, memory.rss_peak_mb() - rss0)
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            times[k].append(median_time(fn, dev, warmup=0, iters=1))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
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


@section("memory")
def bench_memory(args):
    """Activation checkpointing and the chunked loss, on and off in the same run, for a GPT-2-small-shaped model at
    1024 tokens a row (vocab 50257): one training step's peak memory and tokens/s for each option, then the two
    parts they shrink, measured alone: the loss step (lm_head + cross-entropy, forward and backward) and the
    blocks' activation memory (the peak of a forward and backward over weights, gradients and optimizer state,
    with gradients already allocated and the tied embedding frozen, so what is left is activations). Memory is
    the peak of live tensors over those already resident: the CUDA allocator's, or on CPU counted at the
    dispatcher (memory.TensorPeak); on CPU the growth of the process's peak RSS is reported beside it (rss_mib).
    Times are medians of steps that alternate between the options, so drift on a shared machine hits all alike."""
    import memory
    from kernels import linear_cross_entropy
    from model import GPT, GPTConfig
    import torch.nn.functional as F
    dev, cuda, s = args.device, args.device.startswith("cuda"), "memory"
    cfg = GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)
    batch, rounds = (8 if cuda else 1), (5 if cuda else 2)
    if args.quick:
        cfg, rounds = GPTConfig(block_size=256, vocab_size=8192, n_layer=2, n_head=4, n_embd=128), 1
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    shape = f"{cfg.n_layer}x{cfg.n_embd}, vocab {cfg.vocab_size}, {batch}x{cfg.block_size} tokens"
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=dev)

    def measure(fn, resident):
        """(peak MiB of tensors over the resident ones, peak RSS growth in MiB on CPU) of one call of fn."""
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            return (torch.cuda.max_memory_allocated() - base) / 2 ** 20, None
        rss0 = memory.reset_rss_peak()
        with memory.TensorPeak(resident) as tp:
            start = tp.now
            fn()
        return (tp.peak - start) / 2 ** 20, memory.rss_peak_mb() - rss0

    def timed(fns):
        """Median seconds per call of each fn, calls alternating; one untimed round first."""
        times = {k: [] for k in fns}
        for r in range(rounds + 1):
            for k, fn in fns.items():
                t = median_time(fn, dev, warmup=0, iters=1)
                if r:
                    times[k].append(t)
        return {k: statistics.median(v) for k, v in times.items()}

    # a training step as train.py takes it, with each option
    options = {"plain": (0, False), "grad_ckpt": (1, False), "chunked_loss": (0, True), "both": (1, True)}
    model = GPT(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def train_step(every, chunked):
        def step():
            model.grad_ckpt_every = every
            with ctx:
                loss = model(x, x, loss_fn=linear_cross_entropy if chunked else None)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    steps = {k: train_step(*v) for k, v in options.items()}
    steps["plain"]()  # the optimizer's state exists from here on
    resident = [*model.parameters(), *(t for st in opt.state.values() for t in st.values())]
    peaks = {k: measure(fn, resident) for k, fn in steps.items()}
    times = timed(steps)
    rows = []
    for k in ("grad_ckpt", "chunked_loss", "both"):
        rows.append(row(s, f"train step peak memory, {k} vs plain ({shape})", peaks[k][0], peaks["plain"][0],
                        "MiB", higher_is_better=False, rss_mib=peaks[k][1], plain_rss_mib=peaks["plain"][1]))
        rows.append(row(s, f"train step tokens/s, {k} vs plain", x.numel() / times[k], x.numel() / times["plain"],
                        "tok/s", step_time_ratio=times[k] / times["plain"]))
    opt.state.clear()  # its memory is not needed below

    # the loss step alone: lm_head + cross-entropy on the final hidden states, forward and backward
    w = model.lm_head.weight
    h = torch.randn(batch * cfg.block_size, cfg.n_embd, device=dev, requires_grad=True)
    t = x.view(-1)

    def loss_step(chunked):
        def step():
            w.grad = h.grad = None
            with ctx:
                loss = linear_cross_entropy(h, w, t) if chunked else F.cross_entropy(F.linear(h, w).float(), t)
            loss.backward()
            w.grad = h.grad = None
        return step
    loss_steps = {"full": loss_step(False), "chunked": loss_step(True)}
    peaks = {k: measure(fn, [*model.parameters(), h]) for k, fn in loss_steps.items()}
    times = timed(loss_steps)
    rows.append(row(s, f"loss step peak memory, chunked vs full logits ({batch * cfg.block_size} x "
                       f"{cfg.vocab_size})", peaks["chunked"][0], peaks["full"][0], "MiB", higher_is_better=False,
                    rss_mib=peaks["chunked"][1], full_rss_mib=peaks["full"][1]))
    rows.append(row(s, "loss step time, chunked vs full logits", 1e3 * times["chunked"], 1e3 * times["full"], "ms",
                    higher_is_better=False))

    # the blocks' activations: gradients kept allocated, embedding frozen, a fixed gradient on the hidden states
    w.requires_grad_(False)
    g = torch.randn(batch, cfg.block_size, cfg.n_embd, device=dev)

    def trunk_step(every):
        def step():
            model.grad_ckpt_every = every
            with ctx:
                model(x, x, loss_fn=lambda hidden, weight, targets: (hidden.float() * g).sum())[1].backward()
        return step
    trunk = {"plain": trunk_step(0), "grad_ckpt": trunk_step(1)}
    trunk["plain"]()  # allocates the gradients, which stay
    resident = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None)]
    peaks = {k: measure(fn, resident) for k, fn in trunk.items()}
    times = timed(trunk)
    rows.append(row(s, f"activation memory of the {cfg.n_layer} blocks, grad_ckpt vs plain", peaks["grad_ckpt"][0],
                    peaks["plain"][0], "MiB", higher_is_better=False, rss_mib=peaks["grad_ckpt"][1],
                    plain_rss_mib=peaks["plain"][1]))
    rows.append(row(s, "blocks forward + backward time, grad_ckpt vs plain", 1e3 * times["grad_ckpt"],
                    1e3 * times["plain"], "ms", higher_is_better=False))
    return rows


def _rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


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
    growth = {}
    for k, opt in opts.items():
        sync(dev)
        if dev.startswith("cuda"):
            base = torch.cuda.memory_allocated()
            reset_peak_memory(dev)
            opt.step()
            growth[k] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        else:
            base = _rss_mb()
            reset_peak_memory(dev)
            opt.step()
            growth[k] = peak_memory_mb(dev) - base
    times = {k: [] for k in opts}
    for _ in range(2 if args.quick else 7):
        for k, opt in opts.items():
            times[k].append(median_time(opt.step, dev, warmup=0, iters=1))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
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
