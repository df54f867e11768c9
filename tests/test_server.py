"""`gpt2 serve`: the OpenAI-compatible HTTP server, tested over real HTTP with the official `openai`
client and raw requests (httpx), against one server per module on a free 127.0.0.1 port.

The model is a tiny random GPT-2-BPE model (50,257 ids, context 64) saved with the GPT-2 tokenizer
from GPT2MODEL_DATA; the reference for every token is `model.generate` on a second copy of it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from gpt2model import GPT, GPTconfig, load_tokenizer  # noqa: E402
from gpt2model.engine import Engine, SamplingParams  # noqa: E402
from gpt2model.server import ServerConfig, create_app  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CTX = 128


@dataclass
class Served:
    url: str
    ref: GPT  # a separate copy of the weights: the engine owns its model's KV cache
    tok: object
    engine: Engine

    def post(self, path: str, body: object = None, *, content: bytes | None = None, headers: dict | None = None,
             timeout: float = 60) -> httpx.Response:
        h = {**AUTH, **(headers or {})}
        if content is None:
            content = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        return httpx.post(self.url + path, content=content, headers=h, timeout=timeout)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """What model.generate gives alone, cut after an end-of-text (the server stops there)."""
        out = self.ref.generate(torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()
        return out[: out.index(self.tok.eot) + 1] if self.tok.eot in out else out

    def text(self, new_ids: list[int]) -> str:
        return self.tok.decode([t for t in new_ids if t != self.tok.eot])

    def running(self) -> float:
        metrics = httpx.get(self.url + "/metrics", headers=AUTH).text
        return float(next(ln.split()[1] for ln in metrics.splitlines() if ln.startswith("gpt2model_requests_running")))


def _model_dir(tmp_path_factory) -> Path:
    if not (Path(os.environ.get("GPT2MODEL_DATA", "")) / "gpt2" / "encoder.json").is_file():
        pytest.skip("GPT-2 tokenizer files not found: set GPT2MODEL_DATA")
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("served_model")
    GPT(GPTconfig(vocab_size=50257, context_length=CTX, n_layer=2, n_head=2, d_model=64)).save_pretrained(
        d, tokenizer=load_tokenizer("gpt2"))
    return d


def _start(app, sock: socket.socket) -> tuple[uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    return server, thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def served(model_dir):
    tok = load_tokenizer(model_dir)
    engine = Engine(GPT.from_pretrained(model_dir), max_batch=4, max_queue=4)
    engine.start()
    assert engine.ready.wait(60)
    app = create_app(engine, tok, ServerConfig(model_name="tiny", api_key=KEY))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server, thread = _start(app, sock)
    yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", GPT.from_pretrained(model_dir), tok, engine)
    server.should_exit = True
    thread.join(10)
    engine.shutdown(2)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)


# --- the official client ---------------------------------------------------------------------------
def test_openai_client_completions_and_chat_streaming_and_not(served, client):
    prompt = "The quick brown fox"
    ids = served.tok.encode(prompt)
    want = served.text(served.greedy(ids, 12))
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(served.greedy(ids, 12))  # an end-of-text that ended it counts
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                                                     temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == want and len(pieces) > 2

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    chat_ids = served.tok.encode("Be brief.\n\nUser: Hello!\nAssistant:")  # the documented template
    chat_want = served.text(served.greedy(chat_ids, 10))
    if "\nUser:" in chat_want:
        chat_want = chat_want[: chat_want.index("\nUser:")]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == chat_want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(chat_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert client.models.list().data[0].id == "tiny"


# --- the guarantees --------------------------------------------------------------------------------
def test_greedy_equals_generate_alone_even_with_concurrent_requests(served):
    prompts = [[464], [40, 1101, 257], served.tok.encode("To be, or not to be"), [50256, 818, 262],
               served.tok.encode("ROMEO:"), [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    lengths = [20, 7, 30, 12, 25, 16]
    want = [served.text(served.greedy(p, n)) for p, n in zip(prompts, lengths, strict=True)]

    def ask(i: int) -> str:
        while True:  # as a client should: a 429 says retry after a moment
            r = served.post("/v1/completions", {"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0})
            if r.status_code != 429:
                break
            time.sleep(0.05)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(prompts)) as pool:  # more requests than slots: some queue
        got = list(pool.map(ask, range(len(prompts))))
    assert got == want


def test_top_k_0_and_minus_1_mean_no_filter_as_in_vllm(served):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": 7}
    want = served.post("/v1/completions", body).json()["choices"][0]["text"]
    for k in (0, -1):
        r = served.post("/v1/completions", {**body, "top_k": k})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text
    assert served.post("/v1/completions", {**body, "top_k": 2}).json()["choices"][0]["text"] != want


def test_seeded_sampling_is_the_same_alone_or_batched(served):
    body = {"prompt": "Once upon a time", "max_tokens": 15, "temperature": 1.0, "top_k": 50, "seed": 1234}
    alone = served.post("/v1/completions", body).json()["choices"][0]["text"]
    assert served.post("/v1/completions", {**body, "seed": 1235}).json()["choices"][0]["text"] != alone
    others = [{"prompt": f"noise {i}", "max_tokens": 20, "temperature": 1.0} for i in range(3)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(served.post, "/v1/completions", b) for b in others]
        batched = served.post("/v1/completions", body).json()["choices"][0]["text"]
        [f.result() for f in futures]
    assert batched == alone


def _stream_pieces(served: Served, path: str, body: dict) -> tuple[list[str], list[dict]]:
    pieces, chunks = [], []
    with httpx.stream("POST", served.url + path, json={**body, "stream": True}, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            chunks.append(chunk)
            for c in chunk["choices"]:
                pieces.append(c["text"] if "text" in c else c["delta"].get("content", ""))
    return pieces, chunks


def test_streamed_text_equals_non_streamed_and_never_leaks_a_stop_string(served):
    body = {"prompt": "Hello, my name is", "max_tokens": 24, "temperature": 0}
    full = served.post("/v1/completions", body).json()["choices"][0]
    pieces, _ = _stream_pieces(served, "/v1/completions", body)
    assert "".join(pieces) == full["text"]
    # A stop string from the middle of that text: both end just before it, with finish_reason stop.
    text = full["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text[: text.index(stop)]
    stopped = served.post("/v1/completions", {**body, "stop": [stop, "never-there"]}).json()["choices"][0]
    assert stopped["text"] == cut and stopped["finish_reason"] == "stop"
    pieces, chunks = _stream_pieces(served, "/v1/completions", {**body, "stop": stop})
    assert "".join(pieces) == cut and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # No piece ends inside a UTF-8 character unless the whole text has a replacement character.
    assert all(not p.endswith("\ufffd") for p in pieces) or "\ufffd" in cut


def test_finish_reason_is_length_or_stop_truthfully(served):
    r = served.post("/v1/completions", {"prompt": "a", "max_tokens": 5, "temperature": 0}).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 5
    # An end-of-text token ends a choice with "stop" (and is not part of the text): force one via top_k=1
    # on a prompt whose greedy continuation is found first.
    for start in range(0, 50000, 997):
        out = served.greedy([start], 8)
        if out and out[-1] == served.tok.eot:
            r = served.post("/v1/completions", {"prompt": [start], "max_tokens": 8, "temperature": 0}).json()
            assert r["choices"][0]["finish_reason"] == "stop"
            assert r["choices"][0]["text"] == served.text(out)
            break


def test_client_disconnect_mid_stream_frees_the_slot(served):
    before = served.engine.stats()
    with httpx.stream("POST", served.url + "/v1/completions", headers=AUTH, timeout=60,
                      json={"prompt": "x", "max_tokens": CTX - 1, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())  # the first token arrived: the request holds a slot
        assert first.startswith("data: {"), first

    t0 = time.perf_counter()
    while served.running() and time.perf_counter() - t0 < 5:
        time.sleep(0.01)
    assert served.running() == 0
    time.sleep(0.2)
    after = served.engine.stats()
    assert after["finished"]["cancelled"] == before["finished"]["cancelled"] + 1  # stopped, not ran to the end
    assert after["tokens_generated"] - before["tokens_generated"] < CTX - 1


@pytest.mark.parametrize("body, status, param, code", [
    (b"", 400, None, "invalid_json"),
    (b'{"prompt": "x",', 400, None, "invalid_json"),
    (b'{"prompt": "\xff\xfe"}', 400, None, "invalid_json"),
    (b'["prompt"]', 400, None, "invalid_json"),
    (b'{"prompt": "x", "temperature": NaN}', 400, None, "invalid_json"),
    (b'{"prompt": "x", "temperature": -1}', 400, "temperature", "invalid_value"),
    (b'{"prompt": "x", "temperature": "hot"}', 400, "temperature", "invalid_value"),
    (b'{"prompt": "x", "top_p": -0.1}', 400, "top_p", "invalid_value"),
    (b'{"prompt": "x", "top_p": 1.5}', 400, "top_p", "invalid_value"),
    (b'{"prompt": "x", "top_k": -5}', 400, "top_k", "invalid_value"),
    (b'{"prompt": "x", "max_tokens": -1}', 400, "max_tokens", "invalid_value"),
    (b'{"prompt": "x", "max_tokens": 1.5}', 400, "max_tokens", "invalid_value"),
    (b'{"prompt": "x", "n": 0}', 400, "n", "invalid_value"),
    (json.dumps({"prompt": "x", "max_tokens": CTX}).encode(), 400, "max_tokens", "context_length_exceeded"),
    # a huge bound (run until eot) is capped by the context up front: no allocation for it
    (b'{"prompt": "x", "max_tokens": 10000000000}', 400, "max_tokens", "context_length_exceeded"),
    (b'{"prompt": "x", "max_tokens": 100000000000000000000000000000}', 400, "max_tokens", "context_length_exceeded"),
    (json.dumps({"prompt": [1] * (CTX + 1)}).encode(), 400, "prompt", "context_length_exceeded"),
    (b'{"prompt": [99999999]}', 400, "prompt", None),
    (b'{"prompt": 5}', 400, "prompt", "invalid_value"),
    (b'{"max_tokens": 5}', 400, "prompt", "missing_field"),
    (b'{"prompt": "x", "logit_bias": {"one": 5}}', 400, "logit_bias", None),
    (b'{"prompt": "x", "logit_bias": {"50257": 5}}', 400, "logit_bias", None),
    (b'{"prompt": "x", "logit_bias": {"1": 101}}', 400, "logit_bias", "invalid_value"),
    (b'{"prompt": "x", "frequency_penalty": 2.5}', 400, "frequency_penalty", "invalid_value"),
    (b'{"prompt": "x", "stop_token_ids": [50257]}', 400, "stop_token_ids", None),
    (b'{"prompt": "x", "max_tokens": 3, "min_tokens": 4}', 400, "min_tokens", None),
    (b'{"prompt": "x", "presence_penalty": "high"}', 400, "presence_penalty", "invalid_value"),
    (b'{"prompt": "x", "repetition_penalty": 0}', 400, "repetition_penalty", "invalid_value"),
    (b'{"prompt": "x", "repetition_penalty": -1.2}', 400, "repetition_penalty", "invalid_value"),
    (b'{"prompt": "x", "repetition_penalty": 1e300}', 400, "repetition_penalty", "invalid_value"),  # was a 500
    (b'{"prompt": "x", "repetition_penalty": 1e-300}', 400, "repetition_penalty", "invalid_value"),
    (b'{"prompt": "x", "min_p": 1.5}', 400, "min_p", "invalid_value"),
    (b'{"prompt": "x", "min_p": -0.1}', 400, "min_p", "invalid_value"),
    (b'{"prompt": "x", "best_of": 3}', 400, "best_of", "unsupported_value"),
    (b'{"prompt": "x", "mirostat": 2}', 400, "mirostat", "unsupported_field"),
    (b'{"prompt": "x", "stream_options": {"include_usage": true}}', 400, "stream_options", None),
    (b'{"prompt": "x", "stop": ["ok", ""]}', 400, "stop", "invalid_value"),
    (json.dumps({"prompt": "x", "stop": [str(i) for i in range(33)]}).encode(), 400, "stop", "invalid_value"),
    (b'{"prompt": "x", "logit_bias": {"\xd9\xa1": 5}}', 400, "logit_bias", None),  # Arabic-Indic "1": not an id
    (b'{"prompt": "x", "response_format": {"type": "json_object"}}', 400, "response_format", "unsupported_value"),
    (b'{"prompt": null}', 400, "prompt", "invalid_value"),
    # more completions than the engine holds (4 slots + 4 queued) would be a 429 on every retry
    (json.dumps({"prompt": ["a"] * 3, "n": 3}).encode(), 400, "n", None),
    (json.dumps({"prompt": ["a"] * 9}).encode(), 400, "prompt", None),
    (b'{"prompt": "x", "model": "gpt-4"}', 404, "model", "model_not_found"),
    (b'{"prompt": "' + b"a" * (1 << 20) + b'"}', 413, None, "request_too_large"),
])
def test_bad_requests_get_openai_errors_naming_the_problem(served, body, status, param, code):
    r = served.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and (code is None or err["code"] == code)


def test_null_optional_fields_mean_their_defaults_as_in_openais_spec(served, client):
    """OpenAI's spec marks the optional fields nullable and openai-python sends an explicit None as
    null: null must mean the default, not a 400. (max_tokens null keeps its meaning: up to the context.)"""
    ids = served.tok.encode("Hello")
    nulls = dict(temperature=None, top_p=None, n=None, stream=None, presence_penalty=None, frequency_penalty=None,
                 echo=None, best_of=None, logprobs=None, seed=None, stop=None, suffix=None, user=None)
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, **nulls,
                                  extra_body=dict(top_k=None, min_p=None, repetition_penalty=None, min_tokens=None,
                                                  ignore_eos=None, skip_special_tokens=None, stop_token_ids=None))
    assert len(r.choices) == 1 and r.choices[0].logprobs is None and r.usage.completion_tokens == 4
    greedy = served.post("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "top_p": None,
                                             "presence_penalty": None, "repetition_penalty": None}).json()
    assert greedy["choices"][0]["text"] == served.text(served.greedy(ids, 4))
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi", "name": None}],
                                          max_tokens=2, temperature=None, logprobs=None, top_logprobs=None,
                                          max_completion_tokens=None, n=None, stream=None,
                                          response_format={"type": "text"})  # OpenAI's default format: a no-op
    assert chat.choices[0].logprobs is None and chat.usage.completion_tokens == 2
    # Fields we do not implement, given null, ask for nothing (SDKs that write every field; a reply's
    # message sent back as history): not a 400. A value still is one.
    body = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Yo", "refusal": None, "tool_calls": None,
                          "function_call": None, "audio": None},
                         {"role": "user", "content": [{"type": "text", "text": "x", "cache_control": None}]}],
            "max_tokens": 2, "temperature": 0, "tools": None, "tool_choice": None, "store": None, "metadata": None,
            "parallel_tool_calls": None, "functions": None, "stream_options": None}
    r = served.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    r = served.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "store": None, "metadata": None})
    assert r.status_code == 200, r.text
    r = served.post("/v1/chat/completions", {**body, "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    # OpenAI fields at values that ask for nothing here are accepted (clients that always send them) ...
    noops = {"store": False, "metadata": {"run": "a"}, "service_tier": "auto", "modalities": ["text"]}
    for path, req in (("/v1/chat/completions", body), ("/v1/completions", {"prompt": "Hi", "max_tokens": 2})):
        r = served.post(path, {**req, **noops})
        assert r.status_code == 200, r.text
    # ... and a 400 naming them where they would ask for something
    for field, value in (("store", True), ("service_tier", "flex"), ("modalities", ["text", "audio"])):
        r = served.post("/v1/chat/completions", {**body, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_top_p_0_keeps_only_the_most_likely_token_as_openai_and_llama_cpp_take_it(served, client):
    """top_p=0 (OpenAI's range is [0, 1]; "temperature=0, top_p=0" is a common recipe for repeatable
    output) was a 400; it is greedy now, as llama.cpp's nucleus of mass 0 keeps one token."""
    ids = served.tok.encode("Once upon a time")
    want = served.text(served.greedy(ids, 8))
    for seed in (1, 2):
        r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, top_p=0,
                                      temperature=1.0, seed=seed)
        assert r.choices[0].text == want
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          top_p=0, n=2)
    assert chat.choices[0].message.content == chat.choices[1].message.content


