"""The QLoRA fine-tuning loop (the paper has no algorithms: this is Phuong & Hutter's Formal Algorithms for
Transformers, Algorithm 13 DTraining, with a frozen 4-bit base), written once for both backends.

    freeze(W_NF4); opt <- PagedAdamW(Theta_LoRA, lr)
    for each optimizer step:
        for each of the gradient_accumulation_steps micro-batches:
            L <- cross entropy of the responses (summed, divided by the step's number of response tokens)
            g_Theta += dL / dTheta_LoRA        (backpropagated through dequant(W_NF4) in bf16)
        clip g_Theta to global norm max_grad_norm (0.3)
        opt.step(g_Theta) with the lr of the configured schedule (the recipe's "constant": no warmup); g_Theta <- 0

What a backend provides (``StepBackend``): a forward+backward of one micro-batch that accumulates the LoRA
gradients, the clipped optimizer step, a held-out loss, and its state as NumPy arrays (adapters, optimizer,
random generators) for checkpoints. ``RefTrainer`` (``qlora_ref.train.reference``) and ``qlora_gpu.train.
GpuTrainer`` implement it; everything else — data order, accumulation, the schedule, evaluation, logging,
checkpoints and exact resume — is here.

Data order is a pure function of the seed: epoch ``e`` is ``qlora_ref.data.batch_indices(dataset, seed=seed,
epoch=e)`` (length-grouped, as the paper's scripts train; with ``packing``, ``packed_batch_indices``), so the data
position is just ``(epoch, batch)`` and resuming from a checkpoint replays exactly the batches an uninterrupted
run would have seen.

Several processes can train one model together (``qlora_gpu.fsdp_train``: FSDP over N GPUs): a backend with a
``world`` (``SingleProcess``'s interface) makes every process draw the same micro-batches of each step, train on
its own equal share of them with the loss divided by the whole step's number of targets, and sum the logged loss
and the held-out loss over the processes; the progress bar, the logs and every file come from rank 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..adapters import ADAPTER_WEIGHTS
from ..data import batch_indices, batch_of, packed_batch_indices
from ..files import check_finite, model_fingerprint
from ..loss import count_targets
from ..optim.schedule import get_lr, warmup_steps
from .checkpoint import (
    CHECKPOINT_PREFIX,
    MARKER_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    STATE_FILE,
    Checkpoint,
    DamagedCheckpointError,
    OtherBackendError,
    damaged_marker,
    foreign_checkpoint,
    load_checkpoint,
    new_run_id,
    recover_checkpoints,
    resume_candidates,
    run_lock,
    save_checkpoint,
)
from .config import TRAIN_CONFIG_FILE, TrainConfig
from .init_adapter import load_init_adapter
from .progress import Progress


# ---------------------------------------------------------------------------------------------- batches
def n_targets(batch: dict) -> int:
    """Counted next-token targets of a batch (``qlora_ref.loss.count_targets`` of its labels)."""
    return count_targets(batch["labels"])


def n_tokens(batch: dict) -> int:
    """Real (non-padding) tokens of a batch."""
    return int(batch["attention_mask"].sum())


class BatchStream:
    """An endless stream of training micro-batches: epoch after epoch of ``qlora_ref.data.batch_indices`` (the
    length-grouped order of the paper's scripts, a pure function of ``(seed, epoch)``). Its position
    ``(epoch, batch)`` is all a checkpoint needs to continue the stream exactly."""

    def __init__(self, dataset, batch_size: int, seed: int, epoch: int = 0, batch: int = 0,
                 group_by_length: bool = True, packing: bool = False, pack_length: int | None = None):
        if len(dataset) == 0:
            raise ValueError("the training set is empty (every example was dropped; see the data report)")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.group_by_length, self.packing, self.pack_length = group_by_length, packing, pack_length
        self.epoch, self.batch = epoch, batch
        self._epoch_of, self._batches = None, None

    def _epoch_batches(self) -> list[list]:
        if self._epoch_of != self.epoch:  # packed: lists of packs of example indices; else of example indices
            self._batches = packed_batch_indices(self.dataset, self.batch_size, seed=self.seed, epoch=self.epoch,
                                                 pack_length=self.pack_length) \
                if self.packing else batch_indices(self.dataset, self.batch_size, shuffle=True,
                                                   group_by_length=self.group_by_length, seed=self.seed,
                                                   epoch=self.epoch)
            self._epoch_of = self.epoch
        return self._batches

    def next(self) -> dict:
        idx = self._epoch_batches()[self.batch]
        self.batch += 1
        if self.batch == len(self._batches):
            self.epoch, self.batch = self.epoch + 1, 0
        return batch_of(self.dataset, idx)

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}


# ---------------------------------------------------------------------------------------------- the backend
class StepBackend(Protocol):
    """One backend's side of the loop; every array that crosses this boundary is NumPy."""

    lora: object  # LoraConfig

    def forward_backward(self, batch: dict, num_items: int) -> float:
        """Loss of the micro-batch summed over its targets / ``num_items``; accumulates LoRA gradients."""

    def optimizer_step(self, lr: float, max_grad_norm: float) -> float:
        """Clip the accumulated gradients (if ``max_grad_norm`` > 0), step, zero them; returns the norm."""

    def eval_loss(self, batch: dict) -> tuple[float, int]:
        """(summed next-token negative log-likelihood over targets, number of targets), no dropout."""

    def adapter_state(self) -> dict[str, np.ndarray]: ...
    def load_adapter_state(self, params: dict[str, np.ndarray]) -> None: ...
    def optimizer_state(self) -> dict[str, np.ndarray]: ...
    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None: ...
    def rng_state(self) -> tuple[dict, dict[str, np.ndarray]]: ...
    def set_rng_state(self, state: dict, arrays: dict[str, np.ndarray]) -> None: ...
    def memory_bytes(self) -> int | None: ...


# ---------------------------------------------------------------------------------------------- processes
class SingleProcess:
    """The processes that train together, as the loop sees them: here one. A backend training over several
    (``qlora_gpu.fsdp_train.World``) has a ``world`` attribute with the same interface."""

    rank = 0
    world_size = 1

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over all processes."""
        return list(values)

    def barrier(self) -> None:
        """Wait until every process gets here."""


def world_of(backend) -> SingleProcess:
    return getattr(backend, "world", None) or SingleProcess()


def my_share(items: list, world) -> list:
    """This process's share of ``items``: the ``world.rank``-th of ``world.world_size`` equal, consecutive parts
    (a length that does not divide is an error: every process must run as many forward passes)."""
    n, size = len(items), world.world_size
    if n % size:
        raise ValueError(f"{n} micro-batches per step cannot be shared equally by {size} processes: make "
                         f"gradient_accumulation_steps a multiple of the number of processes")
    k = n // size
    return items[world.rank * k:(world.rank + 1) * k]


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(backend: StepBackend, dataset, batch_size: int, max_batches: int = 0, progress: bool = False) -> dict:
    """Held-out loss (mean next-token NLL over the response tokens of ``dataset``, a ``TokenizedDataset``) and
    perplexity exp(loss); the first ``max_batches`` batches in file order (0: all). Several processes share the
    batches (each runs as many forward passes: one short of a batch repeats its first and ignores the result).
    ``progress``: a bar over the batches (rank 0), for an evaluation on its own (``qlora evaluate``)."""
    if dataset is None or len(dataset) == 0:
        return {"eval_loss": float("nan"), "eval_perplexity": float("nan"), "eval_targets": 0}
    world = world_of(backend)
    total, count = 0.0, 0
    batches = batch_indices(dataset, batch_size, shuffle=False, group_by_length=False)
    if max_batches:
        batches = batches[:max_batches]
    per_rank = -(-len(batches) // world.world_size)
    steps = range(per_rank)
    if progress and world.rank == 0:
        from ..bars import progress_iter  # a bar on a terminal, plain lines in a log

        steps = progress_iter(steps, per_rank, desc="evaluate", unit="batch")
    for j in steps:
        i = world.rank + j * world.world_size
        nll, n = backend.eval_loss(batch_of(dataset, batches[i] if i < len(batches) else batches[0]))
        if i < len(batches):
            total += nll
            count += n
    total, count = world.sum([total, count])
    count = int(count)
    loss = total / count if count else float("nan")
    return {"eval_loss": loss, "eval_perplexity": math.exp(loss) if count else float("nan"), "eval_targets": count}


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    step: int
    train_losses: list[float]  # one per optimizer step of this call (resumed runs: only the new steps)
    log_history: list[dict] = field(default_factory=list)  # the whole run's, across resumes
    eval: dict | None = None
    output_dir: Path | None = None
    seconds: float = 0.0
    tokens_per_second: float = 0.0


def _adapter_config(backend, config: TrainConfig, base_model: str | None) -> dict:
    from ..adapters import peft_adapter_config

    return peft_adapter_config(backend.lora, base_model)


class TrainingDivergedError(ValueError):
    """A non-finite loss, gradient norm or adapter: the run stops, and nothing non-finite is written."""


def data_fingerprint(dataset) -> dict:
    """What a resumed run must train on: the number of examples and tokens and a SHA-256 of every example's token
    ids and labels in order — the data file, the tokenizer, the chat template and ``max_length`` all enter it."""
    digest = hashlib.sha256()
    tokens = 0
    for ids, labels in zip(dataset.input_ids, dataset.labels, strict=True):
        ids, labels = np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(labels, np.int64)
        digest.update(np.int64(ids.size).tobytes() + ids.tobytes() + labels.tobytes())
        tokens += ids.size
    return {"examples": len(dataset), "tokens": tokens, "sha256": digest.hexdigest()}


def check_same_inputs_on_every_rank(fingerprints: list[tuple[dict, dict | None]]) -> None:
    """Every rank of a sharded run reads the same training and held-out data (their ``data_fingerprint``, in rank
    order): each draws its micro-batches from the same seeded order and its evaluation batches by the same
    count, so a rank with other data would train on the wrong examples, or wait forever in a collective the
    others never enter. Raised on every rank alike, from the gathered list."""
    def shown(f):
        return "none" if f is None else f"{f['examples']} examples, {f['tokens']} tokens"

    for what, index in (("training", 0), ("held-out", 1)):
        theirs = [f[index] for f in fingerprints]
        if (rank := _first_differing_rank(theirs)) is not None:
            raise ValueError(f"the processes read different {what} data: rank {rank} has {shown(theirs[rank])}, "
                             f"rank 0 {shown(theirs[0])}; every process must be given the same data files (on a "
                             "file system all machines see)")


def check_same_resume_on_every_rank(steps: list[int | None]) -> None:
    """Every rank resumes from the same checkpoint step (None: a new run), in rank order: ranks that see different
    output folders (not one shared file system) would otherwise continue different runs."""
    def shown(s):
        return "a new run" if s is None else f"checkpoint-{s}"

    if (rank := _first_differing_rank(steps)) is not None:
        raise ValueError(f"the processes resume differently: rank {rank} from {shown(steps[rank])}, rank 0 from "
                         f"{shown(steps[0])}; the output folder must be one all processes (all machines) see")


def _first_differing_rank(values: list) -> int | None:
    """The first rank whose value (gathered in rank order) is not rank 0's; None where all agree."""
    return next((rank for rank, v in enumerate(values) if v != values[0]), None)


def make_checkpoint(backend: StepBackend, config: TrainConfig, step: int, stream: BatchStream, tokens_seen: int,
                    log_history: list[dict], base_model: str | None, run: dict) -> Checkpoint:
    """``run``: the run's ``run_id``, ``run_started`` and ``data_fingerprint``, stored with the state."""
    rng_json, rng_arrays = backend.rng_state()
    state = {**run, "data_position": stream.position, "tokens_seen": tokens_seen, "log_history": log_history,
             "config": config.to_dict(), "rng": rng_json, "base_model": base_model}
    return Checkpoint(step=step, adapter=backend.adapter_state(), adapter_config=_adapter_config(
        backend, config, base_model), optimizer_state=backend.optimizer_state(), state=state, rng_arrays=rng_arrays)


def check_same_base_model(ckpt: Checkpoint, base_model: str | None, fingerprint: str | None = None) -> None:
    """Refuse to resume a checkpoint on another base model: its adapters were trained against that model's weights.
    Where the checkpoint and this run both have the model's ``files.model_fingerprint``, the fingerprints decide:
    a copy elsewhere resumes, a folder whose weights were replaced does not. Otherwise (a checkpoint written
    before fingerprints, a hub id) two paths that both exist here compare by the file or folder they are; a saved
    path that no longer exists compares by name, and a run without a recorded base model passes."""
    saved, theirs = ckpt.state.get("base_model"), ckpt.state.get("base_model_fingerprint")
    if theirs is not None and fingerprint is not None:
        if theirs != fingerprint:
            raise ValueError(f"{ckpt.path}: cannot resume, the checkpoint was trained on other base model weights "
                             f"than {base_model} holds now (it was trained on {saved}; fingerprints "
                             f"{theirs[-12:]} then, {fingerprint[-12:]} now). Resume with that model, or start "
                             "afresh in another output folder")
        return
    if saved is None or base_model is None or saved == base_model:
        return
    a, b = Path(saved), Path(base_model)
    same = os.path.samefile(a, b) if a.exists() and b.exists() else a.name == b.name
    if not same:
        raise ValueError(f"{ckpt.path}: cannot resume, the checkpoint was trained on the base model {saved}, not "
                         f"{base_model}. Resume with that model, or start afresh in another output folder")


def restore_checkpoint(backend: StepBackend, ckpt: Checkpoint, config: TrainConfig,
                       fingerprint: dict | None = None) -> tuple[dict, int, list]:
    """Put a checkpoint's adapters, optimizer state and random states into ``backend``; returns (data position,
    tokens seen, log history). A checkpoint of a different recipe, or of different training data (``fingerprint``,
    see :func:`data_fingerprint`), is refused, naming the differences."""
    saved = TrainConfig.from_dict(ckpt.state["config"])
    bad = config.resume_mismatches(saved)
    if bad:
        raise ValueError(f"{ckpt.path}: cannot resume, the checkpoint was trained with different settings: "
                         + ", ".join(f"{k}={getattr(saved, k)!r} (now {getattr(config, k)!r})" for k in bad))
    theirs = ckpt.state["data_fingerprint"]
    if fingerprint is not None and theirs != fingerprint:
        raise ValueError(
            f"{ckpt.path}: cannot resume, the training data differ from the checkpoint's: it was trained on "
            f"{theirs['examples']} examples / {theirs['tokens']} tokens (sha256 {theirs['sha256'][:12]}), now "
            f"{fingerprint['examples']} / {fingerprint['tokens']} (sha256 {fingerprint['sha256'][:12]}). Resume "
            "with the same data file, held-out split (eval_fraction, eval_data), tokenizer and max_length, or start "
            "afresh in another output folder")
    if saved.max_steps != config.max_steps and config.lr_scheduler != "constant":
        warnings.warn(f"{ckpt.path}: max_steps changed from {saved.max_steps} to {config.max_steps} on resume: the "
                      f"{config.lr_scheduler!r} schedule and its warmup follow the new length from step "
                      f"{ckpt.step + 1} on, so the learning rate jumps there and the run equals neither the old one "
                      "nor a fresh one of the new length", stacklevel=4)
    missing = sorted(set(backend.adapter_state()) - set(ckpt.adapter))
    if missing:
        raise DamagedCheckpointError(f"{ckpt.path / ADAPTER_WEIGHTS}: lacks adapter tensors {missing[:3]}")
    rng_file = STATE_FILE if ckpt.state["rng"].get("backend") == "ref" else RNG_FILE  # where the backend keeps it
    for file, load in ((ADAPTER_WEIGHTS, lambda: backend.load_adapter_state(ckpt.adapter)),
                       (OPTIMIZER_FILE, lambda: backend.load_optimizer_state(ckpt.optimizer_state)),
                       (rng_file, lambda: backend.set_rng_state(ckpt.state["rng"], ckpt.rng_arrays))):
        try:
            load()
        except OtherBackendError as e:
            raise ValueError(f"{ckpt.path}: {e}") from None
        # a missing or extra key, a wrong shape (KeyError, ValueError; torch: RuntimeError): damage, not a refusal
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise DamagedCheckpointError(f"{ckpt.path / file}: does not fit this model ({e})") from None
    return dict(ckpt.state["data_position"]), int(ckpt.state["tokens_seen"]), list(ckpt.state["log_history"])


def find_resume_checkpoint(output_dir, resume: bool | str | Path, use=None) -> Checkpoint | None:
    """The checkpoint to continue from: ``resume`` itself if it is a path; with ``resume=True`` the newest usable
    one in ``output_dir`` — an unreadable newest one (a corrupt file) or a damaged one (``use(ckpt)``, which
    restores it, raises :class:`DamagedCheckpointError`) is skipped with a warning and the one before it taken;
    an error if none can be used. Any other error of ``use`` (a changed recipe) is a refusal and passes."""
    if isinstance(resume, str | Path):
        ckpt = load_checkpoint(resume)
        if use is not None:
            use(ckpt)
        return ckpt
    if not resume or output_dir is None:
        return None
    for p in sorted(Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")):  # ours, perhaps: say why it is passed over
        if p.is_dir() and (why := damaged_marker(p)):
            warnings.warn(f"{p / MARKER_FILE}: damaged checkpoint marker ({why}); not resumed from", stacklevel=3)
    candidates = resume_candidates(output_dir)
    errors = []
    for i, path in enumerate(candidates):
        try:
            ckpt = load_checkpoint(path)
        except ValueError as e:
            errors.append(str(e))
            what = "unreadable"
        else:
            try:
                if use is not None:
                    use(ckpt)  # any other ValueError is a refusal, which no older checkpoint would change
                return ckpt
            except DamagedCheckpointError as e:
                errors.append(str(e))
                what = "damaged"
        if i + 1 < len(candidates):
            warnings.warn(f"{path} is {what} ({errors[-1]}); resuming from the one before it, "
                          f"{candidates[i + 1].name}", stacklevel=3)
    if errors:
        raise ValueError(f"{output_dir}: no usable checkpoint to resume from: " + "; ".join(errors)
                         + ". Start afresh (resume=False, --no-resume) in another output folder")
    return None


def _colliding_checkpoints(output_dir: Path, run_id: str, step: int, last: int, config: TrainConfig) -> list[Path]:
    """Folders ``checkpoint-N`` that this run would write (steps ``step < N <= last``) but did not write itself."""
    out = []
    for p in output_dir.iterdir():
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name)
        n = int(m.group(1)) if m else 0
        planned = n == last or (config.save_every and n % config.save_every == 0 and n < config.max_steps)
        if m and step < n <= last and planned and foreign_checkpoint(output_dir, n, run_id) is not None:
            out.append(p)
    return sorted(out)


def checkpoint_recipe(folder: Path) -> TrainConfig | None:
    """The ``TrainConfig`` the qlora checkpoint ``folder`` was trained with (None if unreadable)."""
    try:
        return TrainConfig.from_dict(json.loads((Path(folder) / STATE_FILE).read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _same_recipe(folder: Path, config: TrainConfig) -> bool:
    """Whether the qlora checkpoint ``folder`` was trained with ``config``'s recipe (False if unreadable)."""
    saved = checkpoint_recipe(folder)
    return saved is not None and not config.resume_mismatches(saved)


def check_no_foreign_checkpoints(output_dir: Path, run_id: str, step: int, last: int, config: TrainConfig,
                                 fresh: bool = False) -> None:
    """Refuse a run that would replace checkpoints it did not write (``_colliding_checkpoints``), saying whose
    they are: a damaged marker is reported as such; a ``fresh`` (``--no-resume``) run colliding with a run of the
    same recipe is told to resume it instead."""
    taken = _colliding_checkpoints(output_dir, run_id, step, last, config)
    if not taken:
        return
    damaged = [(p, why) for p in taken if p.is_dir() and (why := damaged_marker(p))]
    if damaged:
        p, why = damaged[0]
        raise ValueError(f"{p / MARKER_FILE}: damaged checkpoint marker ({why}), so {p.name} cannot be told "
                         f"apart from another run's and is never replaced; nothing was changed: if it is this "
                         f"folder's own, delete {p.name} (resuming then starts from the checkpoint before it)")
    same = fresh and all(p.is_dir() and _same_recipe(p, config) for p in taken)  # e.g. a killed --no-resume run
    whose, todo = (("an earlier run's with these same settings", "to continue that run, run the same command "
                    "without --no-resume; to start afresh, ") if same
                   else ("another run's, or a Hugging Face Trainer's", ""))
    raise ValueError(f"{output_dir}: {', '.join(p.name for p in taken)} would be replaced by this run's "
                     f"checkpoints but were not written by it ({whose}); nothing was changed: {todo}choose another "
                     "output folder or move them away")


def train(backend: StepBackend, train_data, config: TrainConfig, *, eval_data=None, output_dir=None,
          resume: bool | str = True, base_model: str | None = None, stop_after: int | None = None) -> TrainResult:
    """Run (or continue) a fine-tune to ``config.max_steps`` optimizer steps (``_train``), holding the output
    folder's lock (``run_lock``, the writing process only) for the whole run."""
    from ..paths import check_writable_dir

    if output_dir is not None:
        check_writable_dir(output_dir, "output_dir")
    lock = run_lock(output_dir) if output_dir is not None and world_of(backend).rank == 0 else contextlib.nullcontext()
    with lock:
        return _train(backend, train_data, config, eval_data=eval_data, output_dir=output_dir, resume=resume,
                      base_model=base_model, stop_after=stop_after)


def _train(backend: StepBackend, train_data, config: TrainConfig, *, eval_data=None, output_dir=None,
           resume: bool | str = True, base_model: str | None = None, stop_after: int | None = None) -> TrainResult:
    """Run (or continue) a fine-tune to ``config.max_steps`` optimizer steps.

    train_data / eval_data: ``qlora_ref.data.TokenizedDataset``s. output_dir: where checkpoints (every
    ``save_every`` steps and at the end) and the final adapter go; None writes nothing. resume: True continues
    from the newest checkpoint in ``output_dir`` if there is one, a path continues from that checkpoint, False
    starts afresh. stop_after: stop (with a checkpoint) after this many optimizer steps *of this call*, as an
    interruption would.

    Before the first step: ``output_dir`` must be a writable folder, leftovers of an interrupted save are tidied
    (``recover_checkpoints``), a resumed checkpoint must match the recipe and the data, and no ``checkpoint-N``
    this run would write may belong to anyone else (it is never replaced). A non-finite loss, gradient norm or
    adapter stops the run with :class:`TrainingDivergedError`, naming the step; the last good checkpoint stays.
    """
    output_dir = Path(output_dir) if output_dir is not None else None
    world = world_of(backend)
    main = world.rank == 0  # the one process that prints and writes
    my_share([None] * config.gradient_accumulation_steps, world)  # a bad split fails before any work
    if output_dir is not None:  # ``train`` checked it is a writable folder
        if main:
            for line in recover_checkpoints(output_dir):
                warnings.warn(f"{output_dir}: {line}", stacklevel=2)
        world.barrier()

    def stream_at(epoch: int = 0, batch: int = 0) -> BatchStream:
        return BatchStream(train_data, config.micro_batch_size, config.seed, epoch=epoch, batch=batch,
                           packing=config.packing, pack_length=config.pack_length)

    stream = stream_at()  # checks the data first: an empty training set fails before any checkpoint is read
    step, tokens_seen, log_history = 0, 0, []
    fingerprint = data_fingerprint(train_data)
    run = {"run_id": new_run_id(), "run_started": time.time(), "data_fingerprint": fingerprint,
           "base_model_fingerprint": model_fingerprint(base_model) if base_model is not None else None}
    if world.world_size > 1:  # one identity for the run, rank 0's: the one its checkpoints carry
        held_out = data_fingerprint(eval_data) if eval_data is not None else None
        runs = world.gather_objects((run, held_out))
        check_same_inputs_on_every_rank([(r["data_fingerprint"], h) for r, h in runs])  # on all alike: no hang
        run = runs[0][0]
    restored = []

    def use(ckpt):  # refusals (ValueError) stop the run; a damaged checkpoint falls back to the one before
        if ckpt.step > config.max_steps:
            raise ValueError(f"{ckpt.path}: checkpoint is at step {ckpt.step}, beyond max_steps={config.max_steps}: "
                             f"give max_steps={ckpt.step} or more to continue it, or another output folder for a "
                             "shorter run (an earlier checkpoint's adapter is in its folder)")
        check_same_base_model(ckpt, base_model, run["base_model_fingerprint"])
        restored[:] = restore_checkpoint(backend, ckpt, config, fingerprint)

    ckpt = find_resume_checkpoint(output_dir, resume, use)
    if world.world_size > 1:
        check_same_resume_on_every_rank(world.gather_objects(None if ckpt is None else ckpt.step))
    if ckpt is None:  # a new run: its adapters start from init_adapter's, if given (a resumed one, its checkpoint's)
        load_init_adapter(backend, config, run["base_model_fingerprint"])
    last_saved = None
    if ckpt is not None:
        pos, tokens_seen, log_history = restored
        step, last_saved = ckpt.step, ckpt.path
        run.update(run_id=ckpt.run_id, run_started=ckpt.state["run_started"])
        stream = stream_at(pos["epoch"], pos["batch"])
    if output_dir is not None:
        last = config.max_steps if stop_after is None else min(config.max_steps, step + stop_after)
        check_no_foreign_checkpoints(output_dir, run["run_id"], step, last, config,
                                     fresh=ckpt is None and resume is False)

    n_warmup = warmup_steps(config.max_steps, config.warmup_ratio)
    has_eval = eval_data is not None and len(eval_data) > 0
    losses: list[float] = []
    last_eval = None
    t0 = time.perf_counter()
    new_tokens = 0

    def diverged(at_step, what):
        kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint of this run was written"
        return TrainingDivergedError(
            f"step {at_step}: training diverged ({what}); stopped, and nothing of this step was saved: {kept}. "
            f"Lower the learning rate (now {config.learning_rate:g}) or clip the gradients (max_grad_norm, now "
            f"{config.max_grad_norm:g})")

    def save(at_step):
        nonlocal last_saved
        if output_dir is None:
            return
        # every process gathers its share of the state, rank 0 writes it
        ckpt = make_checkpoint(backend, config, at_step, stream, tokens_seen, log_history, base_model, run)
        try:
            check_finite(ckpt.adapter, "the adapters")
            check_finite(ckpt.optimizer_state, "the optimizer state")
        except ValueError as e:
            raise diverged(at_step, str(e)) from None
        if main:
            last_saved = save_checkpoint(output_dir, ckpt, keep=config.keep_checkpoints)
        world.barrier()

    def run_eval(bar, at_step):
        result = evaluate(backend, eval_data, config.micro_batch_size, config.eval_batches)
        if main:
            bar.write(f"step {at_step}: held-out loss {result['eval_loss']:.4f}, "
                      f"perplexity {result['eval_perplexity']:.3f}")
        return result

    with Progress(config.max_steps, initial=step, enabled=config.progress and main) as bar:
        while step < config.max_steps and (stop_after is None or len(losses) < stop_after):
            micro = [stream.next() for _ in range(config.gradient_accumulation_steps)]
            num_items = sum(n_targets(b) for b in micro)  # the whole step's targets weigh equally
            loss = 0.0
            for b in my_share(micro, world):
                loss += backend.forward_backward(b, max(num_items, 1))
            if world.world_size > 1:
                (loss,) = world.sum([loss])
            if not math.isfinite(loss):  # before the optimizer step: the adapters are still those of the last step
                raise diverged(step + 1, f"the training loss is {loss}")
            lr = get_lr(config.lr_scheduler, step, config.learning_rate, config.max_steps, config.warmup_ratio,
                        n_warmup)
            norm = backend.optimizer_step(lr, config.max_grad_norm)
            if not math.isfinite(norm):
                raise diverged(step + 1, f"the gradient norm is {norm}")
            step += 1
            n_tok = sum(n_tokens(b) for b in micro)
            tokens_seen += n_tok
            new_tokens += n_tok
            losses.append(loss)
            entry = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": tokens_seen}
            bar.update(step, loss=loss, lr=lr, tokens=n_tok, memory=backend.memory_bytes(), grad_norm=norm)
            if has_eval and (step == config.max_steps or (config.eval_every and step % config.eval_every == 0)):
                last_eval = run_eval(bar, step)
                entry.update(last_eval)
            log_history.append(entry)
            if config.save_every and step % config.save_every == 0 and step < config.max_steps:
                save(step)
    save(step)
    seconds = time.perf_counter() - t0
    if output_dir is not None and step >= config.max_steps:
        from ..adapters import INCOMPLETE_FILE, write_adapter_files
        from ..files import atomic_write_json, fsync_dir

        adapter = backend.adapter_state()
        if main:
            # four files replaced one by one: a kill in between would mix two runs' files, so readers refuse the
            # folder while this mark exists, and a rerun (resuming from checkpoint-<max_steps>) rewrites them all
            mark = output_dir / INCOMPLETE_FILE
            atomic_write_json(mark, {"step": step, "run_id": run["run_id"], "writing": [
                ADAPTER_WEIGHTS, "adapter_config.json", TRAIN_CONFIG_FILE, "log_history.json"]})
            write_adapter_files(output_dir, adapter, _adapter_config(backend, config, base_model),
                                run["base_model_fingerprint"])
            atomic_write_json(output_dir / TRAIN_CONFIG_FILE, config.to_dict())
            atomic_write_json(output_dir / "log_history.json", log_history)
            mark.unlink()
            fsync_dir(output_dir)
        world.barrier()
    return TrainResult(step=step, train_losses=losses, log_history=log_history, eval=last_eval,
                       output_dir=output_dir, seconds=seconds,
                       tokens_per_second=new_tokens / seconds if seconds > 0 else 0.0)
