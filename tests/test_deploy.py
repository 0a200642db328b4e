"""The deployment files agree with each other and with the CLI.

No Docker engine runs in CI, so docker-compose.yml and the Dockerfile are checked by
parsing them; the nginx config is checked by `nginx -t` on its rendered local variant
(the one tests/test_nginx.py runs) and by comparing it with the canonical file. The
compose profiles `cluster` and `sentinel` must run the deploy/ files that the Redis
Cluster and Sentinel fixtures (tests/redis_topologies.py) run, adding nothing to them but
names; tests/test_redis_topologies.py runs the cluster-creation script for real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.nginx import NGINX_CONF, NginxProcess, render_nginx_config
from tests.processes import COORDINATOR, REPO, child_env
from tests.redis_topologies import (
    CLUSTER_CONF,
    CLUSTER_CREATE_SCRIPT,
    CLUSTER_MASTERS,
    SENTINEL_CONF,
    SENTINEL_NODE_CONF,
    SENTINELS,
    ClusterSettings,
    SentinelSettings,
    read_directives,
)

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
NODES = ("node1", "node2", "node3")
NODE_PORT = 8000


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


@pytest.fixture(scope="module")
def serve_env_names() -> set[str]:
    """COORDINATOR_* variables `coordinator serve` reads, from its --help."""
    done = subprocess.run(
        [*COORDINATOR, "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=child_env(),
    )
    assert done.returncode == 0, f"`coordinator serve --help` failed:\n{done.stderr}"
    text = done.stdout
    # The help states the rule (COORDINATOR_<FLAG>) and may name variables explicitly.
    names = set(re.findall(r"\bCOORDINATOR_[A-Z][A-Z0-9_]*\b", text))
    if "COORDINATOR_<FLAG>" in text:
        flags = re.findall(r"(?<![\w-])--([a-z][a-z0-9-]*)", text)
        names |= {"COORDINATOR_" + flag.upper().replace("-", "_") for flag in flags}
    return names


def profile(compose: dict[str, Any], name: str | None) -> dict[str, Any]:
    """The services of profile ``name`` (None: those started by a plain `up`)."""
    return {
        service: spec
        for service, spec in compose["services"].items()
        if (name in spec["profiles"] if "profiles" in spec else name is None)
    }


def mounted(spec: dict[str, Any]) -> dict[str, Path]:
    """A service's bind mounts: path in the container -> file in this repository."""
    mounts = {}
    for volume in spec.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            mounts[target] = (COMPOSE.parent / source).resolve()
    return mounts


def shell_script(command: list[str]) -> str | None:
    """The script of a `sh -c SCRIPT` command, with compose's `$$` unescaped."""
    if command[:2] != ["sh", "-c"]:
        return None
    return command[2].replace("$$", "$")


def test_compose_has_redis_three_nodes_and_nginx(compose: dict[str, Any]) -> None:
    services = profile(compose, None)
    assert set(services) == {"redis", *NODES, "nginx"}

    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(v.endswith(":/data") for v in redis["volumes"]), "Redis keeps its AOF on a volume"
    # Redis runs with the repository's ACL, rendered by the repository's script.
    acl = redis["command"][redis["command"].index("--aclfile") + 1]
    mounts = dict(v.rsplit(":", 2)[:2] for v in redis["volumes"] if v.startswith("./"))
    assert mounts["./deploy/redis-users.acl"] == "/etc/redis/users.acl.in"
    assert redis["entrypoint"] == ["sh", mounts["./deploy/redis-acl.sh"]]
    assert acl == "/data/users.acl"
    # Bounded, and full means an error, never an evicted key.
    policy = redis["command"][redis["command"].index("--maxmemory-policy") + 1]
    assert "--maxmemory" in redis["command"] and policy == "noeviction"
    assert compose["volumes"].keys() >= {"redis-data", "events"}

    node_ids = set()
    for name in NODES:
        node = services[name]
        assert node["build"] == ".", f"{name} is built from the Dockerfile"
        env = node["environment"]
        # The nodes' ACL user, its password from the operator's environment.
        assert env["COORDINATOR_REDIS_URL"].startswith(
            "redis://coordinator:${COORDINATOR_REDIS_PASSWORD"
        ) and env["COORDINATOR_REDIS_URL"].endswith("@redis:6379/0")
        nginx_ip = services["nginx"]["networks"]["default"]["ipv4_address"]
        assert env["COORDINATOR_TRUSTED_PROXIES"] == nginx_ip
        assert "command" not in node, "settings (and secrets) come from the environment"
        # The secret comes from the operator's environment, the same for every node.
        assert env["COORDINATOR_SECRET"].startswith("${COORDINATOR_SECRET")
        node_ids.add(env["COORDINATOR_NODE_ID"])
        assert node["depends_on"]["redis"]["condition"] == "service_healthy"
        # One event store for the cluster: the same directory, on one shared volume.
        assert env["COORDINATOR_EVENT_STORE"] == "file:///var/lib/coordinator/events"
        assert "events:/var/lib/coordinator/events" in node["volumes"]
        probe = " ".join(node["healthcheck"]["test"])
        assert f"127.0.0.1:{NODE_PORT}/healthz" in probe
    assert len(node_ids) == len(NODES), "every node has its own COORDINATOR_NODE_ID"

    nginx = services["nginx"]
    assert nginx["image"] == "nginx:1.25"
    assert "8080:80" in nginx["ports"]
    assert {n: {"condition": "service_healthy"} for n in NODES} == nginx["depends_on"]


