"""Bad-input cases for train.py: flags, TOML, checkpoints, output folders, resume conflicts (tests/test_bad_input.py).
`{w}` is the case's copy of the world (tests/badworld.py): data_tiny/, text_tiny/, run/ (a finished run)."""
import os
import pickle
import zipfile

import torch

from badworld import DATA, TINY, Case, disk_full, raises

NEW = TINY + DATA + ["--out_dir", "new"]


def flag(name, value, expect, extra=()):
    """A fresh run with one bad flag."""
    with_ = "".join(f"-with{e}" for e in extra if e.startswith("--"))
    return Case(f"train-{name}-{value}{with_}".replace(" ", "_"), "train", NEW + [f"--{name}", str(value), *extra],
                expect)


def toml(text, expect, name):
    def setup(w):
        with open(os.path.join(w, "bad.toml"), "w") as f:
            f.write(text)
    return Case(f"train-toml-{name}", "train", NEW + ["--config", "bad.toml"], expect, setup)


def _edit_ckpt(edit, name="ckpt.pt"):
    """setup: a copy of run/ckpt.pt at bad/NAME, changed by edit(ckpt dict)."""
    def setup(w):
        ck = torch.load(os.path.join(w, "run", "ckpt.pt"), weights_only=True)
        edit(ck)
        os.makedirs(os.path.join(w, "bad"), exist_ok=True)
        torch.save(ck, os.path.join(w, "bad", name))
    return setup


def _write(path, data):
    def setup(w):
        full = os.path.join(w, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data(w) if callable(data) else data)
    return setup


def _random_zip(w):
    p = os.path.join(w, "z.zip")
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", os.urandom(300))
    return open(p, "rb").read()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _setitem(d, keys, value):
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


def ck_case(name, edit, expect, mode="init"):
    argv = (NEW + ["--init_from", "bad/ckpt.pt"]) if mode == "init" else \
        ["--eval_only", "--init_from", "bad/ckpt.pt", "--out_dir", "ev", *DATA, "--threads", "1"]
    return Case(f"train-ckpt-{name}-{mode}", "train", argv, expect, _edit_ckpt(edit))


