"""The ledger (SQL, the source of truth) and the live counters (Redis, its cache): plain
classes with no Dagster import, each configured by a Dagster resource in its package."""
