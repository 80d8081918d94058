"""Every tool of the trainer on a Llama-shaped model (RMSNorm, SwiGLU, grouped-query attention, rotary on every
head, no learned positions, an untied head, Qwen2's q/k/v bias): QAT and convert_, PTQ (RTN, GPTQ), QLoRA with
targets named like Hugging Face's, LoftQ, merge, AdamW8bit, activation checkpointing, the chunked loss and
KV-cached generation. Each model is tiny and random, made here."""
import copy

import pytest
import torch
import torch.nn as nn

import kernels
import lora
import quant
from model import GPT, GPTConfig
from optim import AdamW8bit

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
V = 61


def llama(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=48, vocab_size=V, n_layer=2, n_head=4, n_embd=64, bias=False, rope_heads=4,
                         norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", intermediate_size=128, n_kv_head=2,
                         learned_pos=False, tie_embeddings=False, qkv_bias=True))


def batch(seed, B=4, T=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T + 1), generator=g)
    return x[:, :-1].clone(), x[:, 1:].clone()


def layers_of(model, cls):
    return sorted({n.split(".")[-1] for n, m in model.named_modules() if type(m) is cls})


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------- quantization

def test_qat_trains_then_convert_is_exact_on_every_llama_linear():
    model = quant.quantize_(llama(), "w4g32")
    assert layers_of(model, quant.FakeQuantLinear) == sorted(LLAMA_LINEARS)
    assert type(model.lm_head) is nn.Linear  # the (untied) head stays float, as with GPT-2
    x, y = batch(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):  # a few QAT steps on one batch: the fake-quant model trains
        loss = model(x, y)[1]
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.1
    model.eval()
    with torch.no_grad():
        fq = model(x, last_only=False)[0]
        quant.convert_(model)
        conv = model(x, last_only=False)[0]
    assert layers_of(model, quant.Int4Linear) == sorted(LLAMA_LINEARS)
    # the same dequantized weights (made by the same functions); only the matmul's summation order differs
    assert rel_err(conv, fq) <= 1e-5


def test_ptq_rtn_and_gptq_quantize_every_llama_linear_and_gptq_errs_less():
    x, _ = batch(1, B=8)
    calib = [(x[i:i + 2],) for i in range(0, 8, 2)]
    ref = llama()(x, last_only=False)[0].detach()
    errs = {}
    for method in ("rtn", "gptq"):
        model = quant.apply_ptq_(llama(), method, "w3g32", calib)
        assert layers_of(model, quant.FakeQuantLinear) == sorted(LLAMA_LINEARS)
        with torch.no_grad():
            fq = model(x, last_only=False)[0]
            errs[method] = rel_err(fq, ref)
            quant.convert_(model)
            assert rel_err(model(x, last_only=False)[0], fq) <= 1e-5  # frozen GPTQ codes convert exactly
    # GPTQ spreads each column's rounding error over the others using the calibration inputs: on those same
    # inputs the model's output moves less than with round-to-nearest (measured here: 0.65x)
    assert errs["gptq"] < 0.85 * errs["rtn"], errs


# ----------------------------------------------------------------------------- QLoRA, LoftQ, merge

