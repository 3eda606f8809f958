"""Command line: one thin subcommand per step of the data flow.

Each subcommand parses its arguments and calls a function that works from Python too;
nothing here computes anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from brainmets import PER_RANK_LOGGER, __version__, rundir

log = logging.getLogger("brainmets")


def _rank() -> int:
    """This process's rank under torchrun (WORLD_SIZE > 1, as the trainer decides), else 0: a
    RANK left in the environment by a cluster does not make a single process a worker."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        pass
    return 0


def _rank_prefix() -> str:
    """What marks a line of a torchrun rank other than 0 (nothing on rank 0)."""
    return f"[rank {_rank()}] " if _rank() else ""


def _setup_logging(verbose: bool) -> None:
    # Under torchrun every process would print every line: rank 0 speaks for the run. Its
    # warnings (config, weights, curriculum, non-finite steps) come from state every rank
    # shares, so the others would only repeat them: they report errors, and warnings about
    # their own state (PER_RANK_LOGGER), with their rank.
    rank = _rank()
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level if rank == 0 else logging.ERROR,
        format=_rank_prefix() + "%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if rank:
        logging.getLogger(PER_RANK_LOGGER).setLevel(logging.WARNING)
    # pydicom warns once per odd header; the index already records what matters.
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def _preprocess_from_args(args):
    from brainmets.config import load_config

    cfg = load_config(args.config, args.set)
    return cfg.preprocess


# --------------------------------------------------------------------------- subcommands


def cmd_synth(args) -> int:
    from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort

    lesions = {}
    if "lesion_mm" in args:  # absent unless given: the SynthConfig default applies
        lesions["lesion_diameter_mm"] = tuple(args.lesion_mm)
    if "lesion_hu" in args:
        lesions["lesion_hu"] = tuple(args.lesion_hu)
    if "confounder" in args:
        lesions["confounder"] = args.confounder
    from pydantic import ValidationError

    try:
        cfg = SynthConfig(
            num_patients=args.patients,
            positive_fraction=args.positive_fraction,
            slices=(args.min_slices, args.max_slices),
            matrix=args.matrix,
            slice_thickness_mm=args.thickness,
            seed=args.seed,
            **lesions,
        )
    except ValidationError as err:  # in the options' names, without pydantic's links
        raise ValueError("synth: " + "; ".join(_synth_problem(e) for e in err.errors())) from None
    fractions = tuple(args.split) if args.split else None
    if fractions is not None and (min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6):
        raise ValueError(f"--split {' '.join(map(str, fractions))}: three shares adding up to 1")
    labels = write_synthetic_cohort(
        args.out, cfg, progress=not args.quiet, workers=args.workers, split_fractions=fractions
    )
    splits = ""
    if fractions is not None:
        import pandas as pd

        counts = pd.read_csv(labels, dtype=str)["split"].value_counts()
        splits = " with a split column: " + ", ".join(
            f"{counts.get(name, 0)} {name}" for name in ("train", "val", "test")
        )
    print(
        f"wrote {cfg.num_patients} patients: DICOM under {Path(args.out) / 'dicom'}, "
        f"labels {labels}{splits}, lesion truth {Path(args.out) / 'lesions.csv'}"
    )
    return 0


_SYNTH_OPTIONS = {
    "num_patients": "--patients",
    "positive_fraction": "--positive-fraction",
    "slices": "--min-slices/--max-slices",
    "matrix": "--matrix",
    "slice_thickness_mm": "--thickness",
    "lesion_diameter_mm": "--lesion-mm",
    "lesion_hu": "--lesion-hu",
}


def _synth_problem(error: dict) -> str:
    field = str(error["loc"][0]) if error["loc"] else ""
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{_SYNTH_OPTIONS.get(field, field)}: {message}" if field else message


def cmd_config(args) -> int:
    from brainmets.config import load_config
    from brainmets.config_yaml import annotated_yaml

    sys.stdout.write(annotated_yaml(load_config(args.config, args.set)))
    return 0


