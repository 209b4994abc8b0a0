"""compose.yaml: every service runs a real sipha subcommand with valid
options and configuration, each node has its own Redis (no Docker engine
runs on the build machines, so the file is checked, not started)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sipcore.config import SETTINGS, env_name, load_config
from sipha.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def sipha_services(compose):
    return {name: svc for name, svc in compose["services"].items() if svc.get("image", "").startswith("sipha")}


def test_services_are_proxy_four_nodes_and_a_redis_each(compose):
    names = set(compose["services"])
    assert names == {"proxy", "node1", "node2", "node3", "node4", "redis1", "redis2", "redis3", "redis4"}
    assert set(compose["services"]["proxy"]["ports"]) == {"5060:5060/udp", "5060:5060/tcp"}
    for name, svc in compose["services"].items():
        if name != "proxy":
            assert "ports" not in svc, f"{name} must not be published"


def test_every_command_is_a_valid_sipha_subcommand_with_valid_config(compose, monkeypatch):
    parser = build_parser()
    for name, svc in sipha_services(compose).items():
        args = parser.parse_args(svc["command"])
        env = {k: str(v) for k, v in svc["environment"].items()}
        env = {k: v.replace("${SIPHA_SECRET:-change-me-in-production}", "s")
                    .replace("${SIPHA_PUBLIC_ADDR:-127.0.0.1:5060}", "127.0.0.1:5060")
                    .replace("${SIPHA_UPSTREAM:-}", "") for k, v in env.items()}
        cfg = load_config(None, env=env)
        assert len(cfg.nodes) == 4
        if args.command == "node":
            assert cfg.node(args.id)


def test_each_node_points_at_its_own_redis(compose):
    svc = compose["services"]["node1"]
    entries = svc["environment"]["SIPHA_NODES"].split()
    for i, entry in enumerate(entries, start=1):
        assert entry == f"node{i}=node{i}:5070,redis://redis{i}:6379/0"
        assert compose["services"][f"node{i}"]["depends_on"] == [f"redis{i}"]


def test_the_proxy_can_reach_each_nodes_admin(compose):
    """A restarted proxy asks each node's admin endpoint for the NAT flows
    to ping (proxy/natping.py): with no [[nodes]] admin, at the node's
    host and SIP port + 1000, so a node binds it there, on the network."""
    parser = build_parser()
    for i in range(1, 5):
        args = parser.parse_args(compose["services"][f"node{i}"]["command"])
        assert args.admin == "0.0.0.0:6070"     # node{i}:5070 + 1000


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_accepts_the_file():
    subprocess.run(["docker-compose", "-f", str(ROOT / "compose.yaml"), "config", "-q"], check=True, cwd=ROOT)


def test_the_image_runs_the_modules_its_first_stage_compiled():
    """The compiled copies are used only while the installed source is the
    one they were compiled from: the image installs the source of the stage
    that compiled, and points SIPHA_COMPILED at the copies."""
    stages = [[line.split() for line in stage.splitlines() if line.strip() and not line.startswith("#")]
              for stage in (ROOT / "Dockerfile").read_text().split("\nFROM ")[1:]]
    assert len(stages) == 2
    first, name = stages[0], stages[0][0][2]
    assert {w[1] for w in first if w[0] == "COPY"} >= {"sipcore", "proxy", "node", "sipha"}
    assert any(w[0] == "RUN" and "compile" in w for w in first)
    workdir = next(w[1] for w in first if w[0] == "WORKDIR")
    copied = [w[2] for w in stages[1] if w[:2] == ["COPY", f"--from={name}"]]
    assert copied[0] == workdir and not any(w[0] == "COPY" and w[1] in ("sipcore", "proxy") for w in stages[1])
    target = next(w[3] for w in stages[1] if w[:3] == ["COPY", f"--from={name}", copied[1]])
    assert ["ENV", f"SIPHA_COMPILED={target}"] in stages[1]


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    for key in SETTINGS:
        assert f"| `{key}` |" in readme and env_name(key) in readme, key
