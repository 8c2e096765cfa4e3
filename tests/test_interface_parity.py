"""The two backends export one interface: the same public names with the same signatures (parameter names,
order, kinds and defaults; annotations differ by design: NumPy arrays in ``qlora_ref``, torch tensors in
``qlora_gpu``), for the top-level ``__all__`` and the main classes' public methods — except the differences listed
here, each with the reason it is intended. A name or parameter added to one backend only fails this test until it
is added to the other or listed below. Also: ``generate`` returns the same thing in both, the renamed ``kernel``
option keeps its old name working, and a model loaded without LoRA takes an adapter folder in both."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
from torch import nn

import qlora_gpu
import qlora_ref
from qlora_gpu.train import GpuTrainer
from qlora_ref.train.reference import RefTrainer

# ------------------------------------------------------------------------------------------------ intended differences
#: top-level names only the reference exports
REF_ONLY = {
    # the model class: a NumPy decoder with hand-written backward here, a transformers model on the GPU (QLoRAModel);
    # both are built by load_model, compared below as a pair
    "LlamaModel",
    # the NumPy optimizers (PagedAdamW simulates a device budget); the GPU backend runs bitsandbytes' optimizers,
    # chosen by the same names through make_optimizer (exported by both)
    "AdamW", "AdamW8bit", "PagedAdamW", "DeviceMemory",
    # backend-neutral code lives once, in qlora_ref, and serves either backend (DESIGN.md): data formatting and
    # packing, the memory calculator, the backend registry, the demo model's location
    "DataReport", "build_dataset", "collate_packed", "iterate_batches", "iterate_packed_batches", "load_examples",
    "pack_examples", "estimate_memory", "load_model_shape", "available_backends", "load_backend", "find_smollm2_gguf",
}
#: top-level names only the GPU backend exports
GPU_ONLY = {
    "QLoRAModel",  # see LlamaModel
    # building a large model layer by layer on the device, from a folder or a config alone (docs/scale.md); the
    # reference loads whole checkpoints (load_model)
    "prepare_model", "init_weight", "llama_config", "model_config",
    "load",  # the CLI's entry (the paper's QuantConfig and LoraConfig by default); load_model is the common one
    # CUDA graphs: host time is a GPU matter
    "GraphedStep", "check_capturable",
    "optimizer_step",  # one clip + step over torch gradients; the reference's optimizers step on (params, grads)
}
#: per callable: parameters only one backend takes (any position), and defaults that differ on purpose
PARAMETERS = {
    # the layer: the reference's "tile" sizes its fused Numba product and "matmul" is the deprecated name of
    # "kernel"; on the GPU, "device" places the weights and "out_dtype" widens the output into a float32 residual
    # stream (docs/training.md); each backend's default kernel is its own (KERNELS)
    "QLoRALinear": dict(ref={"tile", "matmul"}, gpu={"device", "out_dtype"}, defaults={"kernel"}),
    "QLoRALinear.from_weight": dict(ref={"tile", "matmul"}, gpu={"device", "out_dtype"}, defaults={"kernel"}),
    "QLoRALinear.from_quantized": dict(ref={"tile", "matmul"}, gpu={"device", "out_dtype"}, defaults={"kernel"}),
    # "device" and the options of prepare_model (attn_implementation, dtype, ...) exist on the GPU only
    "load_model": dict(gpu={"device", "options"}, defaults={"kernel"}),
    "finetune": dict(defaults={"backend"}),  # each package trains on itself by default
    "merge_adapter": dict(defaults={"backend"}),  # and merges and evaluates on itself
    "evaluate_model": dict(defaults={"backend"}),
    # the reference's quantizers also run their readable NumPy definition (kernel="numpy")
    "quantize_4bit": dict(ref={"kernel"}),
    "dequantize_4bit": dict(ref={"kernel"}),
    # the reference passes every option to its optimizer class; the GPU names bitsandbytes' common ones
    "make_optimizer": dict(gpu={"lr", "betas", "eps", "weight_decay"}),
    # the KV cache is the reference's own; on the GPU transformers' cache runs inside generate, and forward takes
    # transformers' attention_mask
    "model.forward": dict(ref={"kv_cache", "last_only"}, gpu={"attention_mask"}),
    "model.hidden_states": dict(ref={"kv_cache"}, gpu={"attention_mask"}),
}

#: public methods and properties of the main classes that only one backend has
METHODS = {
    "model": dict(
        # hand-written backprop and its caches (torch autograd on the GPU); the reference's KV cache; its way to
        # build from tensors (the GPU model is built from a reference model: from_reference, from_pretrained)
        ref={"backward", "backward_hidden", "clear_cache", "new_kv_cache", "from_weights"},
        # activation offload (pinned host memory); the construction paths through the reference and transformers;
        # export helpers the reference has as functions of qlora_ref.adapters (base_float_weights,
        # merge_and_export, reading lora_parameters directly); lm_head_weight is an attribute in the reference;
        # chunked_nll_sum: one method from embedding to loss that FSDP2 can gather for (the reference's chunked
        # loss is its trainer's)
        gpu={"activation_offload", "assemble", "from_pretrained", "from_reference", "base_float_weights",
             "merge_and_export", "lora_state_numpy", "lm_head_weight", "chunked_nll_sum"},
    ),
    "QLoRALinear": dict(
        # the hand-written backward, its cache, the dequantized weight it multiplies by; merged_layer; the
        # deprecated name of kernel. kernel, lora_A and lora_B are instance attributes on the GPU (checked below)
        ref={"backward", "clear_cache", "dequantized_weight", "merged_layer", "matmul", "kernel", "lora_A", "lora_B"},
        # the frozen weight as bitsandbytes holds it, out_dtype as a torch dtype, and the dropout mask its decoder
        # block drew for it (qlora_gpu.model.draw_block_masks: one draw per block)
        gpu={"frozen_weight", "out_torch_dtype", "quant_type", "quantized", "stage_mask", "staged_mask", "unstage"},
    ),
    "trainer": dict(ref=set(), gpu={"from_pretrained"}),  # the reference's is built by make_trainer only
    # the GPU state holds torch tensors and moves between devices and to bitsandbytes' QuantState (in the form its
    # matmul_4bit computes: for_matmul_4bit)
    "Quantized4bit": dict(ref=set(), gpu={"device", "for_matmul_4bit", "from_bnb", "to", "to_bnb"}),
}

CLASSES = {
    "model": (qlora_ref.LlamaModel, qlora_gpu.QLoRAModel),
    "QLoRALinear": (qlora_ref.QLoRALinear, qlora_gpu.QLoRALinear),
    "trainer": (RefTrainer, GpuTrainer),
    "Quantized4bit": (qlora_ref.Quantized4bit, qlora_gpu.Quantized4bit),
}


# ------------------------------------------------------------------------------------------------ helpers
def parameters(fn, skip: set) -> list[tuple]:
    """(name, kind, default) of ``fn``'s parameters without ``self`` and the names in ``skip``."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()
            if p.name not in skip and p.name != "self"]


