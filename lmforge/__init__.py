"""lmforge pipeline stages: one module per stage of dvc.yaml, run as `python -m stages.<name>`."""

import os
import warnings

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

# Great Expectations imports pyspark when it is installed, and pyspark warns on pandas 3 at import:
# noise on every validate. What the Spark engine uses of pyspark is tested (tests/test_spark.py).
warnings.filterwarnings("ignore", "PySpark does not yet fully support pandas", FutureWarning)
