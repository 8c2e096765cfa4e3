"""``qlora_gpu.fast.graphs``: a training step's forward and backward passes captured into a CUDA graph. On the CPU (no
capture there) the parts it rests on: the causal SDPA that builds no mask and reads nothing back from the device,
the twin generators that replay the dropout masks without rewinding, and the refusals of what cannot be
captured. On a GPU (gpu-marked): replayed steps bit for bit against eager steps, dropout and optimizer included."""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from test_stage_layer import IDS, TINY
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_gpu.fast.graphs import CAUSAL_SDPA, GraphedStep, check_capturable, register_causal_sdpa
from qlora_gpu.model import RECOMPUTE_GENERATOR, lora_linears
from qlora_gpu.optim import make_optimizer
from qlora_gpu.prepare import prepare_model
from qlora_gpu.train import optimizer_step
from qlora_ref.model.config import LINEAR_MODULES, LoraConfig

#: aten operators that read a device tensor back to the host (a synchronisation, refused under capture), or
#: bring host data to it: ``lift_fresh`` is ``torch.tensor(data)``, on a CUDA device a copy from pageable host
#: memory, which capture refuses (and a replay would read from a host buffer long freed)
READ_BACK = {"_local_scalar_dense", "nonzero", "is_nonzero", "item", "equal", "masked_select", "unique",
             "_unique2", "allclose", "lift_fresh", "lift_fresh_copy"}


class _ReadBacks(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in READ_BACK:
            self.n[name] += 1
        return func(*args, **(kwargs or {}))


def build(device: str = "cpu", dropout: float = 0.1, attn: str = "sdpa", checkpointing: bool = True):
    """The tiny model in training mode (with checkpointing by default), its adapters bound to a flat optimizer."""
    m = prepare_model(TINY, lora=LoraConfig(r=3, alpha=8.0, dropout=dropout), device=device, dtype="bfloat16",
                      gradient_checkpointing=checkpointing, progress=False, tokenizer=False, seed=3,
                      attn_implementation=attn, fast=True)  # as on CUDA by default
    opt = make_optimizer("paged_adamw", lr=1e-3)
    opt.bind(m.lora_parameters())
    return m, opt


def loss_fn(m):
    def f(ids: torch.Tensor) -> torch.Tensor:
        logits = m(ids)
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])

    return f


def dropout_layers(m) -> list:
    return [x for layer in m.hf.model.layers for x in lora_linears(layer) if x.dropout_active]


def test_causal_sdpa_builds_no_mask_and_reads_nothing_back():
    """Under ``CAUSAL_SDPA`` transformers builds no mask and SDPA applies the causal one itself: the same loss and
    gradients as transformers' "sdpa" (which skips its mask for an unpadded batch too), without the packed-
    sequence test that reads the device back — and the whole step (forward, checkpointed backward, dropout)
    then reads nothing back and makes no tensor from host data, as capture requires."""
    register_causal_sdpa()
    out = {}
    for impl in ("sdpa", CAUSAL_SDPA):
        m, _ = build()
        m.hf.config._attn_implementation = impl
        with _ReadBacks() as probe:
            loss = loss_fn(m)(IDS)
            loss.backward()
        out[impl] = loss.detach(), {k: g.clone() for k, g in m.lora_grads().items()}, probe.n
    (loss_a, grads_a, reads_a), (loss_b, grads_b, reads_b) = out["sdpa"], out[CAUSAL_SDPA]
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert reads_a["_local_scalar_dense"] >= 1  # transformers' find_packed_sequence_indices(...).all()
    assert sum(reads_b.values()) == 0, reads_b


class _NoRewind(torch.Generator):
    """A generator that must not be rewound (as under capture, where get_state/set_state are refused)."""

    def get_state(self):
        raise AssertionError("get_state called on a generator the recomputation must not rewind")

    def set_state(self, state):
        raise AssertionError("set_state called on a generator the recomputation must not rewind")


class _Rewindable(torch.Generator):
    """Counts the rewinds (``set_state``) made inside the stand-in capture (``_StandInCuda.graph``)."""

    rewinds_in_capture = 0

    def set_state(self, state):
        if _StandInCuda.capturing:
            self.rewinds_in_capture += 1
        return super().set_state(state)


