"""train.py: the trainer. `python train.py` with no flags builds the reasoning corpus if missing, trains a small GPT
on it, evaluates it and saves a checkpoint to out/.

    python train.py --n_layer 6 --max_iters 3000          # flags are config.TrainConfig's fields (--help)
    python train.py --config run.toml --lr=1e-3           # a TOML file, then flags on top
    python train.py --resume                              # continue out/ckpt.pt exactly
    python train.py --eval_only --init_from out/ckpt.pt   # the level x style table of a checkpoint
    torchrun --nproc_per_node 2 train.py                  # DDP (gloo on CPU, NCCL on GPU)

Ideas it rests on:
- A run is set up (runtime.setup: device, precision, processes, seeds), its model built from scratch or from any
  checkpoint (checkpoint.load_model), adapted by the flags (LoRA, QAT), trained by a plain loop, evaluated, saved.
- A checkpoint holds everything a run depends on (model, optimizer, step, RNG states, the loader's position, the
  config), so --resume continues bit for bit, and a crash or a bad flag never destroys a saved run.
"""
import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

import lora
import memory
import quant
import runtime
from checkpoint import (check_data, check_out_dir, checked_model_config, clear_run, data_marks, eval_only_path,
                        load_checkpoint, load_model, model_from_checkpoint, model_state, nothing_left, refuse_changes,
                        refuse_existing, refuse_overwriting_source, resume_config, run_lock, save_checkpoint)
from config import TrainConfig, UserError, cli
from data.loader import dataset_dir, make_batches, open_dataset
from data.tasks import STYLES, longest_prompt
from evaluate import estimate_val_loss, evaluate_reasoning, final_evaluation, summarize
from kernels import linear_cross_entropy
from model import GPT, GPTConfig

MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "rope_heads", "gelu", "block_size", "bias")
# what a resumed run keeps: the model, its QAT/LoRA/PTQ additions, the data and the optimizer
FIXED_ON_RESUME = MODEL_FIELDS + ("dropout", "dataset", "qat", "qat_start", "ptq", "ptq_spec", "lora_rank",
                                  "lora_alpha", "lora_dropout", "lora_base", "lora_targets", "loftq",
                                  "loftq_iters", "loftq_split", "lora_merge", "optim", "beta1", "beta2",
                                  "weight_decay", "seed")  # (the optimizer's state keeps its weight decay; the
# saved RNG states replace the seed)
# flags only training reads: an evaluation (--eval_only) or a PTQ run would silently ignore them
TRAINING_ONLY = ("max_iters", "stop_after", "lr", "min_lr", "warmup_iters", "weight_decay", "beta1", "beta2",
                 "grad_clip", "optim", "grad_accum", "grad_ckpt", "grad_ckpt_every", "chunked_loss", "fsdp",
                 "memory_budget", "plan", "log_interval", "eval_interval", "eval_problems", "dropout", "compile",
                 "qat", "qat_start", "lora_rank", "loftq")
LORA_SETTINGS = ("lora_alpha", "lora_dropout", "lora_base", "lora_targets", "loftq_iters", "loftq_split")
# (flags, when they would do nothing, why): given explicitly in that case, they are refused
# (--eval_only does read --qat and --lora_rank: it evaluates the model with fake-quant layers or new adapters)
EVAL_READS = ("qat", "qat_start", "lora_rank", "loftq")
IDLE_FLAGS = (
    (tuple(k for k in TRAINING_ONLY if k not in EVAL_READS) + ("ptq", "ptq_spec", "ptq_batches", "overwrite"),
     lambda c: c.eval_only, "--eval_only evaluates without training (its test problems: --final_problems)"),
    (TRAINING_ONLY, lambda c: c.ptq, "--ptq quantizes and evaluates, without training"),
    (LORA_SETTINGS, lambda c: not c.lora_rank, "new LoRA adapters need --lora_rank R"),
    (("ptq_batches",), lambda c: c.ptq != "gptq", "only --ptq gptq calibrates"),
    (("grad_ckpt_every",), lambda c: not (c.grad_ckpt or c.memory_budget),
     "blocks are checkpointed only with --grad_ckpt (or a --memory_budget plan)"),
)


# ----------------------------------------------------------------------------- what the run starts from

