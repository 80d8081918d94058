"""model.py: forward/loss semantics, KV-cached generation against full recomputation, and loading a local
Hugging Face GPT-2 directory (written by the test itself) against an independent reference forward."""
import json
import math
import struct

import pytest
from dataclasses import fields
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, PEAK_FLOPS, apply_rope, config_from_dict, peak_flops, rope_tables


def tiny(rope_heads=2, **kw):
    torch.manual_seed(0)
    cfg = dict(block_size=64, vocab_size=37, n_layer=2, n_head=4, n_embd=32, rope_heads=rope_heads)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_forward_shapes_and_loss_ignores_minus_one_targets():
    m = tiny()
    x = torch.randint(0, 37, (3, 11))
    y = torch.randint(0, 37, (3, 11))
    y[:, :4] = -1  # a masked prompt
    logits, loss = m(x, y)
    assert logits.shape == (3, 11, 37)
    ref = F.cross_entropy(logits[:, 4:].reshape(-1, 37), y[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, ref)  # same numbers, same order of reduction: fp32 round-off only


def test_forward_is_causal():
    m = tiny()
    x = torch.randint(0, 37, (2, 12))
    x2 = x.clone()
    x2[:, 8:] = (x2[:, 8:] + 1) % 37
    a, _ = m(x, last_only=False)
    b, _ = m(x2, last_only=False)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_forward_rejects_sequences_longer_than_block_size():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("rope_heads", [0, 2, 4])
def test_kv_cache_generation_equals_full_recomputation_greedy(rope_heads):
    m = tiny(rope_heads=rope_heads)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 37, (n,), generator=g) for n in (1, 5, 9, 3)]  # ragged: left padding matters
    a, la = m.generate(prompts, 30, temperature=0, eos_id=5)
    b, lb = m.generate(prompts, 30, temperature=0, eos_id=5, use_cache=False)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_ragged_batch_gives_each_row_what_it_gets_alone():
    m = tiny()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 37, (n,), generator=g) for n in (2, 7, 4)]
    out, lens = m.generate(prompts, 20, temperature=0)
    for i, p in enumerate(prompts):
        alone, _ = m.generate([p], 20, temperature=0)
        assert torch.equal(alone[0], out[i])
        # and greedy decoding by hand, one full forward per token, agrees
        seq = p.clone()
        for _ in range(20):
            seq = torch.cat([seq, m(seq[None])[0][0, -1].argmax()[None]])
        assert torch.equal(seq[len(p):], out[i])


def test_rows_stop_at_eos_independently_and_lengths_count_the_eos():
    m = tiny()
    prompts = torch.randint(0, 37, (6, 4), generator=torch.Generator().manual_seed(3))
    free, _ = m.generate(prompts, 25, temperature=0)
    eos = int(free[0, 3])  # row 0 emits this token at step 4 (or earlier)
    out, lens = m.generate(prompts, 25, temperature=0, eos_id=eos)
    for r in range(6):
        hits = (free[r] == eos).nonzero()
        want = int(hits[0]) + 1 if len(hits) else 25
        assert int(lens[r]) == want
        assert torch.equal(out[r, :want], free[r, :want])
        assert (out[r, want:] == eos).all()  # filled after the end


@pytest.mark.parametrize("use_cache", [True, False])
def test_rows_that_end_early_leave_the_batch_without_changing_any_answer(use_cache):
    m = tiny()
    g = torch.Generator().manual_seed(6)
    a, b, c = (torch.randint(0, 37, (n,), generator=g) for n in (3, 6, 4))
    prompts = [a, b, c, a] * 5  # 20 ragged rows; the a rows will end after a few tokens
    free, _ = m.generate(prompts, 30, temperature=0)
    eos = next(int(x) for x in free[0, :4] if x not in free[1:3, :12])  # ends a early, b and c much later
    out, lens = m.generate(prompts, 30, temperature=0, eos_id=eos, use_cache=use_cache)
    assert int((lens <= 4).sum()) == 10 and int(lens[1]) > 12 and int(lens[2]) > 12  # rows were dropped
    for r in range(len(prompts)):
        hits = (free[r] == eos).nonzero()
        want = int(hits[0]) + 1 if len(hits) else 30
        assert int(lens[r]) == want
        assert torch.equal(out[r, :want], free[r, :want])
        assert (out[r, want:] == eos).all()


