"""Contract: every example in examples/ is a small overlay of params.yaml (only what differs), merged
over the committed params.yaml it loads through the schema and runs on the hardware it is written for;
`lmforge params use` applies an overlay (validated first, comments kept) and refuses a bad one."""

from __future__ import annotations

import copy
import difflib
import re
import shutil
import warnings
from pathlib import Path

import pytest
import yaml

from lmforge import cli
from lmforge import params as params_module
from lmforge.common import UserError
from lmforge.overlay import Replace, apply_overlay, load_overlay, lookup, settings, use_overlay
from lmforge.params import parse_params
from lmforge.training.hardware import check_hardware
from tests.conftest import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
GPUS = 8  # the machine a GPU example is checked against: 8 bf16-capable GPUs
MAX_LINES = 60  # an overlay is the few keys that differ; a longer one is drifting into a copy


def committed_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def tmp_params(tmp_path: Path) -> Path:
    """A copy of the committed params.yaml: no test writes the repo's own."""
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    return path


def key_names(tree: object) -> set[str]:
    """Every key at any depth of nested mappings."""
    if not isinstance(tree, dict):
        return set()
    return set(map(str, tree)).union(*(key_names(v) for v in tree.values()))


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`lmforge ...` in-process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def test_there_are_examples_for_gpu_and_cluster_setups_and_language_models():
    assert {"gpu_single_node.yaml", "multi_node.yaml", "lm_pretrain.yaml", "lm_instruct.yaml"} <= {
        p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_applied_to_params_yaml_is_valid_and_fits_its_hardware(path):
    from lightning.pytorch.strategies import StrategyRegistry

    params = parse_params(apply_overlay(committed_params(), load_overlay(path)), str(path))
    gpu = params.train.accelerator in ("gpu", "cuda")
    problems = check_hardware(params.train, cuda_available=gpu, bf16_supported=gpu,
                              gpu_count=GPUS if gpu else 0,
                              strategies=StrategyRegistry.available_strategies())
    assert problems == [], problems


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_a_small_overlay_holding_only_changes(path):
    assert len(path.read_text().splitlines()) < MAX_LINES
    base, missing = committed_params(), object()
    same = [".".join(key) for key, value in settings(load_overlay(path)).items()
            if lookup(base, key, missing) == value]
    assert same == [], f"values equal to params.yaml's: {same}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_exp_run_line_in_a_header_sets_the_overlay_values(path):
    keys = {".".join(key): value for key, value in settings(load_overlay(path)).items()}
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    overrides = {k: yaml.safe_load(v) for k, v in re.findall(r"-S (\S+?)=(\S+)", header)}
    assert {k: keys.get(k) for k in overrides} == overrides  # the documented line sets these values
    if overrides and "..." not in header:
        assert set(overrides) == set(keys)  # and all of them


def test_apply_overlay_merges_mappings_and_replaces_everything_else():
    base = {"train": {"lr": 1, "early_stopping": {"monitor": "val_accuracy", "patience": 2}},
            "data": {"labels": ["a", "b", "c"], "seed": 1},
            "model": {"lora": {"r": 8}, "scratch": None},
            "gate": {"floors": {"accuracy": {"min": 0.6}}, "tolerances": {"accuracy": {"abs": 0.1}}}}
    kept = copy.deepcopy(base)
    overlay = {"train": {"early_stopping": {"patience": 6}},  # nested mappings merge
               "data": {"labels": ["x"]},  # a list replaces, never appends
               "model": {"lora": None, "scratch": {"layers": 2}},  # null replaces, a mapping over null too
               "gate": {"floors": {"perplexity": {"max": 20}},  # a new key joins the mapping
                        "tolerances": Replace({"perplexity": {"rel": 0.05}})},  # !replace: whole
               "task": "causal_lm"}  # a new section
    merged = apply_overlay(base, overlay)
    assert merged == {
        "train": {"lr": 1, "early_stopping": {"monitor": "val_accuracy", "patience": 6}},
        "data": {"labels": ["x"], "seed": 1},
        "model": {"lora": None, "scratch": {"layers": 2}},
        "gate": {"floors": {"accuracy": {"min": 0.6}, "perplexity": {"max": 20}},
                 "tolerances": {"perplexity": {"rel": 0.05}}},
        "task": "causal_lm"}
    assert base == kept  # neither argument changes
    assert type(merged["gate"]["tolerances"]) is dict  # no marker left: yaml.safe_dump writes it
    merged["data"]["labels"].append("y")
    assert overlay["data"]["labels"] == ["x"]  # and the result shares nothing with them


def test_replace_tag_loads_as_a_replacing_mapping_and_only_on_a_mapping(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("gate:\n  floors: !replace\n    perplexity: {max: 20}\n")
    floors = load_overlay(good)["gate"]["floors"]
    assert isinstance(floors, Replace) and floors == {"perplexity": {"max": 20}}
    bad = tmp_path / "bad.yaml"
    for text in ("gate:\n  registered_model: !replace x\n", "- a list\n"):
        bad.write_text(text)
        with pytest.raises(UserError, match="bad.yaml"):
            load_overlay(bad)


@pytest.mark.parametrize("text, key", [
    ("train:\n  lerning_rate: 1.0e-3\n", "train.lerning_rate"),
    ("trian:\n  learning_rate: 1.0e-3\n", "trian"),
    ("train:\n  max_epochs: 0\n", "train.max_epochs"),
    ("gate:\n  floors:\n    perplexity: {max: 20}\n", "gate.floors.perplexity"),  # not a classifier metric
], ids=["misspelled key", "misspelled section", "bad value", "key of another task"])
def test_bad_overlay_fails_naming_file_and_key_and_leaves_params_yaml_alone(tmp_path, text, key):
    params = tmp_params(tmp_path)
    before = params.read_bytes()
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(text)
    with pytest.raises(UserError) as err:
        use_overlay(overlay, params)
    assert "overlay.yaml" in str(err.value) and f"{key}:" in str(err.value), str(err.value)
    assert params.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.yaml", "params.yaml"]  # no temp file


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_use_overlay_writes_the_merged_params_and_keeps_the_comments(tmp_path, path):
    params = tmp_params(tmp_path)
    params.chmod(0o644)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the comment-less fallback warns: the examples never need it
        result = use_overlay(path, params)
    overlay = load_overlay(path)
    merged = apply_overlay(committed_params(), overlay)
    assert yaml.safe_load(params.read_text()) == merged
    assert result == parse_params(merged)
    assert params.stat().st_mode & 0o777 == 0o644
    # Every line that changed holds a key the overlay sets (or one inside a mapping it replaces):
    # the lines and comments of the other keys are as they were.
    names = set()
    for key, value in settings(overlay).items():
        names.add(key[-1])
        names |= key_names(value) | key_names(lookup(committed_params(), key))
    original = (REPO / "params.yaml").read_text().splitlines()
    removed = [line for line in difflib.ndiff(original, params.read_text().splitlines())
               if line.startswith("- ")]
    stray = [line for line in removed if (m := re.match(r"- \s*(\w+):", line)) is None
             or m.group(1) not in names]
    assert removed and stray == []
    assert params.read_text().startswith("\n".join(original[:2]))  # the file's header comment


def test_cli_params_use_then_show(tmp_path, monkeypatch, capsys):
    tmp_params(tmp_path)
    shutil.copy(REPO / "examples" / "lm_pretrain.yaml", tmp_path / "overlay.yaml")
    monkeypatch.chdir(tmp_path)

    code, out, _ = _cli(["params", "use", "overlay.yaml"], capsys)
    assert code == 0 and "task causal_lm" in out and "gate.floors" in out
    assert yaml.safe_load(Path("params.yaml").read_text()) == apply_overlay(
        committed_params(), load_overlay(REPO / "examples" / "lm_pretrain.yaml"))

    code, out, _ = _cli(["params", "show"], capsys)
    shown = yaml.safe_load(out)
    assert code == 0 and shown["task"] == "causal_lm"
    assert shown["gate"]["floors"] == {"perplexity": {"min": None, "max": 20.0}}
    params_module.main()  # `python -m lmforge.params` prints the same
    assert capsys.readouterr().out == out

    Path("bad.yaml").write_text("train:\n  lerning_rate: 1.0e-3\n")
    before = Path("params.yaml").read_bytes()
    code, _, err = _cli(["params", "use", "bad.yaml"], capsys)
    assert code == 2 and "bad.yaml" in err and "train.lerning_rate" in err
    assert Path("params.yaml").read_bytes() == before
