"""The bundled NATS as it would run: the rendered nats.conf and the
StatefulSet's env, in real nats-server processes on loopback, one per pod."""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from harness import CHART, NatsServer, by_kind, nats_conf, nats_config_test, nats_servers, one, render, values_of, write_certs


def nats_connect(addr, user=None, password=None):
    """A plain NATS client connection (no TLS), past CONNECT and a PONG."""
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    s.recv(4096)  # INFO
    opts = {"verbose": False, "pedantic": False}
    if user:
        opts.update(user=user, **{"pass": password})
    s.sendall(f"CONNECT {json.dumps(opts)}\r\nPING\r\n".encode())
    answer = s.recv(4096)
    assert b"PONG" in answer, answer
    return s


def herald_credentials(docs):
    """User and password Herald connects with (the rendered env)."""
    from harness import secret_env
    dep = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    cm = one(docs, "ConfigMap", suffix="live-herald")["data"]
    return cm.get("HERALD_NATS_USER"), secret_env(docs, dep).get("HERALD_NATS_PASSWORD")


def wait_for(what, check, timeout=10):
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, what
        time.sleep(0.1)


@pytest.mark.parametrize("values_file", ["default-values.yaml", "nats-tls-values.yaml"])
def test_routes_need_the_rendered_route_password(values_file, tmp_path):
    """Two real servers started from the rendered config and env (the route
    password in each route URL, as the kubelet expands it) form a cluster;
    a third nats-server without the password that dials the routes port is
    refused, and nothing published on it reaches the cluster's clients.
    With nats.tls on, the routes are TLS, verified against ca.crt."""
    docs = render(values_of(os.path.join(CHART, "ci", values_file)))
    tls = "tls {" in one(docs, "ConfigMap", suffix="-nats-config")["data"]["nats.conf"]
    with nats_servers() as started:
        dirs = [tmp_path / f"s{i}" for i in range(3)]
        if tls:  # one certificate in every pod, as one cert-manager Secret
            for d in dirs:
                d.mkdir()
            write_certs(dirs[0])
            for d in dirs[1:]:
                for f in ("ca.crt", "tls.crt", "tls.key"):
                    (d / f).write_bytes((dirs[0] / f).read_bytes())
        first = NatsServer(docs, 0, str(dirs[0]))
        started.append(first)
        first.wait_ready()
        second = NatsServer(docs, 1, str(dirs[1]), peers={0: first.addr["route"]})
        started.append(second)
        second.wait_ready()
        wait_for(f"the second server never joined:\n{''.join(second.log)}",
                 lambda: first.routes() == [second.server_id()])
        rogue = NatsServer.plain("--cluster_name", "live-herald", "--cluster", "nats://127.0.0.1:-1",
                                 "--routes", f"nats://{first.addr['route']}")
        started.append(rogue)
        rogue.wait_ready()
        refused = "connection closed" if tls else "Authorization Violation"  # TLS: no handshake at all
        wait_for("the rogue never dialled the routes port", lambda: rogue.logged(refused) or rogue.routes())
        time.sleep(0.5)
        assert not rogue.routes() and first.routes() == [second.server_id()], "the rogue joined"
        assert rogue.logged(refused), "".join(rogue.log)
        if not tls:
            user, password = herald_credentials(docs)
            sub = nats_connect(first.addr["client"], user, password)
            sub.sendall(b"SUB herald.> 1\r\nPING\r\n")
            assert b"PONG" in sub.recv(4096)
            time.sleep(0.3)  # the subscription's interest crosses the route
            pub = nats_connect(rogue.addr["client"])
            pub.sendall(b"PUB herald.chat.lobby 5\r\nrogue\r\nPING\r\n")
            pub.recv(4096)
            legit = nats_connect(second.addr["client"], user, password)
            legit.sendall(b"PUB herald.chat.lobby 5\r\nlegit\r\nPING\r\n")
            legit.recv(4096)
            sub.settimeout(2)
            got = b""
            while b"legit" not in got:
                got += sub.recv(4096)
            assert b"rogue" not in got, got


