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
from collections.abc import Callable
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
    from pydantic import ValidationError

    from brainmets.data.synth_settings import LESION_SETTINGS
    from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort

    # Only the options given: every other field keeps SynthConfig's default.
    given = {field: getattr(args, dest) for dest, field in _SYNTH_FIELDS.items() if dest in args}
    if "min_slices" in args or "max_slices" in args:
        low, high = SynthConfig.model_fields["slices"].default
        given["slices"] = (getattr(args, "min_slices", low), getattr(args, "max_slices", high))
    lesions = dict(LESION_SETTINGS[args.lesions])
    for dest, field in (("lesion_mm", "lesion_diameter_mm"), ("lesion_hu", "lesion_hu")):
        if dest in args:
            lesions[field] = tuple(getattr(args, dest))
    if "confounder" in args:
        lesions["confounder"] = args.confounder
    try:
        cfg = SynthConfig(**given, **lesions)
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


# synth's options (argparse dest) that are SynthConfig fields of the same meaning.
_SYNTH_FIELDS = {
    "patients": "num_patients",
    "positive_fraction": "positive_fraction",
    "matrix": "matrix",
    "thickness": "slice_thickness_mm",
    "seed": "seed",
}
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

    cfg = load_config(args.config, args.set, preset=args.preset)
    sys.stdout.write(annotated_yaml(cfg, preset=args.preset))
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
    # A file that is not DICOM at all and does not claim to be (notes, exports beside the
    # images) is listed but no failure; a DICOM file that cannot be read (empty, truncated,
    # corrupt), or one named .dcm that is not DICOM, is one.
    failed = int((index.errors["reason"] != NOT_DICOM).sum())
    listed = len(index.errors) - failed
    print(
        f"{len(index.series)} series of {patients} patients; {chosen} chosen; {failed} files "
        f"failed (damaged DICOM, or named as DICOM but not DICOM); {listed} other files are "
        f"not DICOM (listed only); tables in {args.out}"
    )
    if failed:
        print(
            f"the failed files and why are listed in {Path(args.out) / 'index_errors.csv'}",
            file=sys.stderr,
        )
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
    from brainmets.train.folds import is_cross_validation
    from brainmets.train.trainer import train

    shortcuts = [f"{key}={value}" for key, value in
                 (("train.device", args.device), ("train.epochs", args.epochs),
                  ("data.folds", args.folds)) if value is not None]  # fmt: skip
    if args.allow_chance:  # a config key, so that the run's config.yaml keeps it for --resume
        shortcuts.append("train.allow_chance=true")
    args.set = [*args.set, *shortcuts]
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / rundir.CONFIG).is_file():
            raise FileNotFoundError(
                f"cannot resume {run_dir}: no run there ({run_dir / 'config.yaml'} is missing); "
                "give the folder a train run wrote (--out, default runs/NAME)"
            )
        cfg = load_config(run_dir / rundir.CONFIG, args.set)
        if is_cross_validation(run_dir):
            args.run_dir = run_dir
            return _train_folds(args, cfg, run_dir, resume=True)
    else:
        overrides = list(args.set)
        if args.data:
            overrides.append(f"data.cache={args.data}")
        cfg = load_config(args.config, overrides)
        run_dir = Path(args.out) if args.out else Path("runs") / cfg.name
        if cfg.data.folds > 1:
            from brainmets.train.folds import fold_dir

            # After Ctrl-C: resume the one fold of an array job, or the cross-validation.
            args.run_dir = run_dir if args.fold is None else fold_dir(run_dir, args.fold)
            return _train_folds(args, cfg, run_dir, resume=False)
    if args.fold is not None:
        raise ValueError(f"--fold {args.fold} needs --folds K (the number of folds)")
    args.run_dir = run_dir  # for the hint after Ctrl-C (both branches)
    result = train(cfg, run_dir, resume=bool(args.resume), progress=not args.quiet)
    if _rank() != 0:
        return 0  # under torchrun, rank 0 reports the run
    _print_run(result, run_dir, cfg.train.best_metric)
    return _ranking_exit(result.get("ranking"), cfg.train.allow_chance)


