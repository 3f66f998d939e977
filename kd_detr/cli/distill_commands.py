"""Distillation commands: ``recipes``, ``distill``, ``compare`` (recipes side by side) and ``quickstart`` (the
whole flow on generated data)."""

from __future__ import annotations

from pathlib import Path

import click

from kd_detr.runs.quickstart import DEFAULT_QUICKSTART, QUICKSTARTS  # light: no torch at import

from .group import main
from .options import (data_options, parse_seeds, partial_weights_option, student_overrides,
                      teacher_precision_option)


@main.command("recipes")
@click.argument("name", required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field (dotted key, TOML value), e.g. distill.pred.temperature=2.")
def recipes_cmd(name: str | None, overrides: tuple[str, ...]) -> None:
    """List the distillation recipes, or print NAME merged with its defaults (and --set overrides)."""
    from kd_detr.engine.recipe import list_recipes, load_recipe, recipe_to_toml

    from kd_detr.methods import list_methods

    if name is None:
        if overrides:
            raise click.UsageError("--set needs a recipe NAME")
        for rname, desc in list_recipes().items():
            click.echo(f"{rname:24s} {desc}")
        methods = ", ".join(f"[{section}] {cls.__name__}" for section, cls in list_methods().items())
        click.echo(f"\nmethods (recipe sections): {methods}")
        return
    recipe = load_recipe(name, overrides)
    on = [section for section, cls in list_methods().items() if cls.enabled(recipe.sections[section])]
    click.echo(f"# recipe {recipe.name} from {' <- '.join(recipe.chain)}")
    click.echo(f"# methods: {', '.join(on) or 'none (ground-truth loss only)'}")
    click.echo(recipe_to_toml(recipe.to_dict()), nl=False)


@main.command("presets")
@click.argument("name", required=False)
def presets_cmd(name: str | None) -> None:
    """List the training presets (train.preset), or print NAME's values, parameter groups and sources."""
    from kd_detr.engine.presets import FAMILY_PRESETS, PRESETS, get_preset

    if name is None:
        for pname, preset in PRESETS.items():
            families = ", ".join(f for f, p in FAMILY_PRESETS.items() if p == pname)
            click.echo(f"{pname:12s} {preset.description}" + (f" [auto for: {families}]" if families else ""))
        click.echo("\nauto: the student family's preset; official for kd-detr's models and the other families")
        return
    try:
        preset = get_preset(name)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"# preset {preset.name}: {preset.description}")
    for key, value in preset.values.items():
        click.echo(f"{key} = {value!r}")
    for rule in preset.groups:
        wd = "the run's" if rule.weight_decay is None else f"{rule.weight_decay:g}"
        scale = f"{rule.scale:g} x " if rule.scale != 1.0 else ""
        click.echo(f"group {rule.name}: /{rule.pattern}/ lr {scale}{rule.lr}, weight decay {wd}")
    click.echo("group rest: every other parameter, lr, the run's weight decay")
    if preset.name != "official" and preset.values["lr_backbone"] < preset.values["lr"]:
        click.echo(f"# lr_backbone {preset.values['lr_backbone']:g} is for an ImageNet-initialised backbone: a "
                   "student that starts from random weights trains its backbone at lr (unless --lr-backbone)")
    for source in preset.sources:
        click.echo(f"# source: {source}")


@main.command("distill")
@click.option("--teacher", default=None,
              help="Teacher card name (teachers/NAME.toml) or a registered model name with --teacher-checkpoint.")
@click.option("--teacher-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Teacher weights (kd-detr .safetensors or official .pth); replaces a card's checkpoint.")
@click.option("--teacher-cache", type=click.Path(exists=True, file_okay=False), default=None,
              help="Read the teacher's outputs from this cache (kd-detr cache); no teacher model is loaded.")
@click.option("--teacher-serve", type=click.Choice(["inprocess", "ray"]), default="inprocess", show_default=True,
              help="Run the teacher in this process, or in Ray actors ahead of the student.")
@click.option("--teacher-actors", type=int, default=1, show_default=True, help="Ray teacher actors (--teacher-serve ray).")
@teacher_precision_option
@click.option("--views", type=int, default=None,
              help="Train on K recorded views per image with fixed batches (the plan a cache is built on).")
@click.option("--view-seed", type=int, default=0, show_default=True, help="Seed of the view plan (--views).")
@click.option("--student", required=True, help="Student architecture, e.g. cond_detr_r50.")
@click.option("--student-opt", multiple=True, metavar="KEY=VALUE",
              help="Override a student model config field (repeatable).")
@click.option("--recipe", "recipe_name", default="d3etr", show_default=True,
              help="Recipe name (recipes/NAME.toml; see `kd-detr recipes`) or path to a recipe TOML.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any recipe field, e.g. --set train.max_iters=1000 --set distill.self_attn.weight=2.")
