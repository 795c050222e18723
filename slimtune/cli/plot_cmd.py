"""`slimtune plot RUN_DIR`: one PNG with loss (+ eval loss), learning rate, gradient norm and tokens/s per step."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot a run's metrics to a PNG",
                       description="Plot loss (with eval loss markers), lr, grad norm and tokens/s from "
                                   "RUN_DIR/metrics.jsonl. Needs matplotlib (pip install slimtune[plot]).")
    p.add_argument("run_dir", help="run folder written by slimtune train (holds metrics.jsonl)")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/metrics.png)")
    p.set_defaults(func=run)


def plot_run(run_dir, out=None) -> Path:
    """Draw the four panels of a run's metrics into a PNG.

    Args:
        run_dir: folder with metrics.jsonl.
        out: PNG path (default: run_dir/metrics.png).

    Returns:
        The PNG's path.

    Raises:
        ConfigError: matplotlib is missing, or run_dir has no (readable) metrics.jsonl.
    """
    from slimtune.errors import ConfigError  # noqa: PLC0415
    from slimtune.train.metrics import read_metrics  # noqa: PLC0415

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl; pass the --output folder of a slimtune train run.")
    records = read_metrics(metrics)
    if not records:
        raise ConfigError(f"{metrics} holds no step records yet; plot again once the run has logged a step.")
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")  # files only: no display needed (servers, CI)
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(f"plotting needs matplotlib ({exc}); install it with: pip install slimtune[plot]") from exc

    out = Path(out) if out else run_dir / "metrics.png"
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [("loss", "loss", axes[0][0]), ("lr", "learning rate", axes[0][1]),
              ("grad_norm", "grad norm (pre-clip)", axes[1][0]), ("tokens_per_s", "tokens / s", axes[1][1])]
    for key, title, ax in panels:
        ax.plot(steps, [r.get(key, float("nan")) for r in records], lw=1.2, label="train")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if evals:
        axes[0][0].plot(*zip(*evals), "o", color="tab:red", label="eval")
        axes[0][0].legend()
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)
    return out


def run(args) -> int:
    out = plot_run(args.run_dir, args.out)
    print(f"wrote {out}")
    return 0
