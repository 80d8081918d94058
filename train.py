"""train.py: the trainer. `python train.py` with no flags builds the reasoning corpus if missing, trains a small GPT
on it, evaluates it and saves a checkpoint to out/.

    python train.py --n_layer 6 --max_iters 3000          # flags are TrainConfig's fields
    python train.py --config run.toml --lr=1e-3           # a TOML file, then flags on top
    python train.py --resume                              # continue out/ckpt.pt exactly
    python train.py --eval_only --init_from out/ckpt.pt   # the level x style table of a checkpoint
    torchrun --nproc_per_node 2 train.py                  # DDP (gloo on CPU, NCCL on GPU)

Ideas it rests on:
- One dataclass is the whole configuration; an unknown flag or a bad value is a one-line error naming close matches.
- A checkpoint holds everything a run depends on (model, optimizer, step, RNG states, the loader's position, the
  config), is written to a temporary file and renamed, and loads with weights_only=True; so --resume continues
  bit for bit, and a crash or a bad flag never destroys a saved run.
- Evaluation of the reasoning corpus is greedy generation on held-out test problems: accuracy and mean generated
  tokens per difficulty level, untagged (the model picks its style) or with a forced style.
"""
import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch

from config import UserError, cli, parse_config  # noqa: F401  (parse_config: other programs and the tests use it)
from data.loader import Batches, load_meta, open_tokens
from data.tasks import STYLES, TaskConfig, check_answer, held_out_problems, prompt_text
from data.tokenizer import load_tokenizer
from evaluate import decode_answer, evaluate_reasoning, format_table, summarize
from model import GELU_KINDS, GPT, GPTConfig, config_from_dict
import lora
import memory
from kernels import linear_cross_entropy
import quant

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TrainConfig:
    # i/o
    out_dir: str = "out"
    dataset: str = "reasoning"      # a folder under data/ (or a path) made by data/prepare.py; reasoning is built
    init_from: str = ""             # "": from scratch; a checkpoint file; or a local Hugging Face GPT-2 directory
    resume: bool = False            # continue out_dir/ckpt.pt exactly
    overwrite: bool = False         # allow a fresh run to replace an existing out_dir/ckpt.pt
    eval_only: bool = False         # evaluate init_from (or out_dir/ckpt.pt) and exit
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    rope_heads: int = 2             # heads that also use rotary positions (see model.py)
    gelu: str = "exact"             # exact or tanh (GPT-2's approximation; a checkpoint's own choice wins)
    block_size: int = 224
    dropout: float = 0.0
    bias: bool = False              # biases in Linear and LayerNorm (GPT-2 has them; off: a step 7% cheaper)
    # optimisation
    batch_size: int = 36            # rows per micro-batch per process
    grad_accum: int = 1             # micro-batches per step per process
    max_iters: int = 700            # length of the LR schedule
    stop_after: int = 0             # stop at this step (0: at max_iters); --resume continues the same schedule
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_iters: int = 70
    weight_decay: float = 0.1       # on matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0          # 0: off
    optim: str = "adamw"            # adamw (fp32 moments, torch fused) or adamw8bit (optim.AdamW8bit)
    # memory (memory.py)
    grad_ckpt: bool = False         # activation checkpointing: blocks recompute their activations in backward
    ckpt_every: int = 1             # with --grad_ckpt: checkpoint every k-th block
    chunked_loss: bool = False      # loss and its gradient in chunks of rows: (tokens x vocab) logits never held
    fsdp: bool = False              # under torchrun: shard weights, grads, optimizer state (FSDP2) instead of DDP
    plan: bool = False              # print the memory estimate, measure a few steps against it, write nothing
    memory_budget: str = ""         # e.g. 8GB: the largest micro-batch (and checkpointing) whose estimate fits
    # evaluation and logging
    log_interval: int = 50
    eval_interval: int = 0          # val loss + task accuracy every N steps, with a checkpoint (0: only the final)
    eval_iters: int = 20
    eval_problems: int = 100        # test problems per level in periodic evaluations (untagged)
    final_problems: int = 200       # per level and style in the final evaluation
    samples: int = 4                # answers printed at the end
    # quantization (quant.py's SPEC_GRAMMAR: w8, w4g32, w4a8g32, w3g64, w2g64, w1.58, nf4g64, ...; -lsq learns scales)
    qat: str = ""                   # fake-quant spec for quantization-aware training ("": off)
    qat_start: int = 0              # step from which fake-quant is on (before it: float training)
    ptq: str = ""                   # rtn | gptq: quantize --init_from's model, evaluate it, save it converted
    ptq_spec: str = ""              # the spec --ptq quantizes to
    ptq_batches: int = 16           # GPTQ calibration batches from the training data
    # LoRA / QLoRA fine-tuning of --init_from's model (lora.py)
    lora_rank: int = 0              # > 0: freeze the model and train rank-R adapters on --lora_targets
    lora_alpha: float = 16.0        # the adapters' output is scaled by alpha / rank
    lora_dropout: float = 0.0
    lora_base: str = "float"        # frozen base: float, int4g64, nf4g64, nf4g64-dq (int8 scales), int3g64, int2g64
    lora_targets: str = "c_attn,c_proj,c_fc"
    loftq: bool = False             # LoftQ: initialise the 4-bit base and the adapters together (else B = 0)
    loftq_iters: int = 5
    loftq_split: str = "lora"       # lora: A at LoRA's init scale, B the rest; sqrt: sqrt(S) on each (the paper's)
    lora_merge: bool = False        # merge --init_from's adapters into float weights (then --ptq to requantize)
    # system
    device: str = "auto"            # auto: cuda > mps > cpu
    dtype: str = "auto"             # auto: bf16 autocast on CUDA (bf16) and AMX CPUs, else float32
    compile: bool = False
    seed: int = 1337
    threads: int = 0                # torch CPU threads (0: torch's default)


MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "rope_heads", "gelu", "block_size", "bias")

# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, state):
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


RESUME_KEYS = ("model", "model_config", "optimizer", "step", "config", "rng", "loader")


def load_checkpoint(path, for_resume=False):
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: check the path, or train one first with `python train.py`")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory, not a checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad files; all mean the same to the user
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg:
            raise UserError(f"{path} holds pickled objects that could run code when loaded; refusing to load it "
                            f"(checkpoints hold only tensors and plain containers)")
        raise UserError(f"{path} is corrupt or not a checkpoint ({type(e).__name__}); use another file")
    if not isinstance(ck, dict) or "model" not in ck or "model_config" not in ck:
        raise UserError(f"{path} is not a checkpoint of this trainer (no model/model_config inside)")
    missing = [k for k in RESUME_KEYS if k not in ck] if for_resume else []
    if missing:
        raise UserError(f"{path} cannot be resumed (it lacks {', '.join(missing)}): use --init_from to start from it")
    return ck


def rng_state(device):
    """This process's RNG states (CPU, Python, and its own CUDA device)."""
    cuda = torch.cuda.get_rng_state(device) if device.startswith("cuda") else None
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda}


def gather_rng_states(device, world):
    """Every rank's RNG state, in rank order (each rank draws its own dropout masks)."""
    mine = rng_state(device)
    if world == 1:
        return [mine]
    states = [None] * world
    torch.distributed.all_gather_object(states, mine)
    return states


def set_rng_state(states, rank, device):
    if len(states) <= rank:  # resumed on more processes than saved: the new ranks start from fresh seeds
        return
    s = states[rank]
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"] is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(s["cuda"], device)


# ----------------------------------------------------------------------------- environment


def setup_distributed(cfg):
    """(rank, world_size, local_rank, device); initialises the process group when started by torchrun."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg, local_rank)
    if "RANK" not in os.environ:
        return 0, 1, 0, device
    import datetime
    import torch.distributed as dist
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # before NCCL starts, so each rank owns its GPU
    # rank 0 evaluates alone while the others wait: allow a long final evaluation
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size(), local_rank, device


def pick_device(cfg, local_rank=0):
    if cfg.device != "auto":
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {cfg.device}: no CUDA device is available here; use --device cpu or auto")
        return f"cuda:{local_rank}" if cfg.device == "cuda" else cfg.device
    if torch.cuda.is_available():
        return f"cuda:{local_rank}"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_bf16_matmul():
    """True on CPUs with AMX tiles (Intel Sapphire Rapids and later), where oneDNN's bf16 matmuls run several
    times faster than fp32 (8064x128 @ 128x512: 1.45 ms against 8.81 ms on the 2-core CI VM)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_for(device, dtype_name, cpu_bf16=False):
    """(autocast context, dtype name actually used). `auto` is bf16 autocast on CUDA with bf16 support, and on a
    CPU with AMX when the caller passes cpu_bf16 (train.py does; reason_rl keeps fp32 on CPU); else fp32."""
    dev = device.split(":")[0]
    if dtype_name == "auto":
        bf16 = (dev == "cuda" and torch.cuda.is_bf16_supported()) or (dev == "cpu" and cpu_bf16
                                                                      and cpu_has_bf16_matmul())
        dtype_name = "bfloat16" if bf16 else "float32"
    if dtype_name == "float32":
        return nullcontext(), dtype_name
    if dtype_name == "float16":
        raise UserError("--dtype float16 would need loss scaling, which this trainer does not do: use bfloat16")
    if dtype_name != "bfloat16":
        raise UserError(f"--dtype must be auto, float32 or bfloat16, not {dtype_name!r}")
    return torch.autocast(dev, dtype=getattr(torch, dtype_name)), dtype_name


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def dataset_dir(name):
    return name if os.path.isabs(name) or os.sep in name else os.path.join(ROOT, "data", name)


