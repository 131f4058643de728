"""The branches of ``network_error`` that a loopback server cannot stage.

``tests/test_transport.py`` drives every failure a socket can produce through the real
transports; these few exceptions never come from a loopback peer (a URL aiohttp refuses
before connecting, aiohttp's per-read timeout, an unsupported scheme, something that is
not a network error at all), so they are mapped here directly. What matters in each is
``sent``: whether a paid submit may have reached the service.
"""

from __future__ import annotations

import httpx
import pytest

from apimart_async import APIConnectionError, APITimeoutError
from apimart_async._transport import network_error

URL = "https://api.apimart.ai/v1/images/generations"


def test_an_invalid_url_never_left_and_is_not_retried() -> None:
    aiohttp = pytest.importorskip("aiohttp")
    error = network_error(aiohttp.InvalidURL(URL), "POST", URL)
    assert isinstance(error, APIConnectionError)
    assert error.sent is False and error.retryable is False


def test_an_aiohttp_read_timeout_was_sent() -> None:
    aiohttp = pytest.importorskip("aiohttp")
    error = network_error(aiohttp.ServerTimeoutError("read timed out"), "POST", URL)
    assert isinstance(error, APITimeoutError)
    assert error.sent is True and error.retryable is True


def test_an_unsupported_scheme_is_not_retried_and_says_so() -> None:
    error = network_error(httpx.UnsupportedProtocol("no ftp"), "GET", "ftp://x/y")
    assert isinstance(error, APIConnectionError)
    assert error.retryable is False and str(error).endswith("(not retried)")


def test_anything_else_is_not_a_network_error() -> None:
    assert network_error(ValueError("not ours to map"), "GET", URL) is None