def _print_run(result: dict, run_dir: Path, rule: str, prefix: str = "run") -> None:
    """The end-of-run lines: the chosen epoch, its threshold, the reported scale."""
    from brainmets.train.selection import HEADLINE

    best = result.get("best") or {}
    metric = result.get("best_metric", rule)  # val_loss if val is one class
    column = HEADLINE.get(metric, metric)  # the rule's one-number summary
    chosen = metric if column == metric else f"by {metric}: {column}"
    print(
        f"{prefix} {run_dir}: best {chosen} {best.get(column, float('nan')):.4f} at epoch "
        f"{result.get('best_epoch')}, threshold {best.get('threshold', float('nan')):.3f}"
    )
    sidecar = run_dir / rundir.MODEL_SIDECAR
    if sidecar.is_file():
        from brainmets.model.probability import Calibration

        calibration = Calibration.from_sidecar(json.loads(sidecar.read_text()))
        print(
            "probabilities and thresholds (train.log, metrics.csv, evaluate, predict, the SR): "
            f"{calibration.describe()}"
        )


def _train_folds(args, cfg, cv_dir: Path, *, resume: bool) -> int:
    """``train --folds K [--fold k]``, ``train --resume CV``: the fold runs, and with all of
    them their ensemble, which decides the exit code as one run's verdict does."""
    from brainmets.train.cross_validation import train_folds
    from brainmets.train.folds import fold_dir

    result = train_folds(
        cfg,
        cv_dir,
        fold=args.fold,
        resume=resume,
        combine=args.combine,
        members=args.members,
        progress=not args.quiet,
    )
    if _rank() != 0:
        return 0
    for k, summary in result.folds.items():
        _print_run(summary, fold_dir(cv_dir, k), cfg.train.best_metric, prefix=f"fold {k}:")
    if result.ensemble is None:  # one fold of an array job
        (k, summary), *_ = result.folds.items()
        print(f"when every fold is trained: brainmets ensemble {cv_dir}")
        return _ranking_exit(summary.get("ranking"), cfg.train.allow_chance)
    _write_report(cv_dir)
    print(result.ensemble.text)
    return _ranking_exit(result.ensemble.meta.get("ranking"), cfg.train.allow_chance)


def _write_report(folder: Path) -> None:
    from brainmets.evaluate.report import write_report

    print(f"report: {write_report(folder)}")


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


def cmd_ensemble(args) -> int:
    from brainmets.train.ensemble import build_ensemble

    runs = list(args.runs)
    if args.out is None and len(runs) != 1:
        raise ValueError("give --out for the ensemble of fold runs from several folders")
    summary = build_ensemble(runs, args.out or runs[0], combine=args.combine, members=args.members)
    _write_report(summary.folder)
    print(summary.text)
    return _ranking_exit(summary.meta.get("ranking"), args.allow_chance)


def cmd_evaluate(args) -> int:
    from brainmets.config import load_config
    from brainmets.evaluate.evaluation import evaluate_run

    settings = None
    if args.config is not None or args.set:  # else the run's own evaluate.* keys
        run_config = Path(args.run) / rundir.CONFIG
        base = args.config or (run_config if run_config.is_file() else None)
        settings = load_config(base, args.set).evaluate
    summary = evaluate_run(
        args.run,
        args.data,
        split=args.split,
        out_dir=args.out,
        n_boot=args.n_boot,
        backend=_backend_spec(args),
        progress=not args.quiet,
        settings=settings,
        **_evaluate_truth_args(args),
    )
    print(summary.text)
    failed = _cache_failures(Path(args.data))
    if failed:
        print(
            f"{failed} patients of {args.data} failed to prepare and are in none of these figures "
            f"(listed in {Path(args.data) / 'errors.csv'})",
            file=sys.stderr,
        )
        return 0 if args.allow_failures else 1
    return 0


def _cache_failures(cache: Path) -> int:
    """Patients a cache's errors.csv (or its shards') lists as failed and that are not in it."""
    import pandas as pd

    tables = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in cache.glob("errors*.csv")]
    failed = {pid for t in tables if "patient_id" in t for pid in t["patient_id"]}
    index = cache / "index.csv"
    if failed and index.is_file():
        failed -= set(pd.read_csv(index, dtype=str, keep_default_na=False)["patient_id"])
    return len(failed)


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
        backend=_backend_spec(args),
        progress=not args.quiet,
    )
    print(summary.text)
    return 0


