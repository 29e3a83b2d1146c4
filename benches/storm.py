#!/usr/bin/env python3
"""The reconnect storm: a node dies under 100,000 sockets.

Starts nats-server, seven Herald nodes linked by it, and three HAProxy
instances in front of the nodes (one HAProxy holds at most ~8,000 proxied
connections under this machine's 20,000-descriptor limit). Then:

1. `herald-loadgen storm` opens 100,000 idle subscribed sockets straight to
   the nodes (six workers, each from its own 127.0.0.x address), each of
   which reconnects through the HAProxies, with up to 2 s of jitter, when
   its node goes away;
2. a probe (`herald-loadgen fanout`: 200 subscribers on the second node,
   200 msg/s) runs once while all is calm, for the baseline p99;
3. the probe runs again, and one second in the first node is SIGKILLed;
   its clients' reconnects land on the survivors while the probe runs.

Reports the time from the first lost socket to the last one subscribed
again, the survivors' peak RSS and CPU during the storm, refused attempts,
"accept failed" lines in the nodes' logs (want 0), and the probe's p99
calm and under the storm. Writes its section of docs/benchmarks.md.

    python3 benches/storm.py               # 100,000 sockets, 7 nodes
    python3 benches/storm.py --sockets 20000 --out /tmp/storm.md

Seven nodes, not six: each node holds at most ~18,900 sockets (its
descriptor limit less a reserve), so the ~83,000 sockets left after a kill
plus the ~17,000 reconnecting cannot fit in five survivors.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (shared helpers: install, ports, paths)

BEGIN, END = "<!-- storm:begin -->", "<!-- storm:end -->"


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Peak summed RSS of some processes, sampled every 100 ms."""

    def __init__(self, pids):
        super().__init__(daemon=True)
        self.pids, self.peak, self.stop = pids, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, sum(rss_kb(p) for p in self.pids))
            time.sleep(0.1)


