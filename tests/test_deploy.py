"""The deployment files: the Kubernetes manifest and the systemd unit.

Every document of the manifest is validated offline against the Kubernetes API's OpenAPI
schema (kubernetes-validate bundles it; strict: a field the API does not know is an error),
for the oldest Kubernetes we claim and the newest the package knows, with the network
closed. The schema misses what the API server checks in code (enums such as a hostPath's
type), so those are checked here, with what the comments promise: no `privileged`, exactly
the capabilities the agent needs, the clients' /run/mace, scrape annotations on the port
that --metrics serves, --config where the ConfigMap is mounted, probes in a TOML that parses.
"""

from __future__ import annotations

import copy
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml

import mace_tools.agent
from mace_tools.cli.agent import app as agent_app

AGENT_DIR = Path(mace_tools.agent.__file__).parent
MANIFEST = AGENT_DIR / "kubernetes" / "mace-agent.yaml"
UNIT = AGENT_DIR / "mace-agent.service"
README = Path(__file__).resolve().parents[1] / "README.md"
FLEET_SECTION = "## Fleet: Prometheus and Kubernetes\n"

OLDEST_KUBERNETES = "1.30"  # the manifest uses nothing newer
KUBERNETES_VERSIONS = (OLDEST_KUBERNETES, kubernetes_validate.latest_version())

# README "Many containers, one host" and the manifest's comments: why each one
AGENT_CAPABILITIES = {"BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE", "NET_RAW"}
UNIT_ONLY = {"CHOWN"}  # --group, which MACE_AGENT_OPTS may name; the manifest does not
HOST_PATHS = {"/run/mace": "DirectoryOrCreate", "/run/netns": "DirectoryOrCreate"}

# Values the API server checks in code, not in the OpenAPI schema
HOST_PATH_TYPES = {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket",
                   "CharDevice", "BlockDevice"}
MOUNT_PROPAGATIONS = {"None", "HostToContainer", "Bidirectional"}
PULL_POLICIES = {"Always", "IfNotPresent", "Never"}
DNS_POLICIES = {"ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"}
SECCOMP_TYPES = {"RuntimeDefault", "Localhost", "Unconfined"}
POD_SECURITY_LEVELS = {"privileged", "baseline", "restricted"}
# RFC 2606 / RFC 6761 names: the example config must probe nothing real
DOCUMENTATION_NAME = re.compile(r"(^|.*\.)(example|example\.(com|net|org))$")


def load_documents(text: str | None = None) -> list[dict[str, Any]]:
    raw = MANIFEST.read_text() if text is None else text
    return [doc for doc in yaml.safe_load_all(raw) if doc is not None]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = (doc for doc in docs if doc["kind"] == kind)
    return found


@pytest.fixture
def docs() -> list[dict[str, Any]]:
    return load_documents()


@pytest.fixture
def pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(docs, "DaemonSet")["spec"]["template"]["spec"]


