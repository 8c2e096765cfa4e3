"""qlora_gpu.optim's flat buffer: bitsandbytes' 32-bit optimizer over one contiguous tensor gives the same bits as
over the separate parameters (parameters, gradients, states, state dicts, resuming), with autograd accumulating
into the buffer; and the cases it refuses say why."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_gpu.optim import make_optimizer  # noqa: E402
from qlora_gpu.train import optimizer_step  # noqa: E402

KW = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
shapes_st = st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=2).map(tuple), min_size=1, max_size=6)


def _params(shapes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.w": torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for i, s in enumerate(shapes)}


def _train(params, opt, steps, seed, micro=1, max_norm=0.3):
    """``steps`` steps of GpuTrainer's loop: ``micro`` backward passes accumulated, then
    ``qlora_gpu.train.optimizer_step`` (clipping, step, gradients cleared); returns the gradient norms."""
    g = torch.Generator().manual_seed(seed)
    norms = []
    for _ in range(steps):
        for _ in range(micro):
            loss = sum((torch.randn(p.shape, generator=g).to(p.device, p.dtype) * p).float().pow(2).sum()
                       for p in params.values())
            loss.backward()
        norms.append(optimizer_step(opt, params, KW["lr"], max_norm))
    return norms


@settings(max_examples=max(15, settings.default.max_examples // 4), deadline=None)
@given(shapes=shapes_st, steps=st.integers(1, 4), micro=st.integers(1, 2), bind=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_flat_is_bit_identical_to_one_update_per_parameter(shapes, steps, micro, bind, dtype, seed):
    per, flat = _params(shapes, seed, dtype), _params(shapes, seed, dtype)
    o_per, o_flat = make_optimizer("paged_adamw", flat=False, **KW), make_optimizer("paged_adamw", **KW)
    if bind:  # built before the first backward (as GpuTrainer does); otherwise at the first step
        o_flat.bind(flat)
    n_per = _train(per, o_per, steps, seed + 1, micro)
    n_flat = _train(flat, o_flat, steps, seed + 1, micro)
    assert o_flat.flat and not o_per.flat
    assert n_per == n_flat
    for k in per:
        assert torch.equal(per[k], flat[k]), k
    s_per, s_flat = o_per.state_dict(), o_flat.state_dict()
    assert s_per.keys() == s_flat.keys() == {f"{k}.{s}" for k in per for s in ("step", "state1", "state2")}
    for k in s_per:
        assert torch.equal(s_per[k], s_flat[k]), k


def test_parameters_and_gradients_live_in_the_buffer():
    params = _params([(3, 4), (5,)], 0)
    opt = make_optimizer("paged_adamw", **KW)
    opt.bind(params)
    buf = opt._flat.param
    for p, view, gview in zip(params.values(), opt._flat.views, opt._flat.grad_views, strict=True):
        assert p.data_ptr() == view.data_ptr() and p.grad.data_ptr() == gview.data_ptr()
    (params["layers.0.w"].sum() * 2 + params["layers.1.w"].sum()).backward()  # autograd adds into the buffer
    # the second slice starts at the next 512-byte boundary (128 float32); the gap between stays zero
    assert torch.equal(buf.grad, torch.tensor([2.0] * 12 + [0.0] * 116 + [1.0] * 5))
    opt.step(params, {k: p.grad for k, p in params.items()})
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params.values()]),
                       torch.cat([buf.detach()[:12], buf.detach()[128:]]))
    assert not buf.detach()[12:128].any()  # a zero with a zero gradient stays zero through AdamW
    opt.zero_grad(params)
    assert not buf.grad.any() and all(p.grad is not None and not p.grad.any() for p in params.values())


@given(shapes=shapes_st, dtype=st.sampled_from([torch.float32, torch.bfloat16]))
@settings(max_examples=max(20, settings.default.max_examples // 3), deadline=None)
def test_each_slice_starts_where_a_separate_tensor_would(shapes, dtype):
    """CUDA kernels pick vectorised paths by address (``_foreach_norm`` then sums in another order): every slice
    starts on a 512-byte boundary of the buffer, in order, with gaps shorter than 512 bytes."""
    params = _params(shapes, 0, dtype)
    opt = make_optimizer("paged_adamw", **KW)
    opt.bind(params)
    base, size = opt._flat.param.data_ptr(), opt._flat.param.element_size()
    end = 0
    for p in params.values():
        offset = (p.data_ptr() - base) // size
        assert (p.data_ptr() - base) % 512 == 0 and 0 <= (offset - end) * size < 512
        end = offset + p.numel()
    assert end == opt._flat.param.numel()


def test_state_dicts_move_between_flat_and_per_parameter_optimizers():
    """A checkpoint of either kind resumes in the other with the same bits."""
    shapes = [(6, 7), (2,), (9, 3)]
    for src_flat in (False, True):
        a = _params(shapes, 1)
        o_a = make_optimizer("paged_adamw", flat=src_flat, **KW)
        _train(a, o_a, 2, 5)
        b = {k: torch.nn.Parameter(v.detach().clone()) for k, v in a.items()}
        o_b = make_optimizer("paged_adamw", flat=not src_flat, **KW)
        o_b.load_state_dict(o_a.state_dict())  # before o_b knows its parameters: kept until built
        _train(a, o_a, 2, 9)
        _train(b, o_b, 2, 9)
        assert o_b.flat is not src_flat
        for k in a:
            assert torch.equal(a[k], b[k]), (src_flat, k)


@pytest.mark.parametrize("name, flat", [("paged_adamw", True), ("paged_adamw", False), ("adamw_8bit", False)])
def test_a_state_in_another_layout_of_bitsandbytes_is_refused_by_name(name, flat):
    """A checkpoint whose optimizer keys are not those bitsandbytes reads (a release that renamed ``state1``)
    is refused naming the key and what the state holds, not with a bare KeyError inside bitsandbytes' step."""
    shapes = [(64, 80), (2,)]
    kw = dict(KW, min_8bit_size=1000) if "8bit" in name else dict(KW, flat=flat)
    a = _params(shapes, 1)
    o_a = make_optimizer(name, **kw)
    _train(a, o_a, 1, 5)
    renamed = {k.replace(".state1", ".exp_avg"): v for k, v in o_a.state_dict().items()}
    o_b = make_optimizer(name, **kw)
    b = {k: torch.nn.Parameter(v.detach().clone()) for k, v in a.items()}
    with pytest.raises(ValueError, match=r"the loaded optimizer state holds \[.*'exp_avg'.*\], where \w+ of "
                                         r"this bitsandbytes reads .*'state1'.*resume with the bitsandbytes that"):
        o_b.load_state_dict(renamed)
        _train(b, o_b, 1, 6)


