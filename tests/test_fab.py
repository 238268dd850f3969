"""What `flwr run .` ships. Flower packs every tracked .py/.json/.jsonl/.md into the FAB by default and a SuperLink
refuses one over 10 MB; the committed results (per-question predictions) had grown it to 9.9 MB, one table cell
from every `flwr run .` failing. pyproject's fab-include keeps it to the app's code."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from flwr.common.constant import FAB_MAX_SIZE

REPO = Path(__file__).resolve().parents[1]


def test_the_fab_holds_the_apps_code_and_stays_far_below_flowers_limit(tmp_path):
    flwr = Path(sys.executable).with_name("flwr")
    subprocess.run([str(flwr), "build", "--app", str(REPO)], cwd=tmp_path, check=True, capture_output=True)
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    assert "fedrag_app/flower/client_app.py" in names and "fedrag_app/flower/server_app.py" in names
    assert {n for n in names if not n.startswith(("fedrag_app/", ".info/"))} == {"pyproject.toml", "README.md"}, names
    assert fab.stat().st_size < FAB_MAX_SIZE / 5, f"{fab.stat().st_size} bytes"
