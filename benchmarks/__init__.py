"""Benchmarks: figures, not tests. Each one runs as a module from the repo root:

    python -m benchmarks.<name>        # e.g. python -m benchmarks.bench_data_stages (`make bench`)

Benchmarks import the library, ``lmforge``, never ``stages``: a stage is only ever run, as dvc.yaml
runs it (``python -m stages.train`` in a copy of the repo, say), never imported.
"""
