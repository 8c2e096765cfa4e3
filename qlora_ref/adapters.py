"""LoRA adapters on disk in PEFT's format (merging them into a model, and other exports: ``qlora_ref.export``).

QLoRA trains only the adapters (paper, abstract: "QLoRA backpropagates gradients through a frozen, 4-bit quantized
pretrained language model into Low Rank Adapters (LoRA)"), so the result of a fine-tune is a small adapter file.
We write exactly what PEFT's ``PeftModel.save_pretrained`` writes, so
``peft.PeftModel.from_pretrained(transformers_model, DIR)`` loads it and PEFT adapters load here:

- ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``,
  ``bias: "none"``, ``task_type: "CAUSAL_LM"``, ``fan_in_fan_out: false``, ...
- ``adapter_model.safetensors``: for every adapted linear layer ``L`` (e.g. ``model.layers.0.self_attn.q_proj``)
  ``base_model.model.L.lora_A.weight`` (r x in) and ``base_model.model.L.lora_B.weight`` (out x r), float32.

In memory both backends name the adapters without PEFT's ``base_model.model.`` prefix
(``model.layers.0.self_attn.q_proj.lora_A.weight``, see ``LlamaModel.lora_parameters``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .dtypes import host_array
from .files import (
    atomic_save_safetensors,
    atomic_write_json,
    check_finite,
    load_safetensors,
    model_fingerprint,
    read_json_object,
    tensors_sha256,
)
from .model.config import LINEAR_MODULES, LoraConfig
from .model.linear import add_adapters

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: the metadata key of ``adapter_model.safetensors`` that holds the base model's fingerprint
BASE_FINGERPRINT_KEY = "qlora.base_model_fingerprint"
#: the weights file's metadata key for ``files.tensors_sha256`` of its tensors (peft ignores it; peft's re-save drops
#: it, and a file without it is read unchecked)
TENSORS_SHA256_KEY = "qlora.tensors_sha256"
#: present while ``qlora finetune`` replaces a folder's final files one by one (``loop.train``): a folder holding it
#: may mix two runs' files (a kill in between), so it is refused until a finished run removes it
INCOMPLETE_FILE = "qlora_write_incomplete.json"
#: why a pickle-only file is refused (docs/reliability.md: no pickle, ever)
_NO_PICKLE = "PEFT's old pickle format, never unpickled here: unpickling can run code; safetensors only"
PEFT_PREFIX = "base_model.model."
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")

#: the fields PEFT writes; values that we do not support must keep these defaults when reading
_PEFT_DEFAULTS = {
    "alpha_pattern": {},
    "auto_mapping": None,
    "bias": "none",
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_bias": False,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "rank_pattern": {},
    "revision": None,
    "task_type": "CAUSAL_LM",
    "use_dora": False,
    "use_rslora": False,
}


# ---------------------------------------------------------------------------------------------- config
def peft_adapter_config(lora: LoraConfig, base_model_name_or_path: str | None = None) -> dict:
    """The ``adapter_config.json`` PEFT writes for a LoRA adapter with these settings."""
    cfg = dict(_PEFT_DEFAULTS)
    cfg.update({
        "peft_type": "LORA",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(lora.r),
        "lora_alpha": float(lora.alpha) if float(lora.alpha) != int(lora.alpha) else int(lora.alpha),
        "lora_dropout": float(lora.dropout),
        "target_modules": sorted(lora.target_modules, key=LINEAR_MODULES.index),
        "use_rslora": lora.use_rslora,
    })
    return cfg


def _check_adapter_config(cfg: dict, source: str) -> None:
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: adapter config must be a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{source}: peft_type must be 'LORA', got {cfg.get('peft_type')!r}")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ValueError(f"{source}: missing {key!r}")
    r, alpha, dropout = cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{source}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{source}: lora_alpha must be a finite positive number, got {alpha!r}")
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, int | float)
                                or not 0 <= dropout < 1):
        raise ValueError(f"{source}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    tm = cfg.get("target_modules")
    if not (tm is None or isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
        raise ValueError(f"{source}: target_modules must be a string or a list of strings, got {tm!r}")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise ValueError(f"{source}: use_rslora must be true or false, got {cfg['use_rslora']!r}")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False}
    for key, ok in unsupported.items():
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{source}: {key}={cfg[key]!r} is not supported (only plain LoRA: {key}={ok!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{source}: per-module {key} is not supported (one r and alpha for all layers)")
    if cfg.get("modules_to_save"):
        raise ValueError(f"{source}: modules_to_save={cfg['modules_to_save']!r} is not supported "
                         "(QLoRA trains adapters only)")
    if cfg.get("layer_replication"):
        raise ValueError(f"{source}: layer_replication is not supported")


def lora_config_from_adapter(adapter_config: dict, weights: Mapping[str, np.ndarray] | None = None,
                             source: str = ADAPTER_CONFIG) -> LoraConfig:
    """The ``LoraConfig`` a model must be built with to take this adapter. The target modules are the short
    names (``q_proj`` ...) of the layers the weights adapt (PEFT's ``target_modules`` may be full names, a
    regular expression or "all-linear"; the weights are what counts)."""
    _check_adapter_config(adapter_config, source)
    r = adapter_config["r"]
    if weights:
        targets = sorted({k.split(".")[-3] for k in weights}, key=lambda n: LINEAR_MODULES.index(n)
                         if n in LINEAR_MODULES else len(LINEAR_MODULES))
    else:
        tm = adapter_config.get("target_modules") or []
        tm = LINEAR_MODULES if tm == "all-linear" else [t.split(".")[-1] for t in ([tm] if isinstance(tm, str)
                                                                                     else tm)]
        targets = [t for t in LINEAR_MODULES if t in set(tm)]
    try:
        return LoraConfig(r=r, alpha=float(adapter_config["lora_alpha"]),
                          dropout=float(adapter_config.get("lora_dropout", 0.0) or 0.0), target_modules=tuple(targets),
                          use_rslora=adapter_config.get("use_rslora", False))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


# ---------------------------------------------------------------------------------------------- files
def to_peft_keys(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``model.layers.0...lora_A.weight`` -> ``base_model.model.model.layers.0...lora_A.weight`` (float32)."""
    out = {}
    for k, v in params.items():
        if not k.endswith(_LORA_SUFFIXES):
            raise ValueError(f"adapter tensor names must end with .lora_A.weight or .lora_B.weight, got {k!r}")
        out[k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k] = np.ascontiguousarray(v, dtype=np.float32)
    return out