def ensure_dataset(cfg, master):
    """The dataset's meta; the built-in reasoning corpus is generated on first use (by the master process)."""
    d = dataset_dir(cfg.dataset)
    if cfg.dataset == "reasoning" and master:
        from data.prepare import prepare_reasoning
        from data.tasks import FORMAT_VERSION
        path = os.path.join(d, "meta.json")
        current = json.loads(json.dumps(asdict(TaskConfig())))
        if not os.path.isfile(path) or load_meta(d).get("format_version") != FORMAT_VERSION \
                or load_meta(d).get("task") != current:
            prepare_reasoning(d)  # missing, or written by another version of data/tasks.py
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return d, load_meta(d)


def lr_at(it, cfg):
    """Linear warm-up, then cosine decay to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model, cfg):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optim == "adamw":
        # the fused kernel (CPU and CUDA) saves a pass over memory per parameter tensor
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    if cfg.optim == "adamw8bit":  # moments in 8 bits: 2 bytes of state per parameter instead of 8
        if cfg.fsdp:
            raise UserError("--optim adamw8bit does not shard its state under --fsdp yet; use DDP (drop --fsdp)")
        from optim import AdamW8bit
        return AdamW8bit(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    raise UserError(f"--optim {cfg.optim!r} is not known; choose adamw or adamw8bit")


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def estimate_val_loss(model, tokens, cfg, meta, ctx, device):
    """Mean loss over eval_iters fixed validation batches (a fresh, seeded loader each time)."""
    loader = make_loader(tokens, cfg, meta, seed=cfg.seed + 1, rank=0, world=1, name="val.bin")
    model.eval()
    losses = []
    for _ in range(cfg.eval_iters):
        x, y, pos = (None if t is None else t.to(device) for t in loader.next())
        with ctx:
            losses.append(model(x, y, pos=pos)[1].item())
    model.train()
    return float(np.mean(losses))


def make_loader(tokens, cfg, meta, seed, rank, world, name):
    tok = meta["tokenizer"]
    doc = meta.get("kind") == "reasoning"
    prompt_end = ord(meta.get("prompt_end", "\n")) if doc else None
    return Batches(tokens, cfg.block_size, cfg.batch_size, seed, doc_aligned=doc, bos_id=tok["bos_id"],
                   prompt_end_id=prompt_end, rank=rank, world_size=world, name=name)


# ----------------------------------------------------------------------------- the run


POSITIVE = ("batch_size", "grad_accum", "ckpt_every", "max_iters", "log_interval", "eval_iters",
            "eval_problems", "final_problems", "n_layer", "n_head", "n_embd", "block_size")


def check_config(cfg):
    bad = [k for k in POSITIVE if getattr(cfg, k) < 1]
    if bad:
        raise UserError(f"--{bad[0]} must be at least 1, not {getattr(cfg, bad[0])}")
    if cfg.eval_interval < 0:
        raise UserError(f"--eval_interval must be 0 (only the final evaluation) or more, not {cfg.eval_interval}")
    if cfg.stop_after and cfg.stop_after > cfg.max_iters:
        raise UserError(f"--stop_after {cfg.stop_after} is beyond --max_iters {cfg.max_iters}")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), not {cfg.dropout}")
    if cfg.gelu not in GELU_KINDS:
        raise UserError(f"--gelu must be {' or '.join(GELU_KINDS)}, not {cfg.gelu!r}")
    check_quant_config(cfg)


def check_quant_config(cfg):
    for flag in ("qat", "ptq_spec"):
        try:
            getattr(cfg, flag) and quant.parse_spec(getattr(cfg, flag))
        except ValueError as e:
            raise UserError(f"--{flag}: {str(e).splitlines()[0]}; grammar: see quant.SPEC_GRAMMAR, e.g. w4g32")
    if cfg.ptq and (cfg.ptq not in ("rtn", "gptq") or not cfg.ptq_spec or not cfg.init_from or cfg.qat):
        raise UserError("--ptq rtn|gptq needs --ptq_spec SPEC and --init_from CHECKPOINT, and no --qat")
    if cfg.ptq_spec and not cfg.ptq:
        raise UserError("--ptq_spec needs --ptq rtn|gptq")
    if lora.check_flags(cfg):
        raise UserError(lora.check_flags(cfg))


def sync_model_fields(cfg, explicit, mc, source):
    """Take the model's shape from a checkpoint or HF directory; a conflicting explicit flag is an error."""
    for k in MODEL_FIELDS:
        if k == "block_size":
            continue
        if k in explicit and getattr(cfg, k) != getattr(mc, k):
            raise UserError(f"--{k} {getattr(cfg, k)} differs from {source}'s {getattr(mc, k)}; drop the flag")
        setattr(cfg, k, getattr(mc, k))
    if "block_size" in explicit and cfg.block_size > mc.block_size:
        raise UserError(f"--block_size {cfg.block_size} exceeds {source}'s {mc.block_size} positions")
    if "block_size" not in explicit:
        cfg.block_size = mc.block_size