def _compare_parser(command: Command) -> None:
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
    _add_backend(p)
    p.set_defaults(func=cmd_compare)


def cmd_predict(args) -> int:
    from brainmets.data.workers import keep_freed_memory
    from brainmets.predict import Shard, predict

    keep_freed_memory()  # one patient's arrays after another, also in this process
    dicom_dir, stow_url = _dicom_outputs(args.dicom_out or [])
    table = Shard(args.num_shards, args.shard_id).table(args.out)
    result = predict(
        args.run,
        args.inputs,
        out_csv=args.out,
        heatmaps_dir=args.heatmaps,
        dicom_out=dicom_dir,
        stow_url=stow_url,
        top_k=args.top_k,
        batch_slices=args.batch_slices,
        progress=not args.quiet,
        resume=args.resume,
        backend=_backend_spec(args),
        num_shards=args.num_shards,
        shard_id=args.shard_id,
    )
    kept = f" ({result.kept} of them kept from the earlier run)" if result.kept else ""
    print(f"{result.predicted} patients predicted{kept}, {result.failed} failed -> {table}")
    if result.merged:
        print(f"all {args.num_shards} shards finished: merged into {result.merged}")
    failed = result.table[result.table["error"] != ""]
    for row in failed.head(5).itertuples():
        print(f"  {row.patient_id}: {row.error}", file=sys.stderr)
    if len(failed) > 5:
        print(f"  ... and {len(failed) - 5} more in {table}", file=sys.stderr)
    return 1 if result.failed and not args.allow_failures else 0


def _dicom_outputs(values: list[str]) -> tuple[Path | None, str | None]:
    """``--dicom-out`` given as a folder, a STOW-RS URL, or one of each (both are written)."""
    from brainmets.dicomweb import check_url, is_url, require

    urls = [check_url(v, "--dicom-out") for v in values if is_url(v)]
    folders = [Path(v) for v in values if not is_url(v)]
    if len(urls) > 1 or len(folders) > 1:
        raise ValueError("--dicom-out: at most one folder and one STOW-RS URL")
    if urls:
        require()
    return (folders[0] if folders else None), (urls[0] if urls else None)


def _pull_source(args):
    from brainmets.serve.pull import PullSource

    if not args.pull:
        return None
    return PullSource(args.pull, every=args.pull_every, page=args.pull_page, since=args.pull_since)


def cmd_serve(args) -> int:
    from brainmets.serve.record import status_text

    if args.status is not None:
        print(status_text(args.status))
        return 0
    if args.run is None or args.store is None:
        raise ValueError("serve needs a RUN and --store DIR (or --status DIR)")
    from brainmets.serve.admission import Limits
    from brainmets.serve.forward import parse_destination
    from brainmets.serve.node import NodeConfig, serve_forever

    config = NodeConfig(
        host=args.host,
        port=args.port,
        ae_title=args.ae_title,
        allow=args.allow or (),
        stable_seconds=args.stable_seconds,
        incomplete_seconds=args.incomplete_seconds,
        forward=parse_destination(args.forward) if args.forward else None,
        pull=_pull_source(args),
        listen=not args.no_listen,
        top_k=args.top_k,
        backend=_backend_spec(args),
        allow_chance=args.allow_chance,
        limits=Limits(
            max_associations=args.max_associations,
            idle_seconds=args.idle_seconds,
            min_free_bytes=int(args.min_free_mb * 2**20),
        ),
        keep_days=args.keep_days,
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
        triton_backend=args.triton_backend,
        quantize=args.quantize,
        opset=args.opset,
    )
    print(
        f"exported {result.onnx} + {result.sidecar.name} (largest slice-logit difference from "
        f"PyTorch on probe slices {result.max_abs_diff:.2g})"
    )
    if result.triton:
        files = "1/model.py, 1/model.onnx" if args.triton_backend == "python" else "1/model.onnx"
        print(f"Triton model repository: {result.triton} (config.pbtxt, {files})")
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
        folds=args.folds,
        progress=not args.quiet,
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


