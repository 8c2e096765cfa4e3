"""Start a fine-tune from an existing PEFT adapter (``TrainConfig.init_adapter``, ``--init-adapter``).

LoRA starts every run at B = 0, so that the adapted model is exactly the base model (Hu et al. 2021, section 4.1;
the QLoRA paper keeps it). Starting instead from a trained adapter's A and B continues its training: on another
backend (prototype on the reference, go on with ``--backend gpu``), on more data, or with another recipe. What
carries over is the adapter's weights only: the optimizer's moments, the learning-rate schedule's position and
the data order start afresh (an exact continuation of the same run is a resume from its checkpoint instead).

The adapter's shape settings (r, alpha, the adapted layers) must be the recipe's; its dropout, storage and
optimizer settings need not be.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..adapters import (
    ADAPTER_CONFIG,
    BASE_FINGERPRINT_KEY,
    lora_config_from_adapter,
    read_adapter_files,
    weights_metadata,
)
from ..model.config import LINEAR_MODULES, LoraConfig

#: the recipe's fields an adapter fixes, and the ``LoraConfig`` member each is compared with
SHAPE_FIELDS = {"lora_r": "r", "lora_alpha": "alpha", "target_modules": "target_modules"}


def read_init_adapter(folder) -> tuple[dict, LoraConfig]:
    """The adapter's weights (PEFT names) and the ``LoraConfig`` it was trained with; errors name ``init_adapter``."""
    try:
        weights, cfg = read_adapter_files(folder)
        lora = lora_config_from_adapter(cfg, weights, str(Path(folder) / ADAPTER_CONFIG))
    except (OSError, ValueError) as e:
        raise ValueError(f"init_adapter: {e}") from None
    if lora.use_rslora:
        raise ValueError(f"init_adapter {folder}: an rsLoRA adapter (scaling alpha/sqrt(r)); training here scales "
                         "by alpha/r, as the paper does")
    return weights, lora


def adapter_shape_settings(folder) -> dict:
    """``lora_r``, ``lora_alpha`` and ``target_modules`` of the adapter in ``folder``: the recipe's fields to set
    for training from it (``qlora finetune --init-adapter`` sets those not given as options)."""
    _, lora = read_init_adapter(folder)
    return {field: getattr(lora, member) for field, member in SHAPE_FIELDS.items()}


def check_init_adapter(config) -> dict | None:
    """The weights of ``config.init_adapter`` (None without one), after checking that the recipe builds the
    adapters they fit: the same r, alpha and adapted layers. Called before the model loads."""
    if config.init_adapter is None:
        return None
    weights, lora = read_init_adapter(config.init_adapter)
    theirs, mine = _shape(lora), _shape(config.lora_config())
    differ = [f"{field}={theirs[field]} (the recipe: {mine[field]})" for field in SHAPE_FIELDS
              if theirs[field] != mine[field]]
    if differ:
        raise ValueError(f"init_adapter {config.init_adapter}: the adapter has {'; '.join(differ)}; train with the "
                         "adapter's settings (qlora finetune takes them where neither an option nor the --config "
                         "file sets them)")
    return weights


def _shape(lora: LoraConfig) -> dict[str, str]:
    """``SHAPE_FIELDS`` of ``lora`` as compared and shown: the layers in ``LINEAR_MODULES``' order, comma-separated
    as ``--target-modules`` takes them (peft keeps them as a set)."""
    layers = ",".join(m for m in LINEAR_MODULES if m in lora.target_modules)
    return {"lora_r": repr(lora.r), "lora_alpha": repr(lora.alpha), "target_modules": layers}


def load_init_adapter(backend, config, base_fingerprint: str | None = None) -> None:
    """Copy ``config.init_adapter``'s weights into the trainer's adapters (step 0 of a new run; a resumed run
    takes its checkpoint's). Every adapter the model carries must receive one. Warns when the adapter was trained
    on other base weights than ``base_fingerprint`` (``files.model_fingerprint``): it still loads, as peft would
    load it, but it starts from what another model learned."""
    weights = check_init_adapter(config)
    if weights is None:
        return
    own = set(backend.adapter_state())
    given = {k.removeprefix("base_model.model.") for k in weights}
    missing, extra = sorted(own - given), sorted(given - own)
    if missing or extra:
        raise ValueError(f"init_adapter {config.init_adapter}: its tensors do not match the model's adapters "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    theirs = weights_metadata(config.init_adapter).get(BASE_FINGERPRINT_KEY)  # ours record it; peft's do not
    if base_fingerprint and theirs and theirs != base_fingerprint:
        warnings.warn(f"init_adapter {config.init_adapter}: the adapter was trained on other base model weights "
                      f"(fingerprint {theirs[-12:]}) than this run's (fingerprint {base_fingerprint[-12:]}): "
                      "training starts from what it learned on that model", stacklevel=3)
    backend.load_adapter_state(weights)


__all__ = ["adapter_shape_settings", "check_init_adapter", "load_init_adapter", "read_init_adapter"]
