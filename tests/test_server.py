"""python -m mlx_ksa.server: mlx-lm's OpenAI-compatible API over a KSA model,
started on a free loopback port and spoken to over real HTTP."""

import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlx_lm import stream_generate

import mlx_ksa

from tests.test_cli import make_model

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def start_server(tmp, model, *args):
    log = tmp / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLX_KSA_CACHE": str(tmp / "cache")}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_ksa.server", "--model", str(model), "--host",
                                 "127.0.0.1", "--port", "0", "--max-tokens", "12", *map(str, args)],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline, port = time.time() + 120, None
        while port is None:
            m = re.search(r"serving .* at http://127\.0\.0\.1:(\d+)", log.read_text())
            if m:
                port = int(m.group(1))
            elif proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"server did not start:\n{log.read_text()}")
            else:
                time.sleep(0.2)
        yield {"port": port, "log": log, "model": model}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    with start_server(tmp, make_model(tmp / "model")[0]) as s:
        yield s


def request(server, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=120)
    data = None if body is None else json.dumps(body)
    headers = {} if body is None else {"Content-Type": "application/json"}
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    payload = resp.read().decode()
    conn.close()
    return resp.status, payload


def chat(server, messages, **kw):
    status, payload = request(server, "POST", "/v1/chat/completions",
                              {"messages": messages, "temperature": 0.0, **kw})
    assert status == 200, payload
    return json.loads(payload)


def test_models_and_health(server):
    status, payload = request(server, "GET", "/v1/models")
    assert status == 200
    ids = [m["id"] for m in json.loads(payload)["data"]]
    assert ids == [str(server["model"])]
    assert request(server, "GET", "/health") == (200, json.dumps({"status": "ok"}))


def test_chat_completion_streaming_matches_non_streaming(server):
    messages = [{"role": "user", "content": "Stream me some text."}]
    whole = chat(server, messages, max_tokens=10)
    text = whole["choices"][0]["message"]["content"]
    assert whole["object"] == "chat.completion" and len(text) == 10  # one character per token
    assert whole["usage"]["completion_tokens"] == 10
    assert whole["usage"]["prompt_tokens"] == len("user: Stream me some text.\nassistant: ")

    status, payload = request(server, "POST", "/v1/chat/completions",
                              {"messages": messages, "temperature": 0.0, "max_tokens": 10, "stream": True})
    assert status == 200
    events = [line[len("data: "):] for line in payload.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) > 1
    assert streamed == text  # greedy: the same reply, however it is delivered


def test_follow_up_reuses_the_prompt_cache(server):
    first = [{"role": "user", "content": "Remember this: the window is two chunks."}]
    a = chat(server, first, max_tokens=12)
    reply = a["choices"][0]["message"]["content"]
    # The follow-up starts with everything the first request fed the model.
    follow = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    b = chat(server, follow, max_tokens=12)
    cached = b["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == a["usage"]["prompt_tokens"] + a["usage"]["completion_tokens"]
    assert b["usage"]["prompt_tokens"] == len(f"user: {first[0]['content']}\nassistant: {reply}\n"
                                              "user: And then?\nassistant: ")
    assert re.search(rf"KSA prompt cache: reusing {cached} of {b['usage']['prompt_tokens']} prompt tokens",
                     server["log"].read_text())
    # Reuse changes nothing: the reply is the one a cold model gives the whole conversation.
    model, tokenizer = mlx_ksa.load(str(server["model"]))
    prompt = tokenizer.apply_chat_template(follow, add_generation_prompt=True)
    cold = "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=12))
    assert b["choices"][0]["message"]["content"] == cold


def cold(model_dir, messages, max_tokens):
    """The greedy reply of a fresh model, in this process."""
    model, tokenizer = mlx_ksa.load(str(model_dir))
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens))


def test_concurrent_requests_are_batched_and_reply_as_alone(server):
    assert "(concurrent requests batched)" in server["log"].read_text()
    questions = [[{"role": "user", "content": q}] for q in ("First in the batch?", "Second, a longer one.")]
    lengths = [600, 200]  # the second joins the first's batch well before the first ends
    spans, replies = [None, None], [None, None]

    def stream(i):
        # Streamed, so the arrival times of each reply's first and last tokens tell overlap.
        conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=120)
        conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps({"messages": questions[i], "temperature": 0.0, "max_tokens": lengths[i],
                                      "stream": True}))
        resp, text, first = conn.getresponse(), [], None
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if content:
                first = first or time.perf_counter()
                text.append(content)
        spans[i], replies[i] = (first, time.perf_counter()), "".join(text)
        conn.close()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, spans  # both in flight at once: one batch, not one after the other
    together = list(replies)
    for i in range(2):  # one at a time, now from the prompt cache the batch left
        stream(i)
    assert replies == together
    assert together == [cold(server["model"], q, n) for q, n in zip(questions, lengths)]


def test_speculative_decoding_in_the_server(tmp_path):
    model = make_model(tmp_path / "model")[0]
    draft = make_model(tmp_path / "draft", seed=1)[0]
    messages = [{"role": "user", "content": "Draft for me."}]
    with start_server(tmp_path, model, "--draft-model", draft, "--num-draft-tokens", 4) as s:
        assert "(one request at a time)" in s["log"].read_text()
        assert chat(s, messages, max_tokens=40)["choices"][0]["message"]["content"] == cold(model, messages, 40)
        status, payload = request(s, "POST", "/v1/chat/completions",
                                  {"messages": messages, "max_tokens": 5, "num_draft_tokens": 5})
        assert status == 400 and "num_draft_tokens 5 is more than 4, the summary chunk size" in payload
    for args, error in [(("--num-draft-tokens", 5), "error: --num-draft-tokens 5 is more than 4"),
                        (("--kv-bits", 8), "error: --draft-model cannot be combined with --kv-bits")]:
        r = subprocess.run([sys.executable, "-m", "mlx_ksa.server", "--model", str(model), "--draft-model",
                            str(draft), "--port", "0", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT),
                                             "MLX_KSA_CACHE": str(tmp_path / "cache")})
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(error), r.stderr


def test_bad_port_is_one_line(tmp_path):
    model = make_model(tmp_path / "model")[0]
    r = subprocess.run([sys.executable, "-m", "mlx_ksa.server", "--model", str(model), "--port", "70000"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "MLX_KSA_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "error: --port must lie in 0..65535 (0: any free port), got 70000"), r.stderr


def test_kv_bits_in_the_server(tmp_path):
    model = make_model(tmp_path / "model", head_dim=64)[0]  # mx.quantize groups of 32 or 64
    messages = [{"role": "user", "content": "Quantize my cache."}]
    with start_server(tmp_path, model, "--kv-bits", 8, "--kv-group-size", 32, "--quantized-kv-start", 0) as s:
        reply = chat(s, messages, max_tokens=40)["choices"][0]["message"]["content"]
    m, tokenizer = mlx_ksa.load(str(model))
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert reply == "".join(r.text for r in stream_generate(m, tokenizer, prompt, max_tokens=40, kv_bits=8,
                                                            kv_group_size=32, quantized_kv_start=0))