@pytest.fixture
def agent(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["containers"]
    return container


def option(args: list[str], name: str) -> str:
    """The value of `name VALUE` in args (exactly once)."""
    at = [i for i, arg in enumerate(args) if arg == name]
    assert len(at) == 1, f"{name} given {len(at)} times in {args}"
    return args[at[0] + 1]


def mount_of(container: dict[str, Any], path: str) -> dict[str, Any]:
    (mount,) = (m for m in container["volumeMounts"] if m["mountPath"] == path)
    return mount


def volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = (v for v in pod["volumes"] if v["name"] == name)
    return found


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the network (a schema fetched from a URL) fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network used during validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.usefixtures("no_network")
def test_no_network_fixture_refuses_a_connection() -> None:
    with pytest.raises(AssertionError, match="network used"):
        socket.create_connection(("198.18.0.1", 80), timeout=1)


# --- the manifest against the Kubernetes API schema --------------------------------------

def test_manifest_holds_namespace_configmap_daemonset(docs: list[dict[str, Any]]) -> None:
    assert [doc["kind"] for doc in docs] == ["Namespace", "ConfigMap", "DaemonSet"]
    namespace = by_kind(docs, "Namespace")["metadata"]["name"]
    assert all(doc["metadata"]["namespace"] == namespace for doc in docs[1:])


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_document_validates_strictly(docs: list[dict[str, Any]], version: str) -> None:
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def _rename(spec: dict[str, Any], old: str, new: str) -> None:
    spec[new] = spec.pop(old)


BREAKAGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "misspelled field": lambda pod: _rename(pod, "hostNetwork", "hostNetwrok"),
    "unknown nested field": lambda pod: pod["containers"][0]["securityContext"].update(
        privilegd=False),
    "boolean as string": lambda pod: pod.update(hostPID="yes"),
    "port as string": lambda pod: pod["containers"][0]["ports"][0].update(
        containerPort="9386"),
    "capability list as string": lambda pod: pod["containers"][0]["securityContext"][
        "capabilities"].update(add="BPF"),
    "no containers": lambda pod: pod.pop("containers"),
}


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_manifest_fails_validation(docs: list[dict[str, Any]], breakage: str) -> None:
    broken = copy.deepcopy(by_kind(docs, "DaemonSet"))
    BREAKAGES[breakage](broken["spec"]["template"]["spec"])
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST_KUBERNETES, strict=True)