def cmd_index(args) -> int:
    from brainmets.data.dicom import NOT_DICOM
    from brainmets.data.series_index import choose_for, index_dicom_root, write_index

    preprocess = _preprocess_from_args(args)
    index = index_dicom_root(args.dicom_root, workers=args.workers, progress=not args.quiet)
    index.series = choose_for(index.series, preprocess)
    write_index(index, args.out)
    chosen = int(index.series["chosen"].sum())
    patients = index.series["patient_id"].nunique()
    # Files that are not DICOM at all (notes, exports beside the images) are listed but are
    # no failure; a DICOM file that cannot be read (empty, truncated, corrupt) is one.
    damaged = int((index.errors["reason"] != NOT_DICOM).sum())
    print(
        f"{len(index.series)} series of {patients} patients; {chosen} chosen; "
        f"{len(index.errors)} unreadable files ({damaged} damaged DICOM, "
        f"{len(index.errors) - damaged} not DICOM); table in {args.out}"
    )
    if damaged:
        print(f"damaged files are listed in {Path(args.out) / 'index_errors.csv'}", file=sys.stderr)
        return 0 if args.allow_failures else 1
    if index.series.empty:  # most often a wrong folder: say so rather than succeed quietly
        print(f"no DICOM images under {args.dicom_root}", file=sys.stderr)
        return 0 if args.allow_failures else 1
    return 0


def cmd_prepare(args) -> int:
    from brainmets.data.labels import read_labels
    from brainmets.data.prepare import prepare_cache
    from brainmets.data.series_index import read_index
    from brainmets.data.workers import keep_freed_memory

    keep_freed_memory()  # decodes here too with --workers 1; the pool's workers do it anyway
    preprocess = _preprocess_from_args(args)
    labels = read_labels(args.labels)
    if args.index is None:
        from brainmets.data.labels import rows_without_path

        unplaced = rows_without_path(labels)
        if unplaced:
            shown = ", ".join(unplaced[:3]) + (" ..." if len(unplaced) > 3 else "")
            raise ValueError(
                f"{args.labels}: {len(unplaced)} patients have no path column value ({shown}), "
                "so prepare cannot find their images: index the DICOM root first (brainmets "
                "index DICOM_ROOT --out INDEX) and add --index INDEX, or give every patient's "
                "folder in a path column"
            )
    series_index = read_index(args.index) if args.index else None
    result = prepare_cache(
        labels,
        args.out,
        preprocess,
        series_index=series_index,
        workers=args.workers,
        num_shards=args.num_shards,
        shard_id=args.shard_id,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(
        f"prepared {result.prepared}, already done {result.skipped}, failed {result.failed}; "
        f"cache {args.out} ({len(result.index)} patients in index.csv)"
    )
    if result.failed:
        print(f"failures are listed in {args.out} (errors*.csv)", file=sys.stderr)
        return 0 if args.allow_failures else 1
    return 0


def cmd_train(args) -> int:
    from brainmets.config import load_config
    from brainmets.train.selection import HEADLINE
    from brainmets.train.trainer import train

    shortcuts = [f"train.{key}={value}" for key, value in
                 (("device", args.device), ("epochs", args.epochs)) if value is not None]  # fmt: skip
    args.set = [*args.set, *shortcuts]
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / rundir.CONFIG).is_file():
            raise FileNotFoundError(
                f"cannot resume {run_dir}: no run there ({run_dir / 'config.yaml'} is missing); "
                "give the folder a train run wrote (--out, default runs/NAME)"
            )
        cfg = load_config(run_dir / rundir.CONFIG, args.set)
    else:
        overrides = list(args.set)
        if args.data:
            overrides.append(f"data.cache={args.data}")
        cfg = load_config(args.config, overrides)
        run_dir = Path(args.out) if args.out else Path("runs") / cfg.name
    args.run_dir = run_dir  # for the hint after Ctrl-C (both branches)
    result = train(cfg, run_dir, resume=bool(args.resume), progress=not args.quiet)
    if _rank() != 0:
        return 0  # under torchrun, rank 0 reports the run
    best = result.get("best") or {}
    metric = result.get("best_metric", cfg.train.best_metric)  # val_loss if val is one class
    threshold = best.get("threshold", float("nan"))
    column = HEADLINE.get(metric, metric)  # the rule's one-number summary
    chosen = metric if column == metric else f"by {metric}: {column}"
    print(
        f"run {run_dir}: best {chosen} {best.get(column, float('nan')):.4f} at epoch "
        f"{result.get('best_epoch')} (threshold {threshold:.2f} on the plain sigmoid, as in "
        "metrics.csv and train.log)"
    )
    sidecar = run_dir / rundir.MODEL_SIDECAR
    if sidecar.is_file():
        from brainmets.model.probability import Calibration

        calibration = Calibration.from_sidecar(json.loads(sidecar.read_text()))
        print(
            f"predict and evaluate report probabilities as {calibration.describe()}; "
            f"there the threshold is {calibration.threshold(threshold):.3f}"
        )
    return _ranking_exit(result.get("ranking"), args.allow_chance)


