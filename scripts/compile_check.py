"""Compile every Triton kernel of kernels.py ahead of time for Hopper (sm_90a) and Ampere (sm_80), no GPU needed.

    python scripts/compile_check.py                 # the representative subset (CI's default, about a minute)
    python scripts/compile_check.py --full          # every shape below, bf16 and fp16 (several minutes)
    python scripts/compile_check.py --json out.json # also write one record per compiled kernel
    python scripts/compile_check.py --full --M 2 --kernels gemv   # chosen rows and kernels only

Each int4 kernel is compiled with every config that its pruner keeps (kernels.gpu_configs) for the shapes below,
the other kernels with the launch parameters their launchers choose, with the divisibility hints a real launch gets
(16-byte aligned pointers, sizes and strides that are multiples of 16). Registers and spill bytes come from
`ptxas -v` as triton itself runs it (TRITON_DUMP_PTXAS_LOG). Exit status 1 on a compile error or on any spill.
Works with triton 3.6 to 3.9 (make compile-check-triton36 runs it under 3.6).
"""
import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile for the GPU, not the interpreter
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="compile_check_"))  # fresh: ptxas always runs
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels  # noqa: E402

TARGETS = {"sm_90a": 90, "sm_80": 80}
N_K = ((4096, 4096), (8192, 8192))  # the pruners see K only; both are multiples of every BLOCK_K (EVEN_K)
FULL = dict(M=(1, 4, 16, 128, 4096), groups=(32, 64, 128, 256), nf4=(False, True), dtypes=("bf16", "fp16"),
            vocab=(259, 50257), split_k=None, adam=None)
# CI's default, about 60 compiles: NF4 (its table gathers make it the variant that needs the most registers),
# split-K 1 and 8 only (the others differ in the K loop's start and step), two of the six AdamW8bit variants
SUBSET = dict(M=(1, 16, 4096), groups=(128,), nf4=(True,), dtypes=("bf16",), vocab=(50257,), split_k=(1, 8),
              adam=((False, False, False), (True, True, True)))
TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn  # unwrap autotune / heuristics
    return kernel


def _job(name, kernel, constexprs, num_warps, num_stages, ptrs, scalars=None, unaligned=()):
    """One compile: constexpr values, pointer element types (name -> '*bf16' ...), scalar types (default i32)."""
    return dict(name=name, kernel=kernel, constexprs=constexprs, num_warps=num_warps, num_stages=num_stages,
                ptrs=ptrs, scalars=scalars or {}, unaligned=tuple(unaligned))


def int4_jobs(M, K, g, nf4, dtype):
    """The GEMV (M <= 4) or GEMM kernel's kept configs for this launch, and the dX kernel's (dY of M rows)."""
    x = TYPES[dtype]
    sz = {"s_ptr": "*fp16", "z_ptr": "*fp16" if nf4 else "*u8", "lut_ptr": "*fp32" if nf4 else "*fp16"}
    bucket = kernels._m_bucket(M)
    unaligned = ("M_BUCKET",) + (("M",) if M % 16 else ())  # a launch hints M too when it is a multiple of 16
    jobs = []
    if M <= kernels.GEMV_MAX_M:
        for c in kernels.gpu_configs("gemv", M, K, g, nf4):
            cx = dict(GROUP_SIZE=g, BLOCK_M=bucket, EVEN_K=K % c.kwargs["BLOCK_K"] == 0, NF4=nf4, **c.kwargs)
            jobs.append(_job("gemv", "_int4_gemv_kernel", cx, c.num_warps, c.num_stages,
                             dict(x_ptr=x, w_ptr="*i32", y_ptr=x, **sz), unaligned=unaligned))
    else:
        y = "*fp32" if bucket <= kernels.SPLIT_K_MAX_BUCKET else x  # split-K buckets add into fp32
        for c in kernels.gpu_configs("gemm", M, K, g, nf4):
            cx = dict(GROUP_SIZE=g, DOT_PRECISION="tf32", GROUP_N=8, NF4=nf4, **c.kwargs)
            jobs.append(_job("gemm", "_int4_gemm_kernel", cx, c.num_warps, c.num_stages,
                             dict(x_ptr=x, w_ptr="*i32", y_ptr=y, **sz), unaligned=unaligned))
    for c in kernels.gpu_configs("dx", M, K, g):
        cx = dict(GROUP_SIZE=g, DOT_PRECISION="tf32", GROUP_M=8, NF4=nf4, **c.kwargs)
        jobs.append(_job("dx", "_int4_dx_kernel", cx, c.num_warps, c.num_stages,
                         dict(dy_ptr=x, w_ptr="*i32", dx_ptr=x, **sz), unaligned=unaligned))
    return jobs


