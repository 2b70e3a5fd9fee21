"""One handler per `topo-build` command: parsed arguments in, the work done by the library, results printed."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import builders
from analysis.tables import (
    COMPARISON_CAPTION,
    comparison_frame,
    to_markdown,
    write_comparison,
)
from builders.spec import read_spec
from topo.cli.parser import workers_value
from topo.cli.resume import resumed_run, reuse_out, study_config
from topo.cli.settings import out_dir, run_config
from topo.common import distributed as dist_info
from topo.common.devices import check_device
from topo.common.errors import UserError
from topo.common.processes import check_processes
from topo.common.reading import read_weights
from topo.common.writing import atomic_write_json, atomic_write_text
from topo.construct.budget import check_window
from topo.controls.control import verdict
from topo.data.folders import unreadable_note
from topo.run.analyze import analyze
from topo.run.config import RunConfig, load_data, reference_spec, sized_googlenet
from topo.run.export import FORMATS, export_run, load_safetensors
from topo.run.load import build_with_weights, load_run, run_spec, timed_evaluate
from topo.run.preflight import preflight
from topo.run.rundir import RunDir, StudyFiles, owned_folder
from topo.run.stages import (
    comparison_row,
    constructions_stage,
    read_controls,
    report_stage,
    run_all,
)
from topo.run.study import (
    parse_shard,
    run_study,
    study_processes,
    summarize,
    summary_markdown,
)
from topo.train.config import TrainConfig
from topo.train.trainer import train


def _show_comparison(frame: pd.DataFrame | None) -> None:
    if frame is not None and dist_info.rank() == 0:
        print("\n" + to_markdown(frame) + "\n\n" + COMPARISON_CAPTION, flush=True)


#: What an interrupted command that writes a folder says to continue its work.
SAME_COMMAND = "the same command and --out {root}"


@contextlib.contextmanager
def _owned(args: argparse.Namespace, root: Path, how: str | None, **lock: Any) -> Iterator[None]:
    """Own the command's folder ``root`` inside the block (rank 0; `topo.run.rundir.owned_folder`, ``lock``
    its options): a second command on it fails at once. ``how`` is what an interruption inside says to continue
    (``args.continue_with``, read by `topo.cli.main`)."""
    args.continue_with = how.format(root=root) if how else None
    with owned_folder(root, **lock) if dist_info.rank() == 0 else contextlib.nullcontext():
        yield


def _checked_out(args: argparse.Namespace, command: str) -> tuple[RunDir, RunConfig]:
    """The output folder of ``command`` and the flags' configuration, checked before any work: the device, and
    a folder that can be written."""
    config = run_config(args)
    check_device(config.train.device)
    run = RunDir(out_dir(args, command))
    run.check_writable()
    return run, config


def _refuse_a_run(run: RunDir) -> None:
    """A one-line error where ``run`` holds a run already: a new run does not go on in it."""
    if run.config_path.exists():
        raise UserError(f"{run.root} already holds a run: resume it with --resume {run.root}, or choose another "
                        "--out")


def cmd_run(args: argparse.Namespace) -> int:
    run, config = (RunDir.existing(args.resume), None) if args.resume else _checked_out(args, "run")
    run.check_writable()
    with _owned(args, run.root, "topo-build --resume {root}"):
        if config is None:
            run, config = resumed_run(args)
            check_device(config.train.device)  # a resumed run may change its device
        else:
            _refuse_a_run(run)
        outcome = run_all(config, run)
    if outcome is not None:
        report, frame = outcome
        _show_comparison(frame)
        summary = read_controls(run)
        if summary is not None:
            print(verdict(summary), flush=True)
        print(f"report: {report}", flush=True)
    return 0


def _start(run: RunDir, config: RunConfig, command: str) -> None:
    """Write ``config.json`` of a new output folder (rank 0), once every check has passed."""
    if not run.config_path.is_file() and dist_info.rank() == 0:
        run.write_config(config.to_dict(), command=command)


def cmd_construct(args: argparse.Namespace) -> int:
    run, config = _checked_out(args, "construct")
    with _owned(args, run.root, SAME_COMMAND):
        reuse_out(args, run, config, "construct")
        bundle = load_data(config)
        preflight(config, bundle, reference_spec(config, bundle))
        _start(run, config, "construct")
        _, summary = constructions_stage(config, bundle, run)
    if dist_info.rank() == 0:
        print(f"topology: {run.topology}", flush=True)
        if summary is not None:
            print(verdict(summary), flush=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    spec = read_spec(args.spec)
    run, config = _checked_out(args, "train")
    with _owned(args, run.root, SAME_COMMAND):
        reuse_out(args, run, config, "train")
        bundle = load_data(config)
        _check_fits(spec, bundle, args.spec, args.data)
        preflight(config, bundle, None)
        _start(run, config, "train")
        name = Path(args.spec).stem
        if dist_info.rank() == 0:
            atomic_write_text(run.training.spec(name), spec.to_json() + "\n")
        torch.manual_seed(args.seed)
        result = train(builders.build(spec), bundle.train, bundle.val, config.train, run_dir=run.training.root,
                       name=name)
    row = comparison_row(name, spec, result, tuple(bundle.image_size))
    if dist_info.rank() == 0:
        write_comparison([row], run.root)
        _show_comparison(comparison_frame([row]))
    return 0


def _analysed_spec(args: argparse.Namespace, bundle: Any) -> builders.NetworkSpec:
    if args.spec:
        return read_spec(args.spec)
    return sized_googlenet(args.variant, bundle, num_classes=args.num_classes, aux_logits=False,
                           width_mult=args.width_mult, named=f"GoogLeNet --variant {args.variant}", data=args.data,
                           fix="use --variant small for images up to 64 px, or larger images (--image-size)")


def cmd_analyze(args: argparse.Namespace) -> int:
    if args.weights:
        read_weights(args.weights)  # a file that is no state dict is named before anything else is done
    if args.spec:
        read_spec(args.spec)
    config = run_config(args)
    out = out_dir(args, "analyze")
    RunDir(out).check_writable()
    check_device(args.device)
    with _owned(args, out, None):
        bundle = load_data(config)
        spec = _analysed_spec(args, bundle)
        if config.construct.window is not None:
            shapes = spec.input_shapes(tuple(bundle.image_size))
            check_window(config.construct.window,
                         [(m.name, tuple(shapes[m.name][1:])) for m in spec.inception_modules()])
        frame = analyze(spec, args.weights, bundle, out, construct_config=config.construct,
                        batch_size=args.batch_size, device=args.device, workers=workers_value(args.workers),
                        progress=args.progress)
    print("\n" + to_markdown(frame), flush=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    run = RunDir.existing(args.run_dir)
    run.check_writable()
    with _owned(args, run.root, None):  # a run still working on the folder would write over the report
        report, frame = report_stage(run)
    _show_comparison(frame)
    print(f"report: {report}", flush=True)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    if (args.summarize or args.resume) and not args.out:
        raise UserError("--summarize and --resume need --out STUDY, the folder of the study")
    out = out_dir(args, "study")
    if args.summarize:
        result = summarize(out)
    else:
        RunDir(out).check_writable()
        shard = parse_shard(args.shard) if args.shard else (0, 1)
        side_by_side = check_processes(args.side_by_side, "--side-by-side")
        if args.shard and side_by_side not in ("auto", 1):
            raise UserError(f"--shard {args.shard} runs one shard: drop --side-by-side {side_by_side}, or drop "
                            "--shard to run every shard side by side")
        with _owned_study(args, out, shard):
            config = study_config(args, out)
            check_device(config.run.train.device)
            result = run_study(config, out, shard=shard, progress=args.progress,
                               side_by_side=study_processes(side_by_side, config) if shard == (0, 1) else 1)
    if result is not None and dist_info.rank() == 0:
        print("\n" + summary_markdown(result) + f"\n\nreport: {result.report}", flush=True)
    return 0


@contextlib.contextmanager
def _owned_study(args: argparse.Namespace, out: Path, shard: tuple[int, int]) -> Iterator[None]:
    """Own the study folder ``out``: the whole of it, or (``shard`` of several) a share of it beside the other
    shards and the shard's own lock."""
    if shard[1] == 1:
        with _owned(args, out, SAME_COMMAND):
            yield
        return
    with _owned(args, out, SAME_COMMAND, shared=True), _owned(args, out, SAME_COMMAND,
                                                              lock=StudyFiles.shard_lock(*shard)):
        yield


