#!/usr/bin/env python3
"""Offline checks of everything under deploy/; run it through deploy/validate.sh.

What it checks, without a cluster, a Docker daemon or the network:
- every YAML file parses, with no duplicate keys;
- Kubernetes manifests against the API's JSON schemas of each version in K8S_VERSIONS (strict:
  unknown fields are errors, and so is a kind or apiVersion the version does not serve), the
  kustomization against the manifests (and rendered with `kubectl kustomize` where kubectl exists),
  the references between objects (selectors, named ports, volumes, ConfigMaps, Secrets, the
  StatefulSets' Services, `$(VAR)` references), the `restricted` Pod Security Standard the
  namespace enforces, the shutdown timing (grace periods against request_timeout and the workers'
  drain_timeout), the worker token (every router and worker reads the same key of one Secret, from
  a file it can read), and the NetworkPolicies (their selectors and ports name pods and container
  ports of the manifests, and they let routers reach the workers, routers and workers etcd, etcd
  members each other and Prometheus the metrics ports, and leave the routers' port open);
- the compose file against the Compose Specification schema, its references (depends_on, build
  files, bind mounts, secrets, advertised addresses, Prometheus targets, stop grace periods), the
  worker token (one compose secret for the router and workers, its file git-ignored and, where it
  exists, a valid token), and `docker compose config` where the compose plugin exists;
- the Dockerfiles with BuildKit's parser (stages, non-root user, pinned bases);
- the example configs: TOML syntax, keys and values, each key documented, and every key of the
  command listed (set or commented out);
- every RWKV_* variable and config key against the flags of the `rwkv` sources
  (crates/rwkv-cli/src), and the Grafana dashboard's PromQL (parsed) and metric names against the
  metric names defined in crates/*/src;
- the shell scripts with shellcheck.
The last line is `deploy: N passed, N failed[, N skipped]`; the exit status is 1 if any failed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import dockerfile
import promql_parser
import yaml
from kubernetes_validate import utils as kv

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
CLI_SRC = ROOT / "crates" / "rwkv-cli" / "src"
BIN = Path(sys.executable).parent

# Oldest Kubernetes the manifests support, and the newest whose schemas the package bundles.
K8S_VERSIONS = os.environ.get("K8S_VERSIONS", f"1.30.0 {kv.latest_version()}").split()

# The settings of each `rwkv` command are read from its sources (the clap structs in
# crates/rwkv-cli/src/cmd/<command>.rs and what they flatten); this is the documented interface,
# used only if the sources cannot be read that way (with a warning).
FALLBACK_ROUTER_KEYS = {"listen", "max_queue", "worker_overcommit", "request_timeout",
                        "max_prompt_tokens", "max_tokens_limit", "max_body_bytes", "tenants",
                        "tls_cert", "tls_key", "metrics_listen"}
FALLBACK_ENGINE_KEYS = {"model", "model_id", "tokenizer", "backend", "cpu_precision", "gpu_precision", "slots",
                        "max_batch_tokens", "prefill_chunk", "host_tier_mb", "prefix_cache_mb",
                        "preempt_after_steps", "disk_tier_dir", "disk_tier_mb", "gpus",
                        "max_session_tokens", "max_sessions", "max_sessions_tokens"}
FALLBACK_ETCD_KEYS = {"etcd", "etcd_prefix", "lease_ttl"}
FALLBACK_KEYS = {
    "serve": FALLBACK_ROUTER_KEYS | FALLBACK_ENGINE_KEYS,
    "router": FALLBACK_ROUTER_KEYS | FALLBACK_ETCD_KEYS | {"tokenizer", "default_model",
                                                           "worker_ca", "worker_token_file"},
    "worker": {"listen", "advertise", "worker_id", "metrics_listen", "drain_timeout", "tls_cert",
               "tls_key", "worker_token_file"} | FALLBACK_ETCD_KEYS | FALLBACK_ENGINE_KEYS,
}
CONFIG_FILES = {"serve.example.toml": "serve", "router.example.toml": "router",
                "worker.example.toml": "worker"}
DEFAULT_REQUEST_TIMEOUT = 600
DEFAULT_DRAIN_TIMEOUT = 60
# Ports of the system, as the manifests, compose file and Dockerfiles must use them.
PORTS = {"router": 8000, "worker": 50051, "metrics": 9100, "etcd": 2379}
# Secrets the Kubernetes manifests use but do not contain, with the keys they read: each
# installation creates them before applying (never committed, never generated with a shared
# value), as deploy/README.md documents with `kubectl create secret generic <name> --from-...`.
EXTERNAL_SECRETS = {"rwkv-worker-token": {"token"}}
README = DEPLOY / "README.md"
# What `rwkv` accepts as the worker token file (rwkv-proto's auth.rs): at most 4096 bytes, one
# token or several (one per line, blank lines ignored), each, once trimmed, at least 16 printable
# ASCII characters without spaces.
MIN_TOKEN_CHARS = 16
MAX_TOKEN_FILE_BYTES = 4096
# Quantiles metrics-exporter-prometheus renders for a histogram by default (as a summary).
EXPORTER_QUANTILES = {"0", "0.5", "0.9", "0.95", "0.99", "0.999", "1"}


# ---- reporting --------------------------------------------------------------------------------

class Report:
    def __init__(self) -> None:
        self.passed = self.failed = self.skipped = 0

    def check(self, name: str, errors: list[str]) -> None:
        if errors:
            self.failed += 1
            print(f"FAIL {name}")
            for e in errors:
                print(f"     - {e}")
        else:
            self.passed += 1
            print(f"ok   {name}")

    def skip(self, name: str, why: str) -> None:
        self.skipped += 1
        print(f"skip {name}: {why}")

    def warn(self, name: str, msg: str) -> None:
        print(f"warn {name}: {msg}")


R = Report()


def rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


# ---- what the sources define --------------------------------------------------------------------

def rust_structs() -> dict[str, tuple[set[str], list[str]]]:
    """Struct -> (RWKV_* variables of its own fields, types it `#[command(flatten)]`s), for the
    CLI's sources as rustfmt writes them. A command's `Args` is keyed `<file stem>::Args`."""
    out = {}
    for f in sorted(CLI_SRC.rglob("*.rs")):
        text = f.read_text()
        for m in re.finditer(r"^(?:pub(?:\([^)]*\))?\s+)?struct\s+(\w+)\s*\{\n(.*?)^\}", text,
                             re.S | re.M):
            name, body = m.groups()
            envs = set(re.findall(r'env\s*=\s*"(RWKV_[A-Z0-9_]+)"', body))
            flat = re.findall(r"#\[command\(flatten\)\]\s*(?:pub\s+)?\w+\s*:\s*(\w+)", body)
            out[f"{f.stem}::{name}" if name == "Args" else name] = (envs, flat)
    return out


def command_keys() -> tuple[dict[str, set[str]], dict[str, bool]]:
    """Config keys (= RWKV_* variables less the prefix, lower case) of serve, router and worker."""
    structs = rust_structs()

    def resolve(key: str, seen: tuple = ()) -> set[str] | None:
        if key not in structs or key in seen:
            return None
        envs, flat = structs[key]
        envs = set(envs)
        for t in flat:
            sub = resolve(t, seen + (key,))
            if sub is None:
                return None
            envs |= sub
        return envs

    keys, from_source = {}, {}
    for cmd, fallback in FALLBACK_KEYS.items():
        envs = resolve(f"{cmd}::Args")
        from_source[cmd] = bool(envs)
        keys[cmd] = ({e[len("RWKV_"):].lower() for e in envs} if envs else set(fallback)) - {"config"}
    return keys, from_source


def source_metric_names() -> set[str]:
    names = set()
    for f in (ROOT / "crates").glob("*/src/**/*.rs"):
        names |= set(re.findall(r'"(rwkv_[a-z0-9_]+)"', f.read_text()))
    return names


COMMAND_KEYS, KEYS_FROM_SOURCE = command_keys()


def unknown_keys(keys: set[str], command: str, what: str, where: str) -> list[str]:
    """Errors for settings `rwkv <command>` does not take (it refuses unknown config keys)."""
    wrong = sorted(keys - COMMAND_KEYS[command])
    if not wrong:
        return []
    msg = f"{what} that `rwkv {command}` does not take: {', '.join(wrong)}"
    if KEYS_FROM_SOURCE[command]:
        return [f"{where}: {msg} (its flags: {rel(CLI_SRC)}/cmd/{command}.rs)"]
    R.warn(where, msg + f" (the documented interface: `{command}::Args` was not found in "
           f"{rel(CLI_SRC)})")
    return []


# ---- YAML ---------------------------------------------------------------------------------------

class UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key_node.value!r}", key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def load_yaml_all(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=UniqueKeyLoader) if d is not None]


def check_yaml_syntax() -> dict[Path, list]:
    docs = {}
    for path in sorted(list(DEPLOY.rglob("*.yaml")) + list(DEPLOY.rglob("*.yml"))):
        try:
            docs[path] = load_yaml_all(path)
            R.check(f"yaml {rel(path)}", [])
        except yaml.YAMLError as e:
            R.check(f"yaml {rel(path)}", [str(e)])
    return docs


# ---- values -------------------------------------------------------------------------------------

HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
URL = re.compile(r"^https?://[^\s/]+(:\d{1,5})?/?$")


INT_KEYS = {"max_queue", "request_timeout", "max_prompt_tokens", "max_tokens_limit",
            "max_body_bytes", "slots", "max_batch_tokens", "prefill_chunk", "host_tier_mb",
            "prefix_cache_mb", "preempt_after_steps", "disk_tier_mb", "lease_ttl",
            "drain_timeout", "max_session_tokens", "max_sessions", "max_sessions_tokens"}
ZERO_OK = {"prefix_cache_mb", "preempt_after_steps", "drain_timeout"}
# Settings that are paths of files or directories.
PATH_KEYS = {"worker_token_file", "tls_cert", "tls_key", "worker_ca", "tenants", "disk_tier_dir"}
# Settings that are numbers >= 1, not necessarily whole.
AT_LEAST_ONE = {"worker_overcommit"}


def check_value(key: str, value, where: str, from_env: bool = False) -> list[str]:
    """Type and range of one setting: a TOML value, or the text of an RWKV_* variable."""
    err = f"{where}: `{key}` = {value!r}"
    if from_env and key in INT_KEYS:
        if not re.fullmatch(r"\d+", value):
            return [f"{err} is not an integer"]
        value = int(value)
    if from_env and key in AT_LEAST_ONE:
        if not re.fullmatch(r"\d+(\.\d+)?", value):
            return [f"{err} is not a number"]
        value = float(value)
    if key in {"listen", "metrics_listen"}:
        if not (isinstance(value, str) and HOST_PORT.match(value)):
            return [f"{err} is not host:port"]
    elif key == "etcd":
        if not (isinstance(value, str) and all(URL.match(u.strip()) for u in value.split(","))):
            return [f"{err} is not a comma-separated list of http(s)://host:port URLs"]
    elif key == "etcd_prefix":
        if not (isinstance(value, str) and value.startswith("/")):
            return [f"{err} is not a key prefix starting with /"]
    elif key == "advertise":
        if not (isinstance(value, str) and (URL.match(value) or "$(" in value)):
            return [f"{err} is not an http(s)://host:port URL"]
        if key == "advertise" and "0.0.0.0" in value:
            return [f"{err}: advertise an address routers can dial, not 0.0.0.0"]
    elif key == "backend":
        if value not in {"auto", "cpu", "cuda"}:
            return [f"{err} is not auto, cpu or cuda"]
    elif key == "cpu_precision":
        if value not in {"f32", "bf16", "int8"}:
            return [f"{err} is not f32, bf16 or int8"]
    elif key == "gpu_precision":
        if value not in {"split", "bf16"}:
            return [f"{err} is not split or bf16"]
    elif key in {"model", "model_id", "tokenizer", "worker_id", "default_model"}:
        if not (isinstance(value, str) and value):
            return [f"{err} is not a non-empty string"]
    elif key in PATH_KEYS:
        if not (isinstance(value, str) and value.strip() and value == value.strip()
                and not re.search(r"[\x00-\x1f]", value)):
            return [f"{err} is not a path (a non-empty string without surrounding spaces or "
                    "control characters)"]
    elif key == "gpus":
        if not (isinstance(value, str) and re.fullmatch(r"\d+(,\d+)*", value)):
            return [f"{err} is not a list of device ordinals like \"0,1\""]
    elif key in AT_LEAST_ONE:
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1):
            return [f"{err} is not a number >= 1"]
    elif key == "lease_ttl":
        if not (isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= 3600):
            return [f"{err} is not an integer from 2 to 3600 (seconds)"]
    elif key in INT_KEYS:
        low = 0 if key in ZERO_OK else 1
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            return [f"{err} is not an integer >= {low}"]
    return []


def check_toml_config(text: str, command: str, where: str, require_docs: bool) -> tuple[list[str], dict]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return [f"{where}: invalid TOML: {e}"], {}
    errors = []
    lines = text.splitlines()
    commented = set()
    for i, line in enumerate(lines):
        m = re.match(r"^#\s*([a-z_]+)\s*=\s*\S", line)
        if m:
            commented.add(m.group(1))
            # A commented-out example must still be valid once uncommented.
            try:
                value = tomllib.loads(line.lstrip("#").strip())[m.group(1)]
                errors += check_value(m.group(1), value, f"{where} (commented)")
            except tomllib.TOMLDecodeError as e:
                errors.append(f"{where}:{i + 1}: commented example is not valid TOML: {e}")
        m = re.match(r"^([a-z_]+)\s*=", line)
        if m and require_docs and (i == 0 or not lines[i - 1].startswith("#")):
            errors.append(f"{where}:{i + 1}: `{m.group(1)}` has no comment above it")
    for key, value in data.items():
        if isinstance(value, dict):
            errors.append(f"{where}: tables are not settings (`[{key}]`)")
            continue
        errors += check_value(key, value, where)
    errors += unknown_keys(set(data) | commented, command, "keys", where)
    return errors, data


def check_configs() -> None:
    for name, command in CONFIG_FILES.items():
        path = DEPLOY / "config" / name
        if not path.exists():
            R.check(f"config {rel(path)}", ["missing"])
            continue
        text = path.read_text()
        errors, data = check_toml_config(text, command, rel(path), require_docs=True)
        # deploy/README.md promises that each example lists every key of its command, set or
        # commented out.
        listed = set(data) | set(re.findall(r"^#\s*([a-z_]+)\s*=\s*\S", text, re.M))
        missing = sorted(COMMAND_KEYS[command] - listed)
        if missing:
            errors.append(f"{rel(path)}: keys of `rwkv {command}` not listed (set or commented "
                          f"out): {', '.join(missing)}")
        R.check(f"config {rel(path)} (rwkv {command})", errors)


def check_env(env: dict[str, str], command: str, where: str) -> list[str]:
    """RWKV_* variables of a container running `rwkv <command>`: taken by it, well-formed."""
    names = {k for k in env if k.startswith("RWKV_") and k != "RWKV_CONFIG"}
    errors = unknown_keys({n[len("RWKV_"):].lower() for n in names}, command,
                          "variables (RWKV_ + upper case)", where)
    for name in sorted(names):
        if env[name] is not None:
            errors += check_value(name[len("RWKV_"):].lower(), str(env[name]), where, from_env=True)
    return errors


def rwkv_command(args: list) -> str | None:
    """`router`, `worker` or `serve` if a container runs that `rwkv` subcommand."""
    for a in args or []:
        if a in {"router", "worker", "serve"}:
            return a
        if not str(a).startswith("-") and a not in {"rwkv", "/usr/local/bin/rwkv"}:
            return None
    return None


def shutdown_errors(name: str, cmd: str, settings: dict, grace: float, prestop: int,
                    router_timeout: int) -> list[str]:
    """Does stopping wait long enough? A router (or serve) lets open streams finish, which last up
    to its request_timeout; a worker leaves etcd, then lets its work finish for drain_timeout."""
    if cmd == "worker":
        drain = int(settings.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT))
        errors = []
        if drain < router_timeout:
            errors.append(f"{name}: drain_timeout {drain} s < the routers' request_timeout "
                          f"{router_timeout} s: a drain can cut a stream the router still allows")
        if grace < drain + prestop + 5:
            errors.append(f"{name}: grace period {grace:g} s < drain_timeout {drain} s + preStop "
                          f"{prestop} s + 5 s: the worker is killed before its drain ends")
        return errors
    timeout = int(settings.get("request_timeout", DEFAULT_REQUEST_TIMEOUT))
    if grace < timeout + prestop:
        return [f"{name}: grace period {grace:g} s < request_timeout {timeout} s + preStop {prestop} s: "
                "stopping would cut streams"]
    return []


# ---- Kubernetes ---------------------------------------------------------------------------------

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def pod_template(obj: dict) -> dict | None:
    if obj.get("kind") in WORKLOADS:
        return obj.get("spec", {}).get("template")
    return None


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def prestop_sleep(container: dict) -> int:
    cmd = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if len(cmd) == 2 and cmd[0] in {"sleep", "/bin/sleep"} and str(cmd[1]).isdigit():
        return int(cmd[1])
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
    return int(sleep.get("seconds", 0))


def k8s_objects(docs: dict[Path, list]) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted((K8S / "manifests").glob("*.y*ml")):
        for d in docs.get(path, []):
            out.append((path, d))
    return out


def check_k8s_schemas(objects: list[tuple[Path, dict]], label: str) -> None:
    for version in K8S_VERSIONS:
        errors = []
        for path, obj in objects:
            name = f"{rel(path)}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            try:
                kv.validate(obj, version, strict=True)
            except kv.SchemaNotFoundError:
                errors.append(f"{name}: Kubernetes {version} has no {obj.get('apiVersion')} {obj.get('kind')}")
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                errors.append(f"{name}: {where}: {e.message}")
            except (KeyError, TypeError) as e:
                errors.append(f"{name}: not a Kubernetes object ({e})")
        R.check(f"k8s schema {version} (strict): {label}, {len(objects)} objects", errors)


def secret_refs(spec: dict) -> list[tuple[str, str, set[str]]]:
    """(what refers, Secret name, keys it reads) of every Secret a pod spec uses."""
    refs = []
    for v in spec.get("volumes", []):
        sources = [v["secret"]] if "secret" in v else [
            src["secret"] for src in v.get("projected", {}).get("sources", []) if "secret" in src]
        for src in sources:
            name = src.get("secretName", src.get("name"))
            refs.append((f"volume {v['name']}", name, {i["key"] for i in src.get("items", [])}))
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.append((f"container {c['name']} env {e['name']}", ref.get("name"), {ref.get("key")}))
        for e in c.get("envFrom", []):
            if "secretRef" in e:
                refs.append((f"container {c['name']} envFrom", e["secretRef"].get("name"), set()))
    for s in spec.get("imagePullSecrets", []):
        refs.append(("imagePullSecrets", s.get("name"), set()))
    return refs


def known_secrets(objects: list[tuple[Path, dict]]) -> dict[tuple[str, str], set[str] | None]:
    """(namespace, name) -> keys (None: not known offline) of the Secrets that exist once the
    manifests are applied: those among them, those kustomization.yaml generates, and
    EXTERNAL_SECRETS (in every namespace of the manifests)."""
    out: dict[tuple[str, str], set[str] | None] = {}
    for _, o in objects:
        if o["kind"] == "Secret":
            out[(o["metadata"].get("namespace", ""), o["metadata"]["name"])] = \
                set(o.get("data") or {}) | set(o.get("stringData") or {})
    kust_path = K8S / "kustomization.yaml"
    kust = (load_yaml_all(kust_path) or [{}])[0] if kust_path.exists() else {}
    for g in kust.get("secretGenerator") or []:
        keys: set[str] | None = set()
        for f in g.get("files") or []:
            keys.add(f.split("=", 1)[0] if "=" in f else Path(f).name)
        for lit in g.get("literals") or []:
            keys.add(lit.split("=", 1)[0])
        if g.get("envs") or g.get("env"):
            keys = None
        out[(g.get("namespace", kust.get("namespace", "")), g["name"])] = keys
    for ns in {o["metadata"]["name"] for _, o in objects if o["kind"] == "Namespace"}:
        for name, keys in EXTERNAL_SECRETS.items():
            out.setdefault((ns, name), set(keys))
    return out


def external_secret_docs() -> list[str]:
    """EXTERNAL_SECRETS are only there if the operator creates them: deploy/README.md must say how."""
    text = (README.read_text() if README.exists() else "").replace("\\\n", " ")
    errors = []
    for name, keys in EXTERNAL_SECRETS.items():
        if f"create secret generic {name}" not in text:
            errors.append(f"{rel(README)} does not show how to create the Secret {name} "
                          f"(`kubectl -n <namespace> create secret generic {name} ...`)")
        for key in sorted(keys):
            if not re.search(rf"create secret generic {re.escape(name)}\b[^\n]*--from-(literal|file)={re.escape(key)}=", text):
                errors.append(f"{rel(README)}: the creation of Secret {name} does not set its key "
                              f"{key} (--from-literal={key}=... or --from-file={key}=...)")
    return errors


def check_k8s_references(objects: list[tuple[Path, dict]]) -> None:
    errors: list[str] = external_secret_docs()
    secrets = known_secrets(objects)
    by_kind: dict[str, dict[tuple[str, str], dict]] = {}
    namespaces = {}
    for _, o in objects:
        meta = o.get("metadata", {})
        by_kind.setdefault(o["kind"], {})[(meta.get("namespace", ""), meta.get("name"))] = o
        if o["kind"] == "Namespace":
            namespaces[meta["name"]] = o
    templates = [(o, pod_template(o)) for _, o in objects if pod_template(o)]

    for path, o in objects:
        meta = o.get("metadata", {})
        name = f"{rel(path)}: {o['kind']}/{meta.get('name')}"
        ns = meta.get("namespace", "")
        if o["kind"] != "Namespace":
            if ns not in namespaces:
                errors.append(f"{name}: namespace {ns!r} is not among the manifests")
        if o["kind"] == "Service":
            sel = o["spec"].get("selector", {})
            pods = [t for w, t in templates
                    if w["metadata"].get("namespace") == ns and matches(sel, t["metadata"].get("labels", {}))]
            if not pods:
                errors.append(f"{name}: selector {sel} matches no pod template")
            for port in o["spec"].get("ports", []):
                tp = port.get("targetPort")
                if isinstance(tp, str) and not any(
                        tp == p.get("name") for t in pods for c in t["spec"]["containers"]
                        for p in c.get("ports", [])):
                    errors.append(f"{name}: targetPort {tp!r} is no container port of its pods")
        if o["kind"] == "PodDisruptionBudget":
            sel = o["spec"].get("selector", {}).get("matchLabels", {})
            if not any(matches(sel, t["metadata"].get("labels", {})) for _, t in templates):
                errors.append(f"{name}: selector {sel} matches no pod template")
        tpl = pod_template(o)
        if not tpl:
            continue
        labels = tpl["metadata"].get("labels", {})
        sel = o["spec"].get("selector", {}).get("matchLabels", {})
        if not matches(sel, labels):
            errors.append(f"{name}: selector {sel} does not match the template's labels {labels}")
        if o["kind"] == "StatefulSet":
            svc = by_kind.get("Service", {}).get((ns, o["spec"].get("serviceName")))
            if not svc:
                errors.append(f"{name}: serviceName {o['spec'].get('serviceName')!r} is no Service")
            elif svc["spec"].get("clusterIP") != "None":
                errors.append(f"{name}: its Service {svc['metadata']['name']} is not headless")
        spec = tpl["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in o["spec"].get("volumeClaimTemplates", [])}
        for v in volumes.values():
            if "configMap" in v and (ns, v["configMap"]["name"]) not in by_kind.get("ConfigMap", {}):
                errors.append(f"{name}: volume {v['name']}: no ConfigMap {v['configMap']['name']}")
            if "persistentVolumeClaim" in v and (ns, v["persistentVolumeClaim"]["claimName"]) \
                    not in by_kind.get("PersistentVolumeClaim", {}):
                errors.append(f"{name}: volume {v['name']}: no PersistentVolumeClaim "
                              f"{v['persistentVolumeClaim']['claimName']}")
        for what, secret, keys in secret_refs(spec):
            if (ns, secret) not in secrets:
                errors.append(f"{name}: {what}: no Secret {secret!r} in the manifests, in "
                              f"kustomization.yaml's secretGenerator or among the ones the operator "
                              f"creates (EXTERNAL_SECRETS: {', '.join(sorted(EXTERNAL_SECRETS))})")
            elif secrets[(ns, secret)] is not None and keys - secrets[(ns, secret)]:
                errors.append(f"{name}: {what}: Secret {secret} has no key "
                              f"{', '.join(sorted(keys - secrets[(ns, secret)]))} (it has: "
                              f"{', '.join(sorted(secrets[(ns, secret)])) or 'none'})")
        restricted = namespaces.get(ns, {}).get("metadata", {}).get("labels", {}).get(
            "pod-security.kubernetes.io/enforce") == "restricted"
        psc = spec.get("securityContext", {})
        if restricted:
            for key in ("hostNetwork", "hostPID", "hostIPC"):
                if spec.get(key):
                    errors.append(f"{name}: {key} is not allowed by the restricted policy")
            for v in volumes.values():
                kinds = set(v) - {"name"}
                if not kinds <= RESTRICTED_VOLUMES:
                    errors.append(f"{name}: volume {v['name']} ({', '.join(kinds)}) is not allowed "
                                  "by the restricted policy")
        for c in spec.get("initContainers", []) + spec["containers"]:
            cname = f"{name} container {c['name']}"
            image = c.get("image", "")
            tag = image.rsplit("/", 1)[-1]
            if "@" not in tag and (":" not in tag or tag.endswith(":latest")):
                errors.append(f"{cname}: image {image!r} needs a pinned tag (not latest)")
            port_names = {p.get("name") for p in c.get("ports", []) if p.get("name")}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c.get(probe, {})
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    port = p.get(handler, {}).get("port")
                    if isinstance(port, str) and port not in port_names:
                        errors.append(f"{cname}: {probe} uses port {port!r}, not a port of the container")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and m["name"] not in claims:
                    errors.append(f"{cname}: volumeMount {m['name']!r} is no volume")
            defined: set[str] = set()
            env = {}
            for e in c.get("env", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(e.get("value", ""))):
                    if ref not in defined:
                        errors.append(f"{cname}: env {e['name']} uses $({ref}), which is not "
                                      "defined before it")
                defined.add(e["name"])
                env[e["name"]] = e.get("value")
            for a in c.get("args", []) + c.get("command", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(a)):
                    if ref not in defined:
                        errors.append(f"{cname}: argument {a!r} uses $({ref}), not in env")
            cmd = rwkv_command(c.get("command", []) + c.get("args", []))
            if cmd:
                errors += check_env(env, cmd, cname)
            if restricted:
                sc = c.get("securityContext", {})
                if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
                    errors.append(f"{cname}: runAsNonRoot must be true (restricted policy)")
                if sc.get("runAsUser", psc.get("runAsUser")) == 0:
                    errors.append(f"{cname}: runAsUser 0 (restricted policy)")
                if sc.get("allowPrivilegeEscalation") is not False:
                    errors.append(f"{cname}: allowPrivilegeEscalation must be false (restricted policy)")
                if sc.get("privileged"):
                    errors.append(f"{cname}: privileged (restricted policy)")
                caps = sc.get("capabilities", {})
                if "ALL" not in caps.get("drop", []):
                    errors.append(f"{cname}: capabilities must drop ALL (restricted policy)")
                if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
                    errors.append(f"{cname}: capabilities added (restricted policy)")
                seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
                if seccomp not in {"RuntimeDefault", "Localhost"}:
                    errors.append(f"{cname}: seccompProfile must be RuntimeDefault (restricted policy)")
                if any(p.get("hostPort") for p in c.get("ports", [])):
                    errors.append(f"{cname}: hostPort (restricted policy)")
    R.check(f"k8s references and restricted Pod Security ({len(objects)} objects)", errors)


def k8s_rwkv_containers(objects):
    """(workload, pod spec, container, command, env) of each container running `rwkv <command>`."""
    for _, o in objects:
        tpl = pod_template(o)
        if not tpl:
            continue
        for c in tpl["spec"]["containers"]:
            cmd = rwkv_command(c.get("command", []) + c.get("args", []))
            if cmd:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                yield o, tpl["spec"], c, cmd, env


def k8s_mounted_config(o: dict, spec: dict, c: dict, env: dict) -> tuple[str, str] | None:
    """(text, where) of the TOML file a container passes to --config, from its ConfigMap."""
    args = c.get("args", [])
    path = env.get("RWKV_CONFIG")
    if "--config" in args and args.index("--config") + 1 < len(args):
        path = args[args.index("--config") + 1]
    if not path:
        return None
    for m in c.get("volumeMounts", []):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            vol = next(v for v in spec.get("volumes", []) if v["name"] == m["name"])
            cm_name = vol.get("configMap", {}).get("name")
            return path[len(m["mountPath"].rstrip("/")) + 1:], cm_name
    return None


def k8s_settings(objects, o: dict, spec: dict, c: dict, cmd: str, env: dict) -> tuple[dict, list[str]]:
    """The settings of one rwkv container: its --config file (from its ConfigMap), then its
    RWKV_* variables over it; and the errors of that file."""
    configmaps = {o["metadata"]["name"]: o for _, o in objects if o["kind"] == "ConfigMap"}
    settings: dict = {}
    errors: list[str] = []
    mounted = k8s_mounted_config(o, spec, c, env)
    if mounted:
        key, cm_name = mounted
        text = configmaps.get(cm_name, {}).get("data", {}).get(key)
        if text is None:
            errors.append(f"{o['kind']}/{o['metadata']['name']} ({cmd}): --config file {key} is "
                          f"not in ConfigMap {cm_name}")
        else:
            errors, settings = check_toml_config(text, cmd, f"ConfigMap {cm_name} {key}", False)
    settings.update({k[len("RWKV_"):].lower(): v for k, v in env.items()
                     if k.startswith("RWKV_") and v is not None})
    return settings, errors


def token_secret(spec: dict, c: dict, path: str, where: str) -> tuple[tuple[str, str] | None, list[str]]:
    """((Secret, key), errors) of the worker token file `path` of container `c`: it must be a
    key of a Secret mounted there (not optional), in a file the container's user can read."""
    mounts = [m for m in c.get("volumeMounts", [])
              if (path == m["mountPath"] if m.get("subPath") else
                  path.startswith(m["mountPath"].rstrip("/") + "/"))]
    if not mounts:
        return None, [f"{where}: worker_token_file {path} is on no volume mount (mount the Secret "
                      "that holds the token there)"]
    m = max(mounts, key=lambda m: len(m["mountPath"]))
    vol = next((v for v in spec.get("volumes", []) if v["name"] == m["name"]), None)
    if vol is None:
        return None, []  # reported by the references check
    file = m["subPath"] if m.get("subPath") else path[len(m["mountPath"].rstrip("/")) + 1:]
    if "secret" in vol:
        sources, default_mode = [vol["secret"]], vol["secret"].get("defaultMode", 0o644)
    elif "projected" in vol:
        sources = [src["secret"] for src in vol["projected"].get("sources", []) if "secret" in src]
        default_mode = vol["projected"].get("defaultMode", 0o644)
    else:
        sources, default_mode = [], 0o644
    if not sources:
        kinds = ", ".join(sorted(set(vol) - {"name"}))
        return None, [f"{where}: worker_token_file {path} is on volume {vol['name']} ({kinds}): "
                      "keep the token in a Secret"]
    errors = []
    found = None
    for src in sources:
        name = src.get("secretName", src.get("name"))
        items = src.get("items")
        if items:
            item = next((i for i in items if i.get("path") == file), None)
            if item:
                found = (name, item["key"], item.get("mode", default_mode), src.get("optional"))
        elif "/" not in file:
            found = (name, file, default_mode, src.get("optional"))
        if found:
            break
    if not found:
        return None, [f"{where}: worker_token_file {path}: volume {vol['name']} puts no Secret key "
                      f"at {file}"]
    name, key, mode, optional = found
    if optional:
        errors.append(f"{where}: the token's Secret {name} is optional: without it the pod would "
                      "start and fail on a missing file; leave it required")
    sc, psc = c.get("securityContext", {}), spec.get("securityContext", {})
    uid = sc.get("runAsUser", psc.get("runAsUser"))
    # Secret files belong to root, and to the group fsGroup where the pod sets one.
    readable = mode & 0o004 or (mode & 0o040 and psc.get("fsGroup") is not None) or \
        (mode & 0o400 and uid == 0)
    if not readable:
        errors.append(f"{where}: worker_token_file {path} has mode {mode:#o}, owned by root"
                      + ("" if psc.get("fsGroup") is not None else " without an fsGroup")
                      + f": user {uid} cannot read it")
    return (name, key), errors