def starting_point(cfg, explicit):
    """(config, checkpoint dict or None, model from a Hugging Face directory or None, legacy dtype): the resumed
    run's merged config, or what to start from. Everything is loaded and checked before anything is written; a
    checkpoint's model is built later, after seeding (its LoRA or QAT additions draw from the RNG)."""
    check_out_dir(cfg.out_dir)
    if cfg.resume:
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        if cfg.init_from:
            raise UserError(f"--resume continues {path}; --init_from does not apply: drop one of the two")
        ckpt = load_checkpoint(path, for_resume=True)
        saved = ckpt["config"]
        legacy = runtime.saved_before_resolving(saved, explicit)
        if "dataset" in explicit and same_dataset(cfg.dataset, saved.get("dataset", "")):
            cfg.dataset = saved["dataset"]  # the same folder, spelled another way
        refuse_changes(saved, cfg, explicit, FIXED_ON_RESUME, path)
        cfg = resume_config(TrainConfig, {**saved, "out_dir": cfg.out_dir, "init_from": "", "overwrite": False,
                                          "resume": True},
                            cfg, explicit, reset=("stop_after",), source=path)
        for k in ("max_iters", "stop_after"):
            if k in explicit and 0 < getattr(cfg, k) < ckpt["step"]:
                raise UserError(f"--{k} {getattr(cfg, k)} is below step {ckpt['step']}, where {path} already is: "
                                f"give a later step")
        if {"lr", "min_lr"} & explicit:
            schedule_floor(cfg, explicit | {"min_lr"})
        sync_model_fields(cfg, explicit, checked_model_config(ckpt, path), path)
        refuse_idle_flags(cfg, explicit)
        return cfg, ckpt, None, legacy
    refuse_idle_flags(cfg, explicit)
    schedule_floor(cfg, explicit)
    path = cfg.init_from or (os.path.join(cfg.out_dir, "ckpt.pt") if cfg.eval_only else "")
    if not path:
        refuse_existing(cfg.out_dir, cfg.overwrite or cfg.plan)
        return cfg, None, None, False
    if os.path.isdir(path):  # a Hugging Face directory
        ckpt, model = None, load_model(path, cfg.dropout)[0]
    else:
        ckpt, model = load_checkpoint(path), None
        refuse_requantizing(cfg, ckpt, path)
        if "dataset" not in explicit and ckpt.get("dataset"):
            cfg.dataset = ckpt["dataset"]  # evaluate or fine-tune on the data the checkpoint was trained on
    sync_model_fields(cfg, explicit, model.config if model else checked_model_config(ckpt, path), path)
    if not (cfg.eval_only or cfg.plan):
        refuse_existing(cfg.out_dir, cfg.overwrite)
        if cfg.overwrite:
            refuse_overwriting_source(cfg.out_dir, path)
    return cfg, ckpt, model, False


def refuse_idle_flags(cfg, explicit):
    """An explicit flag this run would not read is refused rather than ignored."""
    for names, idle, why in IDLE_FLAGS:
        if idle(cfg):
            given = [f"--{k}" for k in names if k in explicit]
            if given:
                raise UserError(f"{', '.join(given)} would do nothing here: {why}; drop "
                                f"{'it' if len(given) == 1 else 'them'}")


def refuse_requantizing(cfg, ckpt, path):
    """--qat, --ptq and --lora_rank start from a float model; a checkpoint that is quantized or holds adapters
    would be trained or saved as it is, under a config that says otherwise."""
    q, a = (d if isinstance(d, dict) else None for d in (ckpt.get("quant"), ckpt.get("lora")))
    if not (q or a):
        return  # (a malformed entry is reported when the model is built)
    held = f"weights quantized to {q.get('spec')}" if q else \
        f"LoRA adapters (rank {a.get('rank')}) over a {a.get('base')} base"
    more_qat = q and q.get("spec") == cfg.qat and q.get("fake_quant") and not q.get("converted")
    if cfg.qat and (q and not more_qat or a and not cfg.lora_merge):  # (--lora_merge gives QAT a float model)
        raise UserError(f"--qat {cfg.qat}: {path} holds {held}; start QAT from a float checkpoint"
                        f"{' (or go on with its own spec)' if q and q.get('fake_quant') else ''}")
    if cfg.ptq and q:
        raise UserError(f"--ptq: {path} holds {held}; quantize its float checkpoint instead")
    if cfg.ptq and a and not cfg.lora_merge:
        raise UserError(f"--ptq: {path} holds {held}; add --lora_merge to fold them into float weights first")
    if cfg.lora_rank and a:
        raise UserError(f"--lora_rank {cfg.lora_rank}: {path} already holds {held}; drop the --lora_* flags to "
                        f"train them on, or --lora_merge them into a float checkpoint first")


