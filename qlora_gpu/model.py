"""The GPU model: a transformers ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` whose block
linears are ``qlora_gpu.lora.QLoRALinear`` (bitsandbytes NF4 + LoRA), built from the same files as the reference.

The checkpoint is read once by the reference loader (``qlora_ref.model.loading.load_model`` with float weights,
so Hugging Face folders, GGUF files and bitsandbytes 4-bit folders all work, and every LoRA layer gets the same
seed), and the transformers model is assembled from its tensors:

- embedding, norms and LM head float32 (the paper quantizes and adapts only the block linears; norms stay in
  float32 for stability, as ``prepare_model_for_kbit_training`` does);
- each of the seven block linears becomes a ``QLoRALinear``: the float weight quantized by bitsandbytes with the
  ``QuantConfig`` (or a stored 4-bit weight used as is), the adapter initialised exactly as the reference's
  (``qlora_ref.lora.init_lora_weights`` with the same per-layer seed);
- per decoder layer, the LoRA layers' dropout masks drawn in one draw for the whole block
  (``draw_block_masks``), the dropout rule of both the plain and the fast path (``qlora_gpu.fast`` then also
  casts the block's adapters and decodes its scales at once: ``qlora_gpu.fast.enable``);
- the RMSNorms through torch's fused RMSNorm operator (``rms_norm``: the rounding steps of transformers'
  float32-weight norm, one CUDA kernel where transformers' code launches seven);
- gradient checkpointing per decoder layer (torch's checkpoint), with the LoRA dropout generators rewound before
  the recomputation so that it draws the same masks as the first forward pass; optionally the checkpointed block
  inputs kept in host memory until the recomputation (``activation_offload``, ``qlora_gpu.offload``);
- packed batches through ``position_ids`` (``qlora_gpu.packing``: attention inside each example, no dense mask
  with ``attn_implementation=VARLEN``); ``hidden_states`` for a loss that computes the LM head itself
  (``qlora_gpu.chunked_loss``).

``QLoRAModel`` exposes the reference ``LlamaModel``'s adapter interface (``lora_parameters``, ``lora_grads``,
``load_lora_parameters``, ``load_adapter``, ``save_adapter``, ``merge_and_export``) over torch tensors.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qlora_ref.model.config import LINEAR_MODULES, LoraConfig, ModelConfig, QuantConfig
from qlora_ref.model.llama import expected_tensors, module_path
from qlora_ref.quantize import Quantized4bit as RefQuantized4bit

from .lora import QLoRALinear, draw_keep
from .packing import VARLEN
from .patches import register_varlen_attention, use_fused_rms_norm, use_fused_rope
from .quantize import Quantized4bit, dequantize_4bit

_NF4 = QuantConfig()  # the paper's storage: NF4 + double quantization, bfloat16 compute
#: the transformers (config, model) classes of each supported ``model_type``
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def default_device(device=None) -> torch.device:
    """``device`` as a ``torch.device``; None: CUDA when present, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fast_by_default(device) -> bool:
    """Whether a model on ``device`` trains on the fast path (``qlora_gpu.fast``) unless told otherwise: on CUDA,
    where docs/benchmarks.md measured it faster; not on the CPU."""
    return torch.device(device).type == "cuda"


def set_block_linear(layer: nn.Module, name: str, linear: nn.Module) -> None:
    """Put ``linear`` in decoder layer ``layer`` as projection ``name`` (``q_proj`` ... ``down_proj``)."""
    parent, _ = module_path(name).split(".")
    setattr(getattr(layer, parent), name, linear)


def hf_skeleton(config: ModelConfig, attn_implementation: str = "eager") -> nn.Module:
    """The transformers causal LM of ``config`` on the meta device: every shape, no memory."""
    import transformers

    with torch.device("meta"):
        return getattr(transformers, HF_CLASSES[config.model_type][1])(hf_config(config, attn_implementation))


