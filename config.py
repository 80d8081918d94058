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
import json
import math
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field, fields

from data.loader import DataError

# old name -> new name: still accepted, with a one-line note
RENAMED = {"ckpt_every": "grad_ckpt_every"}


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, nothing saved is touched."""


# ----------------------------------------------------------------------------- what a field accepts

def arg(default, *, min=None, max=None, above=None, below=None, choices=None, check=None):
    """A config field's default and what it accepts: a range (min/max inclusive, above/below exclusive),
    choices, or check(value) -> a reason it is wrong, or None. Floats must also be finite. The rule is kept in
    the field's metadata, so flags, TOML and configs read back from checkpoints are all held to it."""
    rule = dict(min=min, max=max, above=above, below=below, choices=choices, check=check)
    return field(default=default, metadata={k: v for k, v in rule.items() if v is not None})


def field_problem(name, typ, value, rule):
    """Why `value` is not acceptable for the field, as "--name ..." in one line, or None."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        return f"--{name} expects {typ.__name__}, got {value!r}"
    if typ is float and not math.isfinite(value):
        return f"--{name} must be a finite number, not {value}"
    limits = (("min", ">=", value < rule.get("min", -math.inf)), ("max", "<=", value > rule.get("max", math.inf)),
              ("above", ">", value <= rule.get("above", -math.inf)),
              ("below", "<", value >= rule.get("below", math.inf))) if typ in (int, float) else ()
    for key, sign, broken in limits:
        if broken:
            return f"--{name} must be {sign} {rule[key]:g}, not {value:g}"
    if "choices" in rule and value not in rule["choices"]:
        return f"--{name} must be one of {', '.join(map(str, rule['choices']))}; not {value!r}"
    why = rule["check"](value) if "check" in rule else None
    return f"--{name} {value!r}: {why}" if why else None


def validate(cfg):
    """UserError (one line, naming the flag) for the first field or relation between fields that is wrong."""
    for f in fields(cfg):
        problem = field_problem(f.name, f.type, getattr(cfg, f.name), f.metadata)
        if problem:
            raise UserError(problem)
    for problem in cfg.relations():
        raise UserError(problem)


class Checked:
    """A config dataclass that validates itself whenever it is made: from flags, TOML, a saved config."""

    def __post_init__(self):
        for f in fields(self):  # ints written where a float is expected are floats
            if f.type is float and type(getattr(self, f.name)) is int:
                setattr(self, f.name, float(getattr(self, f.name)))
        validate(self)

    def relations(self):
        return ()


def _with(fn):
    """check= for a value that `fn` parses (raising ValueError): the parser's first line is the reason."""
    def check(value):
        try:
            value and fn(value)
        except (ValueError, TypeError) as e:
            return str(e).splitlines()[0]
        return None
    return check


def _quant_spec(text):
    import quant
    return quant.parse_spec(text)


def _lora_base(text):
    import lora
    return lora.parse_base(text)


def _memory_size(text):
    import memory
    return memory.parse_bytes(text)


def _numbers(typ, min_value, unique=False):
    """check= for a comma-separated list of numbers, each at least min_value."""
    def check(text):
        try:
            values = [typ(x) for x in text.split(",") if x.strip()]
        except ValueError:
            return f"must be comma-separated {typ.__name__}s, e.g. {'1,2,3' if typ is int else '0.25,0.5'}"
        if any(not math.isfinite(v) or v < min_value for v in values):
            return f"every value must be a finite number >= {min_value:g}"
        if unique and len(set(values)) < len(values):
            return "a value is repeated"
        return None
    return check


