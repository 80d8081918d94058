"""Tokenizers: raw bytes, a BPE trained here, or GPT-2's, all served by one `tiktoken.Encoding`.

Ideas it rests on:
- tiktoken does all encoding and decoding (fast, Rust); this file only builds its inputs: a split pattern, the
  mergeable ranks (token bytes -> rank, the 256 single bytes first) and the special tokens, which get the ids right
  after the base vocabulary. Special-token text inside user text is encoded as plain text, never as a special id.
- BPE training is our own: split the text with the pattern, count each distinct chunk once with its frequency, then
  merge the most frequent adjacent pair, updating pair counts only for the chunks that contain it. A chunk is always
  kept as tiktoken would encode it (repeatedly merge the adjacent pair whose concatenation has the lowest rank), so
  the trained ranks encode any text exactly as the trainer's merge sequence does.
- Nothing downloads by default: GPT-2's encoding is an explicit choice and fails fast, in one line, when offline.
- A Hugging Face tokenizer.json of byte-level BPE (GPT-2, Llama 3, Qwen2/3, SmolLM) becomes the same kind of
  Encoding: each vocabulary string is mapped back to its bytes through GPT-2's byte-to-unicode table, and its id is
  its rank (these vocabularies number their tokens in merge order, which is checked), the pre-tokenizer's regex is
  the split pattern, and the added tokens are the special tokens. What tiktoken lacks is done before it: NFC
  normalisation (Qwen) and cutting out each digit (SmolLM's Digits pre-tokenizer).
"""
import base64
import heapq
import json
import os
import threading
import unicodedata
from collections import Counter, defaultdict

import regex  # tiktoken's own dependency; needed for \p{L} in the split pattern
import tiktoken

from files import atomic_write

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")

# GPT-4's split pattern with numbers cut into groups of at most 2 digits (as nanochat does for small vocabularies:
# fewer tokens spent on numbers). Python's `regex` and tiktoken's Rust engine split text identically with it.
GPT4_LIKE_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# every character, newlines included, in chunks of up to 64: no merges exist, so chunks only need to cover the text
# (larger chunks than one character make tiktoken about 2x faster here)
BYTE_PATTERN = r"[\s\S]{1,64}"


class Tokenizer:
    """A thin wrapper over a tiktoken.Encoding with bos/eos/pad ids and a JSON description (to_meta)."""

    def __init__(self, name, enc, bos_id, eos_id, pad_id, ranks_file=None):
        self.name, self.enc, self.ranks_file = name, enc, ranks_file
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.n_vocab = enc.n_vocab  # includes the special tokens

    def __repr__(self):
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab})"

    def encode_ordinary(self, text):
        return self.enc.encode_ordinary(text)  # ordinary: "<|bos|>" in the text stays plain text

    def encode(self, text, bos=False, eos=False):
        ids = self.encode_ordinary(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts, bos=False, eos=False):
        # a plain loop: tiktoken's encode_ordinary_batch submits one thread-pool task per text, which for the
        # corpus's 62k short documents took 4.7 s against 0.5 s for this loop (2 cores)
        batch = [self.encode_ordinary(t) for t in texts]
        if bos or eos:
            batch = [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in batch]
        return batch

    def decode(self, ids):
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # torch tensor / numpy array / list
        if ids and not isinstance(ids[0], int):
            raise ValueError(f"decode takes a 1-D sequence of token ids, got nested {type(ids[0]).__name__}s")
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the {self.name} vocabulary (0..{self.n_vocab - 1})")
        return self.enc.decode(ids)  # invalid UTF-8 (a cut multi-byte character) becomes U+FFFD

    def to_meta(self):
        meta = {"name": self.name, "n_vocab": self.n_vocab,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}
        if self.name == "bpe":
            if self.ranks_file is None:
                raise ValueError("this BPE tokenizer has no ranks file: write it with save_bpe, then use load_bpe")
            meta["ranks_file"] = self.ranks_file
        if self.name == "hf":  # data/prepare.py copies the tokenizer.json into the dataset under this name
            meta["tokenizer_file"] = "tokenizer.json"
        return meta


def _with_specials(name, pattern, ranks, ranks_file=None):
    n = len(ranks)
    specials = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(name, enc, n, n + 1, n + 2, ranks_file)


