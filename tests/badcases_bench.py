"""Bad-input cases for bench.py: its flags, sections, output file and --init_from (tests/test_bad_input.py)."""
from badworld import Case


def bench(name, argv, expect, setup=None):
    return Case(f"bench-{name}", "bench", list(argv) + ["--quick"], expect, setup)


CASES = [
    bench("unknown-section", ["nope"], r"unknown section\(s\) nope"),
    bench("unknown-section-among", ["train", "trian"], r"unknown section\(s\) trian; choose from"),
    bench("unknown-section-flag", ["--sections", "x,y"], r"unknown section\(s\) x, y"),
    bench("unknown-flag", ["--shapes", "gpt2-small"], r"unknown flag --shapes; did you mean --shape"),
    bench("shape", ["--shape", "llama-7b"], r"--shape must be one of gpt2-small"),
    bench("dtype", ["--dtype", "float16"], r"--dtype must be one of auto, float32, bfloat16"),
    bench("device", ["--device", "tpu"], r"--device 'tpu'"),
    bench("device-cuda", ["--device", "cuda"], r"--device cuda: no CUDA device"),
    bench("json-missing-folder", ["train", "--json", "no/where/b.json"], r"--json no/where/b.json: its folder"),
    bench("json-is-folder", ["train", "--json", "run"], r"--json run is a folder: name a file"),
    bench("init-from-missing", ["generate", "--init_from", "none.pt"], r"no checkpoint at none.pt"),
    bench("init-from-text", ["generate", "--init_from", "notes.txt"], r"notes.txt is corrupt"),
    Case("bench-quick-word", "bench", ["train", "--quick", "sometimes"], r"unknown section\(s\) sometimes"),
    Case("bench-quick-value", "bench", ["train", "--quick=sometimes"], r"--quick expects bool"),
    bench("config-missing", ["--config", "b.toml"], r"config file b.toml not found"),
    bench("config-bad-key", ["--config", "b.toml"], r"unknown flag --shapes",
          lambda w: open(f"{w}/b.toml", "w").write('shapes = "x"\n')),
    bench("config-bad-value", ["--config", "b.toml"], r"--dtype must be one of",
          lambda w: open(f"{w}/b.toml", "w").write('dtype = "half"\n')),
    # --json replaces only a bench result (a JSON object with env and rows)
    bench("json-over-checkpoint", ["adam", "--json", "run/ckpt.pt"],
          r"--json run/ckpt\.pt exists and is not a bench\.py result.*give another path"),
    bench("json-over-text", ["adam", "--json", "notes.txt"], r"--json notes\.txt exists and is not a bench\.py"),
    bench("json-over-other-json", ["adam", "--json", "run/eval.json"], r"--json run/eval\.json exists and is not"),
    bench("json-over-a-list", ["adam", "--json", "l.json"], r"--json l\.json exists and is not",
          lambda w: open(f"{w}/l.json", "w").write('[{"env": {}, "rows": []}]\n')),
    bench("json-rows-not-a-list", ["adam", "--json", "r.json"], r"--json r\.json exists and is not",
          lambda w: open(f"{w}/r.json", "w").write('{"env": {}, "rows": 3}\n')),
    # flags that no section asked for reads
    bench("shape-unused", ["adam", "--shape", "qwen2.5-0.5b"], r"--shape is read only by train, lora, memory; "
                                                               r"the sections asked for \(adam\) ignore it"),
    bench("init-from-unused", ["adam", "--init_from", "run/ckpt.pt"],
          r"--init_from is read only by generate; .*\(adam\) ignore it: drop --init_from"),
    bench("dtype-unused", ["adam", "generate", "matmul", "--dtype", "float32"],
          r"--dtype is read only by train, qat, lora, memory; .*\(adam, generate, matmul\)"),
    bench("shape-unused-in-config", ["adam", "--config", "b.toml"], r"--shape is read only by",
          lambda w: open(f"{w}/b.toml", "w").write('shape = "smollm2-135m"\n')),
    bench("shape-under-quick", ["train", "--shape", "qwen2.5-0.5b"],
          r"--shape qwen2\.5-0\.5b: --quick times tiny stand-in shapes, not --shape; drop --quick"),
    bench("shape-under-quick-all-sections", ["--shape", "smollm2-135m"], r"--quick times tiny stand-in shapes"),
]
