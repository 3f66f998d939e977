"""``kd-detr train``: a detector trained on ground truth alone."""

from __future__ import annotations

import click

from .group import main
from .options import data_options, partial_weights_option, student_overrides


@main.command("train")
@click.option("--model", "model_name", default="cond_detr_r18_tiny", show_default=True)
@click.option("--model-opt", multiple=True, metavar="KEY=VALUE",
              help="Override a model config field (repeatable), e.g. --model-opt num_queries=30.")
@click.option("--backbone-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local torchvision ImageNet ResNet weights for the backbone.")
@click.option("--init-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Start from these weights (kd-detr .safetensors or official .pth).")
@data_options
@click.option("--label-map", type=click.Choice(["contiguous", "coco91"]), default="contiguous", show_default=True,
              help="Class indices: the data's categories numbered 0..K-1, or COCO ids as indices (official 91 slots).")
@click.option("--no-augment", is_flag=True, help="Train on the eval resize only (no flip/crop/multi-scale).")
@click.option("--batch-size", type=int, default=2, show_default=True, help="Images per process.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--lr-backbone", type=float, default=1e-5, show_default=True)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--clip-max-norm", type=float, default=0.1, show_default=True)
@click.option("--epochs", type=int, default=50, show_default=True)
@click.option("--max-iters", type=int, default=None, help="Iteration budget (overrides --epochs).")
@click.option("--lr-drop", type=int, default=40, show_default=True, help="Epoch after which lr x0.1.")
@click.option("--lr-drop-iter", type=int, default=None, help="Iteration after which lr x0.1 (wins over --lr-drop).")
@click.option("--warmup-iters", type=int, default=0, show_default=True)
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA only).")
@click.option("--output-dir", default="runs/train", show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--log-every", type=int, default=10, show_default=True)
@click.option("--checkpoint-every", type=int, default=500, show_default=True, help="Iterations.")
@click.option("--keep-checkpoints", type=int, default=2, show_default=True,
              help="Checkpoints kept in OUTPUT_DIR/checkpoints (0 keeps every one).")
@click.option("--eval-every-epochs", type=int, default=1, show_default=True)
@click.option("--eval-every-iters", type=int, default=None)
@click.option("--eval-batch-size", type=int, default=2, show_default=True)
@click.option("--eval-max-images", type=int, default=None, help="Evaluate on the first N validation images.")
@click.option("--resume", default=None, help="'auto' (latest in --output-dir) or a checkpoint path.")
@click.option("--no-aux-loss", is_flag=True, help="Supervise the last decoder layer only.")
@click.option("--deterministic", is_flag=True, help="torch.use_deterministic_algorithms (warn-only).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@partial_weights_option
def train_cmd(model_name, model_opt, backbone_weights, init_checkpoint, data, train_ann, train_images, val_ann,
              val_images, image_size, label_map, num_workers, no_augment, batch_size, lr, lr_backbone, weight_decay,
              clip_max_norm, epochs, max_iters, lr_drop, lr_drop_iter, warmup_iters, amp, output_dir, seed,
              device, log_every, checkpoint_every, keep_checkpoints, eval_every_epochs, eval_every_iters,
              eval_batch_size, eval_max_images, resume, no_aux_loss, deterministic, no_progress,
              allow_partial_weights) -> None:
    """Train a Conditional DETR (official recipe by default). Multi-GPU: torchrun --nproc_per_node N -m kd_detr train ..."""
    from kd_detr.engine.trainer import TrainConfig, train

    cfg = TrainConfig(
        model=model_name,
        model_overrides=student_overrides(model_name, model_opt, "--model-opt", allow_partial_weights),
        backbone_weights=backbone_weights, init_checkpoint=init_checkpoint, data=data, train_ann=train_ann,
        train_images=train_images, val_ann=val_ann, val_images=val_images, image_size=image_size,
        label_map=label_map, num_workers=num_workers, augment=not no_augment, batch_size=batch_size, lr=lr, lr_backbone=lr_backbone,
        weight_decay=weight_decay, clip_max_norm=clip_max_norm, epochs=epochs, max_iters=max_iters,
        lr_drop=lr_drop, lr_drop_iter=lr_drop_iter, warmup_iters=warmup_iters, amp=amp, output_dir=output_dir,
        seed=seed, device=device, log_every=log_every, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        eval_every_epochs=eval_every_epochs, eval_every_iters=eval_every_iters, eval_batch_size=eval_batch_size,
        eval_max_images=eval_max_images, resume=resume, aux_loss=not no_aux_loss, deterministic=deterministic,
        progress=not no_progress)
    metrics = train(cfg)
    if metrics:
        click.echo(f"final AP {100 * metrics['AP']:.1f} (best {100 * metrics['best_ap']:.1f}); "
                   f"outputs in {output_dir}")

