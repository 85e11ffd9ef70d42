"""openai backend: against a real llama.cpp server (llama-cpp-python[server]) on 127.0.0.1, and
against small stdlib servers that answer garbage, errors, or too slowly."""

from __future__ import annotations

import importlib.util
import json
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fteval.backends import (
    BASELINE,
    BackendConnectionError,
    BackendResponseError,
    BackendTimeoutError,
)
from fteval.backends.openai_http import OpenAIBackend
from fteval.models.loading import embedded_gguf_path

NEW = 8
FAST = dict(max_retries=2, backoff_s=0.01, backoff_max_s=0.02)  # quick retries for the error paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------- real llama.cpp server
@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        pytest.skip("llama-cpp-python[server] is not installed; install it with `pip install 'fteval[llamacpp]'`")
    port = _free_port()
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf_path()), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "512", "--n_threads", "1", "--n_threads_batch", "1"]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"llama.cpp server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"llama.cpp server did not come up in 120 s:\n{log.read_text()[-2000:]}")
        time.sleep(0.3)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_chat_against_llama_server(llama_server, tokenizer):
    from fteval.data.formatting import format_prompt

    client = OpenAIBackend(llama_server, max_new_tokens=NEW)
    assert client.variants == [BASELINE]
    served = client.list_models()
    assert client.served_name(BASELINE) == served[0]
    prompts = ["Write a haiku about tea.", "Name a colour."]
    results = client.batch_generate(prompts)
    for prompt, r in zip(prompts, results):
        assert r.text
        assert r.prompt_tokens == len(tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
        assert 1 <= r.completion_tokens <= NEW and r.finish_reason in ("stop", "length")
        assert r.tokens_per_s == pytest.approx(r.completion_tokens / r.latency_s)
    assert client.records[-1].memory_kind == "not_measured" and client.records[-1].memory_bytes is None
    # two requests in flight: each answer comes back in its prompt's place. The texts themselves are
    # not compared: llama.cpp reuses the longest cached prompt prefix, so the order in which the
    # server happens to take the two requests changes its floating-point path and greedy text can
    # diverge after a few tokens.
    again = OpenAIBackend(llama_server, max_new_tokens=NEW, concurrency=2).batch_generate(prompts)
    assert [r.prompt_tokens for r in again] == [r.prompt_tokens for r in results]
    assert len({r.prompt_tokens for r in results}) == 2 and all(r.text for r in again)


def test_completions_endpoint_and_model_mapping(llama_server):
    client = OpenAIBackend(llama_server, endpoint="completions", max_new_tokens=4,
                           models={"tuned": OpenAIBackend(llama_server).list_models()[0]})
    assert client.variants == [BASELINE, "tuned"]
    r = client.generate_response("The capital of France is", "tuned")
    assert "Paris" in r.text and r.prompt_tokens == 5 and r.model == "tuned"


# ------------------------------------------------------------------------- misbehaving servers
class _Handler(BaseHTTPRequestHandler):
    mode = "garbage"
    hits = 0

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(200, json.dumps({"data": [{"id": "fake-model"}]}).encode())

    def do_POST(self) -> None:
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        mode = type(self).mode
        ok = json.dumps({"choices": [{"message": {"content": " ok "}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()
        if mode == "garbage":
            self._send(200, b"<html>definitely not json</html>", "text/html")
        elif mode == "no_choices":
            self._send(200, json.dumps({"object": "chat.completion", "usage": {}}).encode())
        elif mode == "slow":
            time.sleep(1.0)
            self._send(200, ok)
        elif mode == "flaky":  # 503 first, then fine
            self._send(503, b'{"error": "loading"}') if type(self).hits == 1 else self._send(200, ok)
        elif mode == "bad_request":
            self._send(400, b'{"error": {"message": "model not found"}}')


@pytest.fixture()
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Handler.hits = 0

    def use(mode: str) -> str:
        _Handler.mode, _Handler.hits = mode, 0
        return f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield use
    server.shutdown()
    server.server_close()


def test_non_json_body(fake_server):
    client = OpenAIBackend(fake_server("garbage"), **FAST)
    with pytest.raises(BackendResponseError, match="not JSON.*definitely not json"):
        client.generate_response("hi")
    assert _Handler.hits == 1  # garbage is not retried


def test_missing_choices(fake_server):
    with pytest.raises(BackendResponseError, match="without a 'choices' list"):
        OpenAIBackend(fake_server("no_choices"), **FAST).generate_response("hi")


def test_timeout_is_retried_then_reported(fake_server):
    client = OpenAIBackend(fake_server("slow"), timeout_s=0.2, **FAST)
    with pytest.raises(BackendTimeoutError, match=r"no answer within 0.2 s, 3 attempt\(s\)"):
        client.generate_response("hi")
    assert _Handler.hits == 3  # 1 + max_retries


def test_retryable_status_then_success(fake_server):
    r = OpenAIBackend(fake_server("flaky"), **FAST).generate_response("hi")
    assert r.text == "ok" and r.prompt_tokens == 3 and _Handler.hits == 2


def test_client_error_is_not_retried(fake_server):
    with pytest.raises(BackendResponseError, match="HTTP 400.*model not found"):
        OpenAIBackend(fake_server("bad_request"), **FAST).generate_response("hi")
    assert _Handler.hits == 1


def test_server_down():
    port = _free_port()  # nothing listens there
    client = OpenAIBackend(f"http://127.0.0.1:{port}/v1", models={BASELINE: "m"}, max_retries=2, backoff_s=0.05)
    start = time.perf_counter()
    with pytest.raises(BackendConnectionError, match=r"cannot reach the server .*refused.*3 attempt\(s\).*llama_cpp.server"):
        client.generate_response("hi")
    assert time.perf_counter() - start >= 0.05 + 0.1  # backoff 0.05 s, then 0.1 s


def test_not_http_at_all():
    class Garbage(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)
            self.request.sendall(b"SSH-2.0-OpenSSH_9.0 this is not http\r\n\r\n")

    with socketserver.TCPServer(("127.0.0.1", 0), Garbage) as srv:
        threading.Thread(target=srv.handle_request, daemon=True).start()
        client = OpenAIBackend(f"http://127.0.0.1:{srv.server_address[1]}/v1", models={BASELINE: "m"}, **FAST)
        with pytest.raises(BackendResponseError, match="did not answer with HTTP"):
            client.generate_response("hi")


def test_bad_arguments():
    with pytest.raises(ValueError, match="must start with http"):
        OpenAIBackend("127.0.0.1:8000/v1")
    with pytest.raises(ValueError, match="endpoint='embeddings'"):
        OpenAIBackend(endpoint="embeddings")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s > 0"):
        OpenAIBackend(timeout_s=0)
