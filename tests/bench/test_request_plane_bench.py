"""Smoke test of benchmarks/request_plane.py: tiny load, both modes, sane JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "request_plane.py"


def test_request_plane_benchmark_runs_both_modes(tmp_path: Path) -> None:
    out = tmp_path / "request_plane.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--requests",
            "8",
            "--concurrency",
            "4",
            "--output-tokens",
            "5",
            "--warmup-requests",
            "0",
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())

    modes = [r["mode"] for r in report["runs"]]
    assert sorted(modes) == ["distributed", "embedded"]
    assert report["failures"] == []
    for run in report["runs"]:
        bench = run["bench"]
        assert bench["req_per_s"] > 0
        assert bench["errors"] == 0
        assert bench["requests"] == 8
        assert bench["output_tokens"] == 8 * 5  # ignore_eos: every request yields 5 tokens
        assert run["server_cpu_total_s"] >= 0
    distributed = next(r for r in report["runs"] if r["mode"] == "distributed")
    assert set(distributed["server_cpu_s"]) == {"frontend", "worker"}

    assert set(report["summary"]) == {"embedded", "distributed"}
    (comparison,) = report["comparisons"]
    assert comparison["mode"] == "distributed"
    assert comparison["req_per_s_ratio"] > 0
    assert report["machine"]["cpu_count"] >= 1
    # The markdown table goes to stdout.
    assert "| embedded |" in done.stdout
    assert "| distributed |" in done.stdout
