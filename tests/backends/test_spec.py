"""BackendSpec: the one description of how to score, checked when the command line is read."""

from __future__ import annotations

import pytest

from brainmets.backends import BACKENDS, BackendSpec, load_backend
from brainmets.cli import build_parser, main


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "tensorrt"}, "not supported; choose one of"),
        ({"name": "onnxruntime", "compile": True}, "--compile applies to the torch backend"),
        ({"name": "triton"}, "needs the server's --url"),
    ],
)
def test_a_spec_that_cannot_work_is_refused_when_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BackendSpec(**kwargs)


@pytest.mark.parametrize("command", ["predict RUN IN", "evaluate RUN --data D", "serve RUN"])
def test_every_scoring_command_takes_the_same_backend_options(command):
    argv = [*command.split(), "--backend", "triton", "--url", "h:8001", "--device", "cpu"]
    args = build_parser().parse_args(argv)
    from brainmets.cli import _backend_spec

    spec = _backend_spec(args)
    assert spec == BackendSpec(name="triton", device="cpu", url="h:8001")
    assert set(BACKENDS) == {"torch", "onnxruntime", "triton"}


def test_the_torch_backend_loads_the_run(tiny_run):
    trained = load_backend(tiny_run, BackendSpec(device="cpu"))
    assert trained.device.type == "cpu" and trained.model is not None
    assert str(BackendSpec(device="cpu")) == "torch (cpu)"


def test_a_bad_spec_on_the_command_line_is_one_line(tiny_run, tmp_path, capsys):
    rc = main(["-q", "predict", str(tiny_run), str(tmp_path), "--backend", "triton"])
    assert rc == 2
    assert "needs the server's --url" in capsys.readouterr().err