# brainmets.backends.BACKENDS (a test keeps them equal): importing that package here would load
# torch at every start-up, --help and `brainmets config` included.
BACKEND_NAMES = ("torch", "onnxruntime", "triton")


def _add_backend(p: argparse.ArgumentParser, *, compile: bool = True) -> None:
    """The options of ``brainmets.backends.BackendSpec``: one block for every command that
    scores (``_backend_spec`` reads it back)."""
    g = p.add_argument_group("scoring backend")
    g.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        default="torch",
        help="score with PyTorch, with onnxruntime from the run's export, or on a Triton "
        "server serving it (default %(default)s)",
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    if compile:
        g.add_argument(
            "--compile",
            action="store_true",
            help="torch.compile the scoring forward (faster for many patients on a GPU)",
        )
    g.add_argument(
        "--onnx", type=Path, help="the export to score with (default RUN/export, from export)"
    )
    g.add_argument("--url", help="triton backend: the server's gRPC host:port, e.g. localhost:8001")
    g.add_argument(
        "--triton-model", default="brainmets", help="triton backend: the model's name on the server"
    )


def _backend_spec(args):
    from brainmets.backends import BackendSpec

    return BackendSpec(
        name=args.backend,
        device=args.device,
        compile=getattr(args, "compile", False),
        onnx=args.onnx,
        url=args.url,
        triton_model=args.triton_model,
    )


def _add_config_args(
    p: argparse.ArgumentParser, what: str = "YAML config (defaults: the specification)"
) -> None:
    p.add_argument("--config", type=Path, help=what)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set preprocess.slice_mm=native",
    )


# One builder per subcommand: ``command(name, help=...)`` makes its parser.
Command = Callable[..., argparse.ArgumentParser]


def _synth_parser(command: Command) -> None:
    from brainmets.data import synth_settings as synth

    p = command("synth", help="write a synthetic head-CT cohort as DICOM + labels.csv")
    p.add_argument("out", type=Path, help="folder for dicom/, labels.csv and synth.json")
    # Defaults are SynthConfig's (brainmets.data.synth_settings): an option not given is not
    # passed, and the help reads the same values.
    given = {"default": argparse.SUPPRESS}
    p.add_argument("--patients", type=int, **given,
                   help=f"number of patients (default {synth.NUM_PATIENTS})")  # fmt: skip
    p.add_argument("--positive-fraction", type=float, **given,
                   help=f"share of patients with metastases (default {synth.POSITIVE_FRACTION:g})")  # fmt: skip
    p.add_argument("--min-slices", type=int, **given,
                   help=f"fewest slices per series (default {synth.SLICES[0]})")  # fmt: skip
    p.add_argument("--max-slices", type=int, **given,
                   help=f"most slices per series (default {synth.SLICES[1]})")  # fmt: skip
    p.add_argument("--matrix", type=int, **given,
                   help=f"rows = columns of each slice (default {synth.MATRIX})")  # fmt: skip
    p.add_argument("--thickness", type=float, **given,
                   help=f"slice thickness in mm (default {synth.SLICE_THICKNESS_MM:g})")  # fmt: skip
    p.add_argument("--lesions", choices=tuple(synth.LESION_SETTINGS), default=synth.DEFAULT_LESIONS,
                   help=f"metastases: default ({synth.lesion_ranges('default')}, what a pretrained "
                        f"model is for) or conspicuous ({synth.lesion_ranges('conspicuous')}, "
                        "what a network trained from random weights on a CPU learns; the CPU "
                        "demo's)")  # fmt: skip
    p.add_argument("--lesion-mm", type=float, nargs=2, metavar=("LOW", "HIGH"), **given,
                   help="metastasis diameter range in mm (instead of the --lesions setting's)")  # fmt: skip
    p.add_argument("--lesion-hu", type=float, nargs=2, metavar=("LOW", "HIGH"), **given,
                   help="metastasis enhancement range in HU (instead of the --lesions setting's)")  # fmt: skip
    p.add_argument("--seed", type=int, **given,
                   help=f"the same seed writes the same bytes (default {synth.SEED})")  # fmt: skip
    p.add_argument("--confounder", choices=("none", "marker"), **given,
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


def _config_parser(command: Command) -> None:
    p = command(
        "config",
        help="print the resolved config as commented YAML (brainmets config > my.yaml)",
    )
    from brainmets.config import PRESET_SUMMARIES

    p.add_argument(
        "--preset",
        choices=tuple(PRESET_SUMMARIES),
        help="start from a named configuration: "
        + "; ".join(f"{name}: {text}" for name, text in PRESET_SUMMARIES.items())
        + " (default: the defaults, which are spec)",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_config)


def _index_parser(command: Command) -> None:
    p = command("index", help="find the series under a DICOM root; choose one per patient")
    p.add_argument("dicom_root", type=Path, help="folder searched for DICOM files (recursively)")
    p.add_argument("--out", type=Path, required=True, help="folder for series.csv / files.csv")
    _add_workers(p, "header-reading processes (default: every core)")
    _add_allow_failures(p, "files are damaged DICOM or named .dcm but not DICOM")
    # The series are chosen from preprocess.slab_mm and preprocess.min_slices, the keys
    # prepare and predict choose by, so one config gives one choice everywhere.
    _add_config_args(p)
    p.set_defaults(func=cmd_index)


def _prepare_parser(command: Command) -> None:
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


def _train_parser(command: Command) -> None:
    p = command("train", help="three-stage curriculum training on a prepared cache")
    _add_config_args(p)
    p.add_argument("--data", type=Path, help="prepared cache (same as --set data.cache=...)")
    p.add_argument("--out", type=Path, help="run folder (default runs/<name>)")
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RUN",
        help="continue an interrupted run, or a cross-validation folder (its stopped folds)",
    )
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (same as --set train.device=...)")
    p.add_argument("--epochs", type=int, help="epochs in all (same as --set train.epochs=...)")
    g = p.add_argument_group("cross-validation")
    g.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="K-fold cross-validation over the non-test patients (same as --set data.folds=K): "
        "trains OUT/fold-0 ... fold-K-1 and their ensemble into OUT",
    )
    g.add_argument(
        "--fold",
        type=int,
        metavar="k",
        help="train fold k alone (one job of an array; combine with brainmets ensemble OUT)",
    )
    _add_combine(g)
    _add_allow_chance(p)
    p.set_defaults(func=cmd_train)


