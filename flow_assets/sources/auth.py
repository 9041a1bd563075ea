"""HTTP authentication whose secrets come from Dagster ``EnvVar``s and never show up.

A secret is a plain string or a ``dagster.EnvVar``; an ``EnvVar`` is read at request time,
so definitions load without it and the UI shows the variable's name, never its value.
An API that echoes the request in an error body is masked by :func:`mask_credentials`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable

import dagster as dg
import requests
from requests.auth import AuthBase

from flow_assets.errors import FlowDefinitionError, SourceError

Secret = str | dg.EnvVar

# Credentials an API may echo back: "Bearer <token>", "Authorization: ...", "X-API-Key: ...",
# "api_key=...", '"token": "..."'. The value runs to a space, quote, comma, ; & or }.
_SCHEME_TOKEN = re.compile(r"(?i)\b(Bearer|Basic|Token|Digest|Negotiate)\s+[^\s\"',;&}]+")
# The name starts a token and is bounded: a body of one endless word stays linear to scan.
_SECRET_FIELD = re.compile(
    r"(?i)(?<![A-Za-z0-9_\-])([\"']?[A-Za-z0-9_\-]{0,40}"
    r"(?:authorization|api[_\-]?key|token|secret|password|passwd|cookie|session)"
    r"[A-Za-z0-9_\-]{0,40}[\"']?\s{0,8}[:=]\s{0,8}[\"']?)"
    # A scheme word is kept: its token was masked by _SCHEME_TOKEN already.
    r"(?!(?:Bearer|Basic|Token|Digest|Negotiate)\s)[^\s\"',;&}]+"
)
# Shorter known values are not masked in free text: they would garble it, and hide nothing.
_MIN_KNOWN = 4


def _checked(secret: object, what: str) -> Secret:
    if not isinstance(secret, str) or not secret:
        raise FlowDefinitionError(f"{what} needs a non-empty string or a dagster.EnvVar.")
    return secret


def _reveal(secret: Secret, what: str) -> str:
    if not isinstance(secret, dg.EnvVar):
        return secret
    value = secret.get_value()
    if not value:
        raise SourceError(
            f"{what}: environment variable {secret.env_var_name} is not set; export it where"
            " the flow runs (Dagster code location, run worker)"
        )
    return value


class _SecretAuth(AuthBase):
    """Base class: ``__repr__`` and ``__str__`` hide the secret."""

    shown = "***"

    def secrets(self) -> list[str]:
        """The secret values this auth sends (environment variables read now)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.shown})"

    __str__ = __repr__


class BearerAuth(_SecretAuth):
    """Send ``Authorization: Bearer <token>``.

    Args:
        token: the token, or ``dagster.EnvVar("API_TOKEN")``.

    Examples:
        >>> BearerAuth("s3cret")
        BearerAuth(token=***)
    """

    shown = "token=***"

    def __init__(self, token: Secret) -> None:
        self._token = _checked(token, "BearerAuth")

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {_reveal(self._token, 'BearerAuth')}"
        return request

    def secrets(self) -> list[str]:
        return [_reveal(self._token, "BearerAuth")]


class BasicAuth(_SecretAuth):
    """HTTP basic authentication.

    Args:
        username: the user name.
        password: the password, or ``dagster.EnvVar("API_PASSWORD")``.

    Examples:
        >>> BasicAuth("reporter", "s3cret")
        BasicAuth(username='reporter', password=***)
    """

    def __init__(self, username: str, password: Secret) -> None:
        self._username = _checked(username, "BasicAuth username")
        self._password = _checked(password, "BasicAuth password")
        self.shown = f"username={username!r}, password=***"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Basic {self._encoded()}"
        return request

    def secrets(self) -> list[str]:
        return [_reveal(self._password, "BasicAuth"), self._encoded()]

    def _encoded(self) -> str:
        pair = f"{self._username}:{_reveal(self._password, 'BasicAuth')}".encode()
        return base64.b64encode(pair).decode()


class HeaderAuth(_SecretAuth):
    """Send the secret in a header of your choice, e.g. ``X-API-Key``.

    Args:
        header: the header name.
        value: its value, or ``dagster.EnvVar("API_KEY")``.

    Examples:
        >>> HeaderAuth("X-API-Key", "s3cret")
        HeaderAuth(header='X-API-Key', value=***)
    """

    def __init__(self, header: str, value: Secret) -> None:
        self._header = _checked(header, "HeaderAuth header")
        self._value = _checked(value, "HeaderAuth value")
        self.shown = f"header={header!r}, value=***"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers[self._header] = _reveal(self._value, f"HeaderAuth {self._header}")
        return request

    def secrets(self) -> list[str]:
        return [_reveal(self._value, f"HeaderAuth {self._header}")]


def secret_values(auth: object) -> list[str]:
    """The secrets ``auth`` sends (a pair's password, our auths' secrets, the headers any
    other requests auth sets), to mask where an API echoes them; [] if they cannot be had."""
    if isinstance(auth, tuple) and len(auth) == 2:
        return [str(auth[1])]
    if isinstance(auth, _SecretAuth):
        try:
            return auth.secrets()
        except SourceError:  # an unset environment variable: nothing could be sent
            return []
    if isinstance(auth, AuthBase):
        blank = requests.Request("GET", "http://auth.invalid/").prepare()
        before = dict(blank.headers)
        try:
            sent = auth(blank)
        except Exception:  # any third-party auth: masking must not turn into the error
            return []
        password = getattr(auth, "password", None)  # requests' HTTPBasicAuth, HTTPDigestAuth
        sent_values = [str(v) for k, v in sent.headers.items() if before.get(k) != v]
        return sent_values + ([password] if isinstance(password, str) else [])
    return []


def mask_credentials(text: str, known: Iterable[str] = ()) -> str:
    """``text`` with credential echoes masked: auth scheme tokens, secret-looking fields
    (``X-API-Key: ...``, ``api_key=...``, ``"token": "..."``) and the ``known`` values.

    Examples:
        >>> mask_credentials("got Authorization: Bearer tok-1, api_key=k9 and s3cret", ["s3cret"])
        'got Authorization: Bearer ***, api_key=*** and ***'
    """
    for value in sorted(set(known), key=len, reverse=True):
        if len(value) >= _MIN_KNOWN:
            text = text.replace(value, "***")
    text = _SCHEME_TOKEN.sub(r"\1 ***", text)
    return _SECRET_FIELD.sub(r"\1***", text)