def test_include_usage_puts_usage_null_in_every_chunk_but_the_last(served):
    """OpenAI: with stream_options.include_usage every chunk carries "usage": null and a last chunk
    (choices []) the usage; the echo chunk of a completions stream lacked the null."""
    for path, body in (("/v1/completions", {"prompt": "Hi", "max_tokens": 3, "echo": True, "n": 2}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})):
        _, chunks = _stream_pieces(served, path, {**body, "stream_options": {"include_usage": True}})
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1]), chunks
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_a_compressed_body_is_refused_by_its_encoding_not_as_bad_utf8(served):
    import gzip

    r = served.post("/v1/completions", content=gzip.compress(b'{"prompt": "x", "max_tokens": 1}'),
                    headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_content_encoding"
    assert "uncompressed" in r.json()["error"]["message"]
    r = served.post("/v1/completions", {"prompt": "x", "max_tokens": 1}, headers={"Content-Encoding": "identity"})
    assert r.status_code == 200


def test_405_lists_the_allowed_methods(served):
    assert httpx.get(served.url + "/v1/models/", headers=AUTH).json()["data"][0]["id"] == "tiny"  # was a 404
    r = httpx.delete(served.url + "/v1/completions", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "POST" in r.json()["error"]["message"]
    r = httpx.post(served.url + "/v1/models", headers=AUTH)
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert r.json()["error"]["code"] == "method_not_allowed"
    for path in ("/v1/models", "/v1/models/tiny", "/metrics"):  # RFC 9110: GET resources answer HEAD (was 405)
        r = httpx.head(served.url + path, headers=AUTH)
        assert r.status_code == 200 and r.content == b"", path


def test_top_k_beyond_the_vocabulary_keeps_every_token_instead_of_failing(served):
    """A top_k larger than int64 reached the engine's per-row tensor and failed the request with a 500."""
    for top_k in (10**20, 60000):
        r = served.post("/v1/completions", {"prompt": "Hi", "max_tokens": 3, "seed": 3, "top_k": top_k})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == served.post(
            "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "seed": 3}).json()["choices"][0]["text"]


def test_chat_text_parts_join_with_newlines_as_vllm_joins_them(served, client):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    joined = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello\nthere"}],
                                            max_tokens=5, temperature=0)
    split = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}],
                                           max_tokens=5, temperature=0)
    assert split.usage.prompt_tokens == joined.usage.prompt_tokens
    assert split.choices[0].message.content == joined.choices[0].message.content