def assert_same_signature(label: str, ref_fn, gpu_fn) -> None:
    allowed = PARAMETERS.get(label, {})
    ref_names = set(inspect.signature(ref_fn).parameters)
    gpu_names = set(inspect.signature(gpu_fn).parameters)
    for side, names in (("ref", ref_names), ("gpu", gpu_names)):
        listed = allowed.get(side, set())
        assert listed <= names, f"{label}: listed {side}-only parameters {sorted(listed - names)} do not exist"
    ref = parameters(ref_fn, allowed.get("ref", set()))
    gpu = parameters(gpu_fn, allowed.get("gpu", set()))
    differing = allowed.get("defaults", set())
    strip = lambda ps: [(n, k, None if n in differing else d) for n, k, d in ps]  # noqa: E731
    assert strip(ref) == strip(gpu), f"{label}:\n  qlora_ref {ref}\n  qlora_gpu {gpu}"
    for name in differing:
        assert dict((n, d) for n, _, d in ref)[name] != dict((n, d) for n, _, d in gpu)[name], \
            f"{label}: the default of {name} is listed as differing but is the same: remove it from the list"


def public(cls) -> set[str]:
    """Public names a class defines or inherits, nn.Module's included (train, eval, forward, zero_grad ... are
    there in both); object's left out."""
    return {n for n in dir(cls) if not n.startswith("_")} - {n for n in dir(object) if not n.startswith("_")}


