"""sipcore.config: file, environment and flags; bad settings name their key."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sipcore.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "cluster.toml"
    p.write_text(text)
    return str(p)


def test_file_then_environment_then_flags(tmp_path):
    path = write(tmp_path, '[health]\ninterval = 0.25\n[proxy]\nlisten = "127.0.0.1:5999"\n'
                           '[[nodes]]\nid = "node1"\nsip = "127.0.0.1:5070"\nredis = "redis://127.0.0.1:6390/0"\n')
    cfg = load_config(path, env={})
    assert cfg["health.interval"] == 0.25
    assert cfg.nodes[0].redis == "redis://127.0.0.1:6390/0"
    cfg = load_config(path, env={"SIPHA_HEALTH_INTERVAL": "1.5", "SIPHA_NODES": "n1=10.0.0.1:5070 n2=10.0.0.2:5070"})
    assert cfg["health.interval"] == 1.5 and [n.id for n in cfg.nodes] == ["n1", "n2"]
    cfg = load_config(path, env={"SIPHA_PROXY_LISTEN": "127.0.0.1:1"}, overrides={"proxy.listen": "127.0.0.1:2"})
    assert cfg.listen == [("127.0.0.1", 2)]


@pytest.mark.parametrize("text, key", [
    ("[health]\ninterval = \"fast\"\n", "health.interval"),
    ("[health]\nbogus = 1\n", "health.bogus"),
    ("[proxy]\nlisten = \"nohost:\"\n", "proxy.listen"),
    ("[proxy]\nlisten = \"127.0.0.1:5060,[::1]:5060,127.0.0.1:5060\"\n", "proxy.listen: 127.0.0.1:5060 is given twice"),
    ("[[nodes]]\nid = \"n1\"\n", "nodes[0]"),
    ("[log]\nformat = \"xml\"\n", "log.format"),
    ("[limits]\noverload_delay = 0.5\n", "limits.overload_delay"),
    ("[proxy]\nlisten = \"127.0.0.1:5060,[::1]:5060\"\nadvertise = \"[::1]:5060,[::2]:5060\"\n", "proxy.advertise"),
    ("[proxy]\nadvertise = \"[2001:db8::1]:5060\"\n", "proxy.advertise"),
    ("[proxy]\ninternal = \"[::1]:5060\"\n", "proxy.internal: [::1]:5060 is IPv6, and proxy.listen has no"),
    ("[proxy]\nlisten = \"[::1]:5060\"\ninternal = \"127.0.0.1:5060\"\n",
     "proxy.internal: 127.0.0.1:5060 is IPv4, and proxy.listen has no"),
    ("[proxy]\nlisten = \"[::1]:5060\"\nadvertise = \"198.51.100.5:5060\"\n",
     "proxy.advertise: an IPv4 address, but proxy.listen has none"),
    ("[proxy]\nlisten = \"127.0.0.1:5060,[::1]:5060\"\ninternal = \"[::1]:5060\"\n"
     "[[nodes]]\nid = \"n1\"\nsip = \"127.0.0.1:5070\"\n", "nodes: n1 is at 127.0.0.1:5070, and the proxy's"),
    ("[proxy]\ndns_servers = \"ns1.example\"\n", "proxy.dns_servers"),
    ("[proxy]\nws_origins = \"phone.example.com\"\n", "proxy.ws_origins"),
    ("[node]\ndialog_ttl = 0\n", "node.dialog_ttl"),
])
def test_bad_settings_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, text), env={})


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="SIPHA_HEALTH_DOWN_AFTER"):
        load_config(None, env={"SIPHA_HEALTH_DOWN_AFTER": "two"})


def test_cli_error_names_bad_option_and_opens_no_socket():
    r = subprocess.run([sys.executable, "-m", "sipha.cli", "proxy", "--listen", "127.0.0.1:99999",
                        "--node", "node1=127.0.0.1:5070"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2
    assert "proxy.listen" in r.stderr and "out of range" in r.stderr
    # a clear refusal, not a proxy that cannot reach its nodes
    r = subprocess.run([sys.executable, "-m", "sipha.cli", "proxy", "--listen", "[::1]:5060",
                        "--node", "node1=127.0.0.1:5070"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and ("nodes: node1 is at 127.0.0.1:5070, and the proxy's address for the nodes "
                                  "(proxy.internal) is [::1]:5060") in r.stderr
    r = subprocess.run([sys.executable, "-m", "sipha.cli", "proxy", "--node", "node1=[::1]:5070"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "nodes: node1 is at [::1]:5070, and the proxy's address for the nodes" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sipha.cli", "proxy", "--node", "bad"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "--node" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sipha.cli", "proxy", "--config", "/nonexistent.toml"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "--config" in r.stderr


@pytest.mark.parametrize("upstream, said", [
    ("garbage", "node.upstream: not a URI: 'garbage'"),
    ("tel:+15551234", "node.upstream: not a SIP URI"),
])
def test_a_bad_upstream_is_a_cli_error_not_a_traceback(upstream, said):
    r = subprocess.run([sys.executable, "-m", "sipha.cli", "node", "--id", "n1",
                        "--node", "n1=127.0.0.1:5071,redis://127.0.0.1:6379/0", "--upstream", upstream],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr


NODE = ["node", "--id", "n1", "--node", "n1=127.0.0.1:5071,redis://127.0.0.1:6379/0"]


@pytest.mark.parametrize("args, env, said", [
    (["node", "--id", "n1", "--node", "n1=127.0.0.1:5071"], {}, "nodes: node n1 has no Redis URL"),
    (["load", "--target", "127.0.0.1:9", "--hold", "-1"], {}, "--hold: must not be negative"),
    (NODE, {"SIPHA_AUTH_TRUSTED": "10.1.2.0/33", "SIPHA_AUTH_USERS_FILE": "/dev/null"},
     "auth.trusted: expected IP addresses or networks (ADDR/BITS), got '10.1.2.0/33'"),
    (NODE, {"SIPHA_AUTH_TRUSTED": "trunk.example"},
     "auth.trusted: expected IP addresses or networks (ADDR/BITS), got 'trunk.example'"),
    (NODE, {"SIPHA_AUTH_TRUSTED": "10.0.0.1"}, "auth.trusted: no auth.users_file"),
    (NODE, {"SIPHA_AUTH_ALGORITHMS": "SHA-256, SHA-1"},
     "auth.algorithms: expected one or both of MD5, SHA-256, in the order offered, got 'SHA-256, SHA-1'"),
    (NODE, {"SIPHA_AUTH_ALGORITHMS": " , "}, "auth.algorithms: expected one or both of MD5, SHA-256"),
])
def test_other_bad_options_are_cli_errors_not_tracebacks(args, env, said):
    r = subprocess.run([sys.executable, "-m", "sipha.cli", *args], capture_output=True, text=True, timeout=20,
                       env={**os.environ, **env})
    assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr


def test_the_nodes_may_be_on_ipv6_with_the_proxys_address_for_them(tmp_path):
    cfg = load_config(write(tmp_path, '[proxy]\nlisten = "127.0.0.1:5060,[::1]:5060"\ninternal = "[::1]:5060"\n'
                                      '[[nodes]]\nid = "n1"\nsip = "[::1]:5070"\n'), env={})
    assert cfg.internal == ("::1", 5060) and cfg.nodes[0].sip == ("::1", 5070)
    # on an IPv6-only network the proxy listens on IPv6 only: its address
    # for the nodes is then its first listen address
    cfg = load_config(write(tmp_path, '[proxy]\nlisten = "[::1]:5060,[2001:db8::5]:5060"\n'
                                      '[[nodes]]\nid = "n1"\nsip = "[::1]:5070"\n'), env={})
    assert cfg.internal == ("::1", 5060) and cfg.advertise == {}
