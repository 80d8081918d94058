"""Prepare a dataset: token ids in train.bin / val.bin (uint16, or uint32 when the vocabulary needs it) + meta.json.

    python data/prepare.py reasoning                       # the built-in reasoning corpus -> data/reasoning/
    python data/prepare.py reasoning --style_mix 0.3,0.4,0.3 --out data/reasoning_mix
    python data/prepare.py subtraction                     # fine-tuning task: a - b, nines' complement
    python data/prepare.py text --input my.txt --out data/mytext --tokenizer bpe --vocab_size 2048
    python data/prepare.py reasoning --tokenizer hf:path/to/SmolLM2-135M --out data/reasoning_smollm

Ideas it rests on:
- The reasoning corpus is generated from a seed (data/tasks.py), so every machine builds the same bytes; its task
  settings go into meta.json, from which evaluation regenerates the held-out test problems.
- Documents are `<|bos|>prompt answer<|eos|>`; the loader masks the prompt out of the loss. With a Hugging Face
  model's tokenizer (--tokenizer hf:DIR) they are that model's bos and eos, so generation stops at its eos; its
  tokenizer.json is copied into the dataset, which then stands on its own.
- Files are written to a temporary name and renamed, so an interrupted or failed run never leaves a half dataset
  in place of a good one.
"""
import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, fields

import numpy as np

if __package__ in (None, ""):  # run as a script: make `data` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from files import atomic_write  # noqa: E402
from data.loader import DataError, load_meta  # noqa: E402
from data.tasks import FORMAT_VERSION, TaskConfig, make_examples, subtraction_task  # noqa: E402
from data.tokenizer import (byte_tokenizer, bpe_tokenizer, gpt2_tokenizer, load_bpe, load_hf_tokenizer,  # noqa: E402
                            save_bpe, train_bpe)

DATA_ROOT = os.path.dirname(os.path.abspath(__file__))


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


def prepare_reasoning(out_dir, cfg: TaskConfig = None, verbose=True, tokenizer="bytes", default=False):
    """Generate the reasoning corpus into out_dir with tokenizer bytes, gpt2 or hf:DIR; returns its meta dict.
    default: built as the built-in corpus (which train.py may rebuild when data/tasks.py changes)."""
    cfg = cfg or TaskConfig()
    tok = named_tokenizer(tokenizer)
    examples = make_examples(cfg, "train", cfg.train_examples)
    end_id = prompt_end_id(tok, examples)
    train = encode_documents(tok, examples)
    val = encode_documents(tok, make_examples(cfg, "val", cfg.val_examples))
    meta = write_dataset(out_dir, train, val, tok, dict(kind="reasoning", task=asdict(cfg), prompt_end="\n",
                                                         prompt_end_id=end_id,
                                                         format_version=FORMAT_VERSION,
                                                         built_as_default=default))
    if verbose:
        print(f"reasoning corpus: {len(train):,} train / {len(val):,} val tokens -> {out_dir}")
    return meta


def ensure_default_corpus(out_dir):
    """The built-in corpus with today's defaults at out_dir: built when missing, rebuilt when an older version of
    data/tasks.py built it as the default; a dataset made with other settings is never replaced (DataError)."""
    want = json.loads(json.dumps(asdict(TaskConfig())))
    path = os.path.join(out_dir, "meta.json")
    if not os.path.exists(path):
        return prepare_reasoning(out_dir, default=True)
    meta = load_meta(out_dir)
    if isinstance(meta, dict) and meta.get("format_version") == FORMAT_VERSION and meta.get("task") == want:
        return meta
    if isinstance(meta, dict) and meta.get("built_as_default"):
        return prepare_reasoning(out_dir, default=True)  # an older version's default corpus
    raise DataError(f"{out_dir} holds a dataset made with other settings than the default corpus: pass "
                    f"--dataset with its path to use it, or move it away to build the default")


def prepare_text(input_path, out_dir, tokenizer="bytes", vocab_size=2048, val_fraction=0.1, verbose=True):
    """Tokenize a text file into out_dir (the last val_fraction of the text is validation)."""
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"no such text file: {input_path}")
    with open(input_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{input_path} is empty: give a text file with some content")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    cut = int(len(text) * (1 - val_fraction))
    if tokenizer == "bpe":
        ranks = train_bpe(text[:cut], vocab_size)  # merges learned on the train part only
        tok = bpe_tokenizer(ranks)  # in memory: nothing is written until every check has passed
    else:
        tok = named_tokenizer(tokenizer)
    train, val = tok.encode(text[:cut]), tok.encode(text[cut:])
    if not train or not val:
        raise ValueError(f"{input_path} is too short to split into train and val: give more text")
    if tokenizer == "bpe":
        os.makedirs(out_dir, exist_ok=True)
        save_bpe(os.path.join(out_dir, "bpe.tiktoken"), ranks)  # written atomically, like the rest
        tok = load_bpe(os.path.join(out_dir, "bpe.tiktoken"))
    meta = write_dataset(out_dir, train, val, tok, dict(kind="text", source=os.path.abspath(input_path)))
    if verbose:
        print(f"{input_path}: {len(train):,} train / {len(val):,} val tokens ({tok.name}, vocab {tok.n_vocab}) "
              f"-> {out_dir}")
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description="Prepare a dataset for train.py", allow_abbrev=False)
    sub = p.add_subparsers(dest="mode", required=True)
    for mode, defaults, what in (("reasoning", TaskConfig(), "the built-in reasoning corpus (addition)"),
                                 ("subtraction", subtraction_task(), "the fine-tuning task: subtraction")):
        r = sub.add_parser(mode, help=what, allow_abbrev=False)
        r.add_argument("--out", default=os.path.join(DATA_ROOT, mode))
        r.add_argument("--tokenizer", default="bytes", help="bytes, gpt2 or hf:DIR (a Hugging Face model's)")
        for f in fields(TaskConfig):
            v = getattr(defaults, f.name)
            elem = type(v[0]) if isinstance(v, tuple) and v else float  # an empty tuple default holds floats
            kind = (lambda s, t=elem: tuple(t(x) for x in s.split(","))) if isinstance(v, tuple) else \
                (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(v, bool) else type(v)
            shown = (",".join(map(str, v)) or "DEFAULT_MIX in data/tasks.py, per level") if isinstance(v, tuple) else v
            r.add_argument(f"--{f.name}", type=kind, default=v, help=f"default {shown}")
    t = sub.add_parser("text", help="tokenize a text file", allow_abbrev=False)
    t.add_argument("--input", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--tokenizer", default="bytes", help="bytes, bpe, gpt2 or hf:DIR (a Hugging Face model's)")
    t.add_argument("--vocab_size", type=int, default=2048, help="for --tokenizer bpe")
    t.add_argument("--val_fraction", type=float, default=0.1)
    args = p.parse_args(argv)
    try:
        if args.mode in ("reasoning", "subtraction"):
            cfg = TaskConfig(**{f.name: getattr(args, f.name) for f in fields(TaskConfig)})
            prepare_reasoning(args.out, cfg, tokenizer=args.tokenizer)
        else:
            prepare_text(args.input, args.out, args.tokenizer, args.vocab_size, args.val_fraction)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
