"""Params contract: the committed params.yaml loads, dvc.yaml agrees with the schema, bad keys are named."""

from __future__ import annotations

import re

import pytest
import yaml
from pydantic import ValidationError

from stages.common import UserError
from stages.params import Params, Paths, load_params, parse_params
from tests.conftest import REPO


def test_committed_params_spell_out_every_path():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw["paths"]) == set(Paths.model_fields)


def test_committed_params_load_and_match_the_schema_defaults_types():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.source == "data/sample/reviews.csv"
    # Every section of params.yaml is a field of the schema and vice versa.
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == {f.alias or name for name, f in Params.model_fields.items()}


def test_every_dvc_stage_depends_on_its_module_and_known_params_sections():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    sections = {f.alias or name for name, f in Params.model_fields.items()}
    for name, stage in dvc["stages"].items():
        assert stage["cmd"] == f"python -m stages.{name}"
        assert f"stages/{name}.py" in stage["deps"], name
        assert (REPO / "stages" / f"{name}.py").exists(), name
        assert set(stage["params"]) <= sections, (name, stage["params"])


def test_every_template_in_dvc_yaml_resolves_to_a_param():
    # DVC templates from the file itself, not the schema's defaults: resolve against the raw YAML.
    text = (REPO / "dvc.yaml").read_text()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for ref in re.findall(r"\$\{([^}]+)\}", text):
        node = params
        for part in ref.split("."):
            assert part in node, f"dvc.yaml references unknown param {ref}"
            node = node[part]


def test_misspelled_key_is_named_with_its_path():
    with pytest.raises(UserError, match=r"prepare\.max_lenght: unknown key"):
        parse_params({"prepare": {"max_lenght": 64}})


def test_all_problems_are_listed_at_once():
    with pytest.raises(UserError) as err:
        parse_params({
            "data": {"seed": "abc", "text_column": "t", "label_column": "t"},
            "validate": {"max_majority_share": 1.5},
            "bogus": 1,
        })
    msg = str(err.value)
    for key in ("data.seed", "validate.max_majority_share", "bogus"):
        assert key in msg
    assert "4 problem(s)" in msg or "problem(s)" in msg


def test_impossible_combinations_are_refused():
    with pytest.raises(UserError, match="leaves no rows for train"):
        parse_params({"data": {"split": {"validation": 0.5, "test": 0.5}}})
    with pytest.raises(UserError, match="min_text_chars .* above max_text_chars"):
        parse_params({"validate": {"min_text_chars": 10, "max_text_chars": 5}})
    with pytest.raises(UserError, match=r"serve\.max_batch_size: Input should be greater than or equal to 2"):
        parse_params({"serve": {"max_batch_size": 1}})  # BentoML refuses a batch of 1
    with pytest.raises(UserError, match="both 'text'"):
        parse_params({"data": {"label_column": "text"}})


def test_params_are_frozen_and_labels_normalize_to_strings():
    params = parse_params({"data": {"labels": [0, 1]}})
    assert params.data.labels == ["0", "1"]
    with pytest.raises(ValidationError, match="frozen"):
        params.data.seed = 1  # frozen: runtime state never sneaks into config


def test_load_params_reports_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("data: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