def load_start(cfg, explicit):
    """What the run starts from: (checkpoint dict or None, model from a HF directory or None)."""
    if cfg.resume:
        return load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), for_resume=True), None
    if cfg.init_from and os.path.isdir(cfg.init_from):
        try:
            model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
        except Exception as e:  # a missing file, a bad config.json, a corrupt tensor file: all the user's to fix
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"could not load {cfg.init_from} as a GPT-2 directory: {first}")
        sync_model_fields(cfg, explicit, model.config, cfg.init_from)
        return None, model
    if cfg.init_from:
        if not os.path.exists(cfg.init_from):
            raise UserError(f"--init_from {cfg.init_from}: no such checkpoint file or directory")
        return load_checkpoint(cfg.init_from), None
    if cfg.eval_only:
        return load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt")), None
    return None, None


def build_model(cfg, explicit, meta, ckpt, hf_model):
    if hf_model is not None:
        return hf_model
    if ckpt is not None:
        mc = config_from_dict(ckpt["model_config"])
        sync_model_fields(cfg, explicit, mc, "the checkpoint")
        mc.dropout = cfg.dropout
        model = GPT(mc)
        try:
            quant.restore_(model, ckpt.get("quant"))  # a quantized checkpoint's modules, before its weights
            lora.restore_(model, ckpt.get("lora"))
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(f"checkpoint weights do not fit its model config: {str(e).splitlines()[0]}")
        return model
    mc = GPTConfig(block_size=cfg.block_size, vocab_size=meta["vocab_size"], n_layer=cfg.n_layer,
                   n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
                   rope_heads=cfg.rope_heads, gelu=cfg.gelu)
    try:
        return GPT(mc)
    except (ValueError, AssertionError) as e:
        raise UserError(f"bad model shape: {e}")


