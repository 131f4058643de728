"""Which ``webhook`` URLs the service can call back, checked before any request.

APIMart silently drops a webhook it will not call (apimart-api.md §6.4: it must be
public, http(s), port 80 or 443, and not an APIMart domain), so a bad URL would only
show up as callbacks that never come. We refuse such URLs up front, with the reason:

- not an absolute http(s) URL, or one with whitespace or control characters;
- credentials (``user:pass@``): the service would store them and send them on every
  call; the receiver's secret path token is the protection to use instead;
- a ``#fragment`` or a ``?query``: the service appends ``/callback`` to the URL, which
  would land inside the fragment or the query;
- a port other than 80 or 443 (or none);
- a host the service cannot or will not reach: APIMart's own domains; ``localhost``
  and other special-use names (``.local``, ``.internal``, ``.home.arpa``, ``.invalid``,
  ``.onion``); single-label names; IP literals that are not globally routable
  (loopback, private, link-local, unique-local, CGNAT, documentation, multicast,
  reserved; judged by ``ipaddress``, including IPv4 addresses embedded in IPv6
  ``::ffff:…``, 6to4 and NAT64); IPv4 addresses in non-dotted spellings
  (``2130706433``, ``0x7f.1``); percent-encoded or malformed host names.

Only the URL's text is checked: no DNS lookup, so a public name that resolves to a
private address is not caught (the service will not reach it either, and says nothing).
The RFC 2606 test names (``example.com``, ``.example``, ``.test``) pass on purpose, so
tests and documentation can use them.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import SplitResult, urlsplit

from ._exceptions import InvalidRequestError

__all__ = ["validate_webhook_url", "webhook_url_problem"]

# APIMart's own registrable domains (apimart-api.md §1): the main line, its China-friendly
# mirror, the two alternative lines with the same API (NOTE-V probed all four), and the
# domain of its MCP server (apimart-skills). A callback to any of them is a mistake or an
# attempt to make the service call itself; §6.4 says the service drops those anyway.
_APIMART_DOMAINS = ("apimart.ai", "apimart.asia", "apib.ai", "aiuxu.com", "aishuch.com")

# Special-use names no public resolver answers for (RFC 6761, 6762, 8375, 7686; ICANN
# reserved .internal for private use in 2024), by suffix, with what to call them.
_SPECIAL_NAMES = {
    "localhost": "a loopback host",
    "local": "a local-network (mDNS) name",
    "internal": "a private-use (.internal) name",
    "home.arpa": "a home-network name",
    "invalid": "a reserved name that never resolves",
    "onion": "a Tor onion name",
}

_PRIVATE_V4 = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
_SHARED_V4 = ipaddress.IPv4Network("100.64.0.0/10")
_UNIQUE_LOCAL_V6 = ipaddress.IPv6Network("fc00::/7")
_NAT64_V6 = ipaddress.IPv6Network("64:ff9b::/96")

# Letters, digits, hyphen, underscore; hyphen placement is not policed (DNS does that).
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_BAD_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")
_SHOW_LIMIT = 60

_UNREACHABLE = "must be a public URL the service can reach"


def validate_webhook_url(url: object, *, field: str = "webhook") -> str:
    """Return *url* unchanged if the service can call it back, else raise.

    The check behind the request models' ``webhook`` field and
    ``WebhookReceiver(public_url=...)``; usable on its own (e.g. for a CLI option).
    Nothing here does I/O.

    Raises:
        InvalidRequestError: naming *field* and the reason, e.g. ``webhook: must be a
            public URL the service can reach; 'localhost' is a loopback host``.
    """
    problem: str | None
    if not isinstance(url, str):
        problem = f"must be a string (got {_show(url)} of type {type(url).__name__})"
    else:
        problem = webhook_url_problem(url)
    if problem is None:
        return str(url)
    raise InvalidRequestError(f"{field}: {problem}", errors=[(field, problem)])


def webhook_url_problem(url: str) -> str | None:
    """Why the service could not call *url* back (a message without the field name).

    ``None`` means acceptable. See the module docstring for the rules.
    """
    if _BAD_CHARS.search(url):
        return f"must be a URL without spaces or control characters (got {_show(url)})"
    try:
        url.encode()
        parts = urlsplit(url)
    except UnicodeEncodeError:
        return "contains a lone surrogate, which cannot be sent as UTF-8"
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return f"must be an absolute http(s) URL (got {_show(url)})"
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return f"must be an absolute http(s) URL (got {_show(url)})"
    return _structure_problem(url, parts) or _host_problem(parts)


def _structure_problem(url: str, parts: SplitResult) -> str | None:
    """Credentials, fragment, query and port: the parts around the host."""
    if "@" in parts.netloc:
        return (
            "must not contain credentials (user:password@): the service would store them "
            "and send them on every callback; WebhookReceiver's secret path token is the "
            "protection to use"
        )
    if "#" in url:
        return "must not have a #fragment: the service appends /callback to the URL"
    if "?" in url:
        return "must not have a ?query: the service appends /callback to the URL"
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port not in (None, 80, 443):
        # §6.4: any other port makes the service drop the webhook silently.
        return f"must use port 80 or 443; the service silently ignores others (got {_show(url)})"
    return None


def _host_problem(parts: SplitResult) -> str | None:
    host = parts.hostname or ""
    bracketed = parts.netloc.rpartition("@")[2].startswith("[")
    if not host:
        return f"must name a host (got {_show(parts.geturl())})"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if bracketed:
            return f"{host!r} in brackets is not an IPv6 address"
        return _name_problem(host)
    kind = _ip_kind(ip)
    return f"{_UNREACHABLE}; {host!r} is {kind}" if kind else None


def _name_problem(host: str) -> str | None:
    """A DNS name: syntax, special-use names, APIMart's domains, numeric spellings."""
    if "%" in host:
        return f"host {_show(host)} must not be percent-encoded"
    name = host.removesuffix(".")
    if not name.isascii():
        try:
            # IDNA maps full-width letters and ideographic dots, so "ａｐｉｍａｒｔ。ai"
            # is recognised as the domain it will resolve as.
            name = name.encode("idna").decode("ascii").lower()
        except UnicodeError:
            return f"host {_show(host)} is not a valid domain name"
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return f"host {_show(host)} is not a valid domain name"
    for suffix, kind in _SPECIAL_NAMES.items():
        if name == suffix or name.endswith("." + suffix):
            return f"{_UNREACHABLE}; {host!r} is {kind}"
    for domain in _APIMART_DOMAINS:
        if name == domain or name.endswith("." + domain):
            return (
                f"must not point at APIMart itself; {host!r} is an APIMart host "
                "(the service drops such webhooks)"
            )
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        return _numeric_host_problem(host, name)
    if len(labels) == 1:
        return f"{_UNREACHABLE}; {host!r} is a single-label name, not a public domain"
    return None


