"""Image URLs: which ones a client may name, and which addresses the service may connect to for them.

Fetching a URL a client chose is a server-side request forgery risk: `http://169.254.169.254/`
reads the cloud metadata server (and its credentials), `http://10.0.0.5:6379/` reaches the
private network. So URL inputs are off unless `CLIPLENS_URL_HOSTS` names the hosts they may
name, and every fetch follows these rules:

- **What a URL may be.** `https://`, and `http://` only with `CLIPLENS_URL_ALLOW_HTTP=1`; a host
  that the allowlist names (`example.com` allows `example.com` and every host under it,
  `cdn.example.com` included, never `badexample.com`; `*` allows any host and must be written
  out); no credentials (`user:pass@`); at most `MAX_URL_BYTES`. A URL that is not one is
  `invalid_reference`; one these rules refuse, `forbidden`. The fragment is never sent.
- **Where it may lead.** The host is resolved first (`resolve`, by default the event loop's
  getaddrinfo), and the URL is refused if *any* address it resolves to is not a public unicast
  address (`refusal`): loopback, private, shared (100.64.0.0/10), link-local (169.254.169.254,
  the metadata server, is one), multicast, unspecified, reserved or documentation ranges, unique
  local (fc00::/7), and an IPv6 address that carries an IPv4 one (`::ffff:10.0.0.1`,
  `::10.0.0.1`, `64:ff9b::a00:1`) by the IPv4 address it carries. A literal address in the URL
  is checked the same way.
- **Connecting where the check looked.** The connection is made to the checked addresses only:
  the HTTP client's resolver (`PinnedResolver`) never looks a name up, it answers with the
  addresses pinned for the request (`pinned`), so a DNS answer that changes between the check and
  the connection (DNS rebinding) cannot redirect it. The Host header and the TLS server name stay
  the URL's host, so certificates are checked against it as usual.
- **Redirects** are followed by the source, not the HTTP client, at most `MAX_REDIRECTS`, each
  target checked by every rule above (scheme, allowlist, credentials, addresses) before any
  connection.

`CLIPLENS_URL_ALLOW_LOOPBACK=1`, for tests only, lets URLs reach 127.0.0.0/8 and ::1, so that a
test can serve images from a server on loopback; every other rule stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

from cliplens.vocabulary import ErrorCode, ItemError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Awaitable[Sequence[str]]]
"""(host, port) -> the IP addresses the host names, as text: the step the SSRF check looks at."""

SCHEMES = ("https://", "http://")
MAX_URL_BYTES = 4096
"""Longest URL accepted (signed URLs run to a couple of kilobytes)."""
MAX_REDIRECTS = 3
"""Redirects followed for one image; one more is refused."""
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_UNSAFE = re.compile(r"[\x00-\x20\x7f\\]")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")

_REFUSED_NETWORKS: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(network), why)
    for network, why in (
        ("0.0.0.0/8", "unspecified ('this network')"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared address space (carrier-grade NAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (where cloud metadata servers answer)"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved for IETF protocols"),
        ("192.0.2.0/24", "a documentation range"),
        ("192.88.99.0/24", "a 6to4 relay"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "a benchmarking range"),
        ("198.51.100.0/24", "a documentation range"),
        ("203.0.113.0/24", "a documentation range"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/23", "reserved for IETF protocols (Teredo included)"),
        ("2001:db8::/32", "a documentation range"),
        ("2002::/16", "6to4"),
        ("3fff::/20", "a documentation range"),
        ("5f00::/16", "segment routing"),
        ("fc00::/7", "unique local (private)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)
"""IANA's special-purpose ranges, each with what it is; Python's `is_global` is consulted
too, but its answers vary between Python versions, so the ranges are also spelled out here."""


def carried_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for: IPv4-mapped, IPv4-compatible, or NAT64's
    well-known prefix (a connection to it reaches that IPv4 address)."""
    if address in _MAPPED or address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _COMPATIBLE and int(address) > 1:  # not :: or ::1
        return ipaddress.IPv4Address(int(address))
    return None


