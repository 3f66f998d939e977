"""Named transformers detectors: ``hf:DIR`` (a local ``save_pretrained`` folder) and small random-init
configurations of every family (``hf_<family>_tiny``) for tests and demos, listed by ``kd-detr models``."""

from __future__ import annotations

import json
from pathlib import Path

from .config import HF_PREFIX, HFModelConfig
from .hub import is_hub_id, resolve_hub_id
from .families import FAMILIES, family_of_model_type

__all__ = ["check_safetensors_header", "hf_config", "is_hf_name", "list_hf_models", "read_config_json", "tiny_name",
           "weight_files"]

# safetensors' own limit on a header (100 MB); a larger length field is a corrupt or hostile file
MAX_HEADER_BYTES = 100_000_000

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


def read_config_json(cfg_file: Path, name: str = "") -> dict:
    """``config.json`` as a dict; ``FileNotFoundError`` / ``ValueError`` naming the file otherwise."""
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{name or cfg_file.parent}: {cfg_file} does not exist (expected a transformers "
                                "save_pretrained folder: config.json and model.safetensors)")
    try:
        data = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{cfg_file}: not a JSON object (its top level is a {type(data).__name__}); a transformers "
                         "config.json is an object of config fields")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files: ``*.safetensors`` and ``*.bin``, in name order."""
    return sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")])


def check_safetensors_header(path: Path) -> None:
    """Refuse a ``.safetensors`` file whose header cannot be read or whose tensors do not fit in the file
    (truncated), in one line naming it; other files pass. Reads only the header."""
    if path.suffix != ".safetensors":
        return
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise ValueError(f"{path}: corrupt safetensors header (it says {n} header bytes, the file has "
                             f"{size}{'' if n <= MAX_HEADER_BYTES else '; over the 100 MB limit'})")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type; one line naming the file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "not fully covered" in msg or "incomplete" in msg:
            msg = "the file is shorter than its header says: truncated (an interrupted copy or download?)"
        raise ValueError(f"{path}: not a readable safetensors file: {msg}") from None


def hf_config(name: str) -> HFModelConfig:
    """The :class:`HFModelConfig` of ``hf:DIR`` (its ``config.json``; weights from the folder), of a Hub id
    ``hf:org/name[@revision]`` (its snapshot folder in the Hub cache, :mod:`kd_detr.models.hf.hub`) or of a tiny name.

    A folder is checked before anything is built, each problem in one line naming the file: ``config.json``
    (a JSON object with a supported ``model_type``, integer ``id2label`` keys, at least one query, eager/sdpa
    attention) and the header of every ``.safetensors`` weight file (a truncated file or a bad header)."""
    if name.startswith(HF_PREFIX):
        spec, hub = name[len(HF_PREFIX):], None
        if is_hub_id(spec):  # org/name[@revision]: a snapshot in the Hub cache (downloaded unless offline)
            snapshot = resolve_hub_id(spec)
            folder, hub = snapshot.folder, snapshot.record()
        else:
            folder = Path(spec).expanduser()
        cfg_file = folder / "config.json"
        data = read_config_json(cfg_file, name)
        model_type = data.get("model_type")
        if not isinstance(model_type, str):
            raise ValueError(f"{cfg_file}: no model_type (a transformers save_pretrained config.json names its "
                             "architecture in model_type)")
        try:
            family = family_of_model_type(model_type)
        except ValueError as e:
            raise ValueError(f"{cfg_file}: {e}") from None
        weights = weight_files(folder)
        if not weights:
            raise FileNotFoundError(f"{name}: no weights (model.safetensors) in {folder}")
        for f in weights:
            check_safetensors_header(f)
        # a kd-detr export (`kd-detr export --format hf`) records the square its fixed-size student ran at;
        # without it such a family runs at its processor's default (640 px)
        square = data.get("kd_detr_input_size")
        try:
            origin = f"the Hub: {spec} at commit {hub['commit']}" if hub else str(folder)
            return HFModelConfig(name=f"{HF_PREFIX}{spec if hub else folder}", family=family.key, hf_config=data,
                                 source=str(folder), input_size=None if (family.pixel_mask or not square) else int(square),
                                 description=f"transformers {family.hf_class} from {origin}", hub=hub).validate()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{cfg_file}: {e}") from None
    families = _tiny_families()
    if name not in families:
        raise ValueError(f"unknown transformers model {name!r}; available: hf:DIR or {sorted(families)}")
    from .tiny_configs import TINY_CONFIGS

    fam = families[name]
    cfg = TINY_CONFIGS[fam](num_labels=5, num_queries=TINY_QUERIES)
    return HFModelConfig(name=name, family=fam, hf_config=cfg.to_dict(),
                         input_size=None if FAMILIES[fam].pixel_mask else TINY_INPUT_SIZE,
                         description=list_hf_models()[name]).validate()
