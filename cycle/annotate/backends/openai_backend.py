"""Any OpenAI-compatible chat-completions endpoint: the teacher of the seed set, or a served annotator.

Each item is one request: a user message with the prompt and the image as a base64 data URL. Requests
run on `concurrency` threads under a requests-per-minute limit; timeouts, connection errors, 429 and 5xx
are retried with exponential backoff (a 429's Retry-After is honoured). A request log (JSONL, one line
per completed response, keyed by sample id and seed) makes a restarted pass reuse every answer already
paid for. Structured output (`response_format` json_schema) is asked for, and dropped for the rest of the
run if the server refuses it.
"""

from __future__ import annotations

import base64
import email.utils
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

from ..schema import FORMULA_JSON_SCHEMA
from .base import BackendError, BatchItem, FailedGeneration, to_png_bytes

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_MAX_BACKOFF_S = 60.0


class RateLimiter:
    """At most `per_minute` starts per minute, spaced evenly, shared by all threads."""

    def __init__(self, per_minute: int):
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self.next_start = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        if start > now:
            time.sleep(start - now)


class RequestLog:
    """Append-only JSONL of completed responses; a line cut by a kill is ignored on reload."""

    def __init__(self, path: Optional[str | Path]):
        self.path = Path(path) if path else None
        self.done: dict[tuple[str, Optional[int]], str] = {}
        self.lock = threading.Lock()
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.done[(entry["key"], entry.get("seed"))] = entry["content"]
                except (ValueError, KeyError, TypeError):
                    continue

    def get(self, key: Optional[str], seed: Optional[int]) -> Optional[str]:
        return None if key is None else self.done.get((key, seed))

    def add(self, key: Optional[str], seed: Optional[int], content: str, model: str) -> None:
        if key is None:
            return
        with self.lock:
            self.done[(key, seed)] = content
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(
                        json.dumps(
                            {
                                "key": key,
                                "seed": seed,
                                "model": model,
                                "content": content,
                                "time": round(time.time(), 3),
                            },
                            ensure_ascii=False,
                        )
                        + "\n"
                    )


class OpenAIBackend:
    def __init__(
        self,
        cfg: Any,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        request_log: Optional[str | Path] = None,
        backoff_s: float = 1.0,
        use_schema: bool = True,
    ):
        """`cfg` is an `OpenAIBackendConfig`; `backoff_s` is the first retry delay (doubled each retry)."""
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.backoff_s, self.use_schema = backoff_s, use_schema
        self.limiter = RateLimiter(cfg.requests_per_minute)
        self.log = RequestLog(request_log)
        self.fingerprint = f"openai:{cfg.model}@{cfg.base_url}"
        self.requests_sent = 0
        self.retries_done = 0
        self.counter_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=max(1, cfg.concurrency), thread_name_prefix="openai")

    # -- protocol -----------------------------------------------------------------------------------
    def _body(self, image, prompt: str, seed: Optional[int], temperature: float) -> dict:
        data, mime = to_png_bytes(image)
        url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        body = {
            "model": self.cfg.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": prompt},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
            "max_tokens": self.max_new_tokens,
            "temperature": temperature,
        }
        if seed is not None:
            body["seed"] = seed
        if self.use_schema:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "four_formulas", "schema": FORMULA_JSON_SCHEMA, "strict": True},
            }
        return body

    def _post(self, body: dict) -> tuple[int, dict, Any]:
        """(status, headers, parsed JSON or text) of one HTTP request; raises on network errors."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with self.counter_lock:
            self.requests_sent += 1
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                status, hdrs, raw = resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            status, hdrs, raw = err.code, dict(err.headers or {}), err.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode("utf-8", errors="replace")
        return status, hdrs, payload

    def _one(self, image, prompt: str, key: Optional[str], seed: Optional[int], temperature: float) -> str:
        cached = self.log.get(key, seed)
        if cached is not None:
            return cached
        try:
            body = self._body(image, prompt, seed, temperature)
        except ValueError as err:
            return FailedGeneration(str(err))
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                with self.counter_lock:
                    self.retries_done += 1
            self.limiter.wait()
            try:
                status, headers, payload = self._post(body)
            except (socket.timeout, TimeoutError, ConnectionError, urllib.error.URLError, OSError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
                time.sleep(self._backoff(attempt))
                continue
            if status == 200:
                try:
                    content = payload["choices"][0]["message"]["content"] or ""
                except (TypeError, KeyError, IndexError):
                    return FailedGeneration(f"response without choices[0].message.content: {str(payload)[:200]}")
                self.log.add(key, seed, content, self.cfg.model)
                return content
            detail = _error_text(payload)
            if status == 400 and self.use_schema and "response_format" in detail:
                self.use_schema = False  # the server does not do structured output: ask without it
                body.pop("response_format", None)
                continue
            if status in (401, 403, 404):
                raise BackendError(
                    f"{self.url} answered {status}: {detail} (check base_url, model, "
                    f"and the key in ${self.cfg.api_key_env})"
                )
            if status not in _RETRY_STATUS:
                return FailedGeneration(f"HTTP {status}: {detail}")
            last = f"HTTP {status}: {detail}"
            retry_after = _retry_after(headers) if status == 429 else None
            time.sleep(retry_after if retry_after is not None else self._backoff(attempt))
        raise BackendError(f"{self.url}: giving up after {self.cfg.max_retries + 1} attempts, last: {last}")

    def _backoff(self, attempt: int) -> float:
        return min(_MAX_BACKOFF_S, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)

    # -- backend interface --------------------------------------------------------------------------
    def generate(
        self,
        batch: Sequence[BatchItem],
        seed: Optional[int] = None,
        temperature: Optional[float] = None,
        keys: Optional[Sequence[str]] = None,
    ) -> list[str]:
        temperature = self.temperature if temperature is None else temperature
        keys = list(keys) if keys is not None else [None] * len(batch)
        futures = [
            self.pool.submit(self._one, image, prompt, key, seed, temperature)
            for (image, prompt), key in zip(batch, keys)
        ]
        return [f.result() for f in futures]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _error_text(payload: Any) -> str:
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    return str(payload)[:300]


def _retry_after(headers: dict) -> Optional[float]:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