def test_chat_logprobs_bytes_are_the_tokens_own_bytes(served, client):
    """A byte-level token holding part of a character has text U+FFFD; its ``bytes`` must be its
    own UTF-8 bytes (what OpenAI's field is for: joining split characters), not U+FFFD's."""
    first, second = served.tok.encode("\U0001F44D")  # one emoji: 4 bytes over 2 tokens
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                          temperature=0, logprobs=True, top_logprobs=1,
                                          logit_bias={str(first): 100})
    content = chat.choices[0].logprobs.content
    assert content[0].token == "\ufffd" and content[0].bytes == list(served.tok.token_bytes(first))
    assert bytes(content[0].bytes + list(served.tok.token_bytes(second))) == "\U0001F44D".encode()
    assert all(e.bytes == list(e.token.encode()) for e in content[1:] if "\ufffd" not in e.token)


def test_logit_bias_and_penalties_through_the_openai_client(served, client):
    """OpenAI's fields reach the engine: a +100 bias forces its token (completions and chat), and
    a frequency penalty gives what the engine gives for the same SamplingParams."""
    forced = served.tok.encode(" the")[0]
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == served.tok.decode([forced] * 6)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0.9, seed=1, logit_bias={str(forced): 100})
    assert chat.choices[0].message.content == served.tok.decode([forced] * 4)
    prompt = served.tok.encode("To be, or not to be")
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    penalized = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=1.0).choices[0].text
    want = served.engine.submit(prompt, SamplingParams(max_tokens=24, temperature=0, frequency_penalty=2.0,
                                                       presence_penalty=1.0, stop_token_ids=(served.tok.eot,)))
    ids = [e.token for e in want.events() if hasattr(e, "token")]
    assert penalized == served.text(ids) and penalized != plain
    # vLLM's extensions: ignore_eos (its benchmark client sends it), stop_token_ids, min_tokens.
    eot = str(served.tok.eot)
    body = {"prompt": "Hello", "max_tokens": 5, "temperature": 0, "logit_bias": {eot: 100}}
    r = served.post("/v1/completions", body).json()["choices"][0]
    assert (r["text"], r["finish_reason"]) == ("", "stop")
    r = served.post("/v1/completions", {**body, "ignore_eos": True}).json()
    # end-of-text generated 5 times, counted, but no text: vLLM's skip_special_tokens (default true)
    got = (r["choices"][0]["text"], r["choices"][0]["finish_reason"], r["usage"]["completion_tokens"])
    assert got == ("", "length", 5)
    pieces, _ = _stream_pieces(served, "/v1/completions", {**body, "ignore_eos": True})
    assert "".join(pieces) == ""
    r = served.post("/v1/completions", {**body, "ignore_eos": True, "skip_special_tokens": False}).json()["choices"][0]
    assert (r["text"], r["finish_reason"]) == (served.tok.decode([served.tok.eot] * 5), "length")
    r = served.post("/v1/completions", {**body, "min_tokens": 3, "logit_bias": {eot: 100, str(forced): 50}}).json()
    assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == (served.tok.decode([forced] * 3), "stop")
    r = served.post("/v1/completions", {**body, "logit_bias": {str(forced): 100}, "stop_token_ids": [forced]})
    assert (r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]) == ("", "stop")


def test_the_end_of_text_that_ends_a_choice_is_counted_and_listed_as_vllm_does(served, client):
    """usage.completion_tokens counts every generated token, the end-of-text (or stop token) that
    ended a choice included, and logprobs list it ("<|endoftext|>", no text), as vLLM does: the
    logprobs and the count always agree. Before, the engine dropped it: a choice ended at once by
    end-of-text reported 0 completion tokens."""
    eot = served.tok.eot
    body = {"prompt": "Hi", "max_tokens": 6, "temperature": 0, "min_tokens": 2, "logit_bias": {str(eot): 100}}
    r = client.completions.create(model="tiny", logprobs=1, **{k: body[k] for k in ("prompt", "max_tokens",
                                                                                       "temperature", "logit_bias")},
                                  extra_body={"min_tokens": 2})
    c = r.choices[0]
    assert c.finish_reason == "stop" and r.usage.completion_tokens == 3 == len(c.logprobs.tokens)
    assert c.logprobs.tokens[-1] == "<|endoftext|>" and c.logprobs.text_offset[-1] == len(c.text)
    assert "".join(c.logprobs.tokens[:2]) == c.text
    chunks = list(client.completions.create(model="tiny", logprobs=1, stream=True,
                                            stream_options={"include_usage": True},
                                            **{k: body[k] for k in ("prompt", "max_tokens", "temperature",
                                                                    "logit_bias")}, extra_body={"min_tokens": 2}))
    assert chunks[-1].usage.completion_tokens == 3
    assert [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens] \
        == c.logprobs.tokens
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                          temperature=0, logprobs=True, logit_bias={str(eot): 100})
    content = chat.choices[0].logprobs.content
    assert chat.choices[0].message.content == "" and chat.choices[0].finish_reason == "stop"
    assert chat.usage.completion_tokens == 1 and [t.token for t in content] == ["<|endoftext|>"]
    # stop_token_ids: the same
    r = served.post("/v1/completions", {**body, "logit_bias": {"11": 100}, "stop_token_ids": [11]}).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 3


def test_min_tokens_holds_back_stop_strings_too_as_vllm(served):
    """vLLM's min_tokens: its detokenizer looks for stop strings only once more than min_tokens
    tokens are out (a stop string completed then counts even if it began earlier). Before, a stop
    string ended the choice at once, min_tokens or not."""
    ids = served.tok.encode("The quick brown fox")
    new = served.greedy(ids, 30)
    new = new[: new.index(served.tok.eot)] if served.tok.eot in new else new
    k = 8
    full, head = served.tok.decode(new), served.tok.decode(new[:k])
    stop = next(ch for ch in " etaoinsrhl" if ch in head and ch in full[len(head):])
    body = {"prompt": ids, "max_tokens": len(new), "temperature": 0, "stop": [stop]}
    r = served.post("/v1/completions", body).json()["choices"][0]
    assert (r["text"], r["finish_reason"]) == (full[: full.index(stop)], "stop")
    r = served.post("/v1/completions", {**body, "min_tokens": k}).json()["choices"][0]
    at = full.index(stop, len(head) - len(stop) + 1)  # the first one ending after the k tokens' text
    assert (r["text"], r["finish_reason"]) == (full[:at], "stop")
    pieces, _ = _stream_pieces(served, "/v1/completions", {**body, "min_tokens": k})
    assert "".join(pieces) == full[:at]
    r = served.post("/v1/completions", {**body, "min_tokens": len(new)}).json()["choices"][0]
    assert (r["text"], r["finish_reason"]) == (full, "length")


