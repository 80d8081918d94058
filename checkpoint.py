"""checkpoint.py: save and load checkpoints, and build a model from any checkpoint the project writes.

    save_checkpoint(path, state)           atomic and durable (files.atomic_write)
    load_checkpoint(path, for_resume)      weights_only=True, checked, one-line errors
    load_model(path, dropout)              a checkpoint file or a local Hugging Face directory -> (GPT, ckpt)
    resume_config(cls, saved, cfg, explicit)   the saved run's settings with the flags given now on top
    refuse_existing(out_dir, overwrite)    a fresh run never replaces a saved one unless told to
    refuse_changes(saved, cfg, explicit, fixed, path)   a resumed run trains what it trained
    run_lock(out_dir)                      one run at a time writes to a folder
    clear_run(out_dir)                     --overwrite: the old run's files go, once the new run's inputs are good
    data_marks(data) / check_data(...)     the data a checkpoint was trained on, and a check against it
    eval_only_path(out_dir, source)        where an evaluation-only run writes, never over another run's results
    nothing_left(out_dir, step, ...)       a resume of a finished run says so and does nothing

Ideas it rests on:
- A checkpoint is a dict of tensors and plain containers: the model's state_dict, its GPTConfig as a dict, and
  descriptions of the modules that were swapped into it (quant.describe: fake-quant or converted int4/int8
  layers; lora.describe: adapters over a float or 4-bit base). Building a model is then always the same three
  steps: GPT(config), restore the swapped modules empty, load the state_dict. Whatever wrote the checkpoint
  (pretraining, QAT, PTQ, QLoRA, FSDP, the RL loop), every entry point loads it this way.
- Loading never runs code: torch.load(weights_only=True), and a file that needs more is refused.
- A run folder belongs to one run: a lock while it runs, --overwrite clears it only after the new run's inputs
  have been checked, and evaluation-only results get a file of their own.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import re
import pickletools
import warnings
import zipfile
from dataclasses import asdict, fields

import torch

import lora
import quant
from config import RENAMED, UserError, field_problem
from files import atomic_write
from model import GPT, config_from_dict
from model import check_config as check_model_config

RESUME_KEYS = ("model", "model_config", "optimizer", "step", "config", "rng", "loader")


def save_checkpoint(path, state):
    """Write state to path atomically (a temporary file, fsynced, then renamed): a crash, a kill or a full disk
    never leaves half a checkpoint in place of the last good one."""
    atomic_write(path, lambda f: torch.save(state, f))


def model_state(model):
    """What every checkpoint holds about the model: weights, shape and the modules swapped into it."""
    return dict(model=model.state_dict(), model_config=asdict(model.config), quant=quant.describe(model),
                lora=lora.describe(model))


def load_checkpoint(path, for_resume=False):
    """The checkpoint dict at path, or a one-line UserError naming the file and what to do."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} (no such checkpoint file): check the path, or train one first "
                        f"with `python train.py`")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory, not a checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad files; all mean the same to the user
        if _calls_code(path):
            raise UserError(f"{path} holds pickled objects that could run code when loaded; refusing to load it "
                            f"(checkpoints hold only tensors and plain containers)")
        raise UserError(f"{path} is corrupt or not a checkpoint ({type(e).__name__}); use another file")
    if not isinstance(ck, dict) or "model" not in ck or not isinstance(ck.get("model_config"), dict):
        raise UserError(f"{path} is not a checkpoint of this trainer (no model/model_config inside)")
    checked_model_config(ck, path)
    missing = [k for k in RESUME_KEYS if k not in ck] if for_resume else []
    if missing:
        raise UserError(f"{path} cannot be resumed (it lacks {', '.join(missing)}): use --init_from to start from it")
    return ck