def run(cfg, explicit):
    check_config(cfg)
    ckpt, hf_model = load_start(cfg, explicit)  # before anything is built or written
    legacy_auto = False
    if cfg.resume:  # the saved run's settings, with the flags given now on top
        saved = ckpt["config"]
        # saved before runs recorded what --dtype auto resolved to, when auto meant fp32 on every CPU
        legacy_auto = saved.get("dtype") == "auto" and "dtype" not in explicit
        cfg = TrainConfig(**{**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__},
                             "stop_after": 0, "overwrite": False, "init_from": "", "resume": True,
                             **{k: getattr(cfg, k) for k in explicit}})
        check_config(cfg)
    elif ckpt is not None and "dataset" not in explicit and ckpt.get("dataset"):
        cfg.dataset = ckpt["dataset"]  # evaluate or fine-tune on the data the checkpoint was trained on
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    fresh = not (cfg.resume or cfg.eval_only or cfg.plan)
    if fresh and os.path.exists(ckpt_path) and not cfg.overwrite:
        raise UserError(f"{ckpt_path} already holds a run: --resume to continue it, --out_dir DIR for a new one, "
                        f"or --overwrite to replace it")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, local_rank, device = setup_distributed(cfg)
    master = rank == 0
    if cfg.fsdp and world == 1:
        raise UserError("--fsdp shards over processes: start it with torchrun (torchrun --nproc_per_node 2 train.py "
                        "--fsdp), or drop the flag")
    ctx, dtype_name = autocast_for(device, cfg.dtype, cpu_bf16=not legacy_auto)
    cfg.dtype = dtype_name  # saved resolved: --resume keeps the precision on a machine where auto means another
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    data_dir, meta = ensure_dataset(cfg, master)
    try:
        tok = load_tokenizer(meta["tokenizer"], data_dir)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise UserError(str(e))
    model = build_model(cfg, explicit, meta, ckpt, hf_model)
    try:
        note = lora.apply_flags_(model, cfg)  # --lora_rank (adapters, LoftQ), --lora_merge
    except ValueError as e:
        raise UserError(str(e))
    if note and master:
        print(note)
    if cfg.qat and not quant.is_quantized(model):  # (a resumed QAT run's checkpoint restored them already)
        try:
            quant.quantize_(model, cfg.qat, enabled=cfg.qat_start == 0)
        except ValueError as e:
            raise UserError(str(e))
    if model.config.vocab_size < meta["vocab_size"]:
        raise UserError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the dataset's "
                        f"({meta['vocab_size']}): pick a dataset made with the model's tokenizer")
    model.to(device)
    task = TaskConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["task"].items()}) \
        if meta.get("kind") == "reasoning" else None
    if task is not None:
        longest = max(len(tok.encode(prompt_text(p, s), bos=True)) for level in task.levels
                      for p in held_out_problems(task, level, 20) for s in (None,) + STYLES)
        if model.config.block_size <= longest + 8:
            raise UserError(f"block_size {model.config.block_size} leaves no room to answer the test prompts "
                            f"(up to {longest} tokens): use --block_size {longest + 232} or more")
    train_tokens, val_tokens = open_tokens(data_dir, "train", meta), open_tokens(data_dir, "val", meta)
    make_loader(val_tokens, cfg, meta, 0, 0, 1, "val.bin")  # raises now if val.bin is too small

    if cfg.ptq:
        return post_training_quantization(model, tok, task, cfg, meta, train_tokens, val_tokens, ctx, device, world)
    if cfg.eval_only:
        return final_evaluation(model, tok, task, cfg, meta, val_tokens, ctx, device, master)

    try:  # --grad_ckpt, --memory_budget (may change the micro-batch and accumulation), --plan
        mem_estimate = memory.apply_plan(cfg, model, world, dtype_name, verbose=master)
    except ValueError as e:
        raise UserError(str(e))
    if cfg.fsdp:
        memory.shard_model(model, world, device)  # before the optimizer, which then holds the shards
    loader = make_loader(train_tokens, cfg, meta, seed=cfg.seed, rank=rank, world=world, name="train.bin")
    optimizer = make_optimizer(model, cfg)
    step = 0
    if ckpt is not None and cfg.resume:
        try:
            if cfg.fsdp:
                memory.load_optimizer_state(model, optimizer, ckpt["optimizer"])
            else:
                optimizer.load_state_dict(ckpt["optimizer"])
            loader.load_state_dict(ckpt["loader"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"the checkpoint's optimizer or loader state does not fit this run ({e}); "
                            f"resume with the flags it was saved with")
        set_rng_state(ckpt["rng"], rank, device)
        step = ckpt["step"]
    raw_model = model
    if world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # buffers (rope tables, frozen 4-bit weights) never change, and QAT's scale buffers are filled alike on
        # every process from the synced weights, so they are synced once here and not before every forward,
        # where CPU autocast would also reject broadcasting the uint8 ones
        model = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None, broadcast_buffers=False)
    if cfg.compile:
        model = torch.compile(model)
    if not cfg.plan:
        os.makedirs(cfg.out_dir, exist_ok=True)
    metrics = open_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), step if cfg.resume else None) \
        if master and not cfg.plan else None
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    if master:
        print(f"model {raw_model.get_num_params() / 1e6:.2f}M params | {device} {dtype_name} | world {world} | "
              f"{tokens_per_step:,} tokens/step | data {data_dir}")

    def log(record):
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def checkpoint(step):
        rngs = gather_rng_states(device, world)  # a collective: every rank takes part
        sds = memory.full_state_dicts(raw_model, optimizer) if cfg.fsdp else \
            (raw_model.state_dict(), optimizer.state_dict())  # under FSDP: gathered, in the same format
        if master:
            save_checkpoint(ckpt_path, dict(model=sds[0], optimizer=sds[1],
                                            step=step, config=asdict(cfg), model_config=asdict(raw_model.config),
                                            rng=rngs, loader=loader.state_dict(), dataset=cfg.dataset,
                                            quant=quant.describe(raw_model), lora=lora.describe(raw_model)))

    def unsharded():  # under FSDP, rank 0's plain copy of the model for evaluation (a collective)
        sd = memory.full_model_state(raw_model)
        return memory.unsharded_copy(GPT, raw_model.config, sd, device) if master else None

    last = cfg.stop_after or cfg.max_iters
    loss_fn = linear_cross_entropy if cfg.chunked_loss else None
    if cfg.plan:  # a few real steps, measured against the estimate; nothing is written
        last, meter = step + memory.PLAN_STEPS, memory.PeakMeter(device, raw_model, optimizer).start()
    t0, t_start, step0, t0_step = time.perf_counter(), time.perf_counter(), step, step
    while step < last:
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        if cfg.qat:
            quant.enable_fake_quant_(raw_model, step >= cfg.qat_start)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            x, y, pos = (None if t is None else t.to(device) for t in loader.next())
            sync = world == 1 or micro == cfg.grad_accum - 1
            with memory.grad_sync(model, sync), ctx:
                loss = model(x, y, pos=pos, loss_fn=loss_fn)[1]  # (the logits are not kept through backward)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_avg = loss_sum / cfg.grad_accum
        if world > 1:  # the loss of the whole step, over all processes
            t = torch.tensor([loss_avg], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t)
            loss_avg = t.item() / world
        log(dict(step=step, loss=loss_avg, lr=lr))
        if master and (step % cfg.log_interval == 0 or step == last):
            dt = (time.perf_counter() - t0) / (step - t0_step)  # seconds per step since the last log
            tps = tokens_per_step / dt
            mfu = raw_model.estimate_mfu(tps / world, cfg.block_size, device)
            eta = (last - step) * (time.perf_counter() - t_start) / (step - step0)
            peak = peak_memory_mb(device)
            print(f"step {step:>5}/{last} | loss {loss_avg:.4f} | lr {lr:.2e} | {1e3 * dt:.0f} ms/step | "
                  f"{tps:,.0f} tok/s | mfu {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
                  f"peak {peak:.0f} MiB | eta {eta:.0f}s", flush=True)
            log(dict(step=step, ms_per_step=1e3 * dt, tokens_per_s=tps, mfu=mfu, peak_mb=peak))
            t0, t0_step = time.perf_counter(), step
        periodic = cfg.eval_interval > 0 and step % cfg.eval_interval == 0
        if (periodic or step == last) and not cfg.plan:
            evaluated = unsharded() if cfg.fsdp and step != cfg.max_iters else raw_model
            if master and step != cfg.max_iters:
                record = dict(step=step, val_loss=estimate_val_loss(evaluated, val_tokens, cfg, meta, ctx, device))
                msg = f"eval {step}: val loss {record['val_loss']:.4f}"
                if task is not None:
                    rows = evaluate_reasoning(evaluated, tok, task, device, cfg.eval_problems, ctx=ctx)
                    total = summarize(rows)["untagged"]
                    record.update(accuracy=total["accuracy"], mean_tokens=total["mean_tokens"],
                                  by_level={r["level"]: dict(accuracy=r["accuracy"], mean_tokens=r["mean_tokens"])
                                            for r in rows})
                    msg += f" | accuracy {100 * total['accuracy']:.1f}% ({total['mean_tokens']:.0f} tokens) | " + \
                        " ".join(f"L{r['level']} {100 * r['accuracy']:.0f}%/{r['mean_tokens']:.0f}" for r in rows)
                print(msg, flush=True)
                log(record)
            checkpoint(step)
            t0, t0_step = time.perf_counter(), step  # evaluation time is not training time
    if step == cfg.max_iters and not cfg.plan:
        evaluated = unsharded() if cfg.fsdp else raw_model
        result = final_evaluation(evaluated, tok, task, cfg, meta, val_tokens, ctx, device, master)
        if master:
            log(dict(step=step, final=True, val_loss=result["val_loss"], summary=result.get("summary")))
        if cfg.qat and master:
            evaluate_converted(raw_model, tok, task, cfg, meta, val_tokens, ctx, device,
                               os.path.join(cfg.out_dir, "converted.pt"))
    if cfg.plan:
        memory.report_plan(meter, mem_estimate, master)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def open_metrics(path, resume_step):
    """metrics.jsonl for appending: a fresh run starts it anew; a resumed one keeps the records up to its step."""
    if resume_step is not None and os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
        return open(path, "a")
    return open(path, "w")


