"""The bundled NATS as it would run: the rendered nats.conf and the
StatefulSet's env, in real nats-server processes on loopback, one per pod."""

import json
import os
import socket
import time

import pytest

from harness import CHART, NatsServer, by_kind, nats_servers, one, render, values_of, write_certs


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