def _calls_code(path):
    """True when the file asks the unpickler for globals outside torch's weights-only allow-list (which could run
    code), rather than being merely damaged: torch's own scan for its zip format, an opcode scan for a plain
    pickle (which a checkpoint of this project never is)."""
    try:
        if zipfile.is_zipfile(path):
            return bool(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        with open(path, "rb") as f:
            data = f.read(1 << 20)
        ops = [op.name for op, _, _ in pickletools.genops(data)]
    except Exception:  # noqa: BLE001 - not readable as a checkpoint or a pickle: damaged
        return False
    return any(op in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX") for op in ops)


def checked_model_config(ck, path="the checkpoint"):
    """The checkpoint's GPTConfig, held to the model's own checks (types, ranges, head counts)."""
    try:
        config = config_from_dict(ck["model_config"])
        check_model_config(config)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: its model config is not valid ({str(e).splitlines()[0]})")
    return config


def model_from_checkpoint(ck, path="the checkpoint", dropout=None):
    """A GPT holding the checkpoint's weights, with its quantized layers and adapters rebuilt first."""
    config = checked_model_config(ck, path)
    if dropout is not None:
        config.dropout = dropout
    try:
        model = GPT(config)
    except (ValueError, AssertionError) as e:
        raise UserError(f"{path}: its model config is not valid ({e})")
    try:
        quant.restore_(model, ck.get("quant"))  # a quantized checkpoint's modules, before its weights
        lora.restore_(model, ck.get("lora"))
        model.load_state_dict(ck["model"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: its weights do not fit its model config ({str(e).splitlines()[0]})")
    return model


def load_model(path, dropout=None):
    """(model, checkpoint dict or None) from a checkpoint file or a local Hugging Face directory."""
    if os.path.isdir(path) and run_folder_hint(path):
        raise UserError(f"--init_from {path} is a folder{run_folder_hint(path)}")
    if os.path.isdir(path):
        try:
            model = GPT.from_pretrained(path, **({} if dropout is None else dict(dropout=dropout)))
        except Exception as e:  # a missing file, a bad config.json, a corrupt tensor file: all the user's to fix
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"could not load {path} as a Hugging Face model directory: {first}")
        return model, None
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} (no such checkpoint file or directory): check the path")
    ck = load_checkpoint(path)
    return model_from_checkpoint(ck, path, dropout), ck


def resume_config(cls, saved, cfg, explicit, reset=(), source="the checkpoint", legacy=None):
    """The saved run's config with the flags given now (`explicit`) on top; `reset` names fields that return to
    their defaults (e.g. stop_after). Fields this version no longer knows are dropped; renamed ones follow; fields
    the saved run did not have yet take their `legacy` value (what the run did before they existed)."""
    names = {f.name for f in fields(cls)}
    saved = {RENAMED.get(k, k): v for k, v in saved.items()}
    defaults = cls()
    merged = {k: v for k, v in saved.items() if k in names}
    for f in fields(cls):  # the saved values, each held to today's rule before any flag is laid on them
        problem = f.name in merged and field_problem(f.name, f.type, merged[f.name], f.metadata)
        if problem:
            raise UserError(f"{source}: its saved config is not valid ({problem}); start a new run from it with "
                            f"--init_from")
    merged.update({k: v for k, v in (legacy or {}).items() if k not in saved})
    merged.update({k: getattr(defaults, k) for k in reset})
    merged.update({k: getattr(cfg, k) for k in explicit})
    return cls(**merged)


def check_out_dir(out_dir):
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file: give a folder")
    if os.path.islink(out_dir) and not os.path.exists(out_dir):
        raise UserError(f"--out_dir {out_dir} is a link to nothing (dangling, or a loop): remove it or give a "
                        f"folder")


def run_folder_hint(path):
    """For a folder given where a checkpoint file is meant: ' (it is a run folder: give PATH/ckpt.pt)' or ''."""
    ckpt = os.path.join(path, "ckpt.pt")
    return f" (a run folder: give {ckpt})" if os.path.isfile(ckpt) and not \
        os.path.exists(os.path.join(path, "config.json")) else ""


def refuse_existing(out_dir, overwrite, what="ckpt.pt"):
    """A fresh run never replaces a saved one unless --overwrite says so."""
    path = os.path.join(out_dir, what)
    check_out_dir(out_dir)
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path} already holds a run: --resume to continue it, --out_dir DIR for a new one, "
                        f"or --overwrite to replace it")


def refuse_changes(saved, cfg, explicit, fixed, path):
    """A resumed run continues what it was training: an explicit flag among `fixed` that differs from the
    saved config is refused (lists and paths are compared as what they name)."""
    for k in fixed:
        if k in explicit and k in saved and not _same(getattr(cfg, k), saved[k]):
            raise UserError(f"--{k} {getattr(cfg, k)!r} differs from the run being resumed ({saved[k]!r}): --resume "
                            f"continues {path} as it was; start a new run with --init_from {path} to change it")


def _same(a, b):
    if a == b or not (isinstance(a, str) and isinstance(b, str)):
        return a == b
    if os.path.exists(a) or os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    items = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    return items(a) == items(b)


RUN_FILES = ("ckpt.pt", "metrics.jsonl", "eval.json", "eval_converted.json", "converted.pt", "summary.json")


def refuse_overwriting_source(out_dir, source):
    """--overwrite would remove a file the new run starts from: refused before anything is touched."""
    real = os.path.realpath(source) if source else ""
    if real and os.path.isfile(real) and os.path.basename(real) in RUN_FILES and \
            os.path.dirname(real) == os.path.realpath(out_dir):
        raise UserError(f"--init_from {source} is in --out_dir {out_dir}, whose run files --overwrite removes: "
                        f"give another --out_dir (or copy the checkpoint elsewhere first)")


