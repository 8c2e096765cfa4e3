"""The GPU backend of the training loop: ``GpuTrainer``, the ``StepBackend`` of ``qlora_ref.train.loop``.

Algorithm 2 on torch: the micro-batch's forward pass through the transformers model with ``QLoRALinear`` block
linears (bitsandbytes NF4, bfloat16 compute), the summed cross entropy of the response tokens divided by the
step's number of response tokens, ``backward()`` into the LoRA parameters only (the 4-bit weights are frozen
buffers), then gradient clipping and bitsandbytes' paged AdamW (Algorithm 3) through ``qlora_gpu.optim``, which
takes the reference's optimizer names and writes the reference's state-dict keys.

The loop itself — data order, accumulation, schedule, evaluation, checkpoints, exact resume, progress bar — is
``qlora_ref.train.loop.train``, shared with the reference; the checkpoint files are the same on both backends.

For long sequences and short examples (``TrainConfig``): ``packing`` runs packed batches through variable-length
attention (``qlora_gpu.packing``), ``loss_chunk_size`` the LM head and the loss in chunks
(``qlora_gpu.chunked_loss``), ``activation_offload`` keeps the checkpointed block inputs in host memory
(``qlora_gpu.offload``). ``fast`` (default: on CUDA) trains through ``qlora_gpu.fast``: the same values in fewer
kernel launches.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from qlora_ref.loss import IGNORE_INDEX
from qlora_ref.train.api import evaluate_model as shared_evaluate
from qlora_ref.train.api import finetune as shared_finetune
from qlora_ref.train.checkpoint import check_rng_backend
from qlora_ref.train.config import TrainConfig
from qlora_ref.train.progress import peak_rss_bytes

from .fast import deferred_grads
from .model import QLoRAModel, default_device, fast_by_default
from .optim import clip_grad_norm, make_optimizer
from .patches import use_varlen_attention


def finetune(model, data, config: TrainConfig | None = None, *, backend: str = "gpu", eval_data=None,
             output_dir=None, resume=True, stop_after: int | None = None, trainer=None, sharded: bool | None = None,
             cpu_offload: bool = False):
    """``qlora_ref.finetune`` with this backend by default: the same loop, data, checkpoints and result."""
    return shared_finetune(model, data, config, backend=backend, eval_data=eval_data, output_dir=output_dir,
                           resume=resume, stop_after=stop_after, trainer=trainer, sharded=sharded,
                           cpu_offload=cpu_offload)


def evaluate_model(model, data, config: TrainConfig | None = None, *, adapter=None, backend: str = "gpu",
                   split: str = "all", progress: bool = False) -> dict:
    """``qlora_ref.evaluate_model`` with this backend by default (``qlora evaluate --backend gpu``)."""
    return shared_evaluate(model, data, config, adapter=adapter, backend=backend, split=split, progress=progress)


def build_optimizer(config: TrainConfig, **options):
    """The optimizer of ``config``'s recipe; ``options`` go to ``make_optimizer`` (``flat``, ``paged``)."""
    return make_optimizer(config.optimizer, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                          eps=config.adam_epsilon, weight_decay=config.weight_decay, **options)


