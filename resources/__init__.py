"""Resources of dagster-flow-metrics: Redis run counters and the SQL metrics store."""
