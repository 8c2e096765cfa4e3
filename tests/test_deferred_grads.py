"""``qlora_gpu.fast.deferred_grads``: with a flat optimizer bound, the LoRA layers write their bfloat16 adapter
gradients into one buffer and a single ``add_`` at the end of the backward pass widens and accumulates them,
where autograd launches a cast and an addition per tensor. Checked on CPU with a tiny model: the gradients are
bit-identical to autograd's (fresh and accumulated over two passes, with and without checkpointing), the operators
saved are counted exactly, and every case where it would not be AccumulateGrad's arithmetic falls back to it:
``torch.autograd.grad``, ``backward(inputs=...)``, ``create_graph``, a hook, a ``.grad`` replaced, a layer called
twice, no optimizer alive. It defers only inside ``dg.allowed()``, which GpuTrainer's step enters (the tests of the
deferral enter it too): a user's own backward pass is autograd's, and hooks on the AccumulateGrad nodes (DDP's) see
the gradients; nor without the torch internals it reads."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch.autograd.graph import get_gradient_edge
from torch.utils._python_dispatch import TorchDispatchMode

import qlora_gpu.fast.deferred_grads as dg
from qlora_gpu.lora import QLoRALinear
from qlora_gpu.lora_math import unused_input
from qlora_gpu.optim import make_optimizer
from qlora_gpu.prepare import prepare_model
from qlora_gpu.train import GpuTrainer
from qlora_ref.model.config import LoraConfig, ModelConfig
from qlora_ref.train.config import TrainConfig

TINY = ModelConfig(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
IDS = torch.arange(24)[None] * 7 % 101


class _Ops(TorchDispatchMode):
    """Counts the computing aten operators (views launch no kernel), by name."""

    def __init__(self):
        super().__init__()
        self.n = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.n[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def build(checkpointing: bool = True, device: str = "cpu"):
    """The tiny model (r = 3: gaps between the adapters in the flat buffer; a power-of-two scaling) and its flat
    optimizer, bound as GpuTrainer binds it."""
    m = prepare_model(TINY, lora=LoraConfig(r=3, alpha=12.0, dropout=0.1), device=device, dtype="bfloat16",
                      gradient_checkpointing=checkpointing, progress=False, tokenizer=False, seed=3,
                      attn_implementation="eager", fast=True)  # the fast path's layers write into the buffer
    # B = 0 at initialisation would make every ∂L/∂A zero; drawn on the CPU, the same values on either device
    m.load_lora_parameters({name: torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05
                            for name, p in m.lora_parameters().items() if "lora_B" in name})
    opt = make_optimizer("paged_adamw", lr=1e-4)
    opt.bind(m.lora_parameters())
    return m, opt


def loss_of(m, ids=IDS) -> torch.Tensor:
    ids = ids.to(m.hf.model.embed_tokens.weight.device)
    logits = m(ids)
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])


def grads(m) -> dict[str, torch.Tensor]:
    return {k: g.clone() for k, g in m.lora_grads().items()}


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _passes(monkeypatch, deferred: bool, checkpointing: bool, device: str = "cpu"):
    """Gradients after one backward pass and after a second accumulated on them (another batch), and the
    operators of the first backward pass."""
    unused_input(torch.bfloat16, torch.device(device))  # created once per process: not counted here
    with monkeypatch.context() as mp:
        if not deferred:
            mp.setattr(dg, "slot", lambda param, dtype: None)
        m, _opt = build(checkpointing, device)
        loss = loss_of(m)
        with dg.allowed():
            with _Ops() as ops:
                loss.backward()
            first = grads(m)
            loss_of(m, IDS.flip(-1)).backward()
        return first, grads(m), ops.n, m


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_deferred_gradients_are_autograds_bit_for_bit_with_fewer_operators(monkeypatch, checkpointing, device):
    first, second, ops, m = _passes(monkeypatch, True, checkpointing, device)
    first_ref, second_ref, ops_ref, _ = _passes(monkeypatch, False, checkpointing, device)
    assert_equal(first, first_ref)
    assert_equal(second, second_ref)  # accumulated: float32 grad += widened bfloat16 gradient, as AccumulateGrad
    assert any(g.abs().sum() > 0 for g in first.values())
    n = len(m.lora_parameters())
    # autograd: per adapter tensor a cast to float32 and an add_; deferred: one zeros and one add_ per pass
    assert ops_ref["_to_copy"] - ops["_to_copy"] == n
    assert ops_ref["add_"] - ops["add_"] == n - 1
    assert ops["zeros"] - ops_ref["zeros"] == 1
    assert sum(ops_ref.values()) - sum(ops.values()) == 2 * n - 2


def test_the_gaps_of_the_gradient_buffer_stay_zero():
    m, opt = build()
    with dg.allowed():
        loss_of(m).backward()
    flat = opt._flat
    mask = torch.ones(flat.param.numel(), dtype=torch.bool)
    for sl in flat.slices:
        mask[sl] = False
    assert mask.any() and not flat.param.grad[mask].any()


def _reference(checkpointing: bool = True, **backward) -> dict[str, torch.Tensor]:
    m, _opt = build(checkpointing)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dg, "slot", lambda param, dtype: None)
        loss_of(m).backward(**backward)
    return {k: g.detach() for k, g in grads(m).items()}


def _spy(monkeypatch) -> list:
    """The slots handed out (None: the gradient went to autograd)."""
    given = []
    original = dg.DeferredGrads.slot

    def slot(self, i, dtype):
        s = original(self, i, dtype)
        given.append(s)
        return s

    monkeypatch.setattr(dg.DeferredGrads, "slot", slot)
    return given


def test_autograd_grad_returns_the_gradients_and_leaves_grad_alone(monkeypatch):
    ref = _reference()
    m, _opt = build()
    given = _spy(monkeypatch)
    params = m.lora_parameters()
    with dg.allowed():
        out = torch.autograd.grad(loss_of(m), list(params.values()))
    assert given and all(s is None for s in given)
    assert_equal(dict(zip(params, out, strict=True)), ref)
    assert all(not g.any() for g in m.lora_grads().values())


def test_backward_with_inputs_leaving_some_out(monkeypatch):
    ref = _reference()
    m, _opt = build()
    given = _spy(monkeypatch)
    params = m.lora_parameters()
    some = [n for n in params if ".0." in n]
    with dg.allowed():
        loss_of(m).backward(inputs=[params[n] for n in some])
    assert all(s is None for s in given)
    got = m.lora_grads()
    for n in params:
        assert torch.equal(got[n], ref[n]) if n in some else not got[n].any(), n


# torch's advice about the cycle create_graph makes between a parameter and its gradient; this pass is the point
@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph=True:UserWarning")
def test_create_graph_a_hook_or_a_replaced_grad_fall_back(monkeypatch):
    # create_graph: some of torch's backward formulas take differentiable forms that round otherwise, so the
    # reference is autograd's create_graph pass
    with_graph = _reference(create_graph=True)
    ref = _reference()
    given = _spy(monkeypatch)
    m, _opt = build()
    with dg.allowed():
        loss_of(m).backward(create_graph=True)
    assert all(s is None for s in given)
    assert_equal({k: g.detach() for k, g in grads(m).items()}, with_graph)

    given.clear()
    m, _opt = build()
    name, p = next(iter(m.lora_parameters().items()))
    p.register_hook(lambda g: g * 2)
    with dg.allowed():
        loss_of(m).backward()
    assert all(s is None for s in given)
    assert torch.equal(m.lora_grads()[name], 2 * ref[name])

    given.clear()
    m, _opt = build()
    p = next(iter(m.lora_parameters().values()))
    p.grad = torch.zeros_like(p)  # not its slice of the flat buffer any more
    with dg.allowed():
        loss_of(m).backward()
    assert all(s is None for s in given)
    assert_equal(m.lora_grads(), ref)


def test_deferred_when_all_hold_and_not_once_the_optimizer_is_gone(monkeypatch):
    given = _spy(monkeypatch)
    m, opt = build()
    with dg.allowed():
        loss_of(m).backward()
    assert given and all(s is not None for s in given)
    given.clear()
    del opt
    m.zero_grad()
    with dg.allowed():
        loss_of(m).backward()  # the flat buffer went with its optimizer
    assert not given


def test_a_fast_layer_called_twice_in_one_pass_gets_both_contributions(monkeypatch):
    """The second gradient of the same tensor in one pass goes to autograd (its slot is taken, not overwritten);
    starting from zero, the two float32 additions commute, so the result is autograd's exactly. Through the fast
    path's layer, the one that writes into the deferred buffer (the plain layer never asks for a slot; this test
    used it until 2026-12-07 and so checked nothing of the deferral)."""
    torch.manual_seed(0)
    layer = QLoRALinear.from_weight(torch.randn(8, 6), 2, 4.0, quant_type=None, compute_dtype="bfloat16")
    layer.fast = True
    with torch.no_grad():
        layer.lora_B.normal_()
    x1, x2 = torch.randn(5, 6), torch.randn(5, 6)
    slots = []
    real_slot = dg.slot

    def spy(param, dtype):
        out = real_slot(param, dtype)
        slots.append(out is not None)
        return out

    def run(bound: bool):
        for p in (layer.lora_A, layer.lora_B):
            p.grad = None
        opt = make_optimizer("paged_adamw", lr=1e-4)
        if bound:
            opt.bind({"a": layer.lora_A, "b": layer.lora_B})
        with dg.allowed():
            (layer(x1).float().sum() + layer(x2).float().pow(2).sum()).backward()
        return layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    with monkeypatch.context() as mp:
        mp.setattr(dg, "slot", lambda param, dtype: None)
        ref = run(False)
    monkeypatch.setattr(dg, "slot", spy)
    got = run(True)
    assert slots == [True, True, False, False]  # the first backward call deferred, the second handed to autograd
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_the_nodes_are_kept_until_released_then_looked_up_in_the_next_pass(monkeypatch):
    """The AccumulateGrad nodes looked up at the first deferred pass (a lookup costs a view per tensor) are kept
    from pass to pass until ``release_nodes``; the next pass then looks up its own graph's (the nodes marked before
    are gone) and still defers. A node runs on the CUDA stream current at its creation, so
    ``qlora_gpu.fast.graphs`` releases them before its capture."""
    given = _spy(monkeypatch)
    m, _opt = build()
    params = list(m.lora_parameters().values())
    with dg.allowed():
        loss_of(m).backward()  # the first deferred pass looks the nodes up
    for p in params:
        get_gradient_edge(p).node.metadata["from_binding"] = True
    m.zero_grad(set_to_none=False)
    with dg.allowed():
        loss_of(m).backward()
    assert all("from_binding" in get_gradient_edge(p).node.metadata for p in params)  # kept
    dg.release_nodes(params)
    given.clear()
    m.zero_grad(set_to_none=False)
    with dg.allowed():
        loss_of(m).backward()
    assert given and all(s is not None for s in given)
    assert not any("from_binding" in get_gradient_edge(p).node.metadata for p in params)


def test_a_users_own_backward_is_autograds_and_node_hooks_see_the_gradients(monkeypatch):
    """Outside ``dg.allowed()`` (a user's ``loss.backward()``, DDP, accelerate) the layers return their gradients
    to autograd: a hook on a parameter's AccumulateGrad node, where DDP's reducer reads ``.grad``, sees the pass's
    gradient — deferred, it would read the zeros left until the end-of-pass addition."""
    ref = _reference()
    given = _spy(monkeypatch)
    m, _opt = build()
    seen, nodes = {}, []  # a node lives as long as something holds it, and its hooks with it

    def read_grad(name, p):
        def hook(grad_in, grad_out):  # after the node has accumulated: what DDP's reducer reads
            seen[name] = p.grad.clone()
        return hook

    for name, p in m.lora_parameters().items():
        nodes.append(get_gradient_edge(p).node)
        nodes[-1].register_hook(read_grad(name, p))
    loss_of(m).backward()
    assert not given
    assert_equal(seen, ref)
    assert_equal(grads(m), ref)
    assert any(g.abs().sum() > 0 for g in ref.values())


def _trainer_step(monkeypatch, checkpointing: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """The LoRA gradients after one ``GpuTrainer.forward_backward`` of the tiny model on the fast path, and how
    many end-of-pass additions of deferred gradients ran."""
    flushes = []
    flush = dg.DeferredGrads._flush
    monkeypatch.setattr(dg.DeferredGrads, "_flush", lambda self, low: (flushes.append(1), flush(self, low)))
    m, _opt = build()
    trainer = GpuTrainer(m, TrainConfig(lora_r=3, lora_alpha=12.0, gradient_checkpointing=checkpointing, fast=True,
                                        progress=False))
    ids = IDS.numpy()
    trainer.forward_backward(dict(input_ids=ids, attention_mask=np.ones_like(ids), labels=ids), ids.size - 1)
    return grads(m), len(flushes)


def _autograd_trainer_step(checkpointing: bool = True) -> dict[str, torch.Tensor]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dg, "slot", lambda param, dtype: None)
        return _trainer_step(mp, checkpointing)[0]


def test_the_training_step_defers(monkeypatch):
    """GpuTrainer's step owns its backward pass and enters ``dg.allowed()``: one end-of-pass addition, autograd's
    gradients bit for bit."""
    ref = _autograd_trainer_step()
    got, flushes = _trainer_step(monkeypatch)
    assert flushes == 1
    assert_equal(got, ref)
    assert any(g.abs().sum() > 0 for g in ref.values())


@pytest.mark.parametrize("name", ["_current_graph_task_id", "_will_engine_execute_node"])
def test_a_torch_without_an_internal_trains_through_autograd(monkeypatch, name):
    """A torch that renamed one of the private names read here: ``SUPPORTED`` is false at import, nothing is
    deferred and the step's gradients are autograd's (no AttributeError naming a torch internal). Without
    checkpointing: torch's own checkpoint reads ``_current_graph_task_id``."""
    ref = _autograd_trainer_step(checkpointing=False)
    monkeypatch.delattr(torch._C, name)
    monkeypatch.setattr(dg, "SUPPORTED", dg._has_internals())
    assert not dg.SUPPORTED and dg.status().startswith("off")
    got, flushes = _trainer_step(monkeypatch, checkpointing=False)
    assert flushes == 0
    assert_equal(got, ref)