def test_qlora_targets_llama_names_and_trains_only_the_adapters():
    model = lora.add_lora_(llama(), rank=4, alpha=8.0, targets=",".join(LLAMA_LINEARS), base="nf4g64")
    assert layers_of(model, lora.LoRALinear) == sorted(LLAMA_LINEARS)
    assert all(isinstance(m.base, quant.Int4Linear) for _, m in lora.lora_layers(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 7 * 2 and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    q = model.transformer.h[0].attn.q_proj.base  # Qwen2's q/k/v bias is kept, frozen, beside the 4-bit codes
    assert q.bias is not None and not q.bias.requires_grad
    x, y = batch(2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(x, y)[1]
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.05
    with pytest.raises(ValueError, match="no nn.Linear named"):  # GPT-2's default targets do not exist here
        lora.add_lora_(llama(), rank=4)


def test_loftq_starts_closer_to_the_float_llama_than_plain_qlora():
    x, _ = batch(3)
    float_model = llama()
    ref = float_model(x, last_only=False)[0].detach()
    floats = dict(float_model.named_modules())
    outs = {}
    for iters in (0, 3):
        model = lora.add_lora_(llama(), rank=8, alpha=16.0, targets=LLAMA_LINEARS, base="int4g32",
                               loftq_iters=iters)
        with torch.no_grad():
            outs[iters] = rel_err(model(x, last_only=False)[0], ref)
    for name, m in lora.lora_layers(model):  # each layer: W - Q - s B A is smaller than W - quantize(W)
        w = floats[name].weight.detach()
        plain = lora.dequantize_base(lora.quantize_base(w, "int4g32"), "int4g32", w.shape)
        assert min(m.loftq_errors) < float((w - plain).norm() / w.norm()), name
    assert outs[3] < outs[0], outs  # and so is the model's output


def test_merge_gives_the_same_function_and_the_merged_llama_exports(tmp_path):
    model = lora.add_lora_(llama(), rank=4, alpha=8.0, targets=LLAMA_LINEARS)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B.add_(0.05 * torch.randn_like(m.lora_B))  # as after fine-tuning
    x, _ = batch(4)
    before = model(x, last_only=False)[0].detach()
    merged = lora.merge_lora_(copy.deepcopy(model))
    assert not lora.lora_layers(merged) and layers_of(merged, nn.Linear) == sorted(LLAMA_LINEARS + ("lm_head",))
    with torch.no_grad():
        after = merged(x, last_only=False)[0]
    assert rel_err(after, before) <= 1e-5  # one fp32 matrix W + s B A instead of two products
    merged.save_pretrained(tmp_path)  # a merged model is a float model: it exports, and loads back exactly
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(tmp_path)(x, last_only=False)[0], after)


# ----------------------------------------------------------------------------- training under constraints

def test_adamw8bit_trains_a_llama_like_fp32_adamw():
    x, y = batch(5, B=8)

    def train(make_opt):
        model = llama()
        opt = make_opt(model.parameters())
        losses = []
        for _ in range(20):
            loss = model(x, y)[1]
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return torch.tensor(losses), opt

    ref, _ = train(lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1))
    ours, opt = train(lambda ps: AdamW8bit(ps, lr=3e-3, weight_decay=0.1))
    assert sum("m_codes" in st for st in opt.state.values()) > 0  # the 64 x 64 and larger matrices are 8-bit
    assert ref[-1] < ref[0] - 1.0  # it memorises the batch
    # measured here: the loss curves differ by 4e-4 at most over the 20 steps (the 8-bit moments' rounding)
    assert (ours - ref).abs().max() < 0.01, (ours - ref).abs().max()


def test_activation_checkpointing_gives_the_same_gradients_on_a_llama():
    x, y = batch(6)
    grads = {}
    for every in (0, 1):
        model = llama()
        model.grad_ckpt_every = every
        model(x, y)[1].backward()
        grads[every] = {n: p.grad for n, p in model.named_parameters()}
    # the recomputed forward is the same fp32 ops on the same inputs: bitwise equal gradients
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_chunked_loss_with_an_untied_head_matches_the_full_loss():
    x, y = batch(7)
    y[:, :5] = -1  # a masked prompt
    runs = {}
    for loss_fn in (None, kernels.linear_cross_entropy):
        model = llama()
        loss = model(x, y, loss_fn=loss_fn)[1]
        loss.backward()
        runs[loss_fn is None] = loss.detach(), model.lm_head.weight.grad, model.transformer.wte.weight.grad
    (l0, h0, e0), (l1, h1, e1) = runs[True], runs[False]
    assert h0 is not None and e0 is not None and not torch.equal(h0, e0[:, :h0.shape[1]])  # untied: two grads
    # the same fp32 softmax, summed per chunk of rows: 1e-5 relative
    assert abs(l1.item() - l0.item()) <= 1e-5 * l0.item()
    assert rel_err(h1, h0) <= 1e-5 and rel_err(e1, e0) <= 1e-5


@pytest.mark.parametrize("tool", ["int4", "qlora"])
def test_kv_cached_generation_on_a_quantized_llama_equals_recomputation(tool):
    model = llama()
    if tool == "int4":
        quant.convert_(quant.quantize_(model, "w4g32"))
    else:
        lora.add_lora_(model, rank=4, alpha=8.0, targets=LLAMA_LINEARS, base="nf4g64")
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (3, 7, 1, 5)]
    a, la = model.generate(prompts, 16, temperature=0, eos_id=7)
    b, lb = model.generate(prompts, 16, temperature=0, eos_id=7, use_cache=False)
    assert torch.equal(a, b) and torch.equal(la, lb)