def schedule_floor(cfg, explicit):
    """min_lr must not be above lr (the schedule decays): an error when given, else lowered with a note (a
    lower --lr alone, as fine-tuning uses, keeps the default ratio of 10)."""
    if cfg.min_lr <= cfg.lr:
        return
    if "min_lr" in explicit:
        raise UserError(f"--min_lr {cfg.min_lr:g} is above --lr {cfg.lr:g}: the schedule decays from lr to "
                        f"min_lr; lower --min_lr")
    cfg.min_lr = cfg.lr / 10
    print(f"note: --min_lr lowered to {cfg.min_lr:g}, a tenth of --lr {cfg.lr:g}")


def same_dataset(a, b):
    return os.path.realpath(dataset_dir(a)) == os.path.realpath(dataset_dir(b))


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


def new_model(cfg, data):
    mc = GPTConfig(block_size=cfg.block_size, vocab_size=data.meta["vocab_size"], n_layer=cfg.n_layer,
                   n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
                   rope_heads=cfg.rope_heads, gelu=cfg.gelu)
    try:
        return GPT(mc)
    except (ValueError, AssertionError) as e:
        raise UserError(f"bad model shape: {e}")


def adapt_model(model, cfg, data, env):
    """The flags' changes to a built model (LoRA adapters or merge, QAT's fake-quant layers), then checks that
    it fits the data; moved to the device."""
    try:
        note = lora.apply_flags_(model, cfg)  # --lora_rank (adapters, LoftQ), --lora_merge
        if cfg.qat and not quant.is_quantized(model):  # (a resumed QAT run's checkpoint restored them already)
            quant.quantize_(model, cfg.qat, enabled=cfg.qat_start == 0)
    except ValueError as e:
        raise UserError(str(e))
    if note and env.master:
        print(note)
    if model.config.vocab_size < data.meta["vocab_size"]:
        raise UserError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the dataset's "
                        f"({data.meta['vocab_size']}): pick a dataset made with the model's tokenizer")
    if data.task is not None:
        longest = longest_prompt(data.tok, data.task, (None,) + STYLES)
        if model.config.block_size <= longest + 8:
            raise UserError(f"block_size {model.config.block_size} leaves no room to answer the test prompts "
                            f"(up to {longest} tokens): use --block_size {longest + 232} or more")
    return model.to(env.device)


