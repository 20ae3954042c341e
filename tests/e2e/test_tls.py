"""End to end: `serve --tls-cert --tls-key` speaks HTTPS (hypercorn and uvicorn);
the official openai client completes a chat trusting the self-signed certificate,
and plain HTTP to that port gets no answer."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from dynamo_gateway.servers.process import terminate
from dynamo_gateway.testing import free_port


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the `openssl` CLI; `cryptography`
    is not a dependency)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(params=["hypercorn", "uvicorn"])
def https_gateway(
    request: pytest.FixtureRequest,
    certificate: tuple[Path, Path],
    demo_model: Path,
    tmp_path: Path,
) -> Iterator[tuple[int, ssl.SSLContext]]:
    cert, key = certificate
    port = free_port()
    argv = [
        sys.executable, "-m", "dynamo_gateway.cli", "serve", "--model", str(demo_model),
        "--engine", "mocker", "--speedup", "100", "--served-model-name", "demo",
        "--port", str(port), "--server", request.param,
        "--tls-cert", str(cert), "--tls-key", str(key),
    ]  # fmt: skip
    log = tmp_path / "gateway.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"https://127.0.0.1:{port}/ready", verify=trust).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert f"on https://127.0.0.1:{port}" in log.read_text()
        yield port, trust
    finally:
        terminate(proc, 15)


def test_chat_over_https_and_no_plain_http(https_gateway: tuple[int, ssl.SSLContext]) -> None:
    port, trust = https_gateway
    with openai.OpenAI(
        base_url=f"https://127.0.0.1:{port}/v1",
        api_key="x",
        http_client=openai.DefaultHttpxClient(verify=trust),
        max_retries=0,
    ) as client:
        resp = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
    assert resp.usage is not None and resp.usage.completion_tokens == 4
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://127.0.0.1:{port}/ready", timeout=5)  # not trusted by default
