"""bench.py: each CPU section runs end to end on small shapes and writes its figures as JSON."""
import json

import pytest

import bench


def test_generate_section_measures_cache_against_recompute(tmp_path):
    out = tmp_path / "b.json"
    rows = bench.main(["generate", "--quick", "--json", str(out), "--device", "cpu"])
    saved = json.loads(out.read_text())
    assert saved["env"]["torch"] and len(saved["rows"]) == len(rows) == 2
    for r in rows:
        assert r["ours"] > 0 and r["baseline"] > 0 and r["ratio"] == r["ours"] / r["baseline"]


@pytest.mark.parametrize("amx", [True, False])
def test_train_section_reports_throughput_and_peak_memory(monkeypatch, amx):
    import train
    monkeypatch.setattr(train, "cpu_has_bf16_matmul", lambda: amx)  # what train.py's --dtype auto would pick
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