def post_training_quantization(model, tok, task, cfg, meta, train_tokens, val_tokens, ctx, device, world):
    """--ptq: quantize the loaded model (GPTQ calibrates on batches of training data), evaluate it as fake-quant
    (eval.json) and converted (eval_converted.json), and save the converted model to out_dir/ckpt.pt."""
    if world > 1:
        raise UserError("--ptq runs in one process: start it with python, not torchrun")
    loader = make_loader(train_tokens, cfg, meta, seed=cfg.seed, rank=0, world=1, name="train.bin")
    calib = [dict(zip(("idx", "targets", "pos"), (None if t is None else t.to(device) for t in loader.next())))
             for _ in range(cfg.ptq_batches if cfg.ptq == "gptq" else 0)]
    t0 = time.perf_counter()
    try:
        quant.apply_ptq_(model, cfg.ptq, cfg.ptq_spec, calib)
    except ValueError as e:
        raise UserError(f"--ptq {cfg.ptq} --ptq_spec {cfg.ptq_spec}: {str(e).splitlines()[0]}")
    print(f"{cfg.ptq} {cfg.ptq_spec}: quantized in {time.perf_counter() - t0:.1f}s; fake-quant model:")
    final_evaluation(model, tok, task, cfg, meta, val_tokens, ctx, device, True)
    return evaluate_converted(model, tok, task, cfg, meta, val_tokens, ctx, device,
                              os.path.join(cfg.out_dir, "ckpt.pt"))


