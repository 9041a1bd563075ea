"""The SQL ledger, the source of truth: engines and URLs (``db``), the schema and its
migrations, one query module per table family, the record types, and the
``MetricsStore`` resource."""
