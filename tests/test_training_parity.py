"""Issue 36: ``qlora_gpu`` trains as transformers + peft + bitsandbytes trains — loss curves of 50 optimizer steps
of 4 accumulated micro-batches agree — on the same tiny model, data, seed, adapters and dropout masks
(tests/parity_helpers.py says what each side runs and what is made equal).

**The tolerance.** Both sides compute in bfloat16 with float32 accumulation, as the paper does; they differ only in
where a few bfloat16 roundings fall:

1. the LoRA dropout: ours drops out the norm's output rounded to bfloat16 and rounds the product again; peft drops
   out the float32 output and autocast rounds the product once;
2. the gradients the q/k/v (gate/up) projections send back to their shared input: summed in bfloat16 by autograd
   (ours: the norm returns bfloat16), in float32 by peft's (autocast's casts return float32 gradients);
3. each projection's input gradient, frozen path plus adapter path: added in bfloat16 (ours), in float32 (peft);
4. the order of the products' float32 accumulations (torch's bfloat16 GEMM against bitsandbytes' and ours' layouts).

Training amplifies any such difference chaotically, so its effect is measured rather than bounded a priori: the
baseline is run a second time with class 1 moved to our place (its dropout rounds as ours does), and the largest
difference between its two curves, Δ₁, is the effect of one class of relocated roundings on 50 steps of this
training. Independent rounding errors add in quadrature (the probabilistic model of rounding error, Higham & Mary
2019, rather than the worst case, which adds them): four classes give |ours − baseline| <= √4 · Δ₁ = 2 Δ₁ at
every step.

**The check can fail**, and does for both causes of the divergence measured on the H200 (docs/training.md):
the reference's rounding of the adapters' contributions to bfloat16 (``residual_dtype=None``: ours as it was), and
a warmup from lr 0 (``lr_scheduler="constant_with_warmup"``: our old reading of the paper's constant schedule, which
transformers trains without warmup) each leave ours lagging the baseline by more than 2 Δ₁ within 20 steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import parity_helpers as H
import pytest
import torch

pytestmark = [pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")]

#: optimizer steps the runs showing the two causes take (their lag is there by then, docs/training.md)
SHORT = 20


@contextlib.contextmanager
def _one_thread():
    """One thread: torch's CPU kernels then sum in one order, and on a shared 2-core machine two threads wait on
    each other (10 ms per tiny GEMM)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        H.gpu_scale.cpu_setup()
        yield
    finally:
        torch.set_num_threads(threads)


def _three_runs(config, data, model_config=H.CONFIG) -> dict:
    """Ours, the baseline and the baseline with its dropout rounded as ours (Δ₁), ``config.max_steps`` each."""
    ours = H.train_ours(config, data, model_config=model_config)
    masks = H.first_calls(ours["masks"], per_micro=2)
    base = H.train_baseline(config, data, ours["init"], masks, model_config=model_config)
    base_rounded = H.train_baseline(config, data, ours["init"], masks, round_dropout_input=True,
                                    model_config=model_config)
    return dict(config=config, ours=ours, base=base, base_rounded=base_rounded)


@pytest.fixture(scope="module")
def runs():
    """``_three_runs`` of 50 steps; ours with the reference's rounding of the adapters and ours with a warmup, 20
    steps each."""
    with _one_thread():
        config, data = H.recipe_config(), H.dataset()
        old = H.train_ours(config, data, record_masks=False, stop_after=SHORT, residual_dtype=None)
        warm = H.train_ours(config.replace(lr_scheduler="constant_with_warmup"), data, record_masks=False,
                            stop_after=SHORT)
        return dict(_three_runs(config, data), old=old["losses"], warm=warm["losses"])


def _tolerance(runs) -> float:
    delta1 = float(np.abs(runs["base_rounded"] - runs["base"]).max())
    assert delta1 > 0  # a relocated rounding does move the curve: the scale is not vacuous
    return math.sqrt(4) * delta1


def _assert_curves_agree(runs) -> None:
    ours, base = runs["ours"]["losses"], runs["base"]
    assert len(ours) == len(base) == runs["config"].max_steps == 50
    assert runs["config"].gradient_accumulation_steps == 4
    assert base[-5:].mean() < base[0] - 0.5  # both train: agreement is not that of two flat curves
    tol = _tolerance(runs)
    diff = np.abs(ours - base)
    assert diff.max() <= tol, f"step {int(diff.argmax()) + 1}: |ours - baseline| {diff.max():.4f} > {tol:.4f}"
    drift = abs(float((ours - base).mean()))
    assert drift <= tol / math.sqrt(len(ours)), f"mean difference {drift:.5f}"  # and no drift either way


def test_loss_curves_agree_over_50_steps_with_accumulation(runs):
    _assert_curves_agree(runs)


def test_qwen3_loss_curves_agree_too():
    """Qwen3 (query/key norms between q/k_proj and the rotary embedding): the same agreement. Measured on this
    CPU (AMD EPYC, AVX-512) when the norms returned bfloat16 — q and k rounded once more before the rotation than
    in the standard stack: ours lagged, its loss 0.0014 above the baseline's on average, over the bound 0.0011
    (max 0.0069 within 0.0080); with the float32 norms 0.0003 (max 0.0053)."""
    with _one_thread():
        _assert_curves_agree(_three_runs(H.recipe_config(), H.dataset(),
                                         dataclasses.replace(H.CONFIG, model_type="qwen3")))


def test_the_reference_rounding_of_the_adapters_lags_beyond_the_tolerance(runs):
    """Ours as it was on the H200 (bfloat16 residual stream / the adapters' contributions rounded to bfloat16
    against the frozen output): the baseline pulls ahead — the divergence issue 36 found, at tiny scale."""
    lag = runs["old"] - runs["base"][:SHORT]
    assert lag.max() > _tolerance(runs) and lag[SHORT // 2:].min() > 0, np.round(lag, 4)


def test_a_warmup_from_lr_zero_lags_beyond_the_tolerance(runs):
    """transformers' "constant" schedule ignores warmup_ratio: a warmup (our old default) starts behind."""
    lag = runs["warm"] - runs["base"][:SHORT]
    assert lag.max() > _tolerance(runs) and lag[SHORT // 2:].min() > 0, np.round(lag, 4)


def test_the_recipe_trains_at_full_lr_from_the_first_step(runs):
    log = runs["ours"]["log"]
    assert [e["lr"] for e in log] == [2e-4] * 50
    assert all(e["grad_norm"] > 0.3 for e in log[:5])  # clipping at 0.3 is active: it shapes both curves


def test_checkpointing_replays_each_dropout_mask(runs):
    """Every LoRA layer of ours drew one mask per micro-batch and used it again in the recomputation (the
    baseline was given exactly those masks)."""
    calls = runs["ours"]["masks"]
    assert len(calls) == 7 * H.CONFIG.num_hidden_layers
    for name, masks in calls.items():
        assert len(masks) == 2 * 50 * 4, name
        assert all(torch.equal(a, b) for a, b in zip(masks[::2], masks[1::2], strict=True)), name
    first = calls["model.layers.0.self_attn.q_proj"]
    assert not torch.equal(first[0], first[2])  # a new mask each micro-batch
    kept = float(torch.cat([m.flatten() for m in first[::2]]).float().mean())
    assert abs(kept - 0.9) < 0.02  # dropout 0.1
