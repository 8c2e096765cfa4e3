"""``qlora_gpu.prepare_model``: a QLoRA model built layer by layer (paper, section 1: the 65B model never exists in
16 bits on the GPU), from a Hugging Face folder or a config alone.

Checked on CPU with tiny models: the same model as the reference loader's path (``QLoRAModel.from_pretrained``)
bit for bit; at most one linear layer in float at any moment; stored 4-bit checkpoints used as stored; the
training setup (float32 norms, bfloat16 embedding and head, a float32 residual stream, checkpointing that changes no
gradient); clear errors.
On CUDA (marker ``gpu``): the peak memory while building stays within one linear layer of the final footprint.
"""

from __future__ import annotations

import json
import weakref

import numpy as np
import pytest
import torch
from test_train import write_tiny_model

from qlora_gpu.lora import QLoRALinear
from qlora_gpu.model import QLoRAModel
from qlora_gpu.optim import make_optimizer
from qlora_gpu.prepare import init_weight, llama_config, model_config, prepare_model
from qlora_ref.model.config import LoraConfig, ModelConfig, QuantConfig
from qlora_ref.model.loading import CheckpointError

LORA = LoraConfig(r=4, alpha=8.0)
TINY = ModelConfig(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
IDS = torch.arange(24)[None] * 7 % 101


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("prepare") / "tiny"
    write_tiny_model(path)
    return path


def build(model, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    kw.setdefault("lora", LORA)
    return prepare_model(model, **kw)


def assert_same_model(a: QLoRAModel, b: QLoRAModel) -> None:
    la, lb = a.named_linears(), b.named_linears()
    assert la.keys() == lb.keys()
    for name in la:
        assert torch.equal(la[name].weight, lb[name].weight), name
        sa, sb = la[name].weight.quant_state, lb[name].weight.quant_state
        assert torch.equal(sa.absmax, sb.absmax) and torch.equal(sa.state2.absmax, sb.state2.absmax), name
        assert torch.equal(la[name].lora_A, lb[name].lora_A) and torch.equal(la[name].lora_B, lb[name].lora_B), name


# ---------------------------------------------------------------------------------------------- the same model
def test_folder_gives_the_reference_loaders_model_bit_for_bit(folder):
    """Streaming, layer-by-layer build == the whole-checkpoint path: same 4-bit codes, constants, adapters
    (the reference's per-layer seeds) and logits (float32 stream with each linear's output rounded in bfloat16,
    ``residual_dtype=None``, eager attention as ``from_pretrained``)."""
    a = build(folder, dtype="float32", attn_implementation="eager", gradient_checkpointing=False, residual_dtype=None)
    b = QLoRAModel.from_pretrained(folder, lora=LORA)
    assert_same_model(a, b)
    assert torch.equal(a(IDS), b(IDS))
    assert a.tokenizer is not None and a.tokenizer.encode("ab") == b.tokenizer.encode("ab")


def test_sharded_folder_and_stored_4bit_folder(folder, tmp_path):
    """Shards listed in model.safetensors.index.json are read one tensor at a time; a bitsandbytes 4-bit folder
    (``qlora quantize``) keeps its stored codes (nothing re-quantized)."""
    from qlora_ref.export import quantize_hf_folder

    sharded = tmp_path / "sharded"
    write_tiny_model(tmp_path / "same").save_pretrained(sharded, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert_same_model(build(sharded), build(folder))

    quantize_hf_folder(folder, tmp_path / "q4")
    q4 = build(tmp_path / "q4", dtype="float32", attn_implementation="eager", gradient_checkpointing=False,
               residual_dtype=None)
    ref = QLoRAModel.from_pretrained(tmp_path / "q4", lora=LORA)
    assert_same_model(q4, ref)
    assert torch.equal(q4(IDS), ref(IDS))


def test_at_most_one_linear_is_held_in_float_while_building(folder, monkeypatch):
    """The paper's memory claim rests on this: each float weight is dropped before the next is read."""
    alive: list[weakref.ref] = []
    from_weight = QLoRALinear.from_weight.__func__

    def watched(cls, W, *args, **kwargs):
        assert all(r() is None for r in alive), "an earlier float weight is still alive"
        alive.append(weakref.ref(W))
        return from_weight(cls, W, *args, **kwargs)

    monkeypatch.setattr(QLoRALinear, "from_weight", classmethod(watched))
    build(folder)
    build(TINY)
    assert len(alive) == 7 * (2 + TINY.num_hidden_layers)


# ---------------------------------------------------------------------------------------------- config alone
def test_config_alone_is_deterministic_and_drawn_with_init_std():
    a, b = build(TINY, seed=3), build(TINY, seed=3)
    assert_same_model(a, b)
    w = a.named_linears()["model.layers.1.mlp.down_proj"].merge()  # dequantized (+ B A = 0 at init)
    n = w.numel()
    # NF4 keeps the spread up to its quantization error (~0.07 absmax-relative); sample std error ~ 1/sqrt(2n)
    assert abs(float(w.std()) / 0.02 - 1) < 0.1 + 5 / np.sqrt(2 * n)
    c = build(TINY, seed=4)
    assert not torch.equal(c.named_linears()["model.layers.0.self_attn.q_proj"].weight,
                           a.named_linears()["model.layers.0.self_attn.q_proj"].weight)
    for name, p in a.hf.named_parameters():
        if "norm" in name:
            assert p.dtype == torch.float32 and bool((p == 1).all()), name


def test_init_weight_depends_on_name_and_seed_only():
    x = init_weight("model.layers.0.mlp.up_proj.weight", (8, 16), 0.5, seed=1)
    assert torch.equal(x, init_weight("model.layers.0.mlp.up_proj.weight", (8, 16), 0.5, seed=1))
    assert not torch.equal(x, init_weight("model.layers.1.mlp.up_proj.weight", (8, 16), 0.5, seed=1))
    assert not torch.equal(x, init_weight("model.layers.0.mlp.up_proj.weight", (8, 16), 0.5, seed=2))
    assert init_weight("w", (4,), 1.0, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["ModelConfig", "transformers", "dict", "folder"])
def test_every_kind_of_config_input_gives_the_same_config(folder, kind):
    import transformers

    raw = json.loads((folder / "config.json").read_text())
    expected = model_config(folder)
    given = {"ModelConfig": expected, "transformers": transformers.LlamaConfig(**raw), "dict": raw,
             "folder": str(folder)}[kind]
    assert model_config(given) == expected


def test_a_malformed_config_json_is_named_as_the_reference_names_it(tmp_path):
    """The GPU backend reads a folder's config.json through the reference's reader: the same error, naming the file
    (not json's bare "Expecting property name ...")."""
    from qlora_ref.model.loading import load_model

    bad = tmp_path / "bad"
    bad.mkdir()
    for text, expected in (("{bad", "not valid JSON (Expecting property name"), ("[]", "expected a JSON object")):
        (bad / "config.json").write_text(text)
        with pytest.raises(CheckpointError) as gpu:
            model_config(bad)
        with pytest.raises(CheckpointError) as ref:
            load_model(bad)
        assert str(gpu.value) == str(ref.value) and str(gpu.value).startswith(f"{bad / 'config.json'}: {expected}")


@pytest.mark.parametrize("name,hidden,layers", [("7b", 4096, 32), ("llama-13b", 5120, 40), ("33B", 6656, 60),
                                                ("65b", 8192, 80)])
def test_llama_sizes(name, hidden, layers):
    cfg = llama_config(name)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (hidden, layers, 32000)
    assert model_config(name) == cfg


# ---------------------------------------------------------------------------------------------- training setup
def test_training_setup_float32_stream_bfloat16_products(folder):
    """The standard stack's arithmetic (issue 36): bfloat16 embedding and head, a float32 residual stream, norms
    computing in float32 and handing bfloat16 to the products, the projections reading float32 inputs there
    returning float32 (their adapters added in float32), attention in bfloat16, o_proj returning bfloat16."""
    m = build(folder)
    assert m.hf.model.embed_tokens.weight.dtype == torch.bfloat16
    assert m.hf.lm_head.weight.dtype == torch.bfloat16
    seen = {}

    def record(name):
        def hook(mod, args, out):
            out = out[0] if isinstance(out, tuple) else out
            seen[name] = (args[0].dtype if args else None, out.dtype)
        return hook

    layer = m.hf.model.layers[0]
    for name, mod in [("embed", m.hf.model.embed_tokens), ("norm", layer.input_layernorm),
                      ("q", layer.self_attn.q_proj), ("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj),
                      ("final_norm", m.hf.model.norm), ("head", m.hf.lm_head)]:
        mod.register_forward_hook(record(name))
    m(IDS)
    f32, bf16 = torch.float32, torch.bfloat16
    assert seen["embed"][1] == f32
    assert seen["norm"] == (f32, bf16) and seen["q"] == (bf16, f32) and seen["o"] == (bf16, bf16)
    assert seen["down"] == (f32, f32) and seen["final_norm"] == (f32, bf16) and seen["head"] == (bf16, bf16)
    assert all(p.dtype == torch.float32 for n, p in m.hf.named_parameters() if "norm" in n)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in m.lora_parameters().values())
    # residual_dtype=None: the stream in the embedding's bfloat16, every output rounded there (as before issue 36)
    old = build(folder, residual_dtype=None)
    seen.clear()
    old.hf.model.layers[0].mlp.down_proj.register_forward_hook(record("down"))
    old(IDS)
    assert seen["down"] == (bf16, bf16)
    with pytest.raises(ValueError, match="residual_dtype"):
        build(folder, residual_dtype="int8")


def test_bfloat16_adapters_train_in_bfloat16(folder):
    """The paper's scripts keep the adapters in bfloat16: so are their gradients; the initial values are the
    float32 ones rounded once."""
    a, b = build(folder, adapter_dtype="bfloat16"), build(folder)
    pa, pb = a.lora_parameters(), b.lora_parameters()
    for k in pa:
        assert pa[k].dtype == torch.bfloat16 and torch.equal(pa[k], pb[k].to(torch.bfloat16)), k
    a(IDS).float().logsumexp(-1).mean().backward()
    assert all(g.dtype == torch.bfloat16 for g in a.lora_grads().values())


def test_checkpointing_changes_no_gradient(folder):
    """Non-reentrant checkpointing with LoRA dropout: loss and every LoRA gradient bit-identical."""
    lora = LoraConfig(r=4, alpha=8.0, dropout=0.1)
    grads = []
    for ckpt in (False, True):
        m = build(folder, lora=lora, gradient_checkpointing=ckpt)
        logits = m(IDS)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], IDS[0, 1:])
        loss.backward()
        grads.append((loss.detach(), {k: v.clone() for k, v in m.lora_grads().items()}))
    assert torch.equal(grads[0][0], grads[1][0])
    for k in grads[0][1]:
        assert torch.equal(grads[0][1][k], grads[1][1][k]), k


def test_float_weights_without_quantization_and_without_adapters(folder):
    m = build(folder, quant=None, lora=None, dtype="float32")
    assert not any(lin.quantized for lin in m.named_linears().values())
    assert not m.lora_parameters()
    assert torch.isfinite(m(IDS)).all()


def test_fused_kernel_option_reaches_every_linear(folder):
    """``kernel="triton"`` (opt-in) is set on every block linear and gives the same loss as the default path within
    the bfloat16 bound of a layer (Triton's interpreter on CPU, float32 compute: summation order only)."""
    pytest.importorskip("triton")
    quant = QuantConfig(compute_dtype="float32")
    a = build(folder, quant=quant, dtype="float32", kernel="triton")
    b = build(folder, quant=quant, dtype="float32")
    assert {lin.kernel for lin in a.named_linears().values()} == {"triton"}
    assert {lin.kernel for lin in b.named_linears().values()} == {"bnb"}
    la, lb = a(IDS[:, :6]).detach(), b(IDS[:, :6]).detach()
    # float32: the same products summed in another order; a dot of K <= 96 terms may differ by K·u of its terms'
    # magnitude (u = 2^-24), and about 8 such products chain from the embedding to a logit (2 blocks + head)
    bound = 8 * 96 * 2.0**-24 * float(lb.abs().max())
    assert float((la - lb).abs().max()) <= bound


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("model,match", [(42, "model must be"), ("99b", "llama-7b"), ("nonexistent/folder", "llama-")])
def test_bad_model_argument_is_named(model, match):
    with pytest.raises(ValueError, match=match):
        prepare_model(model)


def test_bad_options_are_named(folder, tmp_path):
    with pytest.raises(ValueError, match="^dtype"):
        build(folder, dtype="float8")
    with pytest.raises(ValueError, match="adapter_dtype"):
        build(folder, adapter_dtype="int8")
    with pytest.raises(ValueError, match="kernel"):
        build(folder, kernel="cutlass")
    with pytest.raises(ValueError, match="attn_implementation"):
        build(folder, attn_implementation="magic")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        build(tmp_path / "empty")


def test_missing_or_misshapen_tensor_is_reported_before_building(folder, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    monkeypatch.setattr(QLoRALinear, "from_weight", None)  # nothing may be built before the check
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        build(broken)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"shape \(3, 3\)"):
        build(broken)


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_adapters_are_built_where_the_flat_optimizer_binds_them(adapter_dtype):
    """Every adapter is built in one buffer, laid out as ``qlora_gpu.optim``'s flat buffer lays them out: binding
    the optimizer moves nothing (no second copy of the adapters at the first step, 3.2 GB at 65B) and changes no
    value. r=3 leaves gaps between the adapters (512-byte aligned starts)."""
    m = prepare_model(TINY, lora=LoraConfig(r=3, alpha=8.0), device="cpu", adapter_dtype=adapter_dtype,
                      progress=False, tokenizer=False)
    params = m.lora_parameters()
    before = {k: p.detach().clone() for k, p in params.items()}
    ptrs = [p.data_ptr() for p in params.values()]
    assert len({p.untyped_storage().data_ptr() for p in params.values()}) == 1
    opt = make_optimizer("paged_adamw", lr=1e-3)
    opt.bind(params)
    assert opt.flat and opt._flat.param.data_ptr() == ptrs[0]
    assert [p.data_ptr() for p in params.values()] == ptrs
    for k, p in params.items():
        assert p.dtype == getattr(torch, adapter_dtype) and torch.equal(p.detach(), before[k]), k
    loose = prepare_model(TINY, lora=LoraConfig(r=3, alpha=8.0), device="cpu", adapter_dtype=adapter_dtype,
                          progress=False, tokenizer=False)
    for p in loose.lora_parameters().values():  # separately allocated: bound by a copy, the same values
        p.data = p.data.clone()
    first = next(iter(loose.lora_parameters().values())).data_ptr()
    opt = make_optimizer("paged_adamw", lr=1e-3)
    opt.bind(loose.lora_parameters())
    assert opt._flat.param.data_ptr() != first
    for k, p in loose.lora_parameters().items():
        assert torch.equal(p.detach(), before[k]), k


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_binding_the_flat_optimizer_allocates_only_the_gradients():
    """On CUDA, binding the paged optimizer to prepare_model's adapters allocates their gradient buffer and
    nothing else (it held the adapters twice before: 3.2 GB above the steady state at LLaMA-65B)."""
    cfg = ModelConfig(model_type="llama", vocab_size=1000, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, head_dim=128)
    m = prepare_model(cfg, lora=LoraConfig(r=16), device="cuda", progress=False, tokenizer=False)
    params = m.lora_parameters()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    opt = make_optimizer("paged_adamw", lr=1e-3)
    opt.bind(params)
    grads = opt._flat.param.grad.numel() * opt._flat.param.grad.element_size()
    assert grads >= 4 * sum(p.numel() for p in params.values())
    assert grads <= torch.cuda.max_memory_allocated() - base < grads + 1024  # the allocator rounds to 512 bytes


@pytest.mark.gpu
def test_peak_memory_while_building_is_one_linear_above_the_result():
    """A config with many layers: the peak while building exceeds the final footprint by at most the transient
    of one linear (its float32 copy and the packed result, < 8 bytes per weight: the finite check is a reduction,
    ``torch.isfinite`` held 10 bytes per weight), far below the 16-bit model."""
    cfg = ModelConfig(model_type="llama", vocab_size=1000, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=8, head_dim=128)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    m = prepare_model(cfg, lora=LoraConfig(r=8), device="cuda", progress=False)  # small adapters: ~10 MB of 130
    final = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    largest = max(lin.in_features * lin.out_features for lin in m.named_linears().values())
    linear_16bit = 2 * sum(lin.in_features * lin.out_features for lin in m.named_linears().values())
    assert peak - final <= 8 * largest
    assert peak < 0.5 * linear_16bit
    loss = m(IDS.cuda() % 1000).float().logsumexp(-1).mean()
    loss.backward()
    assert all(g is not None for g in m.lora_grads().values())


@pytest.mark.gpu
def test_cuda_build_matches_cpu_build(folder):
    """bitsandbytes' CUDA and CPU NF4 kernels give the same codes, so the model is the same wherever built."""
    a, b = build(folder, device="cuda"), build(folder, device="cpu")
    for (n, x), y in zip(a.named_linears().items(), b.named_linears().values(), strict=True):
        assert torch.equal(x.weight.cpu(), y.weight), n
        assert torch.equal(x.lora_A.cpu(), y.lora_A), n



def test_none_is_accepted_for_the_residual_dtype_alone(folder):
    """None means "the stream in ``dtype``" for ``residual_dtype`` only: for ``dtype`` and ``adapter_dtype`` it is
    refused by name before the build, like any value outside ("bfloat16", "float16", "float32"); a bad
    ``residual_dtype`` is named with its extra choice."""
    for arg in ("dtype", "adapter_dtype"):
        with pytest.raises(ValueError, match=f"^{arg} must be one of .*got None"):
            build(folder, **{arg: None})
    with pytest.raises(ValueError, match=r"^residual_dtype must be one of .* or None, got 'int8'"):
        build(folder, residual_dtype="int8")


def test_folder_build_and_reference_loader_give_every_lora_layer_the_same_dropout_seed(folder):
    """Both ways of building from a folder seed each LoRA layer's dropout generator with the reference's per-layer
    seed (``qlora_ref.model.linear.lora_seed``, distinct for every linear): with the same non-zero adapters and
    dropout, the same logits bit for bit (the same masks; a shared seed would give every layer the same masks)."""
    from qlora_ref.model.config import LINEAR_MODULES
    from qlora_ref.model.linear import lora_seed
    from qlora_ref.model.llama import module_path

    lora = LoraConfig(r=4, alpha=8.0, dropout=0.25)
    a = build(folder, lora=lora, dtype="float32", attn_implementation="eager", gradient_checkpointing=False,
              residual_dtype=None)
    b = QLoRAModel.from_pretrained(folder, lora=lora)
    layers = a.config.num_hidden_layers
    expected = {f"model.layers.{i}.{module_path(n)}": lora_seed(lora, i, n) for i in range(layers)
                for n in LINEAR_MODULES}
    assert len(set(expected.values())) == len(expected)
    assert {n: lin.seed for n, lin in a.named_linears().items()} == expected
    assert {n: lin.seed for n, lin in b.named_linears().items()} == expected
    rng = np.random.default_rng(0)
    adapters = {k: rng.standard_normal(tuple(p.shape)).astype(np.float32) * 0.1
                for k, p in a.lora_parameters().items()}
    a.load_lora_parameters(adapters)
    b.load_lora_parameters(adapters)
    assert a.training and b.training
    assert torch.equal(a(IDS), b(IDS))


def test_a_float32_head_reads_the_final_norm_in_float32(folder):
    """dtype="float32" (``load``'s default on the CPU) with bfloat16 products: the final norm hands the float32 LM
    head float32 values — x / rms(x) · w computed in float32, not rounded to bfloat16 (2⁻⁹ relative) on the way."""
    m = build(folder, dtype="float32")
    seen = {}
    m.hf.model.norm.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    logits = m(IDS)
    x, out = seen["x"], seen["out"]
    assert x.dtype == torch.float32 and out.dtype == torch.float32
    w, eps = m.hf.model.norm.weight, m.hf.model.norm.variance_epsilon
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    assert torch.allclose(out, expected, rtol=2.0**-16, atol=0)  # float32 rounding only, far below bfloat16's 2⁻⁹
    assert torch.allclose(logits, out @ m.hf.lm_head.weight.T, rtol=1e-5, atol=1e-5)


def test_init_std_defaults_to_the_configs_initializer_range_in_every_form():
    """The docstring's "init_std default: the config's initializer_range, else 0.02", for a config.json dict as
    for a transformers config (the dict's was ignored: weights drawn at 0.02 whatever it said). The same draws
    (``init_weight`` depends on name, seed and std only), so the same bits; and their spread is 0.2: 3,072 draws
    of N(0, 0.2²) have a sample std within 5 % of 0.2 at 3.9 standard errors (2^-0.5 / sqrt(3072) = 1.3 %)."""
    from transformers import LlamaConfig

    d = dict(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=48, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    from_dict, from_config = (build(c, quant=None, lora=None, dtype="float32", tokenizer=False)
                              for c in (d, LlamaConfig(**d)))
    a, b = from_dict.named_linears(), from_config.named_linears()
    for name in a:
        assert torch.equal(a[name].weight, b[name].weight), name
    w = a["model.layers.0.mlp.up_proj"].weight
    assert w.numel() == 3072 and abs(float(w.std()) / 0.2 - 1) < 0.05
