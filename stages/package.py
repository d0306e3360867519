"""Stage package: put the trained model into the BentoML model store and build a Bento around it.

    python -m stages.package       # normally via `dvc repro package`; run from the repo root

The store is BentoML's own (``$BENTOML_HOME``, default ``~/bentoml``). The model entry carries its
lineage as labels (MLflow run, git commit, data hash, params hash, validation verdict, test metrics)
and, in its metadata, the serving limits of ``params.serve`` and the truncation length of
``params.prepare``: a Bento holds no params.yaml, so bento/service.py reads them from there.
Writes ``paths.bento_info``: the Bento tag, the model tag and the lineage, for
`bentoml serve <bento_tag>`, `lmforge lineage` and deployment scripts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from stages.common import UserError, read_json, require_safetensors, run_main, write_json
from stages.lineage import params_hash
from stages.params import Params, load_params
from stages.tracking import lineage_tags, redact_uri


def model_label_names(model_dir: Path) -> list[str]:
    """The class names in id order, after checking the folder is a complete train output."""
    if not model_dir.is_dir():
        raise UserError(f"model folder {model_dir} not found: run `dvc repro train` first")
    missing = [f for f in ("config.json", "labels.json") if not (model_dir / f).exists()]
    if missing:
        raise UserError(f"model folder {model_dir} lacks {missing}: rerun `dvc repro train`")
    require_safetensors(model_dir)  # the service loads safetensors only: refuse before building
    id2label = json.loads((model_dir / "labels.json").read_text())["id2label"]
    config_labels = json.loads((model_dir / "config.json").read_text()).get("id2label", {})
    # The service names classes from config.json; labels.json is what the data stages used.
    if {str(k): v for k, v in config_labels.items()} != id2label:
        raise UserError(
            f"{model_dir}: config.json id2label {config_labels} differs from labels.json "
            f"{id2label}: rerun `dvc repro train`"
        )
    return [id2label[str(i)] for i in range(len(id2label))]


def lineage(
    run_info: dict, manifest: dict, metrics: dict, validation: dict, params_sha256: str
) -> dict[str, str]:
    """Where the model comes from: run, code, data, params, and how it scored on the test split.

    ``params_sha256`` is stages.lineage.params_hash, so `lmforge lineage` can match the store's
    model against the workspace's params.yaml.
    """
    missing = [k for k in ("accuracy", "f1_macro") if k not in metrics]
    if missing:
        raise UserError(f"eval metrics lack {missing}: rerun `dvc repro evaluate`")
    if not isinstance(validation.get("success"), bool):
        raise UserError("the validation verdict lacks 'success': rerun `dvc repro validate`")
    git = lineage_tags(manifest["source_sha256"])
    return {
        "mlflow_run_id": run_info["run_id"],
        "mlflow_experiment_id": str(run_info.get("experiment_id", "")),
        "git_commit": git["git.commit"],
        "git_dirty": git["git.dirty"],
        "data_sha256": manifest["source_sha256"],
        "params_sha256": params_sha256,
        "validation_passed": str(validation["success"]).lower(),  # labels are strings
        "test_accuracy": f"{metrics['accuracy']:.4f}",
        "test_f1_macro": f"{metrics['f1_macro']:.4f}",
    }


def serve_metadata(params: Params, labels: list[str], run_info: dict) -> dict:
    """What the service needs at start-up and cannot read from params.yaml inside a Bento."""
    return {
        "labels": labels,
        "max_length": params.prepare.max_length,  # truncate as in training
        "serve": params.serve.model_dump(),
        # run.json from before redaction existed may still hold a password.
        "mlflow_tracking_uri": redact_uri(run_info.get("tracking_uri", "")),
    }


def save_model(name: str, model_dir: Path, labels: dict[str, str], metadata: dict) -> str:
    """Copy the model folder into a new store entry ``name:<version>``; return its tag."""
    import bentoml

    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        shutil.copytree(model_dir, model.path, dirs_exist_ok=True)
    return str(model.tag)


def build_bento(bentofile: Path, model_tag: str, labels: dict[str, str]) -> str:
    """Build the Bento from the bentofile, the cwd (repo root) as build context; return its tag."""
    import bentoml

    if not bentofile.exists():
        raise UserError(f"package.bentofile {bentofile} not found (run from the repo root)")
    # The exact model tag travels as a Bento argument, stored in the Bento, so the Bento serves
    # this model version even after newer ones reach the store.
    bento = bentoml.bentos.build_bentofile(
        str(bentofile), build_ctx=".", labels=labels, args={"model": model_tag}, reload=True
    )
    return str(bento.tag)


def main(params: Params | None = None) -> dict:
    params = params or load_params()
    paths = params.paths
    labels = model_label_names(paths.model)
    run_info = read_json(paths.run_info, "run `dvc repro train` first")
    manifest = read_json(paths.manifest, "run `dvc repro ingest` first")
    metrics = read_json(paths.eval_metrics, "run `dvc repro evaluate` first")
    validation = read_json(paths.validation, "run `dvc repro validate` first")
    tags = lineage(run_info, manifest, metrics, validation, params_hash(params))

    model_tag = save_model(
        params.package.model_name, paths.model, tags, serve_metadata(params, labels, run_info)
    )
    bento_tag = build_bento(params.package.bentofile, model_tag, {**tags, "model": model_tag})
    info = {
        "bento_tag": bento_tag,
        "model_tag": model_tag,
        "mlflow_run_id": tags["mlflow_run_id"],
        "git_commit": tags["git_commit"],
        "data_sha256": tags["data_sha256"],
        "params_sha256": tags["params_sha256"],
    }
    write_json(paths.bento_info, info)
    print(f"package: model {model_tag}, bento {bento_tag} -> {paths.bento_info}")
    return info


if __name__ == "__main__":
    run_main(main)
