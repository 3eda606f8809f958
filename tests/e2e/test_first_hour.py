"""The first hour with one's own cohort, as a new user meets it through the CLI: a run at chance
says so, a failed start leaves nothing behind, the config and split to start from, the
weights' checksum, progress where the wait is long, and clear errors for bad labels files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from brainmets import __version__
from brainmets.cli import EXIT_DOES_NOT_RANK, main
from brainmets.config import ConfigError, PreprocessConfig, load_config
from brainmets.data.cache import build_cache_from_arrays

SIZE = 32
TINY = [
    "--set", "model.arch=resnet18",
    "--set", "model.hidden=8",
    "--set", "train.stage_epochs=[0,1,1]",
    "--set", "train.batch_patients=4",
    "--set", "data.num_workers=0",
    "--set", "data.val_fraction=0.34",
    "--set", "evaluate.n_boot=20",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _noise_cache(root: Path, size: int = SIZE, patients: int = 12) -> Path:
    """Patients of pure noise with alternating labels: nothing to learn, a model at chance."""
    rng = np.random.default_rng(0)
    rows = [
        (f"P{i:02d}", i % 2, rng.integers(20, 110, size=(3, size, size)).astype(np.uint8))
        for i in range(patients)
    ]
    build_cache_from_arrays(root, rows, PreprocessConfig(size=size))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return _noise_cache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def chance_run(cache, tmp_path_factory):
    """A run trained on noise through the CLI, without accepting a model at chance."""
    run = tmp_path_factory.mktemp("chance") / "run"
    rc = main(["-q", "train", "--data", str(cache), "--out", str(run), "--set", "train.epochs=1",
               *TINY])  # fmt: skip
    return run, rc


# --------------------------------------------------------------------------- a run at chance


def test_a_run_at_chance_exits_non_zero_and_records_why(chance_run):
    run, rc = chance_run
    assert rc == EXIT_DOES_NOT_RANK
    ranking = json.loads((run / "model.json").read_text())["ranking"]
    assert ranking["verdict"] == "does_not_rank"
    assert ranking["scale"] == "plain sigmoid"
    assert any("includes 0.5" in reason for reason in ranking["reasons"])
    assert "not shown to rank" in (run / "train.log").read_text()


def test_allow_chance_accepts_the_run_with_the_warning(cache, tmp_path, capsys):
    rc = main(["-q", "train", "--data", str(cache), "--out", str(tmp_path / "run"),
               "--epochs", "1", *TINY, "--allow-chance"])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "WARNING: the model is not shown to rank its 4 validation patients" in err
    assert "--allow-chance" in err


def test_train_shortcuts_set_device_and_epochs(cache, tmp_path):
    run = tmp_path / "run"
    assert main(["-q", "train", "--data", str(cache), "--out", str(run), *TINY, "--epochs", "1",
                 "--device", "cpu", "--allow-chance"]) == 0  # fmt: skip
    cfg = load_config(run / "config.yaml")
    assert cfg.train.epochs == 1 and cfg.train.device == "cpu"
    assert len(pd.read_csv(run / "metrics.csv")) == 1


def test_evaluate_and_report_say_so_at_the_top(chance_run, cache, capsys):
    run, _ = chance_run
    assert main(["-q", "evaluate", str(run), "--data", str(cache), "--n-boot", "20"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("WARNING: the model is not shown to rank its 4 validation patients")
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert metrics["model_ranking"]["verdict"] == "does_not_rank"
    report = (run / "report.html").read_text()
    assert report.index('class="verdict"') < report.index("<nav>")
    assert "not shown to rank" in report
    assert "Other fields" not in report


def test_predict_warns_on_every_run(chance_run, cache, tmp_path, caplog):
    run, _ = chance_run
    for n in (1, 2):
        out = tmp_path / f"p{n}.csv"
        with caplog.at_level("WARNING", logger="brainmets"):
            assert main(["-q", "predict", str(run), str(cache), "--out", str(out)]) == 0
        warned = [r for r in caplog.records if "not shown to rank" in r.getMessage()]
        assert len(warned) == n


# --------------------------------------------------------------------------- failed starts


def test_train_on_a_missing_cache_leaves_only_its_log(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["-q", "train", "--data", str(tmp_path / "no-cache"), "--out", str(run)]) == 2
    assert "no-cache" in capsys.readouterr().err
    assert [p.name for p in run.iterdir()] == ["train.log"]
    assert "training could not start" in (run / "train.log").read_text()


def test_a_missing_weights_file_leaves_nothing_but_the_log(cache, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    argv = ["-q", "train", "--data", str(cache), "--out", str(run), *TINY,
            "--set", f"model.pretrained={tmp_path / 'ResNet50.pt'}"]  # fmt: skip
    assert main(argv) == 2
    assert "ResNet50.pt" in capsys.readouterr().err
    # The folder was there before: what it held stays, with the log that says why it failed.
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt", "train.log"]
    assert "training could not start" in (run / "train.log").read_text()
    fresh = tmp_path / "fresh"
    assert main([*argv[:5], str(fresh), *argv[6:]]) == 2
    assert [p.name for p in fresh.iterdir()] == ["train.log"]


def test_predict_on_a_cache_of_other_preprocessing_fails_before_any_work(
    chance_run, tmp_path, capsys
):
    run, _ = chance_run
    other = _noise_cache(tmp_path / "other", size=SIZE * 2, patients=2)
    out = tmp_path / "p.csv"
    assert main(["-q", "predict", str(run), str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--set preprocess.size={SIZE}" in err  # the hint that works
    assert "--resume" not in err
    assert not out.exists() and not Path(f"{out}.partial").exists()


# --------------------------------------------------------------------------- start files


def test_version():
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0


def test_version_text(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"brainmets {__version__}"


def test_config_prints_commented_yaml_that_loads_back(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  arch: resnet18\ndata:\n  device_cache: off\n")
    overrides = ["train.epochs=7", "name='my cohort: #1'", "train.stage_epochs=[0,2,4]"]
    argv = ["config", "--config", str(base)]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 0
    text = capsys.readouterr().out
    my = tmp_path / "my.yaml"
    my.write_text(text)
    assert load_config(my) == load_config(base, overrides)
    # Every key carries its meaning: each line with a value has a comment.
    keyed = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert keyed and all("  # " in line for line in keyed if not line.endswith(":"))
    assert "bn_calibration_patients: 48  # with model.pretrained none" in text
    assert yaml.safe_load(text)["train"]["epochs"] == 7


def test_the_cpu_small_preset_is_the_cpu_demo_in_one_file(tmp_path, capsys):
    """`brainmets config --preset cpu-small > my.yaml` gives the CPU demo's configuration,
    each key it sets marked; the file alone then configures prepare and train."""
    from brainmets.demo import demo_config

    assert main(["config", "--preset", "cpu-small"]) == 0
    text = capsys.readouterr().out
    my = tmp_path / "my.yaml"
    my.write_text(text)
    demo = demo_config(full=False, epochs=None, device="auto", seed=0)
    assert load_config(my) == demo.model_copy(update={"name": "run"})
    marked = [line for line in text.splitlines() if line.endswith(" [preset cpu-small]")]
    assert len(marked) == 10 and any(line.startswith("  size: 128") for line in marked)
    assert load_config(None, preset="spec") == load_config(None)


def test_a_preset_lies_under_the_file_and_the_overrides(tmp_path, capsys):
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  epochs: 3\n")
    cfg = load_config(mine, ["train.batch_patients=10"], preset="cpu-small")
    assert (cfg.model.arch, cfg.train.epochs, cfg.train.batch_patients) == ("resnet18", 3, 10)
    with pytest.raises(SystemExit):
        main(["config", "--preset", "cpu-smal"])
    assert "invalid choice: 'cpu-smal'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="did you mean cpu-small"):
        load_config(None, preset="cpu-smal")


def test_synth_options_default_to_synthconfig(tmp_path):
    """An option not given is SynthConfig's default (one place), and --lesions names a setting
    that --lesion-mm / --lesion-hu adjust."""
    from brainmets.data.synth_settings import LESION_SETTINGS
    from brainmets.data.synthetic import SynthConfig

    def written(folder: str, *options: str) -> SynthConfig:
        argv = ["-q", "synth", str(tmp_path / folder), "--patients", "2", "--matrix", "64",
                "--workers", "1", "--min-slices", "10", *options]  # fmt: skip
        assert main(argv) == 0
        return SynthConfig.model_validate_json((tmp_path / folder / "synth.json").read_text())

    plain = written("plain", "--max-slices", "10")
    assert plain == SynthConfig(num_patients=2, matrix=64, slices=(10, 10))
    bright = written("bright", "--max-slices", "11", "--lesions", "conspicuous")
    assert bright.lesion_diameter_mm == (18.0, 30.0) and bright.lesion_hu == (75.0, 90.0)
    assert bright.slices == (10, 11)
    tuned = written("tuned", "--max-slices", "10", "--lesions", "conspicuous",
                    "--lesion-mm", "20", "25")  # fmt: skip
    assert (tuned.lesion_diameter_mm, tuned.lesion_hu) == ((20.0, 25.0), (75.0, 90.0))
    assert LESION_SETTINGS["default"] == {
        "lesion_diameter_mm": SynthConfig().lesion_diameter_mm,
        "lesion_hu": SynthConfig().lesion_hu,
    }


def test_synth_help_shows_synthconfig_defaults(capsys):
    from brainmets.data.synthetic import SynthConfig

    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    spec = SynthConfig()
    for shown in (f"number of patients (default {spec.num_patients})",
                  f"fewest slices per series (default {spec.slices[0]})",
                  f"most slices per series (default {spec.slices[1]})",
                  f"(default {spec.matrix})", "conspicuous (18-30 mm at 75-90 HU"):  # fmt: skip
        assert shown in out


def test_synth_writes_a_stratified_seeded_split(tmp_path, capsys):
    def synth(folder: str, seed: int) -> pd.DataFrame:
        argv = ["-q", "synth", str(tmp_path / folder), "--patients", "10", "--matrix", "64", "--workers", "1",
                "--min-slices", "10", "--max-slices", "10", "--seed", str(seed)]  # fmt: skip
        assert main(argv) == 0
        return pd.read_csv(tmp_path / folder / "labels.csv", dtype={"patient_id": str})

    labels = synth("a", 1)
    assert "6 train, 2 val, 2 test" in capsys.readouterr().out
    counts = labels.groupby(["split", "label"]).size().to_dict()
    assert counts == {("train", 0): 4, ("train", 1): 2, ("val", 0): 1, ("val", 1): 1,
                      ("test", 0): 1, ("test", 1): 1}  # fmt: skip
    assert labels.equals(synth("b", 1))
    assert not labels["split"].equals(synth("c", 2)["split"])


def test_synth_option_errors_name_the_option(tmp_path, capsys):
    assert main(["-q", "synth", str(tmp_path / "c"), "--matrix", "48"]) == 2
    err = capsys.readouterr().err
    assert "synth: --matrix: Input should be greater than or equal to 64" in err
    assert "pydantic" not in err and not (tmp_path / "c").exists()


def test_synth_workers_help_says_every_core(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "rendering processes (default: every core)" in out
    assert "(default: 2)" not in out


# --------------------------------------------------------------------------- labels files


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"patient_id,label\n", "0 patients"),
        (b"", "the file is empty"),
        ("patient_id,label\nA,1\n".encode("utf-16"), "not UTF-8"),
    ],
    ids=["header-only", "zero-byte", "utf-16"],
)
def test_a_labels_file_without_patients_is_an_error_naming_it(tmp_path, capsys, content, reason):
    labels = tmp_path / "my-labels.csv"
    labels.write_bytes(content)
    out = tmp_path / "cache"
    argv = ["-q", "prepare", "--labels", str(labels), "--index", str(tmp_path), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(labels) in err and reason in err
    assert not out.exists()


def test_prepare_without_index_or_paths_is_one_error_up_front(tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\nA,1\nB,0\n")
    out = tmp_path / "cache"
    assert main(["-q", "prepare", "--labels", str(labels), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--index" in err[0] and "2 patients" in err[0]
    assert not out.exists()


# --------------------------------------------------------------------------- weights


def test_random_init_warning_says_what_to_do(caplog):
    from brainmets.model.pretrained import warn_random_init

    with caplog.at_level("WARNING"):
        text = warn_random_init(0)
    assert "model.pretrained=" in text and "train.bn_calibration_patients" in text
    assert "48 training patients" in warn_random_init(48)


def test_random_init_estimates_batchnorm_statistics_by_default(chance_run):
    run, _ = chance_run
    assert load_config(None).train.bn_calibration_patients > 0
    assert (
        "BatchNorm statistics of the random backbone calibrated" in (run / "train.log").read_text()
    )


def test_the_weights_checksum_is_printed_and_recorded(cache, tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    torch.manual_seed(0)
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18().state_dict().items()}, str(weights))
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    run = tmp_path / "run"
    rc = main(["-q", "train", "--data", str(cache), "--out", str(run), "--epochs", "1", *TINY,
               "--set", f"model.pretrained={weights}", "--allow-chance"])  # fmt: skip
    assert rc == 0
    recorded = json.loads((run / "model.json").read_text())["pretrained_weights"]
    assert recorded == {"file": str(weights), "sha256": sha}
    assert f"SHA-256 of resnet18.safetensors: {sha}" in (run / "train.log").read_text()


# --------------------------------------------------------------------------- progress


def test_validation_and_batchnorm_statistics_show_progress(cache, tmp_path, capfd):
    run = tmp_path / "run"
    main(["train", "--data", str(cache), "--out", str(run), "--epochs", "1", *TINY])
    err = capfd.readouterr().err
    assert "validate" in err and "BatchNorm statistics" in err


def test_predict_shows_patients_read_before_the_first_score(chance_run, cache, tmp_path, capfd):
    run, _ = chance_run
    main(["predict", str(run), str(cache), "--out", str(tmp_path / "p.csv")])
    assert "1 read" in capfd.readouterr().err


# --------------------------------------------------------------------------- small gaps


def test_resume_keeps_allow_chance(cache, tmp_path):
    """A run accepted with --allow-chance and resumed without repeating it stays accepted: the
    run's config.yaml keeps train.allow_chance."""
    run = tmp_path / "run"
    assert main(["-q", "train", "--data", str(cache), "--out", str(run), "--epochs", "1",
                 *TINY, "--allow-chance"]) == 0  # fmt: skip
    assert load_config(run / "config.yaml").train.allow_chance
    assert main(["-q", "train", "--resume", str(run), "--epochs", "2"]) == 0
    assert len(pd.read_csv(run / "metrics.csv")) == 2


