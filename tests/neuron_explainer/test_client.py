"""The chat-completions client and the LLM explainer/simulator against a loopback server (127.0.0.1, in a thread)
that speaks the protocol, injects 429s, 500s and timeouts, and counts every request."""

import asyncio
import hashlib
import json
import math
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_neuron_explainer import make_planted

from neuron_explainer import InterpretConfig, RecordConfig, build_feature_records, interpret_features, write_summary
from neuron_explainer.client import APIError, ChatClient, ClientConfig, resolve_api_key
from neuron_explainer.pipeline import load_feature_results
from sparse_coding.errors import UserError

CLIENT_TIMEOUT_S = 1.0  # far above a normal answer (ms), so only injected stalls time out, even on a busy box
SECRET = "sk-test-SECRET-never-written-0123456789"


def _fake_answer(messages: list[dict], logprobs: bool) -> tuple[str, list | None]:
    """A stand-in LLM: explains from the 10s in the prompt, simulates by looking the explanation's tokens up."""
    system, user = messages[0]["content"], messages[-1]["content"]
    expl_tokens = re.findall(r'"((?:[^"\\]|\\.)*)"', user.split("\n", 1)[0])
    if "Look at the text excerpts" in system:
        hot = Counter(m.group(1) for m in re.finditer(r"^(.*)\t(?:[5-9]|10)$", user, flags=re.M))
        return "fires on " + ", ".join(f'"{t}"' for t, _ in hot.most_common(2)), None
    if "Tokens (JSON list):" in user:
        toks = json.loads(user.split("Tokens (JSON list): ", 1)[1].split("\n", 1)[0])
        return json.dumps({"activations": [10 if t in expl_tokens else 0 for t in toks]}), None
    if "\n\nTokens:\n" in user:
        toks = user.split("\n\nTokens:\n", 1)[1].split("\n")
        levels = [10 if t in expl_tokens else 0 for t in toks]
        text = "".join(f"{t}\t{v}\n" for t, v in zip(toks, levels, strict=True))
        content = []
        for t, v in zip(toks, levels, strict=True):
            other = "0" if v else "10"  # 90% on the chosen level: expected value 9 or 1
            alts = [{"token": str(v), "logprob": math.log(0.9)}, {"token": other, "logprob": math.log(0.1)}]
            content += [
                {"token": t},
                {"token": "\t"},
                {"token": str(v), "logprob": math.log(0.9), "top_logprobs": alts},
            ]
            content.append({"token": "\n"})
        return text, (content if logprobs else None)
    examples = re.findall(r"^Example \d+: (.*)$", user, flags=re.M)
    answers = []
    for ex in examples:
        text = json.loads(ex)
        marked = re.findall(r"<<(.*?)>>", text, flags=re.S)
        if marked:
            answers.append(int(all(m in expl_tokens for m in marked)))
        else:
            answers.append(int(any(t in text for t in expl_tokens)))
    return json.dumps({"answers": answers}), None


class FakeLLM(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, logprobs: bool = True, max_requests: int = 2000):
        super().__init__(("127.0.0.1", 0), Handler)
        self.logprobs, self.max_requests = logprobs, max_requests
        self.lock = threading.Lock()
        self.requests = 0
        self.attempts: Counter = Counter()  # body hash → requests received
        self.answered: Counter = Counter()  # body hash → good answers sent
        self.auth: set = set()
        self.fault_on_first = True
        self.inflight = self.max_inflight = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output quiet
        pass

    def do_POST(self):
        srv: FakeLLM = self.server
        with srv.lock:
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
        self.counted = True
        time.sleep(0.02)  # held briefly, so concurrent requests overlap even on a loaded machine
        try:
            self._answer(srv)
        finally:
            self._leave(srv)

    def _leave(self, srv: FakeLLM):
        with srv.lock:
            srv.inflight -= self.counted
            self.counted = False

    def _answer(self, srv: FakeLLM):
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        h = hashlib.sha256(raw).hexdigest()
        with srv.lock:
            srv.requests += 1
            n = srv.requests
            attempt = srv.attempts[h]
            srv.attempts[h] += 1
            srv.auth.add(self.headers.get("Authorization"))
        if n > srv.max_requests or self.path != "/v1/chat/completions":
            return self._send(400, {"error": "bounded test server: too many requests or bad path"})
        fault = int(h, 16) % 4 if srv.fault_on_first and attempt == 0 else 3
        if fault == 0:
            return self._send(429, {"error": "rate limited"}, {"Retry-After": "0"})
        if fault == 1:
            return self._send(500, {"error": "boom"})
        if fault == 2:
            self._leave(srv)  # a stalled request stops counting as in flight: the client gives up on it
            time.sleep(CLIENT_TIMEOUT_S + 0.3)  # the client has given up by now
            return self._send(200, {"choices": []}, ok=False)
        body = json.loads(raw)
        content, logprobs = _fake_answer(body["messages"], srv.logprobs and body.get("logprobs", False))
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs}
        with srv.lock:
            srv.answered[h] += 1
        self._send(200, {"choices": [choice], "usage": {"prompt_tokens": 100, "completion_tokens": 20}})

    def _send(self, status, obj, headers=None, ok=True):
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def server():
    servers = []

    def start(**kw):
        srv = FakeLLM(**kw)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _records():
    ids, vocab, acts = make_planted(N=300)
    cfg = RecordConfig(window=16, n_top_test=4, n_random_test=4, n_quantiles=2, n_per_quantile=3)
    return build_feature_records(ids, acts[..., :2], vocab, cfg=cfg)


