"""Image URLs end to end: a real app fetching from a real web server on loopback, under the SSRF
rules of pipeline/urls.py.

The server (tests/harness/image_host.py) records every request, so a refused URL is shown to have
caused no connection at all. Names resolve through a table the test controls (`Names`, put in
place of the URL source's `resolve`), so that `meta.test` can resolve to 169.254.169.254 without
touching /etc/hosts; `localhost` goes through the real resolver. Loopback is reachable only in
the apps that set the test-only `url_allow_loopback`.

HTTPS is served by the same kind of server with a certificate from a throwaway CA
(tests/harness/certificates.py) that names `localhost` only. A service trusts that CA the way a
deployment trusts a private one, with `SSL_CERT_FILE`; aiohttp reads the trust store once, when it is
imported, so that service is a `cliplens serve` process of its own.
"""

from __future__ import annotations

import base64
import dataclasses
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from cliplens.app import create_app
from cliplens.pipeline.urls import resolve_host
from cliplens.settings import Settings
from tests.conftest import photo_bytes, wait_ready
from tests.harness.certificates import CertificateAuthority
from tests.harness.image_host import ImageHost, Redirect, Serve, Stall, Status
from tests.harness.service import Service
from tests.harness.service import serving as serving_process

Client = TestClient[Litestar]
PHOTO = photo_bytes("album/1/a.jpg")
OTHER_PHOTO = photo_bytes("album/1/b.jpg")
CAP = max(len(PHOTO), len(OTHER_PHOTO)) + 1024
"""The byte cap of the apps here: both photos fit, `BIG` does not."""
BIG = b"\xff\xd8\xff" + b"\0" * (CAP + 64 * 1024)
PUBLIC_ONLY = "URLs may only reach public addresses"
"""What a refusal by the address rules says (so a refusal for another reason cannot pass for one)."""


class Names:
    """The URL source's resolver, as a table: name -> addresses, or a list of answers given one per
    lookup (the last repeats); `localhost` by the real resolver, anything else does not exist."""

    def __init__(
        self, table: dict[str, list[str]], answers: dict[str, list[list[str]]] | None = None
    ) -> None:
        self.table = table
        self.answers = answers or {}
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host in self.answers:
            script = self.answers[host]
            return script.pop(0) if len(script) > 1 else script[0]
        if host in self.table:
            return self.table[host]
        if host == "localhost":
            return await resolve_host(host, port)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@contextmanager
def serving(settings: Settings, names: Names) -> Iterator[tuple[Client, InMemorySpanExporter]]:
    """The app, ready, resolving through `names`, every span it ends also kept in memory."""
    app = create_app(settings)
    exporter = InMemorySpanExporter()
    app.state.runtime.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    with TestClient(app, timeout=120) as client:
        wait_ready(client)
        url_source = app.state.runtime.service.sources.url
        if url_source is not None:
            url_source.resolve = names
        yield client, exporter


def embed(client: Client, items: Sequence[str]) -> tuple[dict[int, np.ndarray], dict[int, tuple[str, str]]]:
    """({index: vector}, {index: (code, message)}) of one request, whichever way it reports failures
    (a 200 with `errors`, or a 422 listing them)."""
    response = client.post("/v1/embeddings", json={"input": list(items)})
    assert response.status_code in (200, 422), response.text
    body = response.json()
    errors = body["errors"] if "errors" in body else body["error"]["errors"]
    vectors = {d["index"]: np.asarray(d["embedding"], dtype=np.float32) for d in body.get("data", [])}
    return vectors, {e["index"]: (e["code"], e["message"]) for e in errors}


def refused(client: Client, item: str) -> tuple[str, str]:
    """The code and message of one item that must fail."""
    vectors, errors = embed(client, [item])
    assert not vectors and list(errors) == [0], errors
    return errors[0]


def metric(client: Client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name}{labels} is not in /metrics")


@pytest.fixture(scope="module")
def host() -> Iterator[ImageHost]:
    with ImageHost() as server:
        yield server


def base_settings(tiny_model: str) -> Settings:
    return Settings(
        model=tiny_model,
        pretrained="none",
        cpu_workers=2,
        max_inputs=16,
        max_image_bytes=CAP,
        download_timeout_s=10,
        download_retries=1,
    )


