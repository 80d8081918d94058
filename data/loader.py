"""Seeded training batches from a memmapped token file, with a position that checkpoints can save and restore.

Ideas it rests on:
- Two ways to cut rows: random windows anywhere in the stream (plain text), or rows that start at a document's
  <|bos|> with the prompt tokens masked out of the loss (task corpora: the model learns answers, not questions).
- One random stream for the whole job: with W processes each micro-step draws W micro-batches and rank r keeps the
  r-th, so 2 processes see exactly the batches that 1 process with twice the accumulation sees.
- The loader's state is the generator's state plus a draw counter: resume continues the same sequence of batches.
- A dataset is checked when opened: meta.json against the schema data/prepare.py writes, each .bin's size against
  its recorded token count, a sample of ids against the vocabulary; each failure is one line naming the file.
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch


class DataError(ValueError):
    """A dataset that is missing, damaged or too small; the message says what to do."""


def read_meta(data_dir):
    """meta.json as it is (any JSON value): for code that decides whether to rebuild a dataset."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"no dataset at {data_dir} (meta.json missing): run `python data/prepare.py` for it first")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is corrupt: re-run `python data/prepare.py` for {data_dir}")


def load_meta(data_dir):
    """meta.json, checked against the schema data/prepare.py writes (check_meta)."""
    meta = read_meta(data_dir)
    check_meta(meta, data_dir)
    return meta


def _count(value, least):
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_meta(meta, data_dir):
    """A DataError naming meta.json and the first entry that is not what data/prepare.py writes. Keys that
    older versions did not write (train_tokens, prompt_end_id, ...) are checked only where present."""
    def bad(what):
        return DataError(f"{os.path.join(data_dir, 'meta.json')} {what}: re-run data/prepare.py for {data_dir}")
    if not isinstance(meta, dict):
        raise bad(f"holds a JSON {type(meta).__name__}, not an object")
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict):
        raise bad("has no tokenizer entry (an object)")
    vocab = meta.get("vocab_size", tok.get("n_vocab"))
    if not _count(vocab, 1):
        raise bad(f"has vocab_size {vocab!r}, not a positive integer")
    dtype = meta.get("dtype", "uint16")
    if dtype not in ("uint16", "uint32"):
        raise bad(f"has dtype {dtype!r}, not uint16 or uint32")
    if vocab - 1 > np.iinfo(dtype).max:
        raise bad(f"has dtype {dtype}, too narrow for vocab_size {vocab}")
    for key in ("train_tokens", "val_tokens"):
        if key in meta and not _count(meta[key], 0):
            raise bad(f"has {key} {meta[key]!r}, not a non-negative integer")
    if "bos_id" not in tok:
        raise bad("has no tokenizer bos_id (where documents start)")
    for key in ("bos_id", "eos_id", "pad_id"):
        if key in tok and not (_count(tok[key], 0) and tok[key] < vocab):
            raise bad(f"has tokenizer {key} {tok[key]!r}, not an id below vocab_size {vocab}")
    if meta.get("kind", "text") not in ("reasoning", "text"):
        raise bad(f"has kind {meta['kind']!r}, not reasoning or text")
    if meta.get("kind") == "reasoning":
        _check_task(meta, vocab, bad)