# ------------------------------------------------------------------------------------------------ names
def test_top_level_names_are_the_same_up_to_the_listed_differences():
    ref, gpu = set(qlora_ref.__all__), set(qlora_gpu.__all__)
    assert ref - gpu == REF_ONLY, "update REF_ONLY (with the reason) or export the name from qlora_gpu too"
    assert gpu - ref == GPU_ONLY, "update GPU_ONLY (with the reason) or export the name from qlora_ref too"
    for package in (qlora_ref, qlora_gpu):
        missing = [n for n in package.__all__ if not hasattr(package, n)]
        assert not missing, f"{package.__name__}.__all__ names what it does not define: {missing}"


def test_shared_top_level_names_have_the_same_signatures():
    shared = sorted(set(qlora_ref.__all__) & set(qlora_gpu.__all__))
    checked = 0
    for name in shared:
        a, b = getattr(qlora_ref, name), getattr(qlora_gpu, name)
        if a is b or not callable(a) or inspect.isclass(a) and name != "QLoRALinear":
            continue  # the same object (configs, shared functions), a constant, or a class compared below
        assert callable(b), f"{name} is callable in qlora_ref only"
        assert_same_signature(name, a, b)
        checked += 1
    assert checked >= 10  # quantizers, codebook, load_model, finetune, set_kernel, QLoRALinear, ...
    assert qlora_ref.LoraConfig is qlora_gpu.LoraConfig and qlora_ref.TrainConfig is qlora_gpu.TrainConfig


@pytest.mark.parametrize("label", sorted(CLASSES))
def test_main_classes_have_the_same_public_methods(label):
    ref_cls, gpu_cls = CLASSES[label]
    ref, gpu = public(ref_cls), public(gpu_cls)
    if issubclass(gpu_cls, nn.Module):  # torch's methods the reference has no counterpart for are not interface
        gpu -= public(nn.Module) - ref
    allowed = METHODS[label]
    assert ref - gpu == allowed["ref"], f"{label}: update METHODS (with the reason) or add the method to qlora_gpu"
    assert gpu - ref == allowed["gpu"], f"{label}: update METHODS (with the reason) or add the method to qlora_ref"
    for name in sorted(ref & gpu):
        a, b = inspect.getattr_static(ref_cls, name), inspect.getattr_static(gpu_cls, name)
        if isinstance(a, property) or isinstance(b, property):
            continue
        a, b = getattr(ref_cls, name), getattr(gpu_cls, name)
        if getattr(nn.Module, name, None) is b:  # torch's own (train, eval, zero_grad, parameters: torch's meaning)
            continue
        if callable(a) and callable(b) and a is not b:
            assert_same_signature(f"{label}.{name}", a, b)


def test_the_gpu_layer_has_the_reference_layers_attributes():
    """kernel, lora_A and lora_B are instance attributes of the GPU layer (an nn.Module's parameters)."""
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    layer = qlora_gpu.QLoRALinear.from_weight(w, 4, 8.0)
    assert layer.kernel in qlora_gpu.KERNELS and tuple(layer.lora_A.shape) == (4, 64)
    assert tuple(layer.lora_B.shape) == (64, 4)


