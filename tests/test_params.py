"""Params contract: the committed params.yaml loads, dvc.yaml agrees with the schema, bad keys are named."""

from __future__ import annotations

import re
from typing import get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from lmforge.common import UserError
from lmforge.params import Params, Paths, load_params, parse_params
from tests.conftest import REPO


def test_committed_params_spell_out_every_path():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw["paths"]) == set(Paths.model_fields)


def test_committed_params_load_and_have_every_section_of_the_schema():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.source == "data/sample/reviews.csv"
    # Every section of params.yaml is a field of the schema and vice versa.
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == {f.alias or name for name, f in Params.model_fields.items()}


def unset_fields(model: type[BaseModel], raw: dict, prefix: str = "") -> list[str]:
    """Schema fields params.yaml leaves to their default, as dotted keys (nested sections too)."""
    missing = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key not in raw:
            missing.append(f"{prefix}{key}")
            continue
        # A section (or an optional one) is walked into; a mapping of user-named entries (gate
        # floors, tolerances) is not: an entry states the bounds it has, and None means no bound.
        if get_origin(field.annotation) is dict:
            continue
        kinds = get_args(field.annotation) or (field.annotation,)
        section = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if section is not None and isinstance(raw[key], dict):
            missing += unset_fields(section, raw[key], f"{prefix}{key}.")
    return missing


