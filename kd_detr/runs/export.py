"""``kd-detr export``: the trained student alone, in the formats asked for.

Distillation checkpoints already hold only the student (the teacher, its queries and any projection
are kept outside the model); export re-writes it and checks every file it writes:

* ``safetensors``: ``PREFIX.safetensors``, a kd-detr model file (with the label map);
* ``official``: ``PREFIX.pth``, the official ``{"model": state_dict}``; checked to load strictly into a
  plain ``cond_detr_*`` model and reproduce the student's outputs;
* ``hf``: the folder ``PREFIX/``, a transformers ``save_pretrained`` folder that
  ``AutoModelForObjectDetection`` loads: ``ConditionalDetrForObjectDetection`` for kd-detr's own student
  (:mod:`kd_detr.models.hf_export`), the family's own class for a transformers-family student
  (:mod:`kd_detr.models.hf.export`; its input square and image size recorded in ``config.json``); checked to
  load with no missing / unexpected keys and reproduce the outputs (1e-5); files get the umask's mode;
* ``onnx``: ``PREFIX.onnx`` (:mod:`kd_detr.runs.onnx_export`), traced at the student's recorded image size
  (64 px when none is recorded); checked with onnxruntime (1e-4) at that size and another; a transformers
  family whose graph kd-detr has not checked is refused by name before anything is written.

The default is ``safetensors`` + ``official``. ``--out`` is checked first (empty, a folder, under a file:
one line naming it); when a later writer fails its check, the outputs this call created are removed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from kd_detr.models import ConditionalDETR, build_model, load_model, load_official_state_dict, save_model
from kd_detr.models.checkpoint import read_official_checkpoint, save_official_checkpoint

__all__ = ["DEFAULT_FORMATS", "FORMATS", "check_out_prefix", "export", "export_student", "find_student_weights", "output_paths",
           "parse_formats"]

FORMATS = ("safetensors", "official", "hf", "onnx")
DEFAULT_FORMATS = ("safetensors", "official")


def find_student_weights(source: str | Path) -> Path:
    """A run folder (``model_final``, else ``model_best``, else the latest checkpoint) or a ``.safetensors``."""
    p = Path(source)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ValueError(f"{p}: export reads kd-detr .safetensors model files or run folders")
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such run folder or model file")
    for name in ("model_final.safetensors", "model_best.safetensors"):
        if (p / name).exists():
            return p / name
    latest = p / "checkpoints" / "latest.json"
    if latest.exists():
        return latest.parent / json.loads(latest.read_text())["weights"]
    raise FileNotFoundError(f"{p} holds no model_final.safetensors, model_best.safetensors or checkpoints/latest.json")


def parse_formats(values: Iterable[str] | str | None) -> tuple[str, ...]:
    """Format names from repeated and/or comma-separated values, in :data:`FORMATS` order; none: the default."""
    if isinstance(values, str):
        values = [values]
    names = [v.strip().lower() for value in (values or ()) for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; valid: {', '.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in names) or DEFAULT_FORMATS


def output_paths(out_prefix: str | Path, formats: Iterable[str] = DEFAULT_FORMATS) -> dict[str, Path]:
    """Where each format goes: ``PREFIX.safetensors``, ``PREFIX.pth``, the folder ``PREFIX/``, ``PREFIX.onnx``."""
    p = Path(out_prefix)
    suffix = {"safetensors": ".safetensors", "official": ".pth", "hf": "", "onnx": ".onnx"}
    return {f: p.with_name(p.name + suffix[f]) for f in formats}


def export(source: str | Path, out_prefix: str | Path, formats: Iterable[str] | str | None = None) -> dict[str, Path]:
    """Export the student of ``source`` (run folder or kd-detr ``.safetensors``) in ``formats``.

    Returns ``{format: path}`` (see :func:`output_paths`). Each writer checks its own file and raises on
    a mismatch; a format the model cannot be expressed in is refused before anything is written."""
    formats = parse_formats(formats)
    check_out_prefix(out_prefix)
    weights = find_student_weights(source)
    model, meta = load_model(weights)
    model.eval()
    # refuse what cannot be written before writing anything
    family = getattr(model.config, "family", None)  # a transformers-family student
    if not isinstance(model, ConditionalDETR):
        only_cond = [f for f in formats if f == "official" or (f == "hf" and family is None)]
        if only_cond:
            raise ValueError(f"--format {','.join(only_cond)} needs a kd-detr Conditional DETR student; "
                             f"{weights} holds {model.config.name!r} ({type(model).__name__}): use --format "
                             "safetensors,hf,onnx")
    elif "official" in formats and model.config.backbone_norm == "gn":
        raise ValueError("cannot export to the official format: backbone_norm='gn' (official checkpoints hold "
                         "BatchNorm statistics)")
    if "hf" in formats:
        from kd_detr.models.hf_export import check_hf_exportable

        try:
            import transformers  # noqa: F401
        except ImportError as e:
            raise ImportError(f"--format hf needs transformers ({e}); pip install transformers") from e
        if family is None:
            check_hf_exportable(model.config)
    if "onnx" in formats:
        from kd_detr.runs.onnx_export import check_onnx_exportable, require_onnx_runtime

        check_onnx_exportable(model.config)
        require_onnx_runtime()
    paths = output_paths(out_prefix, formats)
    existed = {f for f, p in paths.items() if p.exists()}
    parent = Path(out_prefix).parent
    new_dirs = [d for d in (parent, *parent.parents) if not d.exists()]  # deepest first
    try:
        _write(model, meta, weights, paths)
    except BaseException:
        # no half export: the outputs (and folders) this call created are removed; a file it replaced keeps
        # its new content
        import shutil

        for f, p in paths.items():
            if f in existed or not p.exists():
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for d in new_dirs:
            try:
                d.rmdir()
            except OSError:  # not empty (or gone): leave it
                break
        raise
    return paths


def check_out_prefix(out_prefix: str | Path) -> None:
    """Refuse an ``--out`` that cannot name files (empty, ``.``/``..``, or under a path that is a file), with one
    line naming it, before anything is loaded or written."""
    text = str(out_prefix)
    if not text.strip():
        raise ValueError("--out is empty: give an output prefix, e.g. --out exports/student")
    p = Path(text)
    if p.name in ("", ".", "..") or text.endswith(("/", "\\")):
        raise ValueError(f"--out {text!r} names a folder, not an output prefix: add a file name, e.g. "
                         f"{p / 'student'}")
    parent = p.parent
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(f"--out {text}: {folder} is a file, not a folder; pick another --out")
            break


def _write(model, meta: dict, weights: Path, paths: dict[str, Path]) -> None:
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    label_map = meta.get("label_map")
    extra = dict(meta.get("extra_metadata") or {})
    extra["exported_from"] = str(weights)
    family = getattr(model.config, "family", None)
    image_size = extra.get("image_size")
    if "safetensors" in paths:
        save_model(model, paths["safetensors"], label_map=label_map, extra_metadata=extra)
    if "official" in paths:
        _write_official(model, paths["official"])
    if "hf" in paths and family is not None:
        from kd_detr.models.hf.export import export_hf_family

        hf_extra = {"exported_from": str(weights), **({"image_size": image_size} if image_size else {})}
        export_hf_family(model, paths["hf"], label_map=label_map, extra=hf_extra, check_size=int(image_size or 128))
    elif "hf" in paths:
        from kd_detr.models.hf_export import export_hf

        export_hf(model, paths["hf"], label_map=label_map, extra={"exported_from": str(weights)})
    if "onnx" in paths:
        from kd_detr.runs.onnx_export import export_onnx

        metadata = {"kd_detr_config": model.config.to_json(), "exported_from": str(weights)}
        if label_map:
            metadata["kd_detr_label_map"] = json.dumps(label_map, sort_keys=True)
        # traced at the student's image size where it is recorded: a model that selects its queries by top-k
        # needs as many encoder tokens as queries, which the 64-px default may not give
        size = {"height": int(image_size), "width": int(image_size)} if image_size else {}
        export_onnx(model, paths["onnx"], metadata=metadata, **size)


def export_student(source: str | Path, out_prefix: str | Path) -> tuple[Path, Path]:
    """Write ``<out_prefix>.safetensors`` and ``<out_prefix>.pth`` (official ``{"model": state_dict}``).

    Returns both paths. Raises if the official file does not load strictly into a freshly built
    model of the same architecture or gives different outputs.
    """
    paths = export(source, out_prefix, DEFAULT_FORMATS)
    return paths["safetensors"], paths["official"]


def _write_official(model, pth_path: Path) -> None:
    """Write the official ``.pth`` and check it is the plain architecture (nothing training-only in it)."""
    save_official_checkpoint(model, pth_path)
    plain = build_model(model.config.name, num_classes=model.config.num_classes,
                        **_overrides_from(model.config))
    load_official_state_dict(plain, read_official_checkpoint(pth_path), source=str(pth_path))
    model.eval()
    plain.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), plain(x)
    if not (torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])):
        from kd_detr.models.hf_export import ExportMismatch

        raise ExportMismatch(f"{pth_path}: the re-loaded student does not reproduce the exported weights' outputs")


def _overrides_from(config) -> dict:
    """Config fields that differ from the registered architecture (e.g. ``--model-opt`` variants)."""
    from kd_detr.models import get_config

    base = get_config(config.name).to_dict()
    return {k: v for k, v in config.to_dict().items() if k not in ("name", "description", "num_classes") and base.get(k) != v}
