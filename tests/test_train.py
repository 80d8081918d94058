"""train.py: flags, exact resume, DDP equivalence, and one-line errors for bad input that never touch saved work.
Runs the real CLI in subprocesses on a tiny model and a tiny corpus the test makes itself."""
import glob
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

import runtime
import train
from config import TrainConfig, UserError, parse_config
from data.prepare import prepare_reasoning, prepare_text
from data.tasks import TaskConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "96", "--batch_size", "4",
        "--eval_iters", "2", "--eval_problems", "2", "--final_problems", "2", "--samples", "1",
        "--log_interval", "2", "--threads", "1", "--warmup_iters", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("reasoning")
    prepare_reasoning(str(d), TaskConfig(train_examples=400, val_examples=60, test_per_level=4), verbose=False)
    return str(d)


def run_cli(args, cwd=ROOT, module=("train.py",)):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *module, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err and "\n" not in err, err
    assert err.startswith("error: ")
    for n in needles:
        assert n in err, err


# ----------------------------------------------------------------------------- flags

def test_flags_accept_both_spellings_bools_and_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('n_layer = 3\nlr = 0.01\ndataset = "x"\n')
    cfg, explicit = parse_config(TrainConfig, ["--config", str(toml), "--n_layer=5", "--compile",
                                                           "--dropout", "0.1", "--bias", "false"])
    assert (cfg.n_layer, cfg.lr, cfg.dataset, cfg.compile, cfg.dropout, cfg.bias) == (5, 0.01, "x", True, 0.1, False)
    assert explicit == {"n_layer", "lr", "dataset", "compile", "dropout", "bias"}


def test_unknown_flag_names_the_close_matches():
    with pytest.raises(UserError, match="did you mean --n_layer"):
        parse_config(TrainConfig, ["--n_layr", "3"])
    with pytest.raises(UserError, match="expects int"):
        parse_config(TrainConfig, ["--n_layer", "three"])
    with pytest.raises(UserError, match="--gelu must be one of exact, tanh"):
        parse_config(TrainConfig, ["--gelu", "relu"])


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert train.lr_at(0, cfg) < train.lr_at(9, cfg) < 1.0
    assert train.lr_at(10, cfg) == pytest.approx(1.0)
    assert train.lr_at(60, cfg) == pytest.approx(0.55)
    assert train.lr_at(110, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_on_cpus_with_native_bf16_for_every_entry_point(monkeypatch, native):
    assert isinstance(runtime.cpu_has_bf16_matmul(), bool)  # False, not an error, where torch cannot tell
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: native)
    name = runtime.resolve_dtype("cpu", "auto")
    assert name == ("bfloat16" if native else "float32")
    if native:
        with runtime.autocast("cpu", name):
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert runtime.resolve_dtype("cpu", "float32") == "float32"
    assert runtime.resolve_dtype("cpu", "bfloat16") == "bfloat16"
    with pytest.raises(UserError, match="loss scaling"):
        runtime.resolve_dtype("cpu", "float16")


def test_cpu_bf16_detection_counts_amx_and_avx512_bf16(monkeypatch):
    for amx, avx in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda a=amx: a)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx: v)
        assert runtime.cpu_has_bf16_matmul() == (amx or avx)


def test_old_flag_name_still_works_with_a_note(capsys):
    cfg, explicit = parse_config(TrainConfig, ["--ckpt_every", "2"])
    assert cfg.grad_ckpt_every == 2 and explicit == {"grad_ckpt_every"}
    assert "--grad_ckpt_every" in capsys.readouterr().err


def test_help_lists_every_field_with_its_default_and_comment(capsys):
    train.main(["--help"])
    out = capsys.readouterr().out
    assert "--grad_ckpt_every" in out and "default 700" in out and "length of the LR schedule" in out


