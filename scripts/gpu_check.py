"""The prepared GPU check: one command on one H100 or H200, no network, nothing installed (the machine's own
torch 2.11-2.13 and triton 3.6-3.9), at most 8 minutes.

    python scripts/gpu_check.py               # or: make gpu-check
    python scripts/gpu_check.py --dry-run     # on CPU: every step end to end, tiny, to test this script
                                              # (or: make gpu-check DRY_RUN=1)

Steps, each a subprocess with its own time limit (the sum, with start-up, stays under BUDGET_S):
  1. the device and the versions of python, torch, triton and CUDA;
  2. the GPU-marked tests (pytest -m gpu);
  3. bench.py matmul: int4 and NF4, groups 64 and 128, M = 1, 16, 128, 4096 on 4096x4096 and 8192x8192, against
     torch's bf16 matmul and dequantize-then-matmul, bytes/s as a share of a device-to-device copy, and dX at
     M = 4096; bench.py adam: the fused AdamW8bit step on a 1B-parameter set against torch's fused AdamW;
     bench.py train: a GPT-2-small bf16 training step's tokens/s and MFU (each with --json);
  4. a markdown block for docs/BENCHMARKS.md (date, device, versions, command, the figures), printed and saved.
Without CUDA (and without --dry-run) it says so in one line and exits with status 1.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 480
# (step, time limit in seconds); the limits add up to 450 s, leaving 30 s for start-up and the report
LIMITS = {"tests": 120, "matmul": 200, "adam": 50, "train": 80}


def versions():
    import torch
    import triton
    cuda = torch.cuda.is_available()
    return dict(date=datetime.date.today().isoformat(), python=platform.python_version(), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda,
                device=torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})",
                capability=".".join(map(str, torch.cuda.get_device_capability())) if cuda else None)


def run_step(name, cmd, limit, log):
    """Runs cmd in the repository root with a time limit; returns (status, seconds), status 'ok', 'failed (rc)'
    or 'timed out'. Its output goes to the terminal as it comes."""
    print(f"\n## {name}: {' '.join(cmd)}  (limit {limit} s)", flush=True)
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, timeout=limit).returncode
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        status = "timed out"
    seconds = time.perf_counter() - t0
    log.append(dict(step=name, status=status, seconds=round(seconds, 1), command=" ".join(cmd)))
    print(f"## {name}: {status} in {seconds:.0f} s", flush=True)
    return status


def steps(out, dry_run):
    """(name, command, limit) of each step; --dry-run runs the same steps on the CPU, small."""
    py = sys.executable
    bench = lambda section, *extra: [py, "bench.py", section, "--json", os.path.join(out, f"{section}.json"),
                                     *extra]
    if dry_run:  # the GPU tests skip without CUDA; the matmul bench runs its CPU path (adam and train, slow on
        # a CPU and unchanged by this script, are left out)
        return [("tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"],
                 LIMITS["tests"]),
                ("matmul", bench("matmul", "--quick", "--device", "cpu"), LIMITS["matmul"])]
    return [("tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-x"], LIMITS["tests"]),
            ("matmul", bench("matmul"), LIMITS["matmul"]),
            ("adam", bench("adam"), LIMITS["adam"]),
            ("train", bench("train"), LIMITS["train"])]


def _cell(v):
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(env, log, out, command):
    """The block for docs/BENCHMARKS.md: where and how it was measured, the steps, and each bench's rows."""
    lines = [f"### {env['date']}, {env['device']}" + (f" (sm_{env['capability'].replace('.', '')})"
                                                       if env["capability"] else ""),
             "", f"python {env['python']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
                 f"command: `{command}`", "",
             "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in log]
    for s in log:
        path = os.path.join(out, f"{s['step']}.json")
        if s["step"] == "tests" or not os.path.exists(path):
            continue
        with open(path) as f:
            rows = json.load(f)["rows"]
        lines += ["", f"{s['step']}:", "", "| name | ours | baseline | unit | ratio (> 1: ours better) | "
                  "share of copy bandwidth |", "|---|---|---|---|---|---|"]
        for r in rows:
            pct = r.get("pct_copy_bw")
            lines.append(f"| {r['name']} | {_cell(r['ours'])} | {_cell(r['baseline'])} | {r['unit']} | "
                         f"{_cell(r['ratio'])} | {'-' if pct is None else f'{pct:.0f}%'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on CPU: every step end to end, small")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "gpu_check"), help="folder for the JSON and markdown")
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing was checked. "
              "Run it on a GPU machine, or use --dry-run to test the script on CPU.")
        return 1
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    env = versions()
    print("# gpu-check " + ", ".join(f"{k}={v}" for k, v in env.items()) + f"; budget {BUDGET_S} s", flush=True)
    log = []
    for name, cmd, limit in steps(args.out, args.dry_run):
        run_step(name, cmd, limit, log)
    command = "python scripts/gpu_check.py" + (" --dry-run" if args.dry_run else "")
    block = markdown(env, log, args.out, command)
    path = os.path.join(args.out, "BENCHMARKS_block.md")
    with open(path, "w") as f:
        f.write(block)
    with open(os.path.join(args.out, "steps.json"), "w") as f:
        json.dump(dict(env=env, steps=log), f, indent=1)
    total = time.perf_counter() - t0
    print(f"\n{block}\n# gpu-check: {total:.0f} s of a {BUDGET_S} s budget; the block above is in {path}")
    return 0 if all(s["status"] == "ok" for s in log) else 1


if __name__ == "__main__":
    sys.exit(main())