def check_k8s_cluster(objects: list[tuple[Path, dict]]) -> None:
    """The rwkv containers among themselves: configs, ports, advertise URLs, grace periods, the
    worker token."""
    errors: list[str] = []
    services = {o["metadata"]["name"]: o for _, o in objects if o["kind"] == "Service"}
    router_timeouts = []
    containers = list(k8s_rwkv_containers(objects))
    all_settings = []
    tokens: dict[str, tuple[str, str]] = {}
    for o, spec, c, cmd, env in containers:
        cname = f"{o['kind']}/{o['metadata']['name']} ({cmd})"
        settings, cfg_errors = k8s_settings(objects, o, spec, c, cmd, env)
        errors += cfg_errors
        all_settings.append(settings)
        if cmd in {"router", "worker"}:
            path = settings.get("worker_token_file")
            if not path:
                errors.append(f"{cname}: no worker_token_file (RWKV_WORKER_TOKEN_FILE): " + (
                    "anyone who reaches its port could call it as any tenant" if cmd == "worker"
                    else "workers refuse a router without the cluster's token"))
            else:
                secret, token_errors = token_secret(spec, c, str(path), cname)
                errors += token_errors
                if secret:
                    tokens[cname] = secret
        ports = {p["containerPort"] for p in c.get("ports", [])}
        listen = str(settings.get("listen", "0.0.0.0:%d" % PORTS["router" if cmd != "worker" else "worker"]))
        if int(listen.rsplit(":", 1)[1]) not in ports:
            errors.append(f"{cname}: listens on {listen} but declares ports {sorted(ports)}")
        if cmd == "router":
            router_timeouts.append(int(settings.get("request_timeout", DEFAULT_REQUEST_TIMEOUT)))
            if "etcd" not in settings:
                errors.append(f"{cname}: no etcd URL (RWKV_ETCD or `etcd` in its config)")
        if cmd == "worker":
            for key in ("etcd", "advertise", "model"):
                if key not in settings:
                    errors.append(f"{cname}: `{key}` is required (RWKV_{key.upper()})")
            adv = str(settings.get("advertise", ""))
            m = re.match(r"^https?://\$\(POD_NAME\)\.([a-z0-9-]+)\.\$\(POD_NAMESPACE\)\.svc(\.[a-z.]+)?:(\d+)$", adv)
            if not m:
                errors.append(f"{cname}: RWKV_ADVERTISE {adv!r} is not "
                              "http://$(POD_NAME).<headless service>.$(POD_NAMESPACE).svc...:<port>")
            else:
                if m.group(1) != o["spec"].get("serviceName"):
                    errors.append(f"{cname}: RWKV_ADVERTISE names Service {m.group(1)}, "
                                  f"the StatefulSet's is {o['spec'].get('serviceName')}")
                if int(m.group(3)) != int(listen.rsplit(":", 1)[1]):
                    errors.append(f"{cname}: RWKV_ADVERTISE port {m.group(3)} is not the listen port")
                svc = services.get(m.group(1), {})
                if svc and not svc["spec"].get("publishNotReadyAddresses"):
                    errors.append(f"{cname}: Service {m.group(1)} must publishNotReadyAddresses, "
                                  "or routers cannot resolve a registered worker before it is ready")
            if "metrics_listen" in settings:
                mport = int(str(settings["metrics_listen"]).rsplit(":", 1)[1])
                if mport not in ports:
                    errors.append(f"{cname}: metrics on port {mport}, not a declared port")
        host = re.sub(r"^https?://", "", str(settings.get("etcd", ""))).split(":")[0]
        if ".svc" in host and host.split(".")[0] not in services:
            errors.append(f"{cname}: etcd URL names Service {host.split('.')[0]}, not in the manifests")
    if len(set(tokens.values())) > 1:
        errors.append("routers and workers read different worker tokens, so some refuse others: "
                      + "; ".join(f"{n}: Secret {s} key {k}" for n, (s, k) in sorted(tokens.items())))
    timeout = max(router_timeouts, default=DEFAULT_REQUEST_TIMEOUT)
    for (o, spec, c, cmd, env), settings in zip(containers, all_settings):
        errors += shutdown_errors(f"{o['kind']}/{o['metadata']['name']}", cmd, settings,
                                  spec.get("terminationGracePeriodSeconds", 30), prestop_sleep(c),
                                  timeout)
    R.check(f"k8s rwkv settings, ports, advertise URLs, grace periods and worker token "
            f"({len(containers)} containers)", errors)


def selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels, matchExpressions) against labels: {} or none selects all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if (op == "In" and labels.get(key) not in values) or \
                (op == "NotIn" and key in labels and labels[key] in values) or \
                (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def container_ports(tpl: dict) -> list[tuple[str | None, int, str]]:
    """(name, number, protocol) of every container port of a pod template."""
    return [(p.get("name"), p["containerPort"], p.get("protocol", "TCP"))
            for c in tpl["spec"].get("initContainers", []) + tpl["spec"]["containers"]
            for p in c.get("ports", [])]


def policy_types(policy: dict) -> list[str]:
    spec = policy.get("spec", {})
    return spec.get("policyTypes") or ["Ingress"] + (["Egress"] if "egress" in spec else [])


class Pod:
    """A pod template of the manifests, as NetworkPolicies see it."""

    def __init__(self, workload: dict, tpl: dict) -> None:
        self.name = f"{workload['kind']}/{workload['metadata']['name']}"
        self.ns = workload["metadata"].get("namespace", "")
        self.labels = tpl["metadata"].get("labels", {})
        self.tpl = tpl


def peer_admits(peer: dict, other: Pod | None, policy_ns: str, ns_labels: dict) -> bool:
    """Does a NetworkPolicy peer (from/to) cover pod `other` (None: any client at all, from
    outside the cluster too)? ipBlocks are taken to cover pods only as 0.0.0.0/0 or ::/0."""
    block = peer.get("ipBlock")
    if block:
        return block.get("cidr") in {"0.0.0.0/0", "::/0"} and not block.get("except")
    if other is None:
        return False
    if "namespaceSelector" in peer:
        labels = ns_labels.get(other.ns, {"kubernetes.io/metadata.name": other.ns})
        if not selects(peer["namespaceSelector"], labels):
            return False
    elif other.ns != policy_ns:
        return False
    return selects(peer.get("podSelector"), other.labels)


def port_admits(entry: dict, number: int, protocol: str, dst: Pod) -> bool:
    """Does a NetworkPolicy port entry cover `number` on pod `dst` (where a named port resolves)?"""
    if entry.get("protocol", "TCP") != protocol:
        return False
    port = entry.get("port")
    if port is None:
        return True
    if isinstance(port, str):
        return any(n == port and num == number and pr == protocol for n, num, pr in container_ports(dst.tpl))
    return port <= number <= entry.get("endPort", port)


def flow_blocked(policies: list[dict], src: Pod | None, dst: Pod, port: int, ns_labels: dict,
                 protocol: str = "TCP") -> str | None:
    """Why the NetworkPolicies stop `src` (None: any client) from connecting to `dst`:`port`, or
    None if they let it. Pods no policy selects (for that direction) are not restricted."""
    def admitted(policy, direction, peers_key, other, to):
        return any(
            (not rule.get(peers_key) or any(peer_admits(p, other, policy["metadata"].get("namespace", ""),
                                                         ns_labels) for p in rule[peers_key]))
            and (not rule.get("ports") or any(port_admits(e, port, protocol, to) for e in rule["ports"]))
            for rule in policy["spec"].get(direction) or [])

    ingress = [p for p in policies if "Ingress" in policy_types(p)
               and p["metadata"].get("namespace", "") == dst.ns and selects(p["spec"].get("podSelector"), dst.labels)]
    if ingress and not any(admitted(p, "ingress", "from", src, dst) for p in ingress):
        return f"ingress to {dst.name} ({', '.join(p['metadata']['name'] for p in ingress)})"
    if src is not None:
        egress = [p for p in policies if "Egress" in policy_types(p)
                  and p["metadata"].get("namespace", "") == src.ns and selects(p["spec"].get("podSelector"), src.labels)]
        if egress and not any(admitted(p, "egress", "to", dst, dst) for p in egress):
            return f"egress from {src.name} ({', '.join(p['metadata']['name'] for p in egress)})"
    return None


def required_flows(objects, pods: list[Pod]) -> list[tuple[str, Pod | None, Pod, int]]:
    """(what, source (None: any client), destination, port) of the connections the system needs:
    routers and workers to etcd (their etcd URL, through its Service), routers to workers (the
    workers' listen port), etcd members to each other (the peer URL's port), any client to the
    routers' port, and a scraper to every pod's prometheus.io/port."""
    services = {(o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
                for _, o in objects if o["kind"] == "Service"}
    by_template = {id(p.tpl): p for p in pods}
    flows = []
    routers, workers = [], []
    for o, spec, c, cmd, env in k8s_rwkv_containers(objects):
        pod = by_template[id(o["spec"]["template"])]
        settings, _ = k8s_settings(objects, o, spec, c, cmd, env)
        listen = int(str(settings.get("listen", "0.0.0.0:%d" % PORTS["router" if cmd != "worker" else "worker"])).rsplit(":", 1)[1])
        if cmd == "router":
            routers.append(pod)
            flows.append((f"clients to the routers' port {listen}", None, pod, listen))
        elif cmd == "worker":
            workers.append((pod, listen))
        for url in str(settings.get("etcd", "")).split(","):
            m = re.match(r"^\s*https?://([^:/]+):(\d+)", url)
            if not m:
                continue
            host = m.group(1).split(".")
            svc = services.get((host[1] if len(host) > 1 and host[1] != "svc" else pod.ns, host[0]))
            if not svc:
                continue
            for sp in svc["spec"].get("ports", []):
                if sp.get("port") != int(m.group(2)):
                    continue
                for dst in pods:
                    if dst.ns != svc["metadata"].get("namespace", "") or not matches(svc["spec"].get("selector", {}), dst.labels):
                        continue
                    tp = sp.get("targetPort", sp["port"])
                    numbers = [n for name, n, _ in container_ports(dst.tpl) if name == tp] if isinstance(tp, str) else [tp]
                    for n in numbers:
                        flows.append((f"{cmd} {pod.name} to etcd ({url.strip()})", pod, dst, n))
    for src in routers:
        for dst, port in workers:
            flows.append((f"router {src.name} to the worker gRPC port", src, dst, port))
    for pod in pods:
        for c in pod.tpl["spec"]["containers"]:
            for a in c.get("command", []) + c.get("args", []):
                m = re.match(r"^--initial-advertise-peer-urls=https?://[^,]*:(\d+)", str(a))
                if m:
                    flows.append((f"etcd members of {pod.name} to each other", pod, pod, int(m.group(1))))
        ann = pod.tpl["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") == "true" and str(ann.get("prometheus.io/port", "")).isdigit():
            flows.append(("Prometheus to prometheus.io/port", "scraper", pod, int(ann["prometheus.io/port"])))
    return flows


def check_network_policies(objects: list[tuple[Path, dict]]) -> None:
    """NetworkPolicies: they select pods of the manifests, their peers name pods of the manifests,
    their ports are container ports of the pods they apply to; and they leave the connections
    the system needs open (required_flows)."""
    errors: list[str] = []
    policies = [o for _, o in objects if o["kind"] == "NetworkPolicy"]
    pods = [Pod(o, pod_template(o)) for _, o in objects if pod_template(o)]
    ns_labels = {o["metadata"]["name"]: {**o["metadata"].get("labels", {}),
                                         "kubernetes.io/metadata.name": o["metadata"]["name"]}
                 for _, o in objects if o["kind"] == "Namespace"}
    for p in policies:
        ns = p["metadata"].get("namespace", "")
        name = f"NetworkPolicy/{p['metadata']['name']}"
        targets = [pod for pod in pods if pod.ns == ns and selects(p["spec"].get("podSelector"), pod.labels)]
        if not targets:
            errors.append(f"{name}: podSelector {p['spec'].get('podSelector')} selects no pod of the manifests")
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            for i, rule in enumerate(p["spec"].get(direction) or []):
                where = f"{name} {direction}[{i}]"
                for peer in rule.get(peers_key) or []:
                    if "ipBlock" in peer:
                        try:
                            net = ipaddress.ip_network(peer["ipBlock"]["cidr"])
                            for e in peer["ipBlock"].get("except", []):
                                if not ipaddress.ip_network(e).subnet_of(net):
                                    errors.append(f"{where}: ipBlock except {e} is not inside {net}")
                        except (ValueError, TypeError) as e:
                            errors.append(f"{where}: ipBlock: {e}")
                        continue
                    nsel = peer.get("namespaceSelector")
                    local = [n for n, labels in ns_labels.items() if nsel is not None and selects(nsel, labels)]
                    if nsel is not None and not local:
                        continue  # other namespaces: their pods are not in the manifests
                    in_ns = local if nsel is not None else [ns]
                    if not any(pod.ns in in_ns and selects(peer.get("podSelector"), pod.labels) for pod in pods):
                        errors.append(f"{where}: {peers_key} {peer} selects no pod of the manifests")
                # Ingress ports are the selected pods' own; egress ports those of the peers.
                if direction != "ingress":
                    continue
                for entry in rule.get("ports") or []:
                    port = entry.get("port")
                    proto = entry.get("protocol", "TCP")
                    for pod in targets:
                        ports = container_ports(pod.tpl)
                        if isinstance(port, str) and not any(n == port and pr == proto for n, _, pr in ports):
                            errors.append(f"{where}: port {port!r} ({proto}) is no container port of {pod.name}")
                        elif isinstance(port, int) and not any(
                                port <= num <= entry.get("endPort", port) and pr == proto for _, num, pr in ports):
                            errors.append(f"{where}: port {port} ({proto}) is no container port of {pod.name}")
    flows = required_flows(objects, pods)
    for what, src, dst, port in flows:
        if src == "scraper":
            # Prometheus runs wherever the cluster's operators put it: some rule must let it in.
            ingress = [p for p in policies if "Ingress" in policy_types(p)
                       and p["metadata"].get("namespace", "") == dst.ns
                       and selects(p["spec"].get("podSelector"), dst.labels)]
            if ingress and not any(
                    not rule.get("ports") or any(port_admits(e, port, "TCP", dst) for e in rule["ports"])
                    for p in ingress for rule in p["spec"].get("ingress") or []):
                errors.append(f"{what}: no rule of the NetworkPolicies "
                              f"{', '.join(p['metadata']['name'] for p in ingress)} admits anybody to "
                              f"{dst.name} port {port}")
            continue
        why = flow_blocked(policies, src, dst, port, ns_labels)
        if why:
            errors.append(f"{what}: {src.name if src else 'a client'} cannot reach {dst.name} port {port}: "
                          f"the NetworkPolicies restrict {why} and none of their rules admit it")
    R.check(f"k8s NetworkPolicies: selectors, ports and the connections the cluster needs "
            f"({len(policies)} policies, {len(flows)} connections)", errors)


def check_kustomization(objects: list[tuple[Path, dict]], docs: dict[Path, list]) -> None:
    path = K8S / "kustomization.yaml"
    errors = []
    kust = (docs.get(path) or [{}])[0]
    listed = {(K8S / r).resolve() for r in kust.get("resources", [])}
    present = {p.resolve() for p in (K8S / "manifests").glob("*.y*ml")}
    for p in sorted(listed - present):
        errors.append(f"lists {rel(p)}, which does not exist")
    for p in sorted(present - listed):
        errors.append(f"does not list {rel(p)}")
    ns = kust.get("namespace")
    for p, o in objects:
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != ns:
            errors.append(f"{rel(p)}: {o['kind']}/{o['metadata']['name']} is not in namespace {ns}")
    images = {i["name"] for i in kust.get("images", [])}
    used = {c["image"].split(":")[0] for _, o in objects if pod_template(o)
            for c in pod_template(o)["spec"]["containers"]}
    for i in sorted(images - used):
        errors.append(f"images: {i} is used by no container")
    R.check(f"k8s {rel(path)} lists every manifest", errors)

    kubectl = shutil.which("kubectl")
    if not kubectl:
        R.skip("k8s kubectl kustomize", "kubectl is not installed")
        return
    try:
        out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                             timeout=60)
    except subprocess.TimeoutExpired:
        R.skip("k8s kubectl kustomize", "kubectl did not answer in 60 s")
        return
    if out.returncode != 0:
        R.check("k8s kubectl kustomize", [out.stderr.strip() or f"exit {out.returncode}"])
        return
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    R.check("k8s kubectl kustomize renders", [])
    check_k8s_schemas([(path, d) for d in rendered], "kubectl kustomize output")


# ---- compose ------------------------------------------------------------------------------------

def parse_duration(text) -> float:
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", str(text)):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def interpolate_defaults(value: str) -> str:
    """${VAR:-default} -> default, ${VAR} -> VAR (compose would read it from the environment)."""
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}",
                  lambda m: m.group(2) if m.group(2) is not None else m.group(1), value)


