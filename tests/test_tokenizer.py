"""Tests for data/tokenizer.py: hermetic (no network; the BPE is trained in-process on text made here) and fast."""
import json
import random
import threading
import unicodedata

import numpy as np
import pytest
import regex
import tiktoken
import torch

from data.tokenizer import (GPT4_LIKE_PATTERN, SPECIAL_TOKENS, bpe_tokenizer, byte_tokenizer, gpt2_tokenizer,
                            load_bpe, load_tokenizer, save_bpe, train_bpe)

UNICODE_TEXT = "héllo wörld\n\tnaïve café — 日本語テキスト 🙂👍🏽 ١٢٣ x² \r\n\n  trailing   \u00a0nbsp\u3000 end\n"
WORDS = ["the", "cat", "sat", "on", "mat", "and", "a", "dog", "ran", "far", "don't", "We'll", "über", "naïve",
         "日本", "🙂", "x=3;", "(y)", "3.14", "12345"]


def make_text(seed, n_words):
    # zipf-like word frequencies, punctuation, numbers, unicode and line breaks: every branch of the pattern
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(len(WORDS))]
    syllables = ["ka", "lo", "mi", "tre", "sun", "vo", "rai", "pe", "dux", "ngo", "shi", "ber"]
    out = []
    for i in range(n_words):
        if rng.random() < 0.3:  # a long tail of rarer made-up words, so there is plenty left to merge
            out.append("".join(rng.choices(syllables, k=rng.randint(1, 4))))
        else:
            out.append(rng.choices(WORDS, weights)[0])
        out.append(rng.choice([" ", " ", " ", ", ", ".\n", "  ", "\n\n", "\t"]))
    return "".join(out)


@pytest.fixture(scope="module")
def trained():
    ranks = train_bpe(make_text(0, 20_000), 400)
    return ranks, bpe_tokenizer(ranks)


def reference_encode(text, ranks, pattern=GPT4_LIKE_PATTERN):
    """Plain-Python BPE: per chunk, repeatedly merge the adjacent pair whose concatenation has the lowest rank."""
    ids = []
    for chunk in regex.findall(pattern, text):
        parts = [bytes([b]) for b in chunk.encode("utf-8")]
        while True:
            found = [(ranks[p + q], i) for i, (p, q) in enumerate(zip(parts, parts[1:])) if p + q in ranks]
            if not found:
                break
            _, i = min(found)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


# ------------------------------------------------------------------------------------------ byte tokenizer

def test_byte_tokenizer_round_trips_any_unicode_including_newlines_and_emoji():
    tok = byte_tokenizer()
    long_line = "a" * 1000 + "\n" + "b" * 77  # longer than one pattern chunk
    for text in [UNICODE_TEXT, "\n", "\r\n\r\n", "", long_line, "".join(map(chr, range(1, 2000)))]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))  # id = byte value, every byte covered
        assert tok.decode(ids) == text


def test_byte_tokenizer_puts_special_tokens_right_after_the_256_bytes():
    tok = byte_tokenizer()
    assert (tok.name, tok.n_vocab) == ("bytes", 259)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    assert [tok.decode([i]) for i in (256, 257, 258)] == list(SPECIAL_TOKENS)


def test_encode_adds_bos_and_eos_only_when_asked():
    tok = byte_tokenizer()
    assert tok.encode("hi") == [104, 105]
    assert tok.encode("hi", bos=True) == [256, 104, 105]
    assert tok.encode("hi", eos=True) == [104, 105, 257]
    assert tok.encode("hi", bos=True, eos=True) == [256, 104, 105, 257]
    assert tok.encode_batch(["hi", ""], bos=True, eos=True) == [[256, 104, 105, 257], [256, 257]]


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_special_token_text_in_input_is_encoded_as_plain_text(kind, trained):
    tok = byte_tokenizer() if kind == "bytes" else trained[1]
    text = "a <|bos|> b <|eos|><|pad|> c"
    ids = tok.encode(text)
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text]) == [ids]