def _twinned(m, twin_seed_offset: int = 0) -> list:
    """Every dropout layer's generator replaced by one that refuses rewinding, in the same state, with a twin
    installed as its recomputation's generator (what ``GraphedStep`` does for the capture)."""
    pairs = []
    for x in dropout_layers(m):
        own = x._generator(torch.device("cpu"))
        safe = _NoRewind().manual_seed(x.seed)
        twin = torch.Generator().manual_seed(x.seed + twin_seed_offset)
        assert torch.equal(torch.Generator.get_state(safe), own.get_state())  # fresh: both at the seed
        x._generators[torch.device("cpu")] = safe
        x.__dict__[RECOMPUTE_GENERATOR] = twin
        pairs.append((safe, twin))
    return pairs


def test_twin_generators_replay_the_masks_without_rewinding():
    """With a twin generator installed, a block's recomputation draws its forward pass's masks from the twin and
    never rewinds the layer's own generator: loss and gradients bit for bit those of the rewinding path, each own
    generator advanced by the same draws, and each twin left in its generator's state (in step for the next
    replay)."""
    eager, _ = build()
    loss = loss_fn(eager)(IDS)
    loss.backward()
    twinned, _ = build()
    pairs = _twinned(twinned)
    t_loss = loss_fn(twinned)(IDS)
    t_loss.backward()
    assert torch.equal(loss, t_loss)
    e_grads, t_grads = eager.lora_grads(), twinned.lora_grads()
    assert all(torch.equal(e_grads[k], t_grads[k]) for k in e_grads)
    for x, (own, twin) in zip(dropout_layers(eager), pairs, strict=True):
        state = x._generator(torch.device("cpu")).get_state()
        assert torch.equal(torch.Generator.get_state(own), state)
        assert torch.equal(twin.get_state(), state)


def test_a_twin_in_another_state_changes_the_gradients():
    """The recomputation's masks do come from the twin: a twin in another state gives other gradients (the
    forward pass, drawn from the layers' own generators, gives the same loss)."""
    eager, _ = build()
    loss = loss_fn(eager)(IDS)
    loss.backward()
    other, _ = build()
    _twinned(other, twin_seed_offset=1)
    o_loss = loss_fn(other)(IDS)
    o_loss.backward()
    assert torch.equal(loss, o_loss)
    assert any(not torch.equal(g, other.lora_grads()[k]) for k, g in eager.lora_grads().items())


def test_graphed_step_refuses_what_it_cannot_capture():
    m, _ = build()
    with pytest.raises(TypeError, match="model: a qlora_gpu QLoRAModel"):
        GraphedStep(torch.nn.Linear(2, 2), loss_fn(m))
    with pytest.raises(TypeError, match="loss_fn"):
        GraphedStep(m, "loss")
    with pytest.raises(ValueError, match="warmup"):
        GraphedStep(m, loss_fn(m), warmup=0)
    step = GraphedStep(m, loss_fn(m))
    with pytest.raises(TypeError, match="input_ids: a tensor"):
        step([[1, 2, 3]])
    with pytest.raises(ValueError, match="input_ids: CUDA graphs need a CUDA tensor"):
        step(IDS)
    check_capturable(m, "cpu")  # the rest of the conditions hold
    with pytest.raises(ValueError, match="input_ids: on cuda"):
        check_capturable(m, "cuda")
    m.eval()
    with pytest.raises(ValueError, match="training mode"):
        check_capturable(m, "cpu")
    m.train()
    m.hf.model.layers[1].self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match=r"decoder layers \[1\] draw from torch's own generators"):
        check_capturable(m, "cpu")
    eager_attn, _ = build(attn="eager")
    with pytest.raises(ValueError, match="attention 'sdpa' is needed.*'eager'"):
        check_capturable(eager_attn, "cpu")


class _StandInCuda:
    """torch.cuda's capture calls on the CPU: streams do nothing, and "capture" runs its body eagerly — it takes
    the step once, where a real capture only records it — while a replay does nothing. What this checks is
    ``GraphedStep``'s own orchestration around the capture: the warm-up undone, the twins set and installed, the
    generators registered."""

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other) -> None:
            pass

    class CUDAGraph:
        def __init__(self):
            self.registered: list = []
            self.replays = 0

        def register_generator_state(self, generator) -> None:
            self.registered.append(generator)

        def replay(self) -> None:
            self.replays += 1

    @staticmethod
    def current_stream(device=None):
        return _StandInCuda.Stream()

    @staticmethod
    @contextlib.contextmanager
    def stream(s):
        yield

    capturing = False

    @staticmethod
    @contextlib.contextmanager
    def graph(g):
        _StandInCuda.capturing = True
        try:
            yield
        finally:
            _StandInCuda.capturing = False