LOOPBACK_NAMES = {
    "photos.test": ["127.0.0.1"],
    "elsewhere.test": ["127.0.0.1"],
    "internal.test": ["127.0.0.1", "10.0.0.1"],
    "meta.test": ["169.254.169.254", "127.0.0.1"],
    "mapped.test": ["127.0.0.1", "::ffff:10.0.0.1"],
    "private.test": ["192.168.1.20"],
}


REBINDING = {"rebind.test": [["127.0.0.1"], ["10.0.0.1"]]}
"""A name whose second answer would lead inside: there must be no second lookup."""


ALLOWED = ("localhost", "127.0.0.1", *(n for n in LOOPBACK_NAMES if n != "elsewhere.test"), *REBINDING)
"""The hosts of the loopback app: `elsewhere.test` resolves, but is not allowed."""


@dataclasses.dataclass
class App:
    client: Client
    spans: InMemorySpanExporter
    names: Names


@pytest.fixture(scope="module")
def loopback(tiny_model: str) -> Iterator[App]:
    """URLs on, loopback reachable (the test-only setting), http:// allowed."""
    settings = dataclasses.replace(
        base_settings(tiny_model),
        url_hosts=ALLOWED,
        url_allow_http=True,
        url_allow_loopback=True,
    )
    names = Names(LOOPBACK_NAMES, REBINDING)
    with serving(settings, names) as (client, spans):
        yield App(client, spans, names)


@pytest.fixture
def client(loopback: App) -> Client:
    return loopback.client


STRICT_NAMES = {
    "loop.test": ["127.0.0.1"],
    "meta.test": ["169.254.169.254"],
    "v6loop.test": ["::1"],
    "mapped.test": ["::ffff:10.0.0.1"],
    "compat.test": ["::10.0.0.1"],
    "nat64.test": ["64:ff9b::a9fe:a9fe"],
}


@pytest.fixture(scope="module")
def strict(tiny_model: str) -> Iterator[Client]:
    """URLs on for any host, http:// allowed, and no address but public ones (the production rules)."""
    settings = dataclasses.replace(base_settings(tiny_model), url_hosts=("*",), url_allow_http=True)
    with serving(settings, Names(STRICT_NAMES)) as (client, _):
        yield client


def test_an_image_on_an_allowed_host_is_fetched_and_embedded(client: Client, host: ImageHost) -> None:
    host.put("/ok/photo.jpg", Serve(PHOTO))
    items = [
        host.url("/ok/photo.jpg", "localhost"),
        host.url("/ok/photo.jpg", "127.0.0.1"),
        host.url("/ok/photo.jpg?size=large#top", "photos.test"),
    ]
    vectors, errors = embed(client, items)
    assert not errors and sorted(vectors) == [0, 1, 2]
    inline = "data:image/jpeg;base64," + base64.b64encode(PHOTO).decode()
    reference, _ = embed(client, [inline])
    for vector in vectors.values():
        np.testing.assert_allclose(vector, reference[0], atol=1e-6)
    assert host.paths("/ok/") == ["/ok/photo.jpg"] * 3
    # the connection went to the checked address, the Host header named the host
    assert sorted(host.hosts(["/ok/photo.jpg"])) == sorted(
        f"{name}:{host.port}" for name in ("localhost", "127.0.0.1", "photos.test")
    )


@pytest.mark.parametrize(
    ("name", "address"),
    [(name, addresses[0]) for name, addresses in STRICT_NAMES.items()],
)
def test_a_host_resolving_to_a_non_public_address_is_forbidden_before_any_connection(
    strict: Client, host: ImageHost, name: str, address: str
) -> None:
    path = f"/strict/{name}.jpg"
    host.put(path, Serve(PHOTO))
    code, message = refused(strict, host.url(path, name))
    assert code == "forbidden" and PUBLIC_ONLY in message, message
    assert f"resolves to {address}" in message, message
    assert host.paths(path) == [], "no request may reach the server"