def test_encode_batch_equals_encode_per_text(trained):
    tok = trained[1]
    texts = [make_text(s, 50) for s in range(5)] + ["", UNICODE_TEXT]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_decode_accepts_list_tensor_and_numpy_array_and_rejects_bad_ids():
    tok = byte_tokenizer()
    ids = tok.encode("héllo", bos=True)
    want = "<|bos|>héllo"
    assert tok.decode(ids) == tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids, dtype=np.uint16)) == want
    with pytest.raises(ValueError, match="outside"):
        tok.decode([65, 259])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.tensor([ids]))


# ------------------------------------------------------------------------------------------ BPE training

def test_train_bpe_returns_the_256_bytes_then_one_token_per_merge(trained):
    ranks, tok = trained
    assert len(ranks) == 400 and sorted(ranks.values()) == list(range(400))
    assert all(ranks[bytes([i])] == i for i in range(256))
    assert all(len(t) >= 2 for t, r in ranks.items() if r >= 256)
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.pad_id) == (403, 400, 401, 402)


def test_trained_bpe_round_trips_held_out_text(trained):
    tok = trained[1]
    for text in [make_text(1, 2000), UNICODE_TEXT, "never seen: Zebra QUIZ 🦓 987654321\r\n"]:
        assert tok.decode(tok.encode(text)) == text


def test_trained_bpe_makes_frequent_words_single_tokens(trained):
    tok = trained[1]
    for word in [" the", " cat", " sat", " on", "the"]:
        assert len(tok.encode(word)) == 1, word
    held_out = make_text(2, 2000)
    assert len(tok.encode(held_out)) < len(held_out.encode("utf-8")) / 2.5  # real compression, not just bytes


def test_tiktoken_encoding_equals_reference_merge_order_encoder_on_held_out_text(trained):
    ranks, tok = trained
    for text in [make_text(3, 3000), UNICODE_TEXT, "the the thethe  the\n\nthe,the 1234567 aaaaaaa"]:
        assert tok.encode(text) == reference_encode(text, ranks)


def test_tiktoken_and_python_regex_split_text_identically_with_the_pattern():
    # ranks holding every prefix of every python chunk make tiktoken encode each of *its* chunks as one token,
    # so its tokens spell out its own chunking, which must equal python's
    text = (UNICODE_TEXT + make_text(4, 300) + "don't DON'T we'LL 's  x\x1c\x1d\x1e\x1fy a\u2028b\u200bc e\u0301 "
            "Ⅻ ½ ٣٤٥ 123456 \t\n \n\n\n   end   ")
    chunks = [c.encode("utf-8") for c in regex.findall(GPT4_LIKE_PATTERN, text)]
    vocab = {bytes([i]) for i in range(256)} | {c[:k] for c in chunks for k in range(2, len(c) + 1)}
    ranks = {t: r for r, t in enumerate(sorted(vocab, key=lambda t: (len(t), t)))}
    enc = tiktoken.Encoding("probe", pat_str=GPT4_LIKE_PATTERN, mergeable_ranks=ranks, special_tokens={})
    assert [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary(text)] == chunks


def test_train_bpe_is_deterministic():
    text = make_text(5, 3000)
    assert list(train_bpe(text, 300).items()) == list(train_bpe(text, 300).items())


def test_train_bpe_with_vocab_256_is_the_byte_vocabulary():
    assert train_bpe("abc abc", 256) == {bytes([i]): i for i in range(256)}


@pytest.mark.parametrize("text, vocab_size, match", [
    ("", 300, "empty"),
    ("hello world", 255, ">= 256"),
    ("hello world", 300, "lower vocab_size"),  # 'hello' + ' world' allow at most 4 + 5 merges
])
def test_train_bpe_rejects_bad_inputs_with_one_line_value_error(text, vocab_size, match):
    with pytest.raises(ValueError, match=match) as e:
        train_bpe(text, vocab_size)
    assert "\n" not in str(e.value)


def test_train_bpe_raises_when_merges_run_out_before_vocab_size():
    # 'abab' x many: at most 3 merges by the length bound, but only 2 distinct ones exist (ab, abab)
    with pytest.raises(ValueError, match="supports only 258"):
        train_bpe("abab " * 10, 259, pattern=r"\S+|\s+")