# ----------------------------------------------------------------------------- training

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
    if cfg.optim == "adamw8bit":  # moments in 8 bits: 2 bytes of state per parameter instead of 8
        from optim import AdamW8bit
        return AdamW8bit(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    # the fused kernel (CPU and CUDA) saves a pass over memory per parameter tensor
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


@dataclass
class Run:
    """What the training loop works on."""
    cfg: TrainConfig
    env: runtime.Env
    data: object        # data.loader.Dataset
    raw: GPT            # the unwrapped model: what is saved and evaluated
    model: torch.nn.Module  # what steps run through (DDP, FSDP or compiled)
    optimizer: torch.optim.Optimizer
    loader: object
    val_tokens: object
    step: int = 0
    log: object = None  # runtime.MetricsLog on the master process

    @property
    def ckpt_path(self):
        return os.path.join(self.cfg.out_dir, "ckpt.pt")


def refuse_what_cannot_fit(cfg, env, estimate):
    """A step that cannot fit in this machine's memory is refused before it starts, instead of being killed."""
    procs = 1 if env.device.startswith("cuda") else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    over = memory.too_big(estimate, env.device, procs)
    if over:
        needed, free = map(memory.readable, over)
        where = f"{procs} processes' steps need" if procs > 1 else "a step needs"
        raise UserError(f"--batch_size {cfg.batch_size} x --block_size {cfg.block_size}: {where} about {needed} "
                        f"at the peak, more than the {free} free here: lower --batch_size (keep the rows per "
                        f"step with --grad_accum), add --grad_ckpt, or let --memory_budget choose")


def prepare_training(cfg, env, data, model, ckpt):
    """Memory plan, sharding, optimizer and loader (restored on --resume), wrappers, and the metrics log."""
    try:  # --grad_ckpt, --memory_budget (may change the micro-batch and accumulation), --plan
        estimate = memory.apply_plan(cfg, model, env.world, env.dtype, verbose=env.master)
    except ValueError as e:
        raise UserError(str(e))
    refuse_what_cannot_fit(cfg, env, estimate)
    if cfg.fsdp:
        memory.shard_model(model, env.world, env.device)  # before the optimizer, which then holds the shards
    loader = make_batches(data.tokens("train"), data.meta, cfg.block_size, cfg.batch_size, cfg.seed, env.rank,
                          env.world, "train.bin")
    run = Run(cfg, env, data, model, model, make_optimizer(model, cfg), loader, data.tokens("val"))
    if cfg.resume:
        restore_training_state(run, ckpt)
    if env.world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # buffers (rope tables, frozen 4-bit weights) never change, and QAT's scale buffers are filled alike on
        # every process from the synced weights, so they are synced once here and not before every forward,
        # where CPU autocast would also reject broadcasting the uint8 ones
        run.model = DDP(model, device_ids=[env.local_rank] if env.device.startswith("cuda") else None,
                        broadcast_buffers=False)
    if cfg.compile:
        run.model = torch.compile(run.model)
    return run, estimate


def restore_training_state(run, ckpt):
    try:
        if run.cfg.fsdp:
            memory.load_optimizer_state(run.raw, run.optimizer, ckpt["optimizer"])
        else:
            run.optimizer.load_state_dict(ckpt["optimizer"])
        run.loader.load_state_dict(ckpt["loader"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"the checkpoint's optimizer or loader state does not fit this run ({e}); "
                        f"resume with the flags it was saved with")
    runtime.set_rng_state(ckpt["rng"], run.env.rank, run.env.device)
    run.step = ckpt["step"]


def train_step(run, loss_fn):
    """One optimizer step over grad_accum micro-batches; returns the step's mean loss over all processes."""
    cfg, env = run.cfg, run.env
    lr = lr_at(run.step, cfg)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    if cfg.qat:
        quant.enable_fake_quant_(run.raw, run.step >= cfg.qat_start)
    loss_sum = 0.0
    for micro in range(cfg.grad_accum):
        x, y, pos = (None if t is None else t.to(env.device) for t in run.loader.next())
        sync = env.world == 1 or micro == cfg.grad_accum - 1
        with memory.grad_sync(run.model, sync), env.autocast():
            loss = run.model(x, y, pos=pos, loss_fn=loss_fn)[1]  # (the logits are not kept through backward)
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.item()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    loss = loss_sum / cfg.grad_accum
    if env.world > 1:  # the loss of the whole step, over all processes
        t = torch.tensor([loss], dtype=torch.float64, device=env.device)
        torch.distributed.all_reduce(t)
        loss = t.item() / env.world
    return loss, lr


def train(run, last):
    """The loop: steps, a log line every log_interval, periodic evaluations with a checkpoint."""
    cfg, env = run.cfg, run.env
    loss_fn = linear_cross_entropy if cfg.chunked_loss else None
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * env.world
    clock = dict(t0=time.perf_counter(), start=time.perf_counter(), step0=run.step, t0_step=run.step)
    while run.step < last:
        loss, lr = train_step(run, loss_fn)
        record(run, dict(step=run.step, loss=loss, lr=lr))
        if env.master and (run.step % cfg.log_interval == 0 or run.step == last):
            log_progress(run, loss, lr, last, tokens_per_step, clock)
        periodic = cfg.eval_interval > 0 and run.step % cfg.eval_interval == 0
        if (periodic or run.step == last) and not cfg.plan:
            if run.step != cfg.max_iters:
                evaluate_periodic(run)
            save(run)
            clock.update(t0=time.perf_counter(), t0_step=run.step)  # evaluation time is not training time


def record(run, rec):
    if run.log:
        run.log.write(rec)


def log_progress(run, loss, lr, last, tokens_per_step, clock):
    now = time.perf_counter()
    dt = (now - clock["t0"]) / (run.step - clock["t0_step"])  # seconds per step since the last log
    tps = tokens_per_step / dt
    mfu = run.raw.estimate_mfu(tps / run.env.world, run.cfg.block_size, run.env.device)
    eta = (last - run.step) * (now - clock["start"]) / (run.step - clock["step0"])
    peak = memory.peak_memory_mb(run.env.device)
    print(f"step {run.step:>5}/{last} | loss {loss:.4f} | lr {lr:.2e} | {1e3 * dt:.0f} ms/step | "
          f"{tps:,.0f} tok/s | mfu {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
          f"peak {peak:.0f} MiB | eta {eta:.0f}s", flush=True)
    record(run, dict(step=run.step, ms_per_step=1e3 * dt, tokens_per_s=tps, mfu=mfu, peak_mb=peak))
    clock.update(t0=now, t0_step=run.step)


def evaluated_model(run):
    """The model to evaluate: under FSDP rank 0's gathered plain copy (a collective), else the model itself."""
    if not run.cfg.fsdp:
        return run.raw
    sd = memory.full_model_state(run.raw)
    return memory.unsharded_copy(GPT, run.raw.config, sd, run.env.device) if run.env.master else None


def evaluate_periodic(run):
    cfg, env, data = run.cfg, run.env, run.data
    model = evaluated_model(run)
    if not env.master:
        return
    ctx = env.autocast()
    rec = dict(step=run.step, val_loss=estimate_val_loss(model, run.val_tokens, data.meta, cfg.block_size,
                                                         cfg.batch_size, cfg.eval_iters, cfg.seed + 1,
                                                         env.device, ctx))
    msg = f"eval {run.step}: val loss {rec['val_loss']:.4f}"
    if data.task is not None:
        rows = evaluate_reasoning(model, data.tok, data.task, env.device, cfg.eval_problems, ctx=ctx)
        total = summarize(rows)["untagged"]
        rec.update(accuracy=total["accuracy"], mean_tokens=total["mean_tokens"],
                   by_level={r["level"]: dict(accuracy=r["accuracy"], mean_tokens=r["mean_tokens"]) for r in rows})
        msg += f" | accuracy {100 * total['accuracy']:.1f}% ({total['mean_tokens']:.0f} tokens) | " + \
            " ".join(f"L{r['level']} {100 * r['accuracy']:.0f}%/{r['mean_tokens']:.0f}" for r in rows)
    print(msg, flush=True)
    record(run, rec)


def save(run):
    """The exactly-resumable checkpoint (every rank takes part: RNG states and FSDP's shards are gathered)."""
    rngs = runtime.gather_rng_states(run.env)
    sds = memory.full_state_dicts(run.raw, run.optimizer) if run.cfg.fsdp else \
        (run.raw.state_dict(), run.optimizer.state_dict())  # under FSDP: gathered, in the same format
    if run.env.master:
        state = {**model_state(run.raw), "model": sds[0], "optimizer": sds[1], "step": run.step,
                 "config": asdict(run.cfg), "rng": rngs, "loader": run.loader.state_dict(),
                 "dataset": run.cfg.dataset, "data_marks": data_marks(run.data)}
        save_checkpoint(run.ckpt_path, state)


def finish(run):
    """After the last step of the schedule: the final evaluation, and for QAT the converted model's."""
    cfg, env = run.cfg, run.env
    model = evaluated_model(run)
    if not env.master:
        return
    result = final_evaluation(model, run.data, run.val_tokens, cfg, env, os.path.join(cfg.out_dir, "eval.json"),
                              step=run.step)
    record(run, dict(step=run.step, final=True, val_loss=result["val_loss"], summary=result.get("summary")))
    if cfg.qat:
        evaluate_converted(run.raw, run.data, run.val_tokens, cfg, env,
                           os.path.join(cfg.out_dir, "converted.pt"))


# ----------------------------------------------------------------------------- PTQ and converted models

def post_training_quantization(model, data, cfg, env):
    """--ptq: quantize the loaded model (GPTQ calibrates on batches of training data), evaluate it as fake-quant
    (eval.json) and converted (eval_converted.json), and save the converted model to out_dir/ckpt.pt."""
    if env.world > 1:
        raise UserError("--ptq runs in one process: start it with python, not torchrun")
    loader = make_batches(data.tokens("train"), data.meta, cfg.block_size, cfg.batch_size, cfg.seed)
    calib = [dict(zip(("idx", "targets", "pos"), (None if t is None else t.to(env.device) for t in loader.next())))
             for _ in range(cfg.ptq_batches if cfg.ptq == "gptq" else 0)]
    t0 = time.perf_counter()
    try:
        quant.apply_ptq_(model, cfg.ptq, cfg.ptq_spec, calib)
    except ValueError as e:
        raise UserError(f"--ptq {cfg.ptq} --ptq_spec {cfg.ptq_spec}: {str(e).splitlines()[0]}")
    print(f"{cfg.ptq} {cfg.ptq_spec}: quantized in {time.perf_counter() - t0:.1f}s; fake-quant model:")
    val = data.tokens("val")
    with own_out_dir(cfg, env):
        final_evaluation(model, data, val, cfg, env, os.path.join(cfg.out_dir, "eval.json"))
        return evaluate_converted(model, data, val, cfg, env, os.path.join(cfg.out_dir, "ckpt.pt"))


def evaluate_converted(model, data, val_tokens, cfg, env, path):
    """convert_ the fake-quant model in place to real low-bit modules, evaluate it (eval_converted.json) and save
    it to path (loads with --init_from / --eval_only into Int4Linear modules)."""
    try:
        quant.convert_(model)
    except ValueError as e:
        raise UserError(str(e))
    print(f"converted model: {quant.bits_per_weight(model):.3f} bits per weight in the quantized linear layers")
    result = final_evaluation(model, data, val_tokens, cfg, env, os.path.join(cfg.out_dir, "eval_converted.json"))
    save_checkpoint(path, {**model_state(model), "config": asdict(cfg), "dataset": cfg.dataset,
                           "data_marks": data_marks(data)})
    return result


# ----------------------------------------------------------------------------- the run

def run(cfg, explicit):
    cfg, ckpt, model, legacy_dtype = starting_point(cfg, explicit)
    if cfg.resume and nothing_left(cfg.out_dir, ckpt["step"], cfg.stop_after or cfg.max_iters, cfg.max_iters,
                                   "eval.json", "--max_iters"):
        return None
    env = runtime.setup(cfg.device, cfg.dtype, cfg.threads, cfg.seed, legacy_auto=legacy_dtype)
    cfg.dtype = env.dtype  # saved resolved: --resume keeps the precision on a machine where auto means another
    if cfg.fsdp and env.world == 1:
        raise UserError("--fsdp shards over processes: start it with torchrun (torchrun --nproc_per_node 2 train.py "
                        "--fsdp), or drop the flag")
    data = open_dataset(cfg.dataset) if env.master else None  # (the master builds the default corpus)
    runtime.barrier()
    data = data or open_dataset(cfg.dataset, build_default=False)
    source = cfg.init_from or os.path.join(cfg.out_dir, "ckpt.pt")
    check_data(ckpt, data, source, cfg.resume)
    if model is None:
        model = model_from_checkpoint(ckpt, source, cfg.dropout) if ckpt else new_model(cfg, data)
    model = adapt_model(model, cfg, data, env)
    make_batches(data.tokens("val"), data.meta, cfg.block_size, cfg.batch_size, 0, name="val.bin")  # big enough?
    if cfg.eval_only:
        if not env.master:
            return None
        return final_evaluation(model, data, data.tokens("val"), cfg, env, eval_only_path(cfg.out_dir, source))
    if cfg.ptq:
        return post_training_quantization(model, data, cfg, env)
    return train_and_finish(cfg, env, data, model, ckpt)


@contextlib.contextmanager
def own_out_dir(cfg, env):
    """The out_dir is this run's while it writes there: locked (on the master process), and for --overwrite
    cleared of the old run's files, which happens only now that every input has been checked."""
    if not env.master or cfg.plan:
        yield
        return
    with run_lock(cfg.out_dir):
        if not cfg.resume:
            refuse_existing(cfg.out_dir, cfg.overwrite)  # again: a run may have ended here since the first check
        if cfg.overwrite and not cfg.resume:
            clear_run(cfg.out_dir)
        yield


def train_and_finish(cfg, env, data, model, ckpt):
    """Training from set-up (every input checked) to the final evaluation, in an out_dir of its own."""
    run_state, estimate = prepare_training(cfg, env, data, model, ckpt)
    with own_out_dir(cfg, env):
        if env.master and not cfg.plan:
            run_state.log = runtime.MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"),
                                               run_state.step if cfg.resume else None)
            print(f"model {model.get_num_params() / 1e6:.2f}M params | {env.device} {env.dtype} | world "
                  f"{env.world} | {cfg.batch_size * cfg.block_size * cfg.grad_accum * env.world:,} tokens/step | "
                  f"data {data.dir}")
        if cfg.plan:  # a few real steps, measured against the estimate; nothing is written
            meter = memory.PeakMeter(env.device, model, run_state.optimizer).start()
            train(run_state, run_state.step + memory.PLAN_STEPS)
            memory.report_plan(meter, estimate, env.master)
        else:
            train(run_state, cfg.stop_after or cfg.max_iters)
            if run_state.step == cfg.max_iters:
                finish(run_state)
    runtime.teardown(env)


def main(argv=None):
    cli(TrainConfig, run, argv)


if __name__ == "__main__":
    main()