@pytest.mark.parametrize(
    "netloc",
    [
        "127.0.0.1:{port}",
        "[::1]:{port}",
        "[::ffff:127.0.0.1]:{port}",
        "169.254.169.254",
        "[fe80::1]",
        "0.0.0.0:{port}",
    ],
)
def test_a_literal_non_public_address_is_forbidden_before_any_connection(
    strict: Client, host: ImageHost, netloc: str
) -> None:
    path = f"/literal/{netloc.split(':{')[0].strip('[]')}.jpg"
    host.put(path, Serve(PHOTO))
    code, message = refused(strict, f"http://{netloc.format(port=host.port)}{path}")
    assert code == "forbidden" and PUBLIC_ONLY in message, message
    assert host.paths(path) == []


@pytest.mark.parametrize("name", ["meta.test", "mapped.test", "private.test"])
def test_one_non_public_address_among_the_answers_forbids_the_host_even_with_loopback_allowed(
    client: Client, host: ImageHost, name: str
) -> None:
    """`meta.test` and `mapped.test` also resolve to 127.0.0.1, which this app may reach: were the
    rule "some address passes", the request would have reached the server."""
    path = f"/mixed/{name}.jpg"
    host.put(path, Serve(PHOTO))
    code, message = refused(client, host.url(path, name))
    assert code == "forbidden" and PUBLIC_ONLY in message, message
    assert host.paths(path) == []


def test_a_redirect_to_a_forbidden_address_is_refused_before_connecting(
    client: Client, host: ImageHost
) -> None:
    """Every redirect target is checked like the URL: `internal.test` and `meta.test` also resolve
    to 127.0.0.1 (this server), so had their other address been let through, the server would have
    seen a second request; a host not allowed is refused whatever it resolves to."""
    host.put("/redirect/internal.jpg", Redirect(host.url("/redirect/target.jpg", "internal.test")))
    host.put("/redirect/metadata.jpg", Redirect(host.url("/latest/meta-data/", "meta.test")))
    host.put("/redirect/literal.jpg", Redirect("http://169.254.169.254/latest/meta-data/"))
    host.put("/redirect/elsewhere.jpg", Redirect(host.url("/redirect/target.jpg", "elsewhere.test")))
    host.put("/redirect/target.jpg", Serve(PHOTO))
    host.put("/latest/meta-data/", Serve(PHOTO))
    for first, expected in [
        ("/redirect/internal.jpg", f"resolves to 10.0.0.1, which is private: {PUBLIC_ONLY}"),
        (
            "/redirect/metadata.jpg",
            "resolves to 169.254.169.254, which is link-local (where cloud metadata servers answer): "
            + PUBLIC_ONLY,
        ),
        ("/redirect/literal.jpg", "'169.254.169.254' is not in the allowed hosts"),
        ("/redirect/elsewhere.jpg", "'elsewhere.test' is not in the allowed hosts"),
    ]:
        code, message = refused(client, host.url(first, "photos.test"))
        assert code == "forbidden" and expected in message, message
    assert host.paths("/redirect/") == [
        "/redirect/internal.jpg",
        "/redirect/metadata.jpg",
        "/redirect/literal.jpg",
        "/redirect/elsewhere.jpg",
    ]
    assert host.paths("/latest/") == []


def test_three_redirects_are_followed_and_a_fourth_is_refused(client: Client, host: ImageHost) -> None:
    for hop in range(1, 5):
        host.put(f"/hops/{hop}", Redirect(f"/hops/{hop - 1}"))  # relative Locations
    host.put("/hops/0", Serve(PHOTO))
    vectors, errors = embed(client, [host.url("/hops/3", "photos.test")])
    assert not errors and list(vectors) == [0]
    assert host.paths("/hops/") == ["/hops/3", "/hops/2", "/hops/1", "/hops/0"]

    code, message = refused(client, host.url("/hops/4", "photos.test"))
    assert code == "invalid_reference" and "more than 3" in message, message
    assert host.paths("/hops/")[4:] == ["/hops/4", "/hops/3", "/hops/2", "/hops/1"], "/hops/0 is never asked"