# ------------------------------------------------------------------------------------------ files and meta

def test_save_bpe_then_load_bpe_gives_the_same_tokenizer(trained, tmp_path):
    ranks, tok = trained
    path = tmp_path / "tok.bpe"
    save_bpe(path, ranks, GPT4_LIKE_PATTERN)
    loaded = load_bpe(path)
    assert loaded.enc._mergeable_ranks == ranks and loaded.enc._pat_str == GPT4_LIKE_PATTERN
    text = make_text(6, 500) + UNICODE_TEXT
    assert loaded.encode(text, bos=True) == tok.encode(text, bos=True)
    assert loaded.ranks_file == "tok.bpe"


def test_load_bpe_rejects_a_corrupt_file_with_one_line_value_error(tmp_path):
    path = tmp_path / "bad.bpe"
    path.write_text('"\\\\s+"\nnot-base64!! x\n')
    with pytest.raises(ValueError, match="re-run data/prepare.py") as e:
        load_bpe(path)
    assert "\n" not in str(e.value)


def test_to_meta_then_load_tokenizer_rebuilds_bytes_and_bpe(trained, tmp_path):
    ranks = trained[0]
    save_bpe(tmp_path / "tokenizer.bpe", ranks, GPT4_LIKE_PATTERN)
    text = UNICODE_TEXT + make_text(7, 200)
    for tok in [byte_tokenizer(), load_bpe(tmp_path / "tokenizer.bpe")]:
        meta = json.loads(json.dumps(tok.to_meta()))  # survives meta.json
        again = load_tokenizer(meta, str(tmp_path))
        assert (again.name, again.n_vocab, again.bos_id, again.eos_id, again.pad_id) == \
               (tok.name, tok.n_vocab, tok.bos_id, tok.eos_id, tok.pad_id)
        assert again.encode(text, eos=True) == tok.encode(text, eos=True)


def test_load_tokenizer_without_the_ranks_file_says_to_rerun_prepare(tmp_path):
    meta = {"name": "bpe", "ranks_file": "tokenizer.bpe", "n_vocab": 403}
    with pytest.raises(FileNotFoundError, match="re-run data/prepare.py") as e:
        load_tokenizer(meta, str(tmp_path))
    assert "\n" not in str(e.value)


def test_to_meta_of_an_unsaved_bpe_tokenizer_says_to_save_it(trained):
    with pytest.raises(ValueError, match="save_bpe"):
        trained[1].to_meta()


# ------------------------------------------------------------------------------------------ GPT-2

def test_gpt2_tokenizer_offline_raises_one_line_runtime_error(monkeypatch):
    import requests
    import tiktoken.load

    def offline(blobpath):
        raise requests.exceptions.ConnectionError(f"network blocked: {blobpath}")
    monkeypatch.setattr(tiktoken.load, "read_file", offline)  # the only place tiktoken reaches the network
    try:
        tok = gpt2_tokenizer()
    except RuntimeError as e:
        msg = str(e)
        assert "\n" not in msg and "TIKTOKEN_CACHE_DIR" in msg and "ConnectionError" in msg
    else:
        assert tok.n_vocab == 50257 and tok.bos_id == tok.eos_id == tok.pad_id == 50256
        pytest.skip("GPT-2's encoding loaded from a local tiktoken cache")


def test_gpt2_tokenizer_gives_up_after_timeout_instead_of_hanging(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: release.wait(10))  # a download that hangs
    try:
        with pytest.raises(RuntimeError, match="within 0.05 s") as e:
            gpt2_tokenizer(timeout_s=0.05)
        assert "\n" not in str(e.value)
    finally:
        release.set()


# ------------------------------------------------------------------------------------------ Hugging Face tokenizer.json

