"""Bad-input cases: data (see tests/test_bad_input.py). train.py opening a damaged copy of the world's datasets
(`bad/`), and data/prepare.py given bad flags, bad TOML, bad input files, or a place it must not write over."""
import json
import os
import shutil

from badworld import DATA, TINY, Case  # noqa: F401

BAD = TINY + ["--dataset", "{w}/bad", "--out_dir", "new"]


def damaged(*changes, src="data_tiny"):
    """setup: copy the world's `src` dataset to bad/, then apply each change(folder) to the copy."""
    def setup(w):
        bad = os.path.join(w, "bad")
        shutil.copytree(os.path.join(w, src), bad)
        for change in changes:
            change(bad)
    return setup


def edit_meta(fn):
    """A change: fn(meta) edits meta.json in place (what it returns is ignored)."""
    def change(d):
        path = os.path.join(d, "meta.json")
        with open(path) as f:
            meta = json.load(f)
        fn(meta)
        with open(path, "w") as f:
            json.dump(meta, f)
    return change


def meta_as(value):
    """A change: meta.json holds `value` (JSON) instead of an object."""
    def change(d):
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump(value, f)
    return change


def set_meta(**values):
    return edit_meta(lambda m: m.update(values))


def set_tokenizer(**values):
    return edit_meta(lambda m: m["tokenizer"].update(values))


def set_task(**values):
    return edit_meta(lambda m: m["task"].update(values))


def drop(key):
    return edit_meta(lambda m: m.pop(key))


def cut(split, nbytes):
    """A change: the split's .bin loses its last nbytes (or is emptied with nbytes=None)."""
    def change(d):
        path = os.path.join(d, f"{split}.bin")
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(0 if nbytes is None else size - nbytes)
    return change


def append(split, data):
    def change(d):
        with open(os.path.join(d, f"{split}.bin"), "ab") as f:
            f.write(data)
    return change


def poke(split, position, value):
    """A change: token `position` (negative: from the end) of the split becomes `value` (uint16)."""
    def change(d):
        path = os.path.join(d, f"{split}.bin")
        at = position if position >= 0 else os.path.getsize(path) // 2 + position
        with open(path, "r+b") as f:
            f.seek(2 * at)
            f.write(int(value).to_bytes(2, "little"))
    return change


def remove(name):
    return lambda d: os.remove(os.path.join(d, name))


