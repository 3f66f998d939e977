"""The in-process teacher runs in float32 under the student's autocast (``--amp``): the same numbers as the Ray
and cached teachers, which run outside it."""

from __future__ import annotations

import pytest
import torch

from kd_detr.models import build_model, list_models
from kd_detr.teacher import InProcessTeacher

TEACHERS = ["cond_detr_r10_tiny"] + [n for n in ("hf_detr_tiny", "hf_rt_detr_tiny") if n in list_models()]


@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_outputs_ignore_the_callers_autocast(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, num_queries=6)
    teacher = InProcessTeacher(model, attn="none")
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=g)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, :, 40:] = True
    plain = teacher(images, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what --amp does to the student's step (CUDA: float16)
        amp = teacher(images, mask)
        raw = model.eval()(images[:1, :, :, :], mask[:1])  # the model itself does follow the autocast
    assert amp.logits.dtype == torch.float32 and torch.equal(amp.logits, plain.logits)
    assert torch.equal(amp.boxes, plain.boxes)
    assert raw["pred_logits"].dtype == torch.bfloat16 or not torch.equal(
        raw["pred_logits"].float(), plain.logits[-1, :1].float())