@pytest.mark.usefixtures("no_network")
def test_an_unknown_annotation_type_fails_validation(docs: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(by_kind(docs, "DaemonSet"))
    broken["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = 9386
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST_KUBERNETES, strict=True)


def test_values_the_schema_leaves_to_the_api_server(docs: list[dict[str, Any]],
                                                    pod: dict[str, Any],
                                                    agent: dict[str, Any]) -> None:
    for vol in pod["volumes"]:
        if "hostPath" in vol:
            assert vol["hostPath"].get("type", "") in HOST_PATH_TYPES
    for mount in agent["volumeMounts"]:
        assert mount.get("mountPropagation", "None") in MOUNT_PROPAGATIONS
    assert agent["imagePullPolicy"] in PULL_POLICIES
    assert pod["dnsPolicy"] in DNS_POLICIES
    assert agent["securityContext"]["seccompProfile"]["type"] in SECCOMP_TYPES
    labels = by_kind(docs, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] in POD_SECURITY_LEVELS
    selector = by_kind(docs, "DaemonSet")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= by_kind(docs, "DaemonSet")["spec"]["template"]["metadata"][
        "labels"].items()


# --- what the manifest promises -----------------------------------------------------------

def test_capabilities_not_privileged(pod: dict[str, Any], agent: dict[str, Any]) -> None:
    context = agent["securityContext"]
    assert context["privileged"] is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    added = context["capabilities"]["add"]
    assert len(added) == len(set(added)), added
    # spelled without CAP_: the API refuses allowPrivilegeEscalation false beside
    # "CAP_SYS_ADMIN", and the runtimes add the prefix themselves
    assert set(added) == AGENT_CAPABILITIES
    assert "securityContext" not in pod or "privileged" not in pod["securityContext"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert pod["automountServiceAccountToken"] is False


def test_only_the_host_paths_the_agent_needs(pod: dict[str, Any],
                                             agent: dict[str, Any]) -> None:
    host_paths = {v["hostPath"]["path"]: v["hostPath"]["type"]
                  for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == HOST_PATHS
    socket_dir = mount_of(agent, "/run/mace")
    assert volume(pod, socket_dir["name"])["hostPath"]["path"] == "/run/mace"
    assert not socket_dir.get("readOnly", False)  # the agent binds its socket there
    assert str(Path(option(agent["args"], "--socket")).parent) == socket_dir["mountPath"]
    netns = mount_of(agent, "/run/netns")
    assert netns["readOnly"] is True and netns["mountPropagation"] == "HostToContainer"
    # /run itself is writable (the program set's lock) but not the host's
    assert "emptyDir" in volume(pod, mount_of(agent, "/run")["name"])


def test_scrape_annotations_name_the_metrics_port(docs: list[dict[str, Any]],
                                                  agent: dict[str, Any]) -> None:
    annotations = by_kind(docs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    address, port = option(agent["args"], "--metrics").rsplit(":", 1)
    assert address in ("0.0.0.0", "[::]")  # the kubelet and Prometheus reach the node's IP
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == port
    (ports,) = agent["ports"]
    assert (ports["name"], ports["containerPort"]) == ("metrics", int(port))
    for probe in ("readinessProbe", "livenessProbe"):
        get = agent[probe]["httpGet"]
        assert get["port"] in ("metrics", int(port))
        assert get["path"] == annotations["prometheus.io/path"] == "/metrics"


def test_config_is_the_mounted_configmap(docs: list[dict[str, Any]], pod: dict[str, Any],
                                         agent: dict[str, Any]) -> None:
    config = Path(option(agent["args"], "--config"))
    mount = mount_of(agent, str(config.parent))
    assert mount["readOnly"] is True
    configmap = by_kind(docs, "ConfigMap")
    assert volume(pod, mount["name"])["configMap"]["name"] == configmap["metadata"]["name"]
    assert config.name in configmap["data"]


def check_probe_config(text: str) -> list[dict[str, Any]]:
    """The probes of an agent TOML config, which holds only the keys the agent reads."""
    config = tomllib.loads(text)
    assert set(config) <= {"interval", "probe"}
    for probe in config["probe"]:
        assert set(probe) <= {"source", "target", "interval"}, probe
        assert isinstance(probe["target"], str)
    return config["probe"]


def test_configmap_toml_has_probes(docs: list[dict[str, Any]]) -> None:
    data = by_kind(docs, "ConfigMap")["data"]
    (text,) = data.values()
    probes = check_probe_config(text)
    assert probes, "no [[probe]]"
    for probe in probes:
        # a placeholder the user edits: never an address anyone would be sent pings at
        assert DOCUMENTATION_NAME.match(probe["target"]), probe["target"]


def test_resources_and_placement(pod: dict[str, Any], agent: dict[str, Any]) -> None:
    resources = agent["resources"]
    assert resources["requests"]["cpu"] == "50m"
    assert "cpu" not in resources["limits"]  # throttling would delay the agent's probes
    # ~45 MiB of agent with 100 probes, and a 1 MiB ring per client run, charged to it
    assert resources["limits"]["memory"] == "192Mi"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert "priorityClassName" not in pod


def test_deploy_files_name_only_the_agents_options(agent: dict[str, Any]) -> None:
    """The manifest's args and the unit's example, against mace-agent's own options."""
    command = typer.main.get_command(agent_app)
    known = {opt for param in command.params for opt in param.opts}
    assert agent["command"] == ["mace-agent"]
    (example,) = re.findall(r"^#\s+MACE_AGENT_OPTS=(.*)$", UNIT.read_text(), re.MULTILINE)
    named = {word for word in [*agent["args"], *example.split()] if word.startswith("-")}
    assert named <= known, f"not mace-agent options: {sorted(named - known)}"


# --- the systemd unit ---------------------------------------------------------------------

def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> values of the unit's settings (a key may repeat), comments left out."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_takes_options_from_an_optional_file() -> None:
    text = UNIT.read_text()
    settings = unit_settings(text)
    assert settings["EnvironmentFile"] == ["-/etc/default/mace-agent"]
    (exec_start,) = settings["ExecStart"]
    # unbraced: systemd splits the options into words (${...} would pass one argument)
    assert exec_start.split()[-1] == "$MACE_AGENT_OPTS"
    assert option(exec_start.split(), "--socket") == "/run/mace/agent.sock"
    assert "--metrics" not in exec_start  # no port unless asked for
    (example,) = re.findall(r"^#\s+MACE_AGENT_OPTS=(.*)$", text, re.MULTILINE)
    words = example.split()
    assert option(words, "--metrics") == "127.0.0.1:9386"
    assert option(words, "--config") == "/etc/mace/agent.toml"


def test_unit_capabilities_match_the_manifest(agent: dict[str, Any]) -> None:
    settings = unit_settings(UNIT.read_text())
    (bounding,) = settings["CapabilityBoundingSet"]
    (ambient,) = settings["AmbientCapabilities"]
    manifest = set(agent["securityContext"]["capabilities"]["add"])
    assert {c.removeprefix("CAP_") for c in bounding.split()} == manifest | UNIT_ONLY
    assert {c.removeprefix("CAP_") for c in ambient.split()} == manifest
    assert settings["NoNewPrivileges"] == ["yes"]


def verify_unit(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on a copy whose command exists here (verify requires it)."""
    unit = tmp_path / "mace-agent.service"
    unit.write_text(text.replace("/usr/local/bin/mace-agent", sys.executable))
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def systemd_analyze() -> Iterator[None]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze")
    yield


@pytest.mark.usefixtures("systemd_analyze")
def test_unit_verifies_clean(tmp_path: Path) -> None:
    result = verify_unit(UNIT.read_text(), tmp_path)
    # verify exits 0 on unknown keys: its warnings on stderr are failures here
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.usefixtures("systemd_analyze")
def test_unit_check_catches_a_misspelled_key(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("EnvironmentFile=", "EnvironmentFiel=")
    assert "EnvironmentFiel" in verify_unit(broken, tmp_path).stderr


# --- the README's fleet section -------------------------------------------------------------

def fleet_blocks(language: str) -> list[str]:
    section = README.read_text().split(FLEET_SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)


def test_readme_config_example_is_the_agents_toml() -> None:
    (text,) = fleet_blocks("toml")
    assert check_probe_config(text)


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' relabelling, as far as the README uses it (keep, replace): the source
    labels joined by ';', the regex anchored at both ends; None when the target is dropped."""
    labels = dict(labels)
    for rule in rules:
        value = ";".join(labels.get(name, "") for name in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if rule.get("action", "replace") == "keep":
            if match is None:
                return None
        elif match is not None:
            replacement = re.sub(r"\$(\d+)", r"\\g<\1>", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(replacement)
    return labels


def test_readme_scrape_config_finds_the_manifests_pods(docs: list[dict[str, Any]]) -> None:
    (text,) = fleet_blocks("yaml")
    jobs = {job["job_name"]: job for job in yaml.safe_load(text)["scrape_configs"]}
    (static,) = jobs["mace-agent"]["static_configs"]
    assert all(target.endswith(":9386") for target in static["targets"])
    pods = jobs["mace-agent-pods"]
    (discovery,) = pods["kubernetes_sd_configs"]
    assert discovery["role"] == "pod"
    assert discovery["namespaces"]["names"] == [by_kind(docs, "Namespace")["metadata"]["name"]]
    # the labels service discovery gives the DaemonSet's pod (a hostNetwork pod: the node's
    # address; with no port, so the annotation's must be added), and a pod without them
    template = by_kind(docs, "DaemonSet")["spec"]["template"]
    meta = {"__address__": "198.18.0.5", "__metrics_path__": "/metrics",
            "__meta_kubernetes_pod_node_name": "node1"}
    for name, value in template["metadata"]["annotations"].items():
        meta["__meta_kubernetes_pod_annotation_" + re.sub(r"\W", "_", name)] = value
    scraped = relabel(meta, pods["relabel_configs"])
    assert scraped is not None
    assert scraped["__address__"] == "198.18.0.5:9386"
    assert scraped["__metrics_path__"] == "/metrics"
    assert scraped["node"] == "node1"
    other = {"__address__": "198.18.0.6:8080", "__metrics_path__": "/metrics"}
    assert relabel(other, pods["relabel_configs"]) is None