# A trained run whose model does not rank its validation patients (see brainmets.ranking).
EXIT_DOES_NOT_RANK = 3


def _ranking_exit(ranking: dict | None, allowed: bool) -> int:
    from brainmets.ranking import RankingVerdict

    verdict = RankingVerdict.from_sidecar({"ranking": ranking})
    if verdict is None or verdict.ranks:
        return 0
    print(f"WARNING: {verdict.warning()}", file=sys.stderr)
    if allowed:
        print("brainmets: accepted with --allow-chance", file=sys.stderr)
        return 0
    print(
        f"brainmets: exit {EXIT_DOES_NOT_RANK}: the run is complete, but its model is not shown to "
        "rank patients; add --allow-chance to accept such a run (a smoke test, a pipeline check)",
        file=sys.stderr,
    )
    return EXIT_DOES_NOT_RANK


def cmd_evaluate(args) -> int:
    from brainmets.evaluate.evaluation import evaluate_run

    summary = evaluate_run(
        args.run,
        args.data,
        split=args.split,
        out_dir=args.out,
        n_boot=args.n_boot,
        device=args.device,
        progress=not args.quiet,
        compile=args.compile,
        **_evaluate_truth_args(args),
    )
    print(summary.text)
    return 0


# --- evaluate's lesion truth and subgroup options, and `compare` ----------------------------


def _evaluate_truth_args(args) -> dict:
    return {
        "lesions": args.lesions,
        "top_k": args.top_k,
        "margin_mm": args.pointing_margin_mm,
        "series_index": args.index,
    }


def _add_evaluate_truth_options(p: argparse.ArgumentParser) -> None:
    from brainmets.evaluate import DEFAULT_MARGIN_MM, DEFAULT_TOP_K

    p.add_argument(
        "--lesions",
        type=Path,
        help="lesion truth CSV (centres in mm or on an image, or masks; docs/evaluation.md): "
        "adds top-slice hit rate, Grad-CAM pointing game and lesion-level detection",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        help="lesion-level detection: a slice through the lesion among the patient's top K "
        "(default %(default)s)",
    )
    p.add_argument(
        "--pointing-margin-mm",
        type=float,
        default=DEFAULT_MARGIN_MM,
        help="pointing game: the Grad-CAM peak may lie this far beyond the lesion radius "
        "(default %(default)g mm)",
    )
    p.add_argument(
        "--index",
        type=Path,
        help="output folder of `brainmets index`: manufacturer, kernel and slice thickness of "
        "each series for the subgroups (default: read from the source DICOM headers)",
    )


