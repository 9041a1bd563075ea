"""Keep credentials (and, on request, personal data) out of every outward text.

``redact_text`` is the one path of every text this package shows: errors, logs, Dagster
events, ledger reasons, run tags and metadata. It masks URL passwords, query secrets,
header credentials (``Authorization: Bearer ...``, ``X-API-Key: ...``), bare ``Bearer``
tokens, and ``name=value`` / ``"name": "value"`` pairs whose name ends in a secret word;
and it escapes NUL and lone surrogates, which PostgreSQL, Redis and UTF-8 refuse.
``mask_personal_data`` masks emails, phone and other long numbers, IBANs and tokens, for
texts that may quote a record (a handler's exception).
"""

from __future__ import annotations

import re

# A query parameter whose name ends in a secret word: client_secret, private_token,
# refresh_token, x-api-key, access_key... (``\b`` would not split ``client_secret``).
# Session ids and one-time codes are credentials too (``?jwt=``, ``?sid=``, OAuth's ``?code=``).
_SECRET_PARAM = re.compile(
    r"(?i)(?<![A-Za-z0-9_.\-])"
    r"([A-Za-z0-9_.\-]*(?:password|passwd|pwd|token|secret|api_?key|key|signature|sig|jwt"
    r"|session|session_?id|sid)|code)"
    r"=[^&#\s]*"
)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# Where a URL starts in free text: a scheme not glued to a word before it.
_URL_START = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://")
# An authority that holds no user information: a host (or [IPv6]) and a numeric port, or
# nothing at all (``sqlite:////path``).
_PLAIN_AUTHORITY = re.compile(r"(?:\[[0-9A-Fa-f:.]*\]|[^:@\[\]]+)(?::\d+)?|")
# A user name shown next to a masked password: unreserved and sub-delims characters only.
_SHOWN_USER = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=\-]*")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SPACE = re.compile(r"\s")
_MASK = "***"

# Free-text credentials. A name ending in a secret word, then ':' or '=' (a JSON or
# Python key keeps its closing quote), then the value: a quoted string, or one word,
# after an optional authorization scheme (``Authorization: Bearer <token>``).
_SECRET_WORDS = (
    r"password|passwd|pwd|passphrase|secret|token|api[-_]?key|access[-_]?key"
    r"|private[-_]?key|auth|authorization|credentials?|signature|cookie|session[-_]?id"
)
# A bare value ends before white space or a later '&', less closing punctuation, and is
# more than punctuation ("the credentials (auth=)" names an option, it holds none). Our
# mask is left as it is (masked already); a value led by '*' is masked whole, else the
# mask and what follows it could spell the value.
_MASK_RE = r"\*\*\*"
_TRAILING = r"[,;)}\]\"'>]*(?:[\s&]|$)"
_AUTH_SCHEMES = r"bearer|basic|token|digest|negotiate|ntlm|oauth|jwt|apikey|api-key|mac|hoba"
_SECRET_PAIR = re.compile(
    rf"(?i)(?<![\w-])([\w-]*?(?:{_SECRET_WORDS})[\"']?\s*[:=]\s*(?:(?:{_AUTH_SCHEMES})\s+)?)"
    rf"(\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'|{_MASK_RE}(?={_TRAILING})|\*+\S*"
    rf"|[,;)}}\]\"'>]*[^\s,;)}}\]\"'>][^\s&]*?(?={_TRAILING}))"
)
# A Cookie header's value is all of its pairs (``a=1; sid=...``), to the end of the line.
_COOKIE_HEADER = re.compile(r"(?i)(?<![\w-])((?:set-)?cookie\s*:\s*)([^\r\n]+)")
# A bearer token wherever it is echoed (a body quoting the request); ``Basic`` only before
# something base64-like, as "Basic" is a word too.
_BARE_CREDENTIAL = re.compile(
    r"(\b(?i:bearer)\s+)(\S[^\s\"'\\,;]*)"
    r"|(\b(?i:basic)\s+)"
    r"((?=\S*[0-9+/=]|[A-Za-z0-9+/]*[a-z][A-Za-z0-9+/]*[A-Z])[A-Za-z0-9+/]{4,}={0,2})"
)
# Characters no store takes: NUL (PostgreSQL text) and lone surrogates (UTF-8).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