from data.tokenizer import GPT2_PATTERN, bytes_to_unicode, load_hf_tokenizer  # noqa: E402

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
SPLIT = lambda pattern: {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
STYLES = {  # (normalizer, pre_tokenizer, ignore_merges) as GPT-2, Llama 3, Qwen2/3 and SmolLM write them
    "gpt2": (None, {**BYTE_LEVEL, "use_regex": True}, False),
    "llama3": (None, {"type": "Sequence", "pretokenizers": [SPLIT(LLAMA3_PATTERN), {**BYTE_LEVEL, "use_regex": False}]},
               True),
    "qwen2": ({"type": "NFC"}, {"type": "Sequence", "pretokenizers": [SPLIT(QWEN2_PATTERN),
                                                                      {**BYTE_LEVEL, "use_regex": False}]}, False),
    "smollm": (None, {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                            {**BYTE_LEVEL, "use_regex": True}]}, False),
}
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MIXED_TEXT = ("Hello world, don't WE'LL café naïve cafe\u0301 (e + combining accent) Ærøskøbing ß\n"
              "日本語のテキスト 中文字符 한국어 🙂👍🏽👨‍👩‍👧 x² ½ ١٢٣\n\n\n   spaces     and\t\ttabs  \r\n"
              "digits 12345678901234567890 3.14159 2024-06-01  \n  trailing   ")


def spell(b):
    table = bytes_to_unicode()
    return "".join(table[x] for x in b)