def test_one_server_has_no_cluster_and_gets_healthy(tmp_path):
    """nats.replicas 1: no cluster block (a route to itself kept JetStream
    waiting for a meta leader, so /healthz never answered 200 and the
    Service stayed empty), no route password; the rendered config, run as
    it is, answers every probe the StatefulSet has."""
    docs = render({"nats": {"replicas": 1}, "config": {"history": "chat:*=100"}})
    container = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    with nats_servers() as started:
        server = NatsServer(docs, 0, str(tmp_path))
        started.append(server)
        server.wait_ready()
        probes = [container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")
                  if p in container]
        wait_for(f"probes never passed: {[server.get(p) for p in probes]}",
                 lambda: all(server.get(p)[0] == 200 for p in probes))
    conf = one(docs, "ConfigMap", suffix="-nats-config")["data"]["nats.conf"]
    assert "cluster {" not in conf and "NATS_ROUTE" not in conf
    assert not [e for e in container["env"] if e["name"].startswith("NATS_ROUTE")]


def apply_fs_group(volume, security_context):
    """What the kubelet does to a volume for a pod with an fsGroup: the
    group of every file becomes fsGroup, readable and writable by it, and
    directories setgid, so what the pod creates stays in the group. With
    fsGroupChangePolicy OnRootMismatch it skips a volume whose root already
    has the group and those permissions."""
    group = security_context.get("fsGroup")
    if group is None:
        return False
    st = os.stat(volume)
    if (security_context.get("fsGroupChangePolicy") == "OnRootMismatch" and st.st_gid == group
            and st.st_mode & 0o2070 == 0o2070):
        return False
    for root, dirs, files in os.walk(volume):
        for path, is_dir in [(root, True)] + [(os.path.join(root, f), False) for f in files]:
            os.chown(path, -1, group)
            mode = os.stat(path).st_mode
            os.chmod(path, mode | 0o660 | (0o2110 if is_dir else 0))
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="a root-owned volume and dropping to uid 1000 need root")
def test_jetstream_starts_on_a_root_owned_volume(tmp_path):
    """A volume as many storage classes provision it (root-owned, 0755),
    given the pod's security context the way the kubelet applies it (the
    fsGroup rule, then nats-server as runAsUser with fsGroup among its
    groups): JetStream creates its store and the server gets healthy."""
    docs = render({"nats": {"replicas": 1}})
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] and ctx["runAsUser"] != 0
    volume = tempfile.mkdtemp(prefix="herald-nats-data-")
    scratch = tempfile.mkdtemp(prefix="herald-nats-pod-")  # config and pid file: readable, as an emptyDir
    try:
        os.chmod(volume, 0o755)
        os.chmod(scratch, 0o777)
        assert os.stat(volume).st_uid == 0
        changed = apply_fs_group(volume, ctx)
        groups = [ctx["fsGroup"]] if "fsGroup" in ctx else []
        with nats_servers() as started:
            server = NatsServer(docs, 0, scratch, data_dir=volume,
                                run_as=(ctx["runAsUser"], ctx.get("runAsGroup", ctx["runAsUser"]), groups))
            started.append(server)
            server.wait_ready()
            wait_for("JetStream never came up", lambda: server.get("/healthz?js-enabled-only=true")[0] == 200)
            assert not server.logged("[FTL]"), "".join(server.log)
            assert os.path.isdir(os.path.join(volume, "jetstream"))
        # The next start finds the volume's root right and changes nothing.
        assert changed and not apply_fs_group(volume, ctx)
    finally:
        shutil.rmtree(volume)
        shutil.rmtree(scratch)


