"""``qlora_gpu.model.draw_block_masks`` and ``qlora_gpu.fast.staging``: a decoder block draws its LoRA dropout
masks (the core's rule) and, on the fast path, casts its adapters to the compute dtype in one operator for the whole
block, where each LoRA layer would launch its own (host time at
batch 1, docs/benchmarks.md). Checked on CPU with a tiny model: the operators saved are counted exactly, the
values are the ones each layer would compute (loss and gradients bit for bit), the masks follow the documented
rule, checkpointing replays them, and a staged value that does not fit a call is not used."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_gpu.fast import layer as fast_layer
from qlora_gpu.fast import staging
from qlora_gpu.lora import QLoRALinear
from qlora_gpu.optim import make_optimizer
from qlora_gpu.prepare import prepare_model
from qlora_gpu.product_check import bnb_product_trusted
from qlora_ref.model.config import LINEAR_MODULES, LoraConfig, ModelConfig

# head_dim × heads == hidden: q, k, v, o, gate, up read 64 columns, down reads 96 (two widths per block)
TINY = ModelConfig(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
IDS = torch.arange(24)[None] * 7 % 101
LAYERS = TINY.num_hidden_layers


class _Ops(TorchDispatchMode):
    """Counts the aten operators dispatched, by name."""

    def __init__(self):
        super().__init__()
        self.n = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def build(dropout: float = 0.0, checkpointing: bool = False, bound: bool = False, device: str = "cpu",
          loose: bool = False, fast: bool = True):
    """The tiny model, on the fast path unless ``fast`` is False; ``bound``: a flat optimizer bound to its
    adapters; ``loose``: each adapter moved to its own allocation (prepare_model lays them out in one buffer)."""
    # r=3: adapters of 192 or 288 float32, so the flat buffer leaves gaps between them (512-byte aligned starts)
    m = prepare_model(TINY, lora=LoraConfig(r=3, alpha=8.0, dropout=dropout), device=device, dtype="bfloat16",
                      gradient_checkpointing=checkpointing, progress=False, tokenizer=False, seed=3,
                      attn_implementation="eager", fast=fast)  # deterministic on CUDA too: equal runs, equal bits
    if loose:
        for p in m.lora_parameters().values():
            p.data = p.data.clone()
    if bound:  # what GpuTrainer does before its first step: the adapters become views of one buffer
        make_optimizer("paged_adamw", lr=1e-4).bind(m.lora_parameters())
    return m


def loss_of(m, ids: torch.Tensor = IDS) -> torch.Tensor:
    ids = ids.to(m.hf.model.embed_tokens.weight.device)
    logits = m(ids)
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])


def step(m, ids: torch.Tensor = IDS) -> tuple[torch.Tensor, dict, collections.Counter, collections.Counter]:
    """Loss, LoRA gradients, and the operators of the forward and of the backward pass — the step's own: the
    one-time probe of bitsandbytes' 4-bit product on this device (``qlora_gpu.product_check``), which the first
    product in a process runs, is run before counting (the counts depended on which test ran first)."""
    bnb_product_trusted(m.hf.model.embed_tokens.weight.device, torch.bfloat16)
    with _Ops() as fwd:
        loss = loss_of(m, ids)
    with _Ops() as bwd:
        loss.backward()
    return loss.detach(), {k: g.clone() for k, g in m.lora_grads().items()}, fwd.n, bwd.n


@pytest.mark.usefixtures("bitsandbytes_dequantize")  # operator counts: the CUDA step's kernel mix
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_bound_adapters_are_cast_once_per_block_with_the_same_result(checkpointing, device):
    """Bound into one buffer, a block's 14 adapter tensors are cast by one operator instead of 14 — again in the
    recomputation under checkpointing — and loss and every gradient are bit-identical to per-layer casts."""
    loose_loss, loose_grads, loose_f, loose_b = step(build(0.1, checkpointing, loose=True, device=device))
    bound_loss, bound_grads, bound_f, bound_b = step(build(0.1, checkpointing, loose=True, bound=True,
                                                           device=device))
    assert torch.equal(loose_loss, bound_loss)
    for k in loose_grads:
        assert torch.equal(loose_grads[k], bound_grads[k]), k
    saved = 2 * len(LINEAR_MODULES) - 1  # per block call
    assert loose_f["_to_copy"] - bound_f["_to_copy"] == saved * LAYERS
    # the backward pass recomputes each block under checkpointing (and so casts again, once)
    assert loose_b["_to_copy"] - bound_b["_to_copy"] == (saved * LAYERS if checkpointing else 0)


def test_loose_adapters_are_cast_by_each_layer():
    """Adapters not in one run of memory (each moved to its own allocation) are cast by their own layers."""
    m = build(loose=True)
    params = list(m.lora_parameters().values())
    assert params[0].data_ptr() + params[0].numel() * 4 != params[1].data_ptr()  # else the test tests nothing
    _, _, fwd, _ = step(m)
    assert fwd["_to_copy"] >= 2 * len(LINEAR_MODULES) * LAYERS


def _masks_used(m, monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Per block call, in order: LoRA layer name -> the mask it was staged."""
    names = {lin: name for name, lin in m.named_linears().items()}
    calls: list[dict] = []
    original = QLoRALinear.stage_mask

    def stage_mask(self, keep):
        name = names[self]
        block = name.split(".")[2]
        if not calls or name in calls[-1] or next(iter(calls[-1])).split(".")[2] != block:
            calls.append({})
        calls[-1][name] = keep
        original(self, keep)

    monkeypatch.setattr(QLoRALinear, "stage_mask", stage_mask)
    return calls


