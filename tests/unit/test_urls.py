"""The URL rules of pipeline/urls.py: which URLs a client may name, which addresses they may lead to,
and the resolver that lets a connection go only where the check looked."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest
import yarl

from cliplens.pipeline.references import ReferenceParser, UrlReference
from cliplens.pipeline.urls import MAX_URL_BYTES, PinnedResolver, UrlPolicy, pinned, refusal
from cliplens.settings import SettingsError, load_settings
from cliplens.telemetry.metrics import Metrics
from cliplens.telemetry.stages import RequestTimeline
from cliplens.vocabulary import ErrorCode, ItemError, Modality, Stage

REFUSED = [
    "127.0.0.1",
    "127.255.0.9",
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",
    "169.254.0.1",
    "100.64.0.1",
    "100.127.255.254",
    "0.0.0.0",
    "0.1.2.3",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.0.8",
    "192.0.2.1",
    "198.18.0.1",
    "203.0.113.7",
    "::1",
    "::",
    "fe80::1",
    "fe80::1%eth0",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "fec0::1",
    "2001:db8::1",
    "2002:a00:1::1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "::ffff:10.0.0.1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::10.0.0.1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::1",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700:4700::1111", "2a00:1450:4001::200e"]
PUBLIC_CARRIED = ["::ffff:8.8.8.8", "64:ff9b::808:808"]
"""IPv6 forms of a public IPv4 address: they reach it, and are judged by it."""


@pytest.mark.parametrize("address", REFUSED)
def test_no_address_but_a_public_unicast_one_may_be_reached(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", PUBLIC + PUBLIC_CARRIED)
def test_public_addresses_may_be_reached(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_a_carried_ipv4_address_is_named_in_the_refusal() -> None:
    assert refusal(ipaddress.ip_address("::ffff:10.0.0.1")) == "private (it carries 10.0.0.1)"
    assert "metadata" in str(refusal(ipaddress.ip_address("64:ff9b::a9fe:a9fe")))


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_the_test_setting_lets_loopback_through(address: str) -> None:
    assert refusal(ipaddress.ip_address(address), allow_loopback=True) is None


@pytest.mark.parametrize(
    "address",
    [a for a in REFUSED if not ipaddress.ip_address(a.split("%")[0]).is_loopback and a != "::ffff:127.0.0.1"],
)
def test_the_test_setting_lets_nothing_else_through(address: str) -> None:
    assert refusal(ipaddress.ip_address(address), allow_loopback=True) is not None


def code_of(policy: UrlPolicy, url: str) -> ErrorCode:
    with pytest.raises(ItemError) as caught:
        policy.check(url)
    return caught.value.code


def test_an_allowed_host_allows_itself_and_the_hosts_under_it_only() -> None:
    policy = UrlPolicy(("Example.com", "cdn.test."))
    for url in [
        "https://example.com/a.jpg",
        "https://EXAMPLE.com./a.jpg",
        "https://img.example.com/a.jpg",
        "https://a.b.example.com:8443/a.jpg?x=1",
        "https://cdn.test/a.jpg",
    ]:
        assert policy.check(url).url.path == "/a.jpg", url
    assert UrlPolicy(("bücher.de",)).check("https://www.bücher.de/a.jpg").host == "www.xn--bcher-kva.de"
    for url in [
        "https://badexample.com/a.jpg",
        "https://example.com.evil.test/a.jpg",
        "https://test/a.jpg",
        "https://example.org/a.jpg",
        "https://8.8.8.8/a.jpg",
    ]:
        assert code_of(policy, url) == ErrorCode.FORBIDDEN, url


def test_star_allows_any_host_and_an_address_matches_only_itself() -> None:
    assert UrlPolicy(("*",)).check("https://anything.example/x").host == "anything.example"
    assert UrlPolicy(("*",)).check("https://8.8.8.8/x").literal == ipaddress.ip_address("8.8.8.8")
    policy = UrlPolicy(("8.8.8.8", "[2606:4700:4700:0::1111]"))
    assert policy.check("https://8.8.8.8/x").host == "8.8.8.8"
    assert policy.check("https://[2606:4700:4700::1111]/x").host == "2606:4700:4700::1111"
    assert code_of(policy, "https://18.8.8.8/x") == ErrorCode.FORBIDDEN
    assert code_of(policy, "https://8.8.8/x") == ErrorCode.INVALID_REFERENCE


def test_no_hosts_means_no_urls() -> None:
    policy = UrlPolicy(())
    assert not policy.enabled
    with pytest.raises(ItemError) as caught:
        policy.check("https://example.com/a.jpg")
    assert caught.value.code == ErrorCode.FORBIDDEN and "CLIPLENS_URL_HOSTS" in caught.value.message


def test_http_needs_its_own_setting() -> None:
    assert code_of(UrlPolicy(("*",)), "http://example.com/a.jpg") == ErrorCode.FORBIDDEN
    assert UrlPolicy(("*",), allow_http=True).check("http://example.com/a.jpg").port == 80


def test_credentials_are_refused() -> None:
    for url in [
        "https://user:pass@example.com/a.jpg",
        "https://user@example.com/a.jpg",
        "https://:p@example.com/",
    ]:
        assert code_of(UrlPolicy(("*",)), url) == ErrorCode.FORBIDDEN, url


@pytest.mark.parametrize(
    "url",
    [
        "https:///a.jpg",
        "https://exa mple.com/a.jpg",
        "https://example.com/a b.jpg",
        "https://example.com/a\n.jpg",
        "https://example.com\\@evil.test/",
        "https://example.com:99999/a.jpg",
        "https://-bad-.example.com/",
        "https://127.1/",
        "https://0x7f.0.0.1/",
        "https://2130706433/",
        "https://" + "a" * 64 + ".example.com/",
        "https://example.com/" + "a" * MAX_URL_BYTES,
        "ftp://example.com/a.jpg",
        "example.com/a.jpg",
    ],
)
def test_a_url_that_is_not_one_is_invalid(url: str) -> None:
    assert code_of(UrlPolicy(("*",), allow_http=True), url) == ErrorCode.INVALID_REFERENCE


def test_the_fragment_is_never_sent_and_the_query_is() -> None:
    target = UrlPolicy(("*",)).check("https://example.com/a.jpg?sig=abc#frag")
    assert str(target.url) == "https://example.com/a.jpg?sig=abc"


class Lookups:
    """A resolver that answers from a table and counts what it was asked."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return self.table[host]