@pytest.mark.parametrize("sized", [True, False])
def test_a_body_over_the_byte_cap_is_too_large(client: Client, host: ImageHost, sized: bool) -> None:
    path = f"/big/{sized}.jpg"
    host.put(path, Serve(BIG, sized=sized))
    code, message = refused(client, host.url(path, "photos.test"))
    assert code == "too_large" and str(CAP) in message, message
    assert host.paths(path) == [path], "never retried"


@pytest.mark.parametrize(
    ("status", "code"), [(404, "not_found"), (410, "not_found"), (401, "forbidden"), (403, "forbidden")]
)
def test_an_answer_that_is_not_an_image_is_its_code_without_a_retry(
    client: Client, host: ImageHost, status: int, code: str
) -> None:
    path = f"/status/{status}.jpg"
    host.put(path, Status(status))
    assert refused(client, host.url(path, "photos.test"))[0] == code
    assert host.paths(path) == [path]


def test_a_5xx_is_retried_and_counted_under_the_url_source(client: Client, host: ImageHost) -> None:
    before = metric(client, "cliplens_download_retries_total", source="url", reason="http_5xx")
    gcs_before = metric(client, "cliplens_download_retries_total", source="gcs", reason="http_5xx")
    host.put("/flaky.jpg", Status(503), Serve(PHOTO))
    vectors, errors = embed(client, [host.url("/flaky.jpg", "photos.test")])
    assert not errors and list(vectors) == [0]
    assert host.paths("/flaky.jpg") == ["/flaky.jpg"] * 2
    assert metric(client, "cliplens_download_retries_total", source="url", reason="http_5xx") == before + 1
    assert metric(client, "cliplens_download_retries_total", source="gcs", reason="http_5xx") == gcs_before


def test_a_url_is_cached_by_the_bytes_it_answered_not_by_its_address(client: Client, host: ImageHost) -> None:
    """A URL's answer can change at any time: its bytes are loaded every time, then looked up."""
    url = host.url("/changing.jpg", "photos.test")
    host.put("/changing.jpg", Serve(PHOTO), Serve(OTHER_PHOTO))
    first, _ = embed(client, [url])
    response = client.post("/v1/embeddings", json={"input": [url]})
    second = np.asarray(response.json()["data"][0]["embedding"], dtype=np.float32)
    assert response.headers["x-cache-hits"] == "0", "new bytes, new vector"
    assert not np.allclose(first[0], second, atol=1e-4)
    again = client.post("/v1/embeddings", json={"input": [url]})
    assert again.headers["x-cache-hits"] == "1", "the same bytes again: from the cache"
    np.testing.assert_allclose(np.asarray(again.json()["data"][0]["embedding"], dtype=np.float32), second)
    assert host.paths("/changing.jpg") == ["/changing.jpg"] * 3


def test_the_connection_goes_to_the_address_checked_with_no_second_lookup(
    loopback: App, host: ImageHost
) -> None:
    """`rebind.test` answers 127.0.0.1 first, 10.0.0.1 after: the check saw the first answer, and
    the connection must go there, not to whatever a second lookup would say."""
    host.put("/rebind.jpg", Serve(PHOTO))
    vectors, errors = embed(loopback.client, [host.url("/rebind.jpg", "rebind.test")])
    assert not errors and list(vectors) == [0]
    assert host.hosts(["/rebind.jpg"]) == [f"rebind.test:{host.port}"]
    assert loopback.names.asked.count("rebind.test") == 1


def test_the_trace_names_the_source_and_never_the_query(loopback: App, host: ImageHost) -> None:
    client, exporter = loopback.client, loopback.spans
    host.put("/signed/first.jpg", Redirect("/signed/photo.jpg?X-Signature=second-secret"))
    host.put("/signed/photo.jpg", Serve(PHOTO))
    response = client.post(
        "/v1/embeddings",
        json={"input": [host.url("/signed/first.jpg?X-Signature=first-secret", "photos.test")]},
    )
    assert response.status_code == 200, response.text
    trace_id = int(response.headers["x-trace-id"], 16)
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    (load,) = [s for s in spans if s.name == "load"]
    (event,) = load.events
    assert event.attributes is not None
    assert event.attributes["cliplens.image.source"] == "url"
    assert event.attributes["cliplens.image.ref"] == host.url("/signed/first.jpg", "photos.test")
    hops = sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == load.context.span_id),
        key=lambda s: s.start_time or 0,
    )
    assert [(s.name, s.kind) for s in hops] == [("GET", SpanKind.CLIENT)] * 2
    assert [dict(s.attributes or {}).get("http.response.status_code") for s in hops] == [302, 200]
    assert [dict(s.attributes or {})["url.full"] for s in hops] == [
        host.url("/signed/first.jpg", "photos.test"),
        host.url("/signed/photo.jpg", "photos.test"),
    ]
    assert all(dict(s.attributes or {})["server.address"] == "photos.test" for s in hops)
    everything = "".join(span.to_json() for span in spans)
    assert "secret" not in everything


