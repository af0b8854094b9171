"""Which URLs a webhook may be sent to: checked when it is registered and again at every
delivery (a name may resolve elsewhere by then).

A URL is refused unless its scheme is ``http`` or ``https``, it names a host, carries no
credentials, and EVERY address its host resolves to is public: not loopback, private,
link-local, multicast, unspecified, reserved or otherwise not globally routable (an
IPv4-mapped IPv6 address counts as the IPv4 address it maps). The deployment's allow-list
(``webhook_allow_hosts``: host names, addresses or CIDRs) lifts the rule for the hosts or
addresses it names (tests allow their loopback receiver).

The delivery connects to the addresses checked here, never to a fresh lookup of the name
(:attr:`CheckedUrl.addresses`), so a name cannot be re-pointed between check and connect.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UrlRefused(ValueError):
    """The URL breaks a rule; the message names the field (``url``) and the rule."""


@dataclass(frozen=True)
class CheckedUrl:
    url: str
    scheme: str
    #: The host as written (a name, or an address without brackets), lower-case.
    host: str
    port: int
    #: Path and query, as the request line sends them (``/`` when the URL has no path).
    target: str
    #: Every address ``host`` resolved to, each allowed: connect to these, not to ``host``.
    addresses: tuple[str, ...]


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (tests replace this to play a DNS change)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(info[4][0] for info in infos))


def refusal(address: IPAddress) -> str | None:
    """Why ``address`` may not receive webhooks, or None for a public address."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    for rule, refused in (
        ("a loopback address", address.is_loopback),
        ("a link-local address", address.is_link_local),
        ("the unspecified address", address.is_unspecified),
        ("a multicast address", address.is_multicast),
        ("a private address", address.is_private),
        ("a reserved address", address.is_reserved),
        ("not a globally routable address", not address.is_global),
    ):
        if refused:
            return rule
    return None


def _allowed(host: str, address: IPAddress, allow: Iterable[str]) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    for entry in allow:
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry.strip("[]") == host:
            return True
        try:
            network = ipaddress.ip_network(entry.strip("[]"), strict=False)
        except ValueError:
            continue  # a host name that is not this one
        if address in network or (mapped is not None and mapped in network):
            return True
    return False


def _parse(url: str) -> tuple[str, str, int, str]:
    if not isinstance(url, str) or not url:
        raise UrlRefused("url: must be a non-empty string")
    if len(url) > MAX_URL_LENGTH:
        raise UrlRefused(f"url: at most {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise UrlRefused("url: must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise UrlRefused(f"url: not a valid URL ({err})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlRefused(f"url: the scheme must be http or https, not {parts.scheme or 'none'!r}")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("url: must not carry credentials (user:password@); requests are signed")
    host = (parts.hostname or "").lower()
    if not host:
        raise UrlRefused("url: must name a host")
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        raise UrlRefused("url: the host must be ASCII (IDNA-encode it: xn--...)") from None
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    return scheme, host, port or (443 if scheme == "https" else 80), target


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None  # a name


def _addresses(host: str, port: int) -> list[IPAddress]:
    literal = _literal(host)
    if literal is not None:
        return [literal]
    try:
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolve(host, port)]
    except (OSError, UnicodeError) as err:
        raise UrlRefused(f"url: the host {host!r} does not resolve ({err})") from None
    if not addresses:
        raise UrlRefused(f"url: the host {host!r} resolves to no address")
    return addresses


def check_url(url: str, allow: Iterable[str] = ()) -> CheckedUrl:
    """``url`` checked and resolved, or :class:`UrlRefused` saying which rule it breaks."""
    scheme, host, port, target = _parse(url)
    allow = list(allow)
    addresses = _addresses(host, port)
    for address in addresses:
        rule = refusal(address)
        if rule is not None and not _allowed(host, address, allow):
            literal = len(addresses) == 1 and _literal(host) == address
            shown = host if literal else f"{host!r} resolves to {address}, which"
            raise UrlRefused(
                f"url: {shown} is {rule}; webhooks go to public addresses only "
                "(an operator may allow it in FVB_WEBHOOK_ALLOW_HOSTS)"
            )
    return CheckedUrl(url, scheme, host, port, target, tuple(str(a) for a in addresses))