def loss_jobs(V, dtype):
    """The softmax-loss-gradient kernel as softmax_loss_grad_triton launches it, on logits in `dtype`."""
    cx = dict(BLOCK_V=min(triton.next_power_of_2(V), 8192))
    return [_job("loss", "_softmax_loss_grad_kernel", cx, 16, 3,
                 dict(z_ptr=TYPES[dtype], t_ptr="*i64", loss_ptr="*fp32"), dict(scale="fp32"),
                 unaligned=("stride_row", "V", "ignore_index"))]


def adam_jobs(variants=None):
    """The fused AdamW8bit step as adamw8bit_step_triton launches it (block 256): fp32 and bf16 parameters, with
    and without stochastic rounding of the parameter and of the codes."""
    floats = {k: "fp32" for k in ("decay", "step_size", "eps2", "km", "kv", "out_m", "out_v")}
    jobs = []
    for p, bf16 in (("*fp32", False), ("*bf16", True)):
        for stochastic in ((False, True) if bf16 else (False,)):
            for sr_codes in (False, True):
                if variants and (bf16, stochastic, sr_codes) not in variants:
                    continue
                cx = dict(BLOCK=256, BLOCKS=8, BF16=bf16, STOCHASTIC=stochastic, SR_CODES=sr_codes)
                ptrs = dict(p_ptr=p, g_ptr=p, qm_ptr="*i8", am_ptr="*fp32", qv_ptr="*u8", wv_ptr="*fp32",
                            skipped_ptr="*i64")
                jobs.append(_job("adam", "_adamw8bit_kernel", cx, 4, 3, ptrs, floats,
                                 unaligned=("n", "nblocks", "seed", "code_seed")))
    return jobs


def all_jobs(sets):
    jobs = []  # the whole-kernel ones first (loss, adam: a few quick compiles), then the int4 kernels by M
    for V in sets["vocab"]:
        jobs += loss_jobs(V, "bf16") + loss_jobs(V, "fp32")
    jobs += adam_jobs(sets["adam"])
    for M in sets["M"]:
        for _, K in N_K:
            for g in sets["groups"]:
                for nf4 in sets["nf4"]:
                    for dtype in sets["dtypes"]:
                        jobs += int4_jobs(M, K, g, nf4, dtype)
    if sets["split_k"]:
        jobs = [j for j in jobs if j["constexprs"].get("SPLIT_K", 1) in sets["split_k"]]
    unique = {}
    for j in jobs:
        unique.setdefault(json.dumps(j, sort_keys=True), j)
    return list(unique.values())


PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(job, target):
    """-> the job with regs, spill_stores, spill_loads, seconds, error (None when it compiled)."""
    kernel = _jit(getattr(kernels, job["kernel"]))
    sig, attrs = {}, {}
    for i, a in enumerate(kernel.arg_names):
        if a in job["constexprs"]:
            sig[a] = "constexpr"
            continue
        sig[a] = job["ptrs"][a] if a.endswith("_ptr") else job["scalars"].get(a, "i32")
        if sig[a] != "fp32" and a not in job["unaligned"]:
            attrs[(i,)] = [["tt.divisibility", 16]]
    out = dict(job, target=target, regs=None, spill_stores=None, spill_loads=None, error=None)
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        src = ASTSource(kernel, sig, constexprs=job["constexprs"], attrs=attrs)
        opts = dict(num_warps=job["num_warps"], num_stages=job["num_stages"])
        with contextlib.redirect_stdout(log):
            triton.compile(src, target=GPUTarget("cuda", TARGETS[target], 32), options=opts)
        regs, spill = PTXAS_REGS.findall(log.getvalue()), PTXAS_SPILL.findall(log.getvalue())
        if not regs or not spill:
            raise RuntimeError(f"no ptxas -v report in the compile log: {log.getvalue()[-500:]!r}")
        out.update(regs=max(map(int, regs)), spill_stores=max(int(s) for s, _ in spill),
                   spill_loads=max(int(l) for _, l in spill))
    except Exception as e:  # a compile error is a result: report it with the others
        out["error"] = f"{type(e).__name__}: {str(e)[-800:]}"
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _compile_star(args):
    return compile_one(*args)


