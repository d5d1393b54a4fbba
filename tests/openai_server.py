"""A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions protocol, for the backend tests.

It stands in for a remote paid API (the teacher), which cannot exist here. Requests are checked like a
strict server would (model, messages, content parts, image data URL that decodes to an image, optional
bearer key, optional `response_format` support); answers come from a `responder(prompt, seed, body)`
function. Faults are injected from a queue, one per incoming request: ("timeout", seconds) answers late,
("429", retry_after) and ("500",) / ("503",) answer with that status, ("no-choices",) answers 200 with
an empty `choices` list.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from PIL import Image

Responder = Callable[[str, Optional[int], dict], str]


class ChatServer:
    def __init__(
        self,
        responder: Responder,
        api_key: Optional[str] = None,
        supports_schema: bool = True,
        model: str = "teacher-test",
    ):
        self.responder, self.api_key, self.supports_schema, self.model = responder, api_key, supports_schema, model
        self.faults: deque = deque()
        self.requests: list[dict] = []  # every request body received, faults included
        self.answered: list[dict] = []  # bodies answered with 200
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    server._handle(self, raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, *faults: tuple) -> None:
        with self.lock:
            self.faults.extend(faults)

    # -- protocol -----------------------------------------------------------------------------------
    def _send(self, h: BaseHTTPRequestHandler, status: int, payload: dict, headers: Optional[dict] = None):
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _error(self, h, status: int, message: str, headers: Optional[dict] = None):
        self._send(h, status, {"error": {"message": message, "type": "invalid_request_error", "code": status}}, headers)

    def _handle(self, h: BaseHTTPRequestHandler, raw: bytes) -> None:
        if h.path.rstrip("/") != "/v1/chat/completions":
            return self._error(h, 404, f"no route {h.path}")
        try:
            body = json.loads(raw)
        except ValueError:
            return self._error(h, 400, "body is not JSON")
        with self.lock:
            self.requests.append(body)
            fault = self.faults.popleft() if self.faults else None
        if self.api_key and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._error(h, 401, "invalid api key")
        if fault:
            kind = fault[0]
            if kind == "timeout":
                time.sleep(fault[1])
                return self._error(h, 504, "late answer nobody waits for")
            if kind == "429":
                return self._error(h, 429, "rate limit reached", {"Retry-After": str(fault[1])})
            if kind == "no-choices":  # a 200 that breaks the protocol
                return self._send(h, 200, {"id": "x", "object": "chat.completion", "choices": []})
            return self._error(h, int(kind), "server error")
        problem = self._check(body)
        if problem:
            return self._error(h, 400, problem)
        prompt, seed = body["messages"][-1]["content"][0]["text"], body.get("seed")
        content = self.responder(prompt, seed, body)
        with self.lock:
            self.answered.append(body)
        self._send(
            h,
            200,
            {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {
                    "prompt_tokens": len(prompt.split()),
                    "completion_tokens": len(content.split()),
                    "total_tokens": len(prompt.split()) + len(content.split()),
                },
            },
        )

    def _check(self, body: dict) -> Optional[str]:
        if body.get("model") != self.model:
            return f"model '{body.get('model')}' does not exist"
        if "response_format" in body and not self.supports_schema:
            return "response_format is not supported by this server"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages must be a non-empty list"
        parts = messages[-1].get("content")
        if not isinstance(parts, list) or [p.get("type") for p in parts] != ["text", "image_url"]:
            return "expected content parts [text, image_url]"
        url = parts[1]["image_url"]["url"]
        if not url.startswith("data:image/") or ";base64," not in url:
            return "image_url must be a base64 data URL"
        try:
            Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).verify()
        except Exception:
            return "image_url does not decode to an image"
        return None


def echo_alt_text(prompt: str, seed, body) -> str:
    """An answer in the four formulas about the alt-text the prompt ends with (a model that reads no image)."""
    from cycle.annotate.schema import to_target_json

    alt = prompt.rsplit(": ", 1)[-1]
    return to_target_json(
        {
            "desc": [f"the image shows {alt}."],
            "neg_desc": [f"the image shows no {alt}."],
            "tags": [alt],
            "neg_tags": [f"no {alt}"],
        }
    )