def _check_task(meta, vocab, bad):
    from data.tasks import task_from_meta
    try:
        task_from_meta(meta)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise bad(f"has no valid task ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if "prompt_end_id" in meta:
        end = meta["prompt_end_id"]
        if not (_count(end, 0) and end < vocab):
            raise bad(f"has prompt_end_id {end!r}, not an id below vocab_size {vocab}")
    elif not (isinstance(meta.get("prompt_end", "\n"), str) and len(meta.get("prompt_end", "\n")) == 1):
        raise bad(f"has prompt_end {meta['prompt_end']!r}, not one character")


def open_tokens(data_dir, split, meta):
    """A split's tokens, memmapped: its size must match meta.json, and a sample of its ids must be in the
    vocabulary (a few thousand ids spread over the file: cheap, and catches a file written with another one)."""
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing: re-run `python data/prepare.py` for {data_dir}")
    dtype = np.dtype(meta.get("dtype", "uint16"))
    size, want = os.path.getsize(path), meta.get(f"{split}_tokens")
    if size % dtype.itemsize:
        raise DataError(f"{path} is {size} bytes, not a whole number of {dtype.name} tokens: it is damaged; "
                        f"re-run data/prepare.py for {data_dir}")
    if want is not None and size != want * dtype.itemsize:
        raise DataError(f"{path} holds {size // dtype.itemsize} tokens, meta.json says {want}: "
                        f"re-run data/prepare.py for {data_dir}")
    if size == 0:
        raise DataError(f"{path} is empty: re-run data/prepare.py for {data_dir}")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    tok = meta.get("tokenizer")
    vocab = meta.get("vocab_size", tok.get("n_vocab") if isinstance(tok, dict) else None)
    if vocab is not None:
        _check_ids(tokens, vocab, path, data_dir)
    return tokens


def _check_ids(tokens, vocab, path, data_dir, pieces=16, width=256):
    for start in np.unique(np.linspace(0, max(len(tokens) - width, 0), pieces).astype(np.int64)):
        chunk = np.asarray(tokens[start:start + width])
        if chunk.max() >= vocab:
            at = int(start + np.argmax(chunk >= vocab))
            raise DataError(f"{path} holds token id {int(tokens[at])} at position {at}, outside the vocabulary "
                            f"of {vocab}: it was written for another tokenizer; re-run data/prepare.py "
                            f"for {data_dir}")


def prompt_mask(tokens, bos_id, prompt_end_id):
    """True where a token belongs to a prompt: from each <|bos|> up to and including the first prompt_end_id."""
    tokens = np.asarray(tokens)
    bos = np.flatnonzero(tokens == bos_id)
    ends = np.flatnonzero(tokens == prompt_end_id)
    delta = np.zeros(len(tokens) + 1, dtype=np.int32)
    if len(bos) and not len(ends):
        return np.ones(len(tokens), dtype=bool)  # no prompt ever ends: nothing to learn from
    if len(bos):
        k = np.searchsorted(ends, bos)  # first prompt end at or after each bos
        stop = np.where(k < len(ends), ends[np.minimum(k, len(ends) - 1)] + 1, len(tokens))
        np.add.at(delta, bos, 1)
        np.add.at(delta, stop, -1)
    return np.cumsum(delta[:-1]) > 0


class Batches:
    """(x, y, pos) batches of shape (batch_size, block_size); y is x shifted by one with masked targets set to -1;
    pos gives each token's position in its document (doc-aligned rows) or is None (plain windows)."""

    def __init__(self, tokens, block_size, batch_size, seed, doc_aligned=False, bos_id=None, prompt_end_id=None,
                 rank=0, world_size=1, name="data"):
        self.tokens, self.T, self.B = tokens, block_size, batch_size
        self.rank, self.world = rank, world_size
        n = len(tokens)
        if n < block_size + 1:
            raise DataError(f"{name} holds {n} tokens, fewer than block_size + 1 = {block_size + 1}: "
                            f"lower --block_size or prepare more data")
        if doc_aligned:
            starts = np.flatnonzero(np.asarray(tokens) == bos_id)
            self.starts = starts[starts + block_size + 1 <= n]
            if len(self.starts) == 0:
                raise DataError(f"{name}: no document start leaves room for block_size {block_size}: "
                                f"lower --block_size or prepare more data")
            self.ignore = prompt_mask(tokens, bos_id, prompt_end_id)
        else:
            self.starts, self.ignore = None, None
        self.bos_id = bos_id
        self.rng = np.random.default_rng(seed)

    def _draw_one(self):
        # one generator call per micro-batch, whatever the world size, so the stream is the same for any W
        hi = len(self.starts) if self.starts is not None else len(self.tokens) - self.T
        idx = self.rng.integers(hi, size=self.B)
        return self.starts[idx] if self.starts is not None else idx

    def next(self):
        picks = [self._draw_one() for _ in range(self.world)][self.rank]
        rows = np.stack([np.asarray(self.tokens[s:s + self.T + 1], dtype=np.int64) for s in picks])
        x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
        if self.ignore is None:
            return x, y, None
        ign = np.stack([self.ignore[s + 1:s + self.T + 1] for s in picks])
        y[torch.from_numpy(ign)] = -1
        # positions restart at every document, so each one is seen where evaluation puts it: at position 0
        steps = np.arange(self.T)
        starts = np.maximum.accumulate(np.where(rows[:, :-1] == self.bos_id, steps, 0), axis=1)
        return x, y, torch.from_numpy(steps - starts)

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]