def token_file_errors(path: Path) -> list[str]:
    """Is the file at `path` a worker token `rwkv` accepts?"""
    if not path.is_file():
        return [f"{rel(path)} is not a file (if `docker compose up` ran before it existed, Docker "
                "may have made a directory there: remove it and write the token)"]
    if path.stat().st_size > MAX_TOKEN_FILE_BYTES:
        return [f"{rel(path)} is larger than {MAX_TOKEN_FILE_BYTES} bytes"]
    tokens = [line.strip() for line in path.read_bytes().splitlines() if line.strip()]
    if not tokens or any(not all(0x21 <= b <= 0x7e for b in t) or len(t) < MIN_TOKEN_CHARS
                         for t in tokens):
        return [f"{rel(path)} does not hold worker tokens (one per line, each at least "
                f"{MIN_TOKEN_CHARS} printable ASCII characters without spaces): "
                "`openssl rand -hex 32 > " + path.name + "`"]
    return []


def git_ignored(path: Path) -> bool | None:
    """Whether git ignores `path` (None: git or the repository is not there to ask)."""
    git = shutil.which("git")
    if not git:
        return None
    out = subprocess.run([git, "-C", str(ROOT), "check-ignore", "-q", str(path)],
                         capture_output=True)
    return {0: True, 1: False}.get(out.returncode)


