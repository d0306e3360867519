"""lmforge pipeline stages: one module per stage of dvc.yaml, run as `python -m stages.<name>`."""

import os

# A pipeline step never phones home: the usage telemetry of our tools stays off unless the user
# turns it on explicitly. Set before any of those libraries is imported by a stage.
for _key, _off in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "False",
    "BENTOML_DO_NOT_TRACK": "True",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}.items():
    os.environ.setdefault(_key, _off)
