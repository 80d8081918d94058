"""Tests for data/tokenizer.py: hermetic (no network; the BPE is trained in-process on text made here) and fast."""
import json
import random
import threading

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