def compose_token_errors(compose: dict, rwkv_services: dict) -> list[str]:
    """The router and workers read one worker token, from a compose secret, whose file is never
    committed and, where it exists, holds a valid token."""
    errors = []
    base = COMPOSE.parent
    declared = compose.get("secrets") or {}
    sources: dict[str, str] = {}
    for name, (cmd, settings, s) in rwkv_services.items():
        if cmd not in {"router", "worker"}:
            continue
        path = settings.get("worker_token_file")
        if not path:
            errors.append(f"service {name}: no RWKV_WORKER_TOKEN_FILE: " + (
                "anyone who reaches its port could call it as any tenant" if cmd == "worker"
                else "workers refuse a router without the cluster's token"))
            continue
        mounted = {}
        for entry in s.get("secrets") or []:
            source = entry if isinstance(entry, str) else entry.get("source")
            target = source if isinstance(entry, str) else entry.get("target", source)
            mounted[target if target.startswith("/") else f"/run/secrets/{target}"] = source
        if path not in mounted:
            errors.append(f"service {name}: RWKV_WORKER_TOKEN_FILE {path} is none of its secrets "
                          f"({', '.join(sorted(mounted)) or 'it has none'}): mount the token as a "
                          "compose secret")
        else:
            sources[name] = mounted[path]
    if len(set(sources.values())) > 1:
        errors.append("the router and workers read different secrets, so some refuse others: "
                      + ", ".join(f"{n}: {src}" for n, src in sorted(sources.items())))
    for source in sorted(set(sources.values()) & set(declared)):
        file = (declared[source] or {}).get("file")
        if not file:
            continue
        path = base / file
        ignored = git_ignored(path)
        if ignored is False:
            errors.append(f"secret {source}: {rel(path)} is not git-ignored: the token would be "
                          "committed (add it to deploy/compose/.gitignore)")
        elif ignored is None:
            R.warn("compose worker token", f"git cannot say whether {rel(path)} is ignored")
        if path.exists() or path.is_symlink():
            errors += token_file_errors(path)
    return errors