def _add_allow_chance(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-chance",
        action="store_true",
        help="exit 0 even when the model is not shown to rank its validation patients better than "
        "chance (otherwise exit 3, after the warning); --resume keeps it",
    )


# brainmets.model.ensemble.COMBINE, brainmets.train.ensemble.DEFAULT_COMBINE, MEMBER_RULES and
# DEFAULT_MEMBERS, copied so that the parser loads no torch (a test keeps them equal).
COMBINE_NAMES = ("mean_logit", "mean_probability")
DEFAULT_COMBINE_NAME = "mean_logit"
MEMBER_RULE_NAMES = ("all", "ranking")
DEFAULT_MEMBER_RULE = "all"


def _add_combine(p) -> None:
    p.add_argument(
        "--combine",
        choices=COMBINE_NAMES,
        default=DEFAULT_COMBINE_NAME,
        help="the ensemble's patient score: the members' mean patient logit or their mean "
        "probability (default %(default)s)",
    )
    p.add_argument(
        "--members",
        choices=MEMBER_RULE_NAMES,
        default=DEFAULT_MEMBER_RULE,
        help="the fold models the ensemble keeps: all, or those whose own fold shows they rank "
        "(a fold whose verdict is 'does not rank' is left out, unless none ranks) "
        "(default %(default)s)",
    )


def _ensemble_parser(command: Command) -> None:
    p = command(
        "ensemble",
        help="combine fold runs: threshold, calibration and verdict from out-of-fold predictions",
    )
    p.add_argument(
        "runs",
        type=Path,
        nargs="+",
        help="a cross-validation folder (train --folds K --out CV), or its fold runs",
    )
    p.add_argument("--out", type=Path, help="ensemble folder (default: the one folder given)")
    _add_combine(p)
    _add_allow_chance(p)
    p.set_defaults(func=cmd_ensemble)