def _numeric_host_problem(host: str, name: str) -> str:
    """A name ending in a number is no domain; many resolvers read it as IPv4 (inet_aton)."""
    try:
        ip = ipaddress.IPv4Address(socket.inet_aton(name))
    except OSError:
        return f"host {_show(host)} is not a valid domain name (its last label is a number)"
    kind = _ip_kind(ip)
    if kind:
        return f"{_UNREACHABLE}; {host!r} means {ip}, {kind}"
    return f"host {host!r} is a non-standard spelling of the IPv4 address {ip}; write {ip}"


def _ip_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What makes *ip* unreachable from the internet, or ``None`` if it is global."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64_V6:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            kind = _ip_kind(embedded)
            return f"{embedded} ({kind})" if kind else None
        if ip.is_site_local:  # deprecated fec0::/10; ipaddress does not count it private
            return "a site-local address"
        if ip in _UNIQUE_LOCAL_V6:
            return "a unique-local address"
    elif any(ip in net for net in _PRIVATE_V4):
        return "a private address"
    elif ip in _SHARED_V4:
        return "a carrier-grade NAT address"
    checks = (
        (ip.is_loopback, "a loopback address"),
        (ip.is_unspecified, "the unspecified address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_reserved, "a reserved address"),
        (not ip.is_global, "a special-purpose address, not routed on the internet"),
    )
    return next((kind for hit, kind in checks if hit), None)


def _show(value: object) -> str:
    """A short repr for messages (a hostile URL may be huge)."""
    text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 1] + "…"
