"""The /metrics cache: one render per sample generation, gzip and filters still honoured."""
from __future__ import annotations

import gzip
import urllib.request

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from conftest import free_port
from looptune.daemon import config as cfg
from looptune.daemon import http as metrics_http


class Counting:
    def __init__(self) -> None:
        self.value = 1.0
        self.collects = 0

    def collect(self):  # noqa: ANN201
        self.collects += 1
        yield GaugeMetricFamily("looptune_test_value", "test", value=self.value)
        yield GaugeMetricFamily("looptune_test_other", "test", value=2)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=5) as resp:
        return resp.read(), dict(resp.headers)


def test_renders_once_per_generation_and_serves_fresh_data_after_a_change() -> None:
    col = Counting()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(col)
    gen = [0]
    port = free_port()
    server, app = metrics_http.start("127.0.0.1", port, reg, lambda: gen[0], cfg.TLS())
    assert app is not None
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        a, _ = get(url)
        b, _ = get(url)
        assert a == b and b"looptune_test_value 1.0" in a
        assert col.collects == 1 and app.renders == 1          # the second scrape came from the cache
        col.value = 5.0
        c, _ = get(url)
        assert b"looptune_test_value 1.0" in c                 # same generation: still the cached text
        gen[0] += 1                                            # a sampler finished a sample
        app.prerender()                                        # the main loop renders it ahead
        assert col.collects == 2
        d, _ = get(url)
        assert b"looptune_test_value 5.0" in d and col.collects == 2
        z, headers = get(url, {"Accept-Encoding": "gzip"})
        assert headers.get("Content-Encoding") == "gzip" and gzip.decompress(z) == d
        renders = app.renders
        get(url + "?name[]=looptune_test_other")               # filters go to prometheus_client, uncached
        assert app.renders == renders
    finally:
        server.shutdown()
        server.server_close()


def test_no_scraper_no_rendering() -> None:
    col = Counting()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(col)
    app = metrics_http.CachedMetricsApp(reg, lambda: 1, idle_seconds=60)
    app.prerender()
    assert col.collects == 0


def test_renders_ahead_only_near_the_next_expected_scrape() -> None:
    """A scraper every 15 s: the generations between its scrapes (several a second) are not rendered
    for nobody; those within ahead_seconds of the expected next scrape are, and one after the
    scraper missed its slot is left to the scrape itself."""
    col = Counting()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(col)
    gen = [0]
    app = metrics_http.CachedMetricsApp(reg, lambda: gen[0], idle_seconds=120)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "",
               "HTTP_ACCEPT": "text/plain"}
    app(environ, lambda *a: None)
    app.last_scrape -= 15.0                       # the scraper's next visit, 15 s later
    app(environ, lambda *a: None)
    assert col.collects == 1
    now = metrics_http.time.monotonic()

    def after(seconds: float) -> None:          # the main loop's tick, `seconds` after the last scrape
        gen[0] += 1
        app.last_scrape = now - seconds
        app.prerender()

    after(5.0)
    assert col.collects == 1                      # mid-interval: nobody would read it
    after(14.5)
    assert col.collects == 2                      # just before the expected scrape: ready for it
    after(20.0)
    assert col.collects == 2                      # the scraper missed its slot: it renders on demand
    app(environ, lambda *a: None)
    assert col.collects == 3