def _node_lookups(monkeypatch) -> list:
    """For each backward pass that decides on deferral: whether it had to look the AccumulateGrad nodes up (they
    had been released)."""
    import qlora_gpu.fast.deferred_grads as dg

    seen = []
    original = dg.DeferredGrads._deferrable

    def deferrable(self):
        seen.append(self._nodes is None)
        return original(self)

    monkeypatch.setattr(dg.DeferredGrads, "_deferrable", deferrable)
    return seen


def _owners(m) -> list:
    """The ``DeferredGrads`` of the flat buffers holding the model's adapters."""
    from qlora_gpu.optim import FLAT_BUFFER

    return [p.__dict__[FLAT_BUFFER][0]().deferred for p in m.lora_parameters().values()]


class _CPUGraphedStep(GraphedStep):
    _cuda = _StandInCuda
    _device_type = "cpu"

    @staticmethod
    def _same_state(g, twin) -> bool:  # CPU generators have no Philox offset
        return torch.equal(g.get_state(), twin.get_state())


@pytest.mark.parametrize(("warmup", "checkpointing"), [(1, True), (2, True), (1, False)])
def test_the_warm_up_is_undone_and_the_capture_draws_through_the_twins(warmup, checkpointing, monkeypatch):
    """With the CUDA calls stood in for (the "capture" runs the step eagerly): after the warm-up passes and the
    capture, the gradients and the loss are those of one eager step from the same model — the warm-up left no
    gradient and no draw behind — and the recomputation, if any, drew from the twins (none of the layers' own
    generators was rewound); every dropout layer's generator and its twin were registered with the graph, and the
    model's attention is "sdpa" again."""
    eager, _ = build(checkpointing=checkpointing)
    loss = loss_fn(eager)(IDS)
    loss.backward()
    m, _ = build(checkpointing=checkpointing)
    lookups = _node_lookups(monkeypatch)
    layers = dropout_layers(m)
    for x in layers:  # the warm-up's eager passes rewind them; the capture must not
        x._generators[torch.device("cpu")] = _Rewindable().manual_seed(x.seed)
    step = _CPUGraphedStep(m, loss_fn(m), warmup=warmup)
    g_loss = step(IDS)
    assert torch.equal(loss.detach(), g_loss)
    e_grads, g_grads = eager.lora_grads(), m.lora_grads()
    assert all(torch.equal(e_grads[k], g_grads[k]) for k in e_grads)
    own = [x._generators[torch.device("cpu")] for x in layers]
    assert all(g.rewinds_in_capture == 0 for g in own)
    assert sum(not torch.equal(g.get_state(), torch.Generator().manual_seed(x.seed).get_state())
               for x, g in zip(layers, own, strict=True)) == TINY.num_hidden_layers  # one draw per block
    assert step.graph.replays == 1
    assert len(step.graph.registered) == 2 * len(layers) == 2 * len(LINEAR_MODULES) * TINY.num_hidden_layers
    assert {id(g) for g in step.graph.registered} == {id(g) for _, own, twin in step._twins for g in (own, twin)}
    assert all(RECOMPUTE_GENERATOR not in x.__dict__ for x in layers)
    assert m.hf.config._attn_implementation == "sdpa"
    # the warm-up used the nodes held since the binding; the captured pass looked up its own (created on the
    # capture's stream), and none is held after it
    assert lookups == [False] * warmup + [True]
    assert all(o._nodes is None for o in {id(o): o for o in _owners(m)}.values())
    step(IDS)  # a second call replays (here: nothing) the same graph
    assert step.graph.replays == 2


@pytest.mark.parametrize("name", ["position_ids", "attention_mask"])
@pytest.mark.parametrize("call", ["model", "decoder by position"])
def test_a_loss_fn_passing_a_mask_or_positions_is_refused(name, call):
    """``CAUSAL_SDPA`` builds no mask, so a padding mask or packed positions would be ignored in silence (logits
    off by several hundredths): while it is in use (warm-up and capture) either one given to the model is refused,
    by name — keyword or positional, through ``QLoRAModel`` or its decoder. Afterwards the model takes them again,
    on its own attention."""
    m, _ = build()
    value = torch.tensor([[0, 1, 2, 3, 0, 1, 2]]) if name == "position_ids" else torch.ones(1, 7, dtype=torch.long)
    by_position = (value,) if name == "attention_mask" else (None, value)  # after input_ids, in the decoder

    def f(ids):
        ids = ids[:, :7]
        if call == "model":
            return torch.nn.functional.cross_entropy(m(ids, **{name: value})[0, :-1], ids[0, 1:])
        return m.hf.model(ids, *by_position).last_hidden_state.float().square().mean()

    hooks = len(m.hf.model._forward_pre_hooks)
    with pytest.raises(ValueError, match=f"loss_fn: passes {name} to the model.*without {name}"):
        _CPUGraphedStep(m, f)(IDS)
    assert m.hf.config._attn_implementation == "sdpa" and len(m.hf.model._forward_pre_hooks) == hooks
    f(IDS).backward()


