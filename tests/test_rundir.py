"""The run folder's names and the one version record."""

from __future__ import annotations

import json
import socket

import torch

from brainmets import __version__, rundir


def test_versions_is_the_one_record_and_takes_extras():
    found = rundir.versions("numpy")
    assert found["brainmets"] == __version__ and found["torch"] == torch.__version__
    assert set(found) == {"brainmets", "torch", "torchvision", "numpy"}


def test_environment_info_names_versions_and_devices_but_not_the_host():
    info = rundir.environment_info(torch.device("cpu"), 1)
    assert {"brainmets", "torch", "python", "device", "world_size", "cpu_model"} <= set(info)
    assert socket.gethostname() not in json.dumps(info)


def test_the_resume_state_lives_in_the_checkpoints_folder(tmp_path):
    assert rundir.resume_state(tmp_path) == tmp_path / rundir.CHECKPOINTS / rundir.RESUME_STATE
    assert len(set(rundir.RUN_FILES)) == len(rundir.RUN_FILES)