def hf_config(config: ModelConfig, attn_implementation: str = "eager"):
    """The transformers config of a reference ``ModelConfig`` (``ModelConfig.to_hf_dict``)."""
    import transformers

    if attn_implementation == VARLEN and register_varlen_attention() is None:
        attn_implementation = "sdpa"  # checked to keep packed examples apart from the position ids itself
    cfg_cls = getattr(transformers, HF_CLASSES[config.model_type][0])
    d = config.to_hf_dict()
    d.pop("architectures", None)
    d.pop("model_type", None)
    cfg = cfg_cls(**d)
    cfg._attn_implementation = attn_implementation
    return cfg


def lora_linears(layer: nn.Module) -> list[QLoRALinear]:
    return [m for m in layer.modules() if isinstance(m, QLoRALinear) and m.r is not None]


#: the block linears whose output feeds float32 arithmetic in the standard stack (its layers return their input's
#: dtype, float32 after a norm): q and k the rotary embedding, gate and up SiLU and their product, down the residual
#: addition. v's output goes straight into attention's bfloat16 (a float32 sum rounded there is the bfloat16 sum:
#: torch adds bfloat16 in float32 and rounds once), and o_proj reads attention's bfloat16 output
WIDENED_OUTPUTS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
                   ("mlp", "down_proj"))


def qk_norms(attn: nn.Module) -> list[nn.Module]:
    """An attention module's query and key norms (Qwen3), or none."""
    return [m for m in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)) if m is not None]


def set_residual_dtype(hf: nn.Module, residual_dtype: str, compute_dtype: str) -> None:
    """Keep a transformers model's residual stream and its adapters' contributions in ``residual_dtype``
    (float32) while the frozen matrix products and attention compute in ``compute_dtype`` (bfloat16): the
    arithmetic of the standard stack (transformers + peft's ``prepare_model_for_kbit_training`` under
    ``torch.autocast``; the paper's ``qlora.py`` alike), where the norms' float32 weights widen the stream to
    float32 and bitsandbytes returns each product in its input's float32, to which peft adds the adapter's output.

    - the embedding's output is widened (the embedding is stored in ``dtype``, bfloat16: half the memory);
    - each norm computes in float32 and returns the compute dtype (one rounding, the one the next products'
      cast of a float32 output would make), the final one the LM head's dtype, Qwen3's query/key norms (between
      q/k_proj and the rotary embedding) their float32 input's — the standard stack rounds q and k once, at
      attention, not before the rotation too;
    - the block linears whose output feeds float32 arithmetic there (``WIDENED_OUTPUTS``: q, k, gate, up, down)
      return ``residual_dtype``, their adapter's output added to the widened frozen output in that dtype
      (``QLoRALinear.out_dtype``, ``qlora_gpu.lora._add_adapter``): rotary embedding, SiLU and the gating product,
      and the residual additions then run in float32, as in the standard stack;
    - attention runs under ``torch.autocast`` in the compute dtype, which casts the scaled-dot-product's inputs
      as the standard stack's autocast does (the projections, our own autograd functions, are unaffected); its
      bfloat16 output goes to ``o_proj``, which — as peft's layer given a bfloat16 input — adds its adapter's
      output in bfloat16 and returns bfloat16, widened by the residual addition.

    Why (docs/training.md): rounded to bfloat16 against the frozen output, an adapter's contribution
    below half a bfloat16 step of it (2⁻⁹ relative) is lost; the first updates of B (about lr each) are that
    small at LLaMA's widths, and training lagged the standard stack's by steps. Nothing changes if the dtypes
    agree."""
    if residual_dtype == compute_dtype:
        return
    wide, narrow = getattr(torch, residual_dtype), getattr(torch, compute_dtype)
    embed = hf.get_input_embeddings()
    if not getattr(embed, "_qlora_widened", False):
        embed.register_forward_hook(functools.partial(_widen_output, wide))
        embed._qlora_widened = True
    head = hf.get_output_embeddings()
    # the final norm feeds the LM head: its dtype (bfloat16, or float32 with dtype="float32"); Qwen3's query/key
    # norms read q/k_proj's widened output and feed the rotary embedding: float32 in, float32 out, as there
    own = {hf.model.norm: head.weight.dtype if head is not None else narrow}
    own.update((norm, None) for layer in hf.model.layers for norm in qk_norms(layer.self_attn))
    use_fused_rms_norm(hf, narrow, own=own)
    for layer in hf.model.layers:
        for parent, name in WIDENED_OUTPUTS:
            m = getattr(getattr(layer, parent, None), name, None)
            if isinstance(m, QLoRALinear):
                m.out_dtype = residual_dtype
        attn = layer.self_attn
        if not (isinstance(attn.forward, functools.partial) and attn.forward.func is _autocast_forward):
            attn.forward = functools.partial(_autocast_forward, attn.forward, narrow)