@pytest.mark.parametrize(
    ("item", "code"),
    [
        ("http://other.test:{port}/photo.jpg", "forbidden"),  # not in the allowlist
        ("http://photos.test.evil.example:{port}/photo.jpg", "forbidden"),
        ("http://user:secret@photos.test:{port}/photo.jpg", "forbidden"),
        ("http://photos.test:99999/photo.jpg", "invalid_reference"),
        ("http://127.1:{port}/photo.jpg", "invalid_reference"),
        ("ftp://photos.test/photo.jpg", "invalid_reference"),
    ],
)
def test_urls_the_rules_refuse_never_reach_the_server(
    client: Client, host: ImageHost, item: str, code: str
) -> None:
    host.put("/photo.jpg", Serve(PHOTO))
    assert refused(client, item.format(port=host.port))[0] == code
    assert host.paths("/photo.jpg") == []


def test_urls_are_forbidden_by_default(settings: Settings, host: ImageHost) -> None:
    assert settings.url_hosts == ()
    host.put("/default.jpg", Serve(PHOTO))
    with serving(settings, Names({})) as (client, _):
        for item in (host.url("/default.jpg", "localhost"), "https://example.com/photo.jpg"):
            code, message = refused(client, item)
            assert code == "forbidden" and "CLIPLENS_URL_HOSTS" in message, message
    assert host.paths("/default.jpg") == []


def test_http_is_refused_unless_allowed(tiny_model: str, host: ImageHost) -> None:
    settings = dataclasses.replace(
        base_settings(tiny_model), url_hosts=("localhost",), url_allow_loopback=True
    )
    host.put("/plain.jpg", Serve(PHOTO))
    with serving(settings, Names({})) as (client, _):
        code, message = refused(client, host.url("/plain.jpg", "localhost"))
    assert code == "forbidden" and "CLIPLENS_URL_ALLOW_HTTP" in message, message
    assert host.paths("/plain.jpg") == []


# --- HTTPS: the certificate is checked against the URL's host, through the pinned resolver ------


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_host(authority: CertificateAuthority) -> Iterator[ImageHost]:
    """An HTTPS image host whose certificate names `localhost`, and neither 127.0.0.1 nor any other."""
    with ImageHost(authority.issue("localhost").server_context()) as server:
        yield server