# ----------------------------------------------------------------------------- runs

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_is_bitwise_exact(corpus, tmp_path, dtype):
    common = TINY + ["--dataset", corpus, "--max_iters", "8", "--eval_interval", "4", "--dropout", "0.1",
                     "--dtype", dtype]
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    p = run_cli(common + ["--out_dir", straight])
    assert p.returncode == 0, p.stderr
    p = run_cli(common + ["--out_dir", split, "--stop_after", "4"])
    assert p.returncode == 0, p.stderr
    assert set(losses(split)) == {1, 2, 3, 4}
    if dtype == "float32":  # as a checkpoint saved before runs recorded what auto meant (fp32 on every CPU then):
        path = os.path.join(split, "ckpt.pt")  # it resumes in fp32 on an AMX CPU too
        ck = torch.load(path, weights_only=True)
        ck["config"]["dtype"] = "auto"
        torch.save(ck, path)
    p = run_cli(["--resume", "--out_dir", split])
    assert p.returncode == 0, p.stderr
    a, b = losses(straight), losses(split)
    assert list(a) == list(range(1, 9)) and a == b  # CPU, fp32 or bf16 autocast: identical to the last bit
    assert "final val loss" in p.stdout and "untagged" in p.stdout
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (straight, split))
    assert ca["step"] == cb["step"] == 8
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_log_lines_and_metrics_carry_what_researchers_compare(corpus, tmp_path):
    out = str(tmp_path / "run")
    p = run_cli(TINY + ["--dataset", corpus, "--max_iters", "4", "--eval_interval", "2", "--out_dir", out])
    assert p.returncode == 0, p.stderr
    step_lines = [line for line in p.stdout.splitlines() if line.startswith("step")]
    assert step_lines and all(f in step_lines[-1] for f in ("loss", "lr", "ms/step", "tok/s", "mfu", "peak", "eta"))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r for r in records if "accuracy" in r]
    assert [r["step"] for r in evals] == [2]  # the last step's evaluation is the final one
    assert set(evals[0]["by_level"]["1"]) == {"accuracy", "mean_tokens"}
    final = [r for r in records if r.get("final")]
    assert len(final) == 1 and "untagged" in final[0]["summary"]
    # a second, fresh run (--overwrite) starts its metrics anew
    p = run_cli(TINY + ["--dataset", corpus, "--max_iters", "2", "--out_dir", out, "--overwrite"])
    assert p.returncode == 0, p.stderr
    assert max(r["step"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))) == 2


