"""``brainmets serve`` on the command line: what it refuses before listening."""

from __future__ import annotations

from brainmets.cli import main


def test_a_run_that_cannot_load_fails_before_anything_is_received(tmp_path, capsys):
    store = tmp_path / "store"
    rc = main(["-q", "serve", str(tmp_path / "no-run"), "--store", str(store)])
    assert rc == 2
    assert "no trained model here" in capsys.readouterr().err
    assert not (store / "spool").exists()  # nothing was ever acknowledged


def test_serve_needs_a_store_and_a_well_formed_destination(tiny_run, tmp_path, capsys):
    assert main(["-q", "serve", str(tiny_run)]) == 2
    assert "--store" in capsys.readouterr().err
    rc = main(["-q", "serve", str(tiny_run), "--store", str(tmp_path), "--forward", "PACS:104"])
    assert rc == 2
    assert "AET@HOST:PORT" in capsys.readouterr().err


def test_status_of_a_folder_without_a_record(tmp_path, capsys):
    assert main(["-q", "serve", "--status", str(tmp_path)]) == 2
    assert "no serve record" in capsys.readouterr().err


def test_dicomweb_options_are_checked_before_anything_starts(tiny_run, tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["-q", "serve", str(tiny_run), "--store", store, "--no-listen"]) == 2
    assert "must pull (--pull URL)" in capsys.readouterr().err
    assert main(["-q", "serve", str(tiny_run), "--store", store, "--pull", "pacs:8042"]) == 2
    assert "expected a DICOMweb URL" in capsys.readouterr().err
    rc = main(["-q", "serve", str(tiny_run), "--store", store, "--pull", "http://pacs/dicom-web",
               "--pull-since", "2024-01-01"])  # fmt: skip
    assert rc == 2 and "expected a date as YYYYMMDD" in capsys.readouterr().err
    rc = main(["-q", "predict", str(tiny_run), str(tmp_path), "--dicom-out", "http://a/dicom-web",
               "--dicom-out", "https://b/dicom-web"])  # fmt: skip
    assert rc == 2 and "at most one folder and one STOW-RS URL" in capsys.readouterr().err


def test_dicomweb_without_its_package_names_the_extra(tiny_run, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "dicomweb_client", None)  # as if not installed
    rc = main(["-q", "serve", str(tiny_run), "--store", str(tmp_path / "store"), "--forward",
               "http://pacs:8042/dicom-web"])  # fmt: skip
    assert rc == 2 and "pip install 'brainmets[dicomweb]'" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # refused before the node started
