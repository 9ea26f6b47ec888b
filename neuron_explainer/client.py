"""Async client for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, llama.cpp server).

- concurrency limit (a semaphore), identical in-flight requests sent once;
- retries with exponential backoff on 429, 5xx, timeouts and dropped connections (Retry-After honoured);
- an on-disk cache: one JSON file per request, named by a hash of the request (endpoint, model, messages,
  parameters — never the key), so a rerun sends nothing it already has an answer for;
- token and cost counters.

The API key comes from an environment variable and is needed only for non-loopback hosts; it goes into the
Authorization header and nowhere else (no cache file, output or log line holds it).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from sparse_coding.errors import UserError

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx
DEFAULT_KEY_ENV = "OPENAI_API_KEY"


class APIError(UserError):
    """The endpoint refused a request or kept failing after every retry."""


@dataclass
class ClientConfig:
    api_base: str = "https://api.openai.com/v1"
    # "" (default): OPENAI_API_KEY, sent only to non-loopback hosts. A name: that variable's key, sent to any host
    # (a local server that wants a key says so explicitly).
    api_key_env: str = ""
    max_concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 8
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    cache_dir: str | None = None  # None: no cache
    usd_per_m_input: float = 0.0  # prices per million tokens, for the cost counter
    usd_per_m_output: float = 0.0


@dataclass
class ChatResponse:
    content: str | None
    logprobs: list[dict[str, Any]] | None  # choices[0].logprobs.content, when the backend gives them
    cached: bool = False


@dataclass
class ClientStats:
    http_requests: int = 0  # every attempt sent, retries included
    retries: int = 0
    responses: int = 0  # fresh answers
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    errors: list[str] = field(default_factory=list)


def is_loopback(api_base: str) -> bool:
    host = urlsplit(api_base).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(cfg: ClientConfig) -> str | None:
    """Gives the key to send: the named variable's (cfg.api_key_env) to any host; else OPENAI_API_KEY, and only to a
    non-loopback host, so a key meant for a remote service never reaches a local server. A clear UserError when
    the key needed is not set."""
    if not cfg.api_key_env and is_loopback(cfg.api_base):
        return None
    env = cfg.api_key_env or DEFAULT_KEY_ENV
    key = os.environ.get(env)
    if not key:
        host = urlsplit(cfg.api_base).hostname or cfg.api_base
        raise UserError(
            f"{env} is not set: the endpoint {host} needs a key (export {env}=..., or use the offline explainer)"
        )
    return key


def request_key(api_base: str, body: dict[str, Any]) -> str:
    """Cache key: hash of the endpoint and the canonical request body (which never holds the API key)."""
    canonical = json.dumps({"api_base": api_base.rstrip("/"), "body": body}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ChatClient:
    """Use as `async with ChatClient(cfg) as client: await client.complete(model, messages)`."""

    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self._key = resolve_api_key(cfg)
        self.url = cfg.api_base.rstrip("/") + "/chat/completions"
        self.stats = ClientStats()
        self._http: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None
        self._inflight: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None

    def __repr__(self) -> str:  # the key stays out of reprs and logs
        return f"ChatClient(api_base={self.cfg.api_base!r})"

    async def __aenter__(self) -> ChatClient:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        self._http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.cfg.timeout_s))
        self._sem = asyncio.Semaphore(self.cfg.max_concurrency)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
        self._http, self._sem, self._inflight = None, None, {}

    async def complete(self, model: str, messages: list[dict[str, str]], **params: Any) -> ChatResponse:
        """One chat completion (temperature 0 unless given); from the cache when this exact request was answered."""
        body = {"model": model, "messages": messages, "temperature": 0, **params}
        key = request_key(self.cfg.api_base, body)
        data = self._cache_read(key)
        if data is not None:
            self.stats.cache_hits += 1
            return _to_response(data, cached=True)
        if key in self._inflight:  # the same request is already on its way: wait for that answer
            return _to_response(await asyncio.shield(self._inflight[key]), cached=True)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            data = await self._send(body)
            self._count(data)
            self._cache_write(key, body, data)
            future.set_result(data)
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            self._inflight.pop(key, None)
        return _to_response(data, cached=False)

    async def _send(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._http is None or self._sem is None:
            raise RuntimeError("use the client inside `async with ChatClient(cfg) as client:`")
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            delay = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2**attempt) * (0.5 + random.random() / 2)
            async with self._sem:
                self.stats.http_requests += 1
                try:
                    r = await self._http.post(self.url, json=body)
                except (httpx.TimeoutException, httpx.TransportError) as e:
                    last = f"{type(e).__name__}"
                    r = None
            if r is not None:
                if r.status_code == 200:
                    try:
                        data = r.json()
                        data["choices"][0]["message"]
                        return data
                    except (ValueError, KeyError, IndexError, TypeError):
                        last = "a 200 answer that is not a chat completion"
                elif r.status_code in RETRY_STATUS or r.status_code >= 500:
                    last = f"HTTP {r.status_code}"
                    retry_after = _retry_after(r)
                    if retry_after is not None:
                        delay = min(self.cfg.backoff_max_s, max(retry_after, 0.0))
                else:
                    raise APIError(f"{self.url} answered HTTP {r.status_code}: {r.text[:300]}")
            if attempt == self.cfg.max_retries:
                break
            self.stats.retries += 1
            log.info("retrying %s after %s (attempt %d, wait %.2fs)", self.url, last, attempt + 1, delay)
            await asyncio.sleep(delay)
        raise APIError(f"{self.url} failed {self.cfg.max_retries + 1} times (last: {last}); rerun to resume")

    def _count(self, data: dict[str, Any]) -> None:
        usage = data.get("usage") or {}
        p, c = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.stats.responses += 1
        self.stats.prompt_tokens += p
        self.stats.completion_tokens += c
        self.stats.cost_usd += (p * self.cfg.usd_per_m_input + c * self.cfg.usd_per_m_output) / 1e6

    def _cache_path(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir else None

    def _cache_read(self, key: str) -> dict[str, Any] | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())["response"]
        except (ValueError, KeyError, OSError):
            return None  # a damaged entry is simply asked again

    def _cache_write(self, key: str, body: dict[str, Any], data: dict[str, Any]) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"request": body, "response": data}, ensure_ascii=False))
        os.replace(tmp, path)


def _retry_after(r: httpx.Response) -> float | None:
    try:
        return float(r.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _to_response(data: dict[str, Any], cached: bool) -> ChatResponse:
    choice = data["choices"][0]
    logprobs = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    return ChatResponse(content=choice["message"].get("content"), logprobs=logprobs, cached=cached)
