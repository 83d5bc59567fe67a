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