def from_peft_keys(tensors: Mapping[str, np.ndarray], source: str = ADAPTER_WEIGHTS) -> dict[str, np.ndarray]:
    """PEFT's file keys -> in-memory names; checks that every layer has an A and a B of matching rank."""
    out = {}
    for k, v in tensors.items():
        name = k.removeprefix(PEFT_PREFIX)
        # PEFT writes no adapter name into the file; tolerate files saved with one (".lora_A.default.weight")
        name = name.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight",
                                                                                 ".lora_B.weight")
        if not name.endswith(_LORA_SUFFIXES):
            raise ValueError(f"{source}: tensor {k!r} is not a LoRA weight (expected names ending in "
                             ".lora_A.weight / .lora_B.weight)")
        if np.ndim(v) != 2:
            raise ValueError(f"{source}: tensor {k!r} must be 2-D, got shape {np.shape(v)}")
        if name.split(".")[-3] not in LINEAR_MODULES:
            raise ValueError(f"{source}: tensor {k!r} adapts {name.split('.')[-3]!r}, which is not one of the "
                             f"block linears {LINEAR_MODULES}")
        out[name] = np.asarray(v, dtype=np.float32)
    for name, a in out.items():
        if name.endswith(".lora_A.weight"):
            b_name = name[: -len(".lora_A.weight")] + ".lora_B.weight"
            if b_name not in out:
                raise ValueError(f"{source}: {name!r} has no matching {b_name!r}")
            if out[b_name].shape[1] != a.shape[0]:
                raise ValueError(f"{source}: rank mismatch, {name} is {a.shape} and {b_name} is {out[b_name].shape}")
        elif name[: -len(".lora_B.weight")] + ".lora_A.weight" not in out:
            raise ValueError(f"{source}: {name!r} has no matching lora_A")
    return out