def _widen_output(dtype: torch.dtype, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(dtype)


def _autocast_forward(forward, dtype: torch.dtype, *args, **kwargs):
    """``forward`` under ``torch.autocast`` in ``dtype`` on the device of its first tensor argument (no cache of
    cast weights: nothing here casts a parameter, and a cache would not survive CUDA-graph replays)."""
    x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    with torch.autocast(x.device.type if x is not None else "cpu", dtype=dtype, cache_enabled=False):
        return forward(*args, **kwargs)


#: set on a decoder layer (its ``__dict__``) by ``qlora_gpu.fast.enable``: called before the layer's recomputation
#: under checkpointing, it returns the function that undoes what it set (the block's last linear skips its output)
ON_RECOMPUTE = "_qlora_on_recompute"


#: set on a LoRA layer while a training step is captured into a CUDA graph (``qlora_gpu.fast.graphs``): the
#: generator its block's recomputation draws from — a twin of its own, set to the same state before every replay —
#: because a captured graph cannot rewind a generator (``get_state``/``set_state`` are host operations, refused in
#: capture)
RECOMPUTE_GENERATOR = "_recompute_generator"

#: set on a decoder layer by ``QLoRAModel.activation_offload``: the ``qlora_gpu.offload.ActivationOffload`` whose
#: saved-tensor hooks move the layer's checkpointed input to host memory
OFFLOAD = "_activation_offload"


#: set on a decoder layer (its ``__dict__``) while the model trains with gradient checkpointing
CHECKPOINTED = "_qlora_checkpointed"


def _layer_forward(layer: nn.Module, forward, *args, **kwargs):
    """A decoder layer's ``forward`` (installed as an instance attribute): checkpointed by ``_checkpoint_layer``
    while the model trains with gradient checkpointing and gradients are recorded, plain otherwise. Our own wrapper
    rather than transformers' per-layer switch (``gradient_checkpointing`` and ``_gradient_checkpointing_func``,
    internals that changed in transformers 5: it now checkpoints ``forward`` where it checkpointed ``__call__``):
    it needs nothing of transformers but that the model calls its layers with the hidden states first, and module
    hooks run outside the checkpoint in every version."""
    if layer.__dict__.get(CHECKPOINTED) and layer.training and torch.is_grad_enabled():
        return _checkpoint_layer(layer, functools.partial(forward, **kwargs), *args)
    return forward(*args, **kwargs)


def _checkpoint_layer(layer: nn.Module, fn, *args):
    """Activation checkpointing of one decoder layer that replays its LoRA dropout masks: they come from the LoRA
    layers' own generators (``draw_block_masks`` draws a block's from its first one), which torch's checkpoint does
    not rewind, so they are rewound here — or, while a step is captured into a CUDA graph, drawn from twin generators
    in the same state (``RECOMPUTE_GENERATOR``).

    torch's non-reentrant variant (the one torch recommends): it needs no input that requires gradients and
    recomputes inside the backward pass, where the masks are replayed by ``run``. torch's own generators are saved
    and restored around the recomputation only when the block draws from them (attention dropout, an
    ``nn.Dropout``): LLaMA's blocks in the paper's recipe draw nothing there, and the saving costs host time at
    every block call (and keeps the step from CUDA-graph capture). Before the recomputation the layer's
    ``ON_RECOMPUTE`` runs, if set (``qlora_gpu.fast``)."""
    linears = [m for m in lora_linears(layer) if m.dropout_active]
    device = args[0].device
    twins = [m.__dict__.get(RECOMPUTE_GENERATOR) for m in linears]
    replay = _twin_draws if all(t is not None for t in twins) else _rewound_draws
    saved = twins if replay is _twin_draws else [m._generator(device).get_state() for m in linears]
    on_recompute = layer.__dict__.get(ON_RECOMPUTE)
    forward = True

    def run(*a):
        nonlocal forward
        if forward:  # the forward pass
            forward = False
            return fn(*a)
        # the recomputation: the forward pass's masks again
        restore = replay(linears, saved, device)
        undo = on_recompute() if on_recompute is not None else _nothing
        try:
            return fn(*a)
        finally:
            restore()
            undo()

    offload = layer.__dict__.get(OFFLOAD)
    with offload.hooks() if offload is not None else contextlib.nullcontext():
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False,
                                                 preserve_rng_state=draws_global_rng(layer))


