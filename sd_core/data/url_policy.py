"""Which image URLs the pipeline may fetch: ``http``/``https`` to public addresses, nothing else.

Metadata is input we do not control: a row with ``file:///etc/passwd``, a ``data:`` URI, or
``http://127.0.0.1:PORT/`` / ``http://169.254.169.254/`` (a service on this host or the cloud metadata
endpoint) would otherwise be fetched by img2dataset and its bytes written into a shard tar. The policy is
applied twice:

- where metadata enters (`sd_core.data.filter`, its own funnel stage ``url_policy``): a cheap syntactic check
  with no DNS: the scheme, an IP-literal host (every form the C resolver accepts: ``127.1``, ``2130706433``,
  ``0x7f.1``, ``[::ffff:127.0.0.1]``) and ``localhost`` names (`UrlPolicy.url_refusal`);
- at download time, in img2dataset's processes (`sd_core.data.download_guard`): the same check for every
  request, redirects included, and the address every socket actually connects to, after DNS resolution
  (`UrlPolicy.address_refusal`), so a public name resolving to a private address is refused too.

Refused: loopback, link-local, private, unspecified, multicast, reserved and otherwise non-global addresses,
IPv4 and IPv6, including IPv4 addresses embedded in IPv6 (IPv4-mapped ``::ffff:a.b.c.d``, 6to4, Teredo).
Exceptions only by an explicit allow-list (`sd_core.config.FilterConfig.allow_hosts`; `parse_allow_entry`
lists the accepted forms). Refusal messages start with `REFUSAL_PREFIX`, so they can be counted wherever
they surface (img2dataset's per-row ``error_message``).
"""

from __future__ import annotations

import ipaddress
import socket
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unwrap, urlsplit

if TYPE_CHECKING:
    import duckdb

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
REFUSAL_PREFIX = "url policy"

# Dots that IDNA treats as label separators (a host written with them resolves like one with ".").
_IDNA_DOTS = ("\u3002", "\uff0e", "\uff61")


@dataclass(frozen=True)
class AllowedHost:
    """One allow-list entry: a host name (lower case, no trailing dot) or an IP network, and optionally a
    port (None: any port)."""

    name: str | None
    network: IPNetwork | None
    port: int | None

    def matches_name(self, host: str, port: int | None) -> bool:
        return self.name is not None and self.name == host and self.port in (None, port)

    def matches_address(self, ip: IPAddress, port: int | None) -> bool:
        return (self.network is not None and ip.version == self.network.version and ip in self.network
                and self.port in (None, port))


def parse_allow_entry(entry: str) -> AllowedHost:
    """Parse one allow-list entry; `ValueError` saying what is wrong with it.

    Forms: ``name``, ``name:port``, ``1.2.3.4``, ``1.2.3.4:port``, ``10.0.0.0/8`` (a network, any port),
    ``[::1]``, ``[::1]:port``, ``fd00::/8``. A name matches the URL's host exactly (no wildcard); at connect
    time it also allows the addresses the name resolves to when the download starts.
    """
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"allow-list entry {entry!r} is not a host name or address")
    text = entry.strip().lower()
    if "/" in text:
        try:
            return AllowedHost(None, ipaddress.ip_network(text, strict=False), None)
        except ValueError as e:
            raise ValueError(f"allow-list entry {entry!r} is not an IP network: {e}") from None
    host, port = _split_host_port(entry, text)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not host or any(c in host for c in "@/?#[]\\ %"):
            raise ValueError(f"allow-list entry {entry!r} is not a host name or address") from None
        return AllowedHost(host.rstrip("."), None, port)
    return AllowedHost(None, ipaddress.ip_network(ip), port)


def _split_host_port(entry: str, text: str) -> tuple[str, int | None]:
    """``host[:port]`` / ``[v6][:port]`` / a bare IPv6 address → (host, port)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"allow-list entry {entry!r}: expected [IPv6] or [IPv6]:port")
        return host, _port(entry, rest[1:]) if rest else None
    if text.count(":") > 1:  # a bare IPv6 address, no port
        return text, None
    host, sep, port_text = text.partition(":")
    return host, _port(entry, port_text) if sep else None


def _port(entry: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"allow-list entry {entry!r}: port {text!r} is not a number in 1..65535")
    return int(text)


def address_kind(ip: IPAddress) -> str | None:
    """Why ``ip`` may not be fetched from ("loopback", "private", ...), or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            inner = address_kind(embedded)
            return f"{inner} (IPv4 {embedded} inside IPv6)" if inner else None
    for kind, hit in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                      ("link-local", ip.is_link_local), ("private", ip.is_private),
                      ("multicast", ip.is_multicast), ("reserved", ip.is_reserved)):
        if hit:
            return kind
    return None if ip.is_global else "not globally routable"