def evaluate_converted(model, tok, task, cfg, meta, val_tokens, ctx, device, path):
    """convert_ the fake-quant model in place to real low-bit modules, evaluate it (eval_converted.json) and save
    it to path (loads with --init_from / --eval_only into Int4Linear modules)."""
    try:
        quant.convert_(model)
    except ValueError as e:
        raise UserError(str(e))
    print(f"converted model: {quant.bits_per_weight(model):.3f} bits per weight in the quantized linear layers")
    result = final_evaluation(model, tok, task, cfg, meta, val_tokens, ctx, device, True, name="eval_converted")
    save_checkpoint(path, dict(model=model.state_dict(), model_config=asdict(model.config), config=asdict(cfg),
                               dataset=cfg.dataset, quant=quant.describe(model)))
    return result


def final_evaluation(model, tok, task, cfg, meta, val_tokens, ctx, device, master, name="eval"):
    if not master:
        return None
    model.eval()
    t0 = time.perf_counter()
    result = dict(val_loss=estimate_val_loss(model, val_tokens, cfg, meta, ctx, device))
    print(f"final val loss {result['val_loss']:.4f}")
    if task is not None:
        rows = evaluate_reasoning(model, tok, task, device, cfg.final_problems, styles=(None,) + STYLES, ctx=ctx)
        result.update(rows=rows, summary=summarize(rows))
        print(format_table(rows))
        print("sampled answers (untagged prompts, temperature 0.8):")
        gen = torch.Generator(device=device.split(":")[0] if device.startswith("cuda") else "cpu").manual_seed(0)
        for level in task.levels[:cfg.samples]:
            p = held_out_problems(task, level, 1)[0]
            prompt = tok.encode(prompt_text(p), bos=True)
            out, n = model.generate([prompt], model.config.block_size - len(prompt), temperature=0.8,
                                    eos_id=tok.eos_id, generator=gen)
            text = decode_answer(tok, out[0, :n[0]].tolist())
            mark = "correct" if check_answer(text, p) else "wrong"
            print(f"--- {prompt_text(p).strip()} ({mark}, {int(n[0])} tokens)\n{text}")
    result["eval_seconds"] = time.perf_counter() - t0
    print(f"final evaluation took {result['eval_seconds']:.0f}s")
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None):
    cli(TrainConfig, run, argv)


if __name__ == "__main__":
    main()