def _rewound_draws(linears: list[QLoRALinear], states: list, device: torch.device):
    """Each layer's generator set back to its state at the forward pass; nothing to undo afterwards."""
    for m, state in zip(linears, states, strict=True):
        m._generator(device).set_state(state)
    return _nothing


def _twin_draws(linears: list[QLoRALinear], twins: list, device: torch.device):
    """Each layer draws from its twin generator (in the state its own had at the forward pass) until the returned
    function puts its own back."""
    own = [m._generator(device) for m in linears]
    for m, twin in zip(linears, twins, strict=True):
        m._generators[device] = twin

    def restore() -> None:
        for m, g in zip(linears, own, strict=True):
            m._generators[device] = g

    return restore


def _nothing() -> None:
    pass


def draws_global_rng(layer: nn.Module) -> bool:
    """Whether a block in training draws from torch's own generators: attention dropout, an ``nn.Dropout``.
    Attention dropout is read from the module's ``attention_dropout`` and from its config's, so that a
    transformers version reading the config inside ``forward`` still counts (else the recomputation would draw
    other masks, and the gradients be wrong with no error). Runs at every block call: each attribute is looked up
    where it can be (instance or class) before it is read, because ``nn.Module.__getattr__`` raising for each
    module without one cost tens of µs per block call."""
    for m in layer.modules():
        if not m.training:
            continue
        if isinstance(m, nn.Dropout):
            if m.p > 0:
                return True
        elif ("attention_dropout" in m.__dict__ or hasattr(type(m), "attention_dropout")) and m.attention_dropout > 0:
            return True
        elif (getattr(m.__dict__.get("config"), "attention_dropout", 0) or 0) > 0:
            return True
    return False


def block_masks(linears: list[QLoRALinear], rows: int, device: torch.device) -> dict:
    """LoRA layer -> its dropout mask (rows, in): one draw (``qlora_gpu.lora_math.draw_keep``) on the generator of
    the block's first dropout layer for all the masks of one dropout probability, laid out by input width in order
    of first appearance, each width's as (layers, rows, width) in module order — the rule of a layer's own draw, in
    one kernel per block call instead of one per layer (host time at batch 1, docs/benchmarks.md)."""
    active = [m for m in linears if m.dropout_active]
    if not active:
        return {}
    gen = active[0]._generator(device)
    groups: dict[float, dict[int, list[QLoRALinear]]] = {}
    for m in active:
        groups.setdefault(m.dropout, {}).setdefault(m.in_features, []).append(m)
    masks = {}
    for p, by_width in groups.items():
        sizes = [len(group) * rows * width for width, group in by_width.items()]
        keep = draw_keep(sum(sizes), p, gen, device)
        for (width, group), chunk in zip(by_width.items(), keep.split(sizes), strict=True):
            masks.update(zip(group, chunk.view(len(group), rows, width).unbind(0), strict=True))
    return masks


