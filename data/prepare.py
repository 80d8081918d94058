"""Prepare a dataset: token ids in train.bin / val.bin (uint16, or uint32 when the vocabulary needs it) + meta.json.

    python data/prepare.py reasoning                       # the built-in reasoning corpus -> data/reasoning/
    python data/prepare.py reasoning --style_mix 0.3,0.4,0.3 --out data/reasoning_mix
    python data/prepare.py subtraction                     # fine-tuning task: a - b, nines' complement
    python data/prepare.py text --input my.txt --out data/mytext --tokenizer bpe --vocab_size 2048
    python data/prepare.py reasoning --tokenizer hf:path/to/SmolLM2-135M --out data/reasoning_smollm
    python data/prepare.py text --help                     # a mode's flags, with defaults (also --config f.toml)

Ideas it rests on:
- The reasoning corpus is generated from a seed (data/tasks.py), so every machine builds the same bytes; its task
  settings go into meta.json, from which evaluation regenerates the held-out test problems.
- Documents are `<|bos|>prompt answer<|eos|>`; the loader masks the prompt out of the loss. With a Hugging Face
  model's tokenizer (--tokenizer hf:DIR) they are that model's bos and eos, so generation stops at its eos; its
  tokenizer.json is copied into the dataset, which then stands on its own.
- A dataset is written as a whole: built in a temporary sibling folder, synced, then swapped in, so a crash at any
  point leaves the old dataset or the new one, never a mix. A dataset made with other settings (recorded in
  meta.json) is replaced only with --overwrite; a folder holding anything but a dataset never is.
- Each mode's flags are a config dataclass (config.py): declared rules, TOML, --help and one-line errors.
"""
import difflib
import json
import os
import re
import shutil
import stat
import sys
from dataclasses import asdict, dataclass, fields

import numpy as np

if __package__ in (None, ""):  # run as a script: make `data` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import Checked, UserError, arg, cli, print_help, usage  # noqa: E402
from files import process_alive, atomic_write, fsync_dir  # noqa: E402
from data.loader import DEFAULT_DATASET, DataError, dataset_dir, read_meta  # noqa: E402
from data.tasks import (FORMAT_VERSION, LEVELS, SUB_LEVELS, TaskConfig, make_examples,  # noqa: E402
                        subtraction_task)
from data.tokenizer import (byte_tokenizer, bpe_tokenizer, gpt2_tokenizer, load_bpe, load_hf_tokenizer,  # noqa: E402
                            save_bpe, train_bpe)

DATA_ROOT = os.path.dirname(os.path.abspath(__file__))
DATASET_FILES = ("meta.json", "train.bin", "val.bin", "bpe.tiktoken", "tokenizer.json")


def token_dtype(n_vocab):
    return np.uint16 if n_vocab <= 2 ** 16 else np.uint32


def named_tokenizer(name):
    """bytes, gpt2 or hf:DIR (a local Hugging Face model directory's tokenizer.json)."""
    if name == "bytes":
        return byte_tokenizer()
    if name == "gpt2":
        return gpt2_tokenizer()
    if name.startswith("hf:"):
        return load_hf_tokenizer(name[3:])
    raise ValueError(f"unknown tokenizer {name!r}: choose bytes, bpe, gpt2 or hf:DIR")


def write_dataset(out_dir, train_ids, val_ids, tok, extra):
    os.makedirs(out_dir, exist_ok=True)
    if tok.name == "hf":  # the dataset keeps its own copy: load_tokenizer reads it from there
        atomic_write(os.path.join(out_dir, "tokenizer.json"), lambda p: shutil.copyfile(tok.source, p), mode=None)
    dtype = token_dtype(tok.n_vocab)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        arr = np.asarray(ids, dtype=dtype)
        atomic_write(os.path.join(out_dir, f"{split}.bin"), arr.tofile, mode=None)
    meta = dict(tokenizer=tok.to_meta(), vocab_size=tok.n_vocab, dtype=np.dtype(dtype).name,
                train_tokens=len(train_ids), val_tokens=len(val_ids), **extra)
    # last: a dataset without meta.json is not one
    atomic_write(os.path.join(out_dir, "meta.json"), lambda f: json.dump(meta, f, indent=1), "w")
    return meta


