"""The /metrics endpoint, with the exposition text cached per sample generation.

Formatting is most of a scrape's cost (prometheus_client spends ~10 µs per line). Samples
change once an interval while scrapes come every few seconds, so the text is rendered once
per change of the samplers' snapshots and served from memory, gzip included. After a scrape,
the main loop renders each new generation ahead (`prerender`), so the next scrape finds it
ready; with no scraper for `idle_seconds` nothing is rendered at all.

The server itself is prometheus_client's (threading WSGI server, its TLS context); only the
WSGI app differs. If those helpers ever move, it falls back to start_http_server, uncached.
"""
from __future__ import annotations

import gzip
import logging
import threading
import time
from typing import Any, Callable, Hashable
from urllib.parse import parse_qs

from prometheus_client import exposition

log = logging.getLogger("looptune.http")


class CachedMetricsApp:
    def __init__(self, registry: Any, generation: Callable[[], Hashable], idle_seconds: float = 120.0) -> None:
        self.registry = registry
        self.generation = generation
        self.idle_seconds = idle_seconds
        self._live = exposition.make_wsgi_app(registry)   # OPTIONS, name[] filters, anything unusual
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[Hashable, bytes, bytes | None]] = {}   # content type -> (gen, text, gzip)
        self._encoders: dict[str, Callable[[Any], bytes]] = {}
        self.last_scrape = 0.0
        self.renders = 0
        self._logged_failure = False

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("REQUEST_METHOD") != "GET" or environ.get("PATH_INFO") == "/favicon.ico" or \
                "name[]" in parse_qs(environ.get("QUERY_STRING", "")):
            return self._live(environ, start_response)
        encoder, ctype = exposition.choose_encoder(environ.get("HTTP_ACCEPT"))
        want_gzip = exposition.gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING"))
        self.last_scrape = time.monotonic()
        try:
            text, gz = self._get(ctype, encoder, want_gzip)
        except Exception:  # noqa: BLE001 - one bad render costs this scrape, never the server
            if not self._logged_failure:
                self._logged_failure = True
                log.exception("rendering /metrics failed (logged once)")
            start_response("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"looptune: rendering /metrics failed; see the daemon's log\n"]
        headers = [("Content-Type", ctype)]
        if want_gzip:
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [gz if want_gzip and gz is not None else text]

    def _get(self, ctype: str, encoder: Callable[[Any], bytes], want_gzip: bool) -> tuple[bytes, bytes | None]:
        gen = self.generation()
        with self._lock:
            self._encoders[ctype] = encoder
            hit = self._cache.get(ctype)
            if hit is not None and hit[0] == gen and (hit[2] is not None or not want_gzip):
                return hit[1], hit[2]
            text = hit[1] if hit is not None and hit[0] == gen else encoder(self.registry)
            gz = gzip.compress(text, compresslevel=5) if want_gzip else None
            self._cache[ctype] = (gen, text, gz)
            self.renders += 1
            return text, gz

    def prerender(self) -> None:
        """Render the formats scrapers asked for when the snapshots changed (main loop)."""
        if time.monotonic() - self.last_scrape > self.idle_seconds:
            return
        gen = self.generation()
        with self._lock:
            todo = [(c, e, self._cache[c][2] is not None) for c, e in self._encoders.items()
                    if c in self._cache and self._cache[c][0] != gen]
        for ctype, encoder, gz in todo:
            self._get(ctype, encoder, gz)


def start(host: str, port: int, registry: Any, generation: Callable[[], Hashable], tls: Any
          ) -> tuple[Any, CachedMetricsApp | None]:
    """Serve /metrics; returns (server, app). `tls` is daemon.config.TLS."""
    try:
        from wsgiref.simple_server import make_server

        from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family, _get_ssl_ctx, _SilentHandler
    except ImportError:   # prometheus_client reorganised: serve uncached, same behaviour otherwise
        log.info("prometheus_client internals moved; /metrics is served uncached")
        server, _ = exposition.start_http_server(
            port, addr=host, registry=registry, certfile=tls.cert_file or None, keyfile=tls.key_file or None,
            client_cafile=tls.client_ca_file or None, client_auth_required=tls.client_auth_required)
        return server, None
    import ssl

    class Server(ThreadingWSGIServer):
        pass

    Server.address_family, addr = _get_best_family(host, port)
    app = CachedMetricsApp(registry, generation)
    httpd = make_server(addr, port, app, Server, handler_class=_SilentHandler)
    if tls.cert_file and tls.key_file:
        ctx = _get_ssl_ctx(tls.cert_file, tls.key_file, ssl.PROTOCOL_TLS_SERVER, tls.client_ca_file or None, None,
                           tls.client_auth_required)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, name="looptune-http", daemon=True).start()
    return httpd, app