@pytest.fixture(scope="module")
def trusting(
    tiny_model: str, authority: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """A `cliplens serve` that trusts the test CA (and no other: SSL_CERT_FILE replaces the system's
    store), may fetch from localhost and 127.0.0.1, and does not retry."""
    with serving_process(
        tiny_model,
        tmp_path_factory.mktemp("tls-service"),
        SSL_CERT_FILE=str(authority.certificate),
        CLIPLENS_URL_HOSTS="localhost,127.0.0.1",
        CLIPLENS_URL_ALLOW_LOOPBACK="1",
        CLIPLENS_DOWNLOAD_RETRIES="0",
        CLIPLENS_MAX_IMAGE_BYTES=str(CAP),
    ) as service:
        yield service


def embed_over_http(service: Service, items: Sequence[str]) -> dict[str, object]:
    response = httpx.post(f"{service.url}/v1/embeddings", json={"input": list(items)}, timeout=120)
    assert response.status_code == 200, response.text  # the harness's service answers `partial`
    body: dict[str, object] = response.json()
    return body


def test_https_works_when_the_certificate_names_the_urls_host_and_its_ca_is_trusted(
    trusting: Service, tls_host: ImageHost
) -> None:
    tls_host.put("/tls/photo.jpg", Serve(PHOTO))
    url = tls_host.url("/tls/photo.jpg", "localhost")
    assert url.startswith("https://localhost:")
    inline = "data:image/jpeg;base64," + base64.b64encode(PHOTO).decode()
    body = embed_over_http(trusting, [url, inline])
    assert body["errors"] == []
    fetched, reference = (np.asarray(d["embedding"], dtype=np.float32) for d in body["data"])  # type: ignore[attr-defined]
    np.testing.assert_allclose(fetched, reference, atol=1e-6)
    assert tls_host.paths("/tls/") == ["/tls/photo.jpg"]
    assert tls_host.hosts(["/tls/photo.jpg"]) == [f"localhost:{tls_host.port}"]


def test_https_to_an_allowed_host_the_certificate_does_not_name_is_refused(
    trusting: Service, tls_host: ImageHost
) -> None:
    """The same server, address and trusted certificate as above: only the URL's host differs
    (127.0.0.1, which the certificate does not name), so the handshake fails and no request is sent."""
    tls_host.put("/tls/by-address.jpg", Serve(PHOTO))
    body = embed_over_http(trusting, [tls_host.url("/tls/by-address.jpg", "127.0.0.1")])
    assert body["data"] == []
    ((code, message),) = [(e["code"], e["message"]) for e in body["errors"]]  # type: ignore[attr-defined]
    assert code == "storage_unavailable" and "certificate was refused" in message, message
    assert "certificate is not valid for '127.0.0.1'" in message, message
    assert tls_host.paths("/tls/by-address.jpg") == []


def test_https_with_a_certificate_from_a_ca_the_service_does_not_trust_is_refused(
    client: Client, tls_host: ImageHost
) -> None:
    """The in-process app trusts the system's CAs only: the test CA's certificate is refused even
    for the name it is made for."""
    tls_host.put("/tls/untrusted.jpg", Serve(PHOTO))
    retries_before = url_retries(client)
    code, message = refused(client, tls_host.url("/tls/untrusted.jpg", "localhost"))
    assert code == "storage_unavailable" and "certificate was refused" in message, message
    assert "self-signed certificate" in message, message
    assert tls_host.paths("/tls/untrusted.jpg") == []
    assert url_retries(client) == retries_before, "a certificate that is not trusted is not retried"


def url_retries(client: Client) -> float:
    """All of `cliplens_download_retries_total{source="url"}`, whatever the reason."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
        if sample.name == "cliplens_download_retries_total" and sample.labels.get("source") == "url"
    )


# --- Timeouts -----------------------------------------------------------------------------------

DOWNLOAD_TIMEOUT_S = 1.0
STALL_S = 4.0


@pytest.fixture(scope="module")
def impatient(tiny_model: str) -> Iterator[Client]:
    """URLs to localhost, a one-second download timeout and no retry."""
    settings = dataclasses.replace(
        base_settings(tiny_model),
        url_hosts=("localhost",),
        url_allow_http=True,
        url_allow_loopback=True,
        download_timeout_s=DOWNLOAD_TIMEOUT_S,
        download_retries=0,
    )
    with serving(settings, Names({})) as (client, _):
        yield client


@pytest.mark.parametrize("mid_body", [False, True], ids=["before-headers", "mid-body"])
def test_a_server_that_stalls_past_the_download_timeout_is_a_timeout(
    impatient: Client, host: ImageHost, mid_body: bool
) -> None:
    path = f"/stall/{mid_body}.jpg"
    host.put(path, Stall(PHOTO, STALL_S, mid_body=mid_body))
    started = time.monotonic()
    code, message = refused(impatient, host.url(path, "localhost"))
    waited = time.monotonic() - started
    assert code == "timeout" and f"took longer than {DOWNLOAD_TIMEOUT_S:.1f} s" in message, message
    assert DOWNLOAD_TIMEOUT_S <= waited < STALL_S, "given up at the timeout, not when the server went on"
    assert host.paths(path) == [path]