def clear_run(out_dir):
    """--overwrite: remove the old run's files (called once the new run has checked all of its inputs)."""
    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)


@contextlib.contextmanager
def run_lock(out_dir):
    """Hold out_dir/.lock (an advisory lock the system drops when the process dies) while a run writes there."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise UserError(f"{out_dir} is in use by another run (pid {pid}): wait for it to end, or give another "
                            f"--out_dir") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def written_at(path, step):
    """True when the JSON file at path (a final eval.json or summary.json) describes the run at `step`; files
    written before they recorded their step count as such."""
    try:
        with open(path) as f:
            return json.load(f).get("step", step) == step
    except (OSError, ValueError, AttributeError):
        return False


def nothing_left(out_dir, step, last, end, record, flag):
    """True (with a note) for a resume whose checkpoint, at `step`, has reached the run's `last` step, and when
    that is the schedule's `end`, has written its final `record` (eval.json, summary.json) for it."""
    done = step > last or step == last and (last != end or written_at(os.path.join(out_dir, record), step))
    if done:
        print(f"{out_dir}/ckpt.pt is at step {step} and this run ends at step {last}: nothing to do "
              f"({flag} N, beyond {step}, trains further)")
    return done


# a text whose token ids tell tokenizers apart (digits, signs, letters, the corpus's tags and answer line)
PROBE = "0123456789 +-=*/ abcxyz ABCXYZ the a\nanswer: 42\n[direct] [minimal] [verbose] é 中"


def data_marks(data):
    """What a checkpoint records of the data it was trained on (a data.loader.Dataset): a digest of the
    tokenizer's token table, the ids it gives a probe text (kept with them), and a digest of its meta.json."""
    return dict(text=PROBE, probe=data.tok.encode(PROBE), n_vocab=data.tok.n_vocab, vocab=_vocab_digest(data.tok),
                meta=_digest(data.meta))


def _digest(meta):
    return hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _vocab_digest(tok):
    """Every token's bytes in id order and the special tokens: two tokenizers with one digest encode alike."""
    ranks, special = getattr(tok.enc, "_mergeable_ranks", None), getattr(tok.enc, "_special_tokens", None)
    if ranks is None or special is None:  # (tiktoken's tables; without them, the probe alone is compared)
        return None
    h = hashlib.sha1()
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    h.update(json.dumps(sorted(special.items())).encode())
    return h.hexdigest()


def check_data(ckpt, data, path, resume=False):
    """A checkpoint goes on only with data in its own tokens, and a resume only on the very dataset it was
    saved with (a rebuilt one changes what the next steps see). Checkpoints from before the marks pass."""
    marks = ckpt.get("data_marks") if ckpt else None
    if not marks:
        return
    if not (isinstance(marks, dict) and isinstance(marks.get("probe"), list) and {"n_vocab", "meta"} <= set(marks)):
        raise UserError(f"{path} is corrupt: its data_marks entry is not what this code writes; start again from "
                        f"an intact checkpoint")
    text = marks["text"] if isinstance(marks.get("text"), str) else PROBE
    vocab = marks.get("vocab")
    if marks["probe"] != data.tok.encode(text) or marks["n_vocab"] != data.tok.n_vocab or \
            vocab and vocab != _vocab_digest(data.tok):
        raise UserError(f"{path} was trained on text in other tokens than {data.dir}'s ({data.tok.name}, "
                        f"{data.tok.n_vocab} tokens): give a dataset made with the checkpoint's tokenizer")
    if resume and marks["meta"] != _digest(data.meta):
        raise UserError(f"{data.dir} has changed since {path} was saved (its meta.json differs): --resume needs "
                        f"the data the run trained on; rebuild it as it was, or start a new run with --init_from")


def eval_only_path(out_dir, source, how=""):
    """An evaluation-only run's result file, named after what it evaluated and how (e.g. "l1-64", a length
    budget in the prompts): it never replaces a training run's eval.json, nor other results."""
    real = os.path.realpath(source)
    tail = "_".join(real.split(os.sep)[-2:])  # e.g. out_qlora_ckpt.pt: readable ...
    name = re.sub(r"[^A-Za-z0-9.-]+", "_", tail).strip("_.")[-60:]
    digest = hashlib.sha1(real.encode()).hexdigest()[:8]  # ... and unique to the file, wherever it is run from
    return os.path.join(out_dir, f"eval_only_{name}_{digest}{'_' + how if how else ''}.json")