@pytest.mark.parametrize("dtype", ["float16", "float64", "bfloat16"])
def test_the_layers_output_dtype_is_the_documented_difference(dtype):
    """docs/api.md (QLoRALinear): the reference returns float32 whatever the input's dtype (NumPy has no bfloat16),
    the GPU layer the input's dtype. The values are the layers' agreement (tests/test_lora_backends.py); here only
    a sanity bound: one rounding to the output dtype plus one bfloat16 ulp of the compute, 2^-7 of the largest."""
    import torch

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    ref, gpu = qlora_ref.QLoRALinear.from_weight(w, 4, 8.0), qlora_gpu.QLoRALinear.from_weight(w, 4, 8.0)
    x = torch.from_numpy(rng.standard_normal((3, 128))).to(getattr(torch, dtype))
    y_ref = ref.forward(x.float().numpy() if dtype == "bfloat16" else x.numpy())
    y_gpu = gpu(x).detach()
    assert y_ref.dtype == np.float32 and y_gpu.dtype == x.dtype
    diff = np.abs(y_ref - y_gpu.float().numpy()).max()
    assert diff <= 2**-7 * np.abs(y_ref).max()


# ------------------------------------------------------------------------------------------------ behaviour
@pytest.mark.parametrize("package", [qlora_ref, qlora_gpu], ids=["reference", "torch_backend"])
def test_both_layers_take_the_same_weight_dtypes(package):
    """A float64 weight is refused for quantization by both layers, naming ``W`` (qlora_gpu converted a float64
    NumPy array to float32 silently, the reference refused it naming ``x``); kept unquantized, both take it."""
    W = np.random.default_rng(0).standard_normal((64, 64))
    with pytest.raises(ValueError, match="^W must be float32, float16 or bfloat16, got dtype float64"):
        package.QLoRALinear.from_weight(W, 4)
    assert package.QLoRALinear.from_weight(W, 4, quant_type=None) is not None
    assert package.QLoRALinear.from_weight(W.astype(np.float32), 4) is not None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from model_helpers import small_hf_model

    path = tmp_path_factory.mktemp("parity")
    small_hf_model("llama-gqa").save_pretrained(path)
    return path


def test_generate_returns_the_prompt_and_the_new_ids_in_both_backends(checkpoint):
    """transformers' convention: the prompt's ids, then the new ones; stream sees the new ones only."""
    prompt = [3, 14, 15, 9, 2, 6]
    outs, streams = {}, {}
    for name, package in (("ref", qlora_ref), ("gpu", qlora_gpu)):
        model = package.load_model(checkpoint, device="cpu") if name == "gpu" else package.load_model(checkpoint)
        streams[name] = []
        outs[name] = model.generate(prompt, max_new_tokens=5, eos_token_id=[], stream=streams[name].append)
        assert isinstance(outs[name], list) and outs[name][:len(prompt)] == prompt
        assert len(outs[name]) == len(prompt) + 5 and streams[name] == outs[name][len(prompt):]
    assert outs["ref"] == outs["gpu"]  # float32 weights, greedy: the same tokens