def test_sampling_is_reproducible_with_a_generator_and_top_k_1_is_greedy():
    m = tiny()
    p = torch.randint(0, 37, (3, 5), generator=torch.Generator().manual_seed(4))
    s1, _ = m.generate(p, 15, temperature=1.0, generator=torch.Generator().manual_seed(7))
    s2, _ = m.generate(p, 15, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2)
    greedy, _ = m.generate(p, 15, temperature=0)
    k1, _ = m.generate(p, 15, temperature=1.0, top_k=1)
    assert torch.equal(greedy, k1)


def test_num_samples_prefills_once_and_each_row_matches_its_prompt_alone():
    m = tiny()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 37, (n,), generator=g) for n in (3, 6)]  # ragged, so the mask is expanded too
    out, lens = m.generate(prompts, 12, temperature=0, num_samples=3, eos_id=5)
    assert out.shape[0] == 6 and lens.shape == (6,)
    for i, p in enumerate(prompts):
        alone, n = m.generate([p], 12, temperature=0, eos_id=5)
        for r in range(3 * i, 3 * i + 3):  # greedy: all G copies equal the prompt's own answer
            assert int(lens[r]) == int(n[0]) and torch.equal(out[r, :int(n[0])], alone[0, :int(n[0])])
    # sampled: the expanded rows differ from each other, and the recompute path expands the same way
    s, _ = m.generate(prompts, 12, temperature=1.0, num_samples=4, generator=torch.Generator().manual_seed(0))
    assert s.shape[0] == 8 and not all(torch.equal(s[0], s[r]) for r in range(1, 4))
    b, _ = m.generate(prompts, 12, temperature=0, num_samples=3, eos_id=5, use_cache=False)
    assert torch.equal(b[:, :out.shape[1]], out)


def test_generate_rejects_a_budget_beyond_block_size():
    with pytest.raises(ValueError, match="fewer new tokens"):
        tiny().generate(torch.zeros(1, 40, dtype=torch.long), 30)


def test_rope_heads_must_fit_the_model():
    with pytest.raises(ValueError, match="rope_heads"):
        tiny(rope_heads=5)


