"""`slimtune plot`: a four-panel PNG from metrics.jsonl, and clear errors."""

import builtins
import json

from slimtune.cli.main import main
from slimtune.cli.plot_cmd import plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3 * min(1, s / 3), "grad_norm": 1.0 + 0.05 * s,
             "tokens_per_s": 1000 + 10 * s, **({"eval_loss": 3.1 - 0.1 * s} if s % 5 == 0 else {})}
            for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 21, "lo')  # torn
    return run


def test_plot_writes_a_png(tmp_path, capsys):
    run = _run_dir(tmp_path)
    out = tmp_path / "plots" / "m.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000  # four drawn panels, not an empty canvas
    assert str(out) in capsys.readouterr().out
    assert main(["plot", str(run)]) == 0 and (run / "metrics.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no metrics.jsonl" in err and "Traceback" not in err


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    run = _run_dir(tmp_path)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    try:
        plot_run(run)
    except Exception as exc:  # noqa: BLE001
        assert type(exc).__name__ == "ConfigError" and "pip install slimtune[plot]" in str(exc)
    else:
        raise AssertionError("expected a ConfigError")
