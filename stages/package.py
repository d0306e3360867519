"""Stage package: put the trained model into the BentoML model store and build a Bento around it.

    python -m stages.package       # normally via `dvc repro package`; run from the repo root

The store is BentoML's own (``$BENTOML_HOME``, default ``~/bentoml``). The model entry carries its
lineage as labels (MLflow run, git commit, data hash, params hash, validation verdict, test metrics)
and, in its metadata, what the service needs and a Bento cannot read from params.yaml: the task, the
serving limits of ``params.serve``, and per task the classes and truncation length
(classification, bento/service.py) or the prompt format, template and context length (causal_lm,
bento/generate.py). With ``serve.runtime`` onnx / onnx_int8 the stored folder is stage export's
(that graph, tokenizer, config) instead of the PyTorch weights. The Bento's service follows the
task: the bentofile's (bento.service:Classifier) for classification, bento.generate:Generator for
causal_lm.
Writes ``paths.bento_info``: the Bento tag, the model tag and the lineage, for
`bentoml serve <bento_tag>`, `lmforge lineage` and deployment scripts.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import yaml

from lmforge.alignment import with_scored_model
from lmforge.common import UserError, read_json, run_main, write_json
from lmforge.models import require_trained
from lmforge.params import Params, load_params
from lmforge.tasks import CAUSAL_LM, CLASSIFICATION, task
from lmforge.tracking import git_state, own_files, params_hash, redact_uri

# config.json keys holding a causal LM's positions, across architectures (GPT-2: n_positions).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def model_label_names(model_dir: Path) -> list[str]:
    """The class names in id order, after checking the folder is a complete train output."""
    require_trained(model_dir, "labels.json")  # the services load safetensors only
    id2label = json.loads((model_dir / "labels.json").read_text())["id2label"]
    config_labels = json.loads((model_dir / "config.json").read_text()).get("id2label", {})
    # The service names classes from config.json; labels.json is what the data stages used.
    if {str(k): v for k, v in config_labels.items()} != id2label:
        raise UserError(
            f"{model_dir}: config.json id2label {config_labels} differs from labels.json "
            f"{id2label}: rerun `dvc repro train`"
        )
    return [id2label[str(i)] for i in range(len(id2label))]


def lm_settings(model_dir: Path) -> dict:
    """Prompt format, template and context length of a complete causal LM train output."""
    require_trained(model_dir, "lm.json")
    lm = json.loads((model_dir / "lm.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    fmt, template = lm.get("format"), lm.get("template")
    if fmt not in ("text", "pairs", "chat") or (fmt == "pairs") != isinstance(template, str):
        raise UserError(f"{model_dir / 'lm.json'}: needs format text or chat (template null) or "
                        f"pairs (with a template), got {fmt!r}: rerun `dvc repro train`")
    context = next((config[k] for k in CONTEXT_KEYS if isinstance(config.get(k), int)), None)
    if context is None:  # no position limit (e.g. a recurrent model): keep to the trained length
        context = lm["block_size"] if fmt == "text" else lm["max_length"]
    # BentoML metadata holds no None: a plain-text model's unused template is "".
    return {"format": fmt, "template": template or "", "context": context}


def model_facts(kind: str, model_dir: Path) -> dict:
    """What the service learns from the train output (classes, or prompt format and context),
    after checking the folder is complete for ``kind``."""
    if kind == CAUSAL_LM:
        return lm_settings(model_dir)
    return {"labels": model_label_names(model_dir)}


def lineage(
    run_info: dict, manifest: dict, metrics: dict, validation: dict, params_sha256: str,
    kind: str = CLASSIFICATION, ignore: Iterable[Path] = (),
) -> dict[str, str]:
    """Where the model comes from: run, code, data, params, and how it scored on the test split.

    ``params_sha256`` is tracking.params_hash, so `lmforge lineage` can match the store's model
    against the workspace's params.yaml. The test metrics are the task's headline metrics, plus
    BLEU and ROUGE-L for a causal LM on pairs. ``ignore``: what git_dirty does not count
    (tracking.own_files).
    """
    required = task(kind).headline
    missing = [k for k in required if k not in metrics]
    if missing:
        raise UserError(f"eval metrics lack {missing}: rerun `dvc repro evaluate`")
    if not isinstance(validation.get("success"), bool):
        raise UserError("the validation verdict lacks 'success': rerun `dvc repro validate`")
    git = git_state(ignore)
    extra = tuple(k for k in task(kind).pair_headline if k in metrics)
    return {
        "mlflow_run_id": run_info["run_id"],
        "mlflow_experiment_id": str(run_info.get("experiment_id", "")),
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "data_sha256": manifest["source_sha256"],
        "params_sha256": params_sha256,
        "validation_passed": str(validation["success"]).lower(),  # labels are strings
        **{f"test_{k}": f"{metrics[k]:.4f}" for k in required + extra},
    }


def onnx_file(params: Params) -> str:
    """The file of stage export's folder that ``serve.runtime`` (onnx / onnx_int8) serves, checked
    to exist; "" for runtime torch (BentoML metadata holds no None)."""
    runtime, folder = params.serve.runtime, params.paths.export
    if runtime == "torch":
        return ""
    manifest = read_json(folder / "export.json", "run `dvc repro export` first")
    name = manifest.get("files", {}).get(runtime) if manifest.get("enabled") else None
    if name is None or not (folder / name).is_file():
        raise UserError(f"serve.runtime is {runtime}, but {folder} holds no {runtime} model "
                        f"({folder / 'export.json'}): rerun `dvc repro export`")
    return name


def serve_metadata(params: Params, facts: dict, run_info: dict, onnx: str = "") -> dict:
    """What the service needs at start-up and cannot read from params.yaml inside a Bento.

    ``facts``: model_facts of the train output; ``onnx``: onnx_file (the served graph, or "").
    """
    # classification truncates as in training; causal_lm cuts prompts to the context instead.
    trained = {"max_length": params.prepare.max_length} if params.task == CLASSIFICATION else {}
    return {
        "task": params.task,
        **facts,
        **trained,
        # BentoML metadata holds no None: an unset limit (max_concurrency, threads) is left out.
        "serve": params.serve.model_dump(exclude_none=True),
        "runtime": params.serve.runtime,
        "onnx_file": onnx,
        # run.json from before redaction existed may still hold a password.
        "mlflow_tracking_uri": redact_uri(run_info.get("tracking_uri", "")),
    }


def store_model(name: str, model_dir: Path, labels: dict[str, str], metadata: dict,
               skip: tuple[str, ...] = ()) -> str:
    """Copy the model folder, less the ``skip`` files, into a new store entry ``name:<version>``;
    return its tag."""
    import bentoml

    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        shutil.copytree(model_dir, model.path, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(*skip))
    return str(model.tag)


def served_folder(params: Params, onnx: str) -> tuple[Path, tuple[str, ...]]:
    """What goes into the store: the train output (runtime torch), or export's folder with only
    the served graph (its tokenizer and config came from the train output)."""
    if not onnx:
        return params.paths.model, ()
    return params.paths.export, tuple(f.name for f in params.paths.export.glob("*.onnx")
                                      if f.name != onnx)


def bento_overrides(kind: str) -> dict | None:
    """bentofile keys replaced for ``kind``: its service and a description naming its endpoints
    (the bentofile itself describes the classifier)."""
    if kind == CLASSIFICATION:
        return None
    entry = task(kind)
    return {"service": entry.service,
            "description": f"lmforge {kind}: " + ", ".join(f"POST {e}" for e in entry.endpoints)}


def build_bento(
    bentofile: Path, model_tag: str, labels: dict[str, str], overrides: dict | None = None
) -> str:
    """Build the Bento from the bentofile, the cwd (repo root) as build context; return its tag.

    ``overrides``: bentofile keys replaced for this build (bento_overrides).
    """
    import bentoml

    if not bentofile.exists():
        raise UserError(f"package.bentofile {bentofile} not found (run from the repo root)")
    with tempfile.TemporaryDirectory() as tmp:
        if overrides:  # build_bentofile ignores its service= when given a bentofile: edit a copy
            recipe = {**yaml.safe_load(bentofile.read_text()), **overrides}
            bentofile = Path(tmp) / "bentofile.yaml"
            bentofile.write_text(yaml.safe_dump(recipe, sort_keys=False))
        # The exact model tag travels as a Bento argument, stored in the Bento, so the Bento
        # serves this model version even after newer ones reach the store.
        bento = bentoml.bentos.build_bentofile(
            str(bentofile), build_ctx=".", labels=labels, args={"model": model_tag}, reload=True
        )
    return str(bento.tag)


def main(params: Params | None = None) -> dict:
    params = with_scored_model(params or load_params())  # align's model, when it wrote one
    paths = params.paths
    facts = model_facts(params.task, paths.model)
    run_info = read_json(paths.run_info, "run `dvc repro train` first")
    manifest = read_json(paths.manifest, "run `dvc repro ingest` first")
    metrics = read_json(paths.eval_metrics, "run `dvc repro evaluate` first")
    validation = read_json(paths.validation, "run `dvc repro validate` first")
    tags = lineage(run_info, manifest, metrics, validation, params_hash(params), params.task,
                   own_files(paths))

    onnx = onnx_file(params)
    folder, skip = served_folder(params, onnx)
    model_tag = store_model(params.package.model_name, folder, tags,
                           serve_metadata(params, facts, run_info, onnx), skip)
    overrides = bento_overrides(params.task)
    bento_tag = build_bento(params.package.bentofile, model_tag, {**tags, "model": model_tag},
                            overrides)
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
