"""The benchmark script runs end to end (quick mode) and writes its
results file and plot; the figures themselves are the README's business."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_results_and_plot(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                       env={**os.environ, "TMPDIR": str(scratch)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert list(scratch.iterdir()) == []          # its working files are gone
    res = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    for path in ("proxy", "ha", "register"):
        step = res["paths"][path][0]
        assert step["ok"] == step["calls"] and step["failed"] == 0
        assert res["headline_cps_zero_failed"][path] == step["offered_cps"]
        assert step["cpu_ms_per_call"]["proxy"] > 0 and step["cpu_ms_per_call"]["sipp_uac"] > 0
    assert res["paths"]["ha"][0]["cpu_ms_per_call"]["nodes"] > 0
    floor = res["paths"]["floor"][0]       # the relay that does no SIP, under the proxy path
    assert floor["ok"] == floor["calls"] and floor["cpu_ms_per_call"]["relay"] > 0
    assert 200 < res["redis_per_dialog"]["memory_usage_bytes_mean"] <= 2048
    assert res["held_calls"]["failed"] == 0
    for how in ("crash_sigkill", "hang_sigstop"):
        f = res["failover"][how]
        assert f["calls_failed"] == 0 and f["down_after_s"] is not None


def test_parser_benchmark_runs():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "parse_bench.py"), "--seconds", "0.2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "msg/s" in r.stdout


def test_the_node_loop_runs_its_calls_to_the_end():
    """bench/node_loop.py: every call set up, answered and hung up on a
    real node and its Redis (it exits non-zero otherwise), and a figure."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "node_loop.py"), "--calls", "100", "--repeat", "1"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "us of CPU a call" in r.stdout


def test_the_chaos_run_names_a_bad_option():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--scenario", "nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--scenario: no sipp_scenarios/nope.xml" in r.stderr