def test_compose_mounts_the_nginx_conf_the_e2e_test_uses(compose: dict[str, Any]) -> None:
    mounts = [v.split(":") for v in compose["services"]["nginx"]["volumes"]]
    conf = [m for m in mounts if m[1] == "/etc/nginx/nginx.conf"]
    assert len(conf) == 1, mounts
    assert (COMPOSE.parent / conf[0][0]).resolve() == NGINX_CONF.resolve()


def test_nginx_conf_upstreams_are_the_compose_nodes() -> None:
    text = NGINX_CONF.read_text()
    servers = re.findall(r"(?m)^\s*server\s+(\S+?:\d+)", text)
    assert servers == [f"{n}:{NODE_PORT}" for n in NODES]
    assert re.findall(r"(?m)^\s*listen\s+([^;]+);", text) == ["80"]
    # The nginx image runs `nginx -g 'daemon off;'`; a second `daemon` would be refused.
    assert not re.search(r"(?m)^\s*daemon\s", text)


def test_rendered_local_nginx_conf_differs_only_in_addresses_and_paths(tmp_path: Path) -> None:
    rendered = render_nginx_config(["127.0.0.1:9001", "127.0.0.1:9002"], "127.0.0.1:9000", tmp_path)
    changed = set(NGINX_CONF.read_text().splitlines()) ^ set(rendered.splitlines())
    allowed = re.compile(r"^\s*(server\s|listen\s|pid\s|error_log\s|access_log\s|\w+_temp_path\s)")
    assert changed and all(allowed.match(line) for line in changed), changed
    for directive in ("proxy_http_version 1.1;", "proxy_set_header Upgrade $http_upgrade;"):
        assert directive in rendered


def test_rendered_local_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    output = NginxProcess(["127.0.0.1:9001", "127.0.0.1:9002"], 9000, tmp_path).check_config()
    assert "test is successful" in output


def test_dockerfile_runs_the_node_cli() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"(?m)^FROM python:3\.11-slim\b", text)
    cmd = re.search(r"(?m)^CMD\s+(\[.*\])\s*$", text)
    assert cmd is not None
    assert json.loads(cmd.group(1)) == [
        "coordinator", "serve", "--host", "0.0.0.0", "--port", str(NODE_PORT),
    ]  # fmt: skip
    assert re.search(rf"(?m)^EXPOSE {NODE_PORT}\b", text)
    # The image has what `pip install .` needs (pyproject names README.md as the readme).
    for needed in ("pyproject.toml", "README.md", "coordinator", "workers"):
        assert re.search(rf"(?m)^COPY .*\b{re.escape(needed)}\b", text), needed
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "coordinator" not in ignored and "workers" not in ignored


def test_node_settings_are_variables_the_cli_reads(
    compose: dict[str, Any], serve_env_names: set[str]
) -> None:
    assert {"COORDINATOR_REDIS_URL", "COORDINATOR_NODE_ID", "COORDINATOR_SECRET"} <= (
        serve_env_names
    ), f"`coordinator serve --help` names only {sorted(serve_env_names)}"
    for name in NODES:
        used = {k for k in compose["services"][name]["environment"] if k.startswith("COORDINATOR_")}
        assert used <= serve_env_names, f"{name}: {sorted(used - serve_env_names)} not read"
    in_dockerfile = set(re.findall(r"\bCOORDINATOR_[A-Z][A-Z0-9_]*\b", DOCKERFILE.read_text()))
    assert in_dockerfile <= serve_env_names, sorted(in_dockerfile - serve_env_names)


def test_ci_runs_the_make_test_command() -> None:
    ci = REPO / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    lines = [line.strip() for line in ci.read_text().splitlines()]
    assert "set -euo pipefail" in lines
    assert any(re.fullmatch(r"(exec )?make test", line) for line in lines)


# --- the Redis Cluster and Sentinel profiles run the files the fixtures run ---------------


