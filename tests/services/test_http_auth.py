"""HTTP authentication against a real local HTTP server; secrets from real environment
variables through dagster.EnvVar. Nothing faked."""

from __future__ import annotations

import base64

import dagster as dg
import pytest

from flow_assets.errors import FlowDefinitionError, SourceError
from flow_assets.sources import (
    BasicAuth,
    BearerAuth,
    HeaderAuth,
    HttpJsonSource,
    PageNumberPaginator,
)
from tests.httpfixture import serve_records

SECRET = "tok-3e1f-very-secret"


def fetch_all(api: str, auth: object) -> list[object]:
    source = HttpJsonSource(
        api,
        paginator=PageNumberPaginator(total_pages_path="total_pages"),
        records_path="items",
        auth=auth,  # type: ignore[arg-type]
        max_retries=0,
    )
    assert SECRET not in str(source) and SECRET not in repr(source)
    return [record for page in source.pages(None) for record in page.records]


@pytest.mark.parametrize(
    ("auth", "header", "expected"),
    [
        (BearerAuth(dg.EnvVar("FLOW_TEST_TOKEN")), "authorization", f"Bearer {SECRET}"),
        (HeaderAuth("X-API-Key", dg.EnvVar("FLOW_TEST_TOKEN")), "x-api-key", SECRET),
        (
            BasicAuth("reporter", dg.EnvVar("FLOW_TEST_TOKEN")),
            "authorization",
            "Basic " + base64.b64encode(f"reporter:{SECRET}".encode()).decode(),
        ),
        (BearerAuth(SECRET), "authorization", f"Bearer {SECRET}"),
    ],
)
def test_secrets_from_env_vars_are_sent_and_never_shown(
    auth: object, header: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOW_TEST_TOKEN", SECRET)
    assert SECRET not in repr(auth) and SECRET not in str(auth)
    with serve_records([{"id": i} for i in range(5)], page_size=2) as api:
        assert len(fetch_all(api, auth)) == 5
        sent = {
            name.lower(): value
            for request in api.requests
            for name, value in request.headers.items()
        }
    assert sent[header] == expected


def test_an_unset_env_var_is_named_in_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOW_TEST_TOKEN", raising=False)
    with (
        serve_records([{"id": 1}], page_size=2) as api,
        pytest.raises(SourceError, match="FLOW_TEST_TOKEN is not set"),
    ):
        fetch_all(api, BearerAuth(dg.EnvVar("FLOW_TEST_TOKEN")))


@pytest.mark.parametrize("bad", ["", None, 42])
def test_empty_secrets_are_refused_at_declaration(bad: object) -> None:
    with pytest.raises(FlowDefinitionError, match=r"non-empty string or a dagster\.EnvVar"):
        BearerAuth(bad)  # type: ignore[arg-type]
