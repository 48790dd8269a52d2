"""What a job does: the typed job spec, the search loop, the evaluator, executors and latency sources.

The engine imports compression, agents and latency_models, never ``service``, ``db`` or
``modeltailor``: what a job must persist or read from the service reaches it through the
protocols of :mod:`engine.job`. This package's ``__init__`` imports nothing, so
``engine.spec`` loads without torch; import the submodules themselves.
"""