def encode_documents(tok, pairs):
    """<|bos|>prompt answer<|eos|> for each (prompt, answer) pair, concatenated."""
    ids = []
    for doc in tok.encode_batch([p + a for p, a in pairs]):
        ids.append(tok.bos_id)
        ids.extend(doc)
        ids.append(tok.eos_id)
    return ids


def prompt_end_id(tok, pairs):
    """The id of the token that ends every prompt (its newline), which the loader masks up to; a ValueError when
    the tokenizer does not keep that newline a token of its own at the end of the prompts (then the prompts
    could not be masked out of the loss)."""
    ids = tok.encode("\n")
    if len(ids) != 1:
        raise ValueError(f"the {tok.name} tokenizer splits a newline into {len(ids)} tokens: prompts cannot be masked")
    for p, a in pairs[:200]:
        doc, prompt = tok.encode(p + a), tok.encode(p)
        if doc[:len(prompt)] != prompt or prompt[-1] != ids[0] or ids[0] in prompt[:-1]:
            raise ValueError(f"the {tok.name} tokenizer merges a prompt's final newline with the answer after it "
                             f"({p!r} + {a[:12]!r}...): prompts cannot be masked; use another tokenizer")
    return ids[0]


# ----------------------------------------------------------------------------- a dataset as a whole

def settings_of(meta):
    """The settings a dataset was made with, as a flat dict: recorded by this version, or read back from what
    older versions wrote (None where they did not record it: an hf: folder, the validation fraction)."""
    if isinstance(meta.get("settings"), dict):
        return meta["settings"]
    tok = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
    name = tok.get("name") if tok.get("name") != "hf" else None
    if meta.get("kind") == "reasoning" and isinstance(meta.get("task"), dict):
        return {"kind": "reasoning", "tokenizer": name, **meta["task"]}
    if meta.get("kind") == "text":
        bpe_size = meta.get("vocab_size") - 3 if name == "bpe" and _is_int(meta.get("vocab_size")) else None
        return {"kind": "text", "input": meta.get("source"), "tokenizer": name, "vocab_size": bpe_size,
                "val_fraction": None}
    return None


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _differences(old, new):
    """What differs between two settings dicts, in a few words ("levels: [1, 2, 3, 4] -> [1, 2]; ...")."""
    short = lambda v: (lambda t: t if len(t) <= 50 else t[:47] + "...")(str(v))
    diffs = [f"{k}: {short(old.get(k))} -> {short(v)}" for k, v in new.items()
             if old.get(k) is not None and old.get(k) != v or k not in old]
    return "; ".join(diffs[:3]) + ("; ..." if len(diffs) > 3 else "")