def test_security_contexts_are_overridable():
    docs = render({"podSecurityContext": {"runAsUser": 4000, "fsGroup": 4000},
                   "securityContext": {"readOnlyRootFilesystem": False},
                   "nats": {"podSecurityContext": {"fsGroup": 2000, "fsGroupChangePolicy": "Always"},
                            "securityContext": {"runAsUser": 3000}, "exporter": {"enabled": True}}})
    dep = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert dep["securityContext"]["runAsUser"] == 4000 and dep["securityContext"]["fsGroup"] == 4000
    assert dep["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is False
    sts = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    assert sts["securityContext"]["fsGroup"] == 2000 and sts["securityContext"]["fsGroupChangePolicy"] == "Always"
    assert sts["securityContext"]["runAsUser"] == 1000, "the rest of the default stays"
    assert [c["securityContext"]["runAsUser"] for c in sts["containers"]] == [3000, 3000]


def served_certificate(addr):
    """The certificate a TLS NATS port presents (INFO first, then TLS)."""
    import ssl
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.recv(4096)
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with ctx.wrap_socket(s) as t:
            return ssl.DER_cert_to_PEM_cert(t.getpeercert(binary_form=True))


def test_renewed_certificates_are_served_after_the_documented_reload(tmp_path):
    """cert-manager renews the Secret and the kubelet updates the mounted
    files; nats-server reads them at start and on reload. The reload
    docs/operations.md gives (nats-server --signal reload=<the rendered
    pid_file>, in each pod) makes a real server present the new one."""
    import ssl
    docs = render({**values_of(os.path.join(CHART, "ci", "nats-tls-values.yaml")), "nats": {
        **values_of(os.path.join(CHART, "ci", "nats-tls-values.yaml"))["nats"], "replicas": 1}})
    write_certs(tmp_path)
    with nats_servers() as started:
        server = NatsServer(docs, 0, str(tmp_path))
        started.append(server)
        server.wait_ready()
        old = (tmp_path / "tls.crt").read_text()
        assert ssl.PEM_cert_to_DER_cert(served_certificate(server.addr["client"])) == ssl.PEM_cert_to_DER_cert(old)
        write_certs(tmp_path)  # renewed: a new key and certificate
        new = (tmp_path / "tls.crt").read_text()
        pid_file = re.search(r"pid_file: (\S+)", server.conf).group(1)
        with open(os.path.join(CHART, "..", "..", "docs", "operations.md")) as f:
            assert "--signal reload=/var/run/nats/nats.pid" in f.read()
        subprocess.run(["nats-server", "--signal", f"reload={pid_file}"], check=True)
        wait_for("the renewed certificate is never served", lambda: ssl.PEM_cert_to_DER_cert(
            served_certificate(server.addr["client"])) == ssl.PEM_cert_to_DER_cert(new))


def js_request(conn, subject, body):
    """A JetStream API request on a raw connection; its JSON answer."""
    inbox = f"_INBOX.{time.time_ns()}"
    payload = json.dumps(body).encode()
    conn.sendall(f"SUB {inbox} 9\r\nPUB {subject} {inbox} {len(payload)}\r\n".encode() + payload + b"\r\n")
    got = b""
    conn.settimeout(10)
    while True:
        got += conn.recv(65536)
        head, sep, rest = got.partition(b"MSG " + inbox.encode())
        if sep and b"\r\n" in rest:
            size = int(rest.split(b"\r\n", 1)[0].split()[-1])
            data = rest.split(b"\r\n", 1)[1]
            if len(data) >= size:
                return json.loads(data[:size])


def test_a_survivor_stays_ready_while_its_streams_are_not_current(tmp_path):
    """Three real servers from the rendered config, a stream with three
    copies (as Herald's history keeps on three servers), then two servers
    killed: the survivor's whole /healthz says the stream is not current
    (and within seconds ?js-server-only=true fails too: no meta leader),
    yet core NATS works on it, and the readiness probe the StatefulSet has
    keeps passing, so the Service keeps it."""
    docs = render({})
    container = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    readiness = container["readinessProbe"]["httpGet"]["path"]
    with nats_servers() as started:
        peers = {}
        for i in range(3):
            server = NatsServer(docs, i, str(tmp_path / f"s{i}"), peers=dict(peers))
            started.append(server)
            server.wait_ready()
            peers[i] = server.addr["route"]
        survivor = started[0]
        wait_for("the cluster never got healthy", lambda: all(s.get("/healthz")[0] == 200 for s in started), 30)
        user, password = herald_credentials(docs)
        conn = nats_connect(survivor.addr["client"], user, password)
        answer = {}
        deadline = time.time() + 20
        while "error" in answer or not answer:  # until the meta leader takes requests
            answer = js_request(conn, "$JS.API.STREAM.CREATE.HERALD",
                                {"name": "HERALD", "subjects": ["herald.>"], "num_replicas": 3, "storage": "file"})
            assert time.time() < deadline, answer
            time.sleep(0.2) if "error" in answer else None
        for s in started[1:]:
            s.stop()
        wait_for("the whole /healthz kept answering 200", lambda: survivor.get("/healthz")[0] == 503, 30)
        wait_for("js-server-only kept answering 200",
                 lambda: survivor.get("/healthz?js-server-only=true")[0] == 503, 30)
        for _ in range(10):  # a few periods of the probe
            status, body = survivor.get(readiness)
            assert status == 200, (readiness, body, survivor.get("/healthz"))
            time.sleep(0.5)
        conn.sendall(b"SUB herald.chat.x 1\r\nPUB herald.chat.x 2\r\nhi\r\nPING\r\n")
        got = b""
        while b"PONG" not in got:
            got += conn.recv(4096)
        assert b"MSG herald.chat.x 1 2\r\nhi" in got, got
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz", "a starting server catches up first"


NAME_KEYS = {"name", "serviceAccountName", "serviceName", "secretName", "claimName"}


def non_string_names(node, path=""):
    """Names, label values and selectors in a rendered object that YAML
    reads as something other than a string (2024 an int, on a bool, 1e5 a
    float): the API server refuses them, or they name another object."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{path}.{k}"
            if k in NAME_KEYS and not isinstance(v, (str, dict, list)):
                found.append((here, v))
            elif k in ("labels", "matchLabels") or (k == "selector" and isinstance(v, dict)
                                                       and all(not isinstance(x, (dict, list)) for x in v.values())):
                found += [(f"{here}.{lk}", lv) for lk, lv in (v or {}).items() if not isinstance(lv, str)]
            else:
                found += non_string_names(v, here)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += non_string_names(v, f"{path}[{i}]")
    return found


@pytest.mark.parametrize("release,values", [
    ("2024", {}), ("123", {}), ("1e5", {}), ("on", {}), ("true", {}),
    ("live", {"fullnameOverride": "true"}), ("live", {"nameOverride": "on"}),
], ids=["2024", "123", "1e5", "on", "true", "fullnameOverride-true", "nameOverride-on"])
def test_names_that_read_as_numbers_or_bools_stay_strings(release, values, tmp_path):
    """A release named 2024 (or 123, 1e5, on, true) renders every name and
    label as a string, and its nats.conf runs: the server's name (the
    pod's) and the cluster's name are no number, date or bool to
    nats-server. Checked with `nats-server -t` and a real server started
    from the rendered config and arguments."""
    docs = render(values, name=release)
    for d in docs:
        assert not non_string_names({k: v for k, v in d.items() if k != "__template"}), (d["kind"], non_string_names(d))
    sts = one(docs, "StatefulSet")
    pod = f"{sts['metadata']['name']}-0"
    r = nats_config_test(docs, nats_conf(docs).replace("/var/run/nats/", f"{tmp_path}/"), tmp_path, pod)
    assert r.returncode == 0, r.stdout + r.stderr
    with nats_servers() as started:
        server = NatsServer(docs, 0, str(tmp_path / "s0"))
        started.append(server)
        server.wait_ready()
        varz = json.loads(server.get("/varz")[1])
        assert varz["server_name"] == pod
        assert varz["cluster"]["name"] == one(docs, "Deployment")["metadata"]["name"], varz["cluster"]
        # The documented reload (renewed certificates) reads the same name.
        subprocess.run(["nats-server", "--signal", f"reload={tmp_path}/s0/nats.pid"], check=True)
        wait_for("the reload never finished", lambda: server.logged("Reloaded server configuration")
                 or server.logged("Failed to reload"))
        assert not server.logged("Failed to reload"), "".join(server.log)


def test_the_largest_message_allowed_fits_what_nats_server_starts_with(tmp_path):
    """max_payload is config.maxMessageBytes plus 4 KiB of headers, and
    nats-server exits at start (though `-t` passes) with a max_payload above
    its max_pending, 64 MiB: the largest value the schema takes starts a
    real server, and one byte more is refused at render."""
    largest = 64 * 2**20 - 4096
    with pytest.raises(Exception, match="maxMessageBytes"):
        render({"config": {"maxMessageBytes": largest + 1}})
    docs = render({"config": {"maxMessageBytes": largest}, "nats": {"replicas": 1}})
    assert f"max_payload: {largest + 4096}" in nats_conf(docs)
    with nats_servers() as started:
        server = NatsServer(docs, 0, str(tmp_path))
        started.append(server)
        server.wait_ready()
        assert json.loads(server.get("/varz")[1])["max_payload"] == largest + 4096