def start_haproxy(port, backends, tmp):
    servers = "".join(f"  server h{i} 127.0.0.1:{p} check inter 300ms fall 2 rise 2 maxconn 6000\n"
                      for i, p in enumerate(backends))
    cfg = ("global\n  maxconn 8000\n"
           "defaults\n  mode http\n  maxconn 8000\n  timeout connect 2s\n  timeout client 120s\n"
           "  timeout server 120s\n  timeout tunnel 1h\n  retries 3\n  option redispatch\n"
           f"frontend fe\n  bind 127.0.0.1:{port}\n  default_backend nodes\n"
           "backend nodes\n  balance leastconn\n  option httpchk GET /readyz\n" + servers)
    path = os.path.join(tmp, f"haproxy-{port}.cfg")
    with open(path, "w") as f:
        f.write(cfg)
    subprocess.run(["haproxy", "-c", "-f", path], check=True, capture_output=True)
    p = subprocess.Popen(["haproxy", "-db", "-f", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    compare.wait_port(port, p, "haproxy")
    return p


def probe(url, pid, duration):
    cmd = [compare.LOADGEN, "--json", "--url", url, "--server-pid", str(pid), "--duration", duration,
           "fanout", "--subscribers", "200", "--publishers", "1", "--rate", "200"]
    print("+", " ".join(cmd), file=sys.stderr)
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sockets", type=int, default=100_000)
    ap.add_argument("--nodes", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(compare.ROOT, "docs", "benchmarks.md"))
    a = ap.parse_args()
    compare.install()
    tmp = tempfile.mkdtemp(prefix="herald-storm-")
    procs, logs = [], []
    try:
        nats_port = compare.free_port()
        nats = subprocess.Popen([compare.nats_path(), "-a", "127.0.0.1", "-p", str(nats_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(nats)
        compare.wait_port(nats_port, nats, "nats-server")
        nodes, ports = [], []
        for i in range(a.nodes):
            port = compare.free_port()
            log = open(os.path.join(tmp, f"node{i}.log"), "w")
            logs.append(log.name)
            p = subprocess.Popen([compare.HERALD, "serve", "--listen", f"127.0.0.1:{port}", "--log-level", "warn",
                                  "--nats", f"nats://127.0.0.1:{nats_port}"],
                                 stdout=subprocess.DEVNULL, stderr=log)
            compare.wait_port(port, p, "herald")
            nodes.append(p)
            ports.append(port)
        procs += nodes
        proxies = []
        for _ in range(3):
            port = compare.free_port()
            proxies.append((port, start_haproxy(port, ports, tmp)))
        procs += [p for _, p in proxies]
        time.sleep(1.5)  # links up, health checks passed
        workers = 6
        cmd = [compare.LOADGEN, "--json", "--workers", str(workers), "--duration", "40s"]
        for port in ports:
            cmd += ["--url", f"ws://127.0.0.1:{port}/ws"]
        cmd += ["storm", "--sockets", str(a.sockets), "--jitter", "2s"]
        for port, _ in proxies:
            cmd += ["--reconnect-url", f"ws://127.0.0.1:{port}/ws"]
        print("+", " ".join(cmd), file=sys.stderr)
        storm = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in storm.stderr:
            sys.stderr.write(line)
            if line.startswith("herald-loadgen: go"):
                break
        threading.Thread(target=lambda: [sys.stderr.write(x) for x in storm.stderr], daemon=True).start()
        survivors = [p.pid for p in nodes[1:]]
        calm = probe(f"ws://127.0.0.1:{ports[1]}/ws", nodes[1].pid, "8s")
        sampler = Sampler(survivors)
        cpu_before = sum(cpu_seconds(p) for p in survivors)
        rss_before = sum(rss_kb(p) for p in survivors)
        sampler.start()
        killer = threading.Timer(1.0, lambda: nodes[0].kill())
        killer.start()
        stormy = probe(f"ws://127.0.0.1:{ports[1]}/ws", nodes[1].pid, "8s")
        cpu_storm = sum(cpu_seconds(p) for p in survivors) - cpu_before
        sampler.stop.set()
        report = json.loads(storm.communicate(timeout=120)[0])
        accept_failed = sum(open(path).read().count("accept failed") for path in logs)
        result = {
            "sockets": a.sockets, "nodes": a.nodes, "connected": report["connected"],
            "connect_errors": report["connect_errors"], "storm": report["storm"],
            "recovery_ms": report.get("storm_recovery_ms"), "accept_failed": accept_failed,
            "survivor_rss_before_kb": rss_before, "survivor_rss_peak_kb": sampler.peak,
            "survivor_cpu_during_probe_s": cpu_storm,
            "probe_calm": {"p50": calm["latency_us"]["p50"], "p99": calm["latency_us"]["p99"],
                           "delivered": calm["delivered"], "expected": calm["expected"]},
            "probe_storm": {"p50": stormy["latency_us"]["p50"], "p99": stormy["latency_us"]["p99"],
                            "delivered": stormy["delivered"], "expected": stormy["expected"]},
        }
        print(json.dumps(result, indent=2))
        write(a.out, result, " ".join(sys.argv[1:]))
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def write(path, r, args):
    st = r["storm"]
    ms = r["recovery_ms"]
    cmd = f"python3 benches/storm.py {args}".strip()
    lines = [BEGIN, f"## A node dies under {r['sockets']:,} sockets\n",
             f"Produced by `{cmd}` on {time.strftime('%Y-%m-%d')}: "
             f"{r['nodes']} Herald nodes linked by one nats-server, three HAProxy instances in front; "
             f"{r['sockets']:,} idle subscribed sockets straight to the nodes; then the first node is "
             "SIGKILLed and its clients reconnect through the HAProxies with up to 2 s of jitter. A probe "
             "(200 subscribers on a survivor, 200 msg/s) runs calm, then through the storm.\n",
             "| figure | value |", "|---|---|",
             f"| sockets connected before the kill | {r['connected']:,} ({r['connect_errors']} failed) |",
             f"| sockets lost with the node | {st['lost']:,} |",
             f"| subscribed again | {st['reconnected']:,} |",
             f"| first loss to last resubscribe | {ms / 1000:.1f} s |" if ms else "| first loss to last resubscribe | — |",
             f"| refused or failed attempts on the way | {st['failed_attempts']:,} |",
             f"| `accept failed` in the nodes' logs | {r['accept_failed']} |",
             f"| survivors' RSS: before, peak | {r['survivor_rss_before_kb'] / 1024:.0f} MiB, "
             f"{r['survivor_rss_peak_kb'] / 1024:.0f} MiB |",
             f"| survivors' CPU during the 8 s storm probe | {r['survivor_cpu_during_probe_s']:.1f} s |",
             f"| probe p99, calm | {r['probe_calm']['p99'] / 1000:.1f} ms "
             f"({r['probe_calm']['delivered']} / {r['probe_calm']['expected']} delivered) |",
             f"| probe p99, through the storm | {r['probe_storm']['p99'] / 1000:.1f} ms "
             f"({r['probe_storm']['delivered']} / {r['probe_storm']['expected']} delivered) |",
             "", END]
    text = open(path).read() if os.path.exists(path) else ""
    block = "\n".join(lines)
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    elif "## Micro-benchmarks" in text:
        text = text.replace("## Micro-benchmarks", block + "\n\n## Micro-benchmarks", 1)
    else:
        text += "\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