def check_compose(docs: dict[Path, list]) -> None:
    schema_cli = BIN / "check-jsonschema"
    out = subprocess.run([str(schema_cli), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                         capture_output=True, text=True)
    R.check(f"compose schema (Compose Specification): {rel(COMPOSE)}",
            [] if out.returncode == 0 else [(out.stdout + out.stderr).strip()])

    docker = shutil.which("docker")
    has_plugin = docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    if has_plugin:
        out = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
                             capture_output=True, text=True)
        R.check("compose `docker compose config`",
                [] if out.returncode == 0 else [out.stderr.strip()])
    else:
        R.skip("compose `docker compose config`", "the docker compose plugin is not installed "
               "(the schema and the checks below cover the file)")

    errors: list[str] = []
    compose = (docs.get(COMPOSE) or [{}])[0]
    base = COMPOSE.parent
    services = compose.get("services", {})
    named_volumes = set((compose.get("volumes") or {}).keys())
    router_timeout = DEFAULT_REQUEST_TIMEOUT
    rwkv_services = {}
    for name, s in services.items():
        where = f"service {name}"
        deps = s.get("depends_on", [])
        for d in (deps if isinstance(deps, list) else deps.keys()):
            if d not in services:
                errors.append(f"{where}: depends_on unknown service {d}")
        build = s.get("build")
        if build:
            ctx = base / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile_path = ctx / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            if not ctx.is_dir():
                errors.append(f"{where}: build context {rel(ctx)} does not exist")
            if not dockerfile_path.is_file():
                errors.append(f"{where}: {rel(dockerfile_path)} does not exist")
        for entry in s.get("secrets") or []:
            source = entry if isinstance(entry, str) else entry.get("source")
            if source not in (compose.get("secrets") or {}):
                errors.append(f"{where}: secret {source} is not declared under `secrets`")
        for v in s.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith((".", "/")):
                if not (base / src).exists():
                    errors.append(f"{where}: bind mount source {src} does not exist")
            elif src and src not in named_volumes:
                errors.append(f"{where}: volume {src} is not declared under `volumes`")
        image = s.get("image", "")
        if image and not build and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            errors.append(f"{where}: image {image!r} needs a pinned tag (not latest)")
        cmd = rwkv_command(s.get("command", []) if isinstance(s.get("command"), list)
                           else str(s.get("command", "")).split())
        if not cmd:
            continue
        env = compose_env(s)
        errors += check_env({k: v if v is None else interpolate_defaults(v) for k, v in env.items()},
                            cmd, where)
        settings = {k[len("RWKV_"):].lower(): interpolate_defaults(v) for k, v in env.items()
                    if k.startswith("RWKV_") and v is not None}
        if "RWKV_CONFIG" in env:
            cfg = env["RWKV_CONFIG"]
            for v in s.get("volumes", []):
                if isinstance(v, str) and v.split(":")[1] == cfg:
                    text = (base / v.split(":")[0]).read_text()
                    cfg_errors, file_settings = check_toml_config(text, cmd, f"{where} {cfg}", False)
                    errors += cfg_errors
                    settings = {**file_settings, **settings}
                    break
            else:
                errors.append(f"{where}: RWKV_CONFIG {cfg} is not mounted")
        settings.pop("config", None)
        rwkv_services[name] = (cmd, settings, s)
        if cmd == "router":
            router_timeout = int(settings.get("request_timeout", DEFAULT_REQUEST_TIMEOUT))
            test = " ".join(s.get("healthcheck", {}).get("test", []))
            if "/ready" not in test:
                errors.append(f"{where}: the healthcheck must probe /ready")
        if cmd in {"router", "worker"} and "etcd" not in settings:
            errors.append(f"{where}: no etcd URL (RWKV_ETCD)")
        if cmd == "worker":
            for key in ("advertise", "model"):
                if key not in settings:
                    errors.append(f"{where}: `{key}` is required (RWKV_{key.upper()})")
            adv = str(settings.get("advertise", ""))
            m = re.match(r"^https?://([^:/]+):(\d+)$", adv)
            listen_port = int(str(settings.get("listen", "0.0.0.0:%d" % PORTS["worker"])).rsplit(":", 1)[1])
            if not m or m.group(1) != name or int(m.group(2)) != listen_port:
                errors.append(f"{where}: RWKV_ADVERTISE {adv!r} should be http://{name}:{listen_port}")
        for key in ("etcd",):
            host = re.sub(r"^https?://", "", str(settings.get(key, ""))).split(":")[0]
            if host and host not in services:
                errors.append(f"{where}: etcd URL names {host}, not a service")
    errors += compose_token_errors(compose, rwkv_services)
    ids = [st.get("worker_id", n) for n, (c, st, _) in rwkv_services.items() if c == "worker"]
    if len(ids) != len(set(ids)):
        errors.append(f"worker ids are not unique: {ids}")
    for name, (cmd, settings, s) in rwkv_services.items():
        errors += shutdown_errors(f"service {name}", cmd, settings,
                                  parse_duration(s.get("stop_grace_period", "10s")), 0, router_timeout)

    prom = base / "prometheus.yml"
    if prom.exists():
        for job in (docs.get(prom) or [{}])[0].get("scrape_configs", []):
            for sc in job.get("static_configs", []):
                for target in sc.get("targets", []):
                    host, port = target.rsplit(":", 1)
                    if host not in services:
                        errors.append(f"{rel(prom)}: target {target}: no service {host}")
                    elif host in rwkv_services:
                        cmd, settings, _ = rwkv_services[host]
                        # Workers serve metrics only on metrics_listen; routers on their API
                        # port (an admin key once tenants are configured) and on metrics_listen.
                        keys = ["metrics_listen"] if cmd == "worker" else ["metrics_listen", "listen"]
                        ports = {str(settings[k]).rsplit(":", 1)[1] for k in keys if k in settings}
                        if port not in ports:
                            errors.append(f"{rel(prom)}: target {target}: {host} serves metrics on "
                                          f"port(s) {sorted(ports)}")
    for mount in ("../grafana/provisioning", "../grafana/rwkv-dashboard.json"):
        if not (base / mount).exists():
            errors.append(f"{mount} is missing")
    R.check(f"compose references, rwkv settings, worker token and stop grace periods "
            f"({len(services)} services)", errors)