def check_target(out_dir, settings, overwrite):
    """A DataError when writing a dataset with `settings` at out_dir would replace something it should not: a
    file, a folder holding anything but a dataset's files, or (without overwrite) a dataset made otherwise."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir} is a file, not a dataset's folder: choose another --out")
    names = os.listdir(out_dir)
    foreign = sorted(n for n in names if n not in DATASET_FILES and not (n.startswith(".") and n.endswith(".tmp")))
    if foreign:
        raise DataError(f"--out {out_dir} holds files that are not a dataset's ({', '.join(foreign[:3])}): choose "
                        f"another --out (nothing there is replaced, even with --overwrite)")
    if not names or overwrite:
        return
    try:
        meta = read_meta(out_dir)
        old = settings_of(meta) if isinstance(meta, dict) else None
    except DataError:
        old = None
    new = json.loads(json.dumps(settings))  # tuples as lists, as meta.json holds them
    why = "its meta.json is missing or unreadable" if old is None else _differences(old, new)
    if why:
        raise DataError(f"{out_dir} holds a dataset made with other settings ({why}): --out DIR for a new one, "
                        f"or --overwrite to replace it")


def _siblings(out_dir):
    """This process's temporary and set-aside names for out_dir, and a pattern matching any process's."""
    parent, name = os.path.split(out_dir)
    pid = os.getpid()
    return (os.path.join(parent, f".{name}.tmp-{pid}"), os.path.join(parent, f".{name}.old-{pid}"),
            re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(\d+)"))


def recover(out_dir, tidy=True):
    """Tidy what killed runs of this writer left next to out_dir: a set-aside old dataset goes back in place when
    the swap did not finish; half-built folders are removed (tidy, which only a writer does: a reader leaves
    them to it)."""
    parent = os.path.dirname(out_dir)
    pattern = _siblings(out_dir)[2]
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
        m = pattern.fullmatch(entry)
        if not m or int(m[2]) == os.getpid() or process_alive(int(m[2])):
            continue
        path = os.path.join(parent, entry)
        if m[1] == "old" and not os.path.lexists(out_dir):
            os.rename(path, out_dir)  # killed between the two renames: the old dataset is the complete one
        elif tidy:
            shutil.rmtree(path, ignore_errors=True)
    fsync_dir(parent)


def write_whole(out_dir, build):
    """Run build(folder), which writes a complete dataset into a fresh folder, then swap that folder in for
    out_dir: out_dir holds the old dataset or the new one at every moment but between two renames (and
    recover() puts the old one back if a crash falls there). Returns what build returns."""
    tmp, old, _ = _siblings(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        result = build(tmp)
        fsync_dir(tmp)
        if os.path.lexists(out_dir):
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
        else:
            os.rename(tmp, out_dir)
        fsync_dir(os.path.dirname(out_dir))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return result


def claim(out_dir, settings, overwrite):
    """out_dir as a real path, once it is clear that a dataset with `settings` may be written there."""
    out_dir = os.path.realpath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    recover(out_dir)
    check_target(out_dir, settings, overwrite)
    return out_dir


# ----------------------------------------------------------------------------- the corpora

def _tokenizer_setting(name):
    return "hf:" + os.path.abspath(name[3:]) if name.startswith("hf:") else name


def prepare_reasoning(out_dir, cfg: TaskConfig = None, verbose=True, tokenizer="bytes", default=False,
                      overwrite=False):
    """Generate the reasoning corpus into out_dir with tokenizer bytes, gpt2 or hf:DIR; returns its meta dict.
    default: built as the built-in corpus (which train.py may rebuild when data/tasks.py changes).
    overwrite: replace a dataset made there with other settings."""
    cfg = cfg or TaskConfig()
    tok = named_tokenizer(tokenizer)
    settings = {"kind": "reasoning", "tokenizer": _tokenizer_setting(tokenizer), **asdict(cfg)}
    out_dir = claim(out_dir, settings, overwrite)
    examples = make_examples(cfg, "train", cfg.train_examples)
    end_id = prompt_end_id(tok, examples)
    train = encode_documents(tok, examples)
    val = encode_documents(tok, make_examples(cfg, "val", cfg.val_examples))
    extra = dict(kind="reasoning", task=asdict(cfg), prompt_end="\n", prompt_end_id=end_id,
                 format_version=FORMAT_VERSION, built_as_default=default, settings=settings)
    meta = write_whole(out_dir, lambda d: write_dataset(d, train, val, tok, extra))
    if verbose:
        print(f"reasoning corpus: {len(train):,} train / {len(val):,} val tokens -> {out_dir}")
    return meta


def ensure_default_corpus(out_dir):
    """The built-in corpus with today's defaults at out_dir: built when missing, rebuilt when an older version of
    data/tasks.py built it as the default; a dataset made with other settings is never replaced (DataError)."""
    want = json.loads(json.dumps(asdict(TaskConfig())))
    recover(os.path.realpath(out_dir))
    if not os.path.exists(os.path.join(out_dir, "meta.json")):
        return prepare_reasoning(out_dir, default=True, overwrite=True)  # (a folder of other files: refused)
    meta = read_meta(out_dir)
    if isinstance(meta, dict) and meta.get("format_version") == FORMAT_VERSION and meta.get("task") == want:
        return meta
    if isinstance(meta, dict) and meta.get("built_as_default"):
        return prepare_reasoning(out_dir, default=True, overwrite=True)  # an older version's default corpus
    raise DataError(f"{out_dir} holds a dataset made with other settings than the default corpus: pass "
                    f"--dataset with its path to use it, or move it away to build the default")


def read_text(path):
    """The text of a UTF-8 file; a DataError naming the file (and the offending byte) for anything else."""
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder: give a text file")
    if not os.path.exists(path):
        raise DataError(f"no such text file: {path}")
    if not os.path.isfile(path):
        raise DataError(f"{path} is not a regular file ({_file_kind(path)}): give a text file")
    with open(path, "rb") as f:
        raw = f.read()
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path} holds a NUL byte at byte offset {nul}: it looks binary; give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset {e.start}): "
                        f"convert it to UTF-8 first") from None
    if not text.strip():
        raise DataError(f"{path} is empty: give a text file with some content")
    return text


def _file_kind(path):
    mode = os.stat(path).st_mode
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe"),
             (stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), "not a plain file")


def prepare_text(input_path, out_dir, tokenizer="bytes", vocab_size=2048, val_fraction=0.1, verbose=True,
                 overwrite=False):
    """Tokenize a UTF-8 text file into out_dir (the last val_fraction of the text is validation)."""
    text = read_text(input_path)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    settings = {"kind": "text", "input": os.path.abspath(input_path), "tokenizer": _tokenizer_setting(tokenizer),
                "vocab_size": vocab_size if tokenizer == "bpe" else None, "val_fraction": val_fraction}
    out_dir = claim(out_dir, settings, overwrite)
    cut = int(len(text) * (1 - val_fraction))
    if tokenizer == "bpe":
        ranks = train_bpe(text[:cut], vocab_size)  # merges learned on the train part only
        tok = bpe_tokenizer(ranks)  # in memory: nothing is written until every check has passed
    else:
        tok = named_tokenizer(tokenizer)
    train, val = tok.encode(text[:cut]), tok.encode(text[cut:])
    if not train or not val:
        raise ValueError(f"{input_path} is too short to split into train and val: give more text")

    def build(folder):
        t = tok
        if tokenizer == "bpe":
            save_bpe(os.path.join(folder, "bpe.tiktoken"), ranks)
            t = load_bpe(os.path.join(folder, "bpe.tiktoken"))
        extra = dict(kind="text", source=os.path.abspath(input_path), settings=settings)
        return write_dataset(folder, train, val, t, extra)
    meta = write_whole(out_dir, build)
    if verbose:
        print(f"{input_path}: {len(train):,} train / {len(val):,} val tokens ({tok.name}, "
              f"vocab {meta['vocab_size']}) -> {out_dir}")
    return meta


# ----------------------------------------------------------------------------- flags

def _tokenizer(*names):
    def check(name):
        if name in names or name.startswith("hf:") and name[3:].strip():
            return None
        only_text = " (bpe is trained on a text: prepare.py text)" if "bpe" not in names else ""
        return f"must be {', '.join(names)} or hf:DIR (a Hugging Face model's folder){only_text}"
    return check


def _levels(levels):
    if not levels:
        return "needs at least one level"
    if any(level not in LEVELS and level not in SUB_LEVELS for level in levels):
        return f"must be among {sorted(LEVELS)} (addition) or {sorted(SUB_LEVELS)} (subtraction)"
    return "a level is repeated" if len(set(levels)) < len(levels) else None


def _weights(some_positive):
    def check(values):
        if any(not np.isfinite(v) or v < 0 for v in values):
            return "every weight must be a finite number >= 0"
        return "needs a weight above 0" if some_positive and not any(values) else None
    return check


def _given(text):
    return "must not be empty" if not text.strip() else None


@dataclass
class ReasoningFlags(Checked):
    out: str = arg(os.path.join(DATA_ROOT, "reasoning"), check=_given)  # the dataset's folder
    tokenizer: str = arg("bytes", check=_tokenizer("bytes", "gpt2"))  # bytes, gpt2 or hf:DIR (a model folder)
    overwrite: bool = False         # replace a dataset made at --out with other settings
    levels: tuple = arg(TaskConfig.levels, check=_levels)  # 1-4: addition; 5, 6: subtraction
    level_weights: tuple = arg(TaskConfig.level_weights, check=_weights(True))  # how often each level is drawn
    style_mix: tuple = arg(TaskConfig.style_mix, check=_weights(False))  # direct,minimal,verbose; or 3 per level
    lsd_first: bool = TaskConfig.lsd_first  # working from the least-significant column (false: from the left)
    train_examples: int = arg(TaskConfig.train_examples, min=1)
    val_examples: int = arg(TaskConfig.val_examples, min=1)
    test_per_level: int = arg(TaskConfig.test_per_level, min=1)  # held-out problems evaluation draws per level
    seed: int = TaskConfig.seed     # the corpus is the same bytes on every machine for one seed

    def task(self):
        return TaskConfig(**{f.name: getattr(self, f.name) for f in fields(TaskConfig)})

    def relations(self):
        try:
            self.task()
        except ValueError as e:  # TaskConfig's messages start with the field's name
            yield "--" + str(e).splitlines()[0]


_SUB = subtraction_task()


@dataclass
class SubtractionFlags(ReasoningFlags):
    """ReasoningFlags with the subtraction task's defaults (the other fields are inherited as they are)."""
    out: str = arg(os.path.join(DATA_ROOT, "subtraction"), check=_given)  # the dataset's folder
    levels: tuple = arg(_SUB.levels, check=_levels)  # 5: two digits, 6: three digits (1-4: addition)
    level_weights: tuple = arg(_SUB.level_weights, check=_weights(True))  # how often each level is drawn
    style_mix: tuple = arg(_SUB.style_mix, check=_weights(False))  # direct,minimal,verbose (or 3 per level)
    train_examples: int = arg(_SUB.train_examples, min=1)
    val_examples: int = arg(_SUB.val_examples, min=1)
    test_per_level: int = arg(_SUB.test_per_level, min=1)  # held-out problems evaluation draws per level
    lsd_first: bool = _SUB.lsd_first
    seed: int = _SUB.seed