def test_repetition_penalty_and_min_p_through_the_openai_client(served, client):
    """vLLM's extensions (the openai client sends them in ``extra_body``) reach the engine: the
    completion is what ``generate`` gives with the same settings; in chat, min_p=1 keeps only the
    most likely token, so sampling at temperature 1.5 gives the greedy text."""
    from gpt2model.generate import generate

    ids = served.tok.encode("To be, or not to be")
    eot = served.tok.eot
    plain = client.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0).choices[0].text
    for kw, extra in ((dict(temperature=0), {"repetition_penalty": 1.3}),
                      (dict(temperature=1.0, seed=3), {"min_p": 0.3, "repetition_penalty": 1.1})):
        got = client.completions.create(model="tiny", prompt=ids, max_tokens=20, extra_body=extra, **kw)
        want = generate(served.ref, [ids], 20, eot_id=eot, **kw, **extra)[0][len(ids):]
        assert got.choices[0].text == served.text(want), extra
    assert got.choices[0].text != plain
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0,
                                     extra_body={"repetition_penalty": 1.3}).choices[0].text != plain
    messages = [{"role": "user", "content": "Hello there"}]
    chat = client.chat.completions.create
    greedy = chat(model="tiny", messages=messages, max_tokens=10, temperature=0).choices[0].message.content
    penalized = chat(model="tiny", messages=messages, max_tokens=10, temperature=0,
                     extra_body={"repetition_penalty": 1.3}).choices[0].message.content
    hot = chat(model="tiny", messages=messages, max_tokens=10, temperature=1.5, seed=1,
               extra_body={"repetition_penalty": 1.3, "min_p": 1.0}).choices[0].message.content
    assert hot == penalized != greedy
    r = served.post("/v1/chat/completions", {"messages": messages, "min_p": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_p"


def test_bad_chat_requests(served):
    def err(body: dict) -> tuple[int, str]:
        r = served.post("/v1/chat/completions", body)
        return r.status_code, r.json()["error"]["param"]

    assert err({"messages": []}) == (400, "messages")
    assert err({"messages": [{"role": "tool", "content": "x"}]}) == (400, "messages.0.role")
    assert err({"messages": [{"role": "user"}]}) == (400, "messages.0.content")
    assert err({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}) == (400, "top_logprobs")
    assert err({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 999}) == \
        (400, "max_completion_tokens")
    assert err({"messages": [{"role": "user", "content": "x"}], "tools": []}) == (400, "tools")


def test_what_gpt2_cannot_do_is_said_in_one_sentence_naming_the_fix(served):
    """A tool message, an image part or a mistyped prompt got pydantic's list of every union
    branch ("valid string; or Input should be 'text'; or Field required; or Extra inputs are not
    permitted"), naming neither the problem nor the fix."""
    def err(path: str, body: dict) -> dict:
        r = served.post(path, body)
        assert r.status_code == 400, r.text
        return r.json()["error"]

    e = err("/v1/chat/completions", {"messages": [{"role": "tool", "content": "4", "tool_call_id": "c1"}]})
    assert e["param"] == "messages.0.role" and "no tool calling" in e["message"] and "Extra" not in e["message"]
    image = {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}
    e = err("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, image]}]})
    assert e["param"] == "messages.0.content" and "'image_url' are not supported" in e["message"]
    assert "text only" in e["message"] and " or Field required" not in e["message"]
    e = err("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]})
    assert "'messages.0.content.0.text' is required" in e["message"], e
    for prompt in ([1, "a"], {"a": 1}, [[1], "a"], None, 3):
        e = err("/v1/completions", {"prompt": prompt})
        assert e["param"] == "prompt" and "a list of token ids" in e["message"], e


def test_malformed_requests_never_take_the_engine_down(served):
    bad = [b"", b"{", b"\xff", b'{"prompt": null}', b'{"prompt": [[]]}', b'{"prompt": "x", "n": 1e400}',
           b'{"prompt": "x", "stop": [1]}', b'{"prompt": {"a": 1}}', b"[" * 100000]
    for body in bad:
        r = served.post("/v1/completions", content=body)
        assert 400 <= r.status_code < 500, (body[:20], r.status_code, r.text)
    ids = [464, 2068]
    r = served.post("/v1/completions", {"prompt": ids, "max_tokens": 10, "temperature": 0})
    assert r.json()["choices"][0]["text"] == served.text(served.greedy(ids, 10))
    assert served.engine.stats()["running"] == 0


def test_full_queue_answers_429_with_retry_after(served):
    body = {"prompt": "busy", "max_tokens": 40, "temperature": 0}
    with ThreadPoolExecutor(12) as pool:  # 4 slots + 4 queued: the rest must be refused at once
        rs = list(pool.map(lambda _: served.post("/v1/completions", body), range(12)))
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) >= 4 and 429 in codes and set(codes) <= {200, 429}
    refused = next(r for r in rs if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["code"] == "queue_full"
    assert refused.json()["error"]["message"].count("retry") == 1, refused.json()  # said once


def test_api_key_guards_the_openai_api_and_leaves_probes_open(served):
    # vLLM's rule: the key guards /v1; health checks (GET or HEAD) and Prometheus scrapes need none.
    assert httpx.get(served.url + "/health").status_code == 200
    assert httpx.head(served.url + "/health").status_code == 200
    assert httpx.get(served.url + "/metrics").status_code == 200
    for path in ("/v1/models", "/v1"):
        assert httpx.get(served.url + path).status_code == 401
    r = httpx.post(served.url + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["WWW-Authenticate"] == "Bearer"  # RFC 9110: a 401 names its scheme (was missing)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_n_echo_logprobs_and_tokenize(served, client):
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=6, n=3, temperature=1.0, seed=5,
                                  logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.text for c in r.choices}) > 1
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == len(c.logprobs.top_logprobs)
        # the 2 most likely and the chosen one (OpenAI: "up to logprobs+1 elements")
        assert all(2 <= len(top) <= 3 and top[t] == lp for t, lp, top in zip(
            c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.top_logprobs, strict=True))
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    echo = client.completions.create(model="tiny", prompt="Hi there", max_tokens=4, temperature=0, echo=True)
    assert echo.choices[0].text == "Hi there" + served.text(served.greedy(served.tok.encode("Hi there"), 4))
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].top_logprobs[0].logprob == content[0].logprob  # greedy picks the most likely
    two = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=2, temperature=0)
    assert [c.text for c in two.choices] == [served.text(served.greedy(served.tok.encode(p), 2)) for p in "ab"]

    tok = served.post("/tokenize", {"prompt": "Hello world"}).json()
    assert tok == {"tokens": [15496, 995], "count": 2, "max_model_len": CTX}
    assert served.post("/detokenize", {"tokens": [15496, 995]}).json() == {"prompt": "Hello world"}
    chat_tok = served.post("/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat_tok["tokens"] == served.tok.encode("User: Hi\nAssistant:")


def test_echo_with_logprobs_gives_the_prompt_logprobs_too(served, client):
    """OpenAI's legacy shape: the echoed prompt's tokens come first, the first with null logprob and
    top_logprobs; each logprob is the model's, and text_offset runs over echo + completion."""
    prompt = "Hello world, this is"
    ids = served.tok.encode(prompt)
    with torch.no_grad():
        logp = served.ref(torch.tensor([ids]))[0].log_softmax(-1)
    new = served.greedy(ids, 3)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt + served.text(new)
    assert lp.tokens == [served.tok.decode([t]) for t in ids + new]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)],
                                                          abs=1e-4)
    assert all(len(top) in (2, 3) for top in lp.top_logprobs[1:])
    assert lp.text_offset == [len(served.tok.decode((ids + new)[:i])) for i in range(len(ids + new))]
    # Streamed: the first chunk carries the echo and the prompt's logprobs; the rest match too.
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    assert chunks[0].choices[0].text == prompt and chunks[0].choices[0].logprobs.tokens == lp.tokens[:len(ids)]
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert sum((x.token_logprobs for x in streamed), []) == lp.token_logprobs
    assert sum((x.text_offset for x in streamed), []) == lp.text_offset


def test_scoring_a_prompt_with_max_tokens_0_and_echo(served, client):
    """OpenAI's legacy scoring call (vLLM has it too): echo + logprobs + max_tokens=0 returns the
    prompt and its logprobs and generates nothing; the prompt may fill the whole context. lm-eval's
    local-completions client (max_tokens=1) gets the same logprobs."""
    ids = [int(t) for t in torch.randint(0, 50257, (CTX,), generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        logp = served.ref(torch.tensor([ids]))[0].log_softmax(-1)
    want = [float(logp[i, ids[i + 1]]) for i in range(CTX - 1)]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.finish_reason == "length" and c.text == served.tok.decode(ids)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == CTX
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    short = ids[:20]
    one = client.completions.create(model="tiny", prompt=short, max_tokens=1, echo=True, logprobs=1, temperature=0)
    zero = client.completions.create(model="tiny", prompt=short, max_tokens=0, echo=True, logprobs=1)
    assert one.choices[0].logprobs.token_logprobs[:20] == zero.choices[0].logprobs.token_logprobs
    chunks = list(client.completions.create(model="tiny", prompt=short, max_tokens=0, echo=True, logprobs=1,
                                            stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == served.tok.decode(short)
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == "length"
    # Batched with other requests too, and the engine is left clean.
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda k: served.post("/v1/completions", {"prompt": short, "max_tokens": k, "echo": True,
                                                                     "logprobs": 0, "temperature": 0}), [0, 3, 0, 5]))
    assert [len(x.json()["choices"][0]["logprobs"]["tokens"]) for x in rs] == [20, 23, 20, 25]
    assert served.engine.stats()["running"] == 0
    # Without echo, max_tokens=0 would return nothing at all: a 400 that says so.
    bad = served.post("/v1/completions", {"prompt": "x", "max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    assert served.post("/v1/completions", {"prompt": ids + [1], "max_tokens": 0, "echo": True}).json()[
        "error"]["code"] == "context_length_exceeded"


def test_lm_evaluation_harness_scores_through_the_server(served, model_dir):
    """lm-eval's own API client (`--model local-completions`) against the server: its
    log-likelihoods and greedy flags equal a direct forward of the same weights, and its
    generate_until stops where asked."""
    pytest.importorskip("tenacity")  # lm-eval[api]; in the dev extra
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=served.url + "/v1/completions", model="tiny", tokenizer_backend="huggingface",
                             tokenizer=str(model_dir), header=AUTH, max_length=CTX, num_concurrent=2)
    pairs = [("The cat sat on the", " mat"), ("Hello,", " world!"), ("To be or not", " to be, that is")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (context, continuation), (ll, greedy) in zip(pairs, got, strict=True):
        ctx = served.tok.encode(context)
        cont = served.tok.encode(context + continuation)[len(ctx):]
        with torch.no_grad():
            logp = served.ref(torch.tensor([ctx + cont]))[0].log_softmax(-1)[len(ctx) - 1:-1]
        assert ll == pytest.approx(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
    prompt = "Once upon a time"
    want = served.text(served.greedy(served.tok.encode(prompt), 12))
    (out,) = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["\n\n"], "max_gen_toks": 12}),
                                         0)])
    assert out == want.split("\n\n")[0]


def test_model_retrieve_tokenize_fields_and_invalid_unicode(served, client):
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    # vLLM clients send add_special_tokens; GPT-2 adds none either way.
    assert served.post("/tokenize", {"prompt": "Hello world", "add_special_tokens": False}).json()["tokens"] == \
        [15496, 995]
    # JSON can spell an unpaired UTF-16 surrogate; no text holds one: a 400, never a silently altered prompt.
    for path, body in (("/v1/completions", b'{"prompt": "ab\\ud800c", "max_tokens": 2}'),
                       ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}'),
                       ("/tokenize", b'{"prompt": "\\ud800"}')):
        r = served.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], (path, r.text)


