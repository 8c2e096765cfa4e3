"""The reference backend of the training loop: NumPy forward, hand-written backward, NumPy optimizers.

``RefTrainer`` is the ``StepBackend`` of ``qlora_ref.train.loop`` for a ``qlora_ref.model.LlamaModel``. One micro-batch
(the inner lines of the loop in ``qlora_ref.train.loop``'s docstring): logits from the frozen 4-bit model with LoRA
adapters, the causal-LM cross entropy of the response tokens (``qlora_ref.loss``), its gradient backpropagated
through every block into the LoRA matrices only. The gradients of the micro-batches are summed here in float32; the
optimizer step clips them to the global norm (``qlora_ref.optim.clip_grad_norm``) and applies (paged) AdamW
(paper, section 3, "Paged Optimizers").

A packed batch (``position_ids``) keeps attention inside each example; with ``loss_chunk_size`` the LM head and the
loss run a chunk of positions at a time (``qlora_ref.loss.chunked_lm_head_loss``), so the logits never exist whole.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from ..loss import causal_lm_loss, causal_lm_loss_backward, chunked_lm_head_loss, chunked_lm_head_loss_backward
from ..optim import clip_grad_norm, grad_norm, make_optimizer
from .checkpoint import check_rng_backend
from .config import TrainConfig
from .progress import peak_rss_bytes


def build_optimizer(name: str, config: TrainConfig, **extra):
    """The optimizer of ``config`` (names shared with ``qlora_gpu.optim``), with the recipe's hyperparameters."""
    return make_optimizer(name, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                          eps=config.adam_epsilon, weight_decay=config.weight_decay, **extra)


def check_reference_config(config: TrainConfig) -> None:
    """What the reference cannot do, refused before any work (``finetune`` calls this before the model loads)."""
    if config.activation_offload:
        raise ValueError("activation_offload is a GPU-backend feature (pinned host memory, CUDA streams: "
                         "qlora_gpu.offload); the reference has no device memory to relieve")
    if config.fast:
        raise ValueError("fast=True is a GPU-backend setting (qlora_gpu.fast: the same values in fewer kernel "
                         "launches); the reference has one path: leave fast out (null)")


class RefTrainer:
    """Train the adapters of a reference ``LlamaModel`` (built with ``config.lora_config()``)."""

    def __init__(self, model, config: TrainConfig, optimizer=None):
        if model.lora is None or not model.lora_parameters():
            raise ValueError("the model carries no LoRA adapters: build it with lora=config.lora_config()")
        check_reference_config(config)
        self.model = model
        self.lora = model.lora
        self.config = config
        model.gradient_checkpointing = config.gradient_checkpointing
        model.train()
        self.params = model.lora_parameters()  # the live arrays: the optimizer updates them in place
        self.optimizer = optimizer if optimizer is not None else build_optimizer(config.optimizer, config)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}

    # ---------------------------------------------------------------------------------------- one step
    def _loss(self, batch, num_items: int):
        """(loss summed over the batch's targets / ``num_items``, number of targets, the backward pass to run)."""
        ids, positions, labels = batch["input_ids"], batch.get("position_ids"), batch["labels"]
        if self.config.loss_chunk_size:
            hidden = self.model.hidden_states(ids, position_ids=positions)
            loss, ctx = chunked_lm_head_loss(hidden, self.model.lm_head_weight, labels, self.config.loss_chunk_size,
                                             num_items)
            return loss, ctx.rows.size, lambda: self.model.backward_hidden(chunked_lm_head_loss_backward(ctx))
        logits = self.model.forward(ids, position_ids=positions)
        loss, ctx = causal_lm_loss(logits, labels, num_items_in_batch=num_items)
        return loss, ctx.rows.size, lambda: self.model.backward(causal_lm_loss_backward(ctx))

    def forward_backward(self, batch, num_items: int) -> float:
        self.model.train()
        loss, _, backward = self._loss(batch, num_items)
        self.model.zero_grad()
        backward()
        for name, g in self.model.lora_grads().items():
            if g is not None:
                self.grads[name] += g
        return loss

    def optimizer_step(self, lr: float, max_grad_norm: float) -> float:
        norm = clip_grad_norm(self.grads, max_grad_norm) if max_grad_norm > 0 else grad_norm(self.grads)
        self.optimizer.lr = lr
        if math.isfinite(norm):  # otherwise no step: the loop stops with the adapters of the last step
            self.optimizer.step(self.params, self.grads)
        for g in self.grads.values():
            g[...] = 0
        return float(norm)

    def eval_loss(self, batch) -> tuple[float, int]:
        self.model.eval()
        try:
            nll_sum, n, _ = self._loss(batch, 1)
            return float(nll_sum), int(n)
        finally:
            self.model.clear_cache()
            self.model.train()

    def generate(self, input_ids, **kwargs) -> list[int]:
        """Greedy/sampled continuation (``LlamaModel.generate``) in eval mode; training state is untouched."""
        self.model.eval()
        try:
            return self.model.generate(list(input_ids), **kwargs)
        finally:
            self.model.clear_cache()
            self.model.train()

    # ---------------------------------------------------------------------------------------- state
    def adapter_state(self) -> dict[str, np.ndarray]:
        return {k: np.array(v, copy=True) for k, v in self.params.items()}

    def load_adapter_state(self, params) -> None:
        self.model.load_lora_parameters(params)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state) -> None:
        self.optimizer.load_state_dict(state)

    def _rngs(self) -> dict:
        """Each LoRA layer's dropout generator (``QLoRALinear._dropout_rng``), by layer name."""
        return {name: m._dropout_rng for name, m in self.model.named_linears().items()
                if getattr(m, "_dropout_rng", None) is not None}

    def rng_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The LoRA dropout generators' states (NumPy bit-generator states are plain JSON numbers)."""
        return {"backend": "ref",
                "lora_dropout": {k: copy.deepcopy(r.bit_generator.state) for k, r in self._rngs().items()}}, {}

    def set_rng_state(self, state: dict, arrays) -> None:
        check_rng_backend(state, "ref")
        rngs = self._rngs()
        saved = state.get("lora_dropout", {})
        if set(saved) != set(rngs):
            raise ValueError("checkpoint's dropout generators do not match this model's LoRA layers")
        for k, s in saved.items():
            rngs[k].bit_generator.state = s

    def memory_bytes(self) -> int | None:
        return peak_rss_bytes()