def test_a_block_draws_its_masks_in_one_call(monkeypatch):
    """The documented rule: one ``bernoulli_(1 − p)`` of all the block's masks on the generator of its first LoRA
    layer (seeded with that layer's seed), laid out by input width in order of first appearance, each width's
    masks in module order; the other layers' generators are not used. One draw per block, where seven layers
    would draw seven (and ``rand >= p`` launch two operators each)."""
    p = 0.25
    m = build(p)
    calls = _masks_used(m, monkeypatch)
    with _Ops() as ops:
        loss_of(m)
    assert ops.n["bernoulli_"] == LAYERS and ops.n["rand"] == ops.n["ge"] == 0
    assert len(calls) == LAYERS
    rows = IDS.numel()
    for i, masks in enumerate(calls):
        prefix = f"model.layers.{i}."
        linears = {n: lin for n, lin in m.named_linears().items() if n.startswith(prefix)}
        first = next(iter(linears.values()))
        g = torch.Generator().manual_seed(first.seed)
        by_width = collections.defaultdict(list)
        for name, lin in linears.items():
            by_width[lin.in_features].append(name)
        assert list(by_width) == [64, 96]  # dicts keep module order: the 64-wide group comes first
        total = sum(len(names) * rows * width for width, names in by_width.items())
        drawn = iter(torch.empty(total, dtype=torch.bool).bernoulli_(1 - p, generator=g).tolist())
        for width, names in by_width.items():
            for name in names:
                expected = torch.tensor([next(drawn) for _ in range(rows * width)]).view(rows, width)
                assert torch.equal(masks[name], expected), name
        for lin in list(linears.values())[1:]:  # untouched: still at their seeds
            assert torch.equal(lin._generator(torch.device("cpu")).get_state(),
                               torch.Generator().manual_seed(lin.seed).get_state())
    dropped = np.mean([1 - k.float().mean().item() for c in calls for k in c.values()])
    assert abs(dropped - p) < 0.02  # 21 masks of 1,536 to 2,304 draws each


def test_checkpointing_replays_the_staged_masks(monkeypatch):
    """Under checkpointing the block is recomputed in the backward pass and stages again: the same masks (the
    generator is rewound), so the gradients are those of the uncheckpointed model."""
    m = build(0.1, checkpointing=True)
    calls = _masks_used(m, monkeypatch)
    loss_of(m).backward()
    assert len(calls) == 2 * LAYERS  # forward, then the recomputations in reverse block order
    for i in range(LAYERS):
        first, again = calls[i], calls[2 * LAYERS - 1 - i]
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_eval_mode_stages_no_mask_and_draws_nothing():
    m = build(0.1, bound=True)
    m.eval()
    with torch.no_grad(), _Ops() as ops:
        m(IDS)
    assert ops.n["rand"] == 0 and ops.n["bernoulli_"] == 0
    assert ops.n["_to_copy"] < 2 * len(LINEAR_MODULES) * LAYERS  # the adapters are still cast once per block


def _layer(seed: int = 5) -> QLoRALinear:
    w = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    return QLoRALinear.from_weight(w, 4, 8.0, dropout=0.3, seed=seed, compute_dtype="float32", quant_type=None)


def _out(layer: QLoRALinear, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(1))  # B = 0 at init would hide the adapter
    return layer(x, **kw)