def byte_tokenizer():
    """256 byte tokens (id = byte value), then <|bos|>, <|eos|>, <|pad|> at 256, 257, 258."""
    return _with_specials("bytes", BYTE_PATTERN, {bytes([i]): i for i in range(256)})


# ---------------------------------------------------------------------------------------------------------------
# BPE training

def _merge_chunk(word, ranks, vocab):
    """Merge, in place, the adjacent pair whose concatenation has the lowest rank until none is in ranks.
    This is tiktoken's own rule, so the trainer's chunks always equal tiktoken's encoding of them."""
    while len(word) > 1:
        best, best_i = None, -1
        for i in range(len(word) - 1):
            r = ranks.get(vocab[word[i]] + vocab[word[i + 1]])
            if r is not None and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            break
        word[best_i:best_i + 2] = [best]  # rank == token id
    return word


def train_bpe(text, vocab_size, pattern=GPT4_LIKE_PATTERN):
    """Train BPE on `text`; returns tiktoken mergeable ranks {token bytes: rank}: the 256 bytes, then one token per
    merge in merge order (vocab_size counts both). Ties between equally frequent pairs go to the smallest id pair."""
    if not text:
        raise ValueError("train_bpe got an empty training text: pass some text to learn merges from")
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the byte tokens), got {vocab_size}")
    chunks = Counter(regex.findall(pattern, text))
    words = [list(c.encode("utf-8")) for c in chunks]
    freqs = list(chunks.values())
    n_merges = vocab_size - 256
    most = sum(len(w) - 1 for w in words)  # an upper bound: each merge shortens some distinct chunk by one
    if n_merges > most:
        raise ValueError(f"the training text supports at most {256 + most} tokens, not vocab_size {vocab_size}: "
                         "lower vocab_size or give more text")

    vocab = [bytes([i]) for i in range(256)]  # id -> bytes
    ranks = {b: i for i, b in enumerate(vocab)}
    counts = defaultdict(int)  # (a, b) -> occurrences in the text
    where = defaultdict(set)  # (a, b) -> ids of chunks that contain it (may hold stale ids)
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            counts[pair] += f
            where[pair].add(wi)
    heap = [(-c, pair) for pair, c in counts.items()]  # max-count first, then the smallest pair
    heapq.heapify(heap)

    while len(vocab) < vocab_size:
        while heap and counts.get(heap[0][1], 0) != -heap[0][0]:
            heapq.heappop(heap)  # a stale entry: its count has changed since it was pushed
        if not heap:
            raise ValueError(f"the training text supports only {len(vocab)} tokens, not vocab_size {vocab_size}: "
                             "lower vocab_size or give more text")
        _, (a, b) = heapq.heappop(heap)
        new_id = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        ranks[vocab[-1]] = new_id
        delta = defaultdict(int)
        for wi in where.pop((a, b)):
            w, f = words[wi], freqs[wi]
            old = list(zip(w, w[1:]))
            if (a, b) not in old:
                continue  # stale: an earlier merge already changed this chunk
            _merge_chunk(w, ranks, vocab)  # merges (a, b), and any pair that then forms an existing token
            for pair in old:
                delta[pair] -= f
            for pair in zip(w, w[1:]):
                delta[pair] += f
                where[pair].add(wi)
        for pair, d in delta.items():
            if d:
                counts[pair] += d
                if counts[pair] > 0:
                    heapq.heappush(heap, (-counts[pair], pair))
                else:
                    del counts[pair]
    return ranks


def _check_ranks(ranks):
    if sorted(ranks.values()) != list(range(len(ranks))) or any(ranks.get(bytes([i])) != i for i in range(256)):
        raise ValueError("BPE ranks must be the 256 bytes at ranks 0..255, then merges numbered 256, 257, ... "
                         "without gaps: build them with train_bpe")


def bpe_tokenizer(ranks, pattern=GPT4_LIKE_PATTERN):
    """A tokenizer from trained ranks; the special tokens take the ids right after them."""
    _check_ranks(ranks)
    return _with_specials("bpe", pattern, ranks)


