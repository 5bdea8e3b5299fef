"""``python -m wse_server.conformance``: listing, reports, exit codes, --run, the reference app."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from wse_server import WSEServer
from wse_server.conformance import CLIENT_SCENARIOS, SERVER_SCENARIOS
from wse_server.conformance.__main__ import main
from wse_server.conformance.vectors import set_directory

from .conftest import BROKEN_CLIENT, FIXTURES, SECRET, url_of

pytestmark = [pytest.mark.loopback]


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["server", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [s.id for s in SERVER_SCENARIOS]
    assert main(["client", "--list", "--only", "decode-*", "--skip", "decode-batch"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [
        s.id for s in CLIENT_SCENARIOS if s.id.startswith("decode-") and s.id != "decode-batch"
    ]


def test_reports_and_success(reference_server: WSEServer, tmp_path: Path) -> None:
    report_json, report_xml = tmp_path / "r.json", tmp_path / "r.xml"
    code = main(
        [
            "server", url_of(reference_server.port), "--jwt-secret", SECRET.decode(),
            "--only", "server-hello,auth-*", "--skip", "auth-failed-claims",
            "--json", str(report_json), "--junit", str(report_xml),
        ]
    )  # fmt: skip
    assert code == 0
    doc = json.loads(report_json.read_text())
    ids = [r["id"] for r in doc["results"]]
    assert ids == [
        "auth-required",
        "auth-failed",
        "auth-missing-sub",
        "auth-token-sources",
        "server-hello",
    ]
    assert doc["mode"] == "server" and doc["summary"]["pass"] == 5
    assert all(r["section"].startswith("§") for r in doc["results"])
    suite = ET.parse(report_xml).getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "5" and suite.get("failures") == "0"
    assert len(suite.findall("testcase")) == 5


def test_failure_exit_code_with_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--run starts the client under test; a failed MUST gives exit status 1."""
    report_xml = tmp_path / "c.xml"
    command = " ".join([*BROKEN_CLIENT, "--break", "no-pong", "{url}", "--token", "{token}"])
    code = main(
        ["client", "--run", command, "--only", "pong-reply,auth-token-sent", "--timeout", "1.5",
         "--junit", str(report_xml)]
    )  # fmt: skip
    assert code == 1
    suite = ET.parse(report_xml).getroot()
    assert suite.get("failures") == "1"
    failed = [c for c in suite.findall("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["pong-reply (§7.4, §7.8, §11.6)"]
    assert "PASS" in capsys.readouterr().out


def test_usage_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("WSE_JWT_SECRET", raising=False)
    assert main(["server", "ws://127.0.0.1:9/wse"]) == 2
    assert main(["server", "--jwt-secret", "x" * 32]) == 2
    assert main(["server", "wss://example.invalid/wse", "--token", "t"]) == 2
    assert main(["client", "--only", "no-such-scenario"]) == 2
    try:
        assert main(["server", "x", "--token", "t", "--vectors", str(FIXTURES)]) == 2
    finally:
        set_directory(None)
    err = capsys.readouterr().err
    assert "--token" in err and "spec/vectors not found" in err


def test_serve_reference_app_subprocess(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "wse_server.conformance", "serve-reference-app", "--port", "0",
         "--jwt-secret-file", str(secret_file), "--ping-interval", "0.5", "--idle-timeout", "10"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on ws://127.0.0.1:" in line, line
        url = line.rsplit(" ", 1)[1].strip()
        code = main(
            ["server", url, "--jwt-secret-file", str(secret_file),
             "--only", "server-ready,server-ping,rate-limit-feedback,inbound-decoding"]
        )  # fmt: skip
        assert code == 0
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