def _evaluate_parser(command: Command) -> None:
    p = command("evaluate", help="patient-level metrics with 95%% CIs and plots")
    p.add_argument("run", type=Path, help="a run folder written by train, or an ensemble")
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
    _add_allow_failures(p, "patients of the cache failed to prepare")
    _add_config_args(p, "the evaluate.* keys (default: the run's config.yaml)")
    _add_evaluate_truth_options(p)
    _add_backend(p)
    p.set_defaults(func=cmd_evaluate)


def _predict_parser(command: Command) -> None:
    p = command("predict", help="score new studies: DICOM folders, NIfTI files or a cache")
    p.add_argument("run", type=Path, help="a run folder written by train, or an ensemble")
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
        action="append",
        metavar="DIR|URL",
        help="write each DICOM patient's result as DICOM here (a TID 1500 SR and Grad-CAM "
        "secondary captures in the source study, marked for research use), one folder each; "
        "or post them to a STOW-RS URL (http://pacs:8042/dicom-web); give both to do both",
    )
    p.add_argument("--top-k", type=int, default=3, help="heatmaps per patient (default 3)")
    p.add_argument(
        "--batch-slices",
        type=int,
        default=512,
        help="score whole patients together up to this many slices (default %(default)s)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the patients --out already holds (predicted without an error) and predict "
        "the others",
    )
    p.add_argument(
        "--num-shards",
        type=int,
        default=1,
        help="split the patients between this many jobs (a cluster array job): each writes "
        "OUT-shardK-ofN.csv, and the last to finish merges them into OUT",
    )
    p.add_argument("--shard-id", type=int, default=0, help="this job's share, 0-based")
    _add_backend(p)
    _add_allow_failures(p, "inputs failed")
    p.set_defaults(func=cmd_predict)


def _serve_parser(command: Command) -> None:
    from brainmets import serve

    p = command(
        "serve",
        help="a DICOM node beside PACS: receive head CT, score each study, send results back",
    )
    p.add_argument(
        "run", type=Path, nargs="?", help="a run folder written by train, or an ensemble"
    )
    p.add_argument("--store", type=Path, help="spool, results and the record (serve.sqlite)")
    p.add_argument("--status", type=Path, metavar="DIR", help="print the record of a --store")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default %(default)s)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port (default %(default)s)")
    p.add_argument(
        "--ae-title", default="BRAINMETS", help="this node's AE title (default %(default)s)"
    )
    p.add_argument(
        "--allow", nargs="+", metavar="AET", help="accept associations from these AE titles only"
    )
    p.add_argument(
        "--stable-seconds",
        type=float,
        default=serve.DEFAULT_STABLE_SECONDS,
        help="score a study once no instance arrived for this long (default %(default)g)",
    )
    p.add_argument(
        "--incomplete-seconds",
        type=float,
        default=serve.DEFAULT_INCOMPLETE_SECONDS,
        help="a study with slices missing waits this long for them, then is scored and its "
        "result marked partial (default %(default)g)",
    )
    p.add_argument(
        "--forward",
        metavar="AET@HOST:PORT|URL",
        help="send the result objects there: C-STORE to an AE, or STOW-RS to a DICOMweb URL "
        "(http://pacs:8042/dicom-web)",
    )
    _add_pull(p)
    p.add_argument("--top-k", type=int, default=3, help="Grad-CAM captures per study (default 3)")
    p.add_argument(
        "--allow-chance",
        action="store_true",
        help="serve a model not shown to rank patients (each SR says so); refused otherwise",
    )
    p.add_argument(
        "--keep-days",
        type=float,
        default=serve.DEFAULT_KEEP_DAYS,
        help="delete a finished study's spool this long after its last instance "
        "(default %(default)g; 0: once its results are sent)",
    )
    p.add_argument(
        "--min-free-mb",
        type=float,
        default=1024,
        help="refuse new associations while the store has less free space (default %(default)g)",
    )
    p.add_argument(
        "--max-associations",
        type=int,
        default=32,
        help="associations at once; more are refused, senders retry (default %(default)s)",
    )
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=30.0,
        help="abort an association idle this long; a connection that sends no association "
        "request is closed after at most 10 s (default %(default)g)",
    )
    _add_backend(p, compile=False)
    p.set_defaults(func=cmd_serve)