@pytest.mark.parametrize("temperature, top_p", [(5.0, 1.0), (3.0, 0.95), (0.7, 0.5)])
def test_both_backends_sample_from_the_same_distribution(checkpoint, monkeypatch, temperature, top_p):
    """The first sampled token's distribution on the torch backend (what transformers hands torch.multinomial)
    is the reference's softmax(logits / temperature) after its top-p filter, support and values: nothing of
    transformers' defaults is added (its top_k=50 cut the 97-token nucleus to 50 tokens)."""
    import torch

    from qlora_ref.model.generate import top_p_filter

    prompt = [3, 14, 15, 9, 2, 6]
    ref = qlora_ref.load_model(checkpoint)
    z = np.asarray(ref.forward(np.array([prompt]))[0, -1], dtype=np.float64) / temperature
    expected = top_p_filter(np.exp(z - z.max()) / np.exp(z - z.max()).sum(), top_p)
    seen = []
    multinomial = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, *a, **k: seen.append(p.detach().clone()) or
                        multinomial(p, *a, **k))
    qlora_gpu.load_model(checkpoint, device="cpu").generate(prompt, max_new_tokens=1, temperature=temperature,
                                                            top_p=top_p, eos_token_id=[], seed=0)
    got = seen[0].double().numpy().reshape(-1)
    assert np.array_equal(got > 0, expected > 0), (int((got > 0).sum()), int((expected > 0).sum()))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_a_temperature_too_small_to_sample_is_refused_by_both_backends(checkpoint):
    """Below 1e-4 sampling is greedy up to rounding, and transformers' float32 logits / temperature overflow on the
    torch backend (1e-300 was a RuntimeError inside torch.multinomial there, greedy in the reference)."""
    for model in (qlora_ref.load_model(checkpoint), qlora_gpu.load_model(checkpoint, device="cpu")):
        for temperature in (1e-300, 5e-324, 9.9e-5):
            with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or at least 0\.0001"):
                model.generate([3, 14], max_new_tokens=1, temperature=temperature)
        assert len(model.generate([3, 14], max_new_tokens=2, temperature=1e-4, seed=0)) == 4


def test_kernel_is_the_option_of_both_backends_and_matmul_still_works():
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    assert qlora_ref.KERNELS == ("fused", "naive") and qlora_gpu.KERNELS == ("bnb", "triton")
    layer = qlora_ref.QLoRALinear.from_weight(w, 4, 8.0, kernel="naive")
    assert layer.kernel == "naive"
    with pytest.warns(DeprecationWarning, match="matmul option is now named kernel"):
        old = qlora_ref.QLoRALinear.from_weight(w, 4, 8.0, matmul="naive")
    assert old.kernel == "naive"
    with pytest.warns(DeprecationWarning, match="now named kernel"):
        assert old.matmul == "naive"
    with pytest.warns(DeprecationWarning, match="now named kernel"):
        old.matmul = "fused"
    assert old.kernel == "fused"
    with pytest.warns(DeprecationWarning, match="MATMUL_PATHS is now KERNELS"):
        from qlora_ref.lora import MATMUL_PATHS
    assert MATMUL_PATHS == qlora_ref.KERNELS
    with pytest.raises(ValueError, match=r"kernel must be one of \('fused', 'naive'\), got 'bnb'"):
        layer.kernel = "bnb"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns nothing
        qlora_ref.QLoRALinear(w, 4, 8.0, kernel="fused")


def test_set_kernel_switches_every_layer_in_both_backends(checkpoint):
    ref = qlora_ref.load_model(checkpoint, kernel="naive")
    assert {m.kernel for m in ref.named_linears().values()} == {"naive"}
    assert qlora_ref.set_kernel(ref, "fused") == len(ref.named_linears())
    assert {m.kernel for m in ref.named_linears().values()} == {"fused"}
    with pytest.raises(ValueError, match="kernel must be one of"):
        qlora_ref.set_kernel(ref, "triton")
    assert {m.kernel for m in ref.named_linears().values()} == {"fused"}  # unchanged
    gpu = qlora_gpu.load_model(checkpoint, device="cpu")
    assert {m.kernel for m in gpu.named_linears().values()} == {"bnb"}


