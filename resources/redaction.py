"""Keep credentials out of logs, errors, run tags and metadata."""

from __future__ import annotations

import re

# A query parameter whose name ends in a secret word: client_secret, private_token,
# refresh_token, x-api-key, access_key... (``\b`` would not split ``client_secret``).
_SECRET_PARAM = re.compile(
    r"(?i)(?<![A-Za-z0-9_.\-])"
    r"([A-Za-z0-9_.\-]*(?:password|passwd|pwd|token|secret|api_?key|key|signature|sig))"
    r"=[^&#\s]*"
)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# A URL inside free text runs to the next whitespace: a password may hold quotes or brackets.
_URL_IN_TEXT = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>\S*)")
# A user name shown next to a masked password: unreserved and sub-delims characters only.
_SHOWN_USER = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=\-]*")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")

RESERVED_FIX = (
    "percent-encode reserved characters in the user name and password: / is %2F, @ is %40,"
    " : is %3A, % is %25, # is %23, ? is %3F (in Python: urllib.parse.quote(password,"
    " safe=''))"
)


def redact_url(url: str) -> str:
    """The URL with its password (and any query secrets) replaced by ``***``.

    Robust to passwords holding reserved characters that were not percent-encoded: the
    user information runs to the last ``@`` whenever the part before the first ``/``, ``?``
    or ``#`` cannot be a plain host (it holds an ``@``, or a ``:`` while an ``@`` follows),
    so no fragment of such a password is left visible.

    Examples:
        >>> redact_url("postgresql+psycopg://app:s3cret@db:5432/flows")
        'postgresql+psycopg://app:***@db:5432/flows'
        >>> redact_url("redis://:s3cret@cache:6379/0")
        'redis://:***@cache:6379/0'
        >>> redact_url("redis://:s3/cr@t@cache:6379/0")
        'redis://:***@cache:6379/0'
    """
    scheme = _SCHEME.match(url)
    if scheme is None:
        return url
    rest = _mask_userinfo(url[scheme.end() :])
    query = rest.find("?")
    if query >= 0:
        rest = rest[: query + 1] + _SECRET_PARAM.sub(r"\1=***", rest[query + 1 :])
    return url[: scheme.end()] + rest


def redact_text(text: str) -> str:
    """``text`` with the password and the query secrets of every URL in it replaced by
    ``***``."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m[0]), text)


def userinfo_problem(url: str) -> str | None:
    """Why the user name and password of ``url`` cannot be told apart from the rest of it
    (reserved characters not percent-encoded), or None. The reason quotes nothing of the URL.

    Parsers disagree on such URLs (SQLAlchemy takes ``/`` into the password, urllib and
    redis-py end the host at it), and each error they raise may quote a piece of the
    password, so callers reject them before parsing.

    Examples:
        >>> userinfo_problem("redis://:s3cret@cache:6379/0") is None
        True
        >>> userinfo_problem("redis://:s3/cret@cache:6379/0")
        "an '@' comes after a '/', '?' or '#', so the password holds one unencoded"
    """
    scheme = _SCHEME.match(url)
    if scheme is None:
        return None
    rest = url[scheme.end() :]
    end = _authority_end(rest)
    authority, after = rest[:end], rest[end:]
    if authority and "@" in after:
        return "an '@' comes after a '/', '?' or '#', so the password holds one unencoded"
    userinfo, at, _host = authority.rpartition("@")
    if not at:
        return None
    if "@" in userinfo:
        return "the user name or password holds an '@'"
    if _BAD_PERCENT.search(userinfo):
        return "the user name or password holds a '%' that does not start a %XX escape"
    if any(character.isspace() for character in userinfo):
        return "the user name or password holds white space"
    return None


def _authority_end(rest: str) -> int:
    ends = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
    return min(ends, default=len(rest))


def _mask_userinfo(rest: str) -> str:
    """``rest`` (a URL after ``scheme://``) with its user information masked."""
    end = _authority_end(rest)
    authority, after = rest[:end], rest[end:]
    if "@" not in authority and not (":" in authority and "@" in after):
        return rest  # no user information (a host, host:port, or a path such as SQLite's)
    cut = rest.rindex("@")
    user, colon, _password = rest[:cut].partition(":")
    if colon and _SHOWN_USER.fullmatch(user):
        return f"{user}:***{rest[cut:]}"
    return f"***{rest[cut:]}"
