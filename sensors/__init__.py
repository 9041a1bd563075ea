"""Finalization: the pure ``classify`` and the ``finalize_flow_runs`` sensor around it."""