def _sweep(text):
    """check= for --sweep: strengths (finite, >= 0) or objectives NAME[:STRENGTH], none repeated."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if text.strip() and not items:
        return "names no run: give strengths (0.25,0.5) or objectives (none,kimi:0.5)"
    for x in items:
        name, colon, a = x.partition(":")
        number = _numbers(float, 0)(x) is None
        if not number and name not in LENGTH_REWARDS:
            return f"{x!r} is neither a strength >= 0 nor one of {', '.join(LENGTH_REWARDS)}[:STRENGTH]"
        if colon and _numbers(float, 0)(a) is not None or colon and not a:
            return f"the strength after {name}: must be a finite number >= 0"
    if len(set(items)) < len(items):
        return "a run is repeated (its results would overwrite its twin's)"
    return None


def _bare_numbers(text):
    items = [x.strip() for x in text.split(",") if x.strip()]
    return bool(items) and all(_numbers(float, 0)(x) is None for x in items)


def _device(text):
    if text in ("auto", "cpu", "mps", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return None
    return "must be auto, cpu, cuda, cuda:N or mps"


def _not_blank(text):
    return "must not be empty" if not text.strip() else None


@dataclass
class TrainConfig(Checked):
    # i/o
    out_dir: str = arg("out", check=_not_blank)  # the run's folder: ckpt.pt, metrics.jsonl, eval.json
    dataset: str = arg("reasoning", check=_not_blank)  # a folder under data/ (or a path) made by data/prepare.py
    init_from: str = ""             # "": from scratch; a checkpoint file; or a local Hugging Face directory
    resume: bool = False            # continue out_dir/ckpt.pt exactly
    overwrite: bool = False         # allow a fresh run to replace an existing out_dir/ckpt.pt
    eval_only: bool = False         # evaluate init_from (or out_dir/ckpt.pt) and exit
    # model
    n_layer: int = arg(4, min=1)    # transformer blocks
    n_head: int = arg(4, min=1)     # attention heads
    n_embd: int = arg(128, min=1)   # width of the residual stream, a multiple of n_head
    rope_heads: int = arg(2, min=0)  # heads that also use rotary positions (see model.py), at most n_head
    gelu: str = arg("exact", choices=("exact", "tanh"))  # tanh: GPT-2's approximation (a checkpoint's own wins)
    block_size: int = arg(224, min=2)  # context length in tokens
    dropout: float = arg(0.0, min=0, below=1)  # on attention, MLP and embedding outputs (0: off)
    bias: bool = False              # biases in Linear and LayerNorm (GPT-2 has them; off: a step 7% cheaper)
    # optimisation
    batch_size: int = arg(36, min=1)  # rows per micro-batch per process
    grad_accum: int = arg(1, min=1)  # micro-batches per step per process
    max_iters: int = arg(700, min=1)  # length of the LR schedule
    stop_after: int = arg(0, min=0)  # stop at this step (0: at max_iters); --resume continues the same schedule
    lr: float = arg(3e-3, above=0)  # peak learning rate, after warm-up
    min_lr: float = arg(3e-4, min=0)  # the cosine schedule's floor, at most lr
    warmup_iters: int = arg(70, min=0)  # steps of linear warm-up
    weight_decay: float = arg(0.1, min=0)  # on matrices only
    beta1: float = arg(0.9, min=0, below=1)  # Adam's first-moment decay
    beta2: float = arg(0.99, min=0, below=1)  # Adam's second-moment decay
    grad_clip: float = arg(1.0, min=0)  # clip the gradient's global norm to this (0: off)
    optim: str = arg("adamw", choices=("adamw", "adamw8bit"))  # adamw8bit: optim.AdamW8bit's 8-bit moments
    # memory (memory.py)
    grad_ckpt: bool = False         # activation checkpointing: blocks recompute their activations in backward
    grad_ckpt_every: int = arg(1, min=1)  # with --grad_ckpt: checkpoint every k-th block
    chunked_loss: bool = False      # loss and its gradient in chunks of rows: (tokens x vocab) logits never held
    fsdp: bool = False              # under torchrun: shard weights, grads, optimizer state (FSDP2) instead of DDP
    plan: bool = False              # print the memory estimate, measure a few steps against it, write nothing
    memory_budget: str = arg("", check=_with(_memory_size))  # e.g. 8GB: the largest micro-batch that fits
    # evaluation and logging
    log_interval: int = arg(50, min=1)  # a progress line every N steps
    eval_interval: int = arg(0, min=0)  # val loss + accuracy every N steps, with a checkpoint (0: only the final)
    eval_iters: int = arg(20, min=1)  # batches averaged for the val loss
    eval_problems: int = arg(100, min=1)  # test problems per level in periodic evaluations (untagged)
    final_problems: int = arg(200, min=1)  # per level and style in the final evaluation
    samples: int = arg(4, min=0)    # answers printed at the end
    # quantization (quant.py's SPEC_GRAMMAR: w8, w4g32, w4a8g32, w3g64, w2g64, w1.58, nf4g64, ...; -lsq learns scales)
    qat: str = arg("", check=_with(_quant_spec))  # fake-quant spec for quantization-aware training ("": off)
    qat_start: int = arg(0, min=0)  # step from which fake-quant is on (before it: float training)
    ptq: str = arg("", choices=("", "rtn", "gptq"))  # quantize --init_from's model, evaluate it, save it converted
    ptq_spec: str = arg("", check=_with(_quant_spec))  # the spec --ptq quantizes to
    ptq_batches: int = arg(16, min=1)  # GPTQ calibration batches from the training data
    # LoRA / QLoRA fine-tuning of --init_from's model (lora.py)
    lora_rank: int = arg(0, min=0)  # > 0: freeze the model and train rank-R adapters on --lora_targets
    lora_alpha: float = arg(16.0, above=0)  # the adapters' output is scaled by alpha / rank
    lora_dropout: float = arg(0.0, min=0, below=1)  # on the adapters' input
    lora_base: str = arg("float", check=_with(_lora_base))  # float, int4g64, nf4g64, nf4g64-dq, int3g64, ...
    lora_targets: str = arg("c_attn,c_proj,c_fc", check=_not_blank)  # linear layers that get adapters
    loftq: bool = False             # LoftQ: initialise the 4-bit base and the adapters together (else B = 0)
    loftq_iters: int = arg(5, min=1)  # LoftQ's alternating steps
    loftq_split: str = arg("lora", choices=("lora", "sqrt"))  # lora: A at LoRA's init, B the rest; sqrt: both
    lora_merge: bool = False        # merge --init_from's adapters into float weights (then --ptq to requantize)
    # system
    device: str = arg("auto", check=_device)  # auto: cuda > mps > cpu
    dtype: str = arg("auto", choices=("auto", "float32", "bfloat16"))  # auto: bf16 on CUDA and bf16 CPUs
    compile: bool = False           # torch.compile the model
    seed: int = arg(1337, min=0, max=2 ** 32 - 1)  # data order, initialisation, sampling
    threads: int = arg(0, min=0)    # torch CPU threads (0: torch's default)

    def relations(self):
        yield from _problems(
            (self.n_embd % self.n_head, f"--n_embd {self.n_embd} must be a multiple of --n_head {self.n_head}"),
            (self.rope_heads > self.n_head, f"--rope_heads {self.rope_heads} exceeds --n_head {self.n_head}"),
            (self.stop_after > self.max_iters, f"--stop_after {self.stop_after} is beyond --max_iters "
                                               f"{self.max_iters}"),
            (self.qat and self.qat_start >= self.max_iters,
             f"--qat_start {self.qat_start} is at or beyond the last step {self.max_iters}: fake-quant would "
             f"never be on; lower it"),
            (self.qat_start and not self.qat, "--qat_start needs --qat SPEC"),
            (self.ptq and not (self.ptq_spec and self.init_from) or self.ptq and self.qat,
             "--ptq rtn|gptq needs --ptq_spec SPEC and --init_from CHECKPOINT, and no --qat"),
            (self.ptq_spec and not self.ptq, "--ptq_spec needs --ptq rtn|gptq"),
            (self.resume and self.eval_only, "--resume and --eval_only do not combine: drop one"),
            (self.optim == "adamw8bit" and self.fsdp,
             "--optim adamw8bit does not shard its state under --fsdp yet; use DDP (drop --fsdp)"),
        )
        import lora  # (torch: loaded only when a config is checked)
        yield from _problems((lora.check_flags(self), lora.check_flags(self)))


def _problems(*pairs):
    """The messages whose condition holds."""
    return [why for broken, why in pairs if broken]


LENGTH_REWARDS = ("none", "kimi", "arora", "l1", "gfpo", "adaptthink", "laser")


@dataclass
class RLConfig(Checked):
    # i/o
    init_from: str = arg("out/ckpt.pt", check=_not_blank)  # the checkpoint to improve (train.py's output)
    out_dir: str = arg("out_rl", check=_not_blank)  # the run's folder: ckpt.pt, metrics.jsonl, summary.json
    resume: bool = False            # continue out_dir/ckpt.pt exactly
    overwrite: bool = False         # allow a fresh run to replace an existing out_dir/ckpt.pt
    eval_only: bool = False         # the per-level table of init_from, and exit
    sweep: str = arg("", check=_sweep)  # strengths (0.25,0.5: baseline + each) or objectives (none,kimi:0.5,laser)
    # rollouts
    steps: int = arg(40, min=1)     # RL steps (one batch of rollouts each)
    stop_after: int = arg(0, min=0)  # stop (and save) at this step; --resume continues the same run
    prompts_per_step: int = arg(16, min=1)
    group_size: int = arg(8, min=2)  # samples per prompt (advantages compare samples within a group)
    temperature: float = arg(1.0, above=0)  # rollouts are sampled
    top_k: int = arg(0, min=0)      # 0: off
    max_new_tokens: int = arg(0, min=0, check=lambda v: None if v == 0 or v >= 8 else
                              "too few tokens to answer in: give at least 8, or 0")  # 0: what block_size leaves
    truncated: str = arg("zero", choices=("zero", "mask"))  # zero: reward 0 | mask: left out of the loss
    levels: str = arg("", check=_numbers(int, 1, unique=True))  # training prompts' levels, e.g. 1,2,3 ("": all)
    # loss
    advantage: str = arg("zscore", choices=("zscore", "mean", "batch"))  # zscore (GRPO) | mean (Dr. GRPO) | batch
    norm: str = arg("token", choices=("seq", "token", "const"))  # seq (GRPO) | token (DAPO) | const (Dr. GRPO)
    epochs: int = arg(1, min=1)     # updates per batch of rollouts; >1 uses the clipped ratio
    clip_low: float = arg(0.2, min=0, below=1)
    clip_high: float = arg(0.28, min=0)
    kl_coef: float = arg(0.0, min=0)  # k3 KL to the starting model (0: off, and no reference copy is kept)
    lr: float = arg(5e-5, above=0)  # small: Adam moves every weight by ~lr a step, and the working must survive
    weight_decay: float = arg(0.0, min=0)
    grad_clip: float = arg(1.0, min=0)  # 0: off
    micro_batch: int = arg(64, min=1)  # rows per forward/backward pass (memory, not maths)
    # length objective
    length_reward: str = arg("laser", choices=LENGTH_REWARDS)  # the length term (laser: LASER-D, per level)
    alpha: float = arg(0.5, min=0)  # strength of the length term (its units depend on length_reward)
    solve_threshold: float = arg(0.5, min=0, max=1)  # the length term only in groups solving this share
    penalty_warmup: int = arg(0, min=0)  # steps over which the length term ramps up from 0
    l1_targets: str = arg("16,32,64,128,192", check=_numbers(int, 1))  # l1: target lengths for the prompts
    l1_eval_target: int = arg(32, min=1)  # l1: the budget written in evaluation prompts
    gfpo_keep: int = arg(4, min=1)  # gfpo: samples per group trained on
    gfpo_metric: str = arg("length", choices=("length", "efficiency"))  # gfpo: keep the shortest or best per token
    # when to think (rewards.py), dynamic sampling, the optimizer (adamw8bit for QLoRA adapters), the sweep's seeds
    laser_coverage: float = arg(0.125, above=0, max=1)  # laser: share of a level's samples right within target
    resample_rounds: int = arg(1, min=0)  # dynamic sampling: re-roll groups whose rewards are all equal, N times
    optim: str = arg("adamw", choices=("adamw", "adamw8bit"))  # adamw8bit: optim.AdamW8bit's 8-bit moments
    sweep_seeds: str = arg("", check=_numbers(int, 0, unique=True))  # --sweep: seeds, each method once per seed
    # evaluation
    eval_interval: int = arg(0, min=0)  # greedy eval on test problems every N steps (0: at the start and end)
    eval_problems: int = arg(200, min=1)  # per level
    # system
    device: str = arg("auto", check=_device)  # auto: cuda > mps > cpu
    dtype: str = arg("auto", choices=("auto", "float32", "bfloat16"))  # the same policy as train.py
    seed: int = arg(1337, min=0, max=2 ** 32 - 1)
    threads: int = arg(0, min=0)    # torch CPU threads (0: torch's default)

    def relations(self):
        return _problems(
            (self.stop_after > self.steps, f"--stop_after {self.stop_after} is beyond --steps {self.steps}"),
            (self.length_reward == "gfpo" and self.gfpo_keep > self.group_size,
             f"--gfpo_keep {self.gfpo_keep} exceeds --group_size {self.group_size}"),
            (self.resume and self.eval_only, "--resume and --eval_only do not combine: drop one"),
            (self.sweep and (self.resume or self.eval_only or self.stop_after),
             "--sweep runs each of its runs to the end: drop --resume, --eval_only and --stop_after"),
            (self.sweep_seeds and not self.sweep, "--sweep_seeds needs --sweep"),
            (self.length_reward == "l1" and not self.l1_targets.strip(", "), "--length_reward l1 needs --l1_targets"),
            (_bare_numbers(self.sweep) and self.length_reward == "none",
             "--sweep with strengths varies --length_reward: give one other than none (e.g. --length_reward kimi)"),
        )


BENCH_SHAPES = ("gpt2-small", "smollm2-135m", "qwen2.5-0.5b")


@dataclass
class BenchConfig(Checked):
    POSITIONAL = "sections"         # python bench.py train generate ...
    sections: str = ""              # which sections, comma-separated or as bare words ("": all that apply here)
    json: str = ""                  # also write the figures to this file (its folder must exist)
    device: str = arg("auto", check=_device)  # auto: cuda if present, else cpu
    dtype: str = arg("auto", choices=("auto", "float32", "bfloat16"))  # ours in train, qat, lora, memory
    shape: str = arg("gpt2-small", choices=BENCH_SHAPES)  # the real model shape of train, lora and memory
    init_from: str = ""             # generate: time this checkpoint's model instead of the default
    quick: bool = False             # tiny stand-in shapes (not --shape) and fewer repeats (for tests)

    def relations(self):
        folder = os.path.dirname(os.path.abspath(self.json)) if self.json else ""
        return _problems((folder and not os.path.isdir(folder),
                          f"--json {self.json}: its folder does not exist; create it or give another path"),
                         (self.json and os.path.isdir(self.json), f"--json {self.json} is a folder: name a file"),
                         (self.json and os.path.lexists(self.json) and not os.path.isdir(self.json)
                          and not _bench_result(self.json),
                          f"--json {self.json} exists and is not a bench.py result, which is all --json replaces: "
                          f"give another path"))


def _bench_result(path):
    """Whether `path` is a regular file holding what bench.py writes (a JSON object with env and rows), or empty."""
    if not os.path.isfile(path):
        return False
    if os.path.getsize(path) == 0:  # an empty file made for it (mktemp)
        return True
    try:
        with open(path, "rb") as f:
            if f.read(64).lstrip()[:1] != b"{":  # (a checkpoint is not read whole to learn that)
                return False
            f.seek(0)
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and isinstance(saved.get("env"), dict) and isinstance(saved.get("rows"), list)


# ----------------------------------------------------------------------------- parsing

BOOL_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off")


def _convert(name, typ, value, default=None):
    if typ is tuple:
        return _convert_tuple(name, value, type(default[0]) if default else float)  # () holds floats
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        if typ is bool and value.lower() in BOOL_WORDS:
            return value.lower() in ("1", "true", "yes", "on")
        try:
            if typ in (int, float):
                return typ(value)
        except ValueError:
            pass
        if typ is str:
            return value
    raise UserError(f"--{name} expects {typ.__name__}, got {value!r}")


def _convert_tuple(name, value, elem):
    """A tuple of `elem` from "1,2,3" (a flag) or [1, 2, 3] (TOML); "" is the empty tuple."""
    items = [x.strip() for x in value.split(",") if x.strip()] if isinstance(value, str) else value
    try:
        if isinstance(items, (list, tuple)) and all(isinstance(x, str) or type(x) in (elem, int) for x in items):
            return tuple(elem(x) for x in items)
    except ValueError:
        pass
    raise UserError(f"--{name} expects comma-separated {elem.__name__}s such as "
                    f"{'1,2,3' if elem is int else '0.5,0.5'}, got {value!r}")


def _split_flags(argv, types, positional=None):
    """{name: text} from `--key value`, `--key=value` and bare `--flag` (bools); bare words, where the config
    takes them (its POSITIONAL field), are joined with commas into that field."""
    given, i, words = {}, 0, []
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") and positional:
            words.append(arg)
            i += 1
            continue
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: flags look like --name value or --name=value")
        key, eq, val = arg[2:].partition("=")
        key = _renamed(key, types)
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            if types.get(key) is bool and (nxt is None or (positional and nxt.lower() not in BOOL_WORDS)):
                val = "true"  # a bare boolean flag (where the config takes words, a word after it is one)
            elif nxt is not None:
                val, i = nxt, i + 1
            elif key in types or key == "config":
                raise UserError(f"--{key} needs a value")
        given[key] = val
        i += 1
    if words:
        given[positional] = ",".join(words)
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
    defaults = {f.name: f.default for f in fields(cls)}
    given = _split_flags(argv, types, getattr(cls, "POSITIONAL", None))
    values = _read_toml(given.pop("config"), types) if "config" in given else {}
    values.update(given)
    for key in values:
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; --help lists them"
            raise UserError(f"unknown flag --{key}{hint}")
    cfg = cls(**{k: _convert(k, types[k], v, defaults[k]) for k, v in values.items()})
    return cfg, set(values)


def usage(cls, program):
    """--help: every field with its default and the comment written beside it in the dataclass."""
    comments = {}
    for klass in reversed([k for k in cls.__mro__ if "__dataclass_fields__" in vars(k)]):  # a subclass's win
        for line in inspect.getsource(klass).splitlines():
            name, _, rest = line.strip().partition(":")
            if "#" in rest and name.isidentifier():
                comments[name] = rest.split("#", 1)[1].strip()
    words = f" [{cls.POSITIONAL} ...]" if getattr(cls, "POSITIONAL", None) else ""
    lines = [f"usage: python {program}{words} [--config FILE.toml] [--name value ...]", ""]
    for f in fields(cls):
        text = f"{comments.get(f.name, '')}{_rule_text(f.metadata)}".strip()
        lines.append(f"  --{f.name:<18} {f.type.__name__:<5} default {f.default!r:<14} {text}")
    return "\n".join(line.rstrip() for line in lines)


def _rule_text(rule):
    """A field's rule as --help shows it: [>= 1], [one of a|b], ..."""
    signs = dict(min=">=", max="<=", above=">", below="<")
    parts = [f"{signs[k]} {rule[k]:g}" for k in signs if k in rule]
    if "choices" in rule:
        parts.append("one of " + "|".join(map(str, rule["choices"])))
    return f" [{', '.join(parts)}]" if parts else ""


def print_help(text):
    """--help's text on stdout; a reader that stops early (`| head`) is no error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit


def cli(cls, entry, argv=None):
    """Flags -> cls -> entry(cfg, explicit); bad input is one line on stderr and exit status 2."""
    program = os.path.basename(sys.argv[0]) if argv is None else cls.__name__
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print_help(usage(cls, program))
        return
    try:
        cfg, explicit = parse_config(cls, argv)
        return entry(cfg, explicit)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full disk, a folder without write permission: the message names the file
        print(f"error: {e.strerror or e}: {e.filename or ''} (files saved before are intact)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: files saved before are intact; nothing more was saved", file=sys.stderr)
        sys.exit(130)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError (CUDA), a failed CPU allocation
        if not out_of_memory(e):
            raise
        print(f"error: out of memory ({_first_line(e)}): smaller batches or sequences need less; files saved "
              f"before are intact", file=sys.stderr)
        sys.exit(1)


def out_of_memory(e):
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or \
        any(words in str(e) for words in ("can't allocate memory", "MPS backend out of memory"))


def _first_line(e):
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= 120 else line[:117] + "..."
