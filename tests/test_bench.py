"""bench.py: each CPU section runs end to end on small shapes and writes its figures as JSON."""
import json

import pytest
import torch

import bench
from config import BenchConfig


def test_generate_section_measures_cache_against_recompute(tmp_path):
    out = tmp_path / "b.json"
    rows = bench.main(["generate", "--quick", "--json", str(out), "--device", "cpu"])
    saved = json.loads(out.read_text())
    assert saved["env"]["torch"] and len(saved["rows"]) == len(rows) == 2
    for r in rows:
        assert r["ours"] > 0 and r["baseline"] > 0 and r["ratio"] == r["ours"] / r["baseline"]


@pytest.mark.parametrize("amx", [True, False])
def test_train_section_reports_throughput_and_peak_memory(monkeypatch, amx):
    import runtime
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: amx)  # what train.py's --dtype auto would pick
    rows = bench.main(["train", "--quick", "--device", "cpu"])
    names = [r["name"] for r in rows]
    assert any("throughput" in n for n in names) and any("peak memory" in n for n in names)
    assert all(r["ours"] > 0 for r in rows)
    for r in (r for r in rows if "throughput" in r["name"]):
        if amx:  # bf16 autocast against the same step in fp32
            assert "bfloat16 vs float32" in r["name"] and r["baseline"] > 0 and r["ratio"] > 0
        else:
            assert "float32" in r["name"] and r["baseline"] is None


def test_unknown_section_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["nope"])
    assert "unknown section" in capsys.readouterr().err


def test_adam_section_reports_time_state_bytes_and_step_memory():
    rows = bench.main(["adam", "--quick", "--device", "cpu"])
    by_name = {r["name"].split(" (")[0]: r for r in rows}
    state = by_name["quick: state bytes per parameter vs AdamW"]
    assert 8.0 <= state["baseline"] < 8.01 and 2.0 < state["ours"] < 2.1  # fp32 AdamW: 8 bytes + its step counters
    assert by_name["quick: step time vs AdamW foreach"]["ours"] > 0
    assert "largest_tensor_copies" in by_name["quick: memory added by a step vs AdamW foreach"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_timed_section_honours_dtype(dtype):
    rows = bench.main(["train", "qat", "--quick", "--device", "cpu", "--dtype", dtype])
    train_rows = [r for r in rows if r["section"] == "train"]
    assert all(dtype in r["name"] for r in train_rows)
    assert any(r["section"] == "qat" and r["ours"] > 0 for r in rows)


def test_json_into_a_missing_folder_is_refused_before_any_section_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["train", "--quick", "--json", str(tmp_path / "no" / "b.json")])
    err = capsys.readouterr().err
    assert "folder does not exist" in err and "throughput" not in err


def test_json_replaces_an_earlier_bench_result(tmp_path):
    out = tmp_path / "b.json"
    out.write_text(json.dumps(dict(env={"device": "old"}, rows=[])))
    rows = bench.main(["matmul", "--quick", "--device", "cpu", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["env"]["device"] != "old" and len(saved["rows"]) == len(rows) > 0
    empty = tmp_path / "e.json"
    empty.write_text("")  # made for it beforehand (mktemp): taken
    assert BenchConfig(json=str(empty)) and BenchConfig(json=str(out))


def test_every_section_declares_the_flags_it_reads():
    assert set(bench.USES) == set(bench.SECTIONS)
    assert all(uses <= set(bench.SECTION_FLAGS) for uses in bench.USES.values())
    for flag in bench.SECTION_FLAGS:  # each is read by some section
        assert any(flag in uses for uses in bench.USES.values()), flag


def test_alternating_medians_times_each_function_in_every_round():
    calls = []
    times = bench.alternating_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                      rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4 and set(times) == {"a", "b"} and all(t >= 0 for t in times.values())


def test_real_shapes_are_the_published_configs():
    """SmolLM2-135M and Qwen2.5-0.5B at their published parameter counts (random weights, real shapes)."""
    from model import GPT
    for name, millions in (("smollm2-135m", 134.5), ("qwen2.5-0.5b", 494.0)):
        with torch.device("meta"):
            model = GPT(bench.real_shape(name, 128))
        n = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(n - millions) / millions < 0.01, (name, n)


def test_a_bare_boolean_flag_before_a_section_name_is_a_flag():
    from config import BenchConfig, parse_config
    cfg, _ = parse_config(BenchConfig, ["--quick", "train", "generate"])
    assert cfg.quick and cfg.sections == "train,generate"
    cfg, _ = parse_config(BenchConfig, ["train", "--quick", "false"])
    assert not cfg.quick and cfg.sections == "train"