def make_batches(tokens, meta, block_size, batch_size, seed, rank=0, world_size=1, name="train.bin"):
    """The Batches a dataset's kind calls for: document-aligned rows with masked prompts for task corpora,
    random windows for plain text."""
    tok = meta["tokenizer"]
    doc = meta.get("kind") == "reasoning"
    # the prompt's final newline: its token id (datasets made before it was recorded used bytes: its byte value)
    prompt_end = meta.get("prompt_end_id", ord(meta.get("prompt_end", "\n"))) if doc else None
    return Batches(tokens, block_size, batch_size, seed, doc_aligned=doc, bos_id=tok["bos_id"],
                   prompt_end_id=prompt_end, rank=rank, world_size=world_size, name=name)


# ----------------------------------------------------------------------------- datasets by name

DATA_ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATASET = "reasoning"  # built on first use by data/prepare.py's defaults


@dataclass
class Dataset:
    """An opened dataset: its folder, meta.json, tokenizer and task (None for plain text)."""
    name: str
    dir: str
    meta: dict
    tok: object
    task: object

    def tokens(self, split):
        return open_tokens(self.dir, split, self.meta)


def dataset_dir(name):
    """A dataset's folder: a path as given, or a bare name under data/."""
    return name if os.path.isabs(name) or os.sep in name else os.path.join(DATA_ROOT, name)


def put_back_set_aside(d):
    """A dataset that data/prepare.py set aside and did not get to replace (killed between its two renames) goes
    back in place, so it opens as it was; where the folder cannot be written it stays as it is."""
    from data.prepare import recover
    try:
        recover(os.path.realpath(d), tidy=False)
    except OSError:
        pass


def open_dataset(name, build_default=True):
    """Open a dataset by name or path. The built-in default corpus is generated first when it is missing or was
    made by another version of data/tasks.py (build_default: only one process of a job should build it)."""
    from data.prepare import ensure_default_corpus  # (prepare imports this module)
    from data.tasks import task_from_meta
    from data.tokenizer import load_tokenizer
    d = dataset_dir(name)
    if not os.path.exists(d):
        put_back_set_aside(d)
    if name == DEFAULT_DATASET and build_default:
        ensure_default_corpus(d)
    if d != name and not os.path.exists(d) and os.path.isdir(name):
        raise DataError(f"no dataset named {name} under data/ (a bare name is looked up there): for the folder "
                        f"{name} here, give --dataset ./{name}")
    meta = load_meta(d)
    try:
        tok = load_tokenizer(meta["tokenizer"], d)
    except (KeyError, TypeError) as e:
        raise DataError(f"{d}/meta.json has no valid tokenizer entry ({e}): re-run data/prepare.py for it")
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise DataError(str(e) if d in str(e) else f"{d}: {e}")
    if meta.get("vocab_size", tok.n_vocab) != tok.n_vocab:
        raise DataError(f"{d}/meta.json says vocab_size {meta['vocab_size']} but its {tok.name} tokenizer has "
                        f"{tok.n_vocab} tokens: re-run data/prepare.py for {d}")
    for split in ("train", "val"):  # sizes and a sample of ids, now rather than mid-run
        open_tokens(d, split, meta)
    return Dataset(name, d, meta, tok, task_from_meta(meta))