def test_params_yaml_spells_out_every_field_of_the_schema():
    """What makes lmforge/params.py safe to leave out of the stages' deps: every value a stage
    reads is written in params.yaml, so DVC's `params:` tracks it and no schema default decides."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert unset_fields(Params, raw) == []


def differences(a: object, b: object, key: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b))
                for d in differences(a.get(k), b.get(k), f"{key}.{k}".lstrip("."))]
    return [] if a == b else [key]


# Where params.yaml deliberately differs from the schema's defaults; each says why.
DIFFERENT_ON_PURPOSE = {
    # The schema's default null means "the task's defaults" (lmforge/tasks.py), which follow the
    # task; params.yaml writes classification's out so the sample shows the knob.
    "export.tolerances",
}


def test_schema_defaults_equal_params_yaml_except_a_named_list():
    """`Params()` (code that builds params without the file: tests, notebooks) must train what
    `dvc repro` trains."""
    defaults = Params().model_dump(mode="json", by_alias=True)
    committed = load_params(REPO / "params.yaml").model_dump(mode="json", by_alias=True)
    assert set(differences(defaults, committed)) == DIFFERENT_ON_PURPOSE


def test_every_dvc_stage_depends_on_its_module_and_known_params_sections():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    sections = {f.alias or name for name, f in Params.model_fields.items()}
    for name, stage in dvc["stages"].items():
        assert stage["cmd"] == f"python -m stages.{name}"
        assert f"stages/{name}.py" in stage["deps"], name
        assert (REPO / "stages" / f"{name}.py").exists(), name
        named = {p for p in stage["params"] if isinstance(p, str)}
        whole_files = [p for p in stage["params"] if isinstance(p, dict)]
        assert named <= sections, (name, stage["params"])
        # Only stage check reads the whole file: a typo in any section must re-run it.
        assert whole_files == ([{"params.yaml": None}] if name == "check" else []), name


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
        assert f"  - {key}: " in msg
    # A section's cross-field checks (text_column == label_column) run once its fields are valid.
    assert "3 problem(s)" in msg


def test_problems_in_every_section_are_listed_together():
    with pytest.raises(UserError) as err:
        parse_params({
            "train": {"lerning_rate": 1e-4, "precision": "fp16", "learning_rate": -1},
            "data": {"split": {"validation": 0.6, "test": 0.5}},
            "serve": {"max_texts": "many"},
            "gate": {"floors": {"accuracy": {"min": 0.9, "max": 0.5}}},
            "model": {"trust_remote_code": "perhaps"},
            "extra_section": {},
        })
    msg = str(err.value)
    assert msg.startswith("params: 8 problem(s):"), msg
    for key in ("train.lerning_rate", "train.precision", "train.learning_rate", "data.split",
                "serve.max_texts", "gate.floors.accuracy", "model.trust_remote_code",
                "extra_section"):
        assert f"\n  - {key}: " in msg, key


@pytest.mark.parametrize(("raw", "key", "message"), [
    ({"train": {"learning_rate": -1e-4}}, "train.learning_rate", "greater than 0"),
    ({"train": {"learning_rate": 3}}, "train.learning_rate", "less than or equal to 1"),
    ({"train": {"warmup_ratio": 1.0}}, "train.warmup_ratio", "less than 1"),
    ({"train": {"weight_decay": -0.01}}, "train.weight_decay", "greater than or equal to 0"),
    ({"train": {"batch_size": 0}}, "train.batch_size", "greater than or equal to 1"),
    ({"train": {"max_steps": -2}}, "train.max_steps", "greater than or equal to -1"),
    ({"train": {"gradient_clip_val": 0}}, "train.gradient_clip_val", "greater than 0"),
    ({"train": {"precision": "fp16"}}, "train.precision", "'bf16-mixed', 'bf16-true'"),
    ({"train": {"accelerator": "gpus"}}, "train.accelerator", "'cpu', 'gpu', 'cuda'"),
    ({"train": {"devices": 0}}, "train.devices", "not a device request"),
    ({"train": {"devices": "0;1"}}, "train.devices", "not a device request"),
    ({"train": {"checkpoint_every_n_steps": 0}}, "train.checkpoint_every_n_steps",
     "greater than or equal to 1"),
    ({"train": {"early_stopping": {"monitor": "val_loss", "mode": "max"}}}, "train",
     "does not fit monitor"),
    ({"data": {"split": {"validation": 0}}}, "data.split.validation", "greater than 0"),
    ({"data": {"split": {"test": 1.5}}}, "data.split.test", "less than 1"),
    ({"data": {"split": {"validation": 0.6, "test": 0.5}}}, "data.split",
     "leaves no rows for train"),
    ({"data": {"labels": ["a", "a"]}}, "data", "duplicates"),
    ({"validate": {"max_duplicate_share": -0.1}}, "validate.max_duplicate_share",
     "greater than or equal to 0"),
    ({"prepare": {"max_length": 4}}, "prepare.max_length", "greater than or equal to 8"),
    ({"serve": {"max_texts": 0}}, "serve.max_texts", "greater than or equal to 1"),
    ({"gate": {"floors": {"accuracy": {"min": 0.9, "max": 0.5}}}}, "gate.floors.accuracy",
     "above max"),
    ({"gate": {"floors": {"accuracy": {}}}}, "gate.floors.accuracy", "give min, max or both"),
    ({"gate": {"tolerances": {"loss": {"direction": "lower", "rel": -0.1}}}},
     "gate.tolerances.loss.rel", "greater than or equal to 0"),
    ({"package": {"model_name": "Bad Name"}}, "package.model_name", "should match pattern"),
    ({"tracking": {"experiment": ""}}, "tracking.experiment", "at least 1 character"),
])
def test_each_bad_value_is_named_by_its_key_path(raw, key, message):
    with pytest.raises(UserError) as err:
        parse_params(raw)
    lines = [line for line in str(err.value).splitlines() if line.startswith(f"  - {key}: ")]
    assert len(lines) == 1 and message in lines[0], str(err.value)


def test_impossible_combinations_are_refused():
    with pytest.raises(UserError, match="leaves no rows for train"):
        parse_params({"data": {"split": {"validation": 0.5, "test": 0.5}}})
    with pytest.raises(UserError, match="min_text_chars .* above max_text_chars"):
        parse_params({"validate": {"min_text_chars": 10, "max_text_chars": 5}})
    with pytest.raises(UserError, match=r"serve\.max_batch_size: Input should be greater than or equal to 1"):
        parse_params({"serve": {"max_batch_size": 0}})
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


LM = {"task": "causal_lm", "model": {"source": "scratch"},
      "train": {"early_stopping": {"monitor": "val_loss", "mode": "min"}},
      "gate": {"floors": {"perplexity": {"max": 50}},
               "tolerances": {"perplexity": {"direction": "lower", "rel": 0.1}}}}


def test_causal_lm_params_load_and_every_misfit_of_the_task_is_named_at_once():
    assert parse_params(LM).task == "causal_lm"
    # The classification defaults under task causal_lm: three keys that do not fit, one message.
    with pytest.raises(UserError) as err:
        parse_params({"task": "causal_lm", "model": {"source": "scratch", "lora": {"r": 4}}})
    msg = str(err.value)
    assert "model.lora: adapters are for a pretrained model" in msg
    assert "train.early_stopping.monitor: 'val_accuracy' is not computed for task causal_lm" in msg
    assert "gate.floors.accuracy: task causal_lm has no such metric" in msg
    assert "gate.tolerances.f1_macro" in msg
    assert msg.startswith("params: 6 problem(s):")  # lora, monitor, accuracy + f1_macro twice


def test_pair_metrics_need_pair_data_and_scratch_needs_a_long_enough_context():
    with pytest.raises(UserError, match=r"gate.floors.bleu: task causal_lm has no such metric"):
        parse_params({**LM, "gate": {"floors": {"bleu": {"min": 1}}, "tolerances": {}}})
    pairs = {**LM, "data": {"prompt_column": "q", "response_column": "a"},
             "gate": {"floors": {"bleu": {"min": 1}}, "tolerances": {}}}
    assert parse_params(pairs).data.pairs
    with pytest.raises(UserError, match=r"scratch.context: 64 is shorter than prepare.block_size \(128"):
        parse_params({**LM, "model": {"source": "scratch", "scratch": {"context": 64}}})


def test_scratch_is_refused_for_classification_and_pair_columns_go_together():
    with pytest.raises(UserError, match=r"model.source: 'scratch' builds a causal LM"):
        parse_params({"model": {"source": "scratch"}})
    with pytest.raises(UserError, match=r"prompt_column and response_column go together"):
        parse_params({"data": {"prompt_column": "q"}})
    with pytest.raises(UserError, match=r"prepare.template: .*exactly once"):
        parse_params({"prepare": {"template": "no slot"}})
    with pytest.raises(UserError, match=r"model.scratch: .*hidden \(100\) must be a multiple of heads"):
        parse_params({**LM, "model": {"source": "scratch", "scratch": {"hidden": 100, "heads": 3}}})


def test_export_tolerances_follow_the_task_and_onnx_serving_needs_its_export():
    assert set(parse_params({}).export_tolerances()) == {"accuracy", "f1_macro"}
    assert set(parse_params(LM).export_tolerances()) == {"perplexity"}
    with pytest.raises(UserError) as err:
        parse_params({**LM, "export": {"tolerances": {"accuracy": {"direction": "higher"}}},
                      "serve": {"runtime": "onnx"}})
    msg = str(err.value)
    assert "export.tolerances.accuracy: the export stage scores causal_lm with perplexity only" in msg
    assert "serve.runtime: 'onnx' serves classification models" in msg
    with pytest.raises(UserError, match=r"serve.runtime: 'onnx' serves stage export's model, but "
                                         r"export.enabled is false"):
        parse_params({"export": {"enabled": False}, "serve": {"runtime": "onnx"}})
    with pytest.raises(UserError, match=r"serve.runtime: 'onnx_int8' needs export.quantize: true"):
        parse_params({"export": {"quantize": False}, "serve": {"runtime": "onnx_int8"}})
    assert parse_params({"serve": {"runtime": "onnx_int8"}}).serve.runtime == "onnx_int8"