def hf_tokenizer_json(ranks, style):
    """A tokenizer.json as the tokenizers library writes it, from tiktoken-style ranks: the byte tokens numbered
    in GPT-2's order, each merged token numbered in merge order, the merge that made it recovered by encoding its
    bytes with the ranks below its own (which leaves exactly two parts)."""
    byte_ids = {bytes([b]): i for i, b in enumerate(bytes_to_unicode())}
    vocab, merges = {spell(b): i for b, i in byte_ids.items()}, []
    for token, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if r < 256:
            continue
        below = {t: q for t, q in ranks.items() if q < r}
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # tiktoken's rule: merge the adjacent pair whose concatenation ranks lowest
            i = min((below[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in below)[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append([spell(parts[0]), spell(parts[1])])
        vocab[spell(token)] = r
    norm, pre, ignore_merges = STYLES[style]
    added = [dict(id=len(vocab) + i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                  special=True) for i, t in enumerate(ADDED)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": norm,
            "pre_tokenizer": pre, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}}


@pytest.fixture(scope="module")
def hf_ranks():
    return train_bpe(make_text(0, 6000) + MIXED_TEXT * 3, 420)


def write_hf_dir(path, ranks, style, configs=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(hf_tokenizer_json(ranks, style), ensure_ascii=False))
    default = {"tokenizer_config.json": {"eos_token": "<|endoftext|>"}}
    for name, content in (default if configs is None else configs).items():
        (path / name).write_text(json.dumps(content))
    return path


def reference_hf_encode(spec, text):
    """The Hugging Face pipeline in plain Python: NFC, digits cut out, the split regex, bytes spelled through the
    table, then BPE by the merges list (the pair of lowest merge index first), each piece looked up in the vocab."""
    import unicodedata
    norm, pre, model = spec["normalizer"], spec["pre_tokenizer"], spec["model"]
    steps = pre.get("pretokenizers", [pre])
    if norm:
        text = unicodedata.normalize("NFC", text)
    parts = regex.split(r"(\p{N})", text) if steps[0]["type"] == "Digits" else [text]
    pattern = steps[0]["pattern"]["Regex"] if steps[0]["type"] == "Split" else GPT2_PATTERN
    merge_rank = {tuple(m): i for i, m in enumerate(model["merges"])}
    ids = []
    for chunk in (c for part in parts if part for c in regex.findall(pattern, part)):
        word = list(spell(chunk.encode("utf-8")))
        if model["ignore_merges"] and "".join(word) in model["vocab"]:
            word = ["".join(word)]
        while len(word) > 1:
            found = [(merge_rank[p], i) for i, p in enumerate(zip(word, word[1:])) if p in merge_rank]
            if not found:
                break
            i = min(found)[1]
            word[i:i + 2] = [word[i] + word[i + 1]]
        ids += [model["vocab"][w] for w in word]
    return ids


@pytest.mark.parametrize("style", list(STYLES))
def test_hf_tokenizer_encodes_mixed_text_as_the_hf_pipeline_does(style, hf_ranks, tmp_path):
    path = write_hf_dir(tmp_path, hf_ranks, style)
    tok = load_hf_tokenizer(str(path))
    spec = json.loads((path / "tokenizer.json").read_text())
    for text in [MIXED_TEXT, make_text(9, 400), UNICODE_TEXT, "", " ", "\n\n", "0000000"]:
        ids = tok.encode(text)
        assert ids == reference_hf_encode(spec, text), text[:40]
        want = unicodedata.normalize("NFC", text) if style == "qwen2" else text
        assert tok.decode(ids) == want
    assert len(tok.encode(MIXED_TEXT)) < len(MIXED_TEXT.encode("utf-8")) * 0.9  # merged tokens are used
    assert (tok.n_vocab, tok.eos_id, tok.bos_id, tok.pad_id) == (423, 420, 420, 420)
    assert tok.decode([421, 5, 422]).startswith("<|im_start|>") and tok.decode([421, 422]).endswith("<|im_end|>")


@pytest.mark.parametrize("style", list(STYLES))
def test_hf_tokenizer_equals_the_tokenizers_library(style, hf_ranks, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")  # optional: the reference above runs without it
    path = write_hf_dir(tmp_path, hf_ranks, style)
    theirs = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    ours = load_hf_tokenizer(str(path))
    for text in [MIXED_TEXT, make_text(10, 400), UNICODE_TEXT]:
        ids = theirs.encode(text).ids
        assert ours.encode(text) == ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)


def test_hf_bos_and_eos_come_from_tokenizer_config_then_config_then_generation_config(hf_ranks, tmp_path):
    configs = {"tokenizer_config.json": {"bos_token": None, "eos_token": {"content": "<|im_end|>"}},
               "config.json": {"bos_token_id": 421, "eos_token_id": 420},
               "generation_config.json": {"eos_token_id": [420, 422], "pad_token_id": 420}}
    tok = load_hf_tokenizer(str(write_hf_dir(tmp_path / "a", hf_ranks, "llama3", configs)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (421, 422, 420)
    tok = load_hf_tokenizer(str(write_hf_dir(tmp_path / "b", hf_ranks, "llama3",
                                             {"generation_config.json": {"eos_token_id": [422, 420]}})))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (422, 422, 422)  # a list: the first; bos and pad default to eos
    with pytest.raises(ValueError, match="no eos token") as e:
        load_hf_tokenizer(str(write_hf_dir(tmp_path / "c", hf_ranks, "llama3", {})))
    assert "\n" not in str(e.value)


def test_hf_tokenizer_to_meta_round_trips_through_a_copy_in_the_dataset(hf_ranks, tmp_path):
    import shutil
    tok = load_hf_tokenizer(str(write_hf_dir(tmp_path / "model", hf_ranks, "qwen2")))
    meta = json.loads(json.dumps(tok.to_meta()))
    (tmp_path / "data").mkdir()
    shutil.copyfile(tok.source, tmp_path / "data" / meta["tokenizer_file"])  # what data/prepare.py does
    shutil.rmtree(tmp_path / "model")  # the dataset stands on its own
    again = load_tokenizer(meta, str(tmp_path / "data"))
    assert (again.name, again.n_vocab, again.bos_id, again.eos_id, again.pad_id) == \
           (tok.name, tok.n_vocab, tok.bos_id, tok.eos_id, tok.pad_id)
    assert again.encode(MIXED_TEXT, bos=True, eos=True) == tok.encode(MIXED_TEXT, bos=True, eos=True)


@pytest.mark.parametrize("change, needle", [
    (lambda s: s["model"].update(type="Unigram"), "Unigram"),
    (lambda s: s["model"].update(type="WordPiece"), "WordPiece"),
    (lambda s: s.update(pre_tokenizer={"type": "Metaspace", "replacement": "\u2581"}), "SentencePiece"),
    (lambda s: s["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda s: s.update(normalizer={"type": "Lowercase"}), "Lowercase"),
    (lambda s: s["model"]["merges"].reverse(), "merge order"),
])
def test_other_tokenizer_kinds_are_one_line_errors_naming_the_file(change, needle, hf_ranks, tmp_path):
    path = write_hf_dir(tmp_path, hf_ranks, "gpt2")
    spec = json.loads((path / "tokenizer.json").read_text())
    change(spec)
    (path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=needle) as e:
        load_hf_tokenizer(str(path))
    assert "\n" not in str(e.value) and "tokenizer.json" in str(e.value)


def _set(spec, keys, value):
    """spec with the entry at `keys` (a path of keys and indices) set to value, or removed for value MISSING."""
    *parents, last = keys
    for k in parents:
        spec = spec[k]
    if value is MISSING:
        del spec[last]
    else:
        spec[last] = value


MISSING = object()


@pytest.mark.parametrize("keys, value, needle", [
    (("model", "vocab"), [], r"model\.vocab is a list, not an object"),
    (("model", "vocab", "a"), 3.5, r"model\.vocab\['a'\] is a number, not an integer"),
    (("model", "vocab", "a"), -1, r"model\.vocab\['a'\] is -1, not a token id"),
    (("model", "vocab", "a"), 1, r"two tokens .* have id 1"),  # "a" and the byte whose id is 1
    (("model", "merges"), {"a": "b"}, r"model\.merges is an object, not a list"),
    (("model", "merges", 0), ["a"], r"model\.merges\[0\] is .*not a pair of tokens"),
    (("model", "merges", 0), 7, r"model\.merges\[0\] is '7', not a pair"),
    (("added_tokens",), {}, r"added_tokens is an object, not a list"),
    (("added_tokens", 0), "<|endoftext|>", r"added_tokens\[0\] is a string, not an object"),
    (("added_tokens", 0, "content"), MISSING, r"added_tokens\[0\]\.content is missing \(a string expected\)"),
    (("added_tokens", 0, "id"), "420", r"added_tokens\[0\]\.id is a string, not an integer"),
    (("added_tokens", 0, "id"), 421, r"two tokens .* have id 421"),
    (("normalizer",), "NFC", r"normalizer is a string, not an object"),
    (("pre_tokenizer",), [], r"pre_tokenizer is a list, not an object"),
    (("pre_tokenizer", "pretokenizers"), MISSING, r"pre_tokenizer\.pretokenizers is missing"),
    (("pre_tokenizer", "pretokenizers", 0), "Split", r"pre_tokenizer step 0 is a string, not an object"),
    (("pre_tokenizer", "pretokenizers", 0, "pattern"), "\\s+", r"pre-tokenizer step Split .* is not supported"),
    (("pre_tokenizer", "pretokenizers", 0, "pattern", "Regex"), "(", r"split regex is not valid"),
])
def test_a_malformed_tokenizer_json_is_a_one_line_error_naming_the_file_and_entry(keys, value, needle, hf_ranks,
                                                                                   tmp_path):
    path = write_hf_dir(tmp_path, hf_ranks, "llama3")
    spec = json.loads((path / "tokenizer.json").read_text())
    if keys[:2] == ("model", "vocab") and len(keys) == 3:
        spec["model"]["vocab"][keys[2]] = 300  # a token of its own first, then its id made wrong
    _set(spec, keys, value)
    (path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=needle) as e:
        load_hf_tokenizer(str(path))
    assert "\n" not in str(e.value) and str(path / "tokenizer.json") in str(e.value)


@pytest.mark.parametrize("files, needle", [
    ({"config.json": [1]}, r"config\.json: its top level is a list, not an object"),
    ({"tokenizer_config.json": {"eos_token": 2.5}}, r"tokenizer_config\.json: eos_token is 2\.5, not a token"),
    ({"generation_config.json": {"eos_token_id": [[420]]}}, r"generation_config\.json: eos_token_id is \[420\]"),
    ({"config.json": {"eos_token_id": 423}}, r"config\.json: eos_token_id is 423, not a token .* below 423"),
    ({"config.json": {"eos_token_id": True}}, r"config\.json: eos_token_id is True"),
])
def test_malformed_config_files_are_one_line_errors_naming_the_file(files, needle, hf_ranks, tmp_path):
    path = write_hf_dir(tmp_path, hf_ranks, "gpt2", files)
    with pytest.raises(ValueError, match=needle) as e:
        load_hf_tokenizer(str(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("style", ["qwen2", "smollm"])  # NFC and Split; Digits and ByteLevel's own regex
def test_any_entry_of_a_tokenizer_json_replaced_by_any_json_value_is_one_line_or_loads(style, hf_ranks, tmp_path):
    """A sweep: every entry (of the vocabulary and lists only the first few), replaced by values of each JSON
    kind or removed, loads or raises a one-line ValueError naming the file, never anything else."""
    path = write_hf_dir(tmp_path, hf_ranks, style)
    base = json.loads((path / "tokenizer.json").read_text())
    seen = []

    def entries(obj, keys=()):
        yield keys
        items = list(obj.items())[:20] if isinstance(obj, dict) else list(enumerate(obj))[:2] \
            if isinstance(obj, list) else []
        for k, v in items:
            yield from entries(v, keys + (k,))
    for keys in entries(base):
        for value in (None, 0, -2, 2 ** 40, 1.5, True, "x", [], [1], {}, MISSING):
            spec = json.loads(json.dumps(base))
            if not keys:
                spec = None if value is MISSING else value
            else:
                _set(spec, keys, value)
            (path / "tokenizer.json").write_text(json.dumps(spec))
            try:
                load_hf_tokenizer(str(path))
            except ValueError as e:
                assert "\n" not in str(e) and "tokenizer.json" in str(e), (keys, value, str(e))
        seen.append(keys)
    assert ("model", "vocab", "!") in seen and ("added_tokens", 0, "content") in seen and len(seen) > 60


def test_prepare_makes_a_reasoning_dataset_with_an_hf_tokenizer_ending_at_its_eos(hf_ranks, tmp_path):
    from data.prepare import main
    from data.tasks import TaskConfig
    model_dir = write_hf_dir(tmp_path / "model", hf_ranks, "smollm", {"config.json": {"eos_token_id": 422}})
    out = tmp_path / "ds"
    small = TaskConfig(train_examples=40, val_examples=10)
    args = ["reasoning", "--out", str(out), "--tokenizer", f"hf:{model_dir}", "--train_examples", "40",
            "--val_examples", "10"]
    main(args)
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(meta["tokenizer"], str(out))
    assert meta["tokenizer"]["name"] == "hf" and (tok.bos_id, tok.eos_id) == (422, 422)
    ids = np.fromfile(out / "train.bin", dtype=meta["dtype"]).tolist()
    assert ids[0] == 422 and ids[-1] == 422 and ids.count(422) == 2 * small.train_examples  # <bos> doc <eos>
    docs = tok.decode(ids).split("<|im_end|>")
    assert "\n" in docs[1] and tok.encode(docs[1]) == ids[1:ids.index(422, 1)]


def test_loader_masks_exactly_the_prompt_tokens_of_an_hf_tokenized_corpus(hf_ranks, tmp_path):
    """The prompt's final newline is another id than its byte value under an HF tokenizer: meta.json records it,
    and the loader masks every document's prompt tokens, and only those, out of the loss."""
    from data.loader import make_batches
    from data.prepare import main
    model_dir = write_hf_dir(tmp_path / "model", hf_ranks, "smollm", {"config.json": {"eos_token_id": 422}})
    out = tmp_path / "ds"
    main(["reasoning", "--out", str(out), "--tokenizer", f"hf:{model_dir}", "--train_examples", "40",
          "--val_examples", "10"])
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(meta["tokenizer"], str(out))
    assert meta["prompt_end_id"] == tok.encode("\n")[0] != ord("\n")
    tokens = np.fromfile(out / "train.bin", dtype=meta["dtype"])
    x, y, pos = make_batches(tokens, meta, 48, 8, seed=0).next()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        end = row_x.index(meta["prompt_end_id"])  # rows start at a document's bos
        assert all(t == -1 for t in row_y[:end]) and row_y[end] != -1, (row_x[:end + 2], row_y[:end + 2])
