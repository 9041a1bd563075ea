"""Benchmark harness of dagster-flow-metrics: ``python -m bench.run`` (``make bench``).

Not tests: nothing here asserts on time. Each module measures one family of figures
against real Redis and PostgreSQL servers the harness starts itself; ``bench.report``
writes ``bench/results.json`` and ``bench/RESULTS.md``.
"""