def save_bpe(path, ranks, pattern=GPT4_LIKE_PATTERN):
    """Write the pattern (a JSON string) on the first line, then `base64(token) rank` per line, atomically."""
    _check_ranks(ranks)
    lines = [json.dumps(pattern)] + [f"{base64.b64encode(t).decode()} {r}" for t, r in
                                      sorted(ranks.items(), key=lambda kv: kv[1])]
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_bpe(path):
    """Read a save_bpe file back into a Tokenizer that remembers the file's name (for to_meta)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"BPE ranks file {path} not found: re-run data/prepare.py to rebuild it")
    try:
        with open(path, encoding="utf-8") as f:
            pattern = json.loads(f.readline())
            ranks = {}
            for line in f:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
        _check_ranks(ranks)
    except (ValueError, UnicodeDecodeError) as e:  # json, split, base64 and int errors are all ValueErrors
        raise ValueError(f"{path} is not a BPE ranks file written by save_bpe ({type(e).__name__}): "
                         "re-run data/prepare.py to rebuild it") from None
    return _with_specials("bpe", pattern, ranks, ranks_file=os.path.basename(path))


# ---------------------------------------------------------------------------------------------------------------
# GPT-2 (explicit choice only) and rebuilding from meta.json

def gpt2_tokenizer(timeout_s=30.0):
    """tiktoken's GPT-2 encoding; bos = eos = pad = <|endoftext|> (50256). It reads a local tiktoken cache
    (TIKTOKEN_CACHE_DIR) or downloads; requests has no timeout there, so the load runs in a thread we stop waiting
    for after timeout_s."""
    fix = "set TIKTOKEN_CACHE_DIR to a directory holding its files, or use --tokenizer bytes/bpe"
    result = []

    def load():
        try:
            result.append(tiktoken.get_encoding("gpt2"))
        except Exception as e:  # noqa: BLE001 - any failure (network, hash, cache) gets the same one-line advice
            result.append(e)

    thread = threading.Thread(target=load, daemon=True)  # daemon: a hung download does not block exit
    thread.start()
    thread.join(timeout_s)
    if not result:
        raise RuntimeError(f"could not load GPT-2's tiktoken encoding within {timeout_s:g} s (offline?): {fix}")
    if isinstance(result[0], Exception):
        raise RuntimeError(f"could not load GPT-2's tiktoken encoding ({type(result[0]).__name__}; offline?): {fix}")
    enc = result[0]
    eot = enc.eot_token
    return Tokenizer("gpt2", enc, eot, eot, eot)


def load_tokenizer(meta, data_dir):
    """Rebuild the tokenizer described by Tokenizer.to_meta() (as stored in a dataset's meta.json)."""
    name = meta.get("name")
    if name == "bytes":
        tok = byte_tokenizer()
    elif name == "bpe":
        tok = load_bpe(os.path.join(data_dir, meta["ranks_file"]))
    elif name == "gpt2":
        tok = gpt2_tokenizer()
    elif name == "hf":
        tok = hf_tokenizer_from_file(os.path.join(data_dir, meta["tokenizer_file"]), meta["bos_id"],
                                     meta["eos_id"], meta["pad_id"])
    else:
        raise ValueError(f"unknown tokenizer {name!r} in meta (expected bytes, bpe, gpt2 or hf): "
                         "re-run data/prepare.py")
    if "n_vocab" in meta and meta["n_vocab"] != tok.n_vocab:
        raise ValueError(f"the {name} tokenizer has {tok.n_vocab} tokens but the dataset was made with "
                         f"{meta['n_vocab']}: re-run data/prepare.py")
    return tok


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (byte-level BPE)

# GPT-2's pre-tokenizer regex, which ByteLevel applies when use_regex is true
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DIGIT = regex.compile(r"(\p{N})")  # the Digits pre-tokenizer (individual_digits): every digit on its own


def bytes_to_unicode():
    """GPT-2's table: each byte -> a printable character (the printable bytes keep their own), which is how a
    byte-level BPE vocabulary spells its tokens."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


class HFTokenizer(Tokenizer):
    """A tokenizer.json served by tiktoken; `nfc` and `digits` are the steps done in Python before it."""

    def __init__(self, enc, bos_id, eos_id, pad_id, source, nfc=False, digits=False):
        super().__init__("hf", enc, bos_id, eos_id, pad_id)
        self.source, self.nfc, self.digits = source, nfc, digits

    def encode_ordinary(self, text):
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if not self.digits:
            return self.enc.encode_ordinary(text)
        return [i for part in DIGIT.split(text) if part for i in self.enc.encode_ordinary(part)]


def _hf_pre_tokenizer(pre, where):
    """(split pattern, digits) from a tokenizer.json's pre_tokenizer; ValueError for kinds tiktoken cannot run."""
    steps = _need(pre.get("pretokenizers", _MISSING), list, where, "pre_tokenizer.pretokenizers") \
        if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    for k, step in enumerate(steps):
        _need(step, dict, where, f"pre_tokenizer step {k}")
    kinds = [s.get("type") for s in steps]
    if not kinds or kinds[-1] != "ByteLevel":
        raise ValueError(f"{where}: pre_tokenizer {kinds or None} does not end in ByteLevel: only byte-level BPE "
                         "tokenizers (GPT-2, Llama 3, Qwen, SmolLM) are supported, not SentencePiece ones")
    byte_level, pattern, digits = steps[-1], None, False
    if byte_level.get("add_prefix_space"):
        raise ValueError(f"{where}: ByteLevel add_prefix_space is not supported")
    for step in steps[:-1]:
        regex_text = step.get("pattern", {}).get("Regex") if isinstance(step.get("pattern"), dict) else None
        if step.get("type") == "Split" and isinstance(regex_text, str) and pattern is None \
                and step.get("behavior") == "Isolated" and not step.get("invert"):
            pattern = regex_text
        elif step.get("type") == "Digits" and step.get("individual_digits") and not digits:
            digits = True
        else:
            raise ValueError(f"{where}: pre-tokenizer step {step.get('type')} {str(step)[:80]} is not supported")
    if byte_level.get("use_regex", True):
        if pattern is not None:
            raise ValueError(f"{where}: a Split regex and ByteLevel's own regex together are not supported")
        pattern = GPT2_PATTERN
    if pattern is None:
        raise ValueError(f"{where}: no split regex (Split or ByteLevel use_regex) in the pre_tokenizer")
    return pattern, digits


def _hf_ranks(model, added, where):
    """tiktoken ranks {token bytes: id} from a BPE model's vocabulary (the added tokens left out), after checking
    that the ids follow the merges, which is what lets an id serve as the rank."""
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: a {model.get('type')} model is not supported, only byte-level BPE")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{where}: BPE with byte_fallback or subword affixes (SentencePiece-style) is not "
                         "supported")
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    try:
        ranks = {bytes(to_byte[c] for c in tok): i for tok, i in model["vocab"].items() if tok not in added}
    except KeyError:
        raise ValueError(f"{where}: the vocabulary is not spelled in byte-level characters") from None
    if b"" in ranks or any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError(f"{where}: the vocabulary lacks some of the 256 single bytes or holds an empty token")
    _distinct_ids([*ranks.values(), *added.values()], where)
    last = -1
    for merge in model.get("merges", []):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        rank = model["vocab"].get(a + b, -1)
        if not (rank > last and rank > model["vocab"].get(a, rank) and rank > model["vocab"].get(b, rank)):
            raise ValueError(f"{where}: token ids do not follow the merge order (at {a + b!r}), which tiktoken "
                             "needs")
        last = rank
    return ranks


