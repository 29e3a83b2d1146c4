"""What the chart tests share: Helm rendering (helm-python-sdk, no helm
binary), a YAML loader as strict as kustomize's, the env the kubelet would
give a rendered container, certificates, and real nats-server and herald
processes run from what the chart renders, on loopback."""

import base64
import contextlib
import copy
import glob
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import helm_python as helm
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "helm", "herald")
HERALD = os.environ.get("HERALD_BIN", os.path.join(ROOT, "target", "ci", "herald"))
KUBE_VERSIONS = ["1.29.0", "1.33.0"]
CRDS = {"ServiceMonitor", "HTTPRoute"}  # not in the Kubernetes schemas; checked by assertions below
VALUES_FILES = sorted(glob.glob(os.path.join(CHART, "ci", "*-values.yaml")))


def values_of(path):
    with open(path) as f:
        return yaml.safe_load(f) or {}


class StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate mapping keys, as kustomize and
    Flux do (PyYAML's own loaders keep the last one silently)."""


def _no_duplicates(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dups = {k for k in keys if keys.count(k) > 1}
    if dups:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(dups)}", node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)
# Go's YAML (Helm, kubectl, kustomize) reads 1e5 as a float, which PyYAML
# (YAML 1.1, a dot required) keeps a string: read it as Go does, so a name
# rendered unquoted is caught here as the API server would see it.
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$"),
                                   list("-+0123456789"))


# What a GitOps user sets: here the chart renders with no cluster, where it
# refuses to generate passwords it could not read back.
OFFLINE_PASSWORDS = {"password": "Herald-test-password-1", "routePassword": "Route-test-password-01"}


def offline(values):
    """`values` with the bundled NATS's passwords set, unless they name a
    Secret (or an external NATS)."""
    values = copy.deepcopy(values or {})
    nats = values.setdefault("nats", {})
    auth = nats.setdefault("auth", {})
    if nats.get("enabled", True) and not auth.get("existingSecret"):
        for k, v in OFFLINE_PASSWORDS.items():
            auth.setdefault(k, v)
    return values


