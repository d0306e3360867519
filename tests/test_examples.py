"""Contract: every params example in examples/ (full files, and partial ones merged over params.yaml)
loads through the schema, and runs on the hardware it is written for."""

from __future__ import annotations

import re

import pytest
import yaml

from stages.params import check_hardware, parse_params
from tests.conftest import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
# Partial examples hold only the keys that differ from params.yaml; full ones replace it.
SECTIONS = set(yaml.safe_load((REPO / "params.yaml").read_text()))
PARTIAL = [p for p in EXAMPLES if not SECTIONS <= set(yaml.safe_load(p.read_text()))]
GPUS = 8  # the machine a GPU example is checked against: 8 bf16-capable GPUs


def merged(params: dict, example: dict) -> dict:
    """The merge rule the examples state: each ``section.key`` of the example replaces params.yaml's
    whole (a mapping value such as gate.floors too); sections and keys it leaves out stay."""
    return {**params, **{section: {**params.get(section, {}), **keys} if isinstance(keys, dict)
                         else keys for section, keys in example.items()}}


def knobs(tree: dict) -> dict[str, object]:
    """``section.key`` -> value (the level `dvc exp run -S` and the merge rule work at)."""
    return {f"{section}.{key}" if isinstance(keys, dict) else section: value
            for section, keys in tree.items()
            for key, value in (keys.items() if isinstance(keys, dict) else [(None, keys)])}


def test_there_are_examples_for_gpu_and_cluster_setups_and_language_models():
    assert {"gpu_single_node.yaml", "multi_node.yaml"} <= {p.name for p in PARTIAL}
    assert {"lm_pretrain.yaml", "lm_instruct.yaml"} <= {p.name for p in EXAMPLES} - set(PARTIAL)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_merged_over_params_yaml_is_valid_and_fits_its_hardware(path):
    from lightning.pytorch.strategies import StrategyRegistry

    example = yaml.safe_load(path.read_text())
    params = parse_params(merged(yaml.safe_load((REPO / "params.yaml").read_text()), example),
                          str(path))
    gpu = params.train.accelerator in ("gpu", "cuda")
    problems = check_hardware(params.train, cuda_available=gpu, bf16_supported=gpu,
                              gpu_count=GPUS if gpu else 0,
                              strategies=StrategyRegistry.available_strategies())
    assert problems == [], problems


@pytest.mark.parametrize("path", PARTIAL, ids=lambda p: p.name)
def test_partial_example_holds_only_changes_and_its_exp_run_line_matches(path):
    example = yaml.safe_load(path.read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    base, keys = knobs(params), knobs(example)
    assert [k for k, v in keys.items() if base.get(k) == v] == [], "keys equal to params.yaml's"
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    overrides = {k: yaml.safe_load(v) for k, v in re.findall(r"-S (\S+?)=(\S+)", header)}
    assert {k: keys.get(k) for k in overrides} == overrides  # the documented line sets these values
    if overrides and "..." not in header:
        assert set(overrides) == set(keys)  # and all of them