def optimizer_step(optimizer, params: dict[str, torch.Tensor], lr: float, max_grad_norm: float) -> float:
    """After the backward passes: clip the gradients to ``max_grad_norm`` (0: only measure), one step of
    ``optimizer`` (the reference's interface) at ``lr``, the gradients cleared; returns the norm before clipping.
    A non-finite norm skips the step (the parameters stay those of the last step; the training loop then stops).
    A ``qlora_gpu.optim`` optimizer zeroes its flat gradient buffer in place (autograd accumulates there)."""
    grads = {k: p.grad for k, p in params.items()}
    norm = clip_grad_norm(grads, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.lr = lr
    if math.isfinite(norm):
        optimizer.step(params, grads)
    if hasattr(optimizer, "zero_grad"):
        optimizer.zero_grad(params)
    else:
        for p in params.values():
            p.grad = None
    return norm


class GpuTrainer:
    """Train the adapters of a ``QLoRAModel`` (built with ``config.lora_config()``)."""

    def __init__(self, model: QLoRAModel, config: TrainConfig, optimizer=None):
        if model.lora is None or not model.lora_parameters():
            raise ValueError("the model carries no LoRA adapters: build it with lora=config.lora_config()")
        self.model = model
        self.lora = model.lora
        self.config = config
        self.device = model.hf.model.embed_tokens.weight.device
        model.activation_offload = None  # off first: the model may come with it on, and the recipe without checkpoints
        model.gradient_checkpointing = config.gradient_checkpointing
        model.activation_offload = config.activation_offload
        fast = config.fast if config.fast is not None else (True if fast_by_default(self.device) else None)
        if fast is not None:  # the switch (qlora_gpu.fast); None leaves the model as built (off on the CPU)
            from . import fast as fast_path

            (fast_path.enable if fast else fast_path.disable)(model)
        if config.packing:  # attention inside each packed example without a (T, T) mask
            use_varlen_attention(model.hf)
        model.train()
        self.params = model.lora_parameters()
        self.optimizer = optimizer if optimizer is not None else build_optimizer(config)
        self._pending_optimizer_state = None  # a loaded state the optimizer has not built yet
        if hasattr(self.optimizer, "bind"):  # qlora_gpu.optim: a flat buffer is set up before the first backward
            self.optimizer.bind(self.params)

    @classmethod
    def from_pretrained(cls, path, config: TrainConfig, device=None) -> GpuTrainer:
        """A Hugging Face folder is built layer by layer on the device (``prepare_model``); a GGUF file through
        the reference loader. Float32 embedding and stream, each linear's output rounded in the compute dtype
        (``residual_dtype=None``), eager attention: the reference's numerics, so that both backends agree step by
        step. For speed build ``prepare_model(path)`` (bfloat16 embedding and head, float32 stream, the standard
        stack's arithmetic) and pass it in."""
        from .prepare import load

        device = default_device(device)
        model = load(path, quant=config.quant_config(), lora=config.lora_config(), device=device, dtype="float32",
                     residual_dtype=None, attn_implementation="eager",
                     gradient_checkpointing=config.gradient_checkpointing, progress=config.progress)
        return cls(model, config)

    # ---------------------------------------------------------------------------------------- one step
    def _tensors(self, batch):
        t = lambda k: torch.from_numpy(np.ascontiguousarray(batch[k])).to(self.device)  # noqa: E731
        return t("input_ids"), t("attention_mask"), t("labels"), t("position_ids") if "position_ids" in batch else None

    def _nll(self, batch) -> tuple[torch.Tensor, int]:
        """Summed next-token cross entropy of a batch (padded or packed) and its number of targets; the LM head and
        the loss in chunks with ``loss_chunk_size``."""
        ids, mask, labels, positions = self._tensors(batch)
        if self.config.loss_chunk_size:
            return self.model.chunked_nll_sum(ids, labels, self.config.loss_chunk_size, mask, positions)
        return self._nll_sum(self.model(ids, mask, positions), labels)

    @staticmethod
    def _nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Summed next-token cross entropy over counted targets (``qlora_ref.loss``'s shift and ignore index)."""
        targets = labels[:, 1:].reshape(-1)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX,
                              reduction="sum")
        return nll, int((targets != IGNORE_INDEX).sum())

    def forward_backward(self, batch, num_items: int) -> float:
        self.model.train()
        nll, _ = self._nll(batch)
        loss = nll / num_items
        with deferred_grads.allowed():  # this step owns its backward pass (qlora_gpu.fast.deferred_grads)
            loss.backward()
        return float(loss.detach())

    def optimizer_step(self, lr: float, max_grad_norm: float) -> float:
        norm = optimizer_step(self.optimizer, self.params, lr, max_grad_norm)
        self._pending_optimizer_state = None
        return norm

    @torch.no_grad()
    def eval_loss(self, batch) -> tuple[float, int]:
        was_training = self.model.training
        self.model.eval()
        try:
            nll, n = self._nll(batch)
            return float(nll), n
        finally:
            self.model.train(was_training)

    def generate(self, input_ids, **kwargs) -> list[int]:
        return self.model.generate(input_ids, **kwargs)

    # ---------------------------------------------------------------------------------------- state
    def adapter_state(self) -> dict[str, np.ndarray]:
        return self.model.lora_state_numpy()

    def load_adapter_state(self, params) -> None:
        self.model.load_lora_parameters(params)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        state = self.optimizer.state_dict()
        if not state and self._pending_optimizer_state is not None:  # loaded, not yet stepped
            return dict(self._pending_optimizer_state)
        return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}

    def load_optimizer_state(self, state) -> None:
        self._pending_optimizer_state = dict(state)
        self.optimizer.load_state_dict(state)

    def _dropout_generators(self) -> dict[str, torch.Generator]:
        return {name: m._generator(self.device) for name, m in self.model.named_linears().items()
                if m.r is not None and m.dropout > 0}

    def rng_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """torch's global generator(s) and each LoRA layer's dropout generator, as uint8 arrays."""
        arrays = {"torch.cpu": torch.get_rng_state().numpy().copy()}
        if self.device.type == "cuda":
            arrays["torch.cuda"] = torch.cuda.get_rng_state(self.device).numpy().copy()
        for name, g in self._dropout_generators().items():
            arrays[f"lora_dropout.{name}"] = g.get_state().numpy().copy()
        return {"backend": "gpu"}, arrays

    def set_rng_state(self, state: dict, arrays) -> None:
        check_rng_backend(state, "gpu")
        torch.set_rng_state(torch.from_numpy(np.array(arrays["torch.cpu"])))
        if self.device.type == "cuda" and "torch.cuda" in arrays:
            torch.cuda.set_rng_state(torch.from_numpy(np.array(arrays["torch.cuda"])), self.device)
        gens = self._dropout_generators()
        saved = {k.removeprefix("lora_dropout."): v for k, v in arrays.items() if k.startswith("lora_dropout.")}
        if set(saved) != set(gens):
            raise ValueError("checkpoint's dropout generators do not match this model's LoRA layers")
        for name, g in gens.items():
            g.set_state(torch.from_numpy(np.array(saved[name])))

    def memory_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss_bytes()


__all__ = ["GpuTrainer", "build_optimizer", "default_device", "evaluate_model", "finetune", "optimizer_step"]