def test_compose_cluster_profile_runs_the_fixtures_config(compose: dict[str, Any]) -> None:
    services = profile(compose, "cluster")
    nodes = sorted(name for name in services if name != "redis-cluster-create")
    assert nodes == [f"redis-cluster-{i}" for i in range(1, 7)]
    port = int(_one(read_directives(CLUSTER_CONF), "port"))
    for name in nodes:
        spec = services[name]
        assert spec["image"].startswith("redis:7")
        (conf,) = [target for target, source in mounted(spec).items() if source == CLUSTER_CONF]
        command = spec["command"]
        assert command[:2] == ["redis-server", conf]
        # Only the name the node announces is added: every setting the fixtures take
        # from the file (node timeout, coverage, persistence...) is the file's.
        assert command[2:] == [
            "--cluster-announce-hostname", name,
            "--cluster-preferred-endpoint-type", "hostname",
        ]  # fmt: skip
        assert spec["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]

    create = services["redis-cluster-create"]
    (script,) = [t for t, source in mounted(create).items() if source == CLUSTER_CREATE_SCRIPT]
    assert create["command"] == ["sh", script, *(f"{name}:{port}" for name in nodes)]
    assert create["depends_on"] == {n: {"condition": "service_healthy"} for n in nodes}
    assert create["restart"] == "no"
    replicas = int(create["environment"]["REPLICAS"])
    assert len(nodes) == CLUSTER_MASTERS * (1 + replicas), "the fixtures' shape: 3 masters"
    assert os.access(CLUSTER_CREATE_SCRIPT, os.X_OK)

    settings = ClusterSettings.from_file(CLUSTER_CONF)
    assert settings.node_timeout_ms <= 5000, "failover tests wait a few node timeouts"


def test_compose_sentinel_profile_runs_the_fixtures_config(compose: dict[str, Any]) -> None:
    services = profile(compose, "sentinel")
    data = ["redis-sentinel-master", "redis-sentinel-replica"]
    sentinels = sorted(set(services) - set(data))
    assert sentinels == [f"redis-sentinel-{i}" for i in range(1, SENTINELS + 1)]
    settings = SentinelSettings.from_file(SENTINEL_CONF)
    data_port = int(_one(read_directives(SENTINEL_NODE_CONF), "port"))

    for name in data:
        spec = services[name]
        assert spec["image"].startswith("redis:7")
        (conf,) = [t for t, source in mounted(spec).items() if source == SENTINEL_NODE_CONF]
        script = shell_script(spec["command"])
        assert script is not None and conf in script
        assert spec["environment"]["ANNOUNCE"] == name
    assert services["redis-sentinel-master"]["environment"]["FIRST_ROLE"] == ""
    replica = services["redis-sentinel-replica"]
    assert replica["environment"]["FIRST_ROLE"] == f"replicaof {data[0]} {data_port}"
    # The sentinels watch that master, by the name it announces.
    assert (settings.master_host, settings.master_port) == (data[0], data_port)
    directives = read_directives(SENTINEL_CONF)
    assert ["sentinel", "resolve-hostnames", "yes"] in directives

    sentinel_port = int(_one(directives, "port"))
    for name in sentinels:
        spec = services[name]
        assert spec["image"].startswith("redis:7")
        (conf,) = [t for t, source in mounted(spec).items() if source == SENTINEL_CONF]
        script = shell_script(spec["command"])
        assert script is not None and conf in script and "--sentinel" in script
        assert spec["healthcheck"]["test"][-3:] == ["-p", str(sentinel_port), "ping"]
        assert set(spec["depends_on"]) == set(data)
    # Two of the three must agree the master is down: a lone sentinel cannot fail over.
    assert len(sentinels) // 2 < settings.quorum <= len(sentinels)


def test_compose_shell_commands_parse(compose: dict[str, Any]) -> None:
    scripts = [
        script
        for spec in compose["services"].values()
        if (script := shell_script(spec.get("command") or [])) is not None
    ]
    assert scripts, "the sentinel profile runs its nodes from copies made by sh -c"
    for script in scripts:
        done = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, f"{script}\n{done.stderr}"


def _one(directives: list[list[str]], name: str) -> str:
    (value,) = [d[1] for d in directives if d[0].lower() == name]
    return value


def test_redis_acl_file_is_what_redis_reads() -> None:
    """Redis ACL files have no comments: every line names a user. The nodes' user has a
    password hash placeholder the entrypoint fills in, and keys and channels under the
    default key prefix only."""
    lines = (REPO / "deploy" / "redis-users.acl").read_text().splitlines()
    assert all(line.startswith("user ") for line in lines), lines
    users = {line.split()[1]: line.split()[2:] for line in lines}
    assert set(users) == {"default", "coordinator"}
    assert users["default"][-2:] == ["-@all", "+ping"] and "nopass" in users["default"]
    rules = users["coordinator"]
    assert "#@COORDINATOR_REDIS_PASSWORD_SHA256@" in rules
    assert [r for r in rules if r[0] in "~&%"] == ["~coord:*", "&coord:*"]
    assert "-@all" in rules and not [r for r in rules if r.startswith("+@")]
