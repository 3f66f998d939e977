"""Tiny, random-init ``transformers`` detection configs for fast CPU tests.

Every ``tiny_<family>()`` returns a ``transformers.<Family>Config`` whose model
builds without any download (no timm, no pretrained backbone, no hub access),
has d_model 32-64, 1 encoder layer (where the family has an encoder), 2-3
decoder layers, 2-4 heads and ffn 64, and runs a forward on a ``[2, 3, 64, 64]``
batch in well under a second on CPU.

``transformers`` is imported lazily inside the functions so that importing this
module never requires it.

``TINY_CONFIGS`` maps family key -> config factory, ``TINY_CLASSES`` maps family
key -> name of the ``transformers`` ``*ForObjectDetection`` class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig

__all__ = [
    "TINY_CLASSES",
    "TINY_CONFIGS",
    "id2label",
    "tiny_conditional_detr",
    "tiny_d_fine",
    "tiny_dab_detr",
    "tiny_deformable_detr",
    "tiny_deimv2",
    "tiny_detr",
    "tiny_lw_detr",
    "tiny_rf_detr",
    "tiny_rt_detr",
    "tiny_rt_detr_v2",
]


def id2label(num_labels: int) -> dict[int, str]:
    return {i: f"class_{i}" for i in range(num_labels)}


def _labels(num_labels: int) -> dict[str, Any]:
    i2l = id2label(num_labels)
    return {"id2label": i2l, "label2id": {v: k for k, v in i2l.items()}}


def _tiny_resnet(out_features: list[str]):
    """4-stage basic-block ResNet, 1 block per stage, channels 8/16/16/32 (strides 4/8/16/32)."""
    from transformers import ResNetConfig

    return ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 32],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=out_features,
    )


def _tiny_hgnet_v2():
    """Tiny HGNetV2 with 4 stages; out_indices 2,3,4 -> strides 8/16/32, channels 16/32/32."""
    from transformers import HGNetV2Config

    return HGNetV2Config(
        embedding_size=8,
        depths=[1, 1, 1, 1],
        hidden_sizes=[16, 16, 32, 32],
        stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16, 16, 32],
        stage_mid_channels=[8, 8, 16, 16],
        stage_out_channels=[16, 16, 32, 32],
        stage_num_blocks=[1, 1, 1, 1],
        stage_downsample=[False, True, True, True],
        stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 3, 3],
        stage_numb_of_layers=[1, 1, 1, 1],
        out_indices=[2, 3, 4],
    )


# ---------------------------------------------------------------------------
# DETR family (ResNet backbone, dense attention)
# ---------------------------------------------------------------------------

_DETR_COMMON = dict(
    num_channels=3,
    encoder_layers=1,
    decoder_layers=3,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    attention_dropout=0.0,
    auxiliary_loss=True,
)


def _dense_detr(config_class: str, num_labels: int, num_queries: int) -> "PretrainedConfig":
    """DETR and Conditional DETR share their config fields: only the class differs."""
    import transformers

    return getattr(transformers, config_class)(
        backbone_config=_tiny_resnet(["stage4"]),
        d_model=32,
        num_queries=num_queries,
        num_labels=num_labels,
        **_DETR_COMMON,
        **_labels(num_labels),
    )


def tiny_detr(num_labels: int = 5, num_queries: int = 10) -> "PretrainedConfig":
    return _dense_detr("DetrConfig", num_labels, num_queries)


def tiny_conditional_detr(num_labels: int = 5, num_queries: int = 10) -> "PretrainedConfig":
    return _dense_detr("ConditionalDetrConfig", num_labels, num_queries)


def tiny_dab_detr(num_labels: int = 5, num_queries: int = 10) -> "PretrainedConfig":
    from transformers import DabDetrConfig

    common = {k: v for k, v in _DETR_COMMON.items() if k != "num_channels"}
    return DabDetrConfig(
        backbone_config=_tiny_resnet(["stage4"]),
        hidden_size=32,
        num_queries=num_queries,
        num_labels=num_labels,
        **common,
        **_labels(num_labels),
    )


def tiny_deformable_detr(
    num_labels: int = 5,
    num_queries: int = 10,
    with_box_refine: bool = False,
    two_stage: bool = False,
) -> "PretrainedConfig":
    """Single-stage, no box refinement by default (``two_stage`` requires ``with_box_refine``)."""
    from transformers import DeformableDetrConfig

    return DeformableDetrConfig(
        backbone_config=_tiny_resnet(["stage2", "stage3", "stage4"]),
        d_model=32,
        num_feature_levels=3,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=num_queries,
        two_stage_num_proposals=num_queries,
        with_box_refine=with_box_refine,
        two_stage=two_stage,
        num_labels=num_labels,
        disable_custom_kernels=True,
        **_DETR_COMMON,
        **_labels(num_labels),
    )


# ---------------------------------------------------------------------------
# RT-DETR family (hybrid encoder + deformable decoder, denoising)
# ---------------------------------------------------------------------------


def _rt_common(num_labels: int, num_queries: int, d: int = 32) -> dict[str, Any]:
    return dict(
        encoder_hidden_dim=d,
        encoder_in_channels=[16, 32, 32],
        feat_strides=[8, 16, 32],
        encoder_layers=1,
        encoder_ffn_dim=64,
        encoder_attention_heads=2,
        encode_proj_layers=[2],
        d_model=d,
        decoder_in_channels=[d, d, d],
        decoder_ffn_dim=64,
        num_feature_levels=3,
        decoder_n_points=2,
        decoder_layers=3,
        decoder_attention_heads=2,
        attention_dropout=0.0,
        num_queries=num_queries,
        num_denoising=10,
        hidden_expansion=0.5,
        num_labels=num_labels,
        **_labels(num_labels),
    )


def _tiny_rt_resnet():
    from transformers import RTDetrResNetConfig

    return RTDetrResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 32, 32],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_indices=[2, 3, 4],
    )


def tiny_rt_detr(num_labels: int = 5, num_queries: int = 10) -> "PretrainedConfig":
    from transformers import RTDetrConfig

    return RTDetrConfig(backbone_config=_tiny_rt_resnet(), **_rt_common(num_labels, num_queries))


def tiny_rt_detr_v2(num_labels: int = 5, num_queries: int = 10) -> "PretrainedConfig":
    from transformers import RTDetrV2Config

    return RTDetrV2Config(
        backbone_config=_tiny_rt_resnet(), decoder_n_levels=3, **_rt_common(num_labels, num_queries)
    )


def tiny_d_fine(num_labels: int = 5, num_queries: int = 10) -> "PretrainedConfig":
    from transformers import DFineConfig

    return DFineConfig(
        backbone_config=_tiny_hgnet_v2(),
        depth_mult=0.34,
        max_num_bins=8,
        lqe_hidden_dim=16,
        **_rt_common(num_labels, num_queries),
    )


def tiny_deimv2(num_labels: int = 5, num_queries: int = 10) -> "PretrainedConfig":
    from transformers import Deimv2Config

    return Deimv2Config(
        backbone_config=_tiny_hgnet_v2(),
        depth_mult=0.34,
        max_num_bins=8,
        lqe_hidden_dim=16,
        **_rt_common(num_labels, num_queries),
    )


# ---------------------------------------------------------------------------
# LW-DETR / RF-DETR (ViT backbone, group DETR)
# ---------------------------------------------------------------------------


def tiny_lw_detr(num_labels: int = 5, num_queries: int = 10) -> "PretrainedConfig":
    from transformers import LwDetrConfig, LwDetrViTConfig

    backbone = LwDetrViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=64,
        pretrain_image_size=64,
        patch_size=16,
        window_block_indices=[0],
        out_indices=[1, 2],
        num_windows=4,
    )
    return LwDetrConfig(
        backbone_config=backbone,
        **_group_detr_common(num_labels, num_queries),
    )


def _group_detr_common(num_labels: int, num_queries: int) -> dict[str, Any]:
    """LW-DETR and RF-DETR share their decoder (and Group DETR's 2 training groups); only the ViT differs."""
    return dict(projector_scale_factors=[1.0], c2f_num_blocks=1, d_model=32, decoder_ffn_dim=64,
                decoder_n_points=2, decoder_layers=3, decoder_self_attention_heads=2,
                decoder_cross_attention_heads=2, attention_dropout=0.0, num_queries=num_queries, group_detr=2,
                num_labels=num_labels, **_labels(num_labels))


def tiny_rf_detr(num_labels: int = 5, num_queries: int = 10) -> "PretrainedConfig":
    from transformers import RfDetrConfig, RfDetrDinov2Config

    backbone = RfDetrDinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=64,
        patch_size=16,
        out_indices=[1, 2],
        num_windows=2,
    )
    return RfDetrConfig(
        backbone_config=backbone,
        **_group_detr_common(num_labels, num_queries),
    )


TINY_CONFIGS: dict[str, Callable[..., "PretrainedConfig"]] = {
    "detr": tiny_detr,
    "conditional_detr": tiny_conditional_detr,
    "dab_detr": tiny_dab_detr,
    "deformable_detr": tiny_deformable_detr,
    "rt_detr": tiny_rt_detr,
    "rt_detr_v2": tiny_rt_detr_v2,
    "d_fine": tiny_d_fine,
    "lw_detr": tiny_lw_detr,
    "deimv2": tiny_deimv2,
    "rf_detr": tiny_rf_detr,
}

TINY_CLASSES: dict[str, str] = {
    "detr": "DetrForObjectDetection",
    "conditional_detr": "ConditionalDetrForObjectDetection",
    "dab_detr": "DabDetrForObjectDetection",
    "deformable_detr": "DeformableDetrForObjectDetection",
    "rt_detr": "RTDetrForObjectDetection",
    "rt_detr_v2": "RTDetrV2ForObjectDetection",
    "d_fine": "DFineForObjectDetection",
    "lw_detr": "LwDetrForObjectDetection",
    "deimv2": "Deimv2ForObjectDetection",
    "rf_detr": "RfDetrForObjectDetection",
}