RESERVED_FIX = (
    "percent-encode reserved characters in the user name and password (/ is %2F, @ is %40,"
    " : is %3A, % is %25, # is %23, ? is %3F; in Python: urllib.parse.quote(password,"
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
    return url[: scheme.end()] + redact_url_part(url[scheme.end() :])


def redact_text(text: str) -> str:
    """``text`` safe to show anywhere: every credential in it replaced by ``***``.

    URLs (their user information and query secrets), header credentials, bare bearer
    tokens and secret ``name=value`` / ``"name": "value"`` pairs are masked; NUL and lone
    surrogates are escaped (``\\u0000``) so that any store takes the text.

    Examples:
        >>> redact_text("GET https://u:pw@api/x?client_secret=abc (401) Authorization: Bearer t0k")
        'GET https://u:***@api/x?client_secret=*** (401) Authorization: Bearer ***'
        >>> redact_text('{"password": "s3 cret"}')
        '{"password": "***"}'
    """
    text = _redact_urls(text)
    text = _COOKIE_HEADER.sub(lambda m: m[1] + _MASK, text)
    text = _SECRET_PAIR.sub(_masked_pair, text)
    text = _BARE_CREDENTIAL.sub(_masked_bare, text)
    return escape_unstorable(text)


def escape_unstorable(text: str) -> str:
    """``text`` with NUL and lone surrogates as ``\\uXXXX`` escapes (JSON's spelling)."""
    return _UNSTORABLE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def _masked_pair(match: re.Match[str]) -> str:
    value = match[2]
    quoted = len(value) > 1 and value[0] in "\"'" and value[-1] == value[0]
    return match[1] + (f"{value[0]}{_MASK}{value[0]}" if quoted else _MASK)


def _masked_bare(match: re.Match[str]) -> str:
    return f"{match[1] or match[3]}{_MASK}"


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


# ------------------------------------------------------------------------ URLs in text


def _redact_urls(text: str) -> str:
    """Every URL of ``text`` with its user information and query secrets masked."""
    parts: list[str] = []
    done = 0
    while (start := _URL_START.search(text, done)) is not None:
        end = _url_end(text, start.end())
        parts += [text[done : start.end()], redact_url_part(text[start.end() : end])]
        done = end
    return "".join(parts) + text[done:] if parts else text


def redact_url_part(rest: str) -> str:
    """A URL after its ``scheme://``, query secrets and user information masked.

    Query secrets first: an ``@`` in a query value must not pass for the end of the user
    information, which would leave the value's tail after it.
    """
    return _mask_userinfo(_mask_query(rest))


def _url_end(text: str, after_scheme: int) -> int:
    """Where the URL whose ``scheme://`` ends at ``after_scheme`` ends in ``text``.

    A URL ends at white space, except that a password may hold spaces: when the word's
    authority holds user information that the word does not complete (no ``@``, an empty
    password, or no host after the ``@``), it runs to the last ``@`` of the line before
    the next URL (or, if none is before it, the next one after): masking too much beats
    showing a password's tail. Known limits, all on passwords no URL parser accepts
    either: ``user:123 rest@host`` (digits, then a space) reads as the host ``user``, port
    ``123`` and prose; a password holding an ``@`` before a space shows what follows
    that ``@`` (never the whole password).
    """
    word_end = _next_space(text, after_scheme)
    word = text[after_scheme:word_end]
    authority = word[: _authority_end(word)]
    if _PLAIN_AUTHORITY.fullmatch(authority) or _complete_userinfo(word):
        return word_end
    line_end = _line_end(text, after_scheme)
    if text.find("@", word_end, line_end) < 0:
        return word_end  # no '@' later on the line: the word is the whole URL
    bounds = [m.start() for m in _URL_START.finditer(text, word_end, line_end)] + [line_end]
    for bound in bounds:
        at = text.rfind("@", after_scheme, bound)
        if at >= 0:
            return _next_space(text, at)
    return word_end  # no '@' on the line: no user information to mask


def _complete_userinfo(word: str) -> bool:
    """The word (a URL after its scheme) holds its whole user information: an ``@`` with
    a password before it and a host after it, or a password masked already (``:***@``)."""
    at = word.rfind("@")
    if at < 0:
        return False
    if word[:at].endswith(_MASK):
        return True
    return not word[:at].endswith(":") and word[at + 1 : at + 2] not in ("", "/", "?", "#")


def _next_space(text: str, start: int) -> int:
    match = _SPACE.search(text, start)
    return match.start() if match else len(text)


def _line_end(text: str, start: int) -> int:
    ends = [i for i in (text.find("\n", start), text.find("\r", start)) if i >= 0]
    return min(ends, default=len(text))


def _mask_query(rest: str) -> str:
    query = rest.find("?")
    if query < 0:
        return rest
    return rest[: query + 1] + _SECRET_PARAM.sub(r"\1=***", rest[query + 1 :])


# -------------------------------------------------------------------- personal data

# An email address. It starts only where no local part runs on (a start inside one would
# scan it again: quadratic on a long word).
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9_%+\-])(?<![A-Za-z0-9_%+\-]\.)"
    r"[A-Za-z0-9][A-Za-z0-9._%+\-]*@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+"
)
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
# A token: 16+ characters of base64/hex alphabets with a letter and a digit.
_TOKEN = re.compile(
    r"(?<![\w+/=\-])(?=[\w+/\-]*\d)(?=[\w+/\-]*[A-Za-z])[\w+/\-]{16,}={0,2}(?![\w+/=\-])"
)
# Six digits or more, maybe split by spaces, dashes, dots, slashes or parentheses:
# phone, SSN, card and account numbers, dates of birth.
_LONG_NUMBER = re.compile(r"\+?\d(?:[ \-./()]{0,2}\d){5,}")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


def mask_personal_data(text: str) -> str:
    """``text`` with emails, IBANs, tokens and long numbers (6+ digits) replaced by
    ``<email>``, ``<iban>``, ``<token>`` and ``<number>``. IPv4 addresses stay.

    Examples:
        >>> mask_personal_data("duplicate customer alice@example.com ssn=123-45-6789")
        'duplicate customer <email> ssn=<number>'
    """
    text = _EMAIL.sub("<email>", text)
    text = _IBAN.sub("<iban>", text)
    text = _TOKEN.sub("<token>", text)
    return _LONG_NUMBER.sub(lambda m: m[0] if _IPV4.fullmatch(m[0]) else "<number>", text)
