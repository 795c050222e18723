"""`slimtune studio` options and how they become settings."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimtune.cli import studio_cmd
from slimtune.studio.settings import PASSWORD_ENV


def parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    studio_cmd.register(sub)
    return parser.parse_args(["studio", *argv])


def test_defaults(monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    args = parse([])
    s = studio_cmd.settings_from_args(args)
    assert (s.host, s.port, s.password, s.max_upload_mb) == ("127.0.0.1", 8888, None, 512)
    assert s.data_dir == (Path.home() / ".slimtune" / "studio").resolve()
    assert args.func is studio_cmd.run


def test_short_options_and_values(tmp_path, monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    s = studio_cmd.settings_from_args(parse(["-H", "0.0.0.0", "-p", "9000", "--password", "pw",
                                             "--data-dir", str(tmp_path), "--max-upload-mb", "5"]))
    assert (s.host, s.port, s.password, s.data_dir, s.max_upload_bytes) == ("0.0.0.0", 9000, "pw", tmp_path, 5 << 20)


def test_password_from_environment(monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert studio_cmd.settings_from_args(parse([])).password == "from-env"
    assert studio_cmd.settings_from_args(parse(["--password", "flag"])).password == "flag"


def test_refusal_returns_2(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    assert studio_cmd.run(parse(["--host", "0.0.0.0", "--data-dir", str(tmp_path)])) == 2
    assert "without a password" in capsys.readouterr().err


def test_main_cli_lists_studio():
    from slimtune.cli.main import build_parser

    args = build_parser().parse_args(["studio", "--port", "1234"])
    assert args.port == 1234 and args.func is studio_cmd.run
