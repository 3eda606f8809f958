"""The model id: one digest of the weights and of every sidecar field that decides, the same
for a run's model.json and an export's sidecar; an edited model.json is refused."""

from __future__ import annotations

import json
import shutil

import pytest

from brainmets.inference import load_trained
from brainmets.model.checkpoint import load_checkpoint
from brainmets.model.identity import DECISIVE, checked_model_id, decisive_fields, model_id

CHANGES = {
    "threshold": 0.25,
    "calibration": {"method": "platt", "slope": 2.0, "intercept": 0.0, "patients": 9},
    "normalization": "minus_one_to_one",
    "preprocess": {"size": 64},
    "architecture": {"arch": "resnet50"},
}


def _meta(run) -> dict:
    return json.loads((run / "model.json").read_text())


def test_the_recorded_id_is_the_one_the_content_gives(tiny_run):
    meta = _meta(tiny_run)
    assert meta["model_id"] == model_id(meta) and len(meta["model_id"]) == 12
    assert load_trained(tiny_run, "cpu").model_id == meta["model_id"]
    assert set(CHANGES) == set(DECISIVE)


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_every_decisive_field_makes_another_model(tiny_run, key):
    meta = _meta(tiny_run)
    assert model_id({**meta, key: CHANGES[key]}) != meta["model_id"]


def test_other_weights_make_another_model_and_the_rest_does_not(tiny_run):
    meta = _meta(tiny_run)
    assert model_id({**meta, "weights": {"sha256": "0" * 64}}) != meta["model_id"]
    # Provenance that does not decide (epoch, versions, metrics) leaves the id alone.
    assert (
        model_id({**meta, "epoch": 7, "versions": {}, "metrics": {"auc": 1.0}}) == meta["model_id"]
    )


def test_absent_values_read_as_their_defaults():
    """model.json and an export's sidecar spell an uncalibrated run differently."""
    bare = {"weights": {"sha256": "a" * 64}, "threshold": 0.4}
    spelled = {**bare, "normalization": "zscore", "calibration": {"method": "none"}}
    assert decisive_fields(bare) == decisive_fields(spelled)


def test_an_edited_model_json_is_refused_naming_it(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta = _meta(run)
    meta["threshold"] = 0.05  # a hand edit: the decisions would change under the old id
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="edited after it was written") as error:
        load_checkpoint(run / "model.safetensors")
    assert str(run / "model.json") in str(error.value)
    # The same content under the id it gives is another model, and loads as such.
    meta["model_id"] = model_id(meta)
    (run / "model.json").write_text(json.dumps(meta))
    assert load_trained(run, "cpu").model_id == checked_model_id(meta, run / "model.json")
