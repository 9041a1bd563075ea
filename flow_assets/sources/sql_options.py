"""Checks of ``SqlSource``'s URL and selection when the flow is declared."""

from __future__ import annotations

from sqlalchemy.sql.selectable import SelectBase

from flow_assets.errors import FlowDefinitionError
from flow_assets.options import require_name
from resources.errors import ConfigurationError
from resources.ledger.db import normalize_url


def checked_url(url: object) -> str:
    """A SQLAlchemy URL string, normalized; ``FlowDefinitionError`` for anything else."""
    if not isinstance(url, str) or not url.strip():
        # Not the value: a URL object's repr shows a misparsed password's tail.
        raise FlowDefinitionError(
            "url must be a SQLAlchemy database URL string (or a dagster.EnvVar),"
            f" got {'an empty string' if isinstance(url, str) else type(url).__name__}."
        )
    try:
        return normalize_url(url, "SqlSource url")
    except ConfigurationError as exc:
        raise FlowDefinitionError(str(exc)) from None


def checked_selection(table: str | None, query: str | SelectBase | None) -> str | SelectBase | None:
    """Exactly one of a table name and a query; the query, a SQL string trimmed of ``;``."""
    if (table is None) == (query is None):
        raise FlowDefinitionError(
            "SqlSource needs exactly one of table= (a table name) and query= (a select or "
            "SQL string)."
        )
    if table is not None:
        require_name(table, "table")
    if isinstance(query, str):
        query = query.strip().rstrip(";").strip()
        require_name(query, "query")
    elif query is not None and not isinstance(query, SelectBase):
        raise FlowDefinitionError(
            f"query must be a SQLAlchemy select(...) or a SQL string, got {type(query)}."
        )
    return query