def refusal(address: Address, allow_loopback: bool = False) -> str | None:
    """Why the service may not connect to `address` (None when it may): it must be public unicast.
    `allow_loopback` (tests only) lets 127.0.0.0/8 and ::1 through, and nothing else."""
    if isinstance(address, ipaddress.IPv6Address):
        address = ipaddress.IPv6Address(int(address))  # without its scope (fe80::1%eth0)
        inner = carried_ipv4(address)
        if inner is not None:
            why = refusal(inner, allow_loopback)
            return None if why is None else f"{why} (it carries {inner})"
    if allow_loopback and address.is_loopback:
        return None
    for network, why in _REFUSED_NETWORKS:
        if address.version == network.version and address in network:
            return why
    if address.is_multicast or address.is_reserved or not address.is_global:
        return "not a public address"
    return None


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to now (the event loop's getaddrinfo, TCP only)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def normalise_host(host: str) -> str:
    """A host as compared with the allowlist: lower case, no brackets, no trailing dot, a Unicode
    name in its IDNA form, an IP address in its canonical form."""
    host = host.strip().lower().strip("[]").rstrip(".")
    if not host.isascii():  # an allowlist entry in Unicode: compared in the URL's (IDNA) form
        with contextlib.suppress(UnicodeError):
            host = host.encode("idna").decode("ascii")
    literal = _literal(host)
    return host if literal is None else literal.compressed


def redacted(url: yarl.URL) -> str:
    """The URL as logs, traces and error messages show it: without credentials, query or fragment
    (a signed URL's query is a credential)."""
    return str(url.with_user(None).with_query(None).with_fragment(None))


@dataclass(frozen=True, slots=True)
class Target:
    """A URL that passed the checks that need no network: what to fetch and where it may go."""

    url: yarl.URL
    host: str
    """Normalised (`normalise_host`)."""
    port: int
    literal: Address | None
    """The host, when the URL names an address rather than a name."""


@dataclass(frozen=True)
class UrlPolicy:
    """The rules of the module docstring, under the service's settings."""

    hosts: tuple[str, ...]
    """`CLIPLENS_URL_HOSTS`; empty = URL inputs are off."""
    allow_http: bool = False
    allow_loopback: bool = False
    _entries: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_entries", frozenset(normalise_host(h) for h in self.hosts if h.strip()))

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def check(self, url: str | yarl.URL) -> Target:
        """Everything but the addresses: scheme, syntax, credentials, allowlist. Raises
        `invalid_reference` for a URL that is not one, `forbidden` for one the rules refuse."""
        text = str(url)
        if len(text) > MAX_URL_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_URL_BYTES:
            raise ItemError(ErrorCode.INVALID_REFERENCE, f"the URL is longer than {MAX_URL_BYTES} bytes")
        if _UNSAFE.search(text):
            raise ItemError(ErrorCode.INVALID_REFERENCE, "the URL contains spaces, control characters or \\")
        try:
            parsed = url if isinstance(url, yarl.URL) else yarl.URL(url)
            port = parsed.port
        except (ValueError, TypeError, UnicodeError) as exc:
            raise ItemError(ErrorCode.INVALID_REFERENCE, f"the URL cannot be parsed: {exc}") from None
        scheme = parsed.scheme.lower()
        if scheme not in ("https", "http") or not parsed.raw_host or port is None or not parsed.is_absolute():
            raise ItemError(ErrorCode.INVALID_REFERENCE, "an image URL must look like https://host/path")
        if not self.enabled:
            raise ItemError(
                ErrorCode.FORBIDDEN, "image URLs are off in this service (CLIPLENS_URL_HOSTS is not set)"
            )
        if scheme == "http" and not self.allow_http:
            raise ItemError(
                ErrorCode.FORBIDDEN,
                "http:// URLs are refused; use https:// (or set CLIPLENS_URL_ALLOW_HTTP=1)",
            )
        if parsed.raw_user is not None or parsed.raw_password is not None:
            raise ItemError(ErrorCode.FORBIDDEN, "URLs with credentials (user:password@) are refused")
        host = normalise_host(parsed.raw_host)
        literal = _literal(host)
        if literal is None:
            labels = host.split(".")
            if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
                raise ItemError(ErrorCode.INVALID_REFERENCE, f"{parsed.raw_host!r} is not a valid host name")
            if _NUMERIC_LABEL.match(labels[-1]):  # 127.1, 0x7f.1, 2130706433: IPv4 in disguise
                raise ItemError(ErrorCode.INVALID_REFERENCE, f"{host!r} is not a canonical IP address")
        if not self._allows(host, literal):
            raise ItemError(
                ErrorCode.FORBIDDEN, f"host {host!r} is not in the allowed hosts (CLIPLENS_URL_HOSTS)"
            )
        return Target(parsed.with_fragment(None), host, port, literal)

    def _allows(self, host: str, literal: Address | None) -> bool:
        if "*" in self._entries or host in self._entries:
            return True
        if literal is not None:  # an address matches itself only, never as a "suffix"
            return False
        return any(host.endswith("." + entry) for entry in self._entries)

    def refuse(self, host: str, address: str) -> None:
        """Raise `forbidden` unless the service may connect to `address` (which `host` named)."""
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            raise ItemError(
                ErrorCode.FORBIDDEN, f"{host} resolved to {address!r}, not an IP address"
            ) from None
        why = refusal(parsed, self.allow_loopback)
        if why is not None:
            named = "is" if _literal(host) is not None else f"resolves to {address}, which is"
            raise ItemError(
                ErrorCode.FORBIDDEN, f"{host} {named} {why}: URLs may only reach public addresses"
            )

    async def addresses(self, target: Target, resolve: Resolve) -> tuple[str, ...]:
        """The checked addresses to connect to for `target`: its literal, or every address its host
        resolves to now, each of which must pass (`forbidden` names the first that does not).
        A resolver's failure (OSError) is left to the caller."""
        if target.literal is not None:
            self.refuse(target.host, target.literal.compressed)
            return (target.literal.compressed,)
        found = tuple(dict.fromkeys(await resolve(target.host, target.port)))
        if not found:
            raise ItemError(ErrorCode.NOT_FOUND, f"{target.host} resolves to no address")
        for address in found:
            self.refuse(target.host, address)
        return found


@dataclass(frozen=True, slots=True)
class _Pin:
    host: str
    addresses: tuple[str, ...]


_PINNED: ContextVar[_Pin | None] = ContextVar("cliplens_url_pinned", default=None)


@contextlib.contextmanager
def pinned(host: str, addresses: Sequence[str]) -> Iterator[None]:
    """While inside, a `PinnedResolver` called from this task answers `host` with `addresses`."""
    token = _PINNED.set(_Pin(normalise_host(host), tuple(addresses)))
    try:
        yield
    finally:
        _PINNED.reset(token)


class PinnedResolver(AbstractResolver):
    """The resolver of the URL session: it never looks a name up. It answers only for the host
    `pinned` for the calling task, with the addresses checked for it; any other name fails (the
    connection fails closed). aiohttp calls it in the requesting task when its DNS cache is off
    (`use_dns_cache=False`), and never for a literal address, which the check saw as such."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        pin = _PINNED.get()
        if pin is None or pin.host != normalise_host(host):
            raise OSError(f"no checked address for {host!r}")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for address in pin.addresses
        ]

    async def close(self) -> None:
        return None
