"""Shared fixtures: real processes (sipha, sipp, redis-server) on free
loopback ports, always stopped at the end of the test."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from procs import Procs  # noqa: E402
from sipha.cluster import Cluster  # noqa: E402
from sipha.sipp import free_port  # noqa: E402


def pytest_collection_modifyitems(config, items):
    missing = [tool for tool in ("sipp", "redis-server") if shutil.which(tool) is None]
    if not missing:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(f"CI needs {', '.join(missing)} (see .ci/run)")
    skip = pytest.mark.skip(reason=f"not installed: {', '.join(missing)}")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


# where the logs of a failed test's clusters are kept (the last KEEP_FAILED
# of them): pytest keeps only its last three runs' temporary folders
FAILED_LOGS = Path(tempfile.gettempdir()) / "sipha-failed-tests"
KEEP_FAILED = 5


def keep_logs(name: str, folder: Path) -> Path | None:
    """Copy a failed test's cluster logs (debug level, SIPp's files too)
    where the next runs leave them; the oldest copies beyond KEEP_FAILED go."""
    if not (folder / "logs").is_dir():
        return None
    kept = FAILED_LOGS / f"{time.strftime('%Y%m%dT%H%M%S')}-{name[:80]}-{folder.name}"
    try:
        shutil.copytree(folder / "logs", kept)
        for old in sorted(FAILED_LOGS.iterdir())[:-KEEP_FAILED]:
            shutil.rmtree(old, ignore_errors=True)
    except OSError:
        return None
    return kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that ran clusters gets their warnings and errors in
    its report, and their whole logs kept (keep_logs): CI keeps nothing
    else, and a rare failure is gone with its logs otherwise."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for folder in getattr(item, "sipha_clusters", []):
        kept = keep_logs(item.name, folder)
        if kept is not None:
            report.sections.append((f"{folder.name}: logs kept", str(kept)))
        for log in sorted((folder / "logs").glob("*.log")):
            try:
                lines = [line for line in log.read_text(errors="replace").splitlines()
                         if "level=warning" in line or "level=error" in line]
            except OSError:
                continue
            if lines:
                report.sections.append((f"{folder.name}/{log.name}: warnings and errors (last 60)",
                                        "\n".join(lines[-60:])))


@pytest.fixture
def make_cluster(tmp_path, request):
    started = []
    request.node.sipha_clusters = []

    def make(nodes=3, trunk_scenario="uas", ramp=2.0, trunk="sipp", ipv6=False, ipv6_nodes=False, ipv6_only=False,
             tls=False):
        c = Cluster(str(tmp_path / f"cluster{len(started)}"))
        started.append(c)
        request.node.sipha_clusters.append(c.dir)
        c.up(nodes=nodes, port=free_port(), trunk=trunk, trunk_scenario=trunk_scenario, ramp=ramp,
             log_level="debug", ipv6=ipv6, ipv6_nodes=ipv6_nodes, ipv6_only=ipv6_only, tls=tls)
        return c
    yield make
    for c in started:
        c.down()