# ----------------------------------------------------------------------------- the entry points on a local HF model

def test_train_rl_ptq_and_export_on_a_local_llama_directory_with_its_tokenizer(tmp_path):
    """The pipeline on a Hugging Face-format Llama with its own byte-level BPE tokenizer: prepare a task corpus
    with it, fine-tune with train.py --init_from DIR, evaluate through reason_rl.py, quantize to int4, and export
    the fine-tuned float model back to a directory that loads exactly."""
    import json
    import os

    import reason_rl
    import train
    from checkpoint import load_model
    from data.prepare import main as prepare
    from data.tokenizer import load_tokenizer, train_bpe
    from test_tokenizer import MIXED_TEXT, make_text, write_hf_dir
    ranks = train_bpe(make_text(0, 3000) + MIXED_TEXT + "0123456789+-=|\n[minimal]answer: c1", 300)
    hf = tmp_path / "model"
    torch.manual_seed(0)
    GPT(GPTConfig(block_size=64, vocab_size=300 + 3, n_layer=1, n_head=4, n_embd=32, bias=False, rope_heads=4,
                  norm="rmsnorm", mlp="swiglu", intermediate_size=64, n_kv_head=2, learned_pos=False,
                  tie_embeddings=False)).save_pretrained(hf)
    write_hf_dir(hf, ranks, "llama3", {"tokenizer_config.json": {"eos_token": "<|im_end|>"}})
    data = str(tmp_path / "sub")
    prepare(["subtraction", "--out", data, "--tokenizer", f"hf:{hf}", "--train_examples", "200",
             "--val_examples", "40", "--test_per_level", "2"])
    common = ["--threads", "1", "--eval_iters", "1", "--batch_size", "4", "--final_problems", "1", "--samples", "1"]
    train.main(["--init_from", str(hf), "--dataset", data, "--max_iters", "3", "--out_dir", str(tmp_path / "ft"),
                *common])
    tuned, ck = load_model(str(tmp_path / "ft" / "ckpt.pt"))
    assert tuned.config.mlp == "swiglu" and tuned.config.kv_heads == 2 and not tuned.config.tie_embeddings
    tok = load_tokenizer(json.load(open(os.path.join(data, "meta.json")))["tokenizer"], data)
    assert tok.eos_id == 302  # <|im_end|>: generation stops at the model's own end token
    from config import RLConfig, parse_config
    e = reason_rl.run(*parse_config(RLConfig, [
        "--eval_only", "--init_from", str(tmp_path / "ft" / "ckpt.pt"), "--eval_problems", "2", "--threads", "1",
        "--out_dir", str(tmp_path / "rl")]))
    assert {r["level"] for r in e["rows"]} == {5, 6}
    train.main(["--init_from", str(tmp_path / "ft" / "ckpt.pt"), "--ptq", "rtn", "--ptq_spec", "w4g32",
                "--out_dir", str(tmp_path / "int4"), *common])
    int4, _ = load_model(str(tmp_path / "int4" / "ckpt.pt"))
    assert sum(isinstance(m, quant.Int4Linear) for m in int4.modules()) == 7
    tuned.save_pretrained(tmp_path / "export")
    back = GPT.from_pretrained(str(tmp_path / "export"))
    sd, sd2 = tuned.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
