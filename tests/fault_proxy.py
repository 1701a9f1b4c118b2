"""A small fault-injecting HTTP proxy for teacher-client tests: in front of a real server (vLLM), it answers a
set fraction of requests with a fault instead of forwarding them, and records what it received.

Faults (drawn uniformly among ``faults`` for a faulty request):
  "429"  - 429 Too Many Requests with ``Retry-After-Ms`` (and ``Retry-After``) set
  "500"  - 500 Internal Server Error
  "slow" - holds the request for ``slow_s`` (past the client's timeout), then closes
  "drop" - closes the connection without any answer
Malformed replies seen from real servers and proxies (MALFORMED; none is in the default draw):
  "429-soon"      - 429 whose only wait is ``Retry-After: soon`` (not a number, not a date)
  "429-date"      - 429 whose ``Retry-After`` is an HTTP date (now: the wait is at most a second)
  "html"          - 200 with an HTML page (``text/html``), as a gateway's error page
  "empty-choices" - 200 completion with ``choices: []``
  "null-message"  - 200 completion whose choice has ``message: null``
  "null-content"  - 200 completion whose message has ``content: null``
  "not-json"      - 200 ``application/json`` with a truncated body
  "surrogate"     - 200 completion whose content escapes a lone surrogate (``\\ud800``): valid JSON, no valid text

Which requests are faulted: each with probability ``rate``; only those whose body contains ``match`` when it
is set; and with ``first=n``, only the first n times a body is received (then it is forwarded: a fault that
clears up on retry). ``first=None``: a body is faulted every time it is drawn (with rate 1, a fault that stays).

    with FaultProxy("http://127.0.0.1:8000", rate=0.2) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", ...)
        ...
        proxy.faults      # Counter of faults injected, by kind
        proxy.bodies      # Counter of request bodies received (JSON text) - repeats show up as counts > 1
"""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("429", "500", "slow", "drop")
MALFORMED = ("429-soon", "429-date", "html", "empty-choices", "null-message", "null-content", "not-json", "surrogate")
HTML_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1> (injected)</body></html>"


def malformed_completion(choices: list) -> bytes:
    return json.dumps(
        {
            "id": "injected",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": choices,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    ).encode()


MALFORMED_BODIES = {  # fault -> (content type, body)
    "html": ("text/html; charset=utf-8", HTML_PAGE),
    "empty-choices": ("application/json", malformed_completion([])),
    "null-message": (
        "application/json",
        malformed_completion([{"index": 0, "message": None, "finish_reason": "stop"}]),
    ),
    "null-content": (
        "application/json",
        malformed_completion(
            [{"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "stop"}]
        ),
    ),
    "not-json": ("application/json", b'{"id": "injected", "object": "chat.completion", "choices": [{"index": 0, "mess'),
    "surrogate": (
        "application/json",
        malformed_completion(
            [{"index": 0, "message": {"role": "assistant", "content": "7+8=15\ud800"}, "finish_reason": "stop"}]
        ),
    ),
}
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # the default backlog of 5 refuses connections at concurrency 32: faults not injected

    def handle_error(self, request, client_address):
        # A client killed or timed out mid-request (the tests do both on purpose): nothing to report.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        rate: float = 0.0,
        faults=FAULTS,
        slow_s: float = 3.0,
        retry_after_ms: int = 100,
        seed: int = 0,
        match: str | None = None,
        first: int | None = None,
    ):
        self.upstream = urlsplit(upstream)
        self.rate, self.kinds, self.slow_s, self.retry_after_ms = rate, tuple(faults), slow_s, retry_after_ms
        self.match, self.first = match, first
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.faults: Counter[str] = Counter()
        self.bodies: Counter[str] = Counter()
        self.forwarded = 0
        self.server = Server(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _draw(self, body: str) -> str | None:
        """Count ``body`` as received and draw its fault, if any."""
        with self.lock:
            self.bodies[body] += 1
            if self.match is not None and self.match not in body:
                return None
            if self.first is not None and self.bodies[body] > self.first:
                return None
            return self.rng.choice(self.kinds) if self.kinds and self.rng.random() < self.rate else None

    def requests_with(self, text: str) -> list[dict]:
        """The JSON bodies received that contain ``text``."""
        return [json.loads(b) for b in self.bodies if text in b]

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: pytest shows stderr of failing tests only, keep it readable
                pass

            def do_GET(self):
                self._forward(b"")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fault = proxy._draw(body.decode(errors="replace"))
                if fault is None:
                    return self._forward(body)
                with proxy.lock:
                    proxy.faults[fault] += 1
                if fault == "429":
                    return self._reply(
                        429,
                        b'{"error": {"message": "rate limited (injected)"}}',
                        {"Retry-After-Ms": str(proxy.retry_after_ms), "Retry-After": "1"},
                    )
                if fault == "500":
                    return self._reply(500, b'{"error": {"message": "server error (injected)"}}')
                if fault in ("429-soon", "429-date"):
                    wait = "soon" if fault == "429-soon" else email.utils.formatdate(usegmt=True)
                    return self._reply(429, b'{"error": {"message": "rate limited (injected)"}}', {"Retry-After": wait})
                if fault in MALFORMED_BODIES:
                    kind, reply = MALFORMED_BODIES[fault]
                    return self._reply(200, reply, {"Content-Type": kind})
                if fault == "slow":
                    time.sleep(proxy.slow_s)
                self.close_connection = True  # "slow" and "drop": no answer at all

            def _reply(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                headers = headers or {}
                if not any(k.lower() == "content-type" for k in headers):
                    headers["Content-Type"] = "application/json"
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, body: bytes):
                up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=600)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                try:
                    up.request(self.command, self.path, body=body or None, headers=headers)
                    resp = up.getresponse()
                    data = resp.read()
                finally:
                    up.close()
                with proxy.lock:
                    proxy.forwarded += 1
                try:
                    self._reply(resp.status, data, {k: v for k, v in resp.getheaders() if k.lower() not in HOP_HEADERS})
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) meanwhile
                    self.close_connection = True

        return Handler

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeTeacher:
    """A stand-in OpenAI-compatible chat server for offline tests: answers every chat completion with
    ``reply(<last user message>)`` (default ``echo: <message>``; usage counted in characters), after
    ``delay_s``. Put a FaultProxy in front of it for faults; the real-server tests use vLLM instead."""

    def __init__(self, delay_s: float = 0.0, reply=lambda content: f"echo: {content}"):
        self.delay_s, self.reply = delay_s, reply
        self.server = Server(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self):
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                time.sleep(teacher.delay_s)
                content = request["messages"][-1]["content"]
                body = json.dumps(
                    {
                        "id": "fake",
                        "object": "chat.completion",
                        "created": 0,
                        "model": request["model"],
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "logprobs": None,
                                "message": {"role": "assistant", "content": teacher.reply(content)},
                            }
                        ],
                        # as a real server, never more tokens than the request's max_tokens
                        "usage": {
                            "prompt_tokens": len(content),
                            "completion_tokens": min(len(content) + 6, request.get("max_tokens") or 1 << 30),
                            "total_tokens": 2 * len(content) + 6,
                        },
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def __enter__(self) -> FakeTeacher:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
