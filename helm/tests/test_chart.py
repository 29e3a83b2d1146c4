"""The Helm chart, rendered with Helm's own library (helm-python-sdk, no helm
binary), linted in strict mode, validated against the Kubernetes schemas of
two versions (kubernetes-validate, strict), and checked against the broker's
real flags. Also: a real node's /metrics passes `promtool check metrics`."""

import base64
import glob
import hashlib
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from harness import (CHART, CRDS, HERALD, KUBE_VERSIONS, OFFLINE_PASSWORDS, VALUES_FILES, StrictLoader, by_kind, herald_flags,
                     immutable_fields, kubelet_env, nats_conf, nats_config_test, offline, one, render, rendered_node, secret_env, seconds, values_of, write_certs)


@pytest.fixture(scope="module", params=VALUES_FILES, ids=lambda p: os.path.basename(p))
def case(request):
    values = values_of(request.param)
    return request.param, values, render(values)


def test_ci_values_cover_the_required_combinations():
    names = {os.path.basename(p) for p in VALUES_FILES}
    assert {"default-values.yaml", "external-nats-values.yaml", "autoscaling-values.yaml",
            "ingress-monitoring-values.yaml"} <= names


@pytest.mark.parametrize("path", [None] + VALUES_FILES, ids=lambda p: "chart-defaults" if p is None else os.path.basename(p))
def test_lint_is_clean_in_strict_mode(path):
    # Lint tolerates the chart's refusals (Helm's lint mode turns fail and
    # required into log lines): an offline render of bare defaults refuses to
    # generate NATS passwords, and lint still passes. Lint what renders.
    report = helm.lint(CHART, offline(values_of(path) if path else None), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
    assert not problems, problems


def test_every_object_is_valid_kubernetes(case):
    _, _, docs = case
    for version in KUBE_VERSIONS:
        for d in docs:
            if d["kind"] in CRDS:
                continue
            obj = {k: v for k, v in d.items() if k != "__template"}
            kubernetes_validate.validate(obj, version, strict=True)


def test_probes_ports_and_env_match_the_broker(case):
    _, values, docs = case
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    port = values.get("config", {}).get("port", 8080)
    assert c["ports"][0] == {"name": "http", "containerPort": port, "protocol": "TCP"}
    mport = values.get("config", {}).get("metricsPort", 9090)
    assert c["ports"][1] == {"name": "metrics", "containerPort": mport, "protocol": "TCP"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Probes never wait behind client admission on the public port.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == "metrics", probe
    cm = one(docs, "ConfigMap", suffix="live-herald")
    assert cm["data"]["HERALD_LISTEN"] == f"0.0.0.0:{port}"
    assert cm["data"]["HERALD_METRICS_LISTEN"] == f"0.0.0.0:{mport}"
    # Every variable the chart sets is one the broker reads.
    flags = herald_flags()
    assert set(cm["data"]) <= flags, set(cm["data"]) - flags
    assert c["env"][0]["name"] in flags
    # Non-root, read-only, no capabilities.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # A config change rolls the pods.
    assert re.fullmatch(r"[0-9a-f]{64}", dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"])
    svc = one(docs, "Service", suffix="live-herald")
    assert {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]} == {"http": "http"}
    metrics = one(docs, "Service", suffix="live-herald-metrics")
    assert {p["name"]: p["targetPort"] for p in metrics["spec"]["ports"]} == {"metrics": "metrics"}
    assert metrics["spec"]["type"] == "ClusterIP"


def test_drain_fits_in_the_grace_period(case):
    _, values, docs = case
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    cm = one(docs, "ConfigMap", suffix="live-herald")
    drain = seconds(cm["data"]["HERALD_DRAIN_PERIOD"])
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:2] == ["/usr/local/bin/herald", "sleep"]
    wait = seconds(pre_stop[2])
    # After the drain the binary waits up to 5 s each for sessions, HTTP
    # requests, the NATS flush and the NATS close (broker/src/server.rs).
    assert wait + drain + 4 * 5 < pod["terminationGracePeriodSeconds"]


def test_nats_url_is_wired_in_both_modes(case):
    _, values, docs = case
    cm = one(docs, "ConfigMap", suffix="live-herald")
    nats = values.get("nats", {})
    if nats.get("enabled", True):
        sts = one(docs, "StatefulSet")
        svc = one(docs, "Service", suffix="-nats")
        assert cm["data"]["HERALD_NATS_URL"] == f"nats://{svc['metadata']['name']}:4222"
        replicas = nats.get("replicas", 3)
        assert sts["spec"]["replicas"] == replicas
        conf = nats_conf(docs)
        env = kubelet_env(docs, sts["spec"]["template"]["spec"]["containers"][0], "live-herald-nats-0")
        listed = re.findall(r"^\s+\$(NATS_ROUTE_\d+)$", conf, re.M)
        routes = [re.fullmatch(r"nats://route:([^@]+)@live-herald-nats-(\d+)\.live-herald-nats-headless:6222",
                               env[name]) for name in listed]
        assert [m.group(2) for m in routes] == ([str(i) for i in range(replicas)] if replicas > 1 else [])
        # Each route URL carries the route password, which the routes port requires.
        assert all(m.group(1) == env["NATS_ROUTE_PASSWORD"] for m in routes)
        assert sts["spec"]["serviceName"] == "live-herald-nats-headless"
    else:
        assert cm["data"]["HERALD_NATS_URL"] == nats["url"]
        assert not by_kind(docs, "StatefulSet")


def test_optional_objects_appear_when_enabled(case):
    _, values, docs = case
    auto = values.get("autoscaling", {}).get("enabled", False)
    assert len(by_kind(docs, "HorizontalPodAutoscaler")) == int(auto)
    for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
        per_pod = values["autoscaling"].get("targetConnectionsPerPod", 0)
        pods = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert len(pods) == int(bool(per_pod))
        for m in pods:
            assert m["pods"]["metric"]["name"] == "herald_connections"  # a series the broker exports
            assert m["pods"]["target"]["averageValue"] == str(per_pod)
    dep = one(docs, "Deployment")
    assert ("replicas" in dep["spec"]) == (not auto)
    nats_on = values.get("nats", {}).get("enabled", True)
    pdbs = [d for d in by_kind(docs, "PodDisruptionBudget") if not d["metadata"]["name"].endswith("-nats")]
    assert len(pdbs) == int(values.get("podDisruptionBudget", {}).get("enabled", True))
    assert len(by_kind(docs, "Ingress")) == int(values.get("ingress", {}).get("enabled", False))
    exporter_on = nats_on and values.get("nats", {}).get("exporter", {}).get("enabled", False)
    assert len(by_kind(docs, "ServiceMonitor")) == int(values.get("serviceMonitor", {}).get("enabled", False)) * (
        1 + int(exporter_on))
    policy_on = values.get("networkPolicy", {}).get("enabled", False)
    nats_policy_on = nats_on and values.get("nats", {}).get("networkPolicy", {}).get("enabled", True)
    assert len(by_kind(docs, "NetworkPolicy")) == int(policy_on) + int(nats_policy_on)
    nats_pdb = [d for d in by_kind(docs, "PodDisruptionBudget") if d["metadata"]["name"].endswith("-nats")]
    assert len(nats_pdb) == int(nats_on)
    for pdb in nats_pdb:
        assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "nats"
    if nats_policy_on:
        pol = one(docs, "NetworkPolicy", suffix="-nats")
        rules = {r["ports"][0]["port"]: r for r in pol["spec"]["ingress"]}
        assert rules["client"]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "broker"
        assert [p["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                for p in [rules["cluster"]]] == ["nats"], "only NATS servers reach the routes port"
        exporter = values.get("nats", {}).get("exporter", {}).get("enabled", False)
        assert ("metrics" in [p["port"] for p in rules["monitor"]["ports"]]) == exporter
    for sm in by_kind(docs, "ServiceMonitor"):
        assert sm["spec"]["endpoints"][0]["port"] == "metrics"
        assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    for ing in by_kind(docs, "Ingress"):
        assert int(ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                # Metrics never go through the Ingress.
                assert path["backend"]["service"]["port"]["name"] == "http"
                assert not path["path"].startswith("/metrics")
    dash = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert len(dash) == int(values.get("grafanaDashboard", {}).get("enabled", False))
    for d in dash:
        assert json.loads(d["data"]["herald.json"])["uid"] == "herald"
        assert d["metadata"]["labels"]["grafana_dashboard"] == "1"
    secret_created = not values.get("auth", {}).get("existingSecret")
    nats_auth = values.get("nats", {}).get("auth", {})
    clustered = nats_on and values.get("nats", {}).get("replicas", 3) > 1
    nats_secret = nats_on and (nats_auth.get("enabled", True) or clustered) and not nats_auth.get("existingSecret")
    assert len(by_kind(docs, "Secret")) == int(secret_created) + int(nats_secret)
    if nats_secret:
        data = one(docs, "Secret", suffix="-nats-auth")["data"]
        assert base64.b64decode(data["nats-password"]).decode() == OFFLINE_PASSWORDS["password"]
        assert base64.b64decode(data["nats-route-password"]).decode() == OFFLINE_PASSWORDS["routePassword"]
    if nats_on:
        sts = one(docs, "StatefulSet")["spec"]["template"]["spec"]
        spread = sts["topologySpreadConstraints"][0]
        assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "nats"
        names = [c["name"] for c in sts["containers"]]
        assert names == ["nats"] + (["exporter"] if values.get("nats", {}).get("exporter", {}).get("enabled") else [])
    test_pod = [d for d in by_kind(docs, "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    assert len(test_pod) == 1 and test_pod[0]["spec"]["containers"][0]["args"][0] == "check"


def test_a_grace_period_too_short_for_the_drain_is_refused():
    with pytest.raises(Exception, match="terminationGracePeriodSeconds"):
        render({"config": {"drainSeconds": 30}, "terminationGracePeriodSeconds": 20})
    # The old rule's bound (preStop + drain + 5) left no room for the binary's own waits.
    with pytest.raises(Exception, match=r"at least preStopSeconds \+ config.drainSeconds \+ 25 = 35"):
        render({"terminationGracePeriodSeconds": 30})
    derived = one(render({"config": {"drainSeconds": 20}, "preStopSeconds": 8}), "Deployment")
    assert derived["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 8 + 20 + 30


def test_external_nats_requires_a_url():
    with pytest.raises(Exception, match="nats.url is required"):
        render({"nats": {"enabled": False, "auth": {"enabled": False}}})
    with pytest.raises(Exception, match="needs nats.auth.existingSecret"):
        render({"nats": {"enabled": False, "url": "nats://x:4222"}})


def test_dashboard_selects_a_namespace_and_a_release():
    with open(os.path.join(CHART, "dashboards", "herald.json")) as f:
        dash = json.load(f)
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "release"} <= names
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    series = [m for e in exprs for m in re.findall(r"herald_[a-z_]+(?:\{[^}]*\})?", e)]
    assert series and all('namespace="$namespace"' in s and "$release" in s for s in series), series


def test_dashboard_json_queries_real_metrics():
    with open(os.path.join(CHART, "dashboards", "herald.json")) as f:
        dash = json.load(f)
    names = set(re.findall(r"herald_[a-z_]+", json.dumps(dash)))
    text = live_metrics()
    exposed = set(re.findall(r"^(herald_[a-z_]+)", text, re.M))
    assert names <= exposed, names - exposed


def live_metrics():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nats_port = s.getsockname()[1]
    nats = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(nats_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node = subprocess.Popen([HERALD, "serve", "--listen", "127.0.0.1:0", "--log-level", "warn",
                             "--nats", f"nats://127.0.0.1:{nats_port}"], stdout=subprocess.PIPE, text=True)
    try:
        addr = node.stdout.readline().strip().rsplit(" ", 1)[1]
        deadline = time.time() + 10
        while True:
            text = urllib.request.urlopen(f"http://{addr}/metrics").read().decode()
            if "herald_nats_connected 1" in text or time.time() > deadline:
                return text
            time.sleep(0.05)
    finally:
        node.kill()
        node.wait()
        nats.kill()
        nats.wait()


def test_metrics_pass_promtool():
    text = live_metrics()
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_strict_loader_refuses_duplicate_keys():
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate"):
        list(yaml.load_all("labels:\n  a: 1\n  a: 2\n", Loader=StrictLoader))


def test_every_rendered_nats_config_passes_nats_server(case, tmp_path):
    path, values, docs = case
    if not values.get("nats", {}).get("enabled", True):
        return
    conf = nats_conf(docs)
    if "/etc/nats-tls/" in conf:
        write_certs(tmp_path)
        conf = conf.replace("/etc/nats-tls/", f"{tmp_path}/")
    sts = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    r = nats_config_test(docs, conf, tmp_path)
    assert r.returncode == 0, f"{os.path.basename(path)}: {r.stdout}{r.stderr}"
    pre_stop = sts["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop == ["nats-server", "--signal", "ldm=/var/run/nats/nats.pid"]
    payload = int(re.search(r"max_payload: (\d+)", conf).group(1))
    assert payload >= values.get("config", {}).get("maxMessageBytes", 65536) + 4096
    lame = seconds(re.search(r"lame_duck_duration: \"?([^\"\s]+)", conf).group(1))
    assert lame + 10 < sts["terminationGracePeriodSeconds"]


def test_the_test_pod_is_not_a_broker(case):
    _, values, docs = case
    pod = [d for d in by_kind(docs, "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"][0]
    labels = pod["metadata"]["labels"]

    def selects(selector):
        return all(labels.get(k) == v for k, v in selector.items())

    for pol in by_kind(docs, "NetworkPolicy"):
        assert not selects(pol["spec"]["podSelector"]["matchLabels"])
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        assert not selects(pdb["spec"]["selector"]["matchLabels"])
    dep = one(docs, "Deployment")["spec"]["template"]["spec"]
    for c in dep.get("topologySpreadConstraints", []):
        assert not selects(c["labelSelector"]["matchLabels"])
    assert not selects(one(docs, "Deployment")["spec"]["selector"]["matchLabels"])



def test_the_default_secret_leaves_publishing_open(tmp_path):
    """A real herald with the env the chart renders by default, linked to a
    real nats-server running the rendered config (with its password),
    accepts an HTTP publish without a key."""
    docs = render({})
    dep = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = secret_env(docs, dep)
    assert env.get("HERALD_API_KEY") == "", "the default Secret carries an empty key"
    assert env["HERALD_NATS_PASSWORD"] == OFFLINE_PASSWORDS["password"], "the NATS password reaches Herald"
    with rendered_node(docs, tmp_path) as (addr, _):
        # The public port keeps metrics to the metrics port.
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://{addr}/metrics")
        assert e.value.code == 404
        req = urllib.request.Request(f"http://{addr}/v1/publish", data=b'{"topic":"t","data":1}', method="POST")
        with urllib.request.urlopen(req) as r:
            assert r.status == 200
            assert json.loads(r.read())["published"] == 1


def test_the_test_pod_passes_with_auth_on(tmp_path):
    """With tokens on (ci/auth-values.yaml), a real herald with the rendered
    env and mounted keys refuses what it should, and the chart's test pod
    (its args and env, run with the real binary) still passes."""
    docs = render(values_of(os.path.join(CHART, "ci", "auth-values.yaml")))
    hmac = "k" * 48
    files = {"/etc/herald/auth/hmac": hmac + "\n",
             "/etc/herald/api-keys/api-keys": "# publishers\nkey-one\nkey-two\n"}
    with rendered_node(docs, tmp_path, files=files) as (addr, env):
        def post(headers):
            req = urllib.request.Request(f"http://{addr}/v1/publish", data=b'{"topic":"t","data":1}',
                                         method="POST", headers=headers)
            try:
                return urllib.request.urlopen(req).status
            except urllib.error.HTTPError as e:
                return e.code
        assert post({}) == 401, "API keys are configured"
        assert post({"Authorization": "Bearer key-two"}) == 200
        # A socket with no token may only read public topics.
        def handshake(query):
            with socket.create_connection(tuple(addr.rsplit(":", 1)[0:1]) + (int(addr.rsplit(":", 1)[1]),)) as s:
                s.sendall((f"GET /ws?{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
                return int(s.recv(1024).split(b" ")[1])
        assert handshake("sub=public:news") == 101
        assert handshake("sub=chat:x") == 403
        pod = [d for d in by_kind(docs, "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"][0]
        c = pod["spec"]["containers"][0]
        args = list(c["args"])
        args[args.index("--url") + 1] = f"ws://{addr}/ws"
        args = [str(tmp_path / a.lstrip("/")) if a.startswith("/etc/herald/") else a for a in args]
        assert "--token-key-file" in args
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/etc/herald/auth" in mounts
        check_env = {"PATH": os.environ["PATH"], **env}
        done = subprocess.run([HERALD, *args], env=check_env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr + done.stdout
        assert "ok:" in done.stdout


def test_auth_settings_need_their_secrets():
    with pytest.raises(Exception, match="secretName is required"):
        render({"auth": {"tokens": {"hmacKey": "hmac"}}})
    with pytest.raises(Exception, match="apiKeysFileKey"):
        render({"auth": {"apiKeysFileKey": "keys"}})


def test_every_herald_serve_setting_is_settable():
    """Every HERALD_* variable `herald serve` reads is set by the chart:
    the ConfigMap, or the Deployment's env (the API key, from the Secret).
    Optional ones are rendered when given."""
    docs = render({"config": {"presence": "chat:*", "rootTopic": "chat:lobby",
                              "allowedOrigins": ["https://app.example.com", "https://*.example.org"],
                              "exec": ["/count=/usr/local/bin/count", "/tail=tail -f /var/log/x"],
                              "execShell": ["/sh=echo a; echo b"], "rawStatus": "chat:*",
                              "history": "chat:*=100/10m"},
                   "auth": {"existingSecret": "s", "apiKeysFileKey": "keys",
                            "tokens": {"secretName": "t", "hmacKey": "h", "publicKey": "p", "jwksKey": "j",
                                       "audience": "a", "issuer": "i"},
                            "anonymousSubscribe": ["public:>"], "anonymousPublish": ["public:x"]},
                   "admission": {"trustedProxies": ["10.0.0.0/8"]},
                   "nats": {"tls": {"enabled": True, "secretName": "nats-tls"}}})
    cm = one(docs, "ConfigMap", suffix="live-herald")
    env = {e["name"] for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    missing = herald_flags() - set(cm["data"]) - env
    assert not missing, f"herald serve settings the chart cannot set: {sorted(missing)}"
    assert cm["data"]["HERALD_EXEC"] == "/count=/usr/local/bin/count\n/tail=tail -f /var/log/x"


def test_escape_hatches_land_where_they_should():
    values = values_of(os.path.join(CHART, "ci", "escape-hatches-values.yaml"))
    docs = render(values)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["priorityClassName"] == "herald-critical"
    assert {"name": "RUST_BACKTRACE", "value": "1"} in c["env"]
    assert c["env"][0]["name"] == "HERALD_API_KEY", "extra env comes after the chart's own"
    assert pod["volumes"] == values["extraVolumes"] and c["volumeMounts"] == values["extraVolumeMounts"]
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    nats = one(docs, "StatefulSet")["spec"]["template"]
    assert nats["metadata"]["annotations"]["example.com/team"] == "realtime"
    spec = nats["spec"]
    assert spec["priorityClassName"] == "nats-critical"
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["tolerations"] == values["nats"]["tolerations"]
    assert spec["affinity"] == values["nats"]["affinity"]
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    test_pod = [d for d in by_kind(docs, "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"][0]
    assert test_pod["spec"]["imagePullSecrets"] == [{"name": "registry"}], "helm test pulls the same image"


def test_bundled_nats_with_tls_and_a_password_links_for_real(tmp_path):
    """ci/nats-tls-values.yaml: the rendered NATS config (TLS on the client
    port, the generated password) run by a real nats-server, and a real
    herald with the rendered env (user, password, CA) links to it; a
    client without TLS or the password is refused."""
    docs = render(values_of(os.path.join(CHART, "ci", "nats-tls-values.yaml")))
    write_certs(tmp_path)
    ca = (tmp_path / "ca.crt").read_text()
    with rendered_node(docs, tmp_path, files={"/etc/herald/nats-tls/ca.crt": ca}) as (addr, env):
        assert env["HERALD_NATS_USER"] == "herald" and env["HERALD_NATS_TLS_CA"].endswith("ca.crt")
        port = int(env["HERALD_NATS_URL"].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            info = s.recv(4096).decode()
            assert '"tls_required":true' in info and '"auth_required":true' in info, info
            s.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
            answer = s.recv(4096)
            assert answer == b"" or b"-ERR" in answer, answer  # closed or refused, never PONG


def test_rendered_exec_presence_and_raw_status_settings_are_read_by_a_real_herald(tmp_path):
    """Settings the chart joins into one variable (exec routes, one a line)
    or renders from lists are parsed by a real herald as meant."""
    docs = render({"config": {"exec": ["/count=/bin/true", "/tail=tail -f /dev/null"],
                              "execShell": ["/sh=echo a; echo b"], "rawStatus": "chat:*",
                              "presence": "chat:*,room:>", "presenceBy": "user",
                              "presenceMaxMembers": 7, "rootTopic": "chat:lobby"},
                   "admission": {"maxConnectionsPerIp": 5, "trustedProxies": ["10.0.0.0/8", "127.0.0.1"]}})
    with rendered_node(docs, tmp_path) as (addr, _):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://{addr}/nope")
        hint = json.loads(e.value.read())["error"]["message"]
        for route in ("/count (WebSocket, --exec)", "/tail (WebSocket, --exec)", "/sh (WebSocket, --exec)"):
            assert route in hint, hint
        for topic in ("chat:lobby", "room:a:b"):
            with urllib.request.urlopen(f"http://{addr}/v1/presence/stats?topic={topic}") as r:
                assert json.loads(r.read())["clients"] == 0
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://{addr}/v1/presence?topic=news:x")
        assert e.value.code == 400


def test_history_runs_on_the_bundled_jetstream(tmp_path):
    """The bundled NATS renders JetStream on a volume per server, and a real
    nats-server running that config (store_dir pointed at a temp dir) with a
    real herald on the rendered env keeps history: a late subscriber gets
    what was published, with positions, over HTTP."""
    docs = render({"config": {"history": "chat:*=100/10m"}, "nats": {"replicas": 1}})
    sts = one(docs, "StatefulSet")
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    mounts = {m["name"]: m["mountPath"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["data"] == "/data"
    cm = one(docs, "ConfigMap", suffix="live-herald")["data"]
    assert cm["HERALD_HISTORY_REPLICAS"] == "1", "one server, one copy"
    assert one(render({"config": {"history": "a=1"}}), "ConfigMap", suffix="live-herald")["data"][
        "HERALD_HISTORY_REPLICAS"] == "3", "three servers, three copies"
    for i, d in enumerate(by_kind(docs, "ConfigMap")):
        if d["metadata"]["name"].endswith("-nats-config"):
            conf = d["data"]["nats.conf"].replace("store_dir: /data", f"store_dir: {tmp_path}/js")
            d["data"]["nats.conf"] = conf
    with rendered_node(docs, tmp_path) as (addr, _):
        deadline = time.time() + 10

        def readyz():
            # 503 until the node has reached its history stream once.
            try:
                return urllib.request.urlopen(f"http://{addr}/readyz").read()
            except urllib.error.HTTPError as e:
                return e.read()
        while b"stream available" not in readyz():
            assert time.time() < deadline, "the history stream never came up"
            time.sleep(0.05)
        for n in range(3):
            req = urllib.request.Request(f"http://{addr}/v1/publish", data=f'{{"topic":"chat:a","data":{n}}}'.encode(),
                                         method="POST")
            with urllib.request.urlopen(req) as r:
                assert r.status == 200
        page = json.loads(urllib.request.urlopen(f"http://{addr}/v1/history?topic=chat:a&since=0").read())
        assert [m["data"] for m in page["messages"]] == [0, 1, 2]
        assert page["complete"] is True
        assert [m["seq"] for m in page["messages"]] == sorted(m["seq"] for m in page["messages"])


def test_offline_renders_give_the_same_secret_or_say_what_to_set():
    """helm template, Argo CD and kustomize have no lookup: with nothing to
    read the passwords back from, the chart refuses and names the values
    (a generated password changed at every render, and Herald rolled onto
    one NATS did not have). With them set, two renders give the same
    Secret; a change rolls both workloads."""
    for values in ({}, {"nats": {"replicas": 1}}, {"nats": {"auth": {"password": OFFLINE_PASSWORDS["password"]}}}):
        with pytest.raises(Exception, match=r"set nats\.auth\.\w+.* or nats\.auth\.existingSecret"):
            render(values, passwords=False)
    assert by_kind(render({"nats": {"replicas": 1, "auth": {"enabled": False}}}, passwords=False), "Secret"), \
        "one server with no client password needs no NATS Secret, and renders"

    def pods(docs):
        return {d["kind"]: d["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
                for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    first, second = render({}), render({})
    assert one(first, "Secret", suffix="-nats-auth") == one(second, "Secret", suffix="-nats-auth")
    assert pods(first) == pods(second)
    other = render({"nats": {"auth": {"routePassword": "Another-route-password"}}})
    assert all(pods(other)[k] != v for k, v in pods(first).items()), "both workloads roll"
    named = render({"nats": {"auth": {"existingSecret": "nats-creds"}}}, passwords=False)
    assert not [d for d in by_kind(named, "Secret") if d["metadata"]["name"].endswith("-nats-auth")]
    env = {e["name"]: e for e in one(named, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NATS_ROUTE_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "nats-creds", "key": "nats-route-password"}
    with pytest.raises(Exception, match="pattern|does not match"):
        render({"nats": {"auth": {"password": "1k4-starts-with-a-digit"}}})


def test_nats_rolls_when_its_rendered_config_changes():
    """The StatefulSet's checksum/config is the rendered nats.conf's, so a
    setting outside .Values.nats that lands in it (max_payload follows
    config.maxMessageBytes) restarts the servers."""
    def checksum(docs):
        return one(docs, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    base = render({})
    assert checksum(base) == hashlib.sha256(nats_conf(base).rstrip("\n").encode()).hexdigest()
    bigger = render({"config": {"maxMessageBytes": 4 * 2**20}})
    assert "max_payload: 4198400" in nats_conf(bigger)
    assert checksum(bigger) != checksum(base)
    assert checksum(render({"replicaCount": 5})) == checksum(base), "a Herald-only change leaves NATS alone"


TYPOS = [{"replicaCont": 3}, {"service": {"tpye": "LoadBalancer"}}, {"ingress": {"enable": True}},
         {"autoscaling": {"maxReplica": 20}}, {"nats": {"replica": 5}}, {"probes": {"liveness": {"timeoutSecond": 5}}},
         {"networkPolicy": {"ingresFrom": []}}, {"nats": {"jetstream": {"storgeSize": "1Gi"}}},
         {"serviceMonitor": {"enabeld": True}}, {"image": {"tga": "1.0"}}, {"config": {"maxConections": 5}}]


@pytest.mark.parametrize("values", TYPOS, ids=lambda v: json.dumps(v, separators=(",", ":")))
def test_a_mistyped_key_is_refused_anywhere(values):
    """The whole values schema is closed: a mistyped key fails the install
    (and lint) instead of being ignored."""
    with pytest.raises(Exception, match="additional|not allowed"):
        render(values)
    report = helm.lint(CHART, offline(values), strict=True)
    assert report["errors"] or any(m["severity"] >= 2 for m in report["messages"]), report


def test_probes_take_every_timing_field():
    """probes.liveness.timeoutSeconds (and the other timing fields) land in
    the probe; liveness allows longer than readiness by default."""
    docs = render({"probes": {"liveness": {"timeoutSeconds": 7, "initialDelaySeconds": 4},
                              "readiness": {"successThreshold": 2}}})
    c = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert c["livenessProbe"]["timeoutSeconds"] == 7 and c["livenessProbe"]["initialDelaySeconds"] == 4
    assert c["readinessProbe"]["successThreshold"] == 2
    c = one(render({}), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    live, ready = c["livenessProbe"], c["readinessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > ready["periodSeconds"] * ready["failureThreshold"]


def test_the_schema_describes_every_value_and_closes_every_section():
    """Each key of values.yaml has a schema entry, and every object the chart
    defines (not the free-form maps and Kubernetes types it passes on)
    refuses keys it does not know."""
    with open(os.path.join(CHART, "values.yaml")) as f:
        values = yaml.safe_load(f)
    with open(os.path.join(CHART, "values.schema.json")) as f:
        schema = json.load(f)
    problems = []

    def walk(v, s, path):
        if not isinstance(v, dict) or "properties" not in s:
            return
        if s.get("additionalProperties") is not False:
            problems.append(f"{path or 'the top level'} is open")
        for k, x in v.items():
            if k not in s["properties"]:
                problems.append(f"{path}.{k} has no schema")
            else:
                walk(x, s["properties"][k], f"{path}.{k}")
    walk(values, schema, "")
    assert not problems, problems


@pytest.mark.parametrize("release", ["r" * 53, "herald-" + "x" * 46, "y" * 40 + "-herald"])
def test_a_53_character_release_name_fits_every_limit(release):
    """Helm allows release names of 53 characters. Every object's name
    stays within what Kubernetes takes: Services and the pods' host names
    63 (DNS labels), the StatefulSet 52 (its pods' controller-revision-hash
    label is the name, a dash and ten characters), every label value 63;
    names stay distinct, and what refers to them follows."""
    helm.validate_release_name(release)
    values = values_of(os.path.join(CHART, "ci", "ingress-monitoring-values.yaml"))
    values["nats"] = {"exporter": {"enabled": True}}
    docs = render(values, name=release)
    label = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
    for d in docs:
        name = d["metadata"]["name"]
        assert len(name) <= (52 if d["kind"] == "StatefulSet" else 63), (d["kind"], name, len(name))
        if d["kind"] in ("Service", "StatefulSet"):
            assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
        for k, v in d["metadata"].get("labels", {}).items():
            assert len(v) <= 63 and label.match(v), (k, v)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), names
    sts = one(docs, "StatefulSet")
    assert len(sts["metadata"]["name"]) + 1 + 10 <= 63, "controller-revision-hash"
    assert len(f"{sts['metadata']['name']}-{sts['spec']['replicas'] - 1}") <= 63, "pod host names"
    services = {d["metadata"]["name"] for d in by_kind(docs, "Service")}
    assert sts["spec"]["serviceName"] in services
    env = kubelet_env(docs, sts["spec"]["template"]["spec"]["containers"][0], sts["metadata"]["name"] + "-0")
    for n in range(sts["spec"]["replicas"]):
        assert f"@{sts['metadata']['name']}-{n}.{sts['spec']['serviceName']}:6222" in env[f"NATS_ROUTE_{n}"]
    cm = one(docs, "ConfigMap", suffix=one(docs, "Deployment")["metadata"]["name"])
    assert cm["data"]["HERALD_NATS_URL"].split("//")[1].split(":")[0] in services
    for version in KUBE_VERSIONS:
        for d in docs:
            if d["kind"] not in CRDS:
                kubernetes_validate.validate({k: v for k, v in d.items() if k != "__template"}, version, strict=True)


def test_merged_maps_have_each_key_once():
    """Maps the chart fills and values add to are merged, never
    concatenated: the strict loader (as kustomize) would refuse a key
    twice. An ingress annotation given in values wins over the chart's
    default; podLabels may add labels but not change the selector's."""
    docs = render({"ingress": {"enabled": True, "annotations": {
                       "nginx.ingress.kubernetes.io/proxy-read-timeout": "7200", "example.com/x": "y"}},
                   "podLabels": {"team": "rt", "app.kubernetes.io/component": "broker"},
                   "podAnnotations": {"checksum/config": "mine", "example.com/a": "b"},
                   "serviceMonitor": {"enabled": True, "labels": {"release": "prom", "app.kubernetes.io/name": "x"}},
                   "grafanaDashboard": {"enabled": True, "labels": {"grafana_dashboard": "1", "helm.sh/chart": "x"}},
                   "nats": {"podAnnotations": {"checksum/secret": "mine"}}})
    ann = one(docs, "Ingress")["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "7200"
    assert ann["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600" and ann["example.com/x"] == "y"
    pod = one(docs, "Deployment")["spec"]["template"]["metadata"]
    assert pod["labels"]["team"] == "rt" and pod["labels"]["app.kubernetes.io/component"] == "broker"
    assert pod["annotations"]["checksum/config"] != "mine", "the chart's checksums stay"
    assert pod["annotations"]["example.com/a"] == "b"
    assert one(docs, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]["checksum/secret"] != "mine"
    assert one(docs, "ServiceMonitor")["metadata"]["labels"]["release"] == "prom"
    with pytest.raises(Exception, match="podLabels may not set app.kubernetes.io/component"):
        render({"podLabels": {"app.kubernetes.io/component": "edge"}})


def scraped_services(docs, monitor):
    """The Services a ServiceMonitor finds targets on: its labels match, and
    they have the endpoint's port."""
    want = monitor["spec"]["selector"]["matchLabels"]
    port = monitor["spec"]["endpoints"][0]["port"]
    return [d["metadata"]["name"] for d in by_kind(docs, "Service")
            if all(d["metadata"]["labels"].get(k) == v for k, v in want.items())
            and port in [p["name"] for p in d["spec"]["ports"]]]


def test_metrics_stay_inside_the_cluster_and_both_components_are_scraped():
    """With service.type LoadBalancer the public Service carries the
    WebSocket port alone; metrics are on a ClusterIP Service of their own,
    and the policy admits them from pods of the cluster only. With the NATS
    exporter on, a second ServiceMonitor scrapes it, and the NATS policy
    admits its port."""
    values = values_of(os.path.join(CHART, "ci", "ingress-monitoring-values.yaml"))
    values["nats"] = {"exporter": {"enabled": True}}
    docs = render(values)
    public = one(docs, "Service", suffix="live-herald")
    assert public["spec"]["type"] == "LoadBalancer" and [p["name"] for p in public["spec"]["ports"]] == ["http"]
    policy = one(docs, "NetworkPolicy", suffix="live-herald")
    rule = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "metrics"][0]
    assert rule["from"] == [{"namespaceSelector": {}}], "any pod of the cluster, nothing outside it"
    monitors = {m["metadata"]["name"]: scraped_services(docs, m) for m in by_kind(docs, "ServiceMonitor")}
    assert monitors == {"live-herald": ["live-herald-metrics"], "live-herald-nats": ["live-herald-nats-headless"]}
    nats_policy = one(docs, "NetworkPolicy", suffix="-nats")
    monitor_rule = [r for r in nats_policy["spec"]["ingress"] if r["ports"][0]["port"] == "monitor"][0]
    assert "metrics" in [p["port"] for p in monitor_rule["ports"]]
    only = render({"networkPolicy": {"enabled": True, "metricsFrom": [{"podSelector": {"matchLabels": {"app": "prom"}}}]}})
    rule = [r for r in one(only, "NetworkPolicy", suffix="live-herald")["spec"]["ingress"]
            if r["ports"][0]["port"] == "metrics"][0]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app": "prom"}}}]
    with open(os.path.join(CHART, "values.yaml")) as f:
        assert "monitoring.serviceMonitor" not in f.read(), "values.yaml names a value that exists"


def test_external_nats_egress_follows_the_url_ports():
    docs = render({"networkPolicy": {"enabled": True},
                   "nats": {"enabled": False, "auth": {"existingSecret": "n"},
                            "url": "tls://nats.example.com:4443, nats://user:pw@nats-1.example.com:4222,nats://nats-2"}})
    egress = one(docs, "NetworkPolicy")["spec"]["egress"]
    nats = [r for r in egress if 53 not in [p["port"] for p in r["ports"]]][0]
    assert [p["port"] for p in nats["ports"]] == [4443, 4222]
    bundled = one(render({"networkPolicy": {"enabled": True}, "nats": {"clientPort": 4333}}), "NetworkPolicy",
                  suffix="live-herald")["spec"]["egress"]
    assert [p["port"] for p in bundled[1]["ports"]] == [4333]


@pytest.mark.parametrize("values,refusal", [
    ({"config": {"history": "chat:*=100", "historyBytes": 16 * 2**30}, "nats": {"jetstream": {"maxFileStore": "8GB"}}},
     r"config.historyBytes \(17179869184\) exceeds nats.jetstream.maxFileStore"),
    ({"config": {"history": "chat:*=100"}, "nats": {"jetstream": {"enabled": False}}},
     r"config.history needs JetStream"),
    ({"nats": {"jetstream": {"storageSize": "1Gi", "maxFileStore": "8GB"}}},
     r"maxFileStore \(8GB = 8589934592 bytes\) exceeds 90% of nats.jetstream.storageSize \(1Gi"),
    ({"config": {"history": "chat:*=100", "historyReplicas": 3}, "nats": {"replicas": 2}},
     r"config.historyReplicas \(3\) exceeds nats.replicas \(2\)"),
], ids=["history-bigger-than-the-store", "history-without-jetstream", "store-bigger-than-the-volume",
        "more-copies-than-servers"])
def test_history_the_bundled_nats_cannot_keep_is_refused(values, refusal):
    """Each rendered before, and the node then said `/readyz 200 ...
    history: jetstream stream unavailable` with no error logged."""
    with pytest.raises(Exception, match=refusal):
        render(values)


def test_the_store_defaults_to_90_percent_of_the_volume_and_history_that_fits_renders(tmp_path):
    """An empty maxFileStore is 90% of the volume: a file system holds less
    than its nominal size (metadata, ext4's reserved 5%), and a store of
    the volume's whole size filled the disk before JetStream's limit
    stopped it. historyBytes, and a maxFileStore given, must fit in it."""
    docs = render({"config": {"history": "chat:*=100", "historyBytes": 2**30},
                   "nats": {"jetstream": {"storageSize": "2Gi", "maxFileStore": ""}}})
    assert f"max_file_store: {2 * 2**30 * 9 // 10}\n" in nats_conf(docs)
    room = 10 * 2**30 * 9 // 10
    assert f"max_file_store: {room}\n" in nats_conf(render({"nats": {"jetstream": {"maxFileStore": ""}}}))
    render({"config": {"history": "chat:*=100", "historyBytes": room}, "nats": {"jetstream": {"maxFileStore": ""}}})
    render({"config": {"history": "chat:*=100"}, "nats": {"jetstream": {"maxFileStore": "9216MB"}}})
    with pytest.raises(Exception, match=r"config.historyBytes \(10737418240\) exceeds nats.jetstream.maxFileStore"):
        render({"config": {"history": "chat:*=100", "historyBytes": 10 * 2**30}, "nats": {"jetstream": {"maxFileStore": ""}}})
    with pytest.raises(Exception, match=r"maxFileStore \(10240MB = 10737418240 bytes\) exceeds 90% of"):
        render({"config": {"history": "chat:*=100"}, "nats": {"jetstream": {"maxFileStore": "10240MB"}}})
    r = nats_config_test(docs, nats_conf(docs), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_an_upgrade_from_0_1_0_changes_no_immutable_field():
    """immutable-0.1.0.json holds what chart 0.1.0 rendered, with each
    ci/*-values.yaml, of the fields Kubernetes will not change on an
    existing Deployment or StatefulSet; this chart renders the same, so
    `helm upgrade` from 0.1.0 goes through."""
    with open(os.path.join(os.path.dirname(__file__), "immutable-0.1.0.json")) as f:
        before = json.load(f)
    for name, fields in before.items():
        assert immutable_fields(render(values_of(os.path.join(CHART, "ci", name)))) == fields, name


def test_workload_and_service_settings_land_where_they_should():
    docs = render({
        "image": {"digest": "sha256:" + "a" * 64},
        "initContainers": [{"name": "wait", "image": "busybox"}],
        "extraContainers": [{"name": "logs", "image": "fluent-bit"}],
        "revisionHistoryLimit": 3,
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": "25%"}},
        "topologySpreadConstraints": [{"maxSkew": 2, "topologyKey": "example.com/rack",
                                       "whenUnsatisfiable": "DoNotSchedule"}],
        "autoscaling": {"enabled": True, "behavior": {"scaleDown": {"stabilizationWindowSeconds": 900}}},
        "podDisruptionBudget": {"minAvailable": "50%"},
        "service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "loadBalancerClass": "example.com/lb",
                    "loadBalancerSourceRanges": ["203.0.113.0/24"], "appProtocol": "kubernetes.io/ws"},
        "nats": {"noAdvertise": True, "resources": {"limits": {"memory": "1Gi"}}}})
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "herald:0.1.0@sha256:" + "a" * 64
    assert [c["name"] for c in pod["initContainers"]] == ["wait"]
    assert [c["name"] for c in pod["containers"]] == ["herald", "logs"]
    assert dep["spec"]["revisionHistoryLimit"] == 3 and dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == "25%"
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone", "example.com/rack"}
    for c in spread.values():
        assert c["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "broker"
        assert c["matchLabelKeys"] == ["pod-template-hash"]
    assert spread["example.com/rack"]["maxSkew"] == 2
    strict = one(render({"topologySpread": {"whenUnsatisfiable": "DoNotSchedule"}}), "Deployment")
    assert {c["topologyKey"]: c["whenUnsatisfiable"] for c in strict["spec"]["template"]["spec"][
        "topologySpreadConstraints"]} == {"kubernetes.io/hostname": "DoNotSchedule",
                                          "topology.kubernetes.io/zone": "ScheduleAnyway"}
    assert one(docs, "HorizontalPodAutoscaler")["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 900
    pdb = one(docs, "PodDisruptionBudget", suffix="live-herald")["spec"]
    assert pdb["minAvailable"] == "50%" and "maxUnavailable" not in pdb
    svc = one(docs, "Service", suffix="live-herald")["spec"]
    assert svc["externalTrafficPolicy"] == "Local" and svc["loadBalancerClass"] == "example.com/lb"
    assert svc["loadBalancerSourceRanges"] == ["203.0.113.0/24"] and svc["ports"][0]["appProtocol"] == "kubernetes.io/ws"
    assert "no_advertise: true" in nats_conf(docs)
    env = {e["name"]: e.get("value") for e in one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GOMEMLIMIT"] == str(2**30 * 8 // 10)
    for version in KUBE_VERSIONS:
        for d in docs:
            kubernetes_validate.validate({k: v for k, v in d.items() if k != "__template"}, version, strict=True)
    defaults = render({})
    assert one(defaults, "Deployment")["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert "no_advertise" not in nats_conf(defaults)
    assert one(render({"autoscaling": {"enabled": True}}), "HorizontalPodAutoscaler")["spec"]["behavior"][
        "scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]


def test_a_gateway_api_route_keeps_sockets_open():
    with pytest.raises(Exception, match="httpRoute.parentRefs"):
        render({"httpRoute": {"enabled": True}})
    docs = render({"httpRoute": {"enabled": True, "parentRefs": [{"name": "public", "namespace": "gw"}],
                                 "hostnames": ["live.example.com"], "paths": ["/ws", "/v1/publish"]}})
    route = one(docs, "HTTPRoute")["spec"]
    assert route["parentRefs"] == [{"name": "public", "namespace": "gw"}]
    rule = route["rules"][0]
    assert [m["path"]["value"] for m in rule["matches"]] == ["/ws", "/v1/publish"]
    assert rule["backendRefs"] == [{"name": "live-herald", "port": 80}]
    assert rule["timeouts"] == {"request": "0s", "backendRequest": "0s"}
    assert not by_kind(render({}), "HTTPRoute")


@pytest.mark.parametrize("memory,limit", [
    ("0.5Gi", 2**29), ("1.5Gi", 3 * 2**29), ("1e9", 10**9), ("1E9", 10**9), ("1G", 10**9), ("512M", 512 * 10**6),
    ("500Mi", 500 * 2**20), (".5Gi", 2**29), ("1.2345678901G", 1234567891), ("+2Gi", 2**31), (536870912, 2**29),
    ("100000000000m", 10**8), ("1Ei", 2**60),
])
def test_gomemlimit_is_80_percent_of_any_kubernetes_quantity(memory, limit):
    """The NATS container's GOMEMLIMIT is 80% of its memory limit in bytes,
    for every form Kubernetes takes: decimal fractions, exponents, binary
    and decimal suffixes, milli-units (rounded up to a byte), a plain
    number. 0.5Gi, 1e9 and 100000000000m gave "0", 1.5Gi 80% of 1 GiB."""
    docs = render({"nats": {"resources": {"limits": {"memory": memory}}}})
    env = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e["value"] for e in env if e["name"] == "GOMEMLIMIT"] == [str(limit * 8 // 10)]


@pytest.mark.parametrize("memory,refusal", [
    ("100m", r"nats.resources.limits.memory \(100m\) is only 1 bytes"),
    ("1Gx", "does not match pattern"), ("1.5 Gi", "does not match pattern"), ("-1Gi", "does not match pattern"),
])
def test_a_nats_memory_limit_that_is_no_usable_quantity_is_refused(memory, refusal):
    with pytest.raises(Exception, match=refusal):
        render({"nats": {"resources": {"limits": {"memory": memory}}}})


@pytest.mark.parametrize("nats,refusal", [
    ({"lameDuckDuration": "2m"}, r"nats.terminationGracePeriodSeconds \(60\) must exceed nats.lameDuckDuration \(2m = 120 s\)"),
    ({"lameDuckDuration": "50s"}, r"nats.terminationGracePeriodSeconds \(60\) must exceed nats.lameDuckDuration \(50s = 50 s\)"),
    ({"lameDuckDuration": "45s", "terminationGracePeriodSeconds": 55}, r"\(55\) must exceed .*set it to 56 or more"),
])
def test_a_nats_grace_period_shorter_than_lame_duck_mode_is_refused(nats, refusal):
    """values.yaml says the NATS pods' grace period must exceed
    lameDuckDuration plus its 10 s grace; a long lame duck mode rendered
    with the default 60 s, and the kubelet killed the server mid-way."""
    with pytest.raises(Exception, match=refusal):
        render({"nats": nats})


def test_a_nats_grace_period_that_covers_lame_duck_mode_renders():
    for nats, grace in (({"lameDuckDuration": "2m", "terminationGracePeriodSeconds": 131}, 131),
                        ({"lameDuckDuration": "49s"}, 60), ({}, 60)):
        sts = one(render({"nats": nats}), "StatefulSet")
        assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace


def test_the_client_password_may_not_be_the_route_password():
    """One key for both passwords: Herald's password (which every Herald
    pod holds) would open the routes, so anything with it could join."""
    with pytest.raises(Exception, match="passwordKey and nats.auth.routePasswordKey are both k"):
        render({"nats": {"auth": {"passwordKey": "k", "routePasswordKey": "k"}}})
    render({"nats": {"replicas": 1, "auth": {"passwordKey": "k", "routePasswordKey": "k"}}})  # no routes


@pytest.mark.parametrize("data,refusal", [
    ({"nats-password": "Herald-test-password-1", "nats-route-password": "Route-test-password-01"}, None),
    ({"nats-password": "1e5aaaaaaaaaaaaaaaaa", "nats-route-password": "Route-test-password-01"},
     "key nats-password of nats.auth.existingSecret creds breaks the rules"),
    ({"nats-password": "Herald-test-password-1", "nats-route-password": "Route/password@with:url-chars"},
     "key nats-route-password of nats.auth.existingSecret creds breaks the rules"),
    ({"nats-password": "Short1"}, "key nats-password of nats.auth.existingSecret creds breaks the rules"),
    ({"nats-password": "Herald-test-password-1"}, "creds has no key nats-route-password"),
], ids=["good", "digit-first", "url-characters", "short", "missing-route-key"])
def test_passwords_in_an_existing_secret_follow_the_rules(data, refusal, tmp_path):
    """The chart reads nats.auth.existingSecret with lookup where a cluster
    answers, and refuses passwords nats-server would misread (it parses
    $NATS_PASSWORD's value as config) or that break a route URL. The SDK
    renders without a cluster (lookup finds nothing), so the check is fed
    the Secret as lookup would return it, from a copy of the chart."""
    import shutil
    chart = tmp_path / "herald"
    shutil.copytree(CHART, chart)
    secret = json.dumps({"kind": "Secret", "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})
    (chart / "templates" / "zz-lookup.yaml").write_text(
        '{{- include "herald.nats.checkSecretPasswords" (list . (fromJson %s)) }}\n' % json.dumps(secret))
    values = {"nats": {"auth": {"existingSecret": "creds"}}}
    with helm.Chart.load(str(chart)) as c:
        if refusal is None:
            c.render(values, name="live", namespace="herald")
        else:
            with pytest.raises(Exception, match=refusal) as refused:
                c.render(values, name="live", namespace="herald")
            assert not [v for v in data.values() if v in str(refused.value)], "the refusal shows no password"