@pytest.mark.parametrize("backend", ["ref", "gpu"], ids=["reference", "torch_backend"])
def test_a_model_loaded_without_lora_takes_an_adapter(checkpoint, tmp_path, backend):
    """load_adapter on a model built with lora=None builds the adapters from adapter_config.json (as transformers'
    load_adapter does), and load_model(path, adapter=DIR) does the same; the adapted model computes what the model
    that saved the adapter computes."""
    package = qlora_ref if backend == "ref" else qlora_gpu
    kw = dict(device="cpu") if backend == "gpu" else {}
    lora = qlora_ref.LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
    trained = package.load_model(checkpoint, lora=lora, **kw).eval()
    rng = np.random.default_rng(1)
    trained.load_lora_parameters({k: rng.standard_normal(tuple(v.shape)).astype(np.float32) * 0.1
                                  for k, v in trained.lora_parameters().items()})
    trained.save_adapter(tmp_path / "adapter")
    ids = np.asarray([[3, 14, 15, 9, 2, 6]])
    expected = np.asarray(trained.forward(ids).detach() if backend == "gpu" else trained.forward(ids))

    plain = package.load_model(checkpoint, **kw).eval()
    base = np.asarray(plain.forward(ids).detach() if backend == "gpu" else plain.forward(ids))
    assert not plain.lora_parameters() and plain.lora is None
    assert np.abs(base - expected).max() > 1e-3  # the adapter changes the logits: the check below can fail
    plain.load_adapter(tmp_path / "adapter")
    assert plain.lora == lora and set(plain.lora_parameters()) == set(trained.lora_parameters())
    got = plain.forward(ids)
    np.testing.assert_array_equal(np.asarray(got.detach() if backend == "gpu" else got), expected)

    direct = package.load_model(checkpoint, adapter=tmp_path / "adapter", **kw).eval()
    got = direct.forward(ids)
    np.testing.assert_array_equal(np.asarray(got.detach() if backend == "gpu" else got), expected)
    with pytest.raises(ValueError, match="already carries an adapter"):
        next(m for m in direct.named_linears().values() if m.r is not None).add_adapter(4, 8.0)


def _logits(model, ids, backend) -> np.ndarray:
    out = model.forward(ids)
    return np.asarray(out.detach() if backend == "gpu" else out)


@pytest.mark.parametrize("backend", ["ref", "gpu"], ids=["reference", "torch_backend"])
def test_the_save_adapter_function_writes_the_methods_folder(checkpoint, tmp_path, backend):
    """``package.save_adapter(model, dir)`` works on either backend's model (the GPU's adapters are trainable torch
    tensors) and writes the files ``model.save_adapter(dir)`` writes — for a model built with LoRA and for one
    loaded with ``adapter=``; both record the path the model was loaded from as its base model."""
    package = qlora_ref if backend == "ref" else qlora_gpu
    kw = dict(device="cpu") if backend == "gpu" else {}
    model = package.load_model(checkpoint, lora=qlora_ref.LoraConfig(r=4, alpha=8.0), **kw)
    rng = np.random.default_rng(2)
    model.load_lora_parameters({k: rng.standard_normal(tuple(v.shape)).astype(np.float32)
                                for k, v in model.lora_parameters().items()})
    model.save_adapter(tmp_path / "method")
    package.save_adapter(model, tmp_path / "function")
    loaded = package.load_model(checkpoint, adapter=tmp_path / "method", **kw)
    package.save_adapter(loaded, tmp_path / "resaved")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        method = (tmp_path / "method" / name).read_bytes()
        assert (tmp_path / "function" / name).read_bytes() == method, name
        assert (tmp_path / "resaved" / name).read_bytes() == method, name
    from qlora_ref.adapters import adapter_base_model, read_adapter_config

    assert read_adapter_config(tmp_path / "method")["base_model_name_or_path"] == str(checkpoint.resolve())
    assert adapter_base_model(tmp_path / "resaved") == checkpoint.resolve()
    package.save_adapter(loaded, tmp_path / "named", base_model_name_or_path="org/model")  # given: as given
    assert read_adapter_config(tmp_path / "named")["base_model_name_or_path"] == "org/model"