CASES = [
    # numbers out of range, non-finite, wrong types
    flag("grad_clip", -1, r"--grad_clip must be >= 0"),
    flag("min_lr", "nan", r"--min_lr must be a finite"),
    flag("lr", "nan", r"--lr must be a finite"),
    flag("lr", "inf", r"--lr must be a finite"),
    flag("lr", 0, r"--lr must be > 0"),
    flag("lr", -1e-3, r"--lr must be > 0"),
    flag("lr", "fast", r"--lr expects float"),
    flag("min_lr", 0.1, r"--min_lr 0.1 is above --lr"),  # (given: an error; the default is lowered with lr)
    flag("beta1", 1.5, r"--beta1 must be < 1"),
    flag("beta2", -0.1, r"--beta2 must be >= 0"),
    flag("beta2", 1, r"--beta2 must be < 1"),
    flag("weight_decay", -0.1, r"--weight_decay must be >= 0"),
    flag("dropout", 1, r"--dropout must be < 1"),
    flag("dropout", -0.5, r"--dropout must be >= 0"),
    flag("threads", -1, r"--threads must be >= 0"),
    flag("seed", -1, r"--seed must be >= 0"),
    flag("seed", 2 ** 40, r"--seed must be <="),
    flag("batch_size", 0, r"--batch_size must be >= 1"),
    flag("grad_accum", 0, r"--grad_accum must be >= 1"),
    flag("max_iters", 0, r"--max_iters must be >= 1"),
    flag("max_iters", 2.5, r"--max_iters expects int"),
    flag("stop_after", -3, r"--stop_after must be >= 0"),
    flag("stop_after", 10, r"--stop_after 10 is beyond --max_iters 4"),
    flag("warmup_iters", -1, r"--warmup_iters must be >= 0"),
    flag("log_interval", 0, r"--log_interval must be >= 1"),
    flag("eval_interval", -5, r"--eval_interval must be >= 0"),
    flag("eval_iters", 0, r"--eval_iters must be >= 1"),
    flag("final_problems", 0, r"--final_problems must be >= 1"),
    flag("samples", -1, r"--samples must be >= 0"),
    flag("n_layer", 0, r"--n_layer must be >= 1"),
    flag("n_head", 3, r"--n_embd 32 must be a multiple of --n_head 3"),
    flag("n_embd", -8, r"--n_embd must be >= 1"),
    flag("rope_heads", 5, r"--rope_heads 5 exceeds --n_head 2"),
    flag("block_size", 1, r"--block_size must be >= 2"),
    flag("block_size", 20, r"block_size 20 leaves no room"),
    flag("grad_ckpt_every", 0, r"--grad_ckpt_every must be >= 1"),
    flag("gelu", "relu", r"--gelu must be one of exact, tanh"),
    flag("optim", "sgd", r"--optim must be one of adamw, adamw8bit"),
    flag("device", "tpu", r"--device 'tpu'"),
    flag("device", "cuda", r"--device cuda: no CUDA device"),
    flag("dtype", "float16", r"--dtype must be one of"),
    flag("dtype", "fp8", r"--dtype must be one of"),
    flag("memory_budget", "8XB", r"--memory_budget '8XB'"),
    flag("memory_budget", "1KB", r"--memory_budget 1KB"),
    flag("bias", "maybe", r"--bias expects bool"),
    flag("compile", "2", r"--compile expects bool"),
    # quantization and LoRA flags
    flag("qat", "w9", r"--qat 'w9'"),
    flag("qat", "w4g33", r"--qat 'w4g33'"),
    flag("qat_start", 1000, r"--qat_start 1000 is at or beyond the last step", ("--qat", "w4g32")),
    flag("qat_start", 4, r"--qat_start 4 is at or beyond the last step 4", ("--qat", "w4g32", "--stop_after", "2")),
    flag("qat_start", 2, r"--qat_start needs --qat"),
    flag("ptq", "awq", r"--ptq must be one of"),
    flag("ptq", "rtn", r"--ptq rtn\|gptq needs --ptq_spec"),
    flag("ptq_spec", "w4g32", r"--ptq_spec needs --ptq"),
    flag("ptq_spec", "w4gx", r"--ptq_spec 'w4gx'", ("--ptq", "rtn", "--init_from", "run/ckpt.pt")),
    flag("ptq_batches", 0, r"--ptq_batches must be >= 1"),
    flag("lora_rank", 4, r"LoRA fine-tunes a trained model: give --init_from"),
    flag("lora_rank", -1, r"--lora_rank must be >= 0"),
    flag("lora_alpha", 0, r"--lora_alpha must be > 0"),
    flag("lora_dropout", 1.0, r"--lora_dropout must be < 1"),
    flag("lora_base", "nf5", r"--lora_base 'nf5'"),
    flag("lora_base", "nf4g48", r"--lora_base 'nf4g48'"),
    flag("lora_targets", " ", r"--lora_targets ' ': must not be empty"),
    flag("loftq_split", "half", r"--loftq_split must be one of lora, sqrt"),
    flag("loftq_iters", 0, r"--loftq_iters must be >= 1"),
    flag("loftq", "true", r"--loftq needs --lora_rank", ("--init_from", "run/ckpt.pt")),
    flag("lora_rank", 4, r"does not combine with --qat", ("--init_from", "run/ckpt.pt", "--qat", "w4g32")),
    flag("optim", "adamw8bit", r"adamw8bit does not shard its state under --fsdp", ("--fsdp",)),
    flag("fsdp", "true", r"--fsdp shards over processes"),
    # command-line shape
    Case("train-unknown-flag", "train", NEW + ["--n_layr", "3"], r"unknown flag --n_layr; did you mean --n_layer"),
    Case("train-missing-value", "train", TINY + DATA + ["--out_dir"], r"--out_dir needs a value"),
    Case("train-positional", "train", NEW + ["train"], r"unexpected argument 'train'"),
    Case("train-empty-out-dir", "train", TINY + DATA + ["--out_dir", ""], r"--out_dir '': must not be empty"),
    Case("train-missing-config", "train", NEW + ["--config", "nope.toml"], r"config file nope.toml not found"),
    Case("train-config-is-dir", "train", NEW + ["--config", "run"], r"config file run is a directory"),
    # TOML
    toml("eval_interval = 'four'\n", r"--eval_interval expects int", "string-for-int"),
    toml("lr = -1.0\n", r"--lr must be > 0", "negative-lr"),
    toml("grad_clip = -1\n", r"--grad_clip must be >= 0", "grad-clip"),
    toml("n_layr = 3\n", r"unknown flag --n_layr", "unknown-key"),
    toml("ptq_batches = [1, 2]\n", r"--ptq_batches expects int", "list"),
    toml("lr = nan\n", r"--lr must be a finite", "nan"),
    toml("lr = \n", r"bad.toml is not valid TOML", "syntax"),
    toml("\xff\xfe", r"bad.toml is not valid TOML", "binary"),
    toml("optim = 'sgd'\n", r"--optim must be one of", "optim"),
    toml("dropout = true\n", r"--dropout expects float", "bool-for-float"),
    # checkpoints given as --init_from
    Case("train-init-missing", "train", NEW + ["--init_from", "none.pt"], r"no checkpoint at none.pt"),
    Case("train-init-empty-file", "train", NEW + ["--init_from", "bad/e.pt"], r"bad/e.pt is corrupt",
         _write("bad/e.pt", b"")),
    Case("train-init-text-file", "train", NEW + ["--init_from", "notes.txt"], r"notes.txt is corrupt"),
    Case("train-init-random-zip", "train", NEW + ["--init_from", "bad/z.pt"], r"bad/z.pt is corrupt",
         _write("bad/z.pt", _random_zip)),
    Case("train-init-truncated", "train", NEW + ["--init_from", "bad/t.pt"], r"bad/t.pt is corrupt",
         _write("bad/t.pt", lambda w: open(os.path.join(w, "run", "ckpt.pt"), "rb").read()[:5000])),
    Case("train-init-code-pickle", "train", NEW + ["--init_from", "bad/evil.pt"], r"could run code",
         _write("bad/evil.pt", pickle.dumps(_Evil()))),
    Case("train-init-code-torch", "train", NEW + ["--init_from", "bad/evil2.pt"], r"could run code",
         lambda w: (os.makedirs(os.path.join(w, "bad"), exist_ok=True),
                    torch.save({"model": _Evil()}, os.path.join(w, "bad", "evil2.pt")))),
    Case("train-init-list", "train", NEW + ["--init_from", "bad/l.pt"], r"not a checkpoint of this trainer",
         lambda w: (os.makedirs(os.path.join(w, "bad"), exist_ok=True),
                    torch.save([1, 2], os.path.join(w, "bad", "l.pt")))),
    ck_case("n-head-3", lambda ck: _setitem(ck, ["model_config", "n_head"], 3), r"bad/ckpt.pt.*model config"),
    ck_case("n-head-3", lambda ck: _setitem(ck, ["model_config", "n_head"], 3), r"bad/ckpt.pt.*model config",
            "eval"),
    ck_case("n-embd-str", lambda ck: _setitem(ck, ["model_config", "n_embd"], "32"), r"bad/ckpt.pt.*n_embd"),
    ck_case("vocab-0", lambda ck: _setitem(ck, ["model_config", "vocab_size"], 0), r"bad/ckpt.pt.*vocab_size"),
    ck_case("dropout-nan", lambda ck: _setitem(ck, ["model_config", "dropout"], float("nan")),
            r"bad/ckpt.pt.*dropout", "eval"),
    ck_case("config-list", lambda ck: _setitem(ck, ["model_config"], [1]), r"bad/ckpt.pt"),
    ck_case("no-model", lambda ck: ck.pop("model"), r"bad/ckpt.pt is not a checkpoint"),
    ck_case("weight-shape", lambda ck: _setitem(ck, ["model", "lm_head.weight"], torch.zeros(3, 3)),
            r"bad/ckpt.pt: its weights do not fit"),
    ck_case("missing-weight", lambda ck: ck["model"].pop("transformer.ln_f.weight"),
            r"bad/ckpt.pt: its weights do not fit", "eval"),
    ck_case("extra-weight", lambda ck: _setitem(ck, ["model", "extra.weight"], torch.zeros(1)),
            r"bad/ckpt.pt: its weights do not fit"),
    ck_case("gelu-bad", lambda ck: _setitem(ck, ["model_config", "gelu"], "relu"), r"bad/ckpt.pt.*gelu"),
    ck_case("quant-bad", lambda ck: _setitem(ck, ["quant"], {"transformer.h.0.attn.c_attn": "w99"}),
            r"bad/ckpt.pt"),
    Case("train-conflicting-shape-flag", "train", NEW + ["--init_from", "run/ckpt.pt", "--n_layer", "3"],
         r"--n_layer 3 differs from run/ckpt.pt's 1"),
    Case("train-block-beyond-ckpt", "train", NEW + ["--init_from", "run/ckpt.pt", "--block_size", "500"],
         r"--block_size 500 exceeds run/ckpt.pt's 96"),
    Case("train-hf-dir-empty", "train", NEW + ["--init_from", "emptydir"], r"emptydir",
         lambda w: os.makedirs(os.path.join(w, "emptydir"))),
    Case("train-hf-dir-bad-config", "train", NEW + ["--init_from", "hf"], r"could not load hf",
         _write("hf/config.json", b"[1, 2]")),
    # output folders
    Case("train-existing-run", "train", TINY + DATA + ["--out_dir", "run"], r"run/ckpt.pt already holds a run"),
    Case("train-out-dir-is-file", "train", TINY + DATA + ["--out_dir", "notes.txt"], r"--out_dir notes.txt is a file"),
    Case("train-eval-out-dir-is-file", "train", ["--eval_only", "--init_from", "run/ckpt.pt", "--out_dir",
                                                 "notes.txt"], r"--out_dir notes.txt is a file"),
    Case("train-eval-only-nothing", "train", ["--eval_only", "--out_dir", "empty"], r"no checkpoint at empty/ckpt.pt"),
    Case("train-overwrite-bad-dataset", "train", TINY + ["--dataset", "nowhere", "--out_dir", "run", "--overwrite"],
         r"no dataset at .*nowhere"),
    Case("train-overwrite-bad-budget", "train", NEW[:-2] + ["--out_dir", "run", "--overwrite", "--memory_budget",
                                                             "1KB"], r"--memory_budget 1KB"),
    Case("train-locked", "train", ["--out_dir", "run", "--resume", "--max_iters", "6"],
         r"run is in use by another run", lambda w: _hold_lock(os.path.join(w, "run"))),
    # resume conflicts
    Case("train-resume-nothing", "train", ["--resume", "--out_dir", "empty"], r"no checkpoint at empty/ckpt.pt"),
    Case("train-resume-init-from", "train", ["--resume", "--out_dir", "run", "--init_from", "run/ckpt.pt"],
         r"--init_from does not apply"),
    Case("train-resume-eval-only", "train", ["--resume", "--out_dir", "run", "--eval_only"],
         r"--resume and --eval_only do not combine"),
    Case("train-resume-n-layer", "train", ["--resume", "--out_dir", "run", "--n_layer", "2"],
         r"--n_layer 2 differs from the run being resumed"),
    Case("train-resume-qat", "train", ["--resume", "--out_dir", "run", "--qat", "w4g32"],
         r"--qat 'w4g32' differs from the run being resumed"),
    Case("train-resume-lora", "train", ["--resume", "--out_dir", "run", "--lora_rank", "4"],
         r"--lora_rank 4 differs"),
    Case("train-resume-lora-base", "train", ["--resume", "--out_dir", "run", "--lora_base", "nf4g64"],
         r"--lora_base 'nf4g64' differs"),
    Case("train-resume-dataset", "train", ["--resume", "--out_dir", "run", "--dataset", "text_tiny"],
         r"--dataset 'text_tiny' differs"),
    Case("train-resume-optim", "train", ["--resume", "--out_dir", "run", "--optim", "adamw8bit"],
         r"--optim 'adamw8bit' differs"),
    Case("train-resume-dropout", "train", ["--resume", "--out_dir", "run", "--dropout", "0.1"],
         r"--dropout 0.1 differs"),
    Case("train-resume-bad-flag", "train", ["--resume", "--out_dir", "run", "--max_iters", "-2"],
         r"--max_iters must be >= 1"),
    Case("train-resume-not-resumable", "train", ["--resume", "--out_dir", "bad"], r"cannot be resumed",
         _edit_ckpt(lambda ck: ck.pop("optimizer"))),
    Case("train-resume-saved-config-bad", "train", ["--resume", "--out_dir", "bad"],
         r"bad/ckpt.pt: its saved config is not valid \(--grad_clip must be >= 0",
         _edit_ckpt(lambda ck: _setitem(ck, ["config", "grad_clip"], -1.0))),
    Case("train-resume-corrupt", "train", ["--resume", "--out_dir", "bad"], r"bad/ckpt.pt is corrupt",
         _write("bad/ckpt.pt", b"\x00" * 64)),
]


