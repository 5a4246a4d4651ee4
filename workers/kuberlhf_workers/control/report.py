"""OUTPUT/report.html: a run a person can look at rather than read.

One self-contained file (plots embedded as PNG, no scripts, nothing fetched), rebuilt from what
the run leaves in its output folder: `metrics.jsonl` (one row per step, evaluation rows too) and
`spec.yaml`. `kuberlhf run` writes it at the end; `kuberlhf report DIR` rebuilds it, for a run
still going or one copied off a cluster's volume.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPORT = "report.html"
SPEC = "spec.yaml"


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]  # metrics drawn on it, those present in the rows
    stacked: bool = False


PANELS = (
    Panel("Reward", ("reward_mean", "eval_reward_mean", "eval_pass_at_k")),
    Panel("KL to the reference", ("kl", "kl_coef")),
    Panel("Response length (tokens)", ("response_length_mean",)),
    Panel("Losses", ("policy_loss", "value_loss", "loss")),
    Panel("Evaluation", ("eval_loss", "eval_accuracy", "eval_reward_accuracy", "eval_reward_margin")),
    Panel("Policy", ("entropy", "clip_fraction", "approx_kl", "rollout_kl")),
    Panel("Time per phase (s)", ("time_rollout_s", "time_reward_s", "time_train_s", "time_sync_s"), True),
)


def read_rows(output: Path) -> list[dict[str, Any]]:
    path = output / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{output}: no metrics.jsonl (is this a kuberlhf run's output folder?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot(panel: Panel, rows: list[dict[str, Any]]) -> str | None:
    """The panel as a base64 PNG, or None when the run has none of its metrics."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), int | float)] for k in panel.keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    if panel.stacked:
        steps = [s for s, _ in next(iter(series.values()))]
        ax.stackplot(steps, *[[v for _, v in points] for points in series.values()], labels=list(series))
    else:
        for key, points in series.items():
            ax.plot(
                [s for s, _ in points],
                [v for _, v in points],
                marker="o" if len(points) < 30 else None,
                markersize=3,
                label=key,
            )
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _summary(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(metric, first, last) for the headline metrics the run has."""
    keys = (
        "reward_mean",
        "eval_reward_mean",
        "loss",
        "eval_loss",
        "eval_accuracy",
        "eval_reward_accuracy",
        "kl",
        "samples_per_second",
    )
    out = []
    for key in keys:
        values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
        if values:
            out.append((key, f"{values[0]:.4g}", f"{values[-1]:.4g}"))
    return out


def render(output: Path) -> str:
    rows = read_rows(output)
    spec_path = output / SPEC
    spec = spec_path.read_text() if spec_path.is_file() else "(spec.yaml not found in the output folder)"
    name = output.name
    steps = max((int(r["step"]) for r in rows), default=0)
    plots = [(p.title, png) for p in PANELS if (png := _plot(p, rows)) is not None]
    summary = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{first}</td><td>{last}</td></tr>"
        for k, first, last in _summary(rows)
    )
    figures = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{png}"></figure>'
        for title, png in plots
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kuberlhf run {html.escape(name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
figure {{ display: inline-block; margin: 0.5rem; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 0.2rem 0.6rem; }}
pre {{ background: #f5f5f5; padding: 1rem; overflow: auto; }}
</style></head><body>
<h1>kuberlhf run: {html.escape(name)}</h1>
<p>{steps} step(s) in metrics.jsonl; {len(plots)} plot(s).</p>
<h2>Summary</h2>
<table><tr><th>metric</th><th>first step</th><th>last step</th></tr>{summary}</table>
<h2>Curves</h2>
{figures}
<h2>Spec</h2>
<pre>{html.escape(spec)}</pre>
</body></html>
"""


def write_report(output: Path) -> Path:
    path = output / REPORT
    path.write_text(render(output), encoding="utf-8")
    return path
