"""Verify a distill webhook delivery (standard library only; copy it into your receiver).

Every delivery is a POST whose headers carry

    X-Distill-Timestamp: 1764680000          (Unix seconds, when it was sent)
    X-Distill-Signature: v1=<hex>           (HMAC-SHA256 of "<timestamp>.<raw body>")
    X-Distill-Delivery:  <uuid>              (the same on every retry: dedupe on it)
    X-Distill-Event:     iteration.completed (or job.completed, job.failed)

Compute the HMAC over the raw body bytes as received (not over re-serialised JSON), compare in
constant time, and refuse a timestamp more than five minutes from your clock: a captured
request cannot be replayed later.

Run it as a tiny receiver to watch the events of a job:

    WEBHOOK_SECRET=whsec_... python verify_webhook.py --port 8080
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

REPLAY_WINDOW_S = 300


def verify(
    secret: str,
    timestamp: str,
    signature: str,
    body: bytes,
    *,
    now: float | None = None,
    window_s: float = REPLAY_WINDOW_S,
) -> bool:
    """True when `body` was signed with `secret` at `timestamp`, within the replay window."""
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent) > window_s:
        return False
    mac = hmac.new(secret.encode(), f"{sent}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(f"v1={mac.hexdigest()}", signature)


class _Receiver(BaseHTTPRequestHandler):
    secret = ""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        ok = verify(
            self.secret,
            self.headers.get("X-Distill-Timestamp", ""),
            self.headers.get("X-Distill-Signature", ""),
            body,
        )
        self.send_response(204 if ok else 401)
        self.end_headers()
        if ok:
            event = json.loads(body)
            print(event["type"], json.dumps(event["data"]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    _Receiver.secret = os.environ["WEBHOOK_SECRET"]
    HTTPServer((args.host, args.port), _Receiver).serve_forever()


if __name__ == "__main__":
    main()