@pytest.mark.parametrize("backend", ["ref", "gpu"], ids=["reference", "torch_backend"])
def test_load_model_with_an_adapter_returns_an_inference_model(checkpoint, tmp_path, backend):
    """``load_model(path, adapter=DIR)`` is for inference, as peft's ``from_pretrained``: eval mode, so two direct
    forward calls give the same logits although the adapter was trained with dropout; ``model.train()`` turns the
    dropout back on. With ``lora`` given (to train on), the model stays in training mode."""
    package = qlora_ref if backend == "ref" else qlora_gpu
    kw = dict(device="cpu") if backend == "gpu" else {}
    lora = qlora_ref.LoraConfig(r=4, alpha=8.0, dropout=0.5)
    trained = package.load_model(checkpoint, lora=lora, **kw)
    rng = np.random.default_rng(3)
    trained.load_lora_parameters({k: rng.standard_normal(tuple(v.shape)).astype(np.float32)
                                  for k, v in trained.lora_parameters().items()})
    trained.save_adapter(tmp_path / "adapter")
    ids = np.asarray([[3, 14, 15, 9, 2, 6]])
    if backend == "gpu":
        import torch

        torch.manual_seed(0)
    model = package.load_model(checkpoint, adapter=tmp_path / "adapter", **kw)
    assert {m.training for m in model.named_linears().values()} == {False}
    np.testing.assert_array_equal(_logits(model, ids, backend), _logits(model, ids, backend))
    model.train()
    assert not np.array_equal(_logits(model, ids, backend), _logits(model, ids, backend))  # dropout: can fail
    to_train = package.load_model(checkpoint, lora=lora, adapter=tmp_path / "adapter", **kw)
    assert {m.training for m in to_train.named_linears().values()} == {True}


def test_lora_dropout_masks_differ_between_the_backends(tmp_path):
    """docs/training.md, "The two backends agree": the float32 curves agree to 1e-5 per step only with
    ``lora_dropout=0``; with dropout each backend draws its masks from its own stream (NumPy / torch) whatever the
    seed, so from step 2 (step 1's adapters output zero) they differ beyond 1e-5, yet within the bf16 row's 2^-8."""
    from test_train import qa_dataset, run, small_config, write_tiny_model

    from qlora_ref.train.api import load_tokenizer

    folder = tmp_path / "model"
    write_tiny_model(folder)
    train_ds = qa_dataset(load_tokenizer(folder), 48, seed=0)
    rel = {}
    for dropout in (0.0, 0.1):
        config = small_config(max_steps=4, compute_dtype="float32", double_quant=False, lora_dropout=dropout)
        a = np.array(run(folder, train_ds, config, "ref")[1].train_losses)
        b = np.array(run(folder, train_ds, config, "gpu")[1].train_losses)
        rel[dropout] = np.abs(b - a) / np.abs(a)
    assert rel[0.0].max() <= 1e-5  # the documented float32 agreement, dropout off
    assert rel[0.1][0] <= 1e-5  # step 1: lora_B is zero, the masks do not reach the loss
    assert rel[0.1][1:].max() > 1e-5  # other masks: observed ≈ 2e-4
    assert rel[0.1].max() <= 2.0**-8


def test_generate_stops_after_the_configs_eos_and_keeps_the_mode(checkpoint):
    """qlora_gpu's ``generate`` without ``eos_token_id``: the model config's eos ends generation (included, as
    transformers and the reference return it) — the greedy continuation cut after that token's first appearance.
    The model is left in the mode (eval or training) it had before."""
    import dataclasses

    prompt = [3, 14, 15, 9, 2, 6]
    model = qlora_gpu.load_model(checkpoint, device="cpu")
    for training in (False, True):
        model.train(training)
        full = model.generate(prompt, max_new_tokens=8, eos_token_id=[])
        assert model.training is training
    new = full[len(prompt):]
    k = max(i for i in range(len(new) - 1) if new[i] not in new[:i])  # not the last: 8 tokens either way
    model.config = dataclasses.replace(model.config, eos_token_id=new[k])
    assert model.generate(prompt, max_new_tokens=8) == prompt + new[:k + 1]