def cmd_compare(args) -> int:
    from brainmets.evaluate.compare import compare_runs

    summary = compare_runs(
        args.run_a,
        args.run_b,
        args.data,
        split=args.split,
        out_dir=args.out,
        device=args.device,
        progress=not args.quiet,
    )
    print(summary.text)
    return 0


def _add_compare_parser(command) -> None:
    p = command(
        "compare",
        help="two runs on the same patients: DeLong's test of the AUC difference, McNemar's of "
        "the decisions, both ROC curves",
    )
    p.add_argument("run_a", type=Path, help="run A (the reference)")
    p.add_argument("run_b", type=Path, help="run B (differences are B - A)")
    p.add_argument("--data", type=Path, required=True, help="prepared cache both runs score")
    p.add_argument("--split", default=None, help="only patients of this split (e.g. test)")
    p.add_argument("--out", type=Path, help="default ./compare_A_vs_B")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_compare)


def cmd_predict(args) -> int:
    from brainmets.data.workers import keep_freed_memory
    from brainmets.predict import predict

    keep_freed_memory()  # one patient's arrays after another, also in this process
    result = predict(
        args.run,
        args.inputs,
        out_csv=args.out,
        heatmaps_dir=args.heatmaps,
        dicom_out=args.dicom_out,
        top_k=args.top_k,
        device=args.device,
        batch_slices=args.batch_slices,
        progress=not args.quiet,
        compile=args.compile,
        resume=args.resume,
        backend=args.backend,
        onnx=args.onnx,
        url=args.url,
        triton_model=args.triton_model,
    )
    kept = f" ({result.kept} of them kept from the earlier run)" if result.kept else ""
    print(f"{result.predicted} patients predicted{kept}, {result.failed} failed -> {args.out}")
    failed = result.table[result.table["error"] != ""]
    for row in failed.head(5).itertuples():
        print(f"  {row.patient_id}: {row.error}", file=sys.stderr)
    if len(failed) > 5:
        print(f"  ... and {len(failed) - 5} more in {args.out}", file=sys.stderr)
    return 1 if result.failed and not args.allow_failures else 0


def cmd_serve(args) -> int:
    from brainmets.serve.record import format_status, read_status

    if args.status is not None:
        print(format_status(read_status(args.status)))
        return 0
    if args.run is None or args.store is None:
        raise ValueError("serve needs a RUN and --store DIR (or --status DIR)")
    from brainmets.serve.forward import Destination
    from brainmets.serve.node import NodeConfig, serve_forever

    config = NodeConfig(
        host=args.host,
        port=args.port,
        ae_title=args.ae_title,
        allow=args.allow or (),
        stable_seconds=args.stable_seconds,
        forward=Destination.parse(args.forward) if args.forward else None,
        top_k=args.top_k,
        device=args.device,
        backend=args.backend,
        onnx=args.onnx,
        url=args.url,
        triton_model=args.triton_model,
    )
    return serve_forever(args.run, args.store, config)


def cmd_export(args) -> int:
    from brainmets.export import export_run

    result = export_run(
        args.run,
        args.out,
        triton=args.triton,
        name=args.name,
        max_batch=args.max_batch,
        quantize=args.quantize,
        opset=args.opset,
    )
    print(
        f"exported {result.onnx} + {result.sidecar.name} (largest slice-logit difference from "
        f"PyTorch on probe slices {result.max_abs_diff:.2g})"
    )
    if result.triton:
        print(f"Triton model repository: {result.triton} (config.pbtxt, 1/model.onnx)")
    return 0


def cmd_report(args) -> int:
    from brainmets.evaluate.report import write_report

    print(write_report(Path(args.run)))
    return 0


def cmd_demo(args) -> int:
    from brainmets.demo import run_demo

    run_demo(
        Path(args.out),
        patients=args.patients,
        epochs=args.epochs,
        device=args.device,
        full=args.full,
        seed=args.seed,
    )
    return 0


# --------------------------------------------------------------------------- parser


