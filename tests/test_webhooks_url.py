"""Webhook URL validation: what the service can call back passes; everything else is
refused before any request, with an error naming ``webhook`` and the reason."""

from __future__ import annotations

from typing import Any

import pytest

import apimart_async as am
from apimart_async import AsyncApimart
from apimart_async.models import known_models, parse_request
from apimart_async.testing import FakeApimart
from apimart_async.webhooks import validate_webhook_url

GEM = "gemini-3-pro-image-preview"
UNREACHABLE = "must be a public URL the service can reach; "

ACCEPTED = [
    "https://example.com/hooks",
    "https://example.com",
    "https://example.com/",
    "http://example.com/hooks/apimart",
    "https://hooks.example.com:443/cb",
    "http://hooks.example.com:80/cb",
    "http://hooks.example.com:443/cb",  # the port rule is about the number only
    "HTTPS://Hooks.Example.COM/Path",
    "https://example.com./hooks",  # a fully qualified name
    "https://my_host.example.com/x",
    "https://xn--bcher-kva.example/x",
    "https://bücher.example/x",
    "https://example.com/p%20ath/ü",
    "https://8.8.8.8/hooks",
    "https://172.32.0.1/x",  # just outside 172.16.0.0/12
    "https://100.128.0.1/x",  # just outside 100.64.0.0/10
    "https://[2606:4700:4700::1111]/x",
    "https://[::ffff:8.8.8.8]/x",  # a public IPv4 in IPv6 form
    "https://notapimart.ai/x",
    "https://apimart.ai.example.com/x",
    "https://localhost.example.com/x",
    "https://hooks.test/x",  # RFC 2606 test names pass on purpose
]

