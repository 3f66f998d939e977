"""Run by tests/engine/test_ddp.py under ``torchrun --nproc_per_node 2``: one DDP step on half a batch each.

Rank r takes images [r*B/2, (r+1)*B/2) of the saved global batch; rank 0 writes the averaged
gradients, which must equal the single-process gradient of the whole batch.
"""

import sys

import torch

from kd_detr.criterion import SetCriterion, weighted_total
from kd_detr.engine import distributed
from kd_detr.matcher import HungarianMatcher


def main(batch_path: str, out_path: str) -> None:
    info = distributed.init_distributed("cpu")
    assert info.world_size == 2, info
    saved = torch.load(batch_path, weights_only=False)
    model = saved["build"]()
    model.load_state_dict(saved["state"])
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    images, mask, targets = saved["images"], saved["mask"], saved["targets"]
    half = images.shape[0] // 2
    sl = slice(info.rank * half, (info.rank + 1) * half)
    criterion = SetCriterion(model.config.num_classes, HungarianMatcher(), weight_dict=saved["weight_dict"])
    out = ddp(images[sl], mask[sl])
    loss = weighted_total(criterion(out, targets[sl]), criterion.weight_dict)
    loss.backward()
    if info.is_main:
        torch.save({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out_path)
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
