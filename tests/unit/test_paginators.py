"""Paginator state machines (flow_assets/sources/paginators.py); real requests.Request and
requests.Response objects built in memory: no network, nothing faked."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from flow_assets.errors import FlowDefinitionError, SourceError
from flow_assets.sources.json_body import MISSING, json_kind, json_lookup, response_json
from flow_assets.sources.paginators import (
    HeaderLinkPaginator,
    JSONCursorPaginator,
    JSONLinkPaginator,
    OffsetPaginator,
    PageNumberPaginator,
)

pytestmark = pytest.mark.unit

URL = "http://api.test/v1/items"
PAGE = [{"id": 1}]


def response(
    body: Any = None, *, headers: dict[str, str] | None = None, url: str = URL, raw: bytes = b""
) -> requests.Response:
    """A real Response as requests builds it from the wire."""
    resp = requests.Response()
    resp.status_code = 200
    resp.url = url
    resp.encoding = "utf-8"
    resp._content = raw if body is None else json.dumps(body).encode()
    resp.headers.update(headers or {})
    return resp


def first_request(paginator: Any, params: dict[str, Any] | None = None) -> requests.Request:
    request = requests.Request("GET", URL, params=dict(params or {}))
    paginator.init_request(request)
    return request


def walk(paginator: Any, bodies: list[Any]) -> list[dict[str, Any]]:
    """Feed the bodies in order as long as the paginator wants more; the params it sent."""
    request = first_request(paginator)
    sent = [dict(request.params)]
    for body in bodies:
        paginator.update_state(response(body), body.get("items", []))
        if not paginator.has_next_page:
            break
        paginator.update_request(request)
        sent.append(dict(request.params))
    return sent


class TestPageNumberPaginator:
    def test_counts_pages_from_base_page_until_the_total(self) -> None:
        paginator = PageNumberPaginator(base_page=1, total_pages_path="meta.pages")
        bodies = [{"items": PAGE, "meta": {"pages": 3}}] * 5
        assert walk(paginator, bodies) == [{"page": 1}, {"page": 2}, {"page": 3}]
        assert paginator.has_next_page is False

    def test_without_total_stops_at_the_first_empty_page(self) -> None:
        paginator = PageNumberPaginator()
        bodies = [{"items": PAGE}, {"items": PAGE}, {"items": []}, {"items": PAGE}]
        assert walk(paginator, bodies) == [{"page": 0}, {"page": 1}, {"page": 2}]
        assert paginator.has_next_page is False

    def test_empty_first_page_stops_even_with_a_total(self) -> None:
        paginator = PageNumberPaginator(total_pages_path="pages")
        first_request(paginator)
        paginator.update_state(response({"items": [], "pages": 9}), [])
        assert paginator.has_next_page is False

    def test_max_pages_stops_without_empty_page_or_total(self) -> None:
        paginator = PageNumberPaginator(max_pages=2, stop_after_empty_page=False)
        assert walk(paginator, [{"items": []}] * 5) == [{"page": 0}, {"page": 1}]

    def test_total_as_string_is_accepted(self) -> None:
        paginator = PageNumberPaginator(total_pages_path="pages")
        assert walk(paginator, [{"items": PAGE, "pages": "2"}] * 3) == [{"page": 0}, {"page": 1}]

    @pytest.mark.parametrize(
        "total", ["many", -1, True, None, {"n": 1}, 2.5, float("inf"), 10**400, "²", "9" * 20]
    )
    def test_invalid_total_is_a_source_error(self, total: Any) -> None:
        # Infinity (and 1e400) raised OverflowError, "²" ValueError; 2.5 was read as 2.
        paginator = PageNumberPaginator(total_pages_path="pages")
        first_request(paginator)
        with pytest.raises(SourceError, match=r"total path 'pages' holds .*Fix: ") as caught:
            paginator.update_state(response({"items": PAGE, "pages": total}), PAGE)
        assert len(str(caught.value)) < 400

    @pytest.mark.parametrize("total", [10**400, 1e300, "1" + "0" * 400])
    def test_a_huge_record_total_is_a_source_error(self, total: Any) -> None:
        # 10**400 / page_size overflowed a float, and 1e300 pages overflowed len().
        for paginator, headers in [
            (PageNumberPaginator(total_records_path="total", page_size=10), {}),
            (OffsetPaginator(limit=10, total_path="total"), {}),
            (OffsetPaginator(limit=10, total_header="X-Total"), {"X-Total": str(total)}),
        ]:
            resp = response({"items": PAGE, "total": total}, headers=headers)
            with pytest.raises(SourceError, match=r"holds .*not a non-negative integer"):
                paginator.page_params(resp, PAGE)

    def test_missing_total_names_the_path_and_the_keys(self) -> None:
        paginator = PageNumberPaginator(total_pages_path="meta.pages")
        first_request(paginator)
        with pytest.raises(SourceError, match=r"'meta.pages' is not in the response.*keys: items"):
            paginator.update_state(response({"items": PAGE}), PAGE)

    def test_missing_total_shows_no_key_that_may_be_data(self) -> None:
        paginator = PageNumberPaginator(total_pages_path="pages")
        first_request(paginator)
        with pytest.raises(SourceError) as caught:
            paginator.update_state(response({"items": PAGE, "bob@example.com": 1}), PAGE)
        assert "bob@example.com" not in str(caught.value)
        assert "(keys: items; 1 more not shown)" in str(caught.value)

    def test_total_records_with_page_size_gives_random_access(self) -> None:
        paginator = PageNumberPaginator(
            base_page=1, page_size=10, page_size_param="per_page", total_records_path="total"
        )
        assert paginator.random_access
        params = paginator.page_params(response({"items": PAGE, "total": 25}), PAGE)
        assert list(params or []) == [{"page": p, "per_page": 10} for p in (1, 2, 3)]

    def test_page_params_list_every_page_capped_by_max_pages(self) -> None:
        paginator = PageNumberPaginator(total_pages_path="pages", max_pages=2)
        capped = paginator.page_params(response({"pages": 5}), PAGE)
        assert list(capped or []) == [{"page": 0}, {"page": 1}]
        empty = paginator.page_params(response({"pages": 0}), [])
        assert empty is not None and list(empty) == []

    def test_page_params_are_lazy_whatever_the_total(self) -> None:
        # A listed plan of 10**12 pages would exhaust the memory: the page params are made
        # when read, and their count is known up front (the source refuses it).
        paginator = PageNumberPaginator(base_page=1, total_pages_path="pages")
        params = paginator.page_params(response({"pages": 10**12}), PAGE)
        assert params is not None and len(params) == 10**12
        assert params[-1] == {"page": 10**12} and list(params[:2]) == [{"page": 1}, {"page": 2}]

    def test_without_total_it_is_sequential(self) -> None:
        paginator = PageNumberPaginator()
        assert not paginator.random_access
        assert paginator.page_params(response({"items": PAGE}), PAGE) is None

    def test_keeps_other_params_and_init_request_restarts(self) -> None:
        paginator = PageNumberPaginator(total_pages_path="pages")
        request = first_request(paginator, {"date": "2024-01-01"})
        paginator.update_state(response({"pages": 3}), PAGE)
        paginator.update_request(request)
        assert request.params == {"date": "2024-01-01", "page": 1}
        paginator.init_request(request)
        assert request.params == {"date": "2024-01-01", "page": 0}
        assert paginator.has_next_page

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"page_param": ""}, "page_param must be a non-empty string"),
            ({"base_page": -1}, "base_page must be an integer >= 0"),
            ({"page_size": 0}, "page_size must be an integer >= 1"),
            ({"page_size": True}, "page_size must be an integer >= 1"),
            ({"max_pages": 0}, "max_pages must be an integer >= 1"),
            ({"total_pages_path": "a..b"}, "total_pages_path must be a dotted JSON path"),
            ({"total_pages_path": ""}, "total_pages_path must be a dotted JSON path"),
            ({"page_size_param": "size"}, "page_size_param needs page_size"),
            ({"total_records_path": "total"}, "total_records_path needs page_size"),
            (
                {"total_pages_path": "p", "total_records_path": "t", "page_size": 5},
                "not both",
            ),
            ({"stop_after_empty_page": False}, "would never stop"),
            ({"stop_after_empty_page": "yes"}, "stop_after_empty_page must be True or False"),
        ],
    )
    def test_invalid_arguments_are_refused(self, kwargs: dict[str, Any], message: str) -> None:
        with pytest.raises(FlowDefinitionError, match=message):
            PageNumberPaginator(**kwargs)

    def test_str_names_the_settings(self) -> None:
        paginator = PageNumberPaginator(base_page=1, total_pages_path="meta.pages", max_pages=9)
        assert str(paginator) == (
            "PageNumberPaginator(page_param='page', base_page=1, "
            "total_pages_path='meta.pages', max_pages=9)"
        )


class TestOffsetPaginator:
    def test_moves_by_limit_until_the_total(self) -> None:
        paginator = OffsetPaginator(limit=10, total_path="total")
        sent = walk(paginator, [{"items": PAGE, "total": 25}] * 5)
        assert sent == [{"offset": o, "limit": 10} for o in (0, 10, 20)]
        assert paginator.has_next_page is False

    def test_total_header_gives_every_page(self) -> None:
        paginator = OffsetPaginator(limit=10, offset=5, total_header="X-Total-Count")
        resp = response({"items": PAGE}, headers={"X-Total-Count": "25"})
        assert list(paginator.page_params(resp, PAGE) or []) == [
            {"offset": 5, "limit": 10},
            {"offset": 15, "limit": 10},
        ]

    def test_missing_total_header_names_the_header(self) -> None:
        paginator = OffsetPaginator(limit=10, total_header="X-Total-Count")
        with pytest.raises(SourceError, match="no 'X-Total-Count' header"):
            paginator.page_params(response({"items": PAGE}), PAGE)

    def test_without_total_stops_at_the_empty_page(self) -> None:
        paginator = OffsetPaginator(limit=2, limit_param=None)
        sent = walk(paginator, [{"items": PAGE}, {"items": []}])
        assert sent == [{"offset": 0}, {"offset": 2}]
        assert paginator.page_params(response({"items": PAGE}), PAGE) is None

    def test_max_pages_caps_a_total(self) -> None:
        paginator = OffsetPaginator(limit=10, total_path="total", max_pages=1)
        assert walk(paginator, [{"items": PAGE, "total": 100}] * 3) == [{"offset": 0, "limit": 10}]
        assert len(paginator.page_params(response({"total": 100}), PAGE) or []) == 1

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"limit": 0}, "limit must be an integer >= 1"),
            ({"limit": 10, "offset": -1}, "offset must be an integer >= 0"),
            ({"limit": 10, "offset_param": ""}, "offset_param must be a non-empty string"),
            ({"limit": 10, "total_path": "t", "total_header": "X-Total"}, "not both"),
            ({"limit": 10, "stop_after_empty_page": False}, "would never stop"),
        ],
    )
    def test_invalid_arguments_are_refused(self, kwargs: dict[str, Any], message: str) -> None:
        with pytest.raises(FlowDefinitionError, match=message):
            OffsetPaginator(**kwargs)

    def test_termination_by_max_pages_alone_is_allowed(self) -> None:
        paginator = OffsetPaginator(limit=10, stop_after_empty_page=False, max_pages=3)
        assert "max_pages=3" in str(paginator)


class TestJSONCursorPaginator:
    def test_sends_the_cursor_back_until_there_is_none(self) -> None:
        paginator = JSONCursorPaginator(cursor_path="meta.next", cursor_param="after")
        bodies = [
            {"items": PAGE, "meta": {"next": "abc"}},
            {"items": PAGE, "meta": {"next": 42}},
            {"items": PAGE, "meta": {"next": None}},
        ]
        assert walk(paginator, bodies) == [{}, {"after": "abc"}, {"after": 42}]
        assert paginator.has_next_page is False

    @pytest.mark.parametrize("body", [{"items": PAGE}, {"next_cursor": ""}, {"next_cursor": None}])
    def test_no_cursor_stops(self, body: dict[str, Any]) -> None:
        paginator = JSONCursorPaginator()
        first_request(paginator)
        paginator.update_state(response(body), PAGE)
        assert paginator.has_next_page is False

    def test_init_request_drops_a_stale_cursor(self) -> None:
        paginator = JSONCursorPaginator()
        request = first_request(paginator, {"cursor": "old", "date": "d"})
        assert request.params == {"date": "d"}

    def test_same_cursor_twice_is_an_error_not_a_loop(self) -> None:
        paginator = JSONCursorPaginator()
        first_request(paginator)
        paginator.update_state(response({"next_cursor": "x"}), PAGE)
        with pytest.raises(SourceError, match="same cursor twice"):
            paginator.update_state(response({"next_cursor": "x"}), PAGE)

    @pytest.mark.parametrize("cycle", [["a", "b", "a"], ["a", "b", "c", "b"], [1, 2, 1]])
    def test_a_cursor_met_before_is_an_error_not_an_endless_cycle(self, cycle: list[Any]) -> None:
        paginator = JSONCursorPaginator()
        first_request(paginator)
        for cursor in cycle[:-1]:
            paginator.update_state(response({"next_cursor": cursor}), PAGE)
        with pytest.raises(SourceError, match=r"a cursor met before \(after \d pages\)"):
            paginator.update_state(response({"next_cursor": cycle[-1]}), PAGE)

    def test_a_new_walk_forgets_the_cursors_met(self) -> None:
        paginator = JSONCursorPaginator()
        for _ in range(2):
            assert walk(paginator, [{"next_cursor": "a"}, {"next_cursor": None}]) == [
                {},
                {"cursor": "a"},
            ]

    def test_structured_cursor_is_refused(self) -> None:
        paginator = JSONCursorPaginator()
        first_request(paginator)
        cursor = {"email": "alice@example.com"}  # quoted whole by the old error
        with pytest.raises(SourceError, match=r"a JSON object .*not a string or an") as caught:
            paginator.update_state(response({"next_cursor": cursor}), PAGE)
        assert "alice" not in str(caught.value)

    def test_non_json_body_is_a_source_error(self) -> None:
        paginator = JSONCursorPaginator()
        first_request(paginator)
        with pytest.raises(SourceError, match="not JSON"):
            paginator.update_state(response(raw=b"<html>"), PAGE)

    def test_empty_page_stop_is_opt_in(self) -> None:
        keeps_going = JSONCursorPaginator()
        first_request(keeps_going)
        keeps_going.update_state(response({"next_cursor": "x"}), [])
        assert keeps_going.has_next_page
        stops = JSONCursorPaginator(stop_after_empty_page=True)
        first_request(stops)
        stops.update_state(response({"next_cursor": "x"}), [])
        assert not stops.has_next_page
        assert not stops.random_access

    def test_invalid_arguments_are_refused(self) -> None:
        with pytest.raises(FlowDefinitionError, match="cursor_path"):
            JSONCursorPaginator(cursor_path="meta.")
        with pytest.raises(FlowDefinitionError, match="cursor_param"):
            JSONCursorPaginator(cursor_param=" ")


class TestJSONLinkPaginator:
    @pytest.mark.parametrize(
        ("request_url", "link", "expected"),
        [
            (URL, "http://api.test/v1/items?page=2", "http://api.test/v1/items?page=2"),
            (URL, "/v1/items?page=2", "http://api.test/v1/items?page=2"),
            (URL + "?page=1", "?page=2", "http://api.test/v1/items?page=2"),
            (URL, "items?page=2", "http://api.test/v1/items?page=2"),
            (
                "http://api.test:8080/a/b",
                "/a/b?page=3&q=%E3%81%82",
                "http://api.test:8080/a/b?page=3&q=%E3%81%82",
            ),
            ("https://api.test/a", "https://other.test/a?p=2", "https://other.test/a?p=2"),
        ],
    )
    def test_relative_links_resolve_against_the_request_url(
        self, request_url: str, link: str, expected: str
    ) -> None:
        paginator = JSONLinkPaginator()
        request = first_request(paginator)
        paginator.update_state(response({"next": link}, url=request_url), PAGE)
        paginator.update_request(request)
        assert request.url == expected

    def test_next_url_replaces_the_params_without_duplicates(self) -> None:
        paginator = JSONLinkPaginator(next_url_path="links.next")
        request = first_request(paginator, {"date": "d"})
        paginator.update_state(response({"links": {"next": "/v1/items?date=d&page=2"}}), PAGE)
        paginator.update_request(request)
        prepared = requests.Session().prepare_request(request)
        assert prepared.url == "http://api.test/v1/items?date=d&page=2"

    @pytest.mark.parametrize("body", [{"items": PAGE}, {"next": None}, {"next": ""}])
    def test_no_link_stops(self, body: dict[str, Any]) -> None:
        paginator = JSONLinkPaginator()
        first_request(paginator)
        paginator.update_state(response(body), PAGE)
        assert not paginator.has_next_page

    def test_link_to_the_same_page_is_an_error_not_a_loop(self) -> None:
        paginator = JSONLinkPaginator()
        first_request(paginator)
        with pytest.raises(SourceError, match="points at the page just read"):
            paginator.update_state(response({"next": URL + "?page=1"}, url=URL + "?page=1"), PAGE)

    def test_link_to_a_page_read_before_is_an_error_not_an_endless_cycle(self) -> None:
        paginator = JSONLinkPaginator()
        first_request(paginator)
        paginator.update_state(response({"next": "?page=2"}, url=URL + "?page=1"), PAGE)
        paginator.update_state(response({"next": "?page=3"}, url=URL + "?page=2"), PAGE)
        with pytest.raises(SourceError, match=r"points at a page read before \(after 3 pages\)"):
            paginator.update_state(response({"next": "?page=1"}, url=URL + "?page=3"), PAGE)

    def test_a_link_cycle_through_a_redirect_is_caught_too(self) -> None:
        # page=2 is redirected to page=2b, whose next link is page=2 again.
        paginator = JSONLinkPaginator()
        first_request(paginator)
        paginator.update_state(response({"next": "?page=2"}, url=URL + "?page=1"), PAGE)
        with pytest.raises(SourceError, match="a page read before"):
            paginator.update_state(response({"next": "?page=2"}, url=URL + "?page=2b"), PAGE)

    @pytest.mark.parametrize("link", [2, {"href": "alice@example.com"}])
    def test_non_string_link_is_refused(self, link: Any) -> None:
        paginator = JSONLinkPaginator()
        first_request(paginator)
        with pytest.raises(SourceError, match=r"is a JSON .*not a URL") as caught:
            paginator.update_state(response({"next": link}), PAGE)
        assert "alice" not in str(caught.value)

    @pytest.mark.parametrize("link", ["http://[::1", "//[", "http://\u2100.example/"])
    def test_an_unparsable_link_is_a_source_error(self, link: str) -> None:
        # urljoin's ValueError got out bare.
        paginator = JSONLinkPaginator()
        first_request(paginator)
        with pytest.raises(SourceError, match=r"the next link is not a valid URL .*Fix: "):
            paginator.update_state(response({"next": link}), PAGE)

    def test_max_pages(self) -> None:
        paginator = JSONLinkPaginator(max_pages=1)
        first_request(paginator)
        paginator.update_state(response({"next": "/v1/items?page=2"}), PAGE)
        assert not paginator.has_next_page
        assert str(paginator) == "JSONLinkPaginator(next_url_path='next', max_pages=1)"


class TestHeaderLinkPaginator:
    def test_follows_rel_next_among_several_links(self) -> None:
        paginator = HeaderLinkPaginator()
        request = first_request(paginator, {"per_page": 2})
        link = '<https://api.test/r?page=1>; rel="prev", <https://api.test/r?page=3>; rel="next"'
        paginator.update_state(response([], headers={"Link": link}), PAGE)
        paginator.update_request(request)
        assert (request.url, request.params) == ("https://api.test/r?page=3", {})

    def test_relative_link_and_custom_rel(self) -> None:
        paginator = HeaderLinkPaginator(rel="next-page")
        request = first_request(paginator)
        paginator.update_state(
            response([], headers={"Link": '</v1/items?p=2>; rel="next-page"'}), PAGE
        )
        paginator.update_request(request)
        assert request.url == "http://api.test/v1/items?p=2"

    @pytest.mark.parametrize("headers", [{}, {"Link": '<https://api.test/r?page=1>; rel="last"'}])
    def test_no_next_link_stops(self, headers: dict[str, str]) -> None:
        paginator = HeaderLinkPaginator()
        first_request(paginator)
        paginator.update_state(response([], headers=headers), PAGE)
        assert not paginator.has_next_page

    def test_invalid_rel_is_refused(self) -> None:
        with pytest.raises(FlowDefinitionError, match="rel must be a non-empty string"):
            HeaderLinkPaginator(rel="")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a.b", 1),
        ("a.list.1", "y"),
        ("a.missing", MISSING),
        ("a.list.5", MISSING),
        ("a.b.c", MISSING),
    ],
)
def test_json_lookup(path: str, expected: Any) -> None:
    document = {"a": {"b": 1, "list": ["x", "y"]}}
    assert json_lookup(document, path) is expected or json_lookup(document, path) == expected


def test_json_kind_names_field_like_keys_only() -> None:
    assert json_kind({"data": 1, "meta": 2}) == "a JSON object (keys: data, meta)"
    assert json_kind({"alice@example.com": 1}) == "a JSON object (1 keys, none shown)"
    assert json_kind({f"k{i}": i for i in range(12)}).endswith("k7; 2 more not shown)")
    assert json_kind({}) == "an empty JSON object" and json_kind(None) == "null"


def test_json_nested_past_the_parser_is_a_source_error() -> None:
    deep = response(raw=b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(SourceError, match="nests deeper than the parser follows"):
        response_json(deep)
    # The paginators read the same parse: the error, not a RecursionError.
    paginator = JSONCursorPaginator()
    first_request(paginator)
    with pytest.raises(SourceError, match="nests deeper"):
        paginator.update_state(deep, PAGE)