REFUSED: list[tuple[str, str]] = [
    # not an absolute http(s) URL
    ("ftp://example.com/x", "must be an absolute http(s) URL"),
    ("ws://example.com/x", "must be an absolute http(s) URL"),
    ("example.com/hooks", "must be an absolute http(s) URL"),
    ("//example.com/hooks", "must be an absolute http(s) URL"),
    ("https:///hooks", "must be an absolute http(s) URL"),
    ("https:example.com", "must be an absolute http(s) URL"),
    ("", "must be an absolute http(s) URL"),
    ("http://[::1/", "must be an absolute http(s) URL"),
    ("https://example.com/a b", "without spaces or control characters"),
    ("https://example.com/\nx", "without spaces or control characters"),
    (" https://example.com", "without spaces or control characters"),
    ("https://example.com/\ud800", "lone surrogate"),
    ("https://:443/x", "must name a host"),
    # around the host
    ("https://user:secret@example.com/x", "must not contain credentials"),
    ("https://user@example.com/x", "must not contain credentials"),
    ("https://example.com/x#frag", "must not have a #fragment"),
    ("https://example.com/x#", "must not have a #fragment"),
    ("https://example.com/x?token=1", "must not have a ?query"),
    ("https://example.com:8443/x", "must use port 80 or 443"),
    ("http://example.com:8080/x", "must use port 80 or 443"),
    ("https://example.com:0/x", "must use port 80 or 443"),
    ("https://example.com:99999/x", "must use port 80 or 443"),
    ("https://example.com:https/x", "must use port 80 or 443"),
    # loopback, private, link-local, unique-local, special-purpose addresses
    ("http://localhost/x", UNREACHABLE + "'localhost' is a loopback host"),
    ("http://LOCALHOST./x", UNREACHABLE + "'localhost.' is a loopback host"),
    ("http://api.localhost/x", UNREACHABLE + "'api.localhost' is a loopback host"),
    ("http://127.0.0.1/x", UNREACHABLE + "'127.0.0.1' is a loopback address"),
    ("http://127.10.20.30:80/x", UNREACHABLE + "'127.10.20.30' is a loopback address"),
    ("http://[::1]/x", UNREACHABLE + "'::1' is a loopback address"),
    ("http://0.0.0.0/x", UNREACHABLE + "'0.0.0.0' is the unspecified address"),
    ("http://[::]/x", UNREACHABLE + "'::' is the unspecified address"),
    ("http://10.0.0.8/x", UNREACHABLE + "'10.0.0.8' is a private address"),
    ("http://172.16.0.1/x", UNREACHABLE + "'172.16.0.1' is a private address"),
    ("http://172.31.255.254/x", UNREACHABLE + "'172.31.255.254' is a private address"),
    ("http://192.168.1.20/x", UNREACHABLE + "'192.168.1.20' is a private address"),
    ("http://100.64.1.1/x", UNREACHABLE + "'100.64.1.1' is a carrier-grade NAT address"),
    ("http://169.254.169.254/latest", UNREACHABLE + "'169.254.169.254' is a link-local"),
    ("http://[fe80::1]/x", UNREACHABLE + "'fe80::1' is a link-local address"),
    ("http://[fe80::1%25eth0]/x", UNREACHABLE + "'fe80::1%25eth0' is a link-local address"),
    ("http://[fd12:3456::1]/x", UNREACHABLE + "'fd12:3456::1' is a unique-local address"),
    ("http://[fc00::1]/x", UNREACHABLE + "'fc00::1' is a unique-local address"),
    ("http://[fec0::1]/x", UNREACHABLE + "'fec0::1' is a site-local address"),
    ("http://224.0.0.251/x", UNREACHABLE + "'224.0.0.251' is a multicast address"),
    ("http://[ff02::1]/x", UNREACHABLE + "'ff02::1' is a multicast address"),
    ("http://240.0.0.1/x", UNREACHABLE + "'240.0.0.1' is a reserved address"),
    ("http://192.0.2.10/x", UNREACHABLE + "'192.0.2.10' is a special-purpose address"),
    ("http://[2001:db8::1]/x", UNREACHABLE + "'2001:db8::1' is a special-purpose address"),
    # IPv4 hidden in IPv6
    ("http://[::ffff:127.0.0.1]/x", "'::ffff:127.0.0.1' is 127.0.0.1 (a loopback address)"),
    ("http://[::ffff:a00:1]/x", "'::ffff:a00:1' is 10.0.0.1 (a private address)"),
    ("http://[2002:c0a8:101::]/x", "'2002:c0a8:101::' is 192.168.1.1 (a private address)"),
    ("http://[64:ff9b::7f00:1]/x", "'64:ff9b::7f00:1' is 127.0.0.1 (a loopback address)"),
    # IPv4 in spellings other resolvers accept
    ("http://2130706433/x", UNREACHABLE + "'2130706433' means 127.0.0.1, a loopback address"),
    ("http://0x7f.1/x", UNREACHABLE + "'0x7f.1' means 127.0.0.1, a loopback address"),
    ("http://0177.0.0.1/x", UNREACHABLE + "'0177.0.0.1' means 127.0.0.1"),
    ("http://10.1/x", UNREACHABLE + "'10.1' means 10.0.0.1, a private address"),
    ("http://134744072/x", "non-standard spelling of the IPv4 address 8.8.8.8; write 8.8.8.8"),
    ("http://8.8.8.010/x", "non-standard spelling of the IPv4 address 8.8.8.8"),
    ("http://999.1.1.1/x", "is not a valid domain name (its last label is a number)"),
    # names no public resolver answers for
    ("http://intranet/x", UNREACHABLE + "'intranet' is a single-label name"),
    ("http://printer.local/x", UNREACHABLE + "'printer.local' is a local-network (mDNS) name"),
    ("http://api.internal/x", UNREACHABLE + "'api.internal' is a private-use (.internal)"),
    ("http://nas.home.arpa/x", UNREACHABLE + "'nas.home.arpa' is a home-network name"),
    ("http://a.invalid/x", UNREACHABLE + "'a.invalid' is a reserved name that never resolves"),
    ("http://abc.onion/x", UNREACHABLE + "'abc.onion' is a Tor onion name"),
    # APIMart itself (apimart-api.md §1 and §6.4)
    ("https://apimart.ai/x", "must not point at APIMart itself; 'apimart.ai' is an APIMart host"),
    ("https://api.apimart.ai/hooks", "'api.apimart.ai' is an APIMart host"),
    ("https://upload.apimart.ai/x", "'upload.apimart.ai' is an APIMart host"),
    ("https://API.APIMART.AI./x", "'api.apimart.ai.' is an APIMart host"),
    ("https://mcp.apimart.asia/x", "'mcp.apimart.asia' is an APIMart host"),
    ("https://api.apib.ai/x", "'api.apib.ai' is an APIMart host"),
    ("https://api.aiuxu.com/x", "'api.aiuxu.com' is an APIMart host"),
    ("https://upload.aishuch.com/x", "'upload.aishuch.com' is an APIMart host"),
    ("https://ａｐｉｍａｒｔ。ai/x", "is an APIMart host"),  # full-width, ideographic dot
    # malformed hosts
    ("http://%6c%6fcalhost/x", "host '%6c%6fcalhost' must not be percent-encoded"),
    ("http://exa<mple>.com/x", "host 'exa<mple>.com' is not a valid domain name"),
    ("http://a..b.example.com/x", "is not a valid domain name"),
    ("http://" + "a" * 64 + ".example.com/x", "is not a valid domain name"),
    ("http://[v1.example]/x", "'v1.example' in brackets is not an IPv6 address"),
]


