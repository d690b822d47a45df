"""flows: Prefect and MLflow wiring around the pure `lm` library."""

import os

# There is no network to report to, and we never phone home: telemetry off before prefect/mlflow load.
for _key, _value in {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",  # nothing pickled, even where a decorator forgets to say so
}.items():
    os.environ.setdefault(_key, _value)