def addresses(policy: UrlPolicy, url: str, lookups: Lookups) -> tuple[str, ...]:
    return asyncio.run(policy.addresses(policy.check(url), lookups))


def test_every_address_a_name_resolves_to_must_pass() -> None:
    lookups = Lookups(
        {
            "fine.test": ["8.8.8.8", "2606:4700:4700::1111"],
            "meta.test": ["8.8.8.8", "169.254.169.254"],
            "mapped.test": ["::ffff:10.0.0.1"],
            "empty.test": [],
        }
    )
    policy = UrlPolicy(("*",))
    assert addresses(policy, "https://fine.test/a.jpg", lookups) == ("8.8.8.8", "2606:4700:4700::1111")
    for name, named in [("meta.test", "169.254.169.254"), ("mapped.test", "::ffff:10.0.0.1")]:
        with pytest.raises(ItemError) as caught:
            addresses(policy, f"https://{name}/a.jpg", lookups)
        assert caught.value.code == ErrorCode.FORBIDDEN
        assert f"{name} resolves to {named}" in caught.value.message
    with pytest.raises(ItemError) as caught:
        addresses(policy, "https://empty.test/a.jpg", lookups)
    assert caught.value.code == ErrorCode.NOT_FOUND


def test_a_literal_address_is_checked_without_a_lookup() -> None:
    lookups = Lookups({})
    policy = UrlPolicy(("*",))
    assert addresses(policy, "https://8.8.8.8/a.jpg", lookups) == ("8.8.8.8",)
    for url in [
        "https://127.0.0.1/",
        "https://[::1]/",
        "https://[::ffff:a9fe:a9fe]/",
        "https://169.254.169.254/",
    ]:
        with pytest.raises(ItemError) as caught:
            addresses(policy, url, lookups)
        assert caught.value.code == ErrorCode.FORBIDDEN, url
    assert lookups.asked == []