def test_a_parameter_given_new_storage_is_adopted_with_its_values():
    params = _params([(4, 4)], 2)
    opt = make_optimizer("paged_adamw", **KW)
    _train(params, opt, 1, 0)
    p = params["layers.0.w"]
    p.data = torch.full((4, 4), 3.0)  # e.g. module.to(...) after the optimizer was built
    p.grad = torch.ones(4, 4)
    opt.step(params, {"layers.0.w": p.grad})
    assert p.data_ptr() == opt._flat.views[0].data_ptr()
    assert (p.detach() < 3.0).all() and (p.detach() > 2.9).all()  # updated from 3.0, not from the old values
    p.data = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="build a new optimizer"):
        opt.step(params, {"layers.0.w": torch.ones(2, 2)})


def test_what_a_flat_optimizer_refuses():
    params = _params([(3, 3), (2,)], 3)
    opt = make_optimizer("paged_adamw", **KW)
    with pytest.raises(ValueError, match=r"no gradient for \['layers.1.w'\]"):
        opt.step(params, {"layers.0.w": torch.ones(3, 3), "layers.1.w": None})
    with pytest.raises(ValueError, match="gradient of 'layers.0.w' has shape"):
        opt.step(params, {"layers.0.w": torch.ones(9), "layers.1.w": torch.ones(2)})
    with pytest.raises(ValueError, match="elementwise 32-bit"):
        make_optimizer("adamw_8bit", flat=True)
    with pytest.raises(ValueError, match="max_unorm"):
        make_optimizer("paged_adamw", flat=True, max_unorm=1.0)
    assert not make_optimizer("paged_adamw", max_unorm=1.0)._flat_wanted
    with pytest.raises(ValueError, match="flat must be"):
        make_optimizer("paged_adamw", flat="yes")
    mixed = {"a": torch.nn.Parameter(torch.ones(2)), "b": torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))}
    with pytest.raises(ValueError, match="one device with one dtype"):
        make_optimizer("paged_adamw", flat=True).bind(mixed)
    auto = make_optimizer("paged_adamw")
    auto.bind(mixed)
    assert not auto.flat  # automatic: falls back to one state per parameter
    partial = make_optimizer("paged_adamw", **KW)
    partial.bind(params)
    with pytest.raises(ValueError, match="every parameter at one step"):
        partial.load_state_dict({"layers.0.w.step": torch.tensor(1), "layers.0.w.state1": torch.zeros(3, 3),
                                 "layers.0.w.state2": torch.zeros(3, 3)})