def render(values, name="live", passwords=True):
    """The chart's objects, rendered offline as `helm template` does;
    `passwords`: with OFFLINE_PASSWORDS added (see offline())."""
    if passwords:
        values = offline(values)
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        out = chart.render(values, name=name, namespace="herald")
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        for d in yaml.load_all(text, Loader=StrictLoader):
            if d:
                d["__template"] = path
                docs.append(d)
    return docs


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, suffix=None):
    found = [d for d in by_kind(docs, kind) if suffix is None or d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"expected one {kind}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def herald_flags():
    """The environment variables `herald serve` accepts, from its --help."""
    help_text = subprocess.run([HERALD, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    # Help wraps to the terminal width: an "env:" and its name may be split over lines.
    return set(re.findall(r"env:\s+(HERALD_[A-Z_]+)", help_text))


def seconds(d):
    m = re.fullmatch(r"([0-9.]+)(ms|s|m|h)?", d)
    n = float(m.group(1))
    return {"ms": n / 1000, "s": n, None: n, "m": n * 60, "h": n * 3600}[m.group(2)]




def write_certs(d):
    """A CA and a server certificate for 127.0.0.1 and localhost, as
    cert-manager would put them in a kubernetes.io/tls Secret."""
    import datetime as dt
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test ca")).issuer_name(name("test ca"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("live-herald-nats")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.DNSName("live-herald-nats"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / "ca.crt").write_bytes(ca.public_bytes(pem))
    (d / "tls.crt").write_bytes(cert.public_bytes(pem))
    (d / "tls.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def secret_env(docs, container):
    """The env a container gets from the rendered Secrets' keys (an optional
    key that is missing stays unset, as Kubernetes does)."""
    data = {}
    for sec in by_kind(docs, "Secret"):
        for k, v in sec.get("data", {}).items():
            data[(sec["metadata"]["name"], k)] = base64.b64decode(v).decode()
    env = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if not ref:
            continue
        if (ref["name"], ref["key"]) in data:
            env[e["name"]] = data[(ref["name"], ref["key"])]
        else:
            assert ref.get("optional"), f"{e['name']}: a required key no rendered Secret holds"
    return env


@contextlib.contextmanager
def rendered_node(docs, tmp_path, files=None, extra_env=None):
    """A real nats-server running the NATS config the chart renders (when it
    bundles NATS; a plain one otherwise) and a real herald with the env the
    chart renders (the ConfigMap and the rendered Secrets), on loopback;
    `files` maps a mounted path (/etc/herald/...) to its contents, written
    under `tmp_path` with the env pointed there. Yields the node's address
    and its env."""
    dep = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = dict(one(docs, "ConfigMap", suffix="live-herald")["data"])
    env.update(secret_env(docs, dep))
    env.update(extra_env or {})
    for mounted, content in (files or {}).items():
        local = tmp_path / mounted.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(content)
    for k, v in env.items():
        if v.startswith("/etc/herald/"):
            env[k] = str(tmp_path / v.lstrip("/"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nats_port = s.getsockname()[1]
    confs = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-nats-config")]
    if confs:
        conf = confs[0]["data"]["nats.conf"]
        conf, n = re.subn(r"(?ms)^cluster \{.*?^\}\n", "", conf)  # no peers here
        servers = one(docs, "StatefulSet")["spec"]["replicas"]
        assert n == int(servers > 1), "the cluster block was found and removed"
        conf = conf.replace("/var/run/nats/", f"{tmp_path}/").replace("/etc/nats-tls/", f"{tmp_path}/")
        (tmp_path / "nats.conf").write_text(conf)
        sts = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
        nats_env = {**os.environ, **kubelet_env(docs, sts, "live-herald-nats-0")}
        cmd = ["nats-server", *nats_args(sts, nats_env, str(tmp_path / "nats.conf")),
               "-a", "127.0.0.1", "-p", str(nats_port), "-m", "0"]
    else:
        nats_env, cmd = None, ["nats-server", "-a", "127.0.0.1", "-p", str(nats_port)]
    nats = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=nats_env)
    env.update({"HERALD_LISTEN": "127.0.0.1:0", "HERALD_METRICS_LISTEN": "127.0.0.1:0",
                "HERALD_NATS_URL": f"nats://127.0.0.1:{nats_port}",
                "HERALD_LOG_LEVEL": "warn", "PATH": os.environ["PATH"]})
    node = subprocess.Popen([HERALD, "serve"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        addr = node.stdout.readline().strip().rsplit(" ", 1)[1]
        deadline = time.time() + 10
        while True:
            try:
                body = urllib.request.urlopen(f"http://{addr}/readyz").read()
            except urllib.error.HTTPError as e:  # 503 until the link is up
                body = e.read()
            if b"nats: connected" in body:
                break
            assert time.time() < deadline, f"the node never linked: {body}"
            time.sleep(0.05)
        yield addr, env
    finally:
        node.kill()
        node.wait()
        nats.kill()
        nats.wait()


def kubelet_env(docs, container, pod_name):
    """The env the kubelet gives a rendered container: plain values with
    `$(VAR)` expanded from the variables defined before them, Secret keys
    from the rendered Secrets, and the pod's name from the downward API."""
    secrets = secret_env(docs, container)
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                    lambda m: env.get(m.group(1), m.group(0)), e["value"])
        elif e["name"] in secrets:
            env[e["name"]] = secrets[e["name"]]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = pod_name
    return env


def nats_args(container, env, conf_path):
    """The nats container's arguments as the kubelet passes them ($(VAR)
    from its env), with the config file at `conf_path`."""
    args = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a)
            for a in container.get("args", [])]
    return [conf_path if a == "/etc/nats/nats.conf" else a for a in args]


def nats_config_test(docs, conf, workdir, pod_name="live-herald-nats-0"):
    """`nats-server -t` on `conf` (a rendered nats.conf, or one with paths
    moved) with the StatefulSet's arguments and env as the kubelet gives
    them to pod `pod_name`: the CompletedProcess."""
    container = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    env = kubelet_env(docs, container, pod_name)
    path = os.path.join(str(workdir), "nats.conf")
    with open(path, "w") as f:
        f.write(conf)
    return subprocess.run(["nats-server", "-t", *nats_args(container, env, path)], capture_output=True, text=True,
                          env={**os.environ, **env})


def nats_conf(docs):
    return one(docs, "ConfigMap", suffix="-nats-config")["data"]["nats.conf"]


# A route URL to a server of the StatefulSet, by its headless Service name.
ROUTE_HOST = re.compile(r"([a-z0-9-]+)-(\d+)\.\1-headless:\d+")


class NatsServer:
    """A real nats-server running a rendered nats.conf as the StatefulSet's
    pod `index` would (its env as the kubelet builds it), on loopback with
    ports it picks itself and reads back from its log. Paths of the pod's
    volumes (/data, /var/run/nats, /etc/nats-tls) point into `workdir`.
    Route URLs to pod n go to `peers[n]` ("127.0.0.1:port"), or to a port
    with nothing behind it for a pod not started. `run_as` (uid, gid,
    [groups]) drops privileges, as the pod's security context does."""

    def __init__(self, docs, index, workdir, peers=None, run_as=None, conf=None, data_dir=None):
        sts = one(docs, "StatefulSet")
        self.name = f"{sts['metadata']['name']}-{index}"
        container = sts["spec"]["template"]["spec"]["containers"][0]
        env = kubelet_env(docs, container, self.name)
        peers = peers or {}

        def route(m):
            return peers.get(int(m.group(2)), "127.0.0.1:1")
        env = {k: ROUTE_HOST.sub(route, v) for k, v in env.items()}
        text = ROUTE_HOST.sub(route, conf if conf is not None else nats_conf(docs))
        text = re.sub(r"(?m)^(\s*)port: \d+$", r"\1port: -1", text)
        text = re.sub(r"(?m)^http_port: \d+$", "http_port: -1", text)
        text = text.replace("cluster {\n", "cluster {\n  host: 127.0.0.1\n")
        text = (text.replace("store_dir: /data", f"store_dir: {data_dir or workdir + '/data'}")
                .replace("/var/run/nats/", f"{workdir}/").replace("/etc/nats-tls/", f"{workdir}/"))
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "nats.conf")
        with open(path, "w") as f:
            f.write(text)
        self.conf = text
        self.clustered = bool(re.search(r"(?m)^cluster \{", text))
        cmd = ["nats-server", *nats_args(container, env, path), "-a", "127.0.0.1"]
        if run_as:
            uid, gid, groups = run_as
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}",
                   "--groups=" + ",".join(str(g) for g in groups) if groups else "--clear-groups", "--", *cmd]
        self._start(cmd, env)

    @classmethod
    def plain(cls, *args):
        """A nats-server of no release (no config), e.g. one that tries to
        join a cluster it has no password for."""
        self = cls.__new__(cls)
        self.name, self.clustered = "plain", "--cluster" in args
        self._start(["nats-server", "-a", "127.0.0.1", "-p", "-1", "-m", "-1", *args], {})
        return self

    def _start(self, cmd, env):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={"PATH": os.environ["PATH"], **env})
        self.log = []
        self.addr = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.log.append(line)
            for kind, pattern in (("client", "Listening for client connections on "),
                                  ("http", "Starting http monitor on "),
                                  ("route", "Listening for route connections on ")):
                if pattern in line:
                    self.addr[kind] = line.split(pattern, 1)[1].strip().replace("0.0.0.0", "127.0.0.1")

    def wait_ready(self, timeout=15):
        deadline = time.time() + timeout
        wanted = {"client", "http"} | ({"route"} if self.clustered else set())
        while not (any("Server is ready" in line for line in self.log) and wanted <= set(self.addr)):
            assert self.proc.poll() is None, f"{self.name} exited:\n{''.join(self.log)}"
            assert time.time() < deadline, f"{self.name} never got ready:\n{''.join(self.log)}"
            time.sleep(0.05)
        return self

    def logged(self, text):
        return any(text in line for line in self.log)

    def get(self, path):
        """Status and body of a monitoring endpoint."""
        try:
            with urllib.request.urlopen(f"http://{self.addr['http']}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def server_id(self):
        return json.loads(self.get("/varz")[1])["server_id"]

    def routes(self):
        """Server ids of the servers routed to this one."""
        return sorted(r["remote_id"] for r in json.loads(self.get("/routez")[1])["routes"])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=5)


@contextlib.contextmanager
def nats_servers():
    """Stops every NatsServer added to the yielded list, by its own process."""
    started = []
    try:
        yield started
    finally:
        for s in started:
            s.stop()


def immutable_fields(docs):
    """What Kubernetes refuses to change on an existing object (an upgrade
    that changes it fails: "updates to statefulset spec ... Forbidden"):
    the workloads' selectors, the StatefulSet's service name, pod management
    policy and volume claim templates."""
    fields = {}
    for d in docs:
        if d["kind"] == "Deployment":
            fields[f"Deployment/{d['metadata']['name']}"] = {"selector": d["spec"]["selector"]}
        elif d["kind"] == "StatefulSet":
            fields[f"StatefulSet/{d['metadata']['name']}"] = {
                "selector": d["spec"]["selector"], "serviceName": d["spec"]["serviceName"],
                "podManagementPolicy": d["spec"].get("podManagementPolicy"),
                "volumeClaimTemplates": d["spec"].get("volumeClaimTemplates")}
    return fields
