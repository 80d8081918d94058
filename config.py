"""config.py: every entry point's configuration, and the one parser that fills it from flags and TOML.

    TrainConfig   train.py's flags          RLConfig   reason_rl.py's flags

Ideas it rests on:
- One dataclass is a program's whole configuration. Its fields are the flags (`--n_layer 6`, `--n_layer=6`, bare
  `--flag` for booleans); `--config file.toml` supplies values first (read with tomllib, never executed); an
  unknown flag or a wrong type is a one-line error naming the closest fields; `--help` lists the fields with
  their defaults and the comment beside each.
- A renamed field keeps its old spelling for a while (RENAMED), in flags, TOML and saved configs alike.
"""
import difflib
import inspect
import os
import sys
import tomllib
from dataclasses import dataclass, fields

from data.loader import DataError

# old name -> new name: still accepted, with a one-line note
RENAMED = {"ckpt_every": "grad_ckpt_every"}


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, nothing saved is touched."""


@dataclass
class TrainConfig:
    # i/o
    out_dir: str = "out"
    dataset: str = "reasoning"      # a folder under data/ (or a path) made by data/prepare.py; reasoning is built
    init_from: str = ""             # "": from scratch; a checkpoint file; or a local Hugging Face directory
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
    grad_ckpt_every: int = 1        # with --grad_ckpt: checkpoint every k-th block
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
    dtype: str = "auto"             # auto: bf16 autocast on CUDA (bf16) and bf16-native CPUs, else float32
    compile: bool = False
    seed: int = 1337
    threads: int = 0                # torch CPU threads (0: torch's default)


LENGTH_REWARDS = ("none", "kimi", "arora", "l1", "gfpo", "adaptthink", "laser")


@dataclass
class RLConfig:
    # i/o
    init_from: str = "out/ckpt.pt"  # the checkpoint to improve (train.py's default output)
    out_dir: str = "out_rl"
    resume: bool = False            # continue out_dir/ckpt.pt exactly
    overwrite: bool = False         # allow a fresh run to replace an existing out_dir/ckpt.pt
    eval_only: bool = False         # the per-level table of init_from, and exit
    sweep: str = ""                 # comma-separated strengths: runs the no-length baseline and each one
    # rollouts
    steps: int = 40
    stop_after: int = 0             # stop (and save) at this step; --resume continues the same run
    prompts_per_step: int = 16
    group_size: int = 8             # samples per prompt
    temperature: float = 1.0
    top_k: int = 0                  # 0: off
    max_new_tokens: int = 0         # 0: whatever the model's block_size leaves after the longest prompt
    truncated: str = "zero"         # zero: a truncated sample gets reward 0 | mask: it is left out of the loss
    levels: str = ""                # levels the training prompts come from, e.g. "1,2,3" ("": all, evenly)
    # loss
    advantage: str = "zscore"       # zscore (GRPO) | mean (Dr. GRPO: no division by the group's std)
    norm: str = "token"             # seq (GRPO) | token (DAPO) | const (Dr. GRPO: by max_new_tokens)
    epochs: int = 1                 # updates per batch of rollouts; >1 uses the clipped ratio
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0            # k3 KL to the starting model (0: off, and no reference copy is kept)
    lr: float = 5e-5                # small: Adam moves every weight by ~lr a step, and the working must survive
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch: int = 64           # rows per forward/backward pass (memory, not maths)
    # length objective
    length_reward: str = "laser"    # one of LENGTH_REWARDS (laser: LASER-D, a length target per level)
    alpha: float = 0.5              # strength of the length term (its units depend on length_reward)
    solve_threshold: float = 0.5    # apply the length term only in groups solving at least this share
    penalty_warmup: int = 0         # steps over which the length term ramps up from 0
    l1_targets: str = "16,32,64,128,192"  # l1: target lengths drawn for the prompts
    l1_eval_target: int = 32        # l1: the budget written in evaluation prompts
    gfpo_keep: int = 4              # gfpo: samples per group trained on
    gfpo_metric: str = "length"     # gfpo: keep the shortest (length) or the best reward per token (efficiency)
    # when to think (rewards.py), dynamic sampling, the optimizer (adamw8bit for QLoRA adapters), the sweep's seeds
    laser_coverage: float = 0.125   # laser: share of a level's samples right within its target (1/group_size)
    resample_rounds: int = 1        # dynamic sampling: re-roll groups whose rewards are all equal, up to N times
    optim: str = "adamw"            # adamw | adamw8bit (optim.AdamW8bit: 8-bit moments)
    sweep_seeds: str = ""           # --sweep: comma-separated seeds, every method once per seed ("": --seed)
    # evaluation
    eval_interval: int = 0          # greedy eval on test problems every N steps (0: at the start and end only)
    eval_problems: int = 200        # per level
    # system
    device: str = "auto"            # auto: cuda > mps > cpu
    dtype: str = "auto"             # auto | float32 | bfloat16 (the same policy as train.py)
    seed: int = 1337
    threads: int = 0                # torch CPU threads (0: torch's default)


# ----------------------------------------------------------------------------- parsing

def _convert(name, typ, value):
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        if typ is bool and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        try:
            if typ in (int, float):
                return typ(value)
        except ValueError:
            pass
        if typ is str:
            return value
    raise UserError(f"--{name} expects {typ.__name__}, got {value!r}")


def _split_flags(argv, types):
    """{name: text} from `--key value`, `--key=value` and bare `--flag` (bools)."""
    given, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: flags look like --name value or --name=value")
        key, eq, val = arg[2:].partition("=")
        key = _renamed(key, types)
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val, i = argv[i + 1], i + 1
            elif types.get(key) is bool:
                val = "true"
            elif key in types or key == "config":
                raise UserError(f"--{key} needs a value")
        given[key] = val
        i += 1
    return given


def _renamed(key, types):
    new = RENAMED.get(key)
    if new in types:
        print(f"note: --{key} is now --{new}; the old name will stop working in a later version", file=sys.stderr)
        return new
    return key


def _read_toml(path, types):
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} not found")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid TOML: {str(e).splitlines()[0]}")
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory")
    return {_renamed(k, types): v for k, v in values.items()}


def parse_config(cls, argv):
    """(config, names set explicitly) from flags and `--config file.toml` (flags win). Unknown keys are errors
    that name the closest fields."""
    types = {f.name: f.type for f in fields(cls)}
    given = _split_flags(argv, types)
    values = _read_toml(given.pop("config"), types) if "config" in given else {}
    values.update(given)
    for key in values:
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; --help lists them"
            raise UserError(f"unknown flag --{key}{hint}")
    cfg = cls(**{k: _convert(k, types[k], v) for k, v in values.items()})
    return cfg, set(values)


def usage(cls, program):
    """--help: every field with its default and the comment written beside it in the dataclass."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            comments[name] = rest.split("#", 1)[1].strip()
    lines = [f"usage: python {program} [--config FILE.toml] [--name value ...]", ""]
    for f in fields(cls):
        lines.append(f"  --{f.name:<18} {f.type.__name__:<5} default {f.default!r:<14} {comments.get(f.name, '')}")
    return "\n".join(line.rstrip() for line in lines)


def cli(cls, entry, argv=None):
    """Flags -> cls -> entry(cfg, explicit); bad input is one line on stderr and exit status 2."""
    program = os.path.basename(sys.argv[0]) if argv is None else cls.__name__
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(usage(cls, program))
        return
    try:
        cfg, explicit = parse_config(cls, argv)
        entry(cfg, explicit)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: nothing was saved since the last checkpoint", file=sys.stderr)
        sys.exit(130)
