"""Named transformers detectors: ``hf:DIR`` (a local ``save_pretrained`` folder) and small random-init
configurations of every family (``hf_<family>_tiny``) for tests and demos, listed by ``kd-detr models``."""

from __future__ import annotations

import json
from pathlib import Path

from .config import HF_PREFIX, HFModelConfig
from .families import FAMILIES, family_of_model_type

__all__ = ["hf_config", "is_hf_name", "list_hf_models", "tiny_name"]

# Square input of the tiny fixed-size models: the quickstart's 128-px images.
TINY_INPUT_SIZE = 128
TINY_QUERIES = 30


def tiny_name(family: str) -> str:
    return f"hf_{family}_tiny"


def _tiny_families() -> dict[str, str]:
    """Tiny names of the families the installed transformers has (none without transformers)."""
    try:
        import transformers
    except ImportError:
        return {}
    from .tiny_configs import TINY_CONFIGS

    return {tiny_name(f): f for f in TINY_CONFIGS if f in FAMILIES and hasattr(transformers, FAMILIES[f].hf_class)}


def is_hf_name(name: str) -> bool:
    """``hf:DIR`` or a registered tiny transformers model."""
    return name.startswith(HF_PREFIX) or name in _tiny_families()


def list_hf_models() -> dict[str, str]:
    """Registered tiny transformers models -> description (``hf:DIR`` is open-ended)."""
    out = {}
    for name, fam in _tiny_families().items():
        f = FAMILIES[fam]
        out[name] = (f"tiny random-init transformers {f.hf_class} ({TINY_QUERIES} queries"
                     + ("" if f.pixel_mask else f", {TINY_INPUT_SIZE}x{TINY_INPUT_SIZE} input") + ")")
    return out


def hf_config(name: str) -> HFModelConfig:
    """The :class:`HFModelConfig` of ``hf:DIR`` (its ``config.json``; weights from the folder) or of a tiny name."""
    if name.startswith(HF_PREFIX):
        folder = Path(name[len(HF_PREFIX):]).expanduser()
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{name}: {cfg_file} does not exist (expected a transformers save_pretrained "
                                    "folder: config.json and model.safetensors)")
        try:
            data = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
        family = family_of_model_type(str(data.get("model_type")))
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise FileNotFoundError(f"{name}: no weights (model.safetensors) in {folder}")
        return HFModelConfig(name=f"{HF_PREFIX}{folder}", family=family.key, hf_config=data, source=str(folder),
                             description=f"transformers {family.hf_class} from {folder}").validate()
    families = _tiny_families()
    if name not in families:
        raise ValueError(f"unknown transformers model {name!r}; available: hf:DIR or {sorted(families)}")
    from .tiny_configs import TINY_CONFIGS

    fam = families[name]
    cfg = TINY_CONFIGS[fam](num_labels=5, num_queries=TINY_QUERIES)
    return HFModelConfig(name=name, family=fam, hf_config=cfg.to_dict(),
                         input_size=None if FAMILIES[fam].pixel_mask else TINY_INPUT_SIZE,
                         description=list_hf_models()[name]).validate()