def _add_workers(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help=what)


def _add_allow_failures(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--allow-failures",
        action="store_true",
        help=f"exit 0 even when some {what} (they are still listed)",
    )


def _add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("torch", "onnxruntime", "triton"),
        default="torch",
        help="score with PyTorch, with onnxruntime from the run's export, or on a Triton "
        "server serving it (default %(default)s)",
    )
    p.add_argument(
        "--onnx", type=Path, help="the export to score with (default RUN/export, from export)"
    )
    p.add_argument("--url", help="triton backend: the server's gRPC host:port, e.g. localhost:8001")
    p.add_argument(
        "--triton-model", default="brainmets", help="triton backend: the model's name on the server"
    )


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (defaults: the specification)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set preprocess.slice_mm=native",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainmets", description="Patient-level brain metastasis detection on head CT."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug log, tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--version", action="version", version=f"brainmets {__version__}")
    # The same two flags after the subcommand (brainmets train ... -q); SUPPRESS keeps a flag
    # given before the subcommand from being reset by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug log, tracebacks")  # fmt: skip
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    p = command("synth", help="write a synthetic head-CT cohort as DICOM + labels.csv")
    p.add_argument("out", type=Path, help="folder for dicom/, labels.csv and synth.json")
    p.add_argument("--patients", type=int, default=40, help="number of patients (default 40)")
    p.add_argument("--positive-fraction", type=float, default=0.4,
                   help="share of patients with metastases (default 0.4)")  # fmt: skip
    p.add_argument(
        "--min-slices", type=int, default=24, help="fewest slices per series (default 24)"
    )
    p.add_argument("--max-slices", type=int, default=32, help="most slices per series (default 32)")
    p.add_argument(
        "--matrix", type=int, default=256, help="rows = columns of each slice (default 256)"
    )
    p.add_argument("--thickness", type=float, default=5.0, help="slice thickness in mm (default 5)")
    p.add_argument("--lesion-mm", type=float, nargs=2, metavar=("LOW", "HIGH"), default=argparse.SUPPRESS,
                   help="metastasis diameter range in mm (default 3-20; the demo uses 18 30, "
                        "which a network trained from scratch on CPU can learn)")  # fmt: skip
    p.add_argument("--lesion-hu", type=float, nargs=2, metavar=("LOW", "HIGH"), default=argparse.SUPPRESS,
                   help="metastasis enhancement range in HU (default 45-90; the demo: 75 90)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0,
                   help="the same seed writes the same bytes (default 0)")  # fmt: skip
    p.add_argument("--confounder", choices=("none", "marker"), default=argparse.SUPPRESS,
                   help="marker: a burned-in label in the corner of every positive's images, "
                        "a shortcut unrelated to the lesion (default none)")  # fmt: skip
    p.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   default=[0.6, 0.2, 0.2],
                   help="shares of labels.csv's split column, stratified by label and seeded "
                        "(default 0.6 0.2 0.2)")  # fmt: skip
    p.add_argument("--no-split", dest="split", action="store_const", const=None,
                   help="write labels.csv without a split column")  # fmt: skip
    _add_workers(p, "rendering processes (default: every core)")
    p.set_defaults(func=cmd_synth)

    p = command(
        "config",
        help="print the resolved config as commented YAML (brainmets config > my.yaml)",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = command("index", help="find the series under a DICOM root; choose one per patient")
    p.add_argument("dicom_root", type=Path, help="folder searched for DICOM files (recursively)")
    p.add_argument("--out", type=Path, required=True, help="folder for series.csv / files.csv")
    _add_workers(p, "header-reading processes (default: every core)")
    _add_allow_failures(p, "DICOM files are damaged")
    # The series are chosen from preprocess.slab_mm and preprocess.min_slices, the keys
    # prepare and predict choose by, so one config gives one choice everywhere.
    _add_config_args(p)
    p.set_defaults(func=cmd_index)

    p = command("prepare", help="HU -> slabs -> brain window -> 256^2, cached per patient")
    p.add_argument(
        "--labels",
        type=Path,
        required=True,
        help="CSV: patient_id,label[,split][,series_uid][,path]",
    )
    p.add_argument(
        "--index",
        type=Path,
        help="output folder of `brainmets index` (not needed when every labels row has a path)",
    )
    p.add_argument("--out", type=Path, required=True, help="cache folder")
    _add_workers(p, "decoding processes (default: every core)")
    p.add_argument(
        "--num-shards",
        type=int,
        default=1,
        help="split the manifest between this many jobs (a cluster array job)",
    )
    p.add_argument("--shard-id", type=int, default=0, help="this job's share, 0-based")
    p.add_argument(
        "--overwrite", action="store_true", help="discard a cache prepared with other parameters"
    )
    _add_allow_failures(p, "patients failed")
    _add_config_args(p)
    p.set_defaults(func=cmd_prepare)

    p = command("train", help="three-stage curriculum training on a prepared cache")
    _add_config_args(p)
    p.add_argument("--data", type=Path, help="prepared cache (same as --set data.cache=...)")
    p.add_argument("--out", type=Path, help="run folder (default runs/<name>)")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue an interrupted run")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (same as --set train.device=...)")
    p.add_argument("--epochs", type=int, help="epochs in all (same as --set train.epochs=...)")
    p.add_argument(
        "--allow-chance",
        action="store_true",
        help="exit 0 even when the model is not shown to rank its validation patients better than "
        "chance (otherwise exit 3, after the warning)",
    )
    p.set_defaults(func=cmd_train)

    p = command("evaluate", help="patient-level metrics with 95%% CIs and plots")
    p.add_argument("run", type=Path, help="a run folder written by train")
    p.add_argument("--data", type=Path, required=True, help="prepared cache to evaluate on")
    p.add_argument(
        "--split",
        default=None,
        help="only patients of this manifest split (e.g. test); default: all",
    )
    p.add_argument("--out", type=Path, help="default RUN/evaluation")
    p.add_argument(
        "--n-boot",
        type=int,
        default=None,
        help="bootstrap resamples (default: evaluate.n_boot of the run; 0: none)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the scoring forward (faster for many patients on a GPU)",
    )
    _add_evaluate_truth_options(p)
    p.set_defaults(func=cmd_evaluate)

    _add_compare_parser(command)

    p = command("predict", help="score new studies: DICOM folders, NIfTI files or a cache")
    p.add_argument("run", type=Path, help="a run folder written by train")
    p.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        help="patient DICOM folders, a DICOM root of many patients, NIfTI files or caches",
    )
    p.add_argument(
        "--out", type=Path, default=Path("predictions.csv"), help="table (default %(default)s)"
    )
    p.add_argument(
        "--heatmaps",
        type=Path,
        help="write Grad-CAM PNGs of the top slices here (RUN/heatmaps "
        "puts them in the run's report)",
    )
    p.add_argument(
        "--dicom-out",
        type=Path,
        help="write each DICOM patient's result as DICOM here (a Comprehensive SR and Grad-CAM "
        "secondary captures in the source study, marked for research use), one folder each",
    )
    p.add_argument("--top-k", type=int, default=3, help="heatmaps per patient (default 3)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--batch-slices", type=int, default=512, help="score patients together up to this many"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the scoring forward (faster for many patients on a GPU)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the patients --out already holds (predicted without an error) and predict "
        "the others",
    )
    _add_backend(p)
    _add_allow_failures(p, "inputs failed")
    p.set_defaults(func=cmd_predict)

    from brainmets.serve import DEFAULT_STABLE_SECONDS

    p = command(
        "serve",
        help="a DICOM node beside PACS: receive head CT, score each study, send results back",
    )
    p.add_argument("run", type=Path, nargs="?", help="a run folder written by train")
    p.add_argument("--store", type=Path, help="spool, results and the record (serve.sqlite)")
    p.add_argument("--status", type=Path, metavar="DIR", help="print the record of a --store")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default %(default)s)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port (default %(default)s)")
    p.add_argument("--ae-title", default="BRAINMETS", help="this node's AE title")
    p.add_argument(
        "--allow", nargs="+", metavar="AET", help="accept associations from these AE titles only"
    )
    p.add_argument(
        "--stable-seconds",
        type=float,
        default=DEFAULT_STABLE_SECONDS,
        help="score a study once no instance arrived for this long (default %(default)g)",
    )
    p.add_argument(
        "--forward", metavar="AET@HOST:PORT", help="send the result objects there (C-STORE)"
    )
    p.add_argument("--top-k", type=int, default=3, help="Grad-CAM captures per study (default 3)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _add_backend(p)
    p.set_defaults(func=cmd_serve)

    p = command("export", help="the slice network as ONNX + JSON sidecar (onnxruntime, Triton)")
    p.add_argument("run", type=Path, help="a run folder written by train")
    p.add_argument("--out", type=Path, help="export folder (default RUN/export)")
    p.add_argument(
        "--triton",
        type=Path,
        metavar="REPO",
        help="also write a Triton model repository: REPO/NAME/config.pbtxt, REPO/NAME/1/model.onnx",
    )
    p.add_argument("--name", default="brainmets", help="Triton model name (default %(default)s)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=128,
        help="Triton max_batch_size: most slices per request (default %(default)s)",
    )
    p.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="dynamic int8 quantisation for CPUs (changes the scores: see README)",
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default %(default)s)")
    p.set_defaults(func=cmd_export)

    p = command("report", help="(re)write RUN/report.html")
    p.add_argument("run", type=Path, help="a run folder written by train")
    p.set_defaults(func=cmd_report)

    p = command("demo", help="synth -> index -> prepare -> train -> evaluate -> predict")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("brainmets-demo"),
        help="folder for everything the demo writes (default %(default)s)",
    )
    p.add_argument(
        "--patients",
        type=int,
        default=None,
        help="synthetic cohort size (default: the demo's, see README)",
    )
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--full", action="store_true", help="the full specified configuration even without a GPU"
    )
    p.add_argument("--seed", type=int, default=0, help="cohort and training seed (default 0)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from brainmets.config import ConfigError
    from brainmets.data.cache import CacheError
    from brainmets.io import InUseError, MissingPackageError, os_error_line

    try:
        return args.func(args)
    except (
        ConfigError,
        CacheError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        ValueError,
        InUseError,
        MissingPackageError,
    ) as err:
        # Bad input from the user: one clear line (the traceback only with --verbose).
        if args.verbose:
            raise
        print(f"{_rank_prefix()}brainmets: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # A full disk, a read-only folder: the path, the cause and what to do, in one line.
        if args.verbose:
            raise
        print(f"{_rank_prefix()}brainmets: {os_error_line(err)}{_resume_hint(args)}",
              file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        if _rank() == 0:  # one hint for the run, not one per process
            print(f"brainmets: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130


def _resume_hint(args) -> str:
    """How to go on after Ctrl-C, for the commands that can."""
    if args.func is cmd_prepare:
        return " (run the same command again: patients already prepared are kept)"
    if args.func is cmd_predict:
        if not Path(f"{args.out}.partial").is_file():
            return ""  # stopped before any patient was done: nothing to resume
        return f" (the patients done are in {args.out}.partial; add --resume to the same command)"
    run_dir = getattr(args, "run_dir", None)
    if args.func is cmd_train and run_dir is not None:
        if (rundir.resume_state(Path(run_dir))).is_file():
            return f" (go on with: brainmets train --resume {run_dir})"
        return f" before the first checkpoint; {run_dir} holds no state to resume"
    return ""


if __name__ == "__main__":
    sys.exit(main())
