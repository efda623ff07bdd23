"""An example P/D proxy: each OpenAI completion or chat request goes first to a prefill engine (one
token, `do_remote_decode`), then to a decode engine with the `kv_transfer_params` the prefill engine
returned, so the decode engine pulls the prompt's KV blocks instead of computing them.

    python -m kvferry.vllm.proxy --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 --port 8000

Engines are taken round-robin. Standard library only; a production router (llm-d, Dynamo) does the
same exchange with load- and cache-aware choices.
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ROUTES = ("/v1/completions", "/v1/chat/completions")


class Upstreams:
    def __init__(self, prefill: list[str], decode: list[str], timeout: float):
        self._prefill = itertools.cycle(prefill)
        self._decode = itertools.cycle(decode)
        self._lock = threading.Lock()
        self.timeout = timeout

    def pick(self) -> tuple[str, str]:
        with self._lock:
            return next(self._prefill), next(self._decode)


def post(url: str, body: dict[str, Any], timeout: float) -> urllib.request.addinfourl:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    return urllib.request.urlopen(request, timeout=timeout)


def prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    prefill = dict(body)
    prefill.update(
        max_tokens=1,
        stream=False,
        kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False},
    )
    prefill.pop("max_completion_tokens", None)
    prefill.pop("stream_options", None)
    return prefill


class Handler(BaseHTTPRequestHandler):
    upstreams: Upstreams

    def do_GET(self) -> None:
        if self.path != "/health":
            self.send_error(404, "the proxy answers GET /health only")
            return
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        if self.path not in ROUTES:
            self.send_error(404, f"the proxy serves {', '.join(ROUTES)}")
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if not isinstance(body, dict):
                raise ValueError("the request body is not a JSON object")
        except ValueError as e:
            self.send_error(400, f"bad request: {e}")
            return
        prefill_url, decode_url = self.upstreams.pick()
        try:
            with post(prefill_url + self.path, prefill_request(body), self.upstreams.timeout) as response:
                params = json.loads(response.read()).get("kv_transfer_params")
            decode_body = dict(body)
            if params:
                decode_body["kv_transfer_params"] = params
            with post(decode_url + self.path, decode_body, self.upstreams.timeout) as response:
                self.send_response(response.status)
                for name in ("Content-Type",):
                    if response.headers.get(name):
                        self.send_header(name, response.headers[name])
                self.end_headers()
                while chunk := response.read1(65536):
                    self.wfile.write(chunk)
                    self.wfile.flush()
        except urllib.error.HTTPError as e:
            self.send_response(e.code)
            self.send_header("Content-Type", e.headers.get("Content-Type", "application/json"))
            self.end_headers()
            self.wfile.write(e.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            self.send_error(502, f"upstream failed: {e}")

    def log_message(self, format: str, *args: Any) -> None:
        return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", action="append", required=True, help="prefill engine URL (repeatable)")
    parser.add_argument("--decode", action="append", required=True, help="decode engine URL (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per upstream request")
    args = parser.parse_args(argv)
    Handler.upstreams = Upstreams(
        [u.rstrip("/") for u in args.prefill], [u.rstrip("/") for u in args.decode], args.timeout
    )
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"kvferry P/D proxy on http://{args.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
