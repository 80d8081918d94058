"""runtime.py: a run's set-up, shared by every entry point: the device, the precision policy, the process group,
seeding and RNG state, and the metrics log.

Ideas it rests on:
- One precision policy (resolve_dtype): `--dtype auto` is bf16 autocast where the hardware multiplies bf16
  natively (CUDA with bf16, CPUs with AMX or AVX512-BF16) and fp32 elsewhere. Everything that needs the
  precision (training, RL, evaluation, bench, the memory estimate) asks it here.
- A checkpoint holds every RNG a run draws from (torch CPU and CUDA, Python's), one set per process, so a resumed
  run continues bit for bit.
- metrics.jsonl is one JSON record per line; a resumed run keeps the records up to its step (a torn last line,
  left by a kill mid-write, is dropped) and appends.
"""
import datetime
import json
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from config import UserError
from files import atomic_write

DTYPES = ("auto", "float32", "bfloat16")


# ----------------------------------------------------------------------------- device and precision

def pick_device(requested="auto", local_rank=0):
    """cuda > mps > cpu for "auto"; an explicit device must exist here."""
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {requested}: no CUDA device is available here; use --device cpu or auto")
        if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError("--device mps: no Apple GPU is available here; use --device cpu or auto")
        if requested.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {requested!r}")
        return f"cuda:{local_rank}" if requested == "cuda" else requested
    if torch.cuda.is_available():
        return f"cuda:{local_rank}"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_bf16_matmul():
    """True on CPUs whose matrix units multiply bf16 natively: AMX tiles (Intel Sapphire Rapids and later) or
    AVX512-BF16 (e.g. AMD Zen 4 and 5). There oneDNN's bf16 matmuls run several times faster than fp32 (AMX:
    8064x128 @ 128x512 in 1.45 ms against 8.81 ms on a 2-core VM); elsewhere bf16 is emulated and slower."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for name in checks:
        try:
            if getattr(torch.cpu, name)():
                return True
        except (AttributeError, RuntimeError):
            continue
    return False


def resolve_dtype(device, requested="auto"):
    """The precision a run computes in: "bfloat16" (autocast) or "float32"."""
    if requested not in DTYPES:
        hint = "; float16 would need loss scaling, which this trainer does not do" if requested == "float16" else ""
        raise UserError(f"--dtype must be auto, float32 or bfloat16, not {requested!r}{hint}")
    if requested != "auto":
        return requested
    dev = device.split(":")[0]
    bf16 = (dev == "cuda" and torch.cuda.is_bf16_supported()) or (dev == "cpu" and cpu_has_bf16_matmul())
    return "bfloat16" if bf16 else "float32"


def autocast(device, dtype_name):
    """The context a forward pass runs in: nothing for fp32, bf16 autocast otherwise."""
    if dtype_name == "float32":
        return nullcontext()
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- processes

@dataclass
class Env:
    """Where and how this process runs."""
    device: str
    dtype: str          # resolved: float32 or bfloat16
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        return autocast(self.device, self.dtype)


def saved_before_resolving(saved_config, explicit):
    """True for a run saved before runs recorded what --dtype auto resolved to, when auto meant fp32 on every CPU
    (and no --dtype is given now): setup() then keeps it in fp32 on CPU, as it ran."""
    return saved_config.get("dtype") == "auto" and "dtype" not in explicit


def setup(device="auto", dtype="auto", threads=0, seed=0, distributed=True, legacy_auto=False):
    """The process's Env: threads, device, process group (when started by torchrun), precision, seeds.
    legacy_auto: see saved_before_resolving."""
    if threads < 0:
        raise UserError(f"--threads must be 0 (torch's default) or more, not {threads}")
    if threads:
        torch.set_num_threads(threads)
    local_rank = launcher_env(distributed)
    dev = pick_device(device, local_rank)
    dtype = resolve_dtype(dev, dtype)  # checked before a process group exists
    if legacy_auto and dev == "cpu":
        dtype = "float32"
    rank, world = 0, 1
    if distributed and "RANK" in os.environ:
        rank, world = init_process_group(dev)
    seed_everything(seed + rank)
    return Env(dev, dtype, rank, world, local_rank)


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launcher_env(distributed):
    """LOCAL_RANK, after checking the variables torchrun sets: a process started by hand with some of them (a
    leftover RANK in the shell) gets one line instead of a failed rendezvous."""
    env = {k: os.environ[k] for k in LAUNCH_VARS if k in os.environ}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        if k in env and not env[k].strip().isdigit():
            raise UserError(f"the environment variable {k}={env[k]!r} is not a number: launch with torchrun, or "
                            f"unset {k}")
    missing = [k for k in LAUNCH_VARS if k not in env and k != "LOCAL_RANK"]
    if distributed and "RANK" in env and missing:
        raise UserError(f"RANK is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: launch "
                        f"with torchrun (torchrun --nproc_per_node 2 ...), or unset RANK for one process")
    return int(env.get("LOCAL_RANK", 0))


def init_process_group(device):
    import torch.distributed as dist
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # before NCCL starts, so each rank owns its GPU
    # rank 0 evaluates alone while the others wait: allow a long final evaluation
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size()


def barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def teardown(env):
    if env.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- seeds and RNG state

def seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)


def rng_state(device):
    """This process's RNG states (CPU, Python, and its own CUDA device)."""
    cuda = torch.cuda.get_rng_state(device) if device.startswith("cuda") else None
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda}


def gather_rng_states(env):
    """Every rank's RNG state, in rank order (each rank draws its own dropout masks); a collective."""
    mine = rng_state(env.device)
    if env.world == 1:
        return [mine]
    states = [None] * env.world
    torch.distributed.all_gather_object(states, mine)
    return states


def set_rng_state(states, rank, device):
    if len(states) <= rank:  # resumed on more processes than saved: the new ranks start from fresh seeds
        return
    s = states[rank]
    torch.set_rng_state(s["torch"])
    random.setstate(as_tuple(s["python"]))
    if s["cuda"] is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(s["cuda"], device)


def as_tuple(x):
    """Python's random state as setstate wants it (a checkpoint may hold its tuples as lists)."""
    return tuple(as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------- the metrics log

class MetricsLog:
    """metrics.jsonl: one JSON record per line, flushed as written. A fresh run starts it anew; a resumed one
    (resume_step given) keeps the records up to that step, drops the end-of-run records and a torn last line,
    and appends."""

    def __init__(self, path, resume_step=None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            keep = [line for line in _records(path) if _keep(line, resume_step)]
            atomic_write(path, lambda f: f.writelines(keep), "w")
            self.f = open(path, "a")
        else:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.f = open(path, "w")

    def write(self, record):
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


def _records(path):
    with open(path, errors="replace") as f:
        return [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]


def _keep(line, step):
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False  # a torn line from a kill mid-write
    return isinstance(record, dict) and record.get("step", 0) <= step and not record.get("final")