def test_a_staged_value_is_used_once_and_only_where_it_fits():
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(3)) >= 0.3
    own = _out(_layer(), x)  # the layer's own draw from its seed

    for fast in (False, True):
        fits = _layer()
        fits.fast = fast
        fits.stage_mask(mask)
        assert torch.equal(_out(fits, x), _out(_layer(), x, dropout_mask=mask))  # the staged mask, as if given
        assert fits.staged_mask() is None  # consumed

    for keep, adapter in [(mask[:2], None),  # rows do not fit
                          (None, (torch.zeros(4, 10, dtype=torch.bfloat16), torch.zeros(12, 4, dtype=torch.bfloat16)))]:
        layer = _layer()
        layer.fast = True
        if keep is not None:
            layer.stage_mask(keep)
        fast_layer.stage(layer, adapter=adapter)  # a bfloat16 adapter for a float32 layer: not its compute dtype
        assert torch.equal(_out(layer, x), own)

    left = _layer()
    left.stage_mask(mask)
    left.unstage()
    assert torch.equal(_out(left, x), own)


def test_an_explicit_mask_wins_over_a_staged_one():
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    given = torch.rand(3, 10, generator=torch.Generator().manual_seed(4)) >= 0.3
    layer = _layer()
    layer.stage_mask(~given)
    assert torch.equal(_out(layer, x, dropout_mask=given), _out(_layer(), x, dropout_mask=given))


def _grads_with_attention_dropout(checkpointing: bool) -> dict:
    m = build(0.1, checkpointing)
    for mod in m.hf.modules():
        if hasattr(mod, "attention_dropout"):
            mod.attention_dropout = 0.2  # drawn from torch's global generator
    torch.manual_seed(0)
    _, grads, _, _ = step(m)
    return grads


def test_torchs_generators_are_saved_only_when_a_block_draws_from_them(monkeypatch):
    """The recomputation must see the attention-dropout masks of the forward pass: with attention dropout the
    checkpoint saves and restores torch's generators, and the gradients are the uncheckpointed model's. Without it
    (LLaMA in the paper's recipe) nothing is saved: the LoRA masks come from the layers' own generators."""
    plain = _grads_with_attention_dropout(False)
    checkpointed = _grads_with_attention_dropout(True)
    for k in plain:
        assert torch.equal(plain[k], checkpointed[k]), k

    seen = []
    original = torch.utils.checkpoint.checkpoint

    def spy(*args, **kwargs):
        seen.append(kwargs["preserve_rng_state"])
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    step(build(0.1, checkpointing=True))
    assert seen == [False] * LAYERS
    seen.clear()
    _grads_with_attention_dropout(True)
    assert seen == [True] * LAYERS


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_layers_reading_one_input_drop_it_out_in_one_operator(checkpointing, device, monkeypatch):
    """q, k and v (and gate and up) read one input: their x ⊙ Mᵢ / (1 − p) is one operator per block call, where
    each layer launched its own (3 fewer per block call), and loss and every gradient are the same bits."""
    loss, grads, fwd, bwd = step(build(0.1, checkpointing, bound=True, device=device))
    with monkeypatch.context() as mp:
        mp.setattr(staging, "drop_shared_input", lambda parent, names, x: None)
        own_loss, own_grads, own_fwd, own_bwd = step(build(0.1, checkpointing, bound=True, device=device))
    assert torch.equal(loss, own_loss)
    for k in grads:
        assert torch.equal(grads[k], own_grads[k]), k
    op = "native_dropout_backward"
    assert own_fwd[op] - fwd[op] == 3 * LAYERS
    assert own_bwd[op] - bwd[op] == (3 * LAYERS if checkpointing else 0)


def _attention(seed: int = 5) -> tuple[torch.nn.Module, torch.Tensor]:
    """Three dropout layers under the names of an attention module, their masks staged from one buffer as
    ``draw_block_masks`` draws them; the layers on the fast path."""
    parent = torch.nn.Module()
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        setattr(parent, name, _layer(seed + i))
        getattr(parent, name).fast = True
    keep = torch.rand(3, 3, 10, generator=torch.Generator().manual_seed(6)) >= 0.3
    for lin, k in zip((parent.q_proj, parent.k_proj, parent.v_proj), keep.unbind(0), strict=True):
        lin.stage_mask(k)
    return parent, keep