def cmd_export(args: argparse.Namespace) -> int:
    if args.format is None and args.out is None:
        raise UserError(f"give --format ({', '.join(FORMATS)}), or --out FILE with a suffix that names one")
    result = export_run(args.run_dir, args.format, network=args.network, path=args.out, ema=args.ema)
    if dist_info.rank() == 0:
        print(result.path, flush=True)
    return 0


def _check_fits(spec: builders.NetworkSpec, bundle: Any, source: str, data: str) -> None:
    """A one-line error saying what differs where the network's input channels or classes are not the data's."""
    differs = []
    if spec.in_channels != bundle.in_channels:
        differs.append(f"reads {spec.in_channels} input channels where the data have {bundle.in_channels}")
    if spec.head.num_classes != bundle.num_classes:
        differs.append(f"has {spec.head.num_classes} classes where the data have {bundle.num_classes}")
    if differs:
        what = f"the network of run {source}" if Path(source).is_dir() else f"spec {source}"
        raise UserError(f"{what} does not fit {data}: it {' and '.join(differs)}; evaluate it on data like the "
                        "data it was built for, or use a spec built for this data")


def _evaluated(args: argparse.Namespace) -> tuple[torch.nn.Module, builders.NetworkSpec, TrainConfig]:
    """The network ``eval`` evaluates, its spec, and the training settings its evaluation follows (autocast,
    channels-last: a run's own; else the defaults)."""
    source = Path(args.source)
    if args.ema and (args.weights or not source.is_dir()):
        raise UserError("--ema loads a run directory's averaged weights: drop --weights, or drop --ema")
    if source.is_dir():
        run = RunDir.existing(source)
        settings = RunConfig.of_run(run).train
        if not args.weights:
            model, spec = load_run(run.root, args.network, ema=args.ema, with_spec=True)
            return model, spec, settings
        spec, spec_source = run_spec(run, args.network), f"the {args.network} spec of run {run.root}"
    elif source.suffix == ".safetensors" and not args.weights:
        model, spec = load_safetensors(source)
        return model, spec, TrainConfig()
    elif not args.weights:
        raise UserError(f"{source} is not a run directory: give a spec's weights with --weights FILE, or a run "
                        "directory (the --out of an earlier run)")
    else:
        spec, spec_source, settings = read_spec(source), f"spec {source}", TrainConfig()
    model = build_with_weights(spec, read_weights(args.weights), source=args.weights, spec_source=spec_source)
    return model.eval(), spec, settings


