"""Faster R-CNN auxiliary head from torchvision's building blocks, as configured in Co-DETR (docs/methods.md 4.1.2).

RPN: 3 anchor scales ``4 * 2^(k/3) * stride`` x ratios 0.5 / 1 / 2 per location, MaxIoU 0.7 / 0.3
(low-quality matches allowed), 256 sampled anchors 50 % positive, objectness BCE + box regression
(torchvision's smooth-L1 with beta 1/9, i.e. nearly mmdet's L1), NMS 0.7, 1000 proposals per image.
RoI head: the GT boxes join the proposals, MaxIoU 0.5, 512 sampled RoIs 25 % positive, RoIAlign 7x7 on
the strides 8..64 levels, two shared FC 1024, softmax CE over ``C + 1`` classes (torchvision: 0 is
background) and, as Co-DETR (``reg_decoded_bbox``), GIoU of the decoded class-specific boxes summed over
the positives / the number of sampled RoIs.

We call torchvision's pieces ourselves rather than ``RegionProposalNetwork.forward`` /
``RoIHeads.forward``: their losses exist only in training mode, and the positive queries need what the
RoI sampling chose (``select_training_samples``: proposals, matched GT, labels).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign, generalized_box_iou_loss

from .adapter import PYRAMID_STRIDES
from .anchors import PyramidAnchorGenerator
from .assignment import HeadAssignment

__all__ = ["FasterRCNNHead"]

RPN_PRE_NMS_TOP_N = 2000  # proposals per level before NMS (torchvision's training default; not in docs/methods.md)
ROI_LEVELS = 4            # RoIAlign on the 4 finest levels (strides 8..64), as Co-DETR's featmap_strides


class FasterRCNNHead(nn.Module):
    """RPN + RoI head on the adapter's pyramid; :meth:`forward` returns its losses and assignments.

    Args:
        d: channels of the pyramid.
        num_classes: ``C`` foreground classes (labels in ``[0, C)``; torchvision's are shifted by one).
        strides: the pyramid's strides.
        rpn_batch_size_per_image, rpn_positive_fraction, rpn_post_nms_top_n, roi_batch_size_per_image,
        roi_positive_fraction: sampling (see :class:`~kd_detr.methods.co_detr.CoDetrConfig`).
        with_features: also return each sampled RoI's mean-pooled feature (for content queries).
    """

    name = "faster_rcnn"

    def __init__(self, d: int, num_classes: int, strides: Sequence[int] = PYRAMID_STRIDES, *,
                 rpn_batch_size_per_image: int = 256, rpn_positive_fraction: float = 0.5,
                 rpn_post_nms_top_n: int = 1000, roi_batch_size_per_image: int = 512,
                 roi_positive_fraction: float = 0.25, with_features: bool = False):
        super().__init__()
        self.strides = tuple(strides)
        self.with_features = with_features
        self.level_names = [f"p{i}" for i in range(len(strides))]
        anchors = PyramidAnchorGenerator([[s * 4 * 2 ** (k / 3) for k in range(3)] for s in strides],
                                         [[0.5, 1.0, 2.0]] * len(strides), strides)
        # Both modes get the same numbers: the losses must not depend on the objective's train/eval flag.
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(d, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3,
            batch_size_per_image=rpn_batch_size_per_image, positive_fraction=rpn_positive_fraction,
            pre_nms_top_n={"training": RPN_PRE_NMS_TOP_N, "testing": RPN_PRE_NMS_TOP_N},
            post_nms_top_n={"training": rpn_post_nms_top_n, "testing": rpn_post_nms_top_n},
            nms_thresh=0.7)
        self.roi_heads = RoIHeads(
            MultiScaleRoIAlign(self.level_names[:ROI_LEVELS], output_size=7, sampling_ratio=2),
            TwoMLPHead(d * 7 * 7, 1024), FastRCNNPredictor(1024, num_classes + 1),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5,
            batch_size_per_image=roi_batch_size_per_image, positive_fraction=roi_positive_fraction,
            bbox_reg_weights=None,  # (10, 10, 5, 5) = mmdet's stds (0.1, 0.1, 0.2, 0.2)
            score_thresh=0.05, nms_thresh=0.5, detections_per_img=100)  # inference only: unused

    def rpn_losses(self, feats: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                   targets: Sequence[dict[str, Tensor]]) -> tuple[list[Tensor], Tensor, Tensor]:
        """``RegionProposalNetwork.forward`` step by step: ``(proposals [P_b,4] per image, loss_cls, loss_bbox)``."""
        rpn = self.rpn
        objectness, deltas = rpn.head(list(feats))
        num_per_level = [o[0].numel() for o in objectness]  # A * h * w per level
        anchors = [torch.cat(rpn.anchor_generator.per_level(feats))] * len(image_sizes)
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # [B*A,1], [B*A,4]
        # Proposals do not backpropagate into the RPN (Faster R-CNN's approximate joint training).
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        proposals, _ = rpn.filter_proposals(proposals, objectness, list(image_sizes), num_per_level)
        labels, matched_gt = rpn.assign_targets_to_anchors(anchors, list(targets))
        regression_targets = rpn.box_coder.encode(matched_gt, anchors)
        loss_cls, loss_bbox = rpn.compute_loss(objectness, deltas, labels, regression_targets)
        return proposals, loss_cls, loss_bbox

    def forward(self, feats: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor]
                ) -> tuple[dict[str, Tensor], list[HeadAssignment]]:
        """Losses and per-image assignments.

        Args:
            feats: pyramid levels ``[B,d,h_l,w_l]``.
            image_sizes: unpadded ``(h, w)`` per image (proposals are clipped to it).
            gt_boxes: ``[G_b,4]`` absolute xyxy per image; gt_labels: ``[G_b]`` in ``[0, C)``.

        Returns:
            ``({"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"}, [HeadAssignment per image])``
            with the sampled RoIs (positives and negatives) as boxes.
        """
        targets = [{"boxes": g.to(feats[0].dtype), "labels": lab + 1} for g, lab in zip(gt_boxes, gt_labels)]
        proposals, loss_rpn_cls, loss_rpn_bbox = self.rpn_losses(feats, image_sizes, targets)

        roi = self.roi_heads
        proposals, matched_idxs, labels, _ = roi.select_training_samples(proposals, targets)
        # RoIAlign infers each level's scale from its size over the image size: give it the canvas the
        # pyramid covers (exact powers of two), not the unpadded sizes.
        canvas = (feats[0].shape[-2] * self.strides[0], feats[0].shape[-1] * self.strides[0])
        fmap = OrderedDict(zip(self.level_names, feats))
        roi_feats = roi.box_roi_pool(fmap, proposals, [canvas] * len(proposals))  # [N,d,7,7]
        class_logits, box_regression = roi.box_predictor(roi.box_head(roi_feats))  # [N,C+1], [N,(C+1)*4]

        labels_all = torch.cat(labels)
        loss_cls = F.cross_entropy(class_logits, labels_all)
        pos = labels_all > 0
        rois = torch.cat(proposals)
        pred = roi.box_coder.decode_single(
            box_regression.view(len(rois), -1, 4)[pos, labels_all[pos]], rois[pos])
        matched_gt = torch.cat([g[m] if len(g) else g.new_zeros(len(m), 4) for g, m in zip(gt_boxes, matched_idxs)])
        loss_bbox = generalized_box_iou_loss(pred, matched_gt[pos].to(pred.dtype), reduction="sum") / max(len(rois), 1)

        pooled = roi_feats.mean((2, 3)).split([len(p) for p in proposals]) if self.with_features else None
        assignments = [
            HeadAssignment(boxes=p, gt_index=torch.where(lab > 0, m, torch.full_like(m, -1)),
                           features=pooled[b] if pooled is not None else None)
            for b, (p, m, lab) in enumerate(zip(proposals, matched_idxs, labels))]
        losses = {"loss_rpn_cls": loss_rpn_cls, "loss_rpn_bbox": loss_rpn_bbox,
                  "loss_cls": loss_cls, "loss_bbox": loss_bbox}
        return losses, assignments