def test_the_random_weights_warning_counts_the_training_patients_used(chance_run):
    run, _ = chance_run
    log = (run / "train.log").read_text()
    train_patients = (pd.read_csv(run / "splits.csv")["split"] == "train").sum()
    assert train_patients < load_config(run / "config.yaml").train.bn_calibration_patients
    assert f"estimated from {train_patients} training patients first" in log


def test_evaluate_takes_config_set_and_allow_failures(chance_run, cache, tmp_path, capsys):
    """evaluate.* keys from --config/--set; patients that failed to prepare are in none of the
    figures, so evaluate exits 1 unless --allow-failures."""
    run, _ = chance_run
    mine = tmp_path / "mine.yaml"
    mine.write_text("evaluate:\n  sensitivity_targets: [0.5]\n")
    out = tmp_path / "e1"
    argv = ["-q", "evaluate", str(run), "--data", str(cache), "--out", str(out)]
    assert main([*argv, "--config", str(mine), "--set", "evaluate.n_boot=7"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_boot"] == 7
    assert [p["target_sensitivity"] for p in metrics["operating_points"]] == [0.5]

    failing = tmp_path / "cache"
    import shutil

    shutil.copytree(cache, failing)
    (failing / "errors.csv").write_text("patient_id,file,reason\nP99,/x/1.dcm,damaged\n")
    capsys.readouterr()
    argv = ["-q", "evaluate", str(run), "--data", str(failing), "--out", str(tmp_path / "e2"),
            "--n-boot", "0"]  # fmt: skip
    assert main(argv) == 1
    assert "1 patients of" in capsys.readouterr().err
    assert main([*argv, "--allow-failures"]) == 0


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_examples_and_defaults(capsys):
    top = _help(capsys)
    assert "examples: brainmets demo" in top
    assert "brainmets config --preset cpu-small > my.yaml" in top
    assert "(default 512)" in _help(capsys, "predict")
    assert "(default BRAINMETS)" in _help(capsys, "serve")
    export = _help(capsys, "export")
    assert "see README" not in export and "docs/benchmarks.md" in export
    evaluate = _help(capsys, "evaluate")
    assert "--allow-failures" in evaluate and "--config" in evaluate and "--set" in evaluate


def test_the_parser_names_the_backends_without_loading_them():
    """--help and `brainmets config` start without torch: the backend names are the cli's own
    copy, kept equal to the package's."""
    import subprocess
    import sys

    from brainmets import cli
    from brainmets.backends import BACKENDS
    from brainmets.model.ensemble import COMBINE
    from brainmets.train.ensemble import DEFAULT_COMBINE, DEFAULT_MEMBERS, MEMBER_RULES

    assert cli.BACKEND_NAMES == BACKENDS
    assert (cli.COMBINE_NAMES, cli.DEFAULT_COMBINE_NAME) == (COMBINE, DEFAULT_COMBINE)
    assert (cli.MEMBER_RULE_NAMES, cli.DEFAULT_MEMBER_RULE) == (MEMBER_RULES, DEFAULT_MEMBERS)
    code = "import sys; from brainmets.cli import build_parser; build_parser(); " \
           "print('torch' in sys.modules)"  # fmt: skip
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "False"


def test_a_new_users_rehearsal_reads_one_threshold_everywhere(tmp_path, capsys):
    """The README's own-cohort workflow on its rehearsal cohort, shrunk to seconds: synth with
    the conspicuous lesions, the cpu-small preset in one file, the labels where synth wrote them,
    then index, prepare, train, evaluate and predict. train's summary, the best row of
    metrics.csv, evaluate and predict give one threshold on one named scale."""
    cohort, my = tmp_path / "cohort", tmp_path / "my.yaml"
    assert main(["-q", "synth", str(cohort), "--patients", "10", "--matrix", "64", "--workers",
                 "1", "--min-slices", "10", "--max-slices", "10", "--lesions", "conspicuous"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["config", "--preset", "cpu-small"]) == 0
    my.write_text(capsys.readouterr().out)
    small = ["--set", f"preprocess.size={SIZE}"]
    index, cache, run = tmp_path / "work" / "index", tmp_path / "work" / "cache", tmp_path / "run"
    assert main(["-q", "index", str(cohort / "dicom"), "--config", str(my), "--out", str(index),
                 "--workers", "1"]) == 0  # fmt: skip
    assert main(["-q", "prepare", "--config", str(my), "--labels", str(cohort / "labels.csv"),
                 "--index", str(index), "--out", str(cache), "--workers", "1", *small]) == 0  # fmt: skip
    capsys.readouterr()
    rc = main(["-q", "train", "--config", str(my), "--data", str(cache), "--out", str(run),
               *small, "--epochs", "2", "--set", "model.hidden=8"])  # fmt: skip
    assert rc in (0, EXIT_DOES_NOT_RANK)  # 6 training patients for 2 epochs may rank nothing
    said = capsys.readouterr().out
    sidecar = json.loads((run / "model.json").read_text())
    metrics = pd.read_csv(run / "metrics.csv")
    best = metrics.loc[metrics["epoch"] == sidecar["epoch"]].iloc[0]
    threshold = float(best["threshold"])
    assert f"threshold {threshold:.3f}" in said
    scale = "Platt-calibrated" if best["probability_scale"] == "platt" else "not calibrated"
    assert "probabilities and thresholds (train.log, metrics.csv, evaluate, predict, the SR): " \
           in said and scale in said  # fmt: skip

    argv = ["-q", "evaluate", str(run), "--data", str(cache), "--split", "test", "--n-boot", "0"]
    assert main(argv) == 0
    assert json.loads((run / "evaluation" / "metrics.json").read_text())["threshold"] == (
        pytest.approx(threshold)
    )
    out = tmp_path / "predictions.csv"
    assert main(["-q", "predict", str(run), str(cohort / "dicom"), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert len(table) == 10 and table["threshold"].to_numpy() == pytest.approx(threshold)
    assert ((table["probability"] >= table["threshold"]).astype(int) == table["decision"]).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort", "my.yaml", "predictions.csv",
                                                         "run", "work"]  # fmt: skip
