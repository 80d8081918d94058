"""model.py: forward/loss semantics, KV-cached generation against full recomputation, and loading a local
Hugging Face GPT-2 directory (written by the test itself) against an independent reference forward."""
import json
import math
import struct

import pytest
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