def _add_pull(p: argparse.ArgumentParser) -> None:
    """serve's DICOMweb pull mode."""
    from brainmets import serve

    p.add_argument(
        "--pull",
        metavar="URL",
        help="also fetch new head CT studies from this DICOMweb server (QIDO-RS, WADO-RS); "
        "results go where --forward says, e.g. the same URL",
    )
    p.add_argument(
        "--pull-every",
        type=float,
        default=serve.DEFAULT_PULL_SECONDS,
        help="seconds between two polls of --pull (default %(default)g)",
    )
    p.add_argument(
        "--pull-page",
        type=int,
        default=100,
        help="studies or instances per QIDO-RS request (default %(default)s)",
    )
    p.add_argument(
        "--pull-since",
        metavar="YYYYMMDD",
        help="first start: pull studies dated from then on (default today; later starts go on "
        "from the mark the record keeps)",
    )
    p.add_argument(
        "--no-listen",
        action="store_true",
        help="with --pull: open no DICOM port (a site without a DIMSE route)",
    )


def _export_parser(command: Command) -> None:
    p = command("export", help="the slice network as ONNX + JSON sidecar (onnxruntime, Triton)")
    p.add_argument("run", type=Path, help="a run folder written by train, or an ensemble")
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
        "--triton-backend",
        choices=("onnxruntime", "python"),
        default="onnxruntime",
        help="the Triton backend that runs the model: onnxruntime (a stock Triton server) or "
        "python (model.py runs model.onnx with onnxruntime in the server's Python: for servers "
        "without the ONNX Runtime backend, such as nvidia-pytriton's) (default %(default)s)",
    )
    p.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: dynamic int8 quantisation, faster on CPUs but it changes the scores "
        "(measured in docs/benchmarks.md: compare the export's decisions before using it)",
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default %(default)s)")
    p.set_defaults(func=cmd_export)


def _report_parser(command: Command) -> None:
    p = command("report", help="(re)write RUN/report.html")
    p.add_argument("run", type=Path, help="a run folder written by train, or an ensemble")
    p.set_defaults(func=cmd_report)


def _demo_parser(command: Command) -> None:
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
    p.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="train K fold runs and their ensemble instead of one run (K times the training)",
    )
    p.set_defaults(func=cmd_demo)


SUBCOMMANDS = (
    _synth_parser,
    _config_parser,
    _index_parser,
    _prepare_parser,
    _train_parser,
    _ensemble_parser,
    _evaluate_parser,
    _compare_parser,
    _predict_parser,
    _serve_parser,
    _export_parser,
    _report_parser,
    _demo_parser,
)


_EXAMPLES = """\
examples:
  brainmets demo                                  the whole workflow on a synthetic cohort
  brainmets synth cohort --patients 200 --min-slices 12 --max-slices 14 --lesions conspicuous
  brainmets config --preset cpu-small > my.yaml   a config to start from (spec: for a GPU)
  brainmets index DICOM_ROOT --config my.yaml --out work/index
  brainmets prepare --config my.yaml --labels labels.csv --index work/index --out work/cache
  brainmets train --config my.yaml --data work/cache --out runs/mine
  brainmets evaluate runs/mine --data work/cache --split test
  brainmets predict runs/mine /new/study1 /new/study2 --out predictions.csv

Every command has --help; the README walks through each step.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainmets",
        description="Patient-level brain metastasis detection on head CT.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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

    for add in SUBCOMMANDS:
        add(command)
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
        from brainmets.predict import Shard

        table = Shard(args.num_shards, args.shard_id).table(args.out)
        if not Path(f"{table}.partial").is_file():
            return ""  # stopped before any patient was done: nothing to resume
        return f" (the patients done are in {table}.partial; add --resume to the same command)"
    run_dir = getattr(args, "run_dir", None)
    if args.func is cmd_train and run_dir is not None:
        from brainmets.train.folds import is_cross_validation

        if rundir.resume_state(Path(run_dir)).is_file() or is_cross_validation(Path(run_dir)):
            return f" (go on with: brainmets train --resume {run_dir})"
        return f" before the first checkpoint; {run_dir} holds no state to resume"
    return ""


if __name__ == "__main__":
    sys.exit(main())