def _hold_lock(folder):
    """setup: another process (here: an open file description of this one) holds the folder's run lock."""
    import fcntl
    f = open(os.path.join(folder, ".lock"), "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    HELD.append(f)  # (closed after the case by tests/test_bad_input.py)


HELD = []


# faults while a run works: Ctrl-C, a full disk (what was saved before stays as it was)
CASES += [
    Case("train-ctrl-c-fresh", "train", NEW, r"interrupted: files saved before are intact",
         patch={"train.train_step": raises(KeyboardInterrupt)}, leaves=r"^new/(\.lock|metrics\.jsonl)$"),
    Case("train-ctrl-c-eval-only", "train", ["--eval_only", "--init_from", "run/ckpt.pt", "--out_dir", "run"],
         r"interrupted", patch={"train.final_evaluation": raises(KeyboardInterrupt)}),
    Case("train-ctrl-c-overwrite", "train", TINY + DATA + ["--out_dir", "run", "--overwrite"], r"interrupted",
         patch={"train.prepare_training": raises(KeyboardInterrupt)}),
    Case("train-out-of-memory", "train", NEW, r"out of memory \(CUDA out of memory\. Tried to allocate",
         patch={"train.train_step": raises(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"))},
         leaves=r"^new/(\.lock|metrics\.jsonl)$"),
    Case("train-disk-full-fresh", "train", NEW, r"No space left on device: .*new/ckpt.pt",
         patch={"torch.save": disk_full}, leaves=r"^new/(\.lock|metrics\.jsonl)$"),
    Case("train-disk-full-ptq", "train", ["--init_from", "run/ckpt.pt", "--ptq", "rtn", "--ptq_spec", "w4g32",
                                          "--out_dir", "q", "--final_problems", "1", "--eval_iters", "1"],
         r"No space left on device", patch={"torch.save": disk_full}, leaves=r"^q/(\.lock|eval(_converted)?\.json)$"),
]

# a run that would remove what it starts from, or go back before where its checkpoint is
CASES += [
    Case("train-overwrite-own-source", "train", TINY + DATA + ["--init_from", "run/ckpt.pt", "--out_dir", "run",
                                                               "--overwrite"], r"--init_from run/ckpt.pt is in --out_dir run"),
    Case("train-ptq-overwrite-own-source", "train", ["--init_from", "run/ckpt.pt", "--ptq", "rtn", "--ptq_spec",
                                                     "w4g32", "--out_dir", "run", "--overwrite"], r"is in --out_dir run"),
    Case("train-resume-max-iters-below", "train", ["--resume", "--out_dir", "run", "--max_iters", "2"],
         r"--max_iters 2 is below step 4"),
    Case("train-resume-stop-after-below", "train", ["--resume", "--out_dir", "run", "--max_iters", "8",
                                                    "--stop_after", "3"], r"--stop_after 3 is below step 4"),
    Case("train-resume-min-lr-above-lr", "train", ["--resume", "--out_dir", "run", "--max_iters", "8", "--lr",
                                                   "1e-4", "--min_lr", "1e-3"], r"--min_lr 0.001 is above --lr"),
]

# flags the run would not read: refused, not ignored
EV = ["--eval_only", "--init_from", "run/ckpt.pt", "--out_dir", "ev", "--threads", "1"]
PTQ = ["--init_from", "run/ckpt.pt", "--ptq", "rtn", "--ptq_spec", "w4g32", "--out_dir", "q", "--threads", "1"]
CASES += [
    Case("train-eval-only-training-flags", "train", EV + ["--lr", "1", "--max_iters", "3"],
         r"--max_iters, --lr would do nothing here: --eval_only evaluates without training \(its test problems: "
         r"--final_problems\); drop them"),
    Case("train-eval-only-ptq", "train", EV + ["--ptq", "rtn", "--ptq_spec", "w4g32"],
         r"--ptq, --ptq_spec would do nothing here: --eval_only evaluates"),
    Case("train-eval-only-eval-problems", "train", EV + ["--eval_problems", "5"],
         r"--eval_problems would do nothing here: .*--final_problems"),
    Case("train-eval-only-plan", "train", EV + ["--plan"], r"--plan would do nothing here"),
    Case("train-ptq-plan", "train", PTQ + ["--plan", "--out_dir", "run"], r"--plan would do nothing here: --ptq "
         r"quantizes and evaluates, without training; drop it"),
    Case("train-ptq-training-flags", "train", PTQ + ["--lr", "1e-4", "--max_iters", "9"],
         r"--max_iters, --lr would do nothing here: --ptq"),
    Case("train-lora-settings-without-rank", "train", NEW + ["--init_from", "run/ckpt.pt", "--lora_base", "nf4g64",
                                                             "--lora_alpha", "8"],
         r"--lora_alpha, --lora_base would do nothing here: new LoRA adapters need --lora_rank R"),
    Case("train-ptq-batches-rtn", "train", PTQ + ["--ptq_batches", "4"], r"--ptq_batches would do nothing here: "
         r"only --ptq gptq calibrates"),
    Case("train-grad-ckpt-every-without-grad-ckpt", "train", NEW + ["--grad_ckpt_every", "2"],
         r"--grad_ckpt_every would do nothing here: blocks are checkpointed only with --grad_ckpt"),
    Case("train-resume-seed", "train", ["--resume", "--out_dir", "run", "--max_iters", "8", "--seed", "42"],
         r"--seed 42 differs from the run being resumed \(1337\)"),
]

# a process started by hand with some of torchrun's variables
CASES += [
    Case("train-env-rank-alone", "train", NEW, r"RANK is set but WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not: "
         r"launch with torchrun", env=dict(RANK="0")),
    Case("train-env-local-rank-word", "train", NEW, r"LOCAL_RANK='abc' is not a number", env=dict(LOCAL_RANK="abc")),
]

# a checkpoint that is quantized or holds adapters is not quantized or given adapters again
QUANTIZED = dict(spec="w4g32", fake_quant=[], converted=["transformer.h.0.attn.c_attn"])
ADAPTED = dict(rank=4, alpha=16.0, dropout=0.0, base="nf4g64", targets=["transformer.h.0.attn.c_attn"])
ON_BAD = ["--init_from", "bad/ckpt.pt", "--out_dir", "q", "--threads", "1"]
PTQ_BAD = ON_BAD + ["--ptq", "rtn", "--ptq_spec", "w4g32"]


def _holding(key, desc):
    return _edit_ckpt(lambda ck: _setitem(ck, [key], desc))


CASES += [
    Case("train-qat-on-quantized", "train", ON_BAD + ["--qat", "w4g32"], r"--qat w4g32: bad/ckpt.pt holds "
         r"weights quantized to w4g32; start QAT from a float checkpoint$", _holding("quant", QUANTIZED)),
    Case("train-qat-other-spec", "train", ON_BAD + ["--qat", "w8"], r"--qat w8: bad/ckpt.pt holds weights "
         r"quantized to w4g32; .* \(or go on with its own spec\)",
         _holding("quant", dict(QUANTIZED, fake_quant=QUANTIZED["converted"], converted=[]))),
    Case("train-qat-on-lora", "train", ON_BAD + ["--qat", "w8"], r"--qat w8: bad/ckpt.pt holds LoRA "
         r"adapters \(rank 4\) over a nf4g64 base", _holding("lora", ADAPTED)),
    Case("train-ptq-on-quantized", "train", PTQ_BAD, r"--ptq: bad/ckpt.pt holds weights quantized to w4g32; "
         r"quantize its float checkpoint instead", _holding("quant", QUANTIZED)),
    Case("train-data-marks-malformed", "train", ON_BAD, r"bad/ckpt.pt is corrupt: its data_marks entry",
         _holding("data_marks", dict(probe=3))),
    Case("train-ptq-on-lora", "train", PTQ_BAD, r"--ptq: bad/ckpt.pt holds LoRA adapters \(rank 4\) over a "
         r"nf4g64 base; add --lora_merge", _holding("lora", ADAPTED)),
    Case("train-lora-on-lora", "train", ON_BAD + ["--lora_rank", "8"], r"--lora_rank 8: bad/ckpt.pt already "
         r"holds LoRA adapters \(rank 4\)", _holding("lora", ADAPTED)),
]

# data in other tokens than the checkpoint's, or a dataset rebuilt under a run
CASES += [
    ck_case("other-tokens", lambda ck: _setitem(ck, ["data_marks", "probe"], [1, 2, 3]),
            r"bad/ckpt.pt was trained on text in other tokens than .*data_tiny's \(bytes, 259 tokens\)"),
    ck_case("other-tokens", lambda ck: _setitem(ck, ["data_marks", "probe"], [1, 2, 3]),
            r"was trained on text in other tokens", mode="eval"),
    Case("train-resume-data-rebuilt", "train", ["--resume", "--out_dir", "bad", "--max_iters", "8"],
         r"data_tiny has changed since bad/ckpt.pt was saved \(its meta.json differs\)",
         _edit_ckpt(lambda ck: _setitem(ck, ["data_marks", "meta"], "0" * 40))),
]

# a step that cannot fit in memory is refused before it starts (not killed by the system half-way)
CASES += [
    Case("train-batch-cannot-fit", "train", NEW + ["--batch_size", "100000000"],
         r"--batch_size 100000000 x --block_size \d+: a step needs about [\d.]+ GiB at the peak, more than the "
         r"[\d.]+ GiB free here: lower --batch_size"),
    Case("train-batch-cannot-fit-small-machine", "train", NEW + ["--batch_size", "4"],
         r"a step needs about \d+ MiB at the peak, more than the 0 MiB free here",
         patch={"memory.free_bytes": lambda device, procs=1: 2 ** 16}),
]

CASES += [
    Case("train-lora-rank-beyond-layer", "train", NEW + ["--init_from", "run/ckpt.pt", "--lora_rank", "1000"],
         r"--lora_rank 1000 exceeds .*smaller dimension 32"),
]

CASES += [
    Case("train-resume-weight-decay", "train", ["--resume", "--out_dir", "run", "--weight_decay", "0.5"],
         r"--weight_decay 0.5 differs from the run being resumed"),
]

# folders and links where a file or a folder is meant
CASES += [
    Case("train-init-from-run-folder", "train", NEW + ["--init_from", "run"],
         r"--init_from run is a folder \(a run folder: give run/ckpt.pt\)"),
    Case("train-out-dir-dangling-link", "train", TINY + DATA + ["--out_dir", "gone"],
         r"--out_dir gone is a link to nothing \(dangling, or a loop\)",
         lambda w: os.symlink(os.path.join(w, "nowhere"), os.path.join(w, "gone"))),
]