def test_metrics_report_requests_tokens_and_latency_histograms(served):
    text = httpx.get(served.url + "/metrics", headers=AUTH).text
    for name in ("gpt2model_requests_running", "gpt2model_requests_queued", "gpt2model_generation_tokens_total",
                 "gpt2model_time_to_first_token_seconds_bucket", "gpt2model_inter_token_latency_seconds_bucket"):
        assert name in text
    tokens = float(next(ln.split()[1] for ln in text.splitlines()
                        if ln.startswith("gpt2model_generation_tokens_total")))
    assert tokens > 0
    # Typed for Prometheus: what only grows is a counter (rate() needs it), the limits are gauges.
    from prometheus_client.parser import text_string_to_metric_families

    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["gpt2model_engine_steps"] == types["gpt2model_engine_step_seconds"] == "counter"
    assert types["gpt2model_engine_max_batch"] == "gauge" and types["gpt2model_requests_finished"] == "counter"
    assert 'gpt2model_requests_finished_total{reason="length"}' in text


def test_a_stop_string_counts_as_stop_in_metrics_not_cancelled(served):
    ids = served.tok.encode("Hello")
    text = served.text(served.greedy(ids, 10))
    before = served.engine.stats()["finished"]
    r = served.post("/v1/completions", {"prompt": ids, "max_tokens": 10, "temperature": 0, "stop": text[2:5]})
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    deadline = time.monotonic() + 10
    while served.engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    after = served.engine.stats()["finished"]
    assert after["stop"] - before["stop"] == 1 and after["cancelled"] == before["cancelled"]


def test_health_is_503_until_the_engine_has_warmed_up(model_dir):
    from fastapi.testclient import TestClient

    engine = Engine(GPT.from_pretrained(model_dir), max_batch=1, max_queue=1)
    client = TestClient(create_app(engine, load_tokenizer(model_dir), ServerConfig(model_name="m")))
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    engine.start()
    assert engine.ready.wait(60)
    assert client.get("/health").status_code == 200
    engine.shutdown(1)


def test_custom_chat_template(model_dir, tmp_path):
    from fastapi.testclient import TestClient

    engine = Engine(GPT.from_pretrained(model_dir), max_batch=1, max_queue=1)
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    client = TestClient(create_app(engine, load_tokenizer(model_dir), ServerConfig(model_name="m",
                                                                                    chat_template=template)))
    r = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.json()["tokens"] == load_tokenizer(model_dir).encode("<user>Hi<assistant>")


# Templates as HF models ship them (tokenizer_config.json's chat_template): ChatML; Llama-2's shape with
# bos/eos tokens, raise_exception and whitespace that trim_blocks/lstrip_blocks remove; one testing an
# absent key (undefined = false in HF's Jinja) with loop controls. Each ends with a newline, as files do.
HF_TEMPLATES = [
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}\n",
    "{% if messages[0]['role'] == 'system' %}\n    {% set system = messages[0]['content'] %}\n"
    "    {% set messages = messages[1:] %}\n{% else %}\n    {% set system = '' %}\n{% endif %}\n"
    "{% for message in messages %}\n    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {% endif %}\n    {% if message['role'] == 'user' %}\n"
    "        {{ bos_token + '[INST] ' + (('<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n') if loop.first and system "
    "else '') + message['content'] + ' [/INST]' }}\n    {% else %}\n"
    "        {{ ' ' + message['content'] + ' ' + eos_token }}\n    {% endif %}\n{% endfor %}\n",
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{% if m.name %}{{ m.name }}"
    "{% else %}{{ m.role }}{% endif %}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}bot:"
    "{% endif %}\n",
]


@pytest.mark.parametrize("template", HF_TEMPLATES)
def test_chat_templates_render_as_transformers_renders_them(model_dir, template):
    """A template written for HF (or vLLM, which renders with HF) failed here (bos_token /
    raise_exception undefined, StrictUndefined on an absent key) or rendered other whitespace
    (no trim_blocks/lstrip_blocks, the file's trailing newline kept). The ids must be those of
    transformers' apply_chat_template on the same folder's tokenizer ({{ eos_token }} = the
    end-of-text id); "<|endoftext|>" typed in a message stays text."""
    from fastapi.testclient import TestClient

    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2TokenizerFast.from_pretrained(model_dir)
    engine = Engine(GPT.from_pretrained(model_dir), max_batch=1, max_queue=1)
    client = TestClient(create_app(engine, load_tokenizer(model_dir), ServerConfig(model_name="m",
                                                                                    chat_template=template)))
    chats = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Héllo 👍 again", "name": "bo"}],
             [{"role": "user", "content": "One\n\ntwo "}]]
    for messages in chats:
        r = client.post("/tokenize", json={"messages": messages})
        assert r.status_code == 200, r.text
        want = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=True)
        assert r.json()["tokens"] == list(getattr(want, "input_ids", want))
    if "raise_exception" in template:
        r = client.post("/tokenize", json={"messages": [{"role": "assistant", "content": "x"}]})
        assert r.status_code == 400 and "roles must alternate" in r.json()["error"]["message"]
        ids = client.post("/tokenize", json={"messages": [{"role": "user", "content": "<|endoftext|>"}]}).json()
        assert ids["tokens"].count(hf.eos_token_id) == 1  # the template's bos_token only


