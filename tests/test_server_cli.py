"""`pocketdiffusion serve` refuses bad settings with one line and exit status 2, before it
listens."""
from __future__ import annotations

import socket

import pytest

from pocketdiffusion.cli import main


@pytest.mark.parametrize("argv, words", [
    (["--model", "/no/such/model.safetensors"], ["/no/such/model.safetensors"]),
    (["--port", "70000"], ["--port 70000"]),
    (["--max-steps", "0"], ["--max-steps", ">= 1"]),
    (["--device", "cpu,,cpu"], ["--device"]),
])
def test_bad_settings_are_one_line_and_exit_2(capsys, argv, words):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pocketdiffusion: error: ") and err.count("\n") == 1
    for word in words:
        assert word in err


def test_a_port_in_use_is_reported(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_help_lists_the_options(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--api-key", "--host", "--port", "--model", "--memory", "--max-side", "--cors-origin"):
        assert option in out
