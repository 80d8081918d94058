"""checkpoint.py and files.py: atomic, durable writes; loading refuses code and names damage as damage."""
import os
import pickle
import signal
import subprocess
import sys
import zipfile

import pytest
import torch

import files
from checkpoint import load_checkpoint, load_model, model_state, save_checkpoint
from config import UserError
from model import GPT, GPTConfig


def tiny_checkpoint(path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(str(path), model_state(model))
    return model


def test_save_fsyncs_the_file_and_its_folder_then_renames(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", b)), real_replace(a, b)))
    tiny_checkpoint(tmp_path / "ckpt.pt")
    kinds = [k for k, _ in calls]
    assert kinds == ["fsync", "replace", "fsync"], calls  # the file's data, the rename, then the folder
    assert calls[0][1].endswith(".tmp") and calls[2][1] == str(tmp_path)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ckpt.pt"
    tiny_checkpoint(path)
    before = path.read_bytes()

    def fail(f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        files.atomic_write(str(path), fail)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    dead = tmp_path / ".ckpt.pt.999999999.tmp"  # no such process
    dead.write_bytes(b"x" * 100)
    tiny_checkpoint(tmp_path / "ckpt.pt")
    assert not dead.exists()


def test_a_damaged_checkpoint_is_called_corrupt_not_code(tmp_path):
    path = tmp_path / "ckpt.pt"
    tiny_checkpoint(path)
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(damaged, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[:len(data) // 2] if "/data/" in item.filename else data)
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(str(damaged))


class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("zipped", [False, True])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, zipped):
    path = tmp_path / "evil.pt"
    if zipped:
        torch.save({"model": RunsCode(), "model_config": {}}, path)
    else:
        path.write_bytes(pickle.dumps({"model": RunsCode(), "model_config": {}}))
    with pytest.raises(UserError, match="could run code"):
        load_checkpoint(str(path))


def test_load_model_names_the_file_when_weights_do_not_fit(tmp_path):
    path = tmp_path / "ckpt.pt"
    model = tiny_checkpoint(path)
    ck = torch.load(path, weights_only=True)
    ck["model_config"]["n_embd"] = 32
    save_checkpoint(str(path), ck)
    with pytest.raises(UserError, match="ckpt.pt: its weights do not fit"):
        load_model(str(path))
    assert model is not None


KILLED_WRITER = """
import sys, time
sys.path.insert(0, {root!r})
import torch
from checkpoint import save_checkpoint

def slow_save(obj, f, *a, **k):
    f.write(b"x" * 4096)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = slow_save
save_checkpoint({path!r}, {{"model": {{}}}})
"""


def test_a_kill_during_the_write_leaves_the_last_checkpoint_whole(tmp_path):
    path = tmp_path / "ckpt.pt"
    model = tiny_checkpoint(path)
    before = path.read_bytes()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER.format(root=root, path=str(path))],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"  # the temporary file is half written
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert path.read_bytes() == before
    assert any(n.endswith(".tmp") for n in os.listdir(tmp_path))  # what the killed writer left
    loaded = load_model(str(path))[0]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    tiny_checkpoint(path)  # the next write removes the dead writer's temporary
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_eval_only_files_are_named_after_the_checkpoint_wherever_the_command_runs(tmp_path, monkeypatch):
    from checkpoint import eval_only_path
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path)
    here = eval_only_path("out", "a/ckpt.pt")
    monkeypatch.chdir(tmp_path / "a")
    assert eval_only_path("out", str(tmp_path / "a" / "ckpt.pt")) == here  # the same file, however named
    assert os.path.basename(here).startswith("eval_only_a_ckpt.pt_") and here.endswith(".json")
    assert eval_only_path("out", str(tmp_path / "a_ckpt.pt")) != here  # names that read alike still differ
    long = eval_only_path("out", str(tmp_path / ("x" * 300)))
    assert len(os.path.basename(long)) < 100
    budget = eval_only_path("out", str(tmp_path / "a" / "ckpt.pt"), "l1-64")  # evaluated another way: its own file
    assert budget != here and budget.endswith("_l1-64.json") and budget[:-len("_l1-64.json")] == here[:-5]


def test_a_saved_config_missing_a_newer_field_resumes_as_it_ran():
    from checkpoint import resume_config
    from config import RLConfig
    saved = {k: v for k, v in RLConfig().__dict__.items() if k != "resample_rounds"}
    cfg = resume_config(RLConfig, saved, RLConfig(), set(), legacy=dict(resample_rounds=0))
    assert cfg.resample_rounds == 0
    cfg = resume_config(RLConfig, {**saved, "resample_rounds": 2}, RLConfig(), set(), legacy=dict(resample_rounds=0))
    assert cfg.resample_rounds == 2


def test_data_marks_tell_tokenizers_apart_even_where_the_probe_agrees():
    from types import SimpleNamespace

    from checkpoint import PROBE, check_data, data_marks
    from config import UserError
    from data.tokenizer import bpe_tokenizer, byte_tokenizer, train_bpe
    meta = dict(vocab_size=300)
    a = bpe_tokenizer(train_bpe("zzzz qqqq " * 50, 258))  # two merges of letters the probe never shows ...
    b = bpe_tokenizer(train_bpe("kkkk jjjj " * 50, 258))
    assert a.encode(PROBE) == b.encode(PROBE) and a.n_vocab == b.n_vocab  # ... so its ids agree
    data_a, data_b = (SimpleNamespace(tok=t, meta=meta, dir=d) for t, d in ((a, "da"), (b, "db")))
    ck = dict(data_marks=data_marks(data_a))
    check_data(ck, data_a, "a.pt", resume=True)  # its own data
    with pytest.raises(UserError, match="was trained on text in other tokens than db's"):
        check_data(ck, data_b, "a.pt")
    with pytest.raises(UserError, match="has changed since a.pt was saved"):
        check_data(ck, SimpleNamespace(tok=a, meta=dict(vocab_size=301), dir="da"), "a.pt", resume=True)
    old = dict(data_marks={k: v for k, v in ck["data_marks"].items() if k not in ("text", "vocab")})
    check_data(old, data_b, "old.pt")  # marks of an earlier version: the probe alone decides
    check_data(dict(), data_b, "older.pt")  # no marks at all: not checked
    with pytest.raises(UserError, match="old.pt is corrupt: its data_marks entry"):
        check_data(dict(data_marks=dict(probe=3)), data_a, "old.pt")
    assert data_marks(SimpleNamespace(tok=byte_tokenizer(), meta=meta))["vocab"] != ck["data_marks"]["vocab"]