def test_the_pinned_resolver_answers_only_the_pinned_host_with_the_checked_addresses() -> None:
    resolver = PinnedResolver()

    async def scenario() -> None:
        with pytest.raises(OSError):
            await resolver.resolve("photos.test", 443)
        with pinned("Photos.Test.", ["8.8.8.8", "2606:4700:4700::1111"]):
            answers = await resolver.resolve("photos.test", 443)
            assert [(a["host"], a["port"], a["family"], a["hostname"]) for a in answers] == [
                ("8.8.8.8", 443, socket.AF_INET, "photos.test"),
                ("2606:4700:4700::1111", 443, socket.AF_INET6, "photos.test"),
            ]
            with pytest.raises(OSError):
                await resolver.resolve("other.test", 443)
        with pytest.raises(OSError):
            await resolver.resolve("photos.test", 443)

    asyncio.run(scenario())


def parser(urls: UrlPolicy | None) -> ReferenceParser:
    return ReferenceParser(
        buckets=frozenset({"photos"}),
        default_bucket=None,
        has_local_root=True,
        max_image_bytes=1000,
        urls=urls,
    )


def test_the_parser_turns_an_allowed_url_into_a_url_reference_shown_without_its_query() -> None:
    long_path = "p" * 3000  # longer than any storage name, still a URL
    reference = parser(UrlPolicy(("example.com",))).parse(f"https://img.example.com/{long_path}?sig=s3cret#x")
    assert isinstance(reference, UrlReference)
    assert reference.url == yarl.URL(f"https://img.example.com/{long_path}?sig=s3cret")
    assert str(reference) == f"https://img.example.com/{long_path}"


@pytest.mark.parametrize("urls", [None, UrlPolicy(())])
def test_without_hosts_the_parser_forbids_urls(urls: UrlPolicy | None) -> None:
    for item in ["https://example.com/a.jpg", "HTTP://example.com/a.jpg"]:
        with pytest.raises(ItemError) as caught:
            parser(urls).parse(item)
        assert caught.value.code == ErrorCode.FORBIDDEN
        assert "CLIPLENS_URL_HOSTS" in caught.value.message


def test_the_trace_shows_a_url_reference_without_its_query() -> None:
    timeline = RequestTimeline(Metrics(), Modality.IMAGE, None)
    timing = timeline.enter(0, Stage.LOAD, "https://example.com/a.jpg?X-Amz-Signature=s3cret#frag")
    assert timing.reference == "https://example.com/a.jpg"
    assert timeline.enter(1, Stage.LOAD, "album/a?b.jpg").reference == "album/a?b.jpg", "not a URL: as named"


def test_url_settings_are_off_by_default_and_read_from_the_environment() -> None:
    default = load_settings({})
    assert (default.url_hosts, default.url_allow_http, default.url_allow_loopback) == ((), False, False)
    settings = load_settings(
        {"CLIPLENS_URL_HOSTS": "example.com, cdn.example.net ,*", "CLIPLENS_URL_ALLOW_HTTP": "1"}
    )
    assert settings.url_hosts == ("example.com", "cdn.example.net", "*") and settings.url_allow_http


@pytest.mark.parametrize("hosts", ["*.example.com", "https://example.com", "example.com/photos", "a b"])
def test_an_allowlist_entry_that_is_not_a_host_stops_the_start(hosts: str) -> None:
    with pytest.raises(SettingsError, match="CLIPLENS_URL_HOSTS"):
        load_settings({"CLIPLENS_URL_HOSTS": hosts})