@dataclass
class TextFlags(Checked):
    input: str = ""                 # the text file to tokenize (UTF-8)
    out: str = ""                   # the dataset's folder, e.g. data/mytext
    tokenizer: str = arg("bytes", check=_tokenizer("bytes", "bpe", "gpt2"))  # bpe: learned here
    vocab_size: int = arg(2048, min=257)  # with --tokenizer bpe: 256 bytes + merges
    val_fraction: float = arg(0.1, above=0, below=1)  # the last part of the text, held out for validation
    overwrite: bool = False         # replace a dataset made at --out with other settings

    def relations(self):
        if not self.input.strip():
            yield "--input FILE is needed: the text file to tokenize"
        if not self.out.strip():
            yield "--out DIR is needed: the dataset's folder, e.g. data/mytext"
        if self.vocab_size != TextFlags.vocab_size and self.tokenizer != "bpe":
            yield (f"--vocab_size {self.vocab_size} applies only to --tokenizer bpe (the {self.tokenizer} tokenizer "
                   f"brings its own vocabulary): drop --vocab_size or add --tokenizer bpe")


MODES = {"reasoning": (ReasoningFlags, "the built-in reasoning corpus (addition) -> data/reasoning"),
         "subtraction": (SubtractionFlags, "the fine-tuning task: subtraction -> data/subtraction"),
         "text": (TextFlags, "tokenize a UTF-8 text file")}