def test_a_shared_dropout_is_used_only_for_that_very_input():
    """A layer uses the x_d computed with its neighbours only when called with that tensor itself, unmodified,
    and its staged mask: another input, the same one changed in place since, or an explicit mask gets its own."""
    from qlora_gpu.fast.staging import drop_shared_input

    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    y = torch.randn(3, 10, generator=torch.Generator().manual_seed(3))
    parent, keep = _attention()
    drop_shared_input(parent, ("q_proj", "k_proj", "v_proj"), x)
    assert all(fast_layer.STAGED_INPUT in getattr(parent, n).__dict__ for n in ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(_out(parent.q_proj, x), _out(_layer(5), x, dropout_mask=keep[0]))
    parent, keep = _attention()
    drop_shared_input(parent, ("q_proj", "k_proj", "v_proj"), x)
    assert torch.equal(_out(parent.q_proj, x, dropout_mask=~keep[0]), _out(_layer(5), x, dropout_mask=~keep[0]))
    assert torch.equal(_out(parent.k_proj, y), _out(_layer(6), y, dropout_mask=keep[1]))  # another input
    x.mul_(2)  # the same tensor, changed in place after its x_d was computed
    assert torch.equal(_out(parent.v_proj, x), _out(_layer(7), x, dropout_mask=keep[2]))


def test_masks_not_in_one_buffer_are_not_stacked():
    """Masks that do not lie one after the other in one buffer cannot be viewed as one stack: each layer then
    computes its own x_d (nothing is staged)."""
    from qlora_gpu.fast.staging import drop_shared_input

    parent, keep = _attention()
    parent.k_proj.stage_mask(keep[1].clone())  # its own allocation
    drop_shared_input(parent, ("q_proj", "k_proj", "v_proj"), torch.randn(3, 10))
    assert not any(fast_layer.STAGED_INPUT in getattr(parent, n).__dict__ for n in ("q_proj", "k_proj", "v_proj"))


@pytest.mark.usefixtures("bitsandbytes_dequantize")  # operator counts: the CUDA step's kernel mix
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("early_stop", [True, False])
def test_the_recomputation_skips_the_last_linears_output(early_stop, device, monkeypatch):
    """In the recomputation under checkpointing the block's down_proj computes only what its backward pass saves
    (its output feeds nothing the backward pass needs): one 4-bit product, one up-projection and one addition
    fewer per block, and the same loss and gradients bit for bit — also when torch's checkpoint recomputes the
    whole block (early stop off), where the unwritten output reaches only the discarded block output."""
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        loss, grads, _, bwd = step(build(0.1, True, bound=True, device=device))
        with monkeypatch.context() as mp:
            mp.setattr(staging, "LAST_LINEAR", ("mlp", "no_such_linear"))
            own_loss, own_grads, _, own_bwd = step(build(0.1, True, bound=True, device=device))
    assert torch.equal(loss, own_loss)
    for k in grads:
        assert torch.equal(grads[k], own_grads[k]), k
    assert own_bwd["gemm_4bit"] - bwd["gemm_4bit"] == LAYERS
    assert own_bwd["mm"] - bwd["mm"] == LAYERS


def _grads_with_an_nn_dropout(checkpointing: bool) -> dict:
    """LoRA dropout plus an ``nn.Dropout`` after each MLP activation (drawn from torch's global generator)."""
    m = build(0.1, checkpointing)
    for layer in m.hf.model.layers:
        layer.mlp.act_fn = torch.nn.Sequential(layer.mlp.act_fn, torch.nn.Dropout(0.2))
    torch.manual_seed(0)
    _, grads, _, _ = step(m)
    return grads


def test_an_nn_dropout_in_a_block_is_replayed_by_the_recomputation():
    """``draws_global_rng``'s other case than attention dropout: a block holding an ``nn.Dropout`` with p > 0 draws
    from torch's generators, which the checkpoint must then save and restore — the gradients are the
    uncheckpointed model's (the recomputation drawing other masks would change them with no error)."""
    plain = _grads_with_an_nn_dropout(False)
    checkpointed = _grads_with_an_nn_dropout(True)
    assert any(bool(g.ne(0).any()) for g in plain.values())
    for k in plain:
        assert torch.equal(plain[k], checkpointed[k]), k


def test_attention_dropout_read_from_the_config_counts_as_drawing():
    """A transformers version that reads ``attention_dropout`` from the module's config inside ``forward`` (no
    attribute of its own) still draws from torch's generators when the config's rate is above 0; in eval mode,
    or at rate 0, nothing is drawn."""
    from qlora_gpu.model import draws_global_rng

    m = build(0.1)
    layer = m.hf.model.layers[0]
    attn = layer.self_attn
    attn.__dict__.pop("attention_dropout", None)  # read from the config instead, as such a version does
    assert not hasattr(type(attn), "attention_dropout")
    attn.config.attention_dropout = 0.0
    assert not draws_global_rng(layer)
    attn.config.attention_dropout = 0.1
    assert draws_global_rng(layer)
    layer.eval()
    assert not draws_global_rng(layer)
