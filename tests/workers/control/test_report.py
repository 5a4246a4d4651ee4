"""The run report: a self-contained page whose plots a real browser (headless Chromium) draws."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from kuberlhf.cli import main as cli_main
from kuberlhf_workers.control.report import REPORT, SPEC, render

pytestmark = pytest.mark.unit
MATPLOTLIB_BLUE = (0x1F, 0x77, 0xB4)  # the first line colour of matplotlib's default cycle


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: `make chromium` (Debian's package) installs it")
    return path


def a_run(folder: Path, steps: int = 12) -> Path:
    """An output folder as `kuberlhf run` leaves it: metrics.jsonl rows and spec.yaml."""
    folder.mkdir(parents=True)
    rows = [
        {
            "step": s,
            "reward_mean": 0.1 + 0.05 * s,
            "kl": 0.01 * math.sqrt(s),
            "response_length_mean": 20 - s / 2,
            "policy_loss": -0.02 * s,
            "time_rollout_s": 0.3,
            "time_reward_s": 0.05,
            "time_train_s": 0.4,
            "time_sync_s": 0.02,
            "samples_per_second": 40.0,
        }
        for s in range(1, steps + 1)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / SPEC).write_text(
        "apiVersion: kuberlhf.io/v1alpha1\nkind: RLHFJob\nmetadata: {name: demo}\n"
        "spec: {algorithm: grpo, model: {actor: builtin:tiny}}\n"
    )
    return folder


def test_the_report_embeds_a_png_per_panel_with_data_and_the_spec_and_fetches_nothing(tmp_path: Path) -> None:
    page = render(a_run(tmp_path / "demo"))
    assert page.count('src="data:image/png;base64,') == 5  # reward, KL, length, losses, time per phase
    assert "algorithm: grpo" in page and "<script" not in page
    assert "http://" not in page and "https://" not in page


def test_headless_chromium_draws_the_reports_plots(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    run = a_run(tmp_path / "demo")
    with pytest.raises(SystemExit) as exited:
        cli_main(["report", str(run)])
    assert exited.value.code == 0 and (run / REPORT).is_file()
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1400,1600",
            (run / REPORT).as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    blue = int((np.abs(pixels - np.array(MATPLOTLIB_BLUE)).max(axis=-1) < 12).sum())
    assert blue > 500, f"no plotted lines in the screenshot ({blue} pixels of the line colour)"


def test_report_on_a_folder_without_metrics_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["report", str(tmp_path)])
    assert exited.value.code == 1