def test_over_the_kernels_element_limit_falls_back(monkeypatch):
    import qlora_gpu.optim as optim

    monkeypatch.setattr(optim, "FLAT_MAX_NUMEL", 10)
    params = _params([(3, 3), (2,)], 4)
    auto = make_optimizer("paged_adamw", **KW)
    auto.bind(params)
    assert not auto.flat
    with pytest.raises(ValueError, match="in one launch"):
        make_optimizer("paged_adamw", flat=True, **KW).bind(_params([(3, 3), (2,)], 4))


@pytest.mark.gpu
def test_flat_on_cuda_is_bit_identical_and_paged():
    """On the GPU bitsandbytes' CUDA kernel and its managed (paged) state buffers: the flat buffer's state is
    paged, and the parameters and states equal the per-parameter loop's bit for bit."""
    shapes = [(64, 4096), (4096, 64), (3, 5), (64, 11008)]
    per = {k: torch.nn.Parameter(v.detach().cuda()) for k, v in _params(shapes, 7).items()}
    flat = {k: torch.nn.Parameter(v.detach().clone()) for k, v in per.items()}
    o_per, o_flat = make_optimizer("paged_adamw", flat=False, **KW), make_optimizer("paged_adamw", **KW)
    o_flat.bind(flat)
    assert _train(per, o_per, 3, 8) == _train(flat, o_flat, 3, 8)
    assert o_flat.flat and o_flat.torch_optimizer.state[o_flat._flat.param]["state1"].is_paged
    for k in per:
        assert torch.equal(per[k], flat[k]), k
    s_per, s_flat = o_per.state_dict(), o_flat.state_dict()
    for k in s_per:
        assert torch.equal(s_per[k].cpu(), s_flat[k].cpu()), k


def test_a_gradient_computed_before_bind_is_kept():
    """bind() after a backward pass: the gradient already in ``.grad`` is copied into the flat buffer (not
    dropped), so the step is the per-parameter optimizer's, bit for bit."""
    shapes = [(3, 4), (5,)]
    per, flat = _params(shapes, 0), _params(shapes, 0)
    o_per, o_flat = make_optimizer("paged_adamw", flat=False, **KW), make_optimizer("paged_adamw", **KW)
    for params in (per, flat):
        g = torch.Generator().manual_seed(1)
        sum((torch.randn(p.shape, generator=g) * p).pow(2).sum() for p in params.values()).backward()
    before = {k: p.grad.clone() for k, p in flat.items()}
    o_flat.bind(flat)
    for k, p in flat.items():
        assert torch.equal(p.grad, before[k]), k
        assert torch.count_nonzero(p.grad) > 0, k
    assert optimizer_step(o_per, per, KW["lr"], 0.3) == optimizer_step(o_flat, flat, KW["lr"], 0.3)
    for k in per:
        assert torch.equal(per[k], flat[k]), k


@pytest.mark.parametrize("max_norm, clipped", [(0.0, False), (0.5, True)])
def test_optimizer_step_clips_to_max_grad_norm_and_zero_only_measures(max_norm, clipped):
    """``optimizer_step``'s ``max_grad_norm``: 0 measures the norm and leaves the gradients as they are (the
    reference's "no clipping"); a positive value scales them by max_norm / (norm + 1e-6). Gradients of norm 5
    (3 and 4), seen by the optimizer's step."""
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    seen = {}

    class Spy:
        def step(self, params, grads):
            seen.update({k: g.clone() for k, g in grads.items()})

    norm = optimizer_step(Spy(), {"p": p}, 1e-3, max_norm)
    assert norm == pytest.approx(5.0, rel=2**-22)
    want = torch.tensor([3.0, 4.0]) * (max_norm / (5.0 + 1e-6) if clipped else 1.0)
    assert torch.allclose(seen["p"], want, rtol=2**-21, atol=0)
    assert p.grad is None  # cleared after the step