def _distinct_ids(ids, where):
    seen = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"{where}: two tokens (of model.vocab and added_tokens) have id {i}: download it again")
        seen.add(i)


_MISSING = object()
_KINDS = ((type(None), "null"), (bool, "true or false"), (int, "a number"), (float, "a number"),
          (str, "a string"), (list, "a list"), (dict, "an object"))
_WANTED = {dict: "an object", list: "a list", str: "a string", int: "an integer"}


def _need(value, typ, where, what):
    """value when it is a `typ` (true and false are not ints); else a ValueError: `where`: `what` is ..."""
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    got = f"missing ({_WANTED[typ]} expected)" if value is _MISSING else \
        f"{next(name for t, name in _KINDS if isinstance(value, t))}, not {_WANTED[typ]}"
    raise ValueError(f"{where}: {what} is {got}: give a Hugging Face model's own file (download it again)")


def _need_id(value, where, what):
    """A token id: an integer 0 <= id < 2**31."""
    if not 0 <= _need(value, int, where, what) < 2 ** 31:
        raise ValueError(f"{where}: {what} is {value}, not a token id (0 <= id < 2**31)")
    return value


def _read_json(path):
    """The JSON in `path`; a one-line ValueError naming the file when it is not UTF-8 JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # (json's errors are ValueErrors)
        raise ValueError(f"{path} is not valid JSON ({type(e).__name__}): download it again") from None


def read_hf_spec(path):
    """A tokenizer.json, its structure checked as far as this file reads it: a one-line ValueError naming the
    file and the entry for a wrong type or a missing key (FileNotFoundError when there is no file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: give a Hugging Face model directory holding tokenizer.json")
    spec = _need(_read_json(path), dict, path, "its top level")
    model = _need(spec.get("model", _MISSING), dict, path, "model")
    for tok, i in _need(model.get("vocab", _MISSING), dict, path, "model.vocab").items():
        _need_id(i, path, f"model.vocab[{tok[:40]!r}]")
    for k, merge in enumerate(_need(model.get("merges", []), list, path, "model.merges")):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ValueError(f"{path}: model.merges[{k}] is {str(merge)[:40]!r}, not a pair of tokens "
                             f"('a b' or [\"a\", \"b\"]): download it again")
    for k, token in enumerate(_need(spec.get("added_tokens", []), list, path, "added_tokens")):
        _need(_need(token, dict, path, f"added_tokens[{k}]").get("content", _MISSING), str, path,
              f"added_tokens[{k}].content")
        _need_id(token.get("id", _MISSING), path, f"added_tokens[{k}].id")
    for key in ("normalizer", "pre_tokenizer"):
        if spec.get(key) is not None:
            _need(spec[key], dict, path, key)
    return spec


def _special_id(tokens, value, where, what):
    """An id from a token name (or {"content": name}) or an id (or a list of ids: the first); None when not
    given or a name the vocabulary lacks; a ValueError naming `where` for an id outside the vocabulary."""
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, str):
        return tokens.get(value)
    if value is None:
        return None
    n = max(tokens.values(), default=-1) + 1
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
        return value
    raise ValueError(f"{where}: {what} is {str(value)[:40]}, not a token of tokenizer.json nor an id below {n}")