def literal_address(host: str) -> IPAddress | None:
    """The address ``host`` names without DNS: an IPv6 literal, or IPv4 in any form the C resolver accepts
    (``127.1``, ``2130706433``, ``0x7f.0.0.1``, octal), else None (a name)."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # IPv6 zone ids ("fe80::1%eth0") resolve too
    except ValueError:
        pass
    if not host.isascii() or not host or not (host[0].isdigit()):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


@dataclass(frozen=True)
class UrlPolicy:
    """http(s) to public addresses only, except the ``allow`` entries (see the module doc)."""

    allow: tuple[AllowedHost, ...] = ()

    @classmethod
    def from_entries(cls, entries: Iterable[str] = ()) -> "UrlPolicy":
        return cls(tuple(parse_allow_entry(e) for e in entries))

    def url_refusal(self, url: str | None) -> str | None:
        """Why ``url`` may not be fetched (a message starting with `REFUSAL_PREFIX`), or None. Syntactic:
        no DNS. Never raises (a URL that cannot be parsed is refused)."""
        if url is None or not str(url).strip():
            return f"{REFUSAL_PREFIX}: no URL"
        try:
            parts = urlsplit(unwrap(str(url)))  # unwrap, like urllib.request.Request: "<URL:...>", spaces
            scheme = parts.scheme.lower()
            if scheme not in ALLOWED_SCHEMES:
                return f"{REFUSAL_PREFIX}: scheme {scheme or '(none)'!r} is not allowed (only http, https)"
            host = _normalise_host(parts.hostname or "")
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError as e:  # a bad port, an unbalanced "[": not a URL urllib could fetch either
            return f"{REFUSAL_PREFIX}: unparseable URL ({e})"
        if not host:
            return f"{REFUSAL_PREFIX}: URL has no host"
        if any(c.isspace() or not c.isprintable() for c in host):
            return f"{REFUSAL_PREFIX}: host {host!r} contains spaces or control characters"
        return self._host_refusal(host, port)

    def _host_refusal(self, host: str, port: int) -> str | None:
        if any(a.matches_name(host, port) for a in self.allow):
            return None
        if host == "localhost" or host.endswith(".localhost"):
            return f"{REFUSAL_PREFIX}: host {host!r} is loopback"
        ip = literal_address(host)
        if ip is None:
            return None  # a name: its addresses are checked when the downloader connects
        return self.address_refusal(ip, port)

    def address_refusal(self, ip: IPAddress | str, port: int | None) -> str | None:
        """Why a connection to ``ip``:``port`` is refused, or None (public, or allow-listed)."""
        if isinstance(ip, str):
            ip = ipaddress.ip_address(ip.split("%", 1)[0])
        if any(a.matches_address(ip, port) for a in self.allow):
            return None
        kind = address_kind(ip)
        if kind is None:
            return None
        where = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        return f"{REFUSAL_PREFIX}: address {where} is {kind}"

    def with_resolved_names(self) -> "UrlPolicy":
        """This policy plus, for each allowed name, the addresses it resolves to now (what a connection to
        it will see). A name that does not resolve adds nothing."""
        extra = []
        for a in self.allow:
            if a.name is None:
                continue
            try:
                infos = socket.getaddrinfo(a.name, a.port, type=socket.SOCK_STREAM)
            except OSError:
                continue
            for info in infos:
                ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
                extra.append(AllowedHost(None, ipaddress.ip_network(ip), a.port))
        return UrlPolicy(self.allow + tuple(extra))


def _normalise_host(host: str) -> str:
    """Lower case, NFKC (as IDNA does: fullwidth digits are digits), IDNA dots as ".", no trailing dot."""
    host = unicodedata.normalize("NFKC", host).lower()
    for dot in _IDNA_DOTS:
        host = host.replace(dot, ".")
    return host.rstrip(".")


# The filter's cheap pre-check (DuckDB regex): an http(s) URL whose authority is a plain DNS name (ASCII
# labels, the last one starting with a letter, so never an IPv4 literal in any form), an optional port, then
# a path, query, fragment or the end. No userinfo, brackets, backslashes, spaces or percent signs. Such a row
# passes; every other row, and any mentioning "localhost", goes to `UrlPolicy.url_refusal` (a Python UDF),
# which measured ~2000x fewer calls than rows on LAION-like input.
PLAIN_URL_REGEX = r"^[hH][tT][tT][pP][sS]?://([A-Za-z0-9_-]+\.)*[A-Za-z][A-Za-z0-9-]*(:[0-9]{1,5})?([/?#]|$)"
UDF_NAME = "sd_url_refusal"


def sql_condition(column: str = "url") -> str:
    """The SQL condition a row must satisfy to pass the policy (the UDF `UDF_NAME` must be registered on
    the connection: `register_udf`)."""
    return (f"CASE WHEN regexp_matches({column}, '{PLAIN_URL_REGEX}') AND NOT ({column} ILIKE '%localhost%') "
            f"THEN true ELSE {UDF_NAME}({column}) IS NULL END")


def register_udf(con: duckdb.DuckDBPyConnection, policy: UrlPolicy) -> None:
    """Make `UrlPolicy.url_refusal` of ``policy`` callable from SQL on ``con`` as `UDF_NAME` (imported here:
    img2dataset's processes use this module without DuckDB)."""
    import duckdb

    con.create_function(UDF_NAME, policy.url_refusal, [duckdb.sqltypes.VARCHAR], duckdb.sqltypes.VARCHAR,
                        null_handling="special", side_effects=False)