def write_adapter_files(folder, params: Mapping[str, np.ndarray], adapter_config: dict,
                        base_fingerprint: str | None = None) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` in ``folder`` (each written atomically). Weights
    holding NaN or Inf are refused: a diverged run never replaces a good adapter with a broken one.
    base_fingerprint: the base model's ``files.model_fingerprint``, kept in the weights file's metadata (which
    peft ignores; an unknown key in ``adapter_config.json`` would make it warn) for ``load_adapter`` to compare;
    beside it the tensors' SHA-256, which ``read_adapter_files`` checks."""
    folder = Path(folder)
    tensors = to_peft_keys(params)
    check_finite(tensors, f"{folder / ADAPTER_WEIGHTS}: not written")
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", TENSORS_SHA256_KEY: tensors_sha256(tensors)}
    metadata |= {BASE_FINGERPRINT_KEY: base_fingerprint} if base_fingerprint else {}
    atomic_save_safetensors(tensors, folder / ADAPTER_WEIGHTS, metadata=metadata)
    atomic_write_json(folder / ADAPTER_CONFIG, adapter_config)
    return folder


def read_adapter_config(folder) -> dict:
    """The checked ``adapter_config.json`` of a PEFT adapter folder, without reading its weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: adapter folder does not exist")
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        hint = f" (adapter_model.bin is {_NO_PICKLE}: convert it to safetensors)" if (
            folder / "adapter_model.bin").exists() else ""
        raise ValueError(f"{folder}: no {ADAPTER_CONFIG}{hint}")
    if (folder / INCOMPLETE_FILE).exists():
        raise ValueError(f"{folder / INCOMPLETE_FILE}: a qlora finetune run was stopped while replacing this "
                         "folder's adapter files, which may now mix two runs; run that finetune command again, "
                         "without --no-resume (it resumes from its last checkpoint and rewrites them)")
    cfg = read_json_object(cfg_path)
    _check_adapter_config(cfg, str(cfg_path))
    return cfg


def read_adapter_files(folder, check_sha256: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """(in-memory-named weights, adapter config) from a PEFT adapter folder; clear errors for bad files.
    ``check_sha256``: the tensors against the SHA-256 the file keeps (False where the file's bytes were checked
    already: a checkpoint's, against its marker)."""
    cfg = read_adapter_config(folder)
    w_path = Path(folder) / ADAPTER_WEIGHTS
    if not w_path.is_file():
        hint = f" (adapter_model.bin is {_NO_PICKLE}: convert it to safetensors)" if (
            Path(folder) / "adapter_model.bin").exists() else ""
        raise ValueError(f"{folder}: no {ADAPTER_WEIGHTS}{hint}")
    tensors = load_safetensors(w_path)
    if check_sha256:
        check_tensors_sha256(w_path, tensors)
    weights = from_peft_keys(tensors, str(w_path))
    if not weights:
        raise ValueError(f"{w_path}: holds no LoRA weights")
    check_finite(weights, str(w_path))
    ranks = {v.shape[0] for k, v in weights.items() if k.endswith(".lora_A.weight")}
    if ranks != {cfg["r"]}:
        raise ValueError(f"{w_path}: lora_A ranks {sorted(ranks)} do not match r={cfg['r']} in {ADAPTER_CONFIG}")
    return weights, cfg


def weights_metadata(folder) -> dict[str, str]:
    """The metadata of the adapter's weights file in ``folder`` (ours: the base model's fingerprint and the
    tensors' SHA-256; peft's: ``format`` only); {} where the file cannot be read (its reader names it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(folder) / ADAPTER_WEIGHTS), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - safetensors raises its own error types
        return {}


def check_tensors_sha256(path, tensors: Mapping[str, np.ndarray]) -> None:
    """The tensors read from the weights file at ``path`` are those written there (the SHA-256 its metadata keeps,
    where ours wrote one): a bit flipped on a disk or in a copy is an error, not silently different outputs."""
    expected = weights_metadata(Path(path).parent).get(TENSORS_SHA256_KEY)
    if expected is not None and tensors_sha256(tensors) != expected:
        raise ValueError(f"{path}: its tensors changed since they were written (their sha256 is not the "
                         f"{expected[:12]}... its metadata keeps): a damaged copy? Copy the adapter again from "
                         f"where it was trained (a deliberate edit: save the file without the {TENSORS_SHA256_KEY} "
                         "metadata)")


def save_adapter(model, folder, base_model_name_or_path: str | None = None) -> Path:
    """Save a model's adapters (any object with ``lora_parameters()`` and ``lora``: either backend's model) in
    PEFT's format; ``model.save_adapter(folder)`` writes the same folder."""
    # a GPU model's adapters are torch tensors, perhaps bfloat16 (which NumPy lacks): float32, as PEFT's files hold
    params = {k: host_array(v.float() if hasattr(v, "detach") else v) for k, v in model.lora_parameters().items()}
    if not params:
        raise ValueError("the model carries no LoRA adapters (built with lora=None or r=0)")
    if base_model_name_or_path is None:  # the path load_model read the model from, when it was loaded so
        base_model_name_or_path = getattr(model, "name_or_path", None)
    fingerprint = model_fingerprint(base_model_name_or_path) if base_model_name_or_path else None
    return write_adapter_files(folder, params, peft_adapter_config(model.lora, base_model_name_or_path),
                               fingerprint)


def check_adapter_base(model, folder) -> None:
    """Warn when the adapter in ``folder`` was trained on other base model weights than ``model`` was loaded from
    (their ``files.model_fingerprint`` differ): it still loads — peft applies an adapter to any base of the right
    shapes — but its outputs are not those it was trained to give. Silent where either fingerprint is unknown."""
    theirs = weights_metadata(folder).get(BASE_FINGERPRINT_KEY)
    base = getattr(model, "name_or_path", None)
    try:
        mine = model_fingerprint(base) if theirs and base else None
    except OSError:  # an unreadable base file: the load itself says so, or has already read it
        mine = None
    if mine is not None and mine != theirs:
        trained_on = read_adapter_config(folder).get("base_model_name_or_path")
        warnings.warn(f"{folder}: the adapter was trained on other base model weights ({trained_on}; fingerprint "
                      f"{theirs[-12:]}) than {base} holds (fingerprint {mine[-12:]}): it loads, but its outputs "
                      "are not those of its training", stacklevel=3)


def load_adapter(model, folder) -> dict:
    """Load a PEFT adapter folder into a model (either backend's); returns the adapter config. A model built
    without LoRA first receives the adapters ``adapter_config.json`` describes, as transformers' ``load_adapter``
    adds them (``qlora_ref.model.linear.add_adapters``); a model built with LoRA must match it (see
    :func:`read_adapter_lora_config`). Every adapter tensor must find its layer and every layer of the model must
    receive its adapter."""
    weights, cfg = read_adapter_files(folder)
    lora = lora_config_from_adapter(cfg, weights, str(Path(folder) / ADAPTER_CONFIG))
    check_adapter_base(model, folder)
    if not model.lora_parameters():  # built without LoRA: the adapters come from the folder
        add_adapters(model, lora)
    own = model.lora_parameters()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if extra:
        raise ValueError(f"{folder}: adapter tensors for layers this model lacks or does not adapt: {extra[:4]}"
                         f"{' ...' if len(extra) > 4 else ''}")
    if missing:
        raise ValueError(f"{folder}: adapter lacks tensors the model has: {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}")
    model_lora = getattr(model, "lora", None)
    if model_lora is not None and abs(model_lora.scaling - lora.scaling) > 0:
        def scaling(c) -> str:  # rsLoRA divides by sqrt(r): the same alpha and r can scale differently
            r = ("sqrt(r)", f"sqrt({c.r})") if c.use_rslora else ("r", c.r)
            return f"alpha/{r[0]} = {c.alpha}/{r[1]} = {c.scaling:g}"

        raise ValueError(f"{folder}: adapter scaling {scaling(lora)} differs from the model's {scaling(model_lora)}; "
                         "build the model with the adapter's LoraConfig")
    try:
        model.load_lora_parameters(weights)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{folder}: {e}") from None
    return cfg


def adapter_base_model(folder) -> Path:
    """The base model the adapter in ``folder`` was saved from (``base_model_name_or_path`` of its
    ``adapter_config.json``), when that is a path on this machine; else a ValueError asking for ``--model``."""
    cfg = read_adapter_config(folder)
    base = cfg.get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise ValueError(f"{folder}: its adapter_config.json names the base model {base!r}, which is not a path on "
                         "this machine; give the base model (--model)")
    return Path(base)


def read_adapter_lora_config(folder) -> LoraConfig:
    """The ``LoraConfig`` to build a model that can take the adapter in ``folder``."""
    weights, cfg = read_adapter_files(folder)
    return lora_config_from_adapter(cfg, weights, str(Path(folder) / ADAPTER_CONFIG))
