"""python -m mlx_ksa.server: mlx-lm's OpenAI-compatible API over a KSA model,
started on a free loopback port and spoken to over real HTTP."""

import http.client
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlx_lm import stream_generate

import mlx_ksa

from tests.test_cli import make_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    model = make_model(tmp / "model")[0]
    log = tmp / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLX_KSA_CACHE": str(tmp / "cache")}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_ksa.server", "--model", str(model), "--host",
                                 "127.0.0.1", "--port", "0", "--max-tokens", "12"],
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