def test_char_model_rejects_characters_outside_its_vocabulary(tmp_path):
    from fastapi.testclient import TestClient

    from gpt2model.tokenizer import CharTokenizer

    tok = CharTokenizer("\n abcdefghijklmnopqrstuvwxyz:")
    engine = Engine(GPT(GPTconfig(vocab_size=tok.vocab_size, context_length=32, n_layer=1, n_head=2, d_model=32)),
                    max_batch=1, max_queue=1)
    client = TestClient(create_app(engine, tok, ServerConfig(model_name="m")))
    r = client.post("/v1/completions", json={"prompt": "héllo"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "'é'" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": ""})
    assert r.status_code == 400 and "end-of-text" in r.json()["error"]["message"]


def test_serve_shortens_the_gil_switch_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server process hands the GIL between its HTTP and inference threads every 0.5 ms, not
    every 5 ms (the inference thread needs it back after every torch op)."""
    from gpt2model import server as server_mod

    intervals: list[float] = []
    monkeypatch.setattr(server_mod.sys, "setswitchinterval", intervals.append)  # not this test process's
    monkeypatch.setattr(server_mod._GracefulServer, "run", lambda self: None)  # build everything, serve nothing
    model = GPT(GPTconfig(vocab_size=30, context_length=16, n_layer=1, n_head=2, d_model=16))
    assert server_mod.serve(model, load_tokenizer("gpt2"), port=0) == 0
    assert intervals == [server_mod.GIL_SWITCH_INTERVAL] and server_mod.GIL_SWITCH_INTERVAL <= 0.001
    for bad in (float("nan"), float("inf"), -1.0):  # were "cannot convert float NaN to integer" / OverflowError
        with pytest.raises(ValueError, match="request_timeout .* finite number of seconds >= 0"):
            server_mod.serve(model, load_tokenizer("gpt2"), port=0, request_timeout=bad)


def _serve_char_model(tmp_path: Path, serve_args: list[str], **shape: int) -> tuple[subprocess.Popen, str]:
    """``gpt2 serve`` in a subprocess on a free 127.0.0.1 port over a small random character model
    (it starts faster than with the 50,257-token BPE) of ``shape``, once /health says ready; the
    caller kills it if it is still running."""
    from gpt2model.tokenizer import CharTokenizer

    tok = CharTokenizer("\n abcdefghijklmnopqrstuvwxyz")
    torch.manual_seed(0)
    model_dir = tmp_path / "char"
    GPT(GPTconfig(vocab_size=tok.vocab_size, n_head=2, **shape)).save_pretrained(model_dir, tokenizer=tok)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "gpt2model", "serve", "--model", str(model_dir), "--port",
                             str(port), "--device", "cpu", *serve_args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 60:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


def test_sigterm_finishes_running_requests_and_exits_0(tmp_path):
    proc, url = _serve_char_model(tmp_path, ["--max-batch", "2", "--request-timeout", "20",
                                             "--max-prefill-tokens", "16"], context_length=64, n_layer=1, d_model=32)
    try:
        pieces = []
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "x", "max_tokens": 40, "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            pieces.append(next(lines))
            proc.send_signal(signal.SIGTERM)  # mid-stream: this request still completes
            pieces.extend(lines)
        pieces = [p for p in pieces if p]  # SSE events are separated by blank lines
        assert pieces[-1] == "data: [DONE]"
        finishes = [json.loads(p[6:])["choices"][0]["finish_reason"] for p in pieces if p.startswith("data: {")]
        assert finishes[-1] == "length"
        assert proc.wait(30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_past_the_request_timeout_answers_what_it_cancels(tmp_path):
    """Requests still running (or queued) at --request-timeout after SIGTERM are cancelled by the
    engine and answered: a 503 in OpenAI's shape, a stream's error event and [DONE]. Before,
    uvicorn's own deadline cut them: a bare text "500 Internal Server Error", a stream broken
    without [DONE], and a traceback per request in the log."""
    proc, url = _serve_char_model(tmp_path, ["--max-batch", "1", "--request-timeout", "0"],
                                  context_length=1024, n_layer=2, d_model=64)
    body = {"prompt": "x", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    try:
        with ThreadPoolExecutor(1) as pool, httpx.stream("POST", url + "/v1/completions", timeout=60,
                                                         json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(lines)
            queued = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60)  # waits for the slot
            while "gpt2model_requests_queued 1.0" not in httpx.get(url + "/metrics").text:
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            rest = [ln for ln in [first, *lines] if ln]
            answer = queued.result()
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["error"]["code"] == "cancelled", rest[-3:]
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "cancelled", answer.text
        assert proc.wait(30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_model_with_more_rows_than_its_tokenizer_serves_only_ids_it_can_decode():
    """A model with 10 rows more than its character tokenizer, whose padding rows win every draw by far
    (a nanoGPT export padded past GPT-2's 50,257 tokens): completions and chat, streamed or not,
    with logprobs, give text and only decodable ids (before: a 500 / a stream ended in an error)."""
    from gpt2model.tokenizer import CharTokenizer

    tok = CharTokenizer("\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:!.,?'")
    n = tok.vocab_size  # the model has 10 rows more
    torch.manual_seed(0)
    model = GPT(GPTconfig(vocab_size=n + 10, context_length=64, n_layer=1, n_head=2, d_model=32)).eval()
    with torch.no_grad():  # as test_generate.padded_rows: ln_f's dimension 0 is 50, read by rows >= n only
        model.transformer.ln_f.weight[0], model.transformer.ln_f.bias[0] = 0.0, 50.0
        model.transformer.wte.weight[:n, 0], model.transformer.wte.weight[n:, 0] = 0.0, 100.0
    with pytest.raises(ValueError, match=r"vocab_limit=tokenizer.vocab_size"):
        create_app(Engine(model), tok, ServerConfig(model_name="m"))
    engine = Engine(model, max_batch=2, max_queue=4, vocab_limit=tok.vocab_size)
    engine.start()
    assert engine.ready.wait(60)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server, thread = _start(create_app(engine, tok, ServerConfig(model_name="m")), sock)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        def ids(text: str) -> list[int]:
            return tok.encode(text)

        for path, body in (("/v1/completions", {"prompt": "ab", "logprobs": 5, "echo": True}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "logprobs": True, "top_logprobs": 5})):
            for temperature in (0, 1.0):
                body = {**body, "max_tokens": 20, "temperature": temperature, "seed": 1}
                r = httpx.post(url + path, json=body, timeout=60)
                assert r.status_code == 200, r.text
                choice = r.json()["choices"][0]
                if "text" in choice:
                    text = choice["text"][2:]  # (echo)
                    lp = choice["logprobs"]
                    assert all(len(ids(t)) <= 1 for top in lp["top_logprobs"][1:] for t in top)
                    assert len(lp["tokens"]) == 22
                else:
                    text = choice["message"]["content"]
                    assert all(len(ids(t["token"])) == 1 for c in choice["logprobs"]["content"]
                               for t in c["top_logprobs"])
                assert len(text) == 20 and choice["finish_reason"] == "length"
                with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as s:
                    assert s.status_code == 200
                    events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
                pieces = [c.get("text") or (c.get("delta") or {}).get("content") or ""
                          for e in events for c in e.get("choices", [])]
                assert "".join(pieces).endswith(text) and not any("error" in e for e in events)
        r = httpx.post(url + "/v1/completions", json={"prompt": [1, n + 5], "max_tokens": 2}, timeout=60)
        assert r.status_code == 400 and f"[0, {n})" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"prompt": "a", "logit_bias": {str(n + 5): 5}}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown(2)


def test_a_repetition_penalty_out_of_range_says_what_is_allowed(served):
    for value in (0, -1, 1e300):
        r = served.post("/v1/completions", {"prompt": "x", "repetition_penalty": value})
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and "must be a number > 0 within float32's range" in message, message


def test_completion_logprobs_offsets_index_into_the_text_and_top_logprobs_hold_the_chosen_token(served, client):
    """text_offset indexes into the returned text, also after a character split over two tokens
    (before: each U+FFFD token counted one character, so every later offset was one too far, and a
    streamed echo disagreed with the same request unstreamed); top_logprobs holds the chosen token
    too, as OpenAI ("up to logprobs+1 elements") and vLLM give it (before: only the top k, and
    logprobs=0 gave {}); streamed and unstreamed logprobs are the same, also for tokens that add no
    text before a stop string (before: dropped from the stream)."""
    prompt = "\u00e9\U0001F600 hello"  # the emoji is 4 bytes over 2 tokens
    for body in ({"logprobs": 2, "seed": 3, "temperature": 1.0}, {"logprobs": 0, "seed": 4, "temperature": 1.0}):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, echo=True, **body)
        text, lp = r.choices[0].text, r.choices[0].logprobs
        assert lp.tokens[:3] == ["\u00e9", "\ufffd", "\ufffd"] and lp.text_offset[:4] == [0, 1, 1, 2]
        for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
            assert "\ufffd" in token or text[offset:].startswith(token), (token, offset, text)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[3 + 1] == len(prompt)
        k = body["logprobs"]
        assert all(top[t] == p and len(top) <= k + 1 for t, p, top in
                   zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True))
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=8, echo=True, stream=True,
                                                **body))
        streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
        assert "".join(c.choices[0].text for c in chunks) == text
        for field in ("tokens", "token_logprobs", "text_offset", "top_logprobs"):
            assert sum((getattr(x, field) for x in streamed), []) == getattr(lp, field), field
    # A stop string that is exactly a later token's text: that token adds no text, yet is listed.
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=8, temperature=0, logprobs=1)
    tokens = r.choices[0].logprobs.tokens
    k = next(i for i in range(1, 8) if tokens[i].strip() and tokens[i] not in "".join(tokens[:i]))
    kw = dict(model="tiny", prompt="Hi", max_tokens=8, temperature=0, logprobs=1, stop=[tokens[k]])
    whole = client.completions.create(**kw).choices[0]
    assert whole.finish_reason == "stop" and whole.logprobs.tokens == tokens[:k + 1]
    chunks = list(client.completions.create(stream=True, **kw))
    assert sum((c.choices[0].logprobs.tokens for c in chunks if c.choices and c.choices[0].logprobs), []) == \
        whole.logprobs.tokens
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, logprobs=True)
    tokens = [t.token for t in client.chat.completions.create(**kw).choices[0].logprobs.content]
    k = next(i for i in range(1, 8) if tokens[i].strip() and tokens[i] not in "".join(tokens[:i]))
    whole = client.chat.completions.create(stop=[tokens[k]], **kw).choices[0]
    assert [t.token for t in whole.logprobs.content] == tokens[:k + 1]
    chunks = list(client.chat.completions.create(stop=[tokens[k]], stream=True, **kw))
    assert [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content] \
        == tokens[:k + 1]

def test_endoftext_in_a_completions_prompt_is_the_special_token_as_vllm_reads_it(served, client):
    """vLLM (HF's tokenizer) and nanoGPT's sample.py read "<|endoftext|>" in a prompt as token 50256;
    so do /v1/completions and /tokenize's prompt (before: 7 ordinary tokens). Chat messages keep it as
    text (see test_chat_templates_render_as_transformers_renders_them)."""
    eot, a, b = served.tok.eot, served.tok.encode("Hello"), served.tok.encode(" world")
    assert served.post("/tokenize", {"prompt": "Hello<|endoftext|> world"}).json()["tokens"] == a + [eot] + b
    r = client.completions.create(model="tiny", prompt="Hello<|endoftext|> world", max_tokens=2, temperature=0,
                                  echo=True, logprobs=0)
    assert r.usage.prompt_tokens == 3 and r.choices[0].logprobs.tokens[:3] == ["Hello", "<|endoftext|>", " world"]
    assert r.choices[0].text.startswith("Hello<|endoftext|> world")
    assert r.choices[0].text[len("Hello<|endoftext|> world"):] == served.text(served.greedy(a + [eot] + b, 2))


def test_cors_preflight_and_headers_as_vllm_sends_them(served):
    """A web page on another origin can call the server (vLLM's default: any origin): the preflight
    OPTIONS needs no API key, and answers (errors too) carry Access-Control-Allow-Origin (before:
    405 on OPTIONS and no header, so browsers refused every call)."""
    origin = {"Origin": "http://localhost:3000"}
    pre = httpx.options(served.url + "/v1/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    ok = served.post("/v1/completions", {"prompt": "x", "max_tokens": 1}, headers=origin)
    bad = httpx.post(served.url + "/v1/completions", json={"prompt": "x"}, headers=origin)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "*"
    assert bad.status_code == 401 and bad.headers["access-control-allow-origin"] == "*"
    # a page's script may read x-request-id and a 429's Retry-After (were not exposed: invisible to it)
    exposed = {h.strip().lower() for h in ok.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "retry-after"} <= exposed


def test_a_byte_order_mark_is_no_part_of_a_body_or_a_chat_template(served, tmp_path):
    """RFC 8259 lets a JSON parser ignore a leading BOM (Windows PowerShell sends one): it was a 400.
    A --chat-template file saved with one put U+FEFF before every chat prompt."""
    from gpt2model.server import read_chat_template

    r = served.post("/v1/completions", content=b"\xef\xbb\xbf" + json.dumps({"prompt": "x", "max_tokens": 1}).encode())
    assert r.status_code == 200, r.text
    (tmp_path / "t.jinja").write_bytes(b"\xef\xbb\xbf{{ messages[0].content }}")
    assert read_chat_template(tmp_path / "t.jinja") == "{{ messages[0].content }}"


def test_echo_offsets_follow_the_decoded_prompt_even_through_invalid_utf8(served, client):
    """Token ids that are no valid UTF-8 (a lone continuation byte, a lead byte twice, a split
    character): the echo is the prompt's decode, and each offset is where that token's text begins
    in it, as an incremental decoder reads the bytes."""
    tok = served.tok
    byte = {tok.token_bytes(i): i for i in range(256 + 1000) if len(tok.token_bytes(i)) == 1}
    ids = [byte[b"\xff"], byte[b"\xf0"], byte[b"\x9f"], byte[b"\x98"], byte[b"\x80"], byte[b"\x80"]] + \
        tok.encode(" ok\u00e9")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    text, lp = r.choices[0].text, r.choices[0].logprobs
    assert text == tok.decode(ids) == "\ufffd\U0001F600\ufffd ok\u00e9"
    assert lp.text_offset == [0, 1, 1, 1, 1, 2] + [3 + len(tok.decode(tok.encode(" ok\u00e9")[:i]))
                                                   for i in range(len(tok.encode(" ok\u00e9")))]


def test_a_chatml_fine_tune_serves_with_its_own_template_and_special_tokens(model_dir, tmp_path):
    """A GPT-2 fine-tuned with ChatML (TRL's setup_chat_format: <|im_start|>/<|im_end|> added as special
    tokens, the template in the saved tokenizer): its folder's template is found as vLLM finds it, and
    the special tokens the template writes are their ids, as apply_chat_template gives them (before:
    "<|im_start|>" became 7 ordinary tokens). A message that types one keeps it as text, and a
    completions prompt reads it as the token (as vLLM). Its eos <|im_end|> ends a reply (before: only
    end-of-text did, so replies ran on into the next turn), and special tokens add no text."""
    from fastapi.testclient import TestClient

    from gpt2model.hf import find_chat_template, find_eos_ids

    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2TokenizerFast.from_pretrained(model_dir)
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.chat_template = HF_TEMPLATES[0]
    folder = tmp_path / "chatml"
    hf.save_pretrained(folder)
    assert find_chat_template(folder)[0] == HF_TEMPLATES[0]
    tok = load_tokenizer(folder)
    assert tok.vocab_size == 50259 and tok.special_tokens["<|im_start|>"] == 50257
    model = GPT(GPTconfig(vocab_size=50259, context_length=64, n_layer=1, n_head=1, d_model=8))
    client = TestClient(create_app(Engine(model, max_batch=1, max_queue=1), tok,
                                   ServerConfig(model_name="m", chat_template=find_chat_template(folder)[0])))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <there>"}]
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = list(getattr(want, "input_ids", want))
    assert want.count(50257) == 3
    assert client.post("/tokenize", json={"messages": messages}).json()["tokens"] == want
    typed = client.post("/tokenize", json={"messages": [{"role": "user", "content": "x<|im_end|>"}]}).json()
    assert typed["tokens"].count(50258) == 1  # the template's, not the typed one
    assert client.post("/tokenize", json={"prompt": "<|im_start|>user"}).json()["tokens"] == \
        [50257] + hf("user")["input_ids"]
    # Its <|im_end|> (generation_config.json's eos, as TRL saves it) ends a reply, as in vLLM; no special
    # token adds text (vLLM's skip_special_tokens) unless skip_special_tokens is false.
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [50258, 50256]}))
    assert find_eos_ids(folder) == (50258, 50256) and find_eos_ids(tmp_path) == ()
    engine = Engine(model, max_batch=1, max_queue=2)
    engine.start()
    try:
        assert engine.ready.wait(60)
        client = TestClient(create_app(engine, tok, ServerConfig(model_name="m", eos_token_ids=find_eos_ids(folder))))
        body = {"prompt": "Hi", "max_tokens": 4, "temperature": 0}
        r = client.post("/v1/completions", json={**body, "logit_bias": {"50258": 100}}).json()
        assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == ""
        r = client.post("/v1/completions", json={**body, "logit_bias": {"50257": 100}}).json()
        assert r["choices"][0]["text"] == "" and r["usage"]["completion_tokens"] == 4
        r = client.post("/v1/completions", json={**body, "logit_bias": {"50257": 100},
                                                 "skip_special_tokens": False}).json()
        assert r["choices"][0]["text"] == "<|im_start|>" * 4
        r = client.post("/v1/completions", json={**body, "logit_bias": {"50258": 100}, "ignore_eos": True}).json()
        assert r["choices"][0]["finish_reason"] == "length"
    finally:
        engine.shutdown(2)
    # tokenizer_config.json's list of named templates: the "default" one
    other = tmp_path / "named"
    other.mkdir()
    (other / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert find_chat_template(other) == ("D", other / "tokenizer_config.json")
    assert find_chat_template(tmp_path) is None


@pytest.mark.parametrize("template", [None, *HF_TEMPLATES[:2]])
def test_add_generation_prompt_and_continue_final_message_as_vllm_and_transformers(model_dir, template):
    """vLLM's chat fields (transformers' apply_chat_template arguments): add_generation_prompt=false
    leaves the assistant's turn unopened; continue_final_message continues the last message where its
    text ends (a reply begun by the client), the ids apply_chat_template gives (before: 400 unknown field)."""
    from fastapi.testclient import TestClient

    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2TokenizerFast.from_pretrained(model_dir)
    engine = Engine(GPT.from_pretrained(model_dir), max_batch=1, max_queue=1)
    config = ServerConfig(model_name="m", **({} if template is None else {"chat_template": template}))
    client = TestClient(create_app(engine, load_tokenizer(model_dir), config))
    messages = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "I would say"}]
    for fields in ({"add_generation_prompt": False}, {"add_generation_prompt": False, "continue_final_message": True}):
        r = client.post("/tokenize", json={"messages": messages, **fields})
        assert r.status_code == 200, r.text
        want = hf.apply_chat_template(messages, chat_template=config.chat_template, tokenize=True, **fields)
        assert r.json()["tokens"] == list(getattr(want, "input_ids", want)), fields
    assert hf.decode(r.json()["tokens"]).endswith("I would say")
    r = client.post("/v1/chat/completions", json={"messages": messages, "continue_final_message": True,
                                                  "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_include_stop_str_in_output_as_vllm(served, client):
    """vLLM's include_stop_str_in_output: the stop string that ended the choice ends its text (and
    nothing after it), streamed or not; by default it is dropped, as OpenAI (before: 400 unknown field)."""
    ids = served.tok.encode("Once upon a time")
    full = served.text(served.greedy(ids, 12))
    at = next(i for i in range(1, len(full) - 3) if full.find(full[i:i + 3]) == i)
    stop = full[at:at + 3]
    for extra, want in (({}, full[:at]), ({"include_stop_str_in_output": True}, full[:at + 3])):
        kw = dict(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop, "\x00"],
                  extra_body=extra)
        r = client.completions.create(**kw).choices[0]
        assert (r.text, r.finish_reason) == (want, "stop")
        assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices) == want


def test_return_tokens_as_token_ids_as_vllm(served, client):
    """vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:{id}" (exact where the two
    halves of a split character both read U+FFFD), completions (echo too) and chat."""
    first, second = served.tok.encode("\U0001F44D")
    r = client.completions.create(model="tiny", prompt=[first, second], max_tokens=2, temperature=0, echo=True,
                                  logprobs=1, extra_body={"return_tokens_as_token_ids": True}).choices[0]
    new = served.greedy([first, second], 2)
    assert r.logprobs.tokens == [f"token_id:{t}" for t in [first, second, *new]]
    assert all(k.startswith("token_id:") for top in r.logprobs.top_logprobs[1:] for k in top)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                          temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"return_tokens_as_token_ids": True}).choices[0]
    assert all(t.token.startswith("token_id:") and all(x.token.startswith("token_id:") for x in t.top_logprobs)
               for t in chat.logprobs.content)
    assert bytes(chat.logprobs.content[0].bytes) == served.tok.token_bytes(int(chat.logprobs.content[0].token[9:]))


def test_sse_lines_survive_line_based_readers_of_unicode_line_separators(served, client):
    """U+2028, U+2029 and U+0085 in a chunk's text (here the echoed prompt; a model can generate them)
    were written raw: httpx's iter_lines() (openai's with_streaming_response ... iter_lines()) and
    requests' iter_lines(decode_unicode=True) cut the "data:" line there and its JSON broke."""
    prompt = "a\u2028b\u2029c\x85d"
    kw = dict(model="tiny", prompt=prompt, max_tokens=2, temperature=0, echo=True, stream=True)
    with client.completions.with_streaming_response.create(**kw) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: {") for ln in lines[:-1]), lines
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["text"] == prompt
    assert "".join(c.choices[0].text for c in client.completions.create(**kw)) == "".join(
        c["choices"][0]["text"] for c in chunks)


def test_system_fingerprint_names_the_backend_in_every_response(served, client, model_dir):
    """OpenAI's system_fingerprint (llama-server sends one too) was missing: now in completions and
    chat, streamed chunks included, the same for every request of one server, and another for other
    weights (what a seed's tokens depend on)."""
    from gpt2model.server import system_fingerprint

    fp = client.completions.create(model="tiny", prompt="x", max_tokens=1).system_fingerprint
    assert fp and fp.startswith("fp_")
    msgs = [{"role": "user", "content": "x"}]
    assert client.chat.completions.create(model="tiny", messages=msgs, max_tokens=1).system_fingerprint == fp
    streams = [client.completions.create(model="tiny", prompt="x", max_tokens=2, stream=True),
               client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, stream=True,
                                              stream_options={"include_usage": True})]
    assert {c.system_fingerprint for s in streams for c in s} == {fp}
    other = GPT.from_pretrained(model_dir)
    assert system_fingerprint(other) == fp
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0  # (sampled: element 0 of every tensor)
    assert system_fingerprint(other) != fp
    # int8 weight-only and int8 weights + activations hold the same tensors but give other tokens
    if "fbgemm" in torch.backends.quantized.supported_engines:
        fps = {system_fingerprint(GPT.from_pretrained(model_dir).quantize(m)) for m in ("int8", "int8-dynamic")}
        assert len(fps) == 2 and fp not in fps


def test_stop_and_text_part_errors_name_the_field_and_the_fix(served):
    """A bad stop gave pydantic's two union branches ("String should have at least 1 character; or
    Input should be a valid list"); an unknown key in a text part (an Anthropic-style cache_control)
    gave "Input should be a valid string; or Extra inputs are not permitted", naming no field."""
    for stop in ("", [5], {"a": 1}):
        r = served.post("/v1/completions", {"prompt": "x", "stop": stop})
        assert r.status_code == 400 and "stop must be a non-empty string or a list" in r.json()["error"]["message"]
    part = {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}
    e = served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [part]}]}).json()["error"]
    assert (e["param"], e["code"]) == ("messages.0.content.0.cache_control", "unsupported_field")
    e = served.post("/v1/completions", {"prompt": "x", "repetition_penalty": 0}).json()["error"]
    assert "Value error" not in e["message"] and "must be a number > 0" in e["message"]