def describe(r):
    cx = " ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k not in ("DOT_PRECISION",))
    dt = r["ptrs"].get("x_ptr") or r["ptrs"].get("dy_ptr") or r["ptrs"].get("z_ptr") or r["ptrs"].get("p_ptr")
    return f"{r['name']:5} {dt:6} w{r['num_warps']} s{r['num_stages']} {cx}"


def run(sets, targets, workers, verbose=True, names=()):
    jobs = [(j, t) for t in targets for j in all_jobs(sets) if not names or j["name"] in names]
    results = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for r in pool.map(_compile_star, jobs, chunksize=1):
            results.append(r)
            bad = r["error"] or r["spill_stores"] or r["spill_loads"]
            if verbose or bad:
                what = r["error"] or f"regs {r['regs']:3} spill {r['spill_stores']}/{r['spill_loads']} B"
                print(f"{r['target']:6} {what}  {r['seconds']:5.1f}s  {describe(r)}", flush=True)
    return results


def summary(results):
    """Per target: compiled units, distinct kernel-and-config pairs, max registers, spills, errors."""
    lines = []
    for t in sorted({r["target"] for r in results}):
        rs = [r for r in results if r["target"] == t]
        pairs = {(r["name"], json.dumps(r["constexprs"], sort_keys=True), r["num_warps"], r["num_stages"])
                 for r in rs}
        ok = [r for r in rs if not r["error"]]
        spills = [r for r in ok if r["spill_stores"] or r["spill_loads"]]
        per_kernel = {}
        for r in ok:
            per_kernel[r["name"]] = max(per_kernel.get(r["name"], 0), r["regs"])
        regs = ", ".join(f"{k} {v}" for k, v in sorted(per_kernel.items()))
        lines.append(f"{t}: {len(rs)} compiles ({len(pairs)} kernel-config pairs), {len(rs) - len(ok)} errors, "
                     f"{len(spills)} spilling; max registers per thread: {regs}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="every shape, group size and dtype (not the subset)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, of " + ", ".join(TARGETS))
    p.add_argument("--M", default="", help="comma-separated row counts, in place of the set's (e.g. 1,2,4,16,128,4096:"
                   " 2 adds the GEMV's M_BUCKET 2, which neither set holds)")
    p.add_argument("--dtypes", default="", help="comma-separated, of bf16, fp16: the int4 kernels' activations")
    p.add_argument("--groups", default="", help="comma-separated group sizes, in place of the set's")
    p.add_argument("--kernels", default="", help="only these, comma-separated: gemv, gemm, dx, loss, adam")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--json", default=None, help="write one record per compile to this file")
    p.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    args = p.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    t0 = time.perf_counter()
    print(f"# triton {triton.__version__}, {'full set' if args.full else 'subset'}, targets {targets}", flush=True)
    sets = dict(FULL if args.full else SUBSET)
    if args.M:
        sets["M"] = tuple(int(m) for m in args.M.split(","))
    if args.dtypes:
        sets["dtypes"] = tuple(args.dtypes.split(","))
    if args.groups:
        sets["groups"] = tuple(int(g) for g in args.groups.split(","))
    print(f"# M {sets['M']}, groups {sets['groups']}, dtypes {sets['dtypes']}, kernels {args.kernels or 'all'}",
          flush=True)
    results = run(sets, targets, args.workers, not args.quiet,
                  [k for k in args.kernels.split(",") if k])
    for line in summary(results):
        print(line)
    print(f"# {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, results=results), f, indent=1)
    failed = [r for r in results if r["error"] or r["spill_stores"] or r["spill_loads"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