# ---- Dockerfiles ----------------------------------------------------------------------------------

def check_dockerfiles() -> None:
    ignore = ROOT / ".dockerignore"
    ignored = ignore.read_text().split() if ignore.exists() else []
    for path in sorted((DEPLOY / "docker").glob("Dockerfile*")):
        errors = []
        try:
            cmds = dockerfile.parse_file(str(path))
        except dockerfile.GoParseError as e:
            R.check(f"dockerfile {rel(path)}", [f"BuildKit parser: {e}"])
            continue
        args: dict[str, str] = {}
        stages: list[str] = []
        final: list = []
        for c in cmds:
            if c.cmd == "ARG":
                for a in c.value:
                    if "=" in a:
                        k, v = a.split("=", 1)
                        args.setdefault(k, v)
            elif c.cmd == "FROM":
                image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), "$" + m.group(1)), c.value[0])
                if "$" in image:
                    errors.append(f"line {c.start_line}: FROM {c.value[0]}: an ARG without a default")
                elif image not in stages and (":" not in image.rsplit("/", 1)[-1]
                                              or image.endswith(":latest")):
                    errors.append(f"line {c.start_line}: base image {image} needs a pinned tag")
                if len(c.value) == 3 and c.value[1].upper() == "AS":
                    stages.append(c.value[2])
                final = []
            elif c.cmd == "COPY":
                for flag in c.flags:
                    if flag.startswith("--from=") and flag[7:] not in stages:
                        errors.append(f"line {c.start_line}: COPY {flag}: no such stage")
            final.append(c)
        users = [c for c in final if c.cmd == "USER"]
        if not users:
            errors.append("the final stage has no USER: it would run as root")
        else:
            uid = users[-1].value[0].split(":")[0]
            if not uid.isdigit() or uid == "0":
                errors.append(f"USER {users[-1].value[0]}: use a numeric non-root uid (Kubernetes "
                              "runAsNonRoot can only verify a numeric one)")
        if not any(c.cmd == "ENTRYPOINT" for c in final):
            errors.append("the final stage has no ENTRYPOINT")
        exposed = {int(p.split("/")[0]) for c in final if c.cmd == "EXPOSE" for p in c.value}
        if not exposed or not exposed <= set(PORTS.values()):
            errors.append(f"EXPOSE {sorted(exposed)}: expected among {sorted(set(PORTS.values()))}")
        if not any("cargo build --release" in " ".join(c.value) and "-p rwkv-cli" in " ".join(c.value)
                   for c in cmds if c.cmd == "RUN"):
            errors.append("no `cargo build --release ... -p rwkv-cli` step")
        for must in ("target/", ".git/"):
            if must not in ignored:
                errors.append(f".dockerignore does not exclude {must}")
        R.check(f"dockerfile {rel(path)} (BuildKit parser, {len(stages)} stages)", errors)