def test_a_body_that_is_not_json_says_how_it_was_sent(served):
    """curl -F (multipart) or -d 'a=b' (form-urlencoded) got "Expecting value: line 1 column 1",
    naming neither the cause nor the fix; any Content-Type with a JSON body still works (as llama-server)."""
    for ctype, body in (("multipart/form-data; boundary=x", b"--x\r\n"), ("application/x-www-form-urlencoded", b"a=b")):
        r = served.post("/v1/completions", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 400 and f"sent as {ctype.split(';')[0]}" in r.json()["error"]["message"], r.text
        assert "Content-Type: application/json" in r.json()["error"]["message"]
    r = served.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}',
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    r = served.post("/v1/completions", content=b"{bad", headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 400 and "sent as" not in r.json()["error"]["message"]


def test_a_404_names_the_path_meant_or_lists_the_endpoints(served):
    """A base_url without /v1 (or with it twice) got "no such endpoint: POST /chat/completions" and no
    fix; an unknown endpoint (/v1/responses, /v1/embeddings) did not say which exist."""
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.NotFoundError, match=r"did you mean /v1/chat/completions\?"):
        openai.OpenAI(base_url=served.url, api_key=KEY, max_retries=0).chat.completions.create(
            model="tiny", messages=msgs, max_tokens=1)
    e = served.post("/v1/v1/completions", {"prompt": "x"}).json()["error"]
    assert "did you mean /v1/completions?" in e["message"] and e["code"] == "not_found"
    e = served.post("/v1/responses", {"input": "x"}).json()["error"]
    assert "POST /v1/chat/completions" in e["message"] and "GET /v1/models/{id}" in e["message"]