def hf_tokenizer_from_file(path, bos_id=None, eos_id=None, pad_id=None):
    """A Tokenizer from one tokenizer.json file; bos/eos/pad ids given (load_hf_tokenizer finds them)."""
    return _tokenizer_from_spec(read_hf_spec(path), path, bos_id, eos_id, pad_id)


def _tokenizer_from_spec(spec, path, bos_id, eos_id, pad_id):
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise ValueError(f"{path}: normalizer {norm.get('type')} is not supported (only none or NFC)")
    pattern, digits = _hf_pre_tokenizer(spec.get("pre_tokenizer"), path)
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    ranks = _hf_ranks(spec["model"], added, path)
    try:
        enc = tiktoken.Encoding(f"hf:{path}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=added)
    except ValueError as e:  # the split regex
        raise ValueError(f"{path}: its pre-tokenizer's split regex is not valid ({str(e).splitlines()[0]})") \
            from None
    if eos_id is None:
        raise ValueError(f"{path}: no eos token known: name eos_token in tokenizer_config.json or eos_token_id in "
                         "config.json")
    bos_id = eos_id if bos_id is None else bos_id
    return HFTokenizer(enc, bos_id, eos_id, eos_id if pad_id is None else pad_id, os.path.abspath(path),
                       nfc=norm is not None, digits=digits)


def load_hf_tokenizer(path):
    """The tokenizer of a local Hugging Face model directory: tokenizer.json (byte-level BPE), with bos/eos/pad
    from tokenizer_config.json, else config.json, else generation_config.json (a list of eos ids: the first).
    Anything malformed in these files is a one-line ValueError naming the file."""
    file = os.path.join(path, "tokenizer.json")
    spec = read_hf_spec(file)
    tokens = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    found = {}
    sources = (("tokenizer_config.json", "{}_token"), ("config.json", "{}_token_id"),
               ("generation_config.json", "{}_token_id"))
    for name, key in sources:
        p = os.path.join(path, name)
        if os.path.isfile(p):
            d = _need(_read_json(p), dict, p, "its top level")
            for which in ("bos", "eos", "pad"):
                if found.get(which) is None:
                    found[which] = _special_id(tokens, d.get(key.format(which)), p, key.format(which))
    return _tokenizer_from_spec(spec, file, found.get("bos"), found.get("eos"), found.get("pad"))
