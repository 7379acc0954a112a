"""The deploy files no container engine or cluster runs here, parsed and checked against the
code: images, volumes, probes on the worker's real health port and paths, sync_interval
always, and every command line parsed by the real `jetledger` CLI (and named in its --help).
The systemd unit goes through `systemd-analyze verify` where that exists."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from test_deploy_support import DEPLOY, PASSWORDS, ROOT

from jetledger.client.cli import build_parser
from jetledger.worker.config import WorkerConfig
from jetledger.worker.settings import load_config

COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
K8S = list(yaml.safe_load_all((DEPLOY / "k8s" / "worker.yaml").read_text()))
NATS_CLUSTER_CONF = (DEPLOY / "nats" / "cluster.conf").read_text()


def _settings(toml_text: str, tmp_path: Path) -> WorkerConfig:
    path = tmp_path / "settings.toml"
    path.write_text(toml_text)
    return load_config(environ={"JETLEDGER_CONFIG": str(path)})


@cache
def _help(*command: str) -> str:
    out = subprocess.run([sys.executable, "-m", "jetledger.client.cli", *command, "--help"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def check_command(argv: list[str]) -> Any:
    """`argv` (after `jetledger`) parses with the real CLI, and each flag is in --help."""
    args = build_parser().parse_args(argv)
    words = [a for a in argv[:2] if not a.startswith("-")]
    command = words[:2] if words[0] == "admin" else words[:1]
    text = _help(*command)
    for flag in (a.split("=", 1)[0] for a in argv if a.startswith("--")):
        assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", text), f"{flag} not in --help"
    return args


def _http_probe(url: str) -> tuple[int, str]:
    parsed = urlparse(url)
    assert parsed.hostname == "127.0.0.1" and parsed.port is not None
    return parsed.port, parsed.path


def _python_probe(test: list[str]) -> str:
    """The URL in a `python -c "urllib.request.urlopen('...')"` health check."""
    assert test[:3] == ["CMD", "python", "-c"], test
    match = re.search(r"urlopen\('([^']+)'", test[3])
    assert match, test
    return match.group(1)


# --- settings files ----------------------------------------------------------------------


def test_every_shipped_settings_file_is_valid(tmp_path: Path) -> None:
    configmap = next(d for d in K8S if d["kind"] == "ConfigMap")
    for text in ((DEPLOY / "worker.toml").read_text(), (DEPLOY / "container.toml").read_text(),
                 configmap["data"]["worker.toml"]):
        cfg = _settings(text, tmp_path)
        assert cfg.http_port == 9464 and cfg.http_host == "0.0.0.0"
        assert cfg.data_dir == Path("/var/lib/jetledger") and cfg.log_format == "json"
        assert cfg.nats_password is None  # secrets never sit in these files
    for text in ((DEPLOY / "worker.toml").read_text(), configmap["data"]["worker.toml"]):
        cfg = _settings(text, tmp_path)
        assert (cfg.provision, cfg.replicas, cfg.nats_user) == (False, 3, "jetledger-worker")
        assert cfg.inbox_prefix == "_WORKER_INBOX"
        assert "_WORKER_INBOX.>" in (DEPLOY / "nats" / "auth.conf").read_text()


def test_nats_configs_sync_every_write_and_cluster_routes_match_compose() -> None:
    for name in ("single.conf", "cluster.conf"):
        text = (DEPLOY / "nats" / name).read_text()
        assert re.search(r"^\s*sync_interval: always$", text, re.MULTILINE), name
        assert re.search(r"^http_port: 8222$", text, re.MULTILINE), name
        assert 'include "auth.conf"' in text
    routes = re.findall(r"nats://([\w-]+):6222", NATS_CLUSTER_CONF)
    nats_services = sorted(s for s in COMPOSE["services"] if s.startswith("nats-"))
    assert sorted(routes) == nats_services == ["nats-1", "nats-2", "nats-3"]
    assert "server_name: $NATS_SERVER_NAME" in NATS_CLUSTER_CONF
    # auth.conf reads exactly the passwords the deploy files provide.
    used = set(re.findall(r"\$(JETLEDGER_\w+_PASSWORD)", (DEPLOY / "nats" / "auth.conf")
                          .read_text()))
    env_example = dict(line.split("=", 1) for line in (DEPLOY / ".env.example").read_text()
                       .splitlines() if line and not line.startswith("#"))
    assert used == set(PASSWORDS) == set(env_example)


# --- compose -----------------------------------------------------------------------------


def test_compose_runs_three_synced_nodes_with_their_own_volumes() -> None:
    services, volumes = COMPOSE["services"], COMPOSE["volumes"]
    store = re.search(r'store_dir: "([^"]+)"', NATS_CLUSTER_CONF)
    assert store is not None
    for name in ("nats-1", "nats-2", "nats-3"):
        svc = services[name]
        assert svc["image"].startswith("nats:") and svc["hostname"] == name
        assert svc["command"] == ["-c", "/etc/nats/cluster.conf"]
        assert svc["environment"]["NATS_SERVER_NAME"] == name
        assert set(PASSWORDS) <= set(svc["environment"])
        mounts = dict(v.split(":", 1) for v in svc["volumes"])
        assert mounts["./nats"] == "/etc/nats:ro" and (DEPLOY / "nats" / "cluster.conf").exists()
        assert mounts[name] == "/data" and name in volumes  # per-node store
        assert store.group(1).startswith("/data/")
        url = svc["healthcheck"]["test"][-1]
        port, path = _http_probe(url)
        assert (port, path) == (8222, "/healthz")


def test_compose_worker_image_volume_probe_and_commands_match_the_cli(tmp_path: Path) -> None:
    services = COMPOSE["services"]
    worker, init = services["worker"], services["admin-init"]
    cfg = _settings((DEPLOY / "worker.toml").read_text(), tmp_path)
    for svc in (worker, init):
        assert svc["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert (DEPLOY / ".." / svc["build"]["dockerfile"]).exists()
        assert "./worker.toml:/etc/jetledger/worker.toml:ro" in svc["volumes"]
    args = check_command(worker["command"])
    assert args.command == "worker" and str(args.config) == "/etc/jetledger/worker.toml"
    args = check_command(init["command"])
    assert (args.command, args.admin_command, args.nats_user) == ("admin", "init", "admin")
    assert "ADMIN" in init["environment"]["JETLEDGER_NATS_PASSWORD"]
    assert "WORKER" in worker["environment"]["JETLEDGER_NATS_PASSWORD"]
    # The ledger sits on a named volume at the configured data_dir.
    assert f"ledger:{cfg.data_dir}" in worker["volumes"] and "ledger" in COMPOSE["volumes"]
    port, path = _http_probe(_python_probe(worker["healthcheck"]["test"]))
    assert (port, path) == (cfg.http_port, "/readyz")
    assert worker["ports"] == [f"127.0.0.1:{cfg.http_port}:{cfg.http_port}"]
    assert _seconds(worker["stop_grace_period"]) > cfg.stop_timeout
    assert worker["depends_on"] == {"admin-init": {"condition": "service_completed_successfully"}}
    # worker.toml points at the compose services.
    hosts = {urlparse(u).hostname for u in (cfg.nats_url or "").split(",")}
    assert hosts == {"nats-1", "nats-2", "nats-3"}
    assert urlparse(cfg.nats_monitor_url or "").netloc == "nats-1:8222"


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)s", str(text))
    assert match, text
    return float(match.group(1))


# --- Dockerfile --------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_a_non_root_worker_image_with_a_real_health_check(
    tmp_path: Path,
) -> None:
    steps = _dockerfile()
    get = lambda word: [rest for w, rest in steps if w == word]
    cfg = _settings((DEPLOY / "container.toml").read_text(), tmp_path)
    assert re.fullmatch(r"python:3\.1[1-9]-slim", get("FROM")[0])
    for rest in get("COPY"):
        *sources, _dest = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "worker" in pyproject["project"]["optional-dependencies"]
    assert any('pip install ".[worker]"' in r for r in get("RUN"))
    assert get("USER") == ["10001:10001"]
    assert get("EXPOSE") == [str(cfg.http_port)]
    assert get("VOLUME") == [f'["{cfg.data_dir}"]']
    assert get("STOPSIGNAL") == ["SIGTERM"]
    health = get("HEALTHCHECK")[0]
    cmd = health[health.index("CMD") + 4:]
    url = _python_probe(["CMD", *shlex.split(cmd.strip("[]").replace('", "', '" "'))])
    assert _http_probe(url) == (cfg.http_port, "/readyz")
    assert get("ENTRYPOINT") == ['["jetledger"]']
    cmd_args = re.findall(r'"([^"]+)"', get("CMD")[0])
    assert check_command(cmd_args).command == "worker"
    assert cmd_args[cmd_args.index("--config") + 1] == "/etc/jetledger/worker.toml"
    # The build context is the repository root: the ignore file must keep what COPY needs.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for kept in ("pyproject.toml", "README.md", "schemas/**", "client/**", "worker/**",
                 "deploy/container.toml"):
        assert f"!{kept}" in ignore


# --- Kubernetes ---------------------------------------------------------------------------


def test_kubernetes_worker_statefulset_volume_config_secret_and_probes(tmp_path: Path) -> None:
    kinds = {d["kind"]: d for d in K8S}
    assert set(kinds) == {"ConfigMap", "Secret", "Job", "Service", "StatefulSet"}
    sts, svc, cm, secret = (kinds[k] for k in ("StatefulSet", "Service", "ConfigMap", "Secret"))
    cfg = _settings(cm["data"]["worker.toml"], tmp_path)
    spec = sts["spec"]
    assert spec["replicas"] == 1  # one writer per ledger file
    assert spec["serviceName"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"] == labels == svc["spec"]["selector"]
    (container,) = pod["containers"]
    assert container["image"] == COMPOSE["services"]["worker"]["image"]
    args = check_command(container["args"])
    assert args.command == "worker"
    # The config file the args name is the ConfigMap key, mounted where the args say.
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_path = Path(str(args.config))
    assert mounts["config"]["mountPath"] == str(config_path.parent)
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert config_path.name in cm["data"]
    # The ledger on a PVC per pod, at data_dir.
    (claim,) = spec["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]]["mountPath"] == str(cfg.data_dir)
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Probes on the worker's real port and paths.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == cfg.http_port
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "livenessProbe",
                                                   "readinessProbe")}
    assert probes["livenessProbe"] == {"path": "/healthz", "port": "http"}
    assert probes["readinessProbe"] == {"path": "/readyz", "port": "http"}
    assert probes["startupProbe"]["path"] == "/healthz"
    assert pod["terminationGracePeriodSeconds"] > cfg.stop_timeout
    # Non-root, read-only root with a writable /tmp, the password from the Secret.
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    tmp = next(m for m in mounts.values() if m["mountPath"] == "/tmp")
    assert volumes[tmp["name"]]["emptyDir"] == {}
    (env,) = container["env"]
    ref = env["valueFrom"]["secretKeyRef"]
    assert env["name"] == "JETLEDGER_NATS_PASSWORD"
    assert ref == {"name": secret["metadata"]["name"], "key": "worker"}
    assert set(secret["stringData"]) == {"admin", "worker", "acme", "globex"}
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_kubernetes_admin_init_job_runs_the_real_command_as_admin() -> None:
    job = next(d for d in K8S if d["kind"] == "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = check_command(container["args"])
    assert (args.command, args.admin_command, args.nats_user) == ("admin", "init", "admin")
    (env,) = container["env"]
    assert env["valueFrom"]["secretKeyRef"]["key"] == "admin"


# --- systemd -----------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "jetledger-worker.service"


def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit_is_hardened_and_runs_the_real_command(tmp_path: Path) -> None:
    service = _unit()["Service"]
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/bin/jetledger")
    args = check_command(argv[1:])
    assert args.command == "worker"
    cfg = _settings((DEPLOY / "worker.toml").read_text(), tmp_path)
    assert _seconds(service["TimeoutStopSec"][0]) > cfg.stop_timeout
    assert service["KillSignal"] == ["SIGTERM"] and service["RestartPreventExitStatus"] == ["2"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("DynamicUser", "yes"), ("PrivateTmp", "yes"),
                       ("CapabilityBoundingSet", ""), ("MemoryDenyWriteExecute", "yes")):
        assert service[key] == [value], key
    assert service["StateDirectory"] == ["jetledger"]
    assert f"JETLEDGER_DATA_DIR=/var/lib/{service['StateDirectory'][0]}" in service["Environment"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verifies_the_unit_and_rates_it_well(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this environment's jetledger.
    jetledger = Path(sys.executable).with_name("jetledger")
    assert jetledger.exists()
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/jetledger/venv/bin/jetledger",
                                             str(jetledger)))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    sec = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                         capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", sec.stdout)
    assert match, sec.stdout + sec.stderr
    assert float(match.group(1)) <= 2.0, sec.stdout
