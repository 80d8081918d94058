"""bench.py: each CPU section runs end to end on small shapes and writes its figures as JSON."""
import json

import bench


def test_generate_section_measures_cache_against_recompute(tmp_path):
    out = tmp_path / "b.json"
    rows = bench.main(["generate", "--quick", "--json", str(out), "--device", "cpu"])
    saved = json.loads(out.read_text())
    assert saved["env"]["torch"] and len(saved["rows"]) == len(rows) == 2
    for r in rows:
        assert r["ours"] > 0 and r["baseline"] > 0 and r["ratio"] == r["ours"] / r["baseline"]


def test_train_section_reports_throughput_and_peak_memory():
    rows = bench.main(["train", "--quick", "--device", "cpu"])
    names = [r["name"] for r in rows]
    assert any("throughput" in n for n in names) and any("peak memory" in n for n in names)
    assert all(r["ours"] > 0 for r in rows)


def test_unknown_section_is_refused(capsys):
    import pytest
    with pytest.raises(SystemExit):
        bench.main(["nope"])
    assert "unknown section" in capsys.readouterr().err