@data_options
@click.option("--label-map", type=click.Choice(["contiguous", "coco91"]), default=None,
              help="Class indices (default: the recipe's train.label_map, contiguous).")
@click.option("--output-dir", default="runs/distill", show_default=True)
@click.option("--resume", default=None, help="'auto' (latest in --output-dir) or a checkpoint path.")
@click.option("--seed", type=int, default=None, help="Default: the recipe's train.seed (42).")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the recipe's, auto).")
@click.option("--amp", is_flag=True, default=None, help="Mixed precision (CUDA only).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@partial_weights_option
def distill_cmd(teacher, teacher_checkpoint, teacher_cache, teacher_serve, teacher_actors, teacher_precision, views,
                view_seed, student,
                student_opt, recipe_name, overrides, data, train_ann,
                train_images, val_ann, val_images, image_size, num_workers, skip_bad_labels, label_map, output_dir,
                resume, seed,
                device, amp, no_progress, allow_partial_weights) -> None:
    """Distil a teacher into a student with a recipe (D3ETR by default).

    The teacher runs in this process (eval mode, no gradients) on the student's padded batch. The
    schedule comes from the recipe's [train] section; the merged recipe is saved as
    OUTPUT_DIR/recipe.toml and in config.json with library versions and the git SHA.
    Multi-GPU: torchrun --nproc_per_node N -m kd_detr distill ...
    """
    from kd_detr.data import DataSpec
    from kd_detr.runs.assemble import TeacherSourceSpec, assemble_run

    if teacher_cache and teacher_serve == "ray":
        raise click.UsageError("--teacher-cache and --teacher-serve ray exclude each other")
    train_options = {"seed": seed, "device": device, "amp": amp, "num_workers": num_workers,
                     "progress": False if no_progress else None}
    run = assemble_run(student, recipe_name,
                       DataSpec(data, train_ann, train_images, val_ann, val_images, image_size, label_map, skip_bad_labels),
                       TeacherSourceSpec(teacher=teacher, checkpoint=teacher_checkpoint, cache=teacher_cache,
                                         serve=teacher_serve, actors=teacher_actors,
                                         allow_partial_weights=allow_partial_weights, precision=teacher_precision),
                       output_dir,
                       student_overrides=student_overrides(student, student_opt, "--student-opt",
                                                           allow_partial_weights, teacher),
                       overrides=overrides, train_options=train_options, resume=resume, views=views,
                       view_seed=view_seed)
    metrics = run.run()
    if metrics:
        click.echo(f"final AP {100 * metrics['AP']:.1f} (best {100 * metrics['best_ap']:.1f}); "
                   f"outputs in {output_dir}")


@main.command("compare")
@click.option("--teacher", default=None, help="Teacher card name, or a model name with --teacher-checkpoint.")
@click.option("--teacher-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--teacher-cache", type=click.Path(exists=True, file_okay=False), default=None,
              help="Distil every recipe from this cache (baseline runs on the same view plan).")
@teacher_precision_option
@click.option("--student", required=True, help="Student architecture.")
@click.option("--student-opt", multiple=True, metavar="KEY=VALUE",
              help="Student model config override (repeatable); a transformers student's nested field by its "
                   "dotted path (backbone_config.depths=[2,2,2,2]).")
@click.option("--recipes", required=True, help="Comma-separated recipe names or paths, e.g. baseline,d3etr.")
@click.option("--budget", type=int, required=True, help="Training iterations per run.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds (one run per recipe and seed).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Recipe override applied to every recipe.")
@data_options
@click.option("--label-map", type=click.Choice(["contiguous", "coco91"]), default=None)
@click.option("--eval-points", type=int, default=4, show_default=True, help="Evaluations per run.")
@click.option("--views", type=int, default=None, help="Train every recipe on a K-view plan (in-process teacher).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--device", default="auto", show_default=True)
@click.option("--no-ray", is_flag=True, help="Run the recipes in this process, one after another.")
@click.option("--parallel", type=click.IntRange(min=1), default=None,
              help="CPU machines: runs at a time, each with cores / N threads [default: 1, all cores each]. "
                   "On GPUs every run takes one GPU.")
@click.option("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray).")
@click.option("--no-progress", is_flag=True)
@partial_weights_option
def compare_cmd(teacher, teacher_checkpoint, teacher_cache, teacher_precision, student, student_opt, recipes, budget,
                seeds, overrides,
                data, train_ann, train_images, val_ann, val_images, image_size, num_workers, skip_bad_labels, label_map,
                eval_points,
                views, out, device, no_ray, parallel, address, no_progress, allow_partial_weights) -> None:
    """Run several recipes (and seeds) on one budget and write a comparison table and plots.

    Writes OUT/comparison.md and .csv (AP, AP50, AP75, APs, APm, APl, gain over baseline, time per step, peak
    memory, the teacher's AP), OUT/ap_curve.png and OUT/losses.png, and every run under OUT/runs/. Finished
    runs are not redone on a rerun; failed runs are reported in the table.
    """
    from kd_detr.data import DataSpec
    from kd_detr.runs.compare import CompareConfig, compare, format_table

    seed_list = parse_seeds(seeds, "--seeds")
    cfg = CompareConfig(student=student, recipes=[r.strip() for r in recipes.split(",") if r.strip()], out=out,
                        budget=budget, teacher=teacher, teacher_checkpoint=teacher_checkpoint,
                        teacher_cache=teacher_cache, allow_partial_weights=allow_partial_weights,
                        teacher_precision=teacher_precision,
                        student_overrides=student_overrides(student, student_opt, "--student-opt",
                                                            allow_partial_weights, teacher),
                        seeds=seed_list, overrides=list(overrides),
                        data=DataSpec(data, train_ann, train_images, val_ann, val_images, image_size, label_map, skip_bad_labels),
                        eval_points=eval_points, num_workers=num_workers, device=device,
                        views=views, use_ray=not no_ray, parallel=parallel, address=address, progress=not no_progress)
    rows, files = compare(cfg)
    click.echo(format_table(rows, len(seed_list)))
    click.echo(f"wrote {', '.join(str(f) for f in files.values())}")
    failed = [f"{r['recipe']} {f}" for r in rows for f in r["failed"]]
    if failed:  # the table is written, but the comparison is incomplete: say so in the exit status
        raise click.ClickException(f"{len(failed)} of {len(rows) * len(seed_list)} runs failed ({'; '.join(failed)[:300]}); "
                                   f"their errors are in {cfg.out}/runs/*/seed*/result.json; rerun to retry them")


@main.command("quickstart")
@click.option("--out", default=None, help="Output folder [default: runs/quickstart; runs/quickstart_rt_detr for "
                                          "--student rt_detr].")
@click.option("--student", "setup", type=click.Choice(sorted(QUICKSTARTS)), default=DEFAULT_QUICKSTART,
              show_default=True,
              help="Which quickstart: cond_detr (kd-detr's Conditional DETR teacher and student, baseline vs d3etr) "
                   "or rt_detr (the shipped RT-DETR teacher, a tiny transformers RT-DETR student trained by its "
                   "family's preset, baseline vs teach_detr).")
@click.option("--iters", type=int, default=2000, show_default=True, help="Student training iterations per recipe.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the runs and the cache's views (the data is always the teacher's, seed 0).")
@click.option("--seeds", default=None,
              help="Comma-separated seeds, e.g. 0,1,2: every recipe once per seed from one cache (views of the "
                   "first seed); the table gives mean ± std and the paired gain per seed. Overrides --seed.")
@click.option("--train-teacher", is_flag=True,
              help="Train the teacher here (on 2 CPU cores about 40 minutes; rt_detr's about 70) even if the "
                   "shipped one exists; a rerun reuses it.")
@click.option("--teacher-iters", type=int, default=None,
              help="Iterations when the teacher is trained here [default: the shipped teacher's count: "
                   + ", ".join(f"{k} {q.teacher_iters}" for k, q in sorted(QUICKSTARTS.items())) + "].")
@click.option("--views", type=int, default=2, show_default=True, help="Recorded views per image in the cache.")
@click.option("--actors", type=int, default=2, show_default=True, help="Ray actors building the cache.")
@click.option("--num-train", type=int, default=None, hidden=True)
@click.option("--num-val", type=int, default=None, hidden=True)
@click.option("--parallel", type=click.IntRange(min=1), default=None,
              help="Student runs at a time on a CPU machine, cores / N threads each [default: 2 where there are "
                   "2 or more cores: the published table; 0.64x the wall time of one after another on 2 cores]. "
                   "Another value gives slightly different figures (other thread count).")
@click.option("--no-progress", is_flag=True)
def quickstart_cmd(out, setup, iters, seed, seeds, train_teacher, teacher_iters, views, actors, num_train, num_val,
                   parallel, no_progress) -> None:
    """The whole flow on generated data on the CPU: data, teacher, Ray-built teacher cache, baseline vs
    distillation of a smaller student, comparison table and plots."""
    from kd_detr.runs.quickstart import run_quickstart

    if out is None:
        out = "runs/quickstart" if setup == DEFAULT_QUICKSTART else f"runs/quickstart_{setup}"
    run_quickstart(Path(out), iters=iters, seed=seed, echo=click.echo, train_teacher=train_teacher,
                   teacher_iters=teacher_iters, views=views, actors=actors, num_train=num_train, num_val=num_val,
                   progress=not no_progress, parallel=parallel,
                   seeds=parse_seeds(seeds, "--seeds") if seeds else None, setup=setup)