# ---- Grafana ----------------------------------------------------------------------------------------

def check_grafana() -> None:
    path = DEPLOY / "grafana" / "rwkv-dashboard.json"
    try:
        dash = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        R.check(f"grafana {rel(path)}", [str(e)])
        return
    errors = []
    known = source_metric_names()
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    if "datasource" not in variables:
        errors.append("no `datasource` template variable")
    ids = set()
    cells: list[tuple[int, int, int, int, str]] = []
    exprs = 0
    for p in dash.get("panels", []):
        title = p.get("title", "?")
        if p.get("id") in ids:
            errors.append(f"panel {title}: duplicate id {p.get('id')}")
        ids.add(p.get("id"))
        g = p.get("gridPos", {})
        if not all(k in g for k in "hwxy") or g["x"] + g["w"] > 24:
            errors.append(f"panel {title}: bad gridPos {g}")
            continue
        for (x, y, w, h, other) in cells:
            if g["x"] < x + w and x < g["x"] + g["w"] and g["y"] < y + h and y < g["y"] + g["h"]:
                errors.append(f"panel {title} overlaps panel {other}")
        cells.append((g["x"], g["y"], g["w"], g["h"], title))
        if p.get("type") == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${datasource}":
            errors.append(f"panel {title}: datasource is not ${{datasource}}")
        if not p.get("targets"):
            errors.append(f"panel {title}: no queries")
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            exprs += 1
            for var in re.findall(r"\$(?!__)\{?(\w+)\}?", expr):
                if var not in variables:
                    errors.append(f"panel {title}: ${var} is no template variable")
            concrete = re.sub(r"\$__\w*interval", "5m", expr)
            concrete = re.sub(r"\$\{?\w+\}?", "x", concrete)
            try:
                promql_parser.parse(concrete)
            except ValueError as e:
                errors.append(f"panel {title}: PromQL `{expr}`: {e}")
            for metric in set(re.findall(r"\brwkv_[a-z0-9_]+", expr)):
                base = re.sub(r"_(sum|count|bucket)$", "", metric)
                if metric not in known and base not in known:
                    errors.append(f"panel {title}: metric {metric} is defined nowhere in crates/*/src")
            for q in re.findall(r'quantile="([^"]*)"', expr):
                if q not in EXPORTER_QUANTILES:
                    errors.append(f"panel {title}: quantile {q} is not one the exporter renders "
                                  f"({', '.join(sorted(EXPORTER_QUANTILES))})")
    R.check(f"grafana {rel(path)} ({len(ids)} panels, {exprs} PromQL queries parsed, metric names "
            "checked against the sources)", errors)


# ---- shell ------------------------------------------------------------------------------------------

def check_shell() -> None:
    shellcheck = BIN / "shellcheck"
    if not shellcheck.exists():
        shellcheck = shutil.which("shellcheck")
    scripts = sorted(DEPLOY.rglob("*.sh"))
    if not shellcheck:
        R.skip("shellcheck", "not installed")
        return
    out = subprocess.run([str(shellcheck), *map(str, scripts)], capture_output=True, text=True)
    R.check(f"shellcheck {' '.join(rel(s) for s in scripts)}",
            [] if out.returncode == 0 else [out.stdout.strip()])


def main() -> int:
    print(f"deploy: Kubernetes schemas {', '.join(K8S_VERSIONS)}; settings of " + "; ".join(
        f"rwkv {c}: {len(k)} " + ("(from the sources)" if KEYS_FROM_SOURCE[c] else "(documented)")
        for c, k in COMMAND_KEYS.items()))
    docs = check_yaml_syntax()
    objects = k8s_objects(docs)
    checks = [
        ("k8s schemas", lambda: check_k8s_schemas(objects, rel(K8S / "manifests"))),
        ("k8s references", lambda: check_k8s_references(objects)),
        ("k8s rwkv settings", lambda: check_k8s_cluster(objects)),
        ("k8s network policies", lambda: check_network_policies(objects)),
        ("k8s kustomization", lambda: check_kustomization(objects, docs)),
        ("compose", lambda: check_compose(docs)),
        ("dockerfiles", check_dockerfiles),
        ("configs", check_configs),
        ("grafana", check_grafana),
        ("shellcheck", check_shell),
    ]
    for name, check in checks:
        try:
            check()
        except Exception as e:  # a malformed file the checks did not foresee: fail, and say where
            R.check(name, [f"the check itself failed on this input: {type(e).__name__}: {e}"])
    line = f"deploy: {R.passed} passed, {R.failed} failed"
    if R.skipped:
        line += f", {R.skipped} skipped"
    print(line)
    return 1 if R.failed else 0


if __name__ == "__main__":
    sys.exit(main())
