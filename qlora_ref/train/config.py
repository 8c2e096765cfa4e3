"""``TrainConfig``: every setting of a QLoRA fine-tuning run, shared by both backends.

The defaults are the paper's recipe (Dettmers et al. 2023, section 5 and appendix B; the authors' ``qlora.py``
scripts) for models up to 13B parameters:

- LoRA on all linear layers of the blocks (Figure 2: "Using LoRA on all transformer layers is critical to match
  16-bit performance."), r = 64, alpha = 16,
  dropout 0.1 (0.05 above 13B);
- NF4 storage with double quantization, bfloat16 compute (section 3);
- paged AdamW with 32-bit states (section 3, "Paged Optimizers"), lr 2e-4 (1e-4 above 13B), betas (0.9, 0.999),
  no weight decay;
- constant learning rate: the scripts pass ``warmup_ratio=0.03``, which transformers' "constant" schedule ignores,
  so there is no warmup (``qlora_ref.optim.schedule``; "constant_with_warmup" uses it);
- effective batch 16 = micro-batch 1 x 16 gradient-accumulation steps; max grad norm 0.3;
- loss on the responses only ("train on target"), gradient checkpointing on.

Off by default, for long sequences and short examples (docs/long_context.md): ``packing``, ``loss_chunk_size``,
``activation_offload`` (the GPU backend only). ``init_adapter``: a trained PEFT adapter the adapters start from,
instead of LoRA's B = 0 (``qlora_ref.train.init_adapter``).

A config is a plain frozen dataclass; ``to_dict``/``from_dict`` round-trip it through JSON (it is stored in every
checkpoint so that a resume can check it continues the same run).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..files import read_json_object
from ..model.config import LINEAR_MODULES, LoraConfig, QuantConfig
from ..optim.schedule import SCHEDULES as _SCHEDULES

#: learning-rate schedules (``qlora_ref.optim.schedule.get_lr``)
SCHEDULES = _SCHEDULES

#: settings that may differ between a run and its resumption (everything else must match)
RESUMABLE_CHANGES = frozenset({"max_steps", "eval_every", "save_every", "eval_batches",
                               "progress", "output_dir", "keep_checkpoints",
                               # the held-out split: a change that moves training examples is refused by the
                               # training data's own fingerprint
                               "eval_fraction",
                               # how memory is spent, not what is computed: a run that ran out of memory resumes
                               # with them (recomputation and offload give the same values; chunks of the loss
                               # round differently, at float32's last place)
                               "gradient_checkpointing", "activation_offload", "loss_chunk_size",
                               # where the adapters started: a resumed run starts from its checkpoint's
                               "init_adapter"})


#: fields whose type is checked first (a JSON config may hold anything), so every rule below compares like with like
_FIELD_TYPES = [
    *((name, (int, float), "a number") for name in (
        "lora_alpha", "lora_dropout", "learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay",
        "warmup_ratio", "max_grad_norm", "eval_fraction")),
    *((name, (str,), "a string") for name in ("quant_type", "compute_dtype", "optimizer", "lr_scheduler")),
    *((name, (bool,), "true or false") for name in ("double_quant", "gradient_checkpointing", "train_on_inputs",
                                                     "skip_malformed", "progress")),
    *((name, (str, type(None)), "a path or null") for name in ("output_dir", "init_adapter")),
    ("fast", (bool, type(None)), "true, false or null"),
]


def target_module_names(value) -> tuple[str, ...]:
    """``target_modules`` as a tuple of names: a list of strings, or one string of comma-separated names as
    ``--target-modules`` takes them (``"q_proj,v_proj"``; ``"all-linear"``, peft's word for all seven). A name
    given twice counts once, in the order first given (peft keeps a set); none at all is an error."""
    if isinstance(value, str):
        names = [t.strip() for t in value.split(",") if t.strip()]
    elif isinstance(value, list | tuple) and all(isinstance(t, str) for t in value):
        names = list(value)
    else:
        raise ValueError(f"target_modules must be a list of strings (or one comma-separated string), got {value!r}")
    if not names:
        raise ValueError(f"target_modules must name at least one of {', '.join(LINEAR_MODULES)} (or all-linear), "
                         f"got {value!r}")
    return tuple(dict.fromkeys(names))


#: the largest training seed: what transformers' ``set_seed`` (numpy's legacy seed) accepts, and small enough that
#: every adapter's seed derived from it (``model.linear.lora_seed``: seed x 1,000,003 + ...) stays within the 64
#: bits torch's generators take (a larger one failed on the torch backend at the first step, after the model load)
MAX_TRAIN_SEED = 2**32 - 1


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run. See the module docstring for where each default comes from."""

    # -- LoRA (section 4; PEFT's meaning) ----------------------------------------------------------------
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = field(default=LINEAR_MODULES)
    init_adapter: str | None = None  # a PEFT adapter folder the adapters start from (qlora_ref.train.init_adapter)
    # -- 4-bit storage (section 3) ----------------------------------------------------------------------------
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "bfloat16"
    # -- optimization (appendix B) -----------------------------------------------------------------------------
    optimizer: str = "paged_adamw"
    learning_rate: float = 2e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3  # 0 disables clipping
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 16
    max_steps: int = 100  # optimizer steps
    gradient_checkpointing: bool = True
    loss_chunk_size: int = 0  # > 0: LM head and loss this many positions at a time (qlora_ref.loss); 0: at once
    activation_offload: bool = False  # qlora_gpu: checkpointed block inputs in host memory (qlora_gpu.offload)
    fast: bool | None = None  # qlora_gpu: the same values in fewer kernel launches (qlora_gpu.fast); None: on CUDA
    seed: int = 42
    # -- data -----------------------------------------------------------------------------------------------------
    max_length: int = 512  # tokens per example (prompt + response), longer ones are dropped (counted)
    train_on_inputs: bool = False  # False: the loss is on the response tokens only (the paper)
    skip_malformed: bool = False  # a malformed record of a data file is dropped (counted), not an error
    packing: bool = False  # several examples per row of max_length tokens, attention kept inside each
    pack_length: int | None = None  # packing: tokens per row (>= max_length); None: max_length
    eval_fraction: float = 0.05  # held out of the data file when no separate eval file is given
    eval_batches: int = 0  # 0: evaluate on the whole held-out set
    # -- bookkeeping ----------------------------------------------------------------------------------------------
    eval_every: int = 0  # optimizer steps between held-out evaluations (0: only at the end)
    save_every: int = 250  # optimizer steps between checkpoints (the paper's qlora.py: 250; 0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept (older ones are deleted); 0 keeps all
    progress: bool = True
    output_dir: str | None = None

    def __post_init__(self):
        def positive_int(name, allow_zero=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and not allow_zero):
                kind = "a non-negative" if allow_zero else "a positive"
                raise ValueError(f"{name} must be {kind} integer, got {v!r}")

        for name, kinds, what in _FIELD_TYPES:
            v = getattr(self, name)
            if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
                raise ValueError(f"{name} must be {what}, got {v!r}")
        for name in ("micro_batch_size", "gradient_accumulation_steps", "max_steps", "max_length", "blocksize"):
            positive_int(name)
        for name in ("lora_r", "eval_batches", "eval_every", "save_every", "keep_checkpoints", "seed",
                     "loss_chunk_size"):
            positive_int(name, allow_zero=True)
        if self.seed > MAX_TRAIN_SEED:
            raise ValueError(f"seed must be an integer from 0 to 2**32-1 = {MAX_TRAIN_SEED}, got {self.seed}")
        if self.activation_offload and not self.gradient_checkpointing:
            raise ValueError("activation_offload moves the checkpointed block inputs to host memory: it needs "
                             "gradient_checkpointing=True")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a token and its successor), got {self.max_length}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha must be a finite positive number, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not (math.isfinite(self.adam_epsilon) and self.adam_epsilon > 0):
            # the optimizers take eps = 0 (as torch does); a LoRA run cannot: B = 0 gives lora_A a zero gradient
            # at the first step, and AdamW's update of it is then 0 / 0
            raise ValueError(f"adam_epsilon must be a finite number > 0 (lora_A's first gradient is 0, since B "
                             f"starts at 0, and AdamW's update of it with eps = 0 is 0/0), got {self.adam_epsilon!r}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay * self.learning_rate < 1):
            raise ValueError(f"weight_decay must be >= 0 with learning_rate * weight_decay < 1 (AdamW multiplies "
                             f"the weights by 1 - lr * weight_decay each step), got {self.weight_decay!r}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.pack_length is not None:
            if not self.packing:
                raise ValueError(f"pack_length={self.pack_length} needs packing=True (the length of a packed row)")
            if isinstance(self.pack_length, bool) or not isinstance(self.pack_length, int) \
                    or self.pack_length < self.max_length:
                raise ValueError(f"pack_length must be an integer >= max_length={self.max_length} (every example "
                                 f"must fit a row), got {self.pack_length!r}")
        if self.lr_scheduler not in SCHEDULES:
            raise ValueError(f"lr_scheduler must be one of {SCHEDULES}, got {self.lr_scheduler!r}")
        from ..optim import canonical_optimizer_name

        object.__setattr__(self, "optimizer", canonical_optimizer_name(self.optimizer))
        object.__setattr__(self, "target_modules", target_module_names(self.target_modules))
        # the model package validates these (one place for each rule); re-raised naming our fields
        try:
            lora = self.lora_config()
        except ValueError as e:
            raise ValueError(f"LoRA settings: {e}") from None
        object.__setattr__(self, "target_modules", tuple(lora.target_modules))
        from ..checks import REFERENCE_QUANT_TYPES_4BIT

        if self.quant_type not in ("none", *REFERENCE_QUANT_TYPES_4BIT):  # "none" is ours: float weights
            raise ValueError(f"quant_type must be one of {', '.join(REFERENCE_QUANT_TYPES_4BIT)} or none, got "
                             f"{self.quant_type!r}")
        self.quant_config()

    # ------------------------------------------------------------------------------------------ derived configs
    def lora_config(self) -> LoraConfig:
        return LoraConfig(r=self.lora_r, alpha=float(self.lora_alpha), dropout=float(self.lora_dropout),
                          target_modules=self.target_modules, seed=self.seed)

    def quant_config(self) -> QuantConfig | None:
        """None when ``quant_type == "none"`` (float weights: plain LoRA, used by exactness tests)."""
        if self.quant_type == "none":
            return None
        return QuantConfig(quant_type=self.quant_type, blocksize=self.blocksize, double_quant=self.double_quant,
                           compute_dtype=self.compute_dtype)

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps

    # ------------------------------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)  # target_modules: a JSON list, or a comma-separated string (``target_module_names``)

    @classmethod
    def from_json(cls, path) -> TrainConfig:
        path = Path(path)
        d = read_json_object(path)
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def resume_mismatches(self, saved: TrainConfig) -> list[str]:
        """Fields that differ from ``saved`` and would make a resumed run a different run."""
        mine, theirs = self.to_dict(), saved.to_dict()
        return [k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs.get(k)]


#: the recipe ``qlora finetune`` writes beside its adapter (``loop.train``)
TRAIN_CONFIG_FILE = "train_config.json"


def adapter_recipe(adapter_dir) -> TrainConfig | None:
    """The ``TrainConfig`` an adapter was trained with: the ``train_config.json`` ``qlora finetune`` wrote beside
    it, or None where there is none (an adapter from peft). A damaged file is an error naming it."""
    path = Path(adapter_dir) / TRAIN_CONFIG_FILE
    return TrainConfig.from_json(path) if path.is_file() else None