def test_rope_rotates_each_pair_by_its_angle_on_rope_heads_only():
    H, hd, T, base = 3, 8, 11, 10000.0
    cos, sin = rope_tables(H, 2, hd, T, base)
    x = torch.randn(2, H, T, hd)
    got = apply_rope(x, cos.transpose(0, 1), sin.transpose(0, 1))
    # reference: pair (i, i + hd/2) is the complex number x_i + j x_{i+hd/2}, turned by t * base^(-2i/hd)
    z = torch.complex(x[..., :hd // 2], x[..., hd // 2:])
    ang = torch.arange(T)[:, None] * base ** (-torch.arange(0, hd, 2) / hd)[None, :]
    turned = z[:, :2] * torch.polar(torch.ones_like(ang), ang)
    torch.testing.assert_close(got[:, :2], torch.cat([turned.real, turned.imag], -1), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:, 2:], x[:, 2:])  # a plain head is untouched


def test_gelu_is_exact_by_default_and_old_checkpoints_keep_tanh():
    x = torch.randn(3, 5, 32)
    exact, tanh = tiny(), tiny(gelu="tanh")
    assert exact.config.gelu == "exact"
    assert not torch.equal(exact.transformer.h[0].mlp(x), tanh.transformer.h[0].mlp(x))
    torch.testing.assert_close(exact.transformer.h[0].mlp(x), tanh.transformer.h[0].mlp(x), rtol=0, atol=1e-2)
    old = dict(block_size=64, vocab_size=37, n_layer=2, n_head=4, n_embd=32, rope_heads=2)  # saved before the field
    assert config_from_dict(old).gelu == "tanh"
    assert config_from_dict({**old, "gelu": "exact"}).gelu == "exact"
    with pytest.raises(ValueError, match="gelu"):
        tiny(gelu="relu")


def test_cpu_bf16_autocast_runs_attention_in_fp32(monkeypatch):
    # torch's bf16 attention backward on CPU is ~3x slower than fp32's: under CPU autocast the model upcasts q, k,
    # v and turns autocast off around the attention (else autocast would cast them back down)
    seen, sdpa = [], F.scaled_dot_product_attention
    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model, idx = tiny(), torch.randint(0, 37, (2, 16))
    _, loss32 = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    assert seen[-2:] == [(torch.float32,) * 3 + (False,)] * 2 and logits.dtype == torch.bfloat16
    loss.backward()
    assert loss.item() == pytest.approx(loss32.item(), rel=2e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    out, _ = model.generate([[1, 2, 3]], 4, temperature=0)  # generation (cache, masks) takes the same path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, _ = model.generate([[1, 2, 3]], 4, temperature=0)
    assert out16.shape == out.shape and seen[-1][:3] == (torch.float32,) * 3


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=8, n_head=4, n_embd=128))
    std = m.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.0015  # 16k samples: the std estimate is within ~1%
    assert m.lm_head.weight is m.transformer.wte.weight  # tied


# ----------------------------------------------------------------------------- Hugging Face GPT-2 directories

def hf_state_dict(model):
    """Our weights in Hugging Face's GPT-2 naming and layout (Conv1D: (in, out))."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        name = k.removeprefix("transformer.")
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        out[name] = v.contiguous().clone()
    out["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))  # HF's mask buffer, to be ignored
    return out


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        b = t.to(torch.float32).numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def reference_gpt2_logits(sd, idx, n_head):
    """GPT-2's forward written from the HF tensors directly (Conv1D: x @ W + b), independent of model.py."""
    T = idx.shape[1]
    h = sd["wte.weight"][idx] + sd["wpe.weight"][:T]
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
    for i in range(n_layer):
        p = f"h.{i}."
        qkv = ln(h, p + "ln_1") @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]
        q, k, v = qkv.split(h.shape[-1], dim=-1)
        heads = lambda t: t.view(1, T, n_head, -1).transpose(1, 2)
        q, k, v = heads(q), heads(k), heads(v)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(1, T, -1)
        h = h + y @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        m = F.gelu(ln(h, p + "ln_2") @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"], approximate="tanh")
        h = h + m @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    return ln(h, "ln_f") @ sd["wte.weight"].t()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_from_pretrained_loads_a_local_hf_gpt2_directory(tmp_path, fmt):
    src = tiny(rope_heads=0)
    with torch.no_grad():  # non-trivial biases and norms, so a mix-up of any tensor shows
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = hf_state_dict(src)
    cfg = dict(vocab_size=37, n_positions=64, n_layer=2, n_head=4, n_embd=32, model_type="gpt2")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        write_safetensors(tmp_path / "model.safetensors", sd)
    else:
        torch.save({"transformer." + k: v for k, v in sd.items()}, tmp_path / "pytorch_model.bin")
    m = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 37, (1, 13))
    ours, _ = m(idx, last_only=False)
    # the same float32 ops in a different order: agreement to ~1e-5 relative
    torch.testing.assert_close(ours, reference_gpt2_logits(sd, idx, 4), rtol=1e-4, atol=1e-4)


def test_from_pretrained_rejects_a_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(vocab_size=10, n_layer=1, n_head=1, n_embd=8)))
    with pytest.raises(FileNotFoundError, match="neither"):
        GPT.from_pretrained(str(tmp_path))


