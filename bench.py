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
import json
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


if __name__ == "__main__":
    main()