@torch.no_grad()
def draw_block_masks(layer: nn.Module, hidden: torch.Tensor) -> None:
    """Draws a decoder layer's LoRA dropout masks for the whole block at once (``block_masks``; ``hidden`` is the
    block's input) and hands each LoRA layer its own (``QLoRALinear.stage_mask``). The masks come from one
    generator, the block's first dropout layer's (which checkpointing rewinds), instead of seven."""
    linears = lora_linears(layer)
    masks = block_masks(linears, hidden.numel() // hidden.shape[-1], hidden.device) if linears else {}
    for m, keep in masks.items():
        m.stage_mask(keep)


def _mask_hook(layer: nn.Module, norm: nn.Module, args: tuple) -> None:
    """Forward pre-hook on a block's ``input_layernorm`` — the first module the block calls, so inside the
    checkpointed function in every transformers version (since transformers 5 a hook on the block itself runs
    outside it): the recomputation draws the same masks again."""
    draw_block_masks(layer, args[0])


def _unstage_hook(layer: nn.Module, args: tuple, output) -> None:
    """Forward hook of a decoder layer: drops a mask ``draw_block_masks`` left unused."""
    for m in lora_linears(layer):
        m.unstage()


class _TokenStream:
    """transformers' streamer protocol (``put`` with the prompt first, then each new token; ``end``) calling
    ``stream(token_id)`` for the new tokens, as the reference's ``generate`` calls it."""

    def __init__(self, stream):
        self.stream, self.prompt_seen = stream, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.stream(int(token))

    def end(self) -> None:
        pass


class QLoRAModel(nn.Module):
    """A transformers causal LM with ``QLoRALinear`` block linears; ``forward(input_ids, attention_mask)``
    returns float32 logits."""

    def __init__(self, hf_model: nn.Module, config: ModelConfig, quant: QuantConfig | None, lora: LoraConfig | None,
                 tokenizer=None):
        super().__init__()
        self.hf = hf_model
        self.config = config
        self.quant = quant
        self.lora = lora
        self.tokenizer = tokenizer
        self._gradient_checkpointing = False
        for layer in hf_model.model.layers:  # a block's dropout masks in one draw (draw_block_masks)
            layer.input_layernorm.register_forward_pre_hook(functools.partial(_mask_hook, layer))
            layer.register_forward_hook(_unstage_hook)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path, quant: QuantConfig | None = _NF4, lora: LoraConfig | None = None,
                        gradient_checkpointing: bool = False, device=None, attn_implementation: str = "eager",
                        tokenizer: bool = True, progress: bool = False) -> QLoRAModel:
        """Load ``path`` (HF folder, GGUF, bitsandbytes 4-bit folder) with the reference loader and build the
        torch model. ``quant`` None keeps float32 weights (plain LoRA, the exactness mode); ``progress``: the
        reference loader's bar."""
        from qlora_ref.model.loading import load_model

        ref = load_model(path, quant=None, lora=lora, tokenizer=tokenizer, progress=progress)
        return cls.from_reference(ref, quant, lora, gradient_checkpointing, device, attn_implementation)

    @classmethod
    def from_reference(cls, ref, quant: QuantConfig | None, lora: LoraConfig | None,
                       gradient_checkpointing: bool = False, device=None,
                       attn_implementation: str = "eager") -> QLoRAModel:
        """Build from a reference ``LlamaModel``'s tensors (its float or stored 4-bit weights, its adapters)."""
        config = ref.config
        hf = hf_skeleton(config, attn_implementation)
        f32 = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731  (a writable copy)
        hf.model.embed_tokens = nn.Embedding.from_pretrained(f32(ref.embed_tokens.weight), freeze=True)
        hf.model.norm.weight = nn.Parameter(f32(ref.norm.weight), requires_grad=False)
        if config.tie_word_embeddings:
            hf.lm_head.weight = hf.model.embed_tokens.weight
        else:
            hf.lm_head.weight = nn.Parameter(f32(ref.lm_head_weight), requires_grad=False)
        compute = quant.compute_dtype if quant is not None else "float32"
        for layer, ref_layer in zip(hf.model.layers, ref.layers, strict=True):
            layer.input_layernorm.weight = nn.Parameter(f32(ref_layer.input_layernorm.weight), requires_grad=False)
            layer.post_attention_layernorm.weight = nn.Parameter(f32(ref_layer.post_attention_layernorm.weight),
                                                                 requires_grad=False)
            if config.qk_norm:
                for n in ("q_norm", "k_norm"):
                    getattr(layer.self_attn, n).weight = nn.Parameter(f32(getattr(ref_layer.self_attn, n).weight),
                                                                      requires_grad=False)
            ref_linears = ref_layer.linears()
            for name in LINEAR_MODULES:
                r_lin = ref_linears[module_path(name)]
                bias = None if r_lin.bias is None else f32(r_lin.bias)
                common = dict(r=r_lin.r, alpha=r_lin.alpha, dropout=r_lin.dropout, use_rslora=r_lin.use_rslora,
                              bias=bias, compute_dtype=compute, seed=r_lin.seed)
                if isinstance(r_lin.weight, RefQuantized4bit):
                    lin = QLoRALinear.from_quantized(r_lin.weight, **common)
                elif quant is None:
                    lin = QLoRALinear.from_weight(f32(r_lin.weight), quant_type=None, **common)
                else:
                    lin = QLoRALinear.from_weight(f32(r_lin.weight), quant_type=quant.quant_type,
                                                  blocksize=quant.blocksize, double_quant=quant.double_quant, **common)
                if r_lin.r is not None:  # the reference's adapter (the same init; also copies loaded adapters)
                    with torch.no_grad():
                        lin.lora_A.copy_(torch.from_numpy(np.asarray(r_lin.lora_A)))
                        lin.lora_B.copy_(torch.from_numpy(np.asarray(r_lin.lora_B)))
                set_block_linear(layer, name, lin)
        model = cls.assemble(hf, config, quant, lora, getattr(ref, "tokenizer", None), device="cpu",
                             gradient_checkpointing=gradient_checkpointing)
        return model.to(device) if device is not None else model

    @classmethod
    def assemble(cls, hf: nn.Module, config: ModelConfig, quant: QuantConfig | None, lora: LoraConfig | None,
                 tokenizer, *, device, gradient_checkpointing: bool, residual_dtype: str | None = None) -> QLoRAModel:
        """The model around a skeleton whose tensors are all set: the rotary buffers (created on the meta device)
        rebuilt on ``device``, nothing left on the meta device, checkpointing set, training mode.
        ``residual_dtype``: the residual stream's dtype (``set_residual_dtype``); None: the embedding's."""
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config).to(device)
        use_fused_rms_norm(hf)
        if residual_dtype is not None:
            set_residual_dtype(hf, residual_dtype, quant.compute_dtype if quant is not None else "float32")
        use_fused_rope(hf)
        model = cls(hf, config, quant, lora, tokenizer)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
        if leftover:
            raise RuntimeError(f"tensors left uninitialised while building the model: {leftover[:5]}")
        model.gradient_checkpointing = gradient_checkpointing
        model.train()
        return model

    # ----------------------------------------------------------------- forward
    def _inputs(self, input_ids, attention_mask, position_ids) -> dict:
        """transformers' keyword arguments. With ``position_ids`` (a packed batch) no attention mask: the positions
        keep the examples apart (and the padding at a row's end is an example of its own), and transformers
        separates packed examples only without a mask."""
        device = self.hf.model.embed_tokens.weight.device
        as_tensor = lambda a: torch.as_tensor(a if isinstance(a, torch.Tensor) else np.asarray(a),  # noqa: E731
                                              device=device)
        input_ids = as_tensor(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        out = dict(input_ids=input_ids, use_cache=False)
        if position_ids is not None:
            out["position_ids"] = as_tensor(position_ids).reshape(input_ids.shape)
        elif attention_mask is not None:
            out["attention_mask"] = as_tensor(attention_mask)
        return out

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """Float32 logits (batch, seq, vocab); ``position_ids``: a packed batch (``qlora_ref.data.collate_packed``)."""
        return self.hf(**self._inputs(input_ids, attention_mask, position_ids)).logits.float()

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """The final norm's output (batch, seq, hidden), what the LM head (``lm_head_weight``) reads."""
        return self.hf.model(**self._inputs(input_ids, attention_mask, position_ids)).last_hidden_state

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.hf.lm_head.weight

    def chunked_nll_sum(self, input_ids, labels, chunk_size: int, attention_mask=None,
                        position_ids=None) -> tuple[torch.Tensor, int]:
        """The summed next-token cross entropy and its number of targets, the LM head and the loss taken
        ``chunk_size`` positions at a time (``qlora_gpu.chunked_loss``). One method from the embedding to the
        loss, so that under FSDP2 (``qlora_gpu.fsdp.shard_model`` registers it as a forward method) the root
        unit's embedding and head are gathered whole for all of it, as they are for ``forward``."""
        from .chunked_loss import chunked_nll_sum

        hidden = self.hidden_states(input_ids, attention_mask, position_ids)
        return chunked_nll_sum(hidden, self.lm_head_weight, labels, chunk_size)

    @property
    def activation_offload(self):
        """The ``qlora_gpu.offload.ActivationOffload`` moving checkpointed block inputs to host memory, or None.
        Set True (or an ``ActivationOffload``) to offload, False/None to stop; it needs gradient checkpointing."""
        return self.hf.model.layers[0].__dict__.get(OFFLOAD) if len(self.hf.model.layers) else None

    @activation_offload.setter
    def activation_offload(self, value) -> None:
        from .offload import ActivationOffload

        if value is True:
            value = ActivationOffload()
        if value and not self.gradient_checkpointing:
            raise ValueError("activation offload moves the checkpointed block inputs: it needs gradient "
                             "checkpointing (gradient_checkpointing=True)")
        for layer in self.hf.model.layers:
            if value:
                layer.__dict__[OFFLOAD] = value
            else:
                layer.__dict__.pop(OFFLOAD, None)

    @property
    def gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        if not value and self.activation_offload:  # offload hooks only the checkpointed inputs: it would do nothing
            raise ValueError("activation offload is on and moves the checkpointed block inputs: switch it off "
                             "first (activation_offload = False), then gradient checkpointing")
        self._gradient_checkpointing = bool(value)
        for layer in self.hf.model.layers:
            layer.__dict__[CHECKPOINTED] = bool(value)
            if not isinstance(layer.__dict__.get("forward"), functools.partial):
                layer.forward = functools.partial(_layer_forward, layer, layer.forward)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id=None, seed: int | None = None, stream=None) -> list[int]:
        """The prompt's ids followed by the new ones (a list), as transformers' ``generate`` and the reference's
        ``LlamaModel.generate`` return them, through transformers' ``generate``: greedy at temperature 0, else
        nucleus sampling (the reference's arguments, checked by the reference's rules; the random stream
        differs). ``stream`` is called with each new token id as it is produced. Eval mode; training mode is
        restored."""
        from transformers import GenerationConfig

        from qlora_ref.model.generate import check_generation

        input_ids = [int(t) for t in input_ids]
        check_generation(len(input_ids), max_new_tokens, temperature, top_p, self.config.max_position_embeddings, seed)
        was_training = self.training
        self.eval()
        try:
            device = self.hf.model.embed_tokens.weight.device
            ids = torch.tensor([list(input_ids)], device=device)
            eos = eos_token_id if eos_token_id is not None else self.config.eos_token_id
            # every setting spelled out, top_k=0 (none) among them: one left unset takes transformers' default,
            # and its top_k=50 cut the reference's nucleus to 50 tokens
            sample = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
                dict(do_sample=False, temperature=None, top_p=None)
            generation = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos,
                                          pad_token_id=eos if isinstance(eos, int) else 0, top_k=0, **sample)
            if seed is not None:
                torch.manual_seed(seed)
            streamer = None if stream is None else _TokenStream(stream)
            out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=generation,
                                   streamer=streamer)
            return out[0].tolist()
        finally:
            self.train(was_training)

    # ----------------------------------------------------------------- adapters
    def named_linears(self) -> dict[str, QLoRALinear]:
        """Every block linear by its Hugging Face module name (``model.layers.0.self_attn.q_proj``)."""
        return {name: m for name, m in self.hf.named_modules() if isinstance(m, QLoRALinear)}

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable LoRA tensors (live parameters), PEFT-named like the reference's."""
        return {f"{name}.{k}.weight": getattr(m, k) for name, m in self.named_linears().items() if m.r is not None
                for k in ("lora_A", "lora_B")}

    def lora_grads(self) -> dict[str, torch.Tensor | None]:
        return {k: p.grad for k, p in self.lora_parameters().items()}

    @torch.no_grad()
    def load_lora_parameters(self, params) -> None:
        """Copy adapter weights in (NumPy or torch; PEFT names with or without ``base_model.model.``)."""
        own = self.lora_parameters()
        for key, value in params.items():
            name = key.removeprefix("base_model.model.")
            if name not in own:
                raise KeyError(f"no LoRA parameter named {key!r} in this model")
            value = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
            if tuple(own[name].shape) != tuple(value.shape):
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not match the model's "
                                 f"{tuple(own[name].shape)}")
            own[name].copy_(value.to(own[name].device, own[name].dtype))

    def lora_state_numpy(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().float().numpy().copy() for k, v in self.lora_parameters().items()}

    def save_adapter(self, folder, base_model_name_or_path: str | None = None) -> Path:
        """PEFT's format: ``qlora_ref.adapters.save_adapter``, the same code and files as the reference's."""
        from qlora_ref.adapters import save_adapter

        return save_adapter(self, folder, base_model_name_or_path)

    def load_adapter(self, folder) -> dict:
        """Load a PEFT adapter folder (ours or peft's); a model built without LoRA first receives the adapters its
        ``adapter_config.json`` describes, as transformers' ``load_adapter`` adds them (``qlora_ref.adapters``)."""
        from qlora_ref.adapters import load_adapter

        return load_adapter(self, folder)

    @torch.no_grad()
    def base_float_weights(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every tensor under its Hugging Face name, float32, block linears dequantized, adapters left out:
        ``(name, array)`` pairs made one at a time (a merge never holds the whole model in float32)."""
        linears = self.named_linears()
        tied = self.config.tie_word_embeddings
        for name, t in self.hf.state_dict().items():
            owner = name.rsplit(".", 1)[0]
            if owner in linears or ".lora_" in name or (tied and name == "lm_head.weight"):
                continue
            yield name, t.detach().cpu().float().numpy()
        for name, m in linears.items():
            if m.quantized:
                w = dequantize_4bit(Quantized4bit.from_bnb(*m.frozen_weight()), torch.float32)
            else:
                w = m.weight
            yield f"{name}.weight", w.detach().cpu().float().numpy()
            if m.bias is not None:
                yield f"{name}.bias", m.bias.detach().cpu().float().numpy()

    def merge_and_export(self, folder, dtype="bfloat16", tokenizer_source=None, progress: bool = False) -> Path:
        """Merge the adapters into the dequantized weights and write a 16-bit Hugging Face folder."""
        from qlora_ref.export import export_hf_folder, merge_weights

        adapter = self.lora_state_numpy()
        scaling = self.lora.scaling if (self.lora is not None and adapter) else 0.0
        merged = merge_weights(self.base_float_weights(), adapter, scaling, dtype, progress,
                               total=len(expected_tensors(self.config)))
        return export_hf_folder(folder, self.config, merged, dtype, tokenizer=self.tokenizer,
                                tokenizer_source=tokenizer_source)


def merge_adapter(adapter_dir, out_dir, model_path=None, *, quant="trained", dtype="bfloat16", backend="gpu",
                  overwrite=False, progress=False) -> dict:
    """``qlora_ref.merge_adapter`` on this backend by default (``qlora merge --backend gpu``): the same folder."""
    from qlora_ref.export import merge_adapter as merge

    return merge(adapter_dir, out_dir, model_path, quant=quant, dtype=dtype, backend=backend, overwrite=overwrite,
                 progress=progress)


__all__ = ["QLoRAModel", "default_device", "draw_block_masks", "hf_config", "hf_skeleton", "merge_adapter",
           "set_block_linear"]