def test_mfu_uses_the_device_table_and_is_unknown_on_cpu(monkeypatch):
    m = tiny()
    assert m.estimate_mfu(1e4, 64, "cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    assert peak_flops("cuda:0") == PEAK_FLOPS["H200"]
    mfu = m.estimate_mfu(1e6, 64, "cuda:0")
    assert mfu == pytest.approx(m.flops_per_token(64) * 1e6 / 989e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some Unknown GPU")
    assert m.estimate_mfu(1e6, 64, "cuda:0") is None


# ----------------------------------------------------------------------------- the Llama and Qwen families

# tiny random models of each family: GQA and MQA, tied and untied heads, Qwen2's q/k/v bias, Qwen3's q/k norms
# and a head_dim apart from n_embd / n_head, Llama 3's rope scaling with all three frequency bands in use
# (wavelengths 6.3 < 8 kept, 20 blended, 63 and up slowed by 4 when original_max_position_embeddings = 32)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
LLAMA_SHAPE = dict(block_size=64, vocab_size=53, n_layer=2, n_head=4, n_embd=64, bias=False, rope_heads=4,
                   norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", intermediate_size=96, learned_pos=False)
FAMILIES = {
    "llama3": dict(LLAMA_SHAPE, n_kv_head=2, tie_embeddings=False, rope_base=10000.0,
                   rope_scaling=LLAMA3_SCALING),
    "smollm2": dict(LLAMA_SHAPE, rope_base=100000.0),  # full multi-head attention, tied
    "qwen2": dict(LLAMA_SHAPE, n_kv_head=1, qkv_bias=True, rope_base=1e6),
    "qwen3": dict(LLAMA_SHAPE, n_kv_head=2, head_dim=24, qk_norm=True, tie_embeddings=False),
}
HF_TYPE = {"llama3": "llama", "smollm2": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def family(name, seed=0):
    """A tiny random model of the family, every weight (norms and biases too) moved off its init so that a
    mix-up of any two tensors shows in the logits."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**FAMILIES[name])).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def rel_err(a, b):
    return float((a.detach() - b).abs().max() / b.abs().max())


def llama3_frequencies(hd, base, s):
    """Meta's apply_scaling, one frequency at a time in Python floats."""
    out = []
    for i in range(0, hd, 2):
        f = base ** (-i / hd)
        wavelen, old = 2 * math.pi / f, s["original_max_position_embeddings"]
        if wavelen < old / s["high_freq_factor"]:
            out.append(f)
        elif wavelen > old / s["low_freq_factor"]:
            out.append(f / s["factor"])
        else:
            smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            out.append((1 - smooth) * f / s["factor"] + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def reference_llama_logits(sd, cfg, idx):
    """Llama / Qwen2 / Qwen3 forward written from the Hugging Face tensor names and config.json, in float64,
    independent of model.py: RMSNorm, q/k/v (+ bias), q/k norms, rotary pairs (i, i + hd/2) as complex numbers,
    key/value heads repeated for grouped-query attention, causal softmax, SwiGLU."""
    sd = {k: v.double() for k, v in sd.items()}
    T, H, KV = idx.shape[1], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps = cfg["head_dim"], cfg["rms_norm_eps"]
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    scaling = cfg.get("rope_scaling")
    freqs = llama3_frequencies(hd, cfg["rope_theta"], scaling) if scaling else \
        cfg["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    turn = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.arange(T)[:, None] * freqs[None])

    def rotate(x):  # (1, heads, T, hd)
        z = torch.complex(x[..., :hd // 2], x[..., hd // 2:]) * turn
        return torch.cat([z.real, z.imag], -1)

    def linear(x, p):
        return x @ sd[p + ".weight"].T + (sd[p + ".bias"] if p + ".bias" in sd else 0)

    h = sd["model.embed_tokens.weight"][idx]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        q, k, v = (linear(x, p + f"self_attn.{n}_proj").view(1, T, -1, hd) for n in "qkv")
        if p + "self_attn.q_norm.weight" in sd:
            q, k = rms(q, sd[p + "self_attn.q_norm.weight"]), rms(k, sd[p + "self_attn.k_norm.weight"])
        q, k, v = rotate(q.transpose(1, 2)), rotate(k.transpose(1, 2)), v.transpose(1, 2)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        h = h + linear((att @ v).transpose(1, 2).reshape(1, T, H * hd), p + "self_attn.o_proj")
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        h = h + linear(F.silu(linear(x, p + "mlp.gate_proj")) * linear(x, p + "mlp.up_proj"), p + "mlp.down_proj")
    h = rms(h, sd["model.norm.weight"])
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return h @ head.T


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_saved_in_hf_format_matches_an_independent_reference(tmp_path, name):
    from safetensors.torch import load_file
    family(name).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == HF_TYPE[name]
    m = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 53, (1, 40), generator=torch.Generator().manual_seed(1))  # past 32: all rope bands
    ours, _ = m(idx, last_only=False)
    ref = reference_llama_logits(load_file(tmp_path / "model.safetensors"), cfg, idx)
    # fp32 against an fp64 reference of the same maths: agreement to ~1e-6 relative; 1e-4 is the bound
    assert rel_err(ours.double(), ref) < 1e-4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_gives_the_same_greedy_tokens_with_and_without_the_kv_cache(name):
    m = family(name)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 53, (n,), generator=g) for n in (1, 6, 9, 3, 4, 2, 7, 5)]  # ragged, 8 rows
    free, _ = m.generate(prompts, 24, temperature=0)
    eos = int(free[0, 2])  # row 0 ends at its third token: rows leave the batch during the cached run
    a, la = m.generate(prompts, 24, temperature=0, eos_id=eos)
    b, lb = m.generate(prompts, 24, temperature=0, eos_id=eos, use_cache=False)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert int(la[0]) <= 3 and len(set(free[:, 0].tolist())) > 1  # eos hit, and not a constant model


def test_the_kv_cache_of_grouped_query_attention_holds_n_kv_head_heads(monkeypatch):
    import model as model_module
    made = []

    class SpyCache(model_module.KVCache):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)
    monkeypatch.setattr(model_module, "KVCache", SpyCache)
    sizes = {}
    for kv in (4, 2, 1):  # multi-head, grouped-query, multi-query
        cfg = dict(FAMILIES["smollm2"], n_kv_head=kv)
        torch.manual_seed(0)
        GPT(GPTConfig(**cfg)).generate([[1, 2, 3], [4, 5]], 10, temperature=0)
        k = next(iter(made[-1].k.values()))
        assert k.shape == (2, kv, 2 + 10 + 1, 16)  # (B, n_kv_head, prompt + new tokens, head_dim)
        sizes[kv] = made[-1].nbytes()
    assert sizes[2] * 2 == sizes[1] * 4 == sizes[4]  # n_kv_head / n_head of full attention's memory


@pytest.mark.parametrize("name", ["gpt2"] + list(FAMILIES))
def test_save_pretrained_then_from_pretrained_is_exact(tmp_path, name):
    if name == "gpt2":
        m = tiny(rope_heads=0, gelu="tanh")
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    else:
        m = family(name)
    m.save_pretrained(tmp_path)
    again = GPT.from_pretrained(tmp_path).eval()
    a, b = m.state_dict(), again.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    for f in fields(GPTConfig):  # 0 (derived) comes back as the value it stood for
        want = getattr(m.config, f.name) or {"n_kv_head": m.config.kv_heads, "head_dim": m.config.head_size,
                                             "intermediate_size": m.config.mlp_hidden}.get(f.name, 0)
        assert getattr(again.config, f.name) in (getattr(m.config, f.name), want), f.name
    idx = torch.randint(0, m.config.vocab_size, (2, 17))
    assert torch.equal(m(idx, last_only=False)[0], again(idx, last_only=False)[0])
    if name == "gpt2":  # the independent GPT-2 reference reads the exported tensors too
        from safetensors.torch import load_file
        sd = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
        torch.testing.assert_close(again(idx[:1], last_only=False)[0], reference_gpt2_logits(sd, idx[:1], 4),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "mistral"] + list(FAMILIES))
def test_transformers_loads_our_export_and_we_load_its_checkpoints(tmp_path, name):
    # optional cross-check against the Hugging Face implementation itself (never a requirement)
    transformers = pytest.importorskip("transformers")
    if name == "gpt2":
        m = tiny(rope_heads=0, gelu="tanh")
    elif name == "mistral":  # no export to mistral (it is llama's shape): only theirs -> ours
        m = family("smollm2")
    else:
        m = family(name)
    m.save_pretrained(tmp_path / "ours")
    load = dict(dtype=torch.float32, attn_implementation="eager", use_kernels=False)  # kernels: a hub download
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", **load).eval()
    if name == "mistral":
        cfg = transformers.MistralConfig(**{k: v for k, v in theirs.config.to_dict().items()
                                            if k not in ("model_type", "architectures")}, sliding_window=None)
        theirs = transformers.MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in theirs.parameters():  # off HF's init (unit norms, zero biases) so every tensor matters
            p.add_(0.05 * torch.randn_like(p))
    idx = torch.randint(0, m.config.vocab_size, (1, 40 if name != "gpt2" else 30))
    if name != "mistral":  # ours -> theirs: the same weights give the same logits
        theirs_from_ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", **load).eval()
        with torch.no_grad():
            assert rel_err(m(idx, last_only=False)[0], theirs_from_ours(idx).logits) < 1e-4
    theirs.save_pretrained(tmp_path / "theirs")  # transformers' own config.json (rope_parameters) and names
    ours = GPT.from_pretrained(tmp_path / "theirs").eval()
    with torch.no_grad():
        assert rel_err(ours(idx, last_only=False)[0], theirs(idx).logits) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_from_pretrained_reads_half_precision_shards_into_an_fp32_model(tmp_path, dtype):
    from safetensors.torch import load_file, save_file
    family("qwen3").save_pretrained(tmp_path)
    sd = {k: v.to(dtype) for k, v in load_file(tmp_path / "model.safetensors").items()}
    (tmp_path / "model.safetensors").unlink()
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({k: sd[k] for k in part}, tmp_path / file, metadata={"format": "pt"})
    index = {"weight_map": {k: file for file, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    m = GPT.from_pretrained(tmp_path)
    assert m.lm_head.weight.dtype == torch.float32
    # every weight is the half-precision value, widened exactly
    assert torch.equal(m.transformer.h[1].attn.k_norm.weight, sd["model.layers.1.self_attn.k_norm.weight"].float())
    assert torch.equal(m.lm_head.weight, sd["lm_head.weight"].float())


def one_line_error(exc, fn, *needles):
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_from_pretrained_names_the_file_for_each_kind_of_bad_directory(tmp_path):
    from safetensors.torch import load_file, save_file
    family("llama3").save_pretrained(tmp_path)
    cfg_file, st = tmp_path / "config.json", tmp_path / "model.safetensors"
    good_cfg, sd = json.loads(cfg_file.read_text()), load_file(st)
    load = lambda: GPT.from_pretrained(tmp_path)
    cfg_file.write_text(json.dumps({**good_cfg, "model_type": "gemma"}))
    one_line_error(ValueError, load, "config.json", "'gemma'", "qwen3")
    cfg_file.write_text(json.dumps({**good_cfg, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}))
    one_line_error(ValueError, load, "config.json", "yarn")
    cfg_file.write_text(json.dumps({k: v for k, v in good_cfg.items() if k != "hidden_size"}))
    one_line_error(ValueError, load, "config.json", "hidden_size")
    cfg_file.write_text(json.dumps(good_cfg))
    save_file({k: v for k, v in sd.items() if k != "model.norm.weight"}, st)
    one_line_error(ValueError, load, str(tmp_path), "model.norm.weight")  # missing
    save_file({**sd, "model.layers.9.mlp.up_proj.weight": torch.zeros(2)}, st)
    one_line_error(ValueError, load, str(st), "model.layers.9.mlp.up_proj.weight")  # extra
    save_file({**sd, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}, st)
    one_line_error(ValueError, load, str(st), "k_proj", "(64, 64)", "(32, 64)")  # shape
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    one_line_error(ValueError, load, str(st), "safetensors")  # corrupt
    st.unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "a.st"}}))
    one_line_error(FileNotFoundError, load, "model.safetensors.index.json", "a.st")  # a missing shard


def test_save_pretrained_refuses_shapes_hf_lacks_and_quantized_models(tmp_path):
    one_line_error(ValueError, lambda: tiny(rope_heads=2).save_pretrained(tmp_path), "rotary")
    one_line_error(ValueError, lambda: GPT(GPTConfig(**{**FAMILIES["smollm2"], "learned_pos": True}))
                   .save_pretrained(tmp_path), "learned positions")
    import quant
    m = quant.quantize_(family("smollm2"), "w4g32")
    one_line_error(ValueError, lambda: m.save_pretrained(tmp_path), "FakeQuantLinear", "float model")
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("change, needle", [
    (dict(n_kv_head=3), "n_kv_head"), (dict(norm="batchnorm"), "norm"), (dict(mlp="relu"), "mlp"),
    (dict(head_dim=7), "even head dimension"), (dict(n_kv_head=2, rope_heads=2), "grouped-query"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"), (dict(norm_eps=0.0), "norm_eps"),
])
def test_gptconfig_rejects_shapes_no_model_has_in_one_line(change, needle):
    one_line_error(ValueError, lambda: GPT(GPTConfig(**{**FAMILIES["smollm2"], **change})), needle)


def test_cpu_bf16_autocast_runs_grouped_query_attention_in_fp32(monkeypatch):
    seen, sdpa = [], F.scaled_dot_product_attention
    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu"), k.shape[1]))
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    m, idx = family("qwen3"), torch.randint(0, 53, (2, 16))
    _, loss32 = m(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = m(idx, idx)
        out16, _ = m.generate([[1, 2, 3], [4]], 4, temperature=0)
    assert logits.dtype == torch.bfloat16 and seen[-1] == (torch.float32,) * 3 + (False, 2)  # 2 kv heads
    assert loss.item() == pytest.approx(loss32.item(), rel=2e-2)  # bf16 matmuls: ~1% on a loss of ~4
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_batched_fast_path_equals_the_plain_path_token_for_token(monkeypatch):
    # the plain path: one prompt at a time, one full forward per token, stop at eos; the fast path: ragged
    # prompts left-padded in one batch, a KV cache, rows leaving as they end, num_samples copies per prompt
    import model as model_module
    kept, drop = [], model_module.RaggedBatch.drop_finished
    monkeypatch.setattr(model_module.RaggedBatch, "drop_finished", lambda self: kept.append(drop(self)) or kept[-1])
    m = family("llama3")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 53, (n,), generator=g) for n in (2, 9, 4, 1, 6, 3, 5, 8, 2)]
    free, _ = m.generate(prompts, 20, temperature=0)
    eos = int(free[3, 1])  # a token some rows emit early
    out, lens = m.generate(prompts, 20, temperature=0, eos_id=eos, num_samples=2)
    assert any(k is not None and len(k) < 18 for k in kept)  # rows that ended left the batch
    for i, p in enumerate(prompts):
        seq = p.clone()
        for _ in range(20):
            seq = torch.cat([seq, m(seq[None])[0][0, -1].argmax()[None]])
            if seq[-1] == eos:
                break
        want = seq[len(p):]
        for r in (2 * i, 2 * i + 1):
            assert int(lens[r]) == len(want) and torch.equal(out[r, :len(want)], want)
            assert (out[r, len(want):] == eos).all()