def test_openais_newer_fields_safety_identifier_prompt_cache_key_and_obfuscation(served, client):
    """openai-python sends what OpenAI added since `user`: safety_identifier and prompt_cache_key (no-ops
    here, as user is) and stream_options.include_obfuscation (chunks padded with a random "obfuscation"
    string, OpenAI's guard against inferring tokens from chunk sizes). All three were a 400."""
    msgs = [{"role": "user", "content": "x"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=6, temperature=0, safety_identifier="u-1", prompt_cache_key="k")
    want = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_obfuscation": True,
                                                                              "include_usage": True}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    pads = [c.obfuscation for c in chunks]
    assert all(isinstance(p, str) and p for p in pads) and len(set(pads)) > 1 and chunks[-1].usage is not None
    plain = client.completions.create(model="tiny", prompt="x", max_tokens=2, stream=True,
                                      stream_options={"include_obfuscation": False},
                                      extra_body={"safety_identifier": "u"})
    assert all(getattr(c, "obfuscation", None) is None for c in plain)


def test_the_printed_url_of_an_ipv6_host_has_brackets():
    """`gpt2 serve --host ::1` printed "on http://::1:8000 (OpenAI API at http://::1:8000/v1", which no
    client opens (httpx: "Invalid port"); RFC 3986 puts an IPv6 address in brackets."""
    from gpt2model.server import base_url

    assert base_url("::1", 8000) == "http://[::1]:8000" and base_url("::", 80) == "http://[::]:80"
    assert base_url("127.0.0.1", 8000) == "http://127.0.0.1:8000" and base_url("[::1]", 1) == "http://[::1]:1"
    assert httpx.URL(base_url("::1", 8000) + "/v1").port == 8000


def test_every_response_carries_an_x_request_id(served, client):
    """OpenAI's API sends x-request-id (openai-python's `_request_id`); ours sent none. The client's own
    X-Request-Id comes back (vLLM's rule) when it is a plain token, else a fresh one, 401s and streams too."""
    r = client.completions.create(model="tiny", prompt="x", max_tokens=1)
    assert r._request_id and r._request_id.startswith("req_")
    assert client.completions.create(model="tiny", prompt="x", max_tokens=1)._request_id != r._request_id
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1, stream=True,
        extra_headers={"X-Request-Id": "trace-42"})
    assert raw.headers["x-request-id"] == "trace-42"
    assert served.post("/v1/completions", {"prompt": "x", "max_tokens": 1},
                       headers={"X-Request-Id": "two words"}).headers["x-request-id"].startswith("req_")
    r401 = httpx.get(served.url + "/v1/models", headers={"X-Request-Id": "t-401"})
    assert r401.status_code == 401 and r401.headers["x-request-id"] == "t-401"


def test_more_than_four_stop_strings_as_vllm_and_llama_server_take_them(served, client):
    """OpenAI's limit of 4 stop strings was a 400 here; vLLM and llama-server take any number, and
    clients of local servers (editor autocompletion) send more. Each of them stops the text."""
    ids = served.tok.encode("Once upon a time")
    full = served.text(served.greedy(ids, 12))
    at = next(i for i in range(1, len(full) - 3) if full.find(full[i:i + 3]) == i)
    stops = [f"\x00{i}" for i in range(9)] + [full[at:at + 3]]
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stop=stops)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full[:at], "stop")


def test_completions_logprobs_up_to_20_as_vllm(served, client):
    """logprobs above OpenAI's legacy 5 were a 400; vLLM gives up to 20 (its default max_logprobs), as
    chat's top_logprobs here: each entry holds the 10 most likely tokens and the chosen one."""
    r = client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0, logprobs=10).choices[0]
    for top, token, lp in zip(r.logprobs.top_logprobs, r.logprobs.tokens, r.logprobs.token_logprobs, strict=True):
        assert len(top) >= 10 and top[token] == lp and max(top.values()) >= lp
    e = served.post("/v1/completions", {"prompt": "x", "logprobs": 21}).json()["error"]
    assert e["param"] == "logprobs" and "less than or equal to 20" in e["message"]


def test_add_special_tokens_is_accepted_as_vllm_takes_it(served, client):
    """vLLM's add_special_tokens (completions and chat) was a 400; GPT-2 adds no special token to a
    prompt either way (HF's add_bos_token is false), so the tokens are the same."""
    kw = dict(model="tiny", prompt="Hello there", max_tokens=4, temperature=0, logprobs=0, echo=True)
    base = client.completions.create(**kw).choices[0]
    for flag in (True, False):
        r = client.completions.create(**kw, extra_body={"add_special_tokens": flag}).choices[0]
        assert (r.text, r.logprobs.tokens) == (base.text, base.logprobs.tokens)
    msgs = [{"role": "user", "content": "x"}]
    assert client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2,
                                          extra_body={"add_special_tokens": False}).usage.prompt_tokens > 0


def test_a_client_that_times_out_is_a_499_not_an_asgi_exception(served):
    """A non-streamed request whose client gave up (its timeout) ended the handler with CancelledError
    (one whose client left mid-body with ClientDisconnect):
    uvicorn logged "Exception in ASGI application" and a 50-line traceback per such client. Now it is
    nginx's 499 (client closed request) in /metrics, the slots freed, nothing logged."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        with pytest.raises(httpx.TimeoutException):
            served.post("/v1/completions", {"prompt": "x", "max_tokens": CTX - 2, "n": 4}, timeout=0.2)
        for _ in range(100):
            time.sleep(0.05)
            metrics = httpx.get(served.url + "/metrics").text
            if served.running() == 0 and 'endpoint="/v1/completions",status="499"' in metrics:
                break
        assert 'endpoint="/v1/completions",status="499"' in metrics and served.running() == 0
        # A client that leaves halfway through sending its body: starlette's ClientDisconnect, logged the same way
        host, port = served.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                      + b"\r\nContent-Length: 1000\r\n\r\n{\"messa")
            time.sleep(0.2)
        for _ in range(100):
            time.sleep(0.05)
            if 'endpoint="/v1/chat/completions",status="499"' in httpx.get(served.url + "/metrics").text:
                break
        assert 'endpoint="/v1/chat/completions",status="499"' in httpx.get(served.url + "/metrics").text
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert not records, [r.getMessage() for r in records]
