"""lmforge pipeline stages: one module per stage of dvc.yaml, run as `python -m stages.<name>`.

Each is a short ``main(params=None)`` that reads its params, calls the library (lmforge/) and
writes its outputs; a stage never imports another stage.
"""
