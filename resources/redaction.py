"""Keep credentials out of logs, errors, run tags and metadata."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# user:password@ inside anything that looks like a URL; also catches URLs embedded in
# driver error messages, which is where passwords usually leak.
_SECRET_PARAM = re.compile(
    r"(?i)\b(password|passwd|pwd|token|access_token|secret|api_?key|key|signature|sig)=[^&]*"
)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^@/\s]+)@")


def redact_url(url: str) -> str:
    """The URL with its password (and any query secrets) replaced by ``***``.

    Examples:
        >>> redact_url("postgresql+psycopg://app:s3cret@db:5432/flows")
        'postgresql+psycopg://app:***@db:5432/flows'
        >>> redact_url("redis://:s3cret@cache:6379/0")
        'redis://:***@cache:6379/0'
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}"
    query = _SECRET_PARAM.sub(r"\1=***", parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing secret; urlunsplit would also mangle sqlite:////abs/path
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""

    def _hide(match: re.Match[str]) -> str:
        user = match["userinfo"].split(":", 1)[0]
        return f"{match['scheme']}{user}:***@"

    return _USERINFO.sub(_hide, text)