def _cfg(url: str, **kw) -> InterpretConfig:
    return InterpretConfig(
        api_base=url, timeout_s=CLIENT_TIMEOUT_S, backoff_base_s=0.01, max_retries=5, max_concurrency=4, **kw
    )


@pytest.mark.parametrize("logprobs", [True, False], ids=["logprobs", "json"])
def test_faults_retried_every_feature_done_and_rerun_sends_nothing(tmp_path, server, monkeypatch, logprobs):
    monkeypatch.setenv("LOCAL_LLM_KEY", SECRET)  # named explicitly, so sent even to a loopback server
    srv = server(logprobs=logprobs)
    records = _records()
    stats = interpret_features(records, tmp_path, "sae", _cfg(srv.url, api_key_env="LOCAL_LLM_KEY"))
    assert stats["done"] == 2 and stats["client"]["retries"] > 0
    assert stats["client"]["prompt_tokens"] == 100 * stats["client"]["responses"]
    assert {0, 1, 2} <= {int(h, 16) % 4 for h in srv.attempts}  # 429, 500 and timeout all happened
    results = {r["feature_index"]: r for r in load_feature_results(tmp_path)}
    assert results[0]["explanation"] in ('fires on " the", " a"', 'fires on " a", " the"')
    assert results[0]["scores"]["correlation_all"] >= 0.8
    assert all(r["parse_failures"]["simulation"] == 0 for r in results.values())
    assert max(srv.answered.values()) == 1  # no request was answered twice
    assert 1 < srv.max_inflight <= 4  # concurrent, within the limit

    # Rerun from scratch (feature JSONs gone, cache kept): every answer comes from the cache.
    for p in (tmp_path / "features").glob("*.json"):
        p.unlink()
    before = srv.requests
    again = interpret_features(records, tmp_path, "sae", _cfg(srv.url, api_key_env="LOCAL_LLM_KEY"))
    assert srv.requests == before and again["client"]["http_requests"] == 0
    assert again["client"]["cache_hits"] > 0
    assert {r["feature_index"]: r["scores"] for r in load_feature_results(tmp_path)} == {
        k: r["scores"] for k, r in results.items()
    }
    write_summary(tmp_path)
    assert f"Bearer {SECRET}" in srv.auth
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert SECRET not in p.read_text(errors="replace"), p


def test_remote_endpoint_needs_key_loopback_does_not(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UserError, match="OPENAI_API_KEY is not set"):
        ChatClient(ClientConfig(api_base="https://api.openai.com/v1"))
    assert resolve_api_key(ClientConfig(api_base="http://localhost:8000/v1")) is None
    assert resolve_api_key(ClientConfig(api_base="http://[::1]:8000/v1")) is None
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    client = ChatClient(ClientConfig(api_base="https://api.openai.com/v1"))
    assert SECRET not in repr(client) and SECRET not in repr(client.__dict__.get("cfg"))
    with pytest.raises(UserError, match="LOCAL_LLM_KEY is not set"):  # named but missing: said, not skipped
        resolve_api_key(ClientConfig(api_base="http://127.0.0.1:8000/v1", api_key_env="LOCAL_LLM_KEY"))


def test_the_openai_key_never_reaches_a_loopback_server(tmp_path, server, monkeypatch):
    """OPENAI_API_KEY is set, but a local server was not named a key variable: it gets no Authorization header."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    srv = server()
    interpret_features(_records()[:1], tmp_path, "sae", _cfg(srv.url))
    assert srv.requests > 0 and srv.auth == {None}


def test_client_gives_up_clearly(tmp_path, server):
    srv = server()

    async def go(cfg):
        async with ChatClient(cfg) as c:
            return await c.complete("m", [{"role": "user", "content": "hi"}])

    with pytest.raises(APIError, match="HTTP 400"):  # a 4xx other than 429 is not retried
        asyncio.run(go(ClientConfig(api_base=srv.url + "/wrong", backoff_base_s=0.01)))
    srv.fault_on_first = False
    bad = ClientConfig(api_base="http://127.0.0.1:9/v1", backoff_base_s=0.01, max_retries=2, timeout_s=0.5)
    with pytest.raises(APIError, match="failed 3 times"):  # nothing listens on the discard port
        asyncio.run(go(bad))
    ok = asyncio.run(go(ClientConfig(api_base=srv.url, cache_dir=str(tmp_path))))
    assert ok.content is not None and not ok.cached
    assert asyncio.run(go(ClientConfig(api_base=srv.url, cache_dir=str(tmp_path)))).cached