def test_init_from_a_local_hf_gpt2_directory(corpus, tmp_path):
    from test_model import hf_state_dict, write_safetensors
    from model import GPT, GPTConfig
    src = GPT(GPTConfig(block_size=128, vocab_size=300, n_layer=1, n_head=2, n_embd=32))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(dict(vocab_size=300, n_positions=128, n_layer=1, n_head=2, n_embd=32)))
    write_safetensors(hf / "model.safetensors", hf_state_dict(src))
    p = run_cli(TINY + ["--dataset", corpus, "--init_from", str(hf), "--max_iters", "2",
                        "--out_dir", str(tmp_path / "ft")])
    assert p.returncode == 0, p.stderr
    ck = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    assert ck["model_config"]["vocab_size"] == 300 and ck["config"]["block_size"] == 96
    # --dtype auto is saved as what it meant here, so a resume on another machine keeps the precision
    assert ck["config"]["dtype"] == ("bfloat16" if runtime.cpu_has_bf16_matmul() else "float32")
    assert_one_line_error(run_cli(TINY + ["--dataset", corpus, "--init_from", str(hf), "--n_layer", "3",
                                          "--out_dir", str(tmp_path / "x")]), "--n_layer")


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 1e-3)])
def test_ddp_two_processes_match_one_process_with_double_accumulation(corpus, tmp_path, dtype, tol):
    common = TINY + ["--dataset", corpus, "--max_iters", "6", "--eval_interval", "100", "--final_problems", "1",
                     "--dtype", dtype]
    one = run_cli(common + ["--out_dir", str(tmp_path / "one"), "--grad_accum", "2"])
    assert one.returncode == 0, one.stderr
    two = run_cli(common + ["--out_dir", str(tmp_path / "two"), "--grad_accum", "1"],
                  module=("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                          "train.py"))
    assert two.returncode == 0, two.stderr
    a, b = losses(str(tmp_path / "one")), losses(str(tmp_path / "two"))
    assert list(a) == list(b) == list(range(1, 7))
    for step in a:  # the same sums in another order: fp32 round-off, which bf16 rounding of the weights can amplify
        assert abs(a[step] - b[step]) < tol, (step, a[step], b[step])


def test_eval_only_prints_the_level_by_style_table(corpus, tmp_path):
    out = str(tmp_path / "run")
    assert run_cli(TINY + ["--dataset", corpus, "--max_iters", "2", "--out_dir", out]).returncode == 0
    p = run_cli(["--eval_only", "--init_from", os.path.join(out, "ckpt.pt"), "--dataset", corpus,
                 "--out_dir", str(tmp_path / "ev")])
    assert p.returncode == 0, p.stderr
    for style in ("untagged", "direct", "minimal", "verbose"):
        assert style in p.stdout
    result = json.load(open(glob.glob(str(tmp_path / "ev" / "eval_only_*.json"))[0]))  # never a run's eval.json
    assert {r["level"] for r in result["rows"]} == {1, 2, 3, 4}


# ----------------------------------------------------------------------------- bad input

@pytest.fixture()
def saved_run(corpus, tmp_path):
    """An out_dir holding a finished run; every bad-input test checks that it survives byte for byte."""
    out = str(tmp_path / "saved")
    p = run_cli(TINY + ["--dataset", corpus, "--max_iters", "2", "--out_dir", out])
    assert p.returncode == 0, p.stderr
    path = os.path.join(out, "ckpt.pt")
    before = open(path, "rb").read()
    yield out
    assert open(path, "rb").read() == before


def test_unknown_flag_is_a_one_line_error(saved_run):
    assert_one_line_error(run_cli(["--out_dir", saved_run, "--n_layr", "3"]), "--n_layer")


def test_fresh_run_refuses_to_replace_a_saved_run(saved_run, corpus):
    assert_one_line_error(run_cli(TINY + ["--dataset", corpus, "--out_dir", saved_run]), "--resume", "--overwrite")


def test_missing_checkpoint_is_a_one_line_error(saved_run, tmp_path):
    assert_one_line_error(run_cli(["--resume", "--out_dir", str(tmp_path / "nothing")]), "no checkpoint")
    assert_one_line_error(run_cli(["--init_from", str(tmp_path / "nope.pt"), "--out_dir", saved_run,
                                   "--eval_only"]), "no such checkpoint")
    assert_one_line_error(run_cli(["--resume", "--out_dir", saved_run, "--n_layer", "3"]), "--n_layer")


def test_corrupt_checkpoint_is_a_one_line_error(saved_run, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(open(os.path.join(saved_run, "ckpt.pt"), "rb").read()[:5000])  # truncated
    assert_one_line_error(run_cli(["--eval_only", "--init_from", str(bad), "--out_dir", saved_run]), "corrupt")


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/lean_trainer_pickle_ran_code"


def test_checkpoint_that_would_run_code_is_refused(saved_run, tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"model": RunsCode(), "model_config": {}}, f)
    assert_one_line_error(run_cli(["--eval_only", "--init_from", str(evil), "--out_dir", saved_run]), "run code")
    assert not os.path.exists(MARKER)


def test_missing_dataset_is_a_one_line_error(saved_run, tmp_path):
    assert_one_line_error(run_cli(["--dataset", str(tmp_path / "none"), "--out_dir", str(tmp_path / "o")]),
                          "prepare.py")


def test_block_size_too_small_to_answer_is_a_one_line_error(corpus, tmp_path):
    p = run_cli(TINY + ["--dataset", corpus, "--block_size", "16", "--out_dir", str(tmp_path / "o")])
    assert_one_line_error(p, "block_size")


def test_block_size_beyond_the_data_is_a_one_line_error(saved_run, tmp_path):
    txt = tmp_path / "small.txt"
    txt.write_text("a tiny text " * 40)
    prepare_text(str(txt), str(tmp_path / "small"), verbose=False)
    p = run_cli(TINY + ["--dataset", str(tmp_path / "small"), "--block_size", "96", "--out_dir", str(tmp_path / "o")])
    assert_one_line_error(p, "block_size")


def test_empty_text_file_is_a_one_line_error_and_keeps_the_dataset(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("some text\n" * 100)
    out = str(tmp_path / "ds")
    assert run_cli(["text", "--input", str(good), "--out", out], module=("data/prepare.py",)).returncode == 0
    before = open(os.path.join(out, "train.bin"), "rb").read()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(run_cli(["text", "--input", str(empty), "--out", out], module=("data/prepare.py",)),
                          "empty")
    assert open(os.path.join(out, "train.bin"), "rb").read() == before


def test_metrics_log_on_resume_drops_a_torn_line_and_the_final_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 2, "final": true}\n'
                    '{"step": 3, "loss": 2.')  # killed mid-line
    log = runtime.MetricsLog(str(path), resume_step=2)
    log.write({"step": 3, "loss": 2.2})
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 2.2}]


def test_resume_after_the_end_says_nothing_is_left_and_keeps_same_value_flags(corpus, tmp_path):
    out = str(tmp_path / "run")
    assert run_cli(TINY + ["--dataset", corpus, "--max_iters", "2", "--out_dir", out]).returncode == 0
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "lo')  # a torn last line does not stop a resume
    p = run_cli(["--resume", "--out_dir", out, "--n_layer", "1", "--dataset", corpus])  # same values: allowed
    assert p.returncode == 0 and "nothing to do" in p.stdout, p.stderr
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    p = run_cli(["--resume", "--out_dir", out, "--max_iters", "3", "--threads", "1"])
    assert p.returncode == 0, p.stderr
    steps = [json.loads(line).get("step") for line in open(os.path.join(out, "metrics.jsonl"))]
    assert max(steps) == 3


def test_a_lower_lr_alone_lowers_the_default_floor_and_says_so(capsys):
    cfg = TrainConfig(lr=1e-4)
    train.schedule_floor(cfg, {"lr"})
    assert cfg.min_lr == pytest.approx(1e-5) and "--min_lr lowered" in capsys.readouterr().out
    with pytest.raises(UserError, match="--min_lr 0.001 is above --lr"):
        train.schedule_floor(TrainConfig(lr=1e-4, min_lr=1e-3), {"lr", "min_lr"})