@pytest.mark.parametrize("url", ACCEPTED)
def test_reachable_urls_are_accepted_unchanged(url: str) -> None:
    """Public http(s) URLs on 80/443 pass, as given (the service normalises slashes)."""
    assert validate_webhook_url(url) == url
    assert parse_request(model=GEM, prompt="a fox", webhook=url).to_body()["webhook"] == url


@pytest.mark.parametrize(("url", "fragment"), REFUSED)
def test_unreachable_urls_are_refused_naming_webhook_and_why(url: str, fragment: str) -> None:
    """The standalone check and the request models give the same reason."""
    with pytest.raises(am.InvalidRequestError) as info:
        validate_webhook_url(url)
    message = str(info.value)
    assert message.startswith("webhook: ") and fragment in message
    assert info.value.errors == [("webhook", message.removeprefix("webhook: "))]

    with pytest.raises(am.InvalidRequestError) as info:
        parse_request(model=GEM, prompt="a fox", webhook=url)
    assert f"{GEM}: webhook: " in str(info.value) and fragment in str(info.value)
    assert [field for field, _ in info.value.errors] == ["webhook"]


def test_the_documented_example_message() -> None:
    """The exact wording for the most common mistake."""
    with pytest.raises(am.InvalidRequestError) as info:
        parse_request(model=GEM, prompt="a fox", webhook="http://localhost/x")
    assert str(info.value) == (
        f"{GEM}: webhook: must be a public URL the service can reach; "
        "'localhost' is a loopback host"
    )


@pytest.mark.parametrize("model", known_models())
def test_every_model_checks_its_webhook(model: str) -> None:
    """The field lives on the shared base model: every family refuses the same URL."""
    with pytest.raises(am.InvalidRequestError, match="webhook: must be a public URL"):
        parse_request(model=model, prompt="p", webhook="http://192.168.0.10/hooks")


def test_raw_requests_check_the_webhook_too() -> None:
    """The escape hatch for unknown models still refuses an unreachable webhook."""
    with pytest.raises(am.InvalidRequestError, match="webhook: must be a public URL"):
        parse_request(model="new-model", prompt="p", webhook="http://[::1]/", allow_unknown=True)


def test_the_field_name_and_non_strings() -> None:
    """Callers name the field (a CLI option, a constructor argument); wrong types say so."""
    with pytest.raises(am.InvalidRequestError, match=r"^--webhook-public-url: must use port"):
        validate_webhook_url("https://example.com:8000", field="--webhook-public-url")
    with pytest.raises(am.InvalidRequestError, match=r"^webhook: must be a string \(got 5 of"):
        validate_webhook_url(5)
    with pytest.raises(am.InvalidRequestError, match=r"webhook: must be a string"):
        parse_request(model=GEM, prompt="p", webhook=b"https://example.com")


def test_a_huge_url_is_not_echoed_whole() -> None:
    """Messages quote a bounded excerpt of a hostile URL."""
    url = "ftp://" + "x" * 100_000
    with pytest.raises(am.InvalidRequestError) as info:
        validate_webhook_url(url)
    assert len(str(info.value)) < 200


@pytest.mark.anyio
@pytest.mark.parametrize(
    "webhook",
    ["http://localhost/x", "https://api.apimart.ai/cb", "https://example.com:8443/x"],
)
async def test_submit_generate_and_generate_many_refuse_before_any_request(
    client: AsyncApimart, fake: FakeApimart, webhook: str
) -> None:
    """The error surfaces from every entry point, and nothing reaches the service."""
    request: dict[str, Any] = {"model": GEM, "prompt": "a fox", "webhook": webhook}
    for call in (client.submit, client.generate):
        with pytest.raises(am.InvalidRequestError, match="webhook: "):
            await call(**request)
        with pytest.raises(am.InvalidRequestError, match="webhook: "):
            await call(request)
    good = {"model": GEM, "prompt": "a fox", "webhook": "https://example.com/hooks/t"}
    async with client.generate_many([request, good]) as outcomes:
        results = sorted([o async for o in outcomes], key=lambda o: o.index)
    assert isinstance(results[0].error, am.InvalidRequestError)
    assert "webhook: " in str(results[0].error)
    assert results[1].ok
    # Only the good job talked to the service, and it sent its webhook.
    submits = [r for r in fake.requests if r.endpoint == "submit"]
    assert len(submits) == 1 and submits[0].json_body is not None
    assert submits[0].json_body["webhook"] == good["webhook"]