def write(name, data):
    """setup: a file in the case's folder (bytes or text)."""
    def setup(w):
        with open(os.path.join(w, name), "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
    return setup


def hf_dir(tokenizer_json, folder="hf", **configs):
    """setup (or a change of a dataset copy, with folder="."): a Hugging Face model folder whose tokenizer.json
    holds `tokenizer_json` (text), with config files `name_json=text` (config_json: config.json)."""
    def setup(w):
        d = os.path.join(w, folder)
        os.makedirs(d, exist_ok=True)
        for name, text in {"tokenizer.json": tokenizer_json, **configs}.items():
            with open(os.path.join(d, name.replace("_json", ".json")), "w") as f:
                f.write(text)
    return setup


def open_fails(id, setup, expect):
    return Case(f"data-open-{id}", "train", BAD, expect, setup=setup)


META = r"bad/meta\.json "
CASES = [
    # the token files
    open_fails("train-bin-cut-short", damaged(cut("train", 200)), r"bad/train\.bin holds \d+ tokens, meta\.json "
                                                                    r"says \d+: re-run data/prepare\.py"),
    open_fails("val-bin-cut-short", damaged(cut("val", 2)), r"bad/val\.bin holds \d+ tokens, meta\.json says"),
    open_fails("train-bin-odd-bytes", damaged(append("train", b"x")), r"bad/train\.bin is \d+ bytes, not a whole"),
    open_fails("train-bin-longer", damaged(append("train", b"\0\0" * 10)), r"bad/train\.bin holds \d+ tokens"),
    open_fails("train-bin-empty", damaged(cut("train", None)), r"bad/train\.bin holds 0 tokens"),
    open_fails("train-bin-missing", damaged(remove("train.bin")), r"bad/train\.bin is missing"),
    open_fails("val-bin-missing", damaged(remove("val.bin")), r"bad/val\.bin is missing"),
    open_fails("train-id-out-of-range", damaged(poke("train", 0, 300)),
               r"bad/train\.bin holds token id 300 at position 0, outside the vocabulary of 259"),
    open_fails("val-id-out-of-range-at-end", damaged(poke("val", -1, 65535)), r"bad/val\.bin holds token id 65535"),
    # meta.json as a whole
    open_fails("meta-missing", damaged(remove("meta.json")), r"no dataset at .*bad \(meta\.json missing\)"),
    open_fails("meta-not-json", damaged(lambda d: open(os.path.join(d, "meta.json"), "w").write("{oops")),
               r"bad/meta\.json is corrupt"),
    open_fails("meta-a-list", damaged(meta_as([{"vocab_size": 259}])), META + r"holds a JSON list, not an object"),
    open_fails("meta-a-string", damaged(meta_as("reasoning")), META + r"holds a JSON str"),
    open_fails("meta-a-number", damaged(meta_as(259)), META + r"holds a JSON int"),
    # its entries
    open_fails("meta-no-tokenizer", damaged(drop("tokenizer")), META + r"has no tokenizer entry"),
    open_fails("meta-tokenizer-a-string", damaged(set_meta(tokenizer="bytes")), META + r"has no tokenizer entry"),
    open_fails("meta-tokenizer-unknown", damaged(set_tokenizer(name="sentencepiece")), r"unknown tokenizer"),
    open_fails("meta-tokenizer-no-bos", damaged(edit_meta(lambda m: m["tokenizer"].pop("bos_id"))),
               META + r"has no tokenizer bos_id"),
    open_fails("meta-bos-out-of-vocab", damaged(set_tokenizer(bos_id=999)), META + r"has tokenizer bos_id 999"),
    open_fails("meta-tokenizer-n-vocab-differs", damaged(set_tokenizer(n_vocab=300)),
               r"bad: the bytes tokenizer has 259 tokens but the dataset was made with 300"),
    open_fails("meta-vocab-zero", damaged(set_meta(vocab_size=0)), META + r"has vocab_size 0, not a positive"),
    open_fails("meta-vocab-a-string", damaged(set_meta(vocab_size="259")), META + r"has vocab_size '259'"),
    open_fails("meta-vocab-a-bool", damaged(set_meta(vocab_size=True)), META + r"has vocab_size True"),
    open_fails("meta-vocab-not-the-tokenizers", damaged(set_meta(vocab_size=300)),
               r"bad/meta\.json says vocab_size 300 but its bytes tokenizer has 259 tokens"),
    open_fails("meta-dtype-float", damaged(set_meta(dtype="float32")), META + r"has dtype 'float32', not uint16"),
    open_fails("meta-dtype-uint8", damaged(set_meta(dtype="uint8")), META + r"has dtype 'uint8'"),
    open_fails("meta-dtype-too-narrow", damaged(set_meta(vocab_size=70000)),
               META + r"has dtype uint16, too narrow for vocab_size 70000"),
    open_fails("meta-train-tokens-negative", damaged(set_meta(train_tokens=-1)), META + r"has train_tokens -1"),
    open_fails("meta-val-tokens-a-float", damaged(set_meta(val_tokens=12.5)), META + r"has val_tokens 12\.5"),
    open_fails("meta-train-tokens-wrong", damaged(edit_meta(lambda m: m.update(train_tokens=m["val_tokens"]))),
               r"bad/train\.bin holds (\d+) tokens, meta\.json says \d+"),
    open_fails("meta-kind-unknown", damaged(set_meta(kind="images")), META + r"has kind 'images'"),
    open_fails("meta-task-missing", damaged(drop("task")), META + r"has no valid task"),
    open_fails("meta-task-a-list", damaged(set_meta(task=[1, 2])), META + r"has no valid task"),
    open_fails("meta-task-bad-level", damaged(set_task(levels=[1, 9], level_weights=[1, 1])),
               META + r"has no valid task .*levels"),
    open_fails("meta-task-unknown-key", damaged(set_task(borrow=True)), META + r"has no valid task .*borrow"),
    open_fails("meta-prompt-end-out-of-vocab", damaged(set_meta(prompt_end_id=259)),
               META + r"has prompt_end_id 259"),
    open_fails("meta-prompt-end-a-string", damaged(set_meta(prompt_end_id="\n")), META + r"has prompt_end_id"),
    open_fails("meta-old-prompt-end-two-chars", damaged(drop("prompt_end_id"), set_meta(prompt_end="ab")),
               META + r"has prompt_end 'ab'"),
    # the plain-text dataset
    open_fails("text-train-bin-cut-short", damaged(cut("train", 10), src="text_tiny"),
               r"bad/train\.bin holds \d+ tokens, meta\.json says"),
    open_fails("text-bpe-ranks-missing", damaged(set_tokenizer(name="bpe", ranks_file="bpe.tiktoken"),
                                                 src="text_tiny"), r"bpe\.tiktoken not found"),
    open_fails("text-meta-a-list", damaged(meta_as([]), src="text_tiny"), META + r"holds a JSON list"),
    # a Hugging Face tokenizer.json copied into the dataset (--tokenizer hf:DIR), malformed
    open_fails("hf-tokenizer-json-model-a-number",
               damaged(set_tokenizer(name="hf", tokenizer_file="tokenizer.json"), hf_dir('{"model": 5}', ".")),
               r"bad/tokenizer\.json: model is a number, not an object"),
    open_fails("hf-tokenizer-json-a-list",
               damaged(set_tokenizer(name="hf", tokenizer_file="tokenizer.json"), hf_dir("[1, 2]", ".")),
               r"bad/tokenizer\.json: its top level is a list, not an object"),
    Case("data-open-a-file", "train", TINY + ["--dataset", "{w}/notes.txt", "--out_dir", "new"],
         r"no dataset at .*notes\.txt"),
]

TOML = ["--config", "{w}/p.toml"]
SMALL = ["--train_examples", "50", "--val_examples", "10", "--test_per_level", "2"]
HF_TEXT = ["text", "--input", "story.txt", "--out", "new", "--tokenizer", "hf:hf"]


def prep(id, argv, expect, setup=None):
    return Case(f"data-prepare-{id}", "prepare", argv, expect, setup=setup)


CASES += [
    # the mode
    prep("no-mode", [], r"no mode given: the first word is reasoning, subtraction or text"),
    prep("unknown-mode", ["reasonin"], r"unknown mode 'reasonin' \(did you mean reasoning\?\)"),
    prep("flag-before-mode", ["--out", "x", "reasoning"], r"unknown mode '--out'"),
    prep("stray-word", ["reasoning", "extra"], r"unexpected argument 'extra'"),
    prep("unknown-flag", ["reasoning", "--levls", "1"], r"unknown flag --levls; did you mean --levels"),
    # task flags
    prep("levels-unknown", ["reasoning", "--levels", "1,9", "--level_weights", "1,1"], r"--levels .*must be among"),
    prep("levels-not-ints", ["reasoning", "--levels", "a,b"], r"--levels expects comma-separated ints"),
    prep("levels-float", ["reasoning", "--levels", "1.5"], r"--levels expects comma-separated ints"),
    prep("levels-empty", ["reasoning", "--levels", ""], r"--levels \(\): needs at least one level"),
    prep("levels-repeated", ["reasoning", "--levels", "1,1", "--level_weights", "1,1"], r"--levels .*repeated"),
    prep("level-weights-count", ["reasoning", "--levels", "1,2"], r"--level_weights needs one .*weight per level"),
    prep("level-weights-negative", ["reasoning", "--level_weights", "1,-1,1,1"], r"--level_weights .*>= 0"),
    prep("level-weights-all-zero", ["reasoning", "--level_weights", "0,0,0,0"], r"--level_weights .*above 0"),
    prep("level-weights-nan", ["reasoning", "--level_weights", "nan,1,1,1"], r"--level_weights .*finite"),
    prep("style-mix-length", ["reasoning", "--style_mix", "1,0"], r"--style_mix needs 3 non-negative weights"),
    prep("style-mix-negative", ["reasoning", "--style_mix", "-1,1,1"], r"--style_mix .*>= 0"),
    prep("train-examples-zero", ["reasoning", "--train_examples", "0"], r"--train_examples must be >= 1, not 0"),
    prep("val-examples-a-word", ["reasoning", "--val_examples", "many"], r"--val_examples expects int"),
    prep("test-per-level-negative", ["subtraction", "--test_per_level", "-3"], r"--test_per_level must be >= 1"),
    prep("subtraction-weights-count", ["subtraction", "--levels", "5"], r"--level_weights needs one"),
    prep("lsd-first-not-bool", ["reasoning", "--lsd_first", "maybe"], r"--lsd_first expects bool"),
    prep("seed-a-float", ["reasoning", "--seed", "1.5"], r"--seed expects int"),
    prep("reasoning-tokenizer-bpe", ["reasoning", "--tokenizer", "bpe"], r"--tokenizer 'bpe': .*prepare\.py text"),
    prep("reasoning-tokenizer-unknown", ["reasoning", "--tokenizer", "sentencepiece"], r"--tokenizer 'sentencep"),
    prep("reasoning-tokenizer-hf-nowhere", ["reasoning", "--tokenizer", "hf:{w}/nowhere", "--out", "new"],
         r"nowhere/tokenizer\.json not found"),
    prep("out-blank", ["reasoning", "--out", " "], r"--out ' ': must not be empty"),
    # text flags and input files
    prep("text-no-input", ["text", "--out", "new"], r"--input FILE is needed"),
    prep("text-no-out", ["text", "--input", "story.txt"], r"--out DIR is needed"),
    prep("text-vocab-too-small", ["text", "--input", "story.txt", "--out", "new", "--tokenizer", "bpe",
                                  "--vocab_size", "256"], r"--vocab_size must be >= 257, not 256"),
    prep("text-vocab-beyond-the-text", ["text", "--input", "story.txt", "--out", "new", "--tokenizer", "bpe",
                                        "--vocab_size", "100000"], r"supports at most \d+ tokens"),
    prep("text-vocab-without-bpe", ["text", "--input", "story.txt", "--out", "new", "--vocab_size", "512"],
         r"--vocab_size 512 applies only to --tokenizer bpe \(the bytes tokenizer brings its own vocabulary\)"),
    prep("text-vocab-with-gpt2", ["text", "--input", "story.txt", "--out", "new", "--tokenizer", "gpt2",
                                  "--vocab_size", "4096"], r"--vocab_size 4096 applies only to --tokenizer bpe"),
    prep("toml-text-vocab-without-bpe", ["text"] + TOML, r"--vocab_size 1024 applies only to --tokenizer bpe",
         setup=write("p.toml", 'input = "story.txt"\nout = "new"\nvocab_size = 1024\n')),
    prep("text-val-fraction-one", ["text", "--input", "story.txt", "--out", "new", "--val_fraction", "1"],
         r"--val_fraction must be < 1"),
    prep("text-val-fraction-zero", ["text", "--input", "story.txt", "--out", "new", "--val_fraction", "0"],
         r"--val_fraction must be > 0"),
    prep("text-val-fraction-nan", ["text", "--input", "story.txt", "--out", "new", "--val_fraction", "nan"],
         r"--val_fraction must be a finite number"),
    prep("text-tokenizer-unknown", ["text", "--input", "story.txt", "--out", "new", "--tokenizer", "wordpiece"],
         r"--tokenizer 'wordpiece': must be bytes, bpe, gpt2 or hf:DIR"),
    # --tokenizer hf:DIR whose files are malformed
    prep("text-hf-model-a-number", HF_TEXT, r"hf/tokenizer\.json: model is a number, not an object: give a Hug",
         setup=hf_dir('{"model": 5}')),
    prep("text-hf-top-level-a-list", HF_TEXT, r"hf/tokenizer\.json: its top level is a list, not an object",
         setup=hf_dir("[1, 2]")),
    prep("text-hf-added-token-no-content", HF_TEXT, r"hf/tokenizer\.json: added_tokens\[0\]\.content is missing",
         setup=hf_dir('{"model": {"vocab": {}}, "added_tokens": [{"id": 1}]}')),
    prep("text-hf-no-model", HF_TEXT, r"hf/tokenizer\.json: model is missing \(an object expected\)",
         setup=hf_dir('{"version": "1.0"}')),
    prep("text-hf-vocab-id-a-string", HF_TEXT, r"model\.vocab\['a'\] is a string, not an integer",
         setup=hf_dir('{"model": {"vocab": {"a": "1"}}}')),
    prep("text-hf-merge-three-parts", HF_TEXT, r"model\.merges\[0\] is 'a b c', not a pair of tokens",
         setup=hf_dir('{"model": {"vocab": {}, "merges": ["a b c"]}}')),
    prep("text-hf-pre-tokenizer-a-string", HF_TEXT, r"hf/tokenizer\.json: pre_tokenizer is a string, not an obj",
         setup=hf_dir('{"model": {"vocab": {}}, "pre_tokenizer": "ByteLevel"}')),
    prep("text-hf-not-json", HF_TEXT, r"hf/tokenizer\.json is not valid JSON", setup=hf_dir('{"model"')),
    prep("text-hf-config-a-list", HF_TEXT, r"hf/config\.json: its top level is a list, not an object",
         setup=hf_dir('{"model": {"vocab": {}}}', config_json="[1]")),
    prep("text-hf-eos-beyond-vocab", HF_TEXT, r"hf/config\.json: eos_token_id is 7, not a token .* below 1",
         setup=hf_dir('{"model": {"vocab": {"a": 0}}}', config_json='{"eos_token_id": 7}')),
    prep("reasoning-hf-model-a-list", ["reasoning", "--tokenizer", "hf:hf", "--out", "new"],
         r"hf/tokenizer\.json: model is a list, not an object", setup=hf_dir('{"model": []}')),
    prep("text-input-missing", ["text", "--input", "nope.txt", "--out", "new"], r"no such text file: nope\.txt"),
    prep("text-input-dev-null", ["text", "--input", "/dev/null", "--out", "new"],
         r"/dev/null is not a regular file \(a character device\): give a text file"),
    prep("text-input-a-fifo", ["text", "--input", "fifo", "--out", "new"], r"fifo is not a regular file \(a pipe\)",
         setup=lambda w: os.mkfifo(os.path.join(w, "fifo"))),
    prep("text-input-a-broken-link", ["text", "--input", "gone.txt", "--out", "new"], r"no such text file: gone",
         setup=lambda w: os.symlink("nowhere.txt", os.path.join(w, "gone.txt"))),
    prep("text-input-a-folder", ["text", "--input", "data_tiny", "--out", "new"], r"data_tiny is a folder"),
    prep("text-input-empty", ["text", "--input", "empty.txt", "--out", "new"], r"empty\.txt is empty",
         setup=write("empty.txt", " \n\n")),
    prep("text-input-binary", ["text", "--input", "data_tiny/train.bin", "--out", "new"],
         r"data_tiny/train\.bin holds a NUL byte at byte offset \d+"),
    prep("text-input-nul", ["text", "--input", "nul.txt", "--out", "new"],
         r"nul\.txt holds a NUL byte at byte offset 6", setup=write("nul.txt", b"hello \0world\n" * 9)),
    prep("text-input-latin1", ["text", "--input", "latin.txt", "--out", "new"],
         r"latin\.txt is not UTF-8 text \(byte 0xe9 at byte offset 3\)",
         setup=write("latin.txt", b"caf\xe9 au lait\n" * 9)),
    prep("text-input-too-short", ["text", "--input", "a.txt", "--out", "new"], r"a\.txt is too short",
         setup=write("a.txt", "a")),
    # where it writes
    prep("over-other-task", ["reasoning", "--levels", "1,2", "--level_weights", "0.5,0.5", "--out", "data_tiny"],
         r"data_tiny holds a dataset made with other settings \(levels: \[1, 2, 3, 4\] -> \[1, 2\].*--overwrite"),
    prep("over-other-size", ["reasoning", "--out", "data_tiny"], r"data_tiny holds a dataset made with other "
                                                                  r"settings \(train_examples: 400 -> 60000"),
    prep("subtraction-over-addition", ["subtraction", "--out", "data_tiny"] + SMALL, r"other settings \(levels"),
    prep("reasoning-over-text", ["reasoning", "--out", "text_tiny"] + SMALL,
         r"text_tiny holds a dataset made with other settings \(kind: text -> reasoning"),
    prep("text-over-reasoning", ["text", "--input", "story.txt", "--out", "data_tiny"], r"other settings \(kind"),
    prep("text-other-input", ["text", "--input", "other.txt", "--out", "text_tiny"], r"other settings \(input:",
         setup=write("other.txt", "another story\n" * 30)),
    prep("over-unreadable-meta", ["reasoning", "--out", "bad"] + SMALL, r"meta\.json is missing or unreadable",
         setup=damaged(lambda d: open(os.path.join(d, "meta.json"), "w").write("{"))),
    prep("over-a-run-folder", ["reasoning", "--out", "run"] + SMALL, r"run holds files that are not a dataset's"),
    prep("over-a-run-folder-overwrite", ["reasoning", "--out", "run", "--overwrite"] + SMALL,
         r"run holds files that are not a dataset's .*even with --overwrite"),
    prep("over-a-file", ["text", "--input", "story.txt", "--out", "notes.txt"], r"notes\.txt is a file"),
    # TOML
    prep("toml-unknown-key", ["reasoning"] + TOML, r"unknown flag --levls", setup=write("p.toml", "levls = [1]\n")),
    prep("toml-wrong-type", ["reasoning"] + TOML, r"--train_examples expects int",
         setup=write("p.toml", 'train_examples = "many"\n')),
    prep("toml-levels-floats", ["reasoning"] + TOML, r"--levels expects comma-separated ints",
         setup=write("p.toml", "levels = [1.5, 2.0]\n")),
    prep("toml-task-relation", ["reasoning"] + TOML, r"--level_weights needs one",
         setup=write("p.toml", "levels = [1, 2]\nlevel_weights = [1.0]\n")),
    prep("toml-text-val-fraction", ["text"] + TOML, r"--val_fraction must be < 1",
         setup=write("p.toml", 'input = "story.txt"\nout = "new"\nval_fraction = 2.0\n')),
    prep("toml-not-toml", ["text"] + TOML, r"not valid TOML", setup=write("p.toml", "input = \n")),
    prep("toml-missing", ["text", "--config", "none.toml"], r"config file none\.toml not found"),
]

CASES += [
    Case("data-bare-name-of-a-folder-here", "train", TINY + ["--dataset", "data_tiny", "--out_dir", "new"],
         r"no dataset named data_tiny under data/.*--dataset ./data_tiny"),
]
