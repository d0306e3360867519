"""Stage check, without DVC: every problem of params.yaml and its inputs, named by key."""

from __future__ import annotations

import json

import pytest
import yaml

from lmforge.common import UserError
from lmforge.params import load_params, parse_params
from stages import check
from tests.conftest import REPO, tmp_paths


def test_the_committed_params_pass_and_the_verdict_never_changes(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # data.source and package.bentofile are relative to the repo root
    params = load_params(REPO / "params.yaml")
    out = tmp_path / "check.json"
    params = params.model_copy(update={"paths": params.paths.model_copy(update={"check": out})})
    assert check.main(params) == check.VERDICT
    first = out.read_bytes()
    check.main(params)
    assert out.read_bytes() == first and json.loads(first) == check.VERDICT


def test_a_typo_in_any_section_is_named_with_the_closest_key(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["serve"]["wokers"] = 2  # a section only the service reads
    raw["tracking"]["experimnt"] = "x"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError) as err:
        load_params(path)
    assert "serve.wokers: unknown key: did you mean 'workers'?" in str(err.value)
    assert "tracking.experimnt: unknown key: did you mean 'experiment'?" in str(err.value)


def test_missing_inputs_are_named_by_their_key_and_nothing_is_written(tmp_path):
    params = parse_params({"paths": tmp_paths(tmp_path),
                           "data": {"source": str(tmp_path / "nope.csv")},
                           "model": {"source": "package:not_a_package_xyz/model"},
                           "package": {"bentofile": str(tmp_path / "none.yaml")}})
    with pytest.raises(UserError) as err:
        check.main(params)
    message = str(err.value)
    assert "3 missing input(s)" in message
    assert f"data.source: {tmp_path / 'nope.csv'} does not exist" in message
    assert "package.bentofile" in message and "not_a_package_xyz" in message
    assert not params.paths.check.exists()


def test_hub_sources_are_not_looked_up(tmp_path):
    params = parse_params({"paths": tmp_paths(tmp_path), "data": {"source": "hf:some/dataset"},
                           "model": {"source": "org/model"},
                           "package": {"bentofile": str(REPO / "bento/bentofile.yaml")}})
    assert check.source_problems(params) == []