def test_a_torch_that_cannot_register_generators_is_refused_with_dropout_only():
    class OldCuda(_StandInCuda):
        class CUDAGraph:  # torch < 2.5
            def replay(self) -> None:
                pass

    class OldStep(_CPUGraphedStep):
        _cuda = OldCuda

    m, _ = build()
    with pytest.raises(RuntimeError, match="LoRA layers draw dropout masks.*register_generator_state"):
        OldStep(m, loss_fn(m))(IDS)
    plain, _ = build(dropout=0.0)
    OldStep(plain, loss_fn(plain))(IDS)  # nothing to register


def test_capture_needs_zero_bound_gradients_and_adapters():
    m, _ = build()
    loss_fn(m)(IDS).backward()
    with pytest.raises(ValueError, match="gradients are not zero"):
        _CPUGraphedStep(m, loss_fn(m))(IDS)
    unbound = prepare_model(TINY, lora=LoraConfig(r=3, alpha=8.0), progress=False, tokenizer=False, seed=3,
                            dtype="bfloat16", attn_implementation="sdpa")
    with pytest.raises(ValueError, match="bind the optimizer first"):
        _CPUGraphedStep(unbound, loss_fn(unbound))(IDS)
    frozen = prepare_model(TINY, lora=None, progress=False, tokenizer=False, seed=3, dtype="bfloat16",
                           attn_implementation="sdpa")
    with pytest.raises(ValueError, match="no trainable LoRA adapters"):
        _CPUGraphedStep(frozen, loss_fn(frozen))(IDS)


# ----------------------------------------------------------------------------------------------- on a GPU
def _grads(m) -> dict:
    return {k: g.clone() for k, g in m.lora_grads().items()}


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_replayed_steps_equal_eager_steps_bit_for_bit(dropout):
    """Three optimizer steps, graphed against eager, from the same model: every loss, every gradient and the
    final adapters bit for bit (torch's math SDPA: its backward is deterministic). Between the second and the
    third the graphed model also takes one eager step (its generators then move without their twins, which the
    next replay resynchronises)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ids = (torch.arange(256) * 7 % TINY.vocab_size)[None].cuda()
    eager, e_opt = build("cuda", dropout)
    graphed, g_opt = build("cuda", dropout)
    step = GraphedStep(graphed, loss_fn(graphed))
    with sdpa_kernel(SDPBackend.MATH):
        for i in range(4):
            e_loss = loss_fn(eager)(ids)
            e_loss.backward()
            if i == 2:  # an eager step on the graphed model
                g_loss = loss_fn(graphed)(ids)
                g_loss.backward()
            else:
                g_loss = step(ids)
            assert torch.equal(e_loss.detach(), g_loss), i
            e_grads, g_grads = _grads(eager), _grads(graphed)
            assert all(torch.equal(e_grads[k], g_grads[k]) for k in e_grads), i
            optimizer_step(e_opt, eager.lora_parameters(), 1e-3, 0.3)
            optimizer_step(g_opt, graphed.lora_parameters(), 1e-3, 0.3)
    e_params, g_params = eager.lora_parameters(), graphed.lora_parameters()
    assert all(torch.equal(e_params[k], g_params[k]) for k in e_params)
    assert step.graph is not None and graphed.hf.config._attn_implementation == "sdpa"  # restored after capture


@pytest.mark.gpu
def test_a_captured_step_refuses_another_shape_and_replaced_gradients():
    ids = (torch.arange(64) * 7 % TINY.vocab_size)[None].cuda()
    m, _ = build("cuda")
    step = GraphedStep(m, loss_fn(m))
    step(ids)
    with pytest.raises(ValueError, match=r"captured for \(1, 64\)"):
        step(ids[:, :32])
    for p in m.lora_parameters().values():
        p.grad = None
    with pytest.raises(RuntimeError, match="gradient was replaced"):
        step(ids)