def _check_out_file(out: str | None) -> None:
    if out is None:
        return
    if Path(out).is_dir():
        raise UserError(f"--out {out} is a folder: give the JSON file to write, e.g. {Path(out) / 'eval.json'}")
    RunDir(Path(out).parent).check_writable()


def cmd_eval(args: argparse.Namespace) -> int:
    _check_out_file(args.out)
    device = check_device(args.device)
    model, spec, settings = _evaluated(args)
    config = run_config(args)
    bundle = load_data(config)
    _check_fits(spec, bundle, args.source, args.data)
    settings = dataclasses.replace(settings, device=str(device), workers=workers_value(args.workers), progress=False)
    metrics = timed_evaluate(model.to(device), bundle.val, device=device, batch_size=args.batch_size,
                             config=settings)
    network = args.network if Path(args.source).is_dir() else None  # a spec or an exported file: one network
    result = {"source": str(args.source), "network": network, "weights": args.weights, "data": config.data,
              "data_dir": config.data_dir, "seed": config.seed, "split": "val", "device": str(device),
              "batch_size": args.batch_size, **metrics}
    if dist_info.rank() == 0:
        name = Path(args.source).name + (f"/{network}" if network else "")
        frame = pd.DataFrame([{"Network": name, "Data": config.data, "Images": metrics["count"],
                               "Loss": metrics["loss"], "Top-1 (%)": 100 * metrics["top1"],
                               "Top-5 (%)": 100 * metrics["top5"], "Throughput (img/s)": metrics["images_per_s"]}])
        print("\n" + to_markdown(frame), flush=True)
        note = unreadable_note(bundle.val, metrics["count"])
        if note:
            print(note, flush=True)
        if args.out:
            atomic_write_json(args.out, result)
            print(f"results: {args.out}", flush=True)
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "construct": cmd_construct, "train": cmd_train, "analyze": cmd_analyze, "report": cmd_report,
    "study": cmd_study, "export": cmd_export, "eval": cmd_eval,
}
