"""The ``rematch serve`` command itself: its flags are checked before the model loads, and the real
process serves on loopback and shuts down when told."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from tests.support.ports import free_port
from tests.support.serving import wait_until_healthy


def test_serve_command_reports_bad_flags_in_one_line(tmp_path, capsys):
    from rematch.cli import main

    assert main(["serve", "--model", "tiny", "--allow-files", str(tmp_path / "missing")]) == 1
    assert "--allow-files" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny", "--max-wait-ms", "-3"]) == 1
    assert "--max-wait-ms" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny", "--port", "8001"]) == 1  # untrained heads: refused as by `encode`
    assert "--allow-untrained" in capsys.readouterr().err


def test_rematch_serve_process_serves_and_stops_on_sigterm(tmp_path):
    port = free_port()
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "rematch.cli", "serve", "--model", "tiny", "--allow-untrained", "--device", "cpu",
         "--port", str(port), "--api-key", "k", "--log-level", "warning"],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(process, url)
        answer = httpx.post(url + "/v1/embeddings", json={"input": ["a red circle"]},
                            headers={"Authorization": "Bearer k"}, timeout=60)
        assert answer.status_code == 200 and len(answer.json()["data"][0]["embedding"]) == 128
        assert httpx.post(url + "/v1/embeddings", json={"input": "x"}, timeout=60).status_code == 401
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode in (0, -signal.SIGTERM), errors  # uvicorn re-raises the signal once it is done
    assert "Traceback" not in errors