def run(mode, cfg):
    """Build the dataset a mode's flags describe; library errors become one-line UserErrors."""
    try:
        if mode == "text":
            prepare_text(cfg.input, cfg.out, cfg.tokenizer, cfg.vocab_size, cfg.val_fraction,
                         overwrite=cfg.overwrite)
        else:  # the default corpus in its place, asked for by hand, stays one that train.py may rebuild
            default = mode == "reasoning" and cfg.task() == TaskConfig() and cfg.tokenizer == "bytes" and \
                os.path.realpath(cfg.out) == os.path.realpath(dataset_dir(DEFAULT_DATASET))
            prepare_reasoning(cfg.out, cfg.task(), tokenizer=cfg.tokenizer, default=default,
                              overwrite=cfg.overwrite)
    except DataError:
        raise
    except (ValueError, OSError, RuntimeError) as e:
        raise UserError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    mode = argv[0] if argv else ""
    if mode in ("-h", "--help"):
        modes = "".join(f"  {name:<12} {what}\n" for name, (_, what) in MODES.items())
        print_help(f"usage: python data/prepare.py MODE [--config FILE.toml] [--name value ...]\n\nmodes:\n"
                   f"{modes}\npython data/prepare.py MODE --help lists a mode's flags, with their defaults")
        return
    if mode not in MODES:
        close = "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(mode, list(MODES), n=1))
        said = f"unknown mode {mode!r}{close}" if mode else "no mode given"
        print(f"error: {said}: the first word is reasoning, subtraction or text (--help describes them)",
              file=sys.stderr)
        sys.exit(2)
    cls = MODES[mode][0]
    if "--help" in argv or "-h" in argv:
        print_help(usage(cls, f"data/prepare.py {mode}"))
        return
    cli(cls, lambda cfg, explicit: run(mode, cfg), argv[1:])


if __name__ == "__main__":
    main()
