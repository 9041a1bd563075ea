"""HTTP authentication whose secrets come from Dagster ``EnvVar``s and never show up.

A secret is a plain string or a ``dagster.EnvVar``; an ``EnvVar`` is read at request time,
so definitions load without it and the UI shows the variable's name, never its value.
"""

from __future__ import annotations

import base64

import dagster as dg
import requests
from requests.auth import AuthBase

from flow_assets.errors import FlowDefinitionError, SourceError

Secret = str | dg.EnvVar


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
        pair = f"{self._username}:{_reveal(self._password, 'BasicAuth')}".encode()
        request.headers["Authorization"] = f"Basic {base64.b64encode(pair).decode()}"
        return request


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
