#!/usr/bin/env python3
"""Many sockets on one box: a million, or as many as the machine allows.

Starts one nats-server and enough Herald nodes linked by it (one process
holds at most 20,000 descriptors here, so a node takes ~18,000 sockets),
then `herald-loadgen rooms` with one topic per socket (its `user:N`, here
`load:tN`) plus, through `--shared load:all`, one topic every socket holds:
the way real pages subscribe. Load workers run as separate processes, each
from its own source address (127.0.0.2, .3, ...). Measures:

- the time to connect and subscribe everyone, and connects per second;
- RSS per node and in total, and bytes per socket including each node's
  baseline; nats-server's RSS and CPU;
- one broadcast on `load:all`: publish to first and to last delivery, and
  how many sockets it reached;
- the p99 of 1,000 msg/s on the per-socket topics while everyone is held,
  and whether anything was lost;
- a clean shutdown: every node drains and exits 0.

Kernel settings the run depends on are read (and raised where this machine
lets us) and reported. Bounded in time; everything it starts is stopped by
PID. Not part of CI: CI runs the same code path at 10,000 sockets
(`loadgen/tests/smoke.rs`).

    python3 benches/million.py                      # 1,000,000 sockets
    python3 benches/million.py --sockets 100000 --out /tmp/m.md
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (shared helpers: install, ports, paths)
from storm import children, cpu_seconds, rss_kb  # noqa: E402
import threading  # noqa: E402

BEGIN, END = "<!-- million:begin -->", "<!-- million:end -->"
PER_PROCESS = 17_000  # sockets per node and per load worker (a node fits ~18,900 in 20,000 descriptors)

SYSCTLS = {
    "net.core.somaxconn": 65535,
    "net.ipv4.tcp_max_syn_backlog": 65535,
    "net.ipv4.ip_local_port_range": "1024 65535",
    "fs.file-max": 4_000_000,
    "net.netfilter.nf_conntrack_max": 2_000_000,
}


def sysctl_path(key):
    return "/proc/sys/" + key.replace(".", "/")


def kernel_settings():
    """Reads each setting, raises it where allowed; returns what happened."""
    rows = []
    for key, want in SYSCTLS.items():
        path = sysctl_path(key)
        if not os.path.exists(path):
            rows.append((key, "absent", "absent", "not in this kernel (no conntrack on loopback here)"))
            continue
        before = open(path).read().strip()
        after, note = before, "kept"
        try:
            with open(path, "w") as f:
                f.write(str(want))
            after = open(path).read().strip()
            note = "raised" if after != before else "already enough"
        except OSError as e:
            note = f"could not set: {e.strerror}"
        rows.append((key, before, after, note))
    for key in ("net.ipv4.tcp_mem", "fs.nr_open"):
        path = sysctl_path(key)
        if os.path.exists(path):
            v = open(path).read().strip()
            rows.append((key, v, v, "read only here"))
    return rows


def start_nats():
    port, mon = compare.free_port(), compare.free_port()
    conf = os.path.join(tempfile.gettempdir(), f"herald-million-nats-{port}.conf")
    with open(conf, "w") as f:
        f.write(f'listen: "127.0.0.1:{port}"\nhttp: "127.0.0.1:{mon}"\nmax_connections: 1000\n'
                "max_payload: 1MB\nmax_pending: 256MB\n")
    p = subprocess.Popen([compare.nats_path(), "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    compare.wait_port(port, p, "nats-server")
    return p, f"nats://127.0.0.1:{port}", mon


def start_nodes(n, nats_url):
    nodes = []
    for _ in range(n):
        port = compare.free_port()
        cmd = [compare.HERALD, "serve", "--listen", f"127.0.0.1:{port}", "--nats", nats_url,
               "--log-level", "warn", "--publish-rate", "0", "--ping-interval", "60s",
               "--drain-period", "2s"]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        compare.wait_port(port, p, "herald")
        nodes.append((p, port))
    deadline = time.time() + 60
    for _, port in nodes:
        while b"nats: connected" not in http_get(port, "/readyz"):
            if time.time() > deadline:
                raise SystemExit(f"node {port} never linked")
            time.sleep(0.1)
    return nodes


def http_get(port, path):
    import urllib.error
    import urllib.request
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read()
    except urllib.error.HTTPError as e:
        return e.read()
    except OSError:
        return b""


def run(sockets, rate, duration):
    settings = kernel_settings()
    n = max(2, math.ceil(sockets / PER_PROCESS))
    nats, nats_url, _ = start_nats()
    nodes = []
    try:
        t0 = time.time()
        nodes = start_nodes(n, nats_url)
        started = time.time() - t0
        nats_cpu0 = cpu_seconds(nats.pid)
        cmd = [compare.LOADGEN, "--json", "--workers", str(n), "--duration", duration, "--shared", "load:all"]
        for _, port in nodes:
            cmd += ["--url", f"ws://127.0.0.1:{port}/ws"]
        for p, _ in nodes:
            cmd += ["--server-pid", str(p.pid)]
        cmd += ["rooms", "--topics", str(sockets), "--subscribers-per-topic", "1",
                "--publishers", "1", "--rate", str(rate), "--size", "64"]
        print("+", " ".join(cmd[:12]), "...", file=sys.stderr)
        load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = {"load_kb": 0, "slab_kb": 0, "used_kb": 0, "stopped": None}
        done = threading.Event()

        def sample():
            while not done.wait(0.5):
                kb = sum(rss_kb(p) for p in [load.pid] + children(load.pid))
                mem = meminfo()
                peak["load_kb"] = max(peak["load_kb"], kb)
                peak["slab_kb"] = max(peak["slab_kb"], mem.get("Slab", 0))
                peak["used_kb"] = max(peak["used_kb"], mem.get("MemTotal", 0) - mem.get("MemAvailable", 0))
                # Bounded: stop before the OOM killer would pick a victim.
                if mem.get("MemAvailable", 1 << 40) < 1_500_000 and peak["stopped"] is None:
                    peak["stopped"] = f"memory: {mem['MemAvailable'] // 1024} MiB left"
                    print(f"million: stopping the load, {peak['stopped']}", file=sys.stderr)
                    load.terminate()
        threading.Thread(target=sample, daemon=True).start()
        stdout, stderr = load.communicate(timeout=1800)
        done.set()
        out = subprocess.CompletedProcess(cmd, load.returncode, stdout, stderr)
        if out.returncode != 0:
            print(out.stderr[-4000:], file=sys.stderr)
        report = json.loads(out.stdout) if out.stdout.strip() else None
        nodes_rss = [rss_kb(p.pid) for p, _ in nodes]
        nats_rss, nats_cpu = rss_kb(nats.pid), cpu_seconds(nats.pid) - nats_cpu0
        # A clean shutdown: every node drains and exits 0.
        t1 = time.time()
        for p, _ in nodes:
            p.terminate()
        codes = [p.wait(timeout=120) for p, _ in nodes]
        shutdown = time.time() - t1
        return {"settings": settings, "nodes": n, "start_s": started, "report": report,
                "stderr": out.stderr[-2000:], "nodes_rss_kb": nodes_rss, "nats_rss_kb": nats_rss,
                "nats_cpu_s": nats_cpu, "exit_codes": codes, "shutdown_s": shutdown, "peak": peak}
    finally:
        for p, _ in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
        nats.terminate()
        nats.wait()


def hops(b):
    """Where the broadcast's time goes: NATS hands it to each node (its
    first delivery there), then each node fans it out (first to last)."""
    nodes = [n for n in b.get("nodes", []) if n["reached"]]
    if not nodes:
        return []
    firsts = sorted(n["first_ms"] for n in nodes)
    spans = sorted(n["last_ms"] - n["first_ms"] for n in nodes)
    return [f"| hop 1, publish → NATS → each node's first delivery | {firsts[0]:.0f}–{firsts[-1]:.0f} ms "
            f"(median {firsts[len(firsts) // 2]:.0f}) |",
            f"| hop 2, one node's fan-out (its first to last delivery) | median {spans[len(spans) // 2]:.0f} ms, "
            f"longest {spans[-1]:.0f} ms ({len(nodes)} nodes, ~{sum(n['reached'] for n in nodes) // len(nodes):,} "
            "sockets each) |"]


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0])
    return out


def section(sockets, rate, duration, r):
    rep = r["report"] or {}
    b = rep.get("broadcast") or {}
    connected = rep.get("connected", 0)
    total_kb = sum(r["nodes_rss_kb"])
    L = [BEGIN, f"## {sockets:,} sockets on one machine\n",
         f"Produced by `python3 benches/million.py --sockets {sockets}"
         f"{'' if duration == '10s' else ' --duration ' + duration}` on {time.strftime('%Y-%m-%d')}: "
         f"one nats-server, {r['nodes']} Herald nodes linked by it, and `herald-loadgen --workers {r['nodes']} "
         f"--duration {duration} --shared load:all rooms --topics {sockets} --subscribers-per-topic 1 "
         f"--publishers 1 --rate {rate}`: every socket subscribes its own topic (`load:tN`, a `user:N`) and "
         "the shared `load:all` in its URL; each load worker uses its own source address. Machine: "
         f"{compare.machine()}.\n",
         "| figure | value |", "|---|---|",
         *([f"| **stopped early** | {r['peak']['stopped']} |"] if r["peak"].get("stopped") else []),
         f"| sockets connected | {connected:,} of {sockets:,} ({rep.get('connect_errors', 0):,} failed; "
         f"{rep.get('connect_retries', 0):,} handshakes answered 503 by a node shedding the storm, and retried) |",
         f"| time to connect and subscribe everyone | {rep.get('connect_ms', 0) / 1000:.1f} s "
         f"({connected / max(1e-9, rep.get('connect_ms', 0) / 1000):,.0f} sockets/s) |",
         f"| NATS interests | {2 * connected:,} socket subscriptions over {r['nodes']} nodes |",
         f"| RSS of the nodes | {total_kb / 1024:,.0f} MiB in all, {min(r['nodes_rss_kb']) / 1024:.0f}–"
         f"{max(r['nodes_rss_kb']) / 1024:.0f} MiB per node |",
         f"| bytes per socket (every node's baseline included) | {total_kb * 1024 / max(1, connected):,.0f} |",
         f"| nats-server RSS, CPU over the run | {r['nats_rss_kb'] / 1024:,.0f} MiB, {r['nats_cpu_s']:.1f} s |",
         f"| load workers' peak RSS (the clients, same machine) | {r['peak']['load_kb'] / 1024:,.0f} MiB |",
         f"| kernel slab, memory in use: peak | {r['peak']['slab_kb'] / 1024:,.0f} MiB, "
         f"{r['peak']['used_kb'] / 1024:,.0f} MiB |",
         f"| one broadcast on `load:all`: publish to first delivery | {b.get('first_ms', 0):.0f} ms |",
         f"| publish to last delivery | {b.get('last_ms', 0):.0f} ms |",
         f"| sockets it reached | {b.get('reached', 0):,} of {connected:,} |",
         *hops(b),
         f"| {rate} msg/s on per-socket topics: delivered / expected | {rep.get('delivered', 0):,} / "
         f"{rep.get('expected', 0):,} |",
         f"| their p50, p99 | {compare.lat(rep, 'p50') if rep else '—'}, {compare.lat(rep, 'p99') if rep else '—'} |",
         f"| clean shutdown | {sum(1 for c in r['exit_codes'] if c == 0)} of {r['nodes']} nodes exited 0 "
         f"in {r['shutdown_s']:.1f} s |",
         "", "Kernel settings:", "", "| setting | before | after | |", "|---|---|---|---|"]
    for key, before, after, note in r["settings"]:
        L.append(f"| `{key}` | {before} | {after} | {note} |")
    L += ["", END]
    return L


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sockets", type=int, default=1_000_000)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--duration", default="10s")
    ap.add_argument("--out", default=os.path.join(compare.ROOT, "docs", "benchmarks.md"))
    a = ap.parse_args()
    compare.install()
    r = run(a.sockets, a.rate, a.duration)
    print(json.dumps({k: v for k, v in r.items() if k != "report"}, indent=2), file=sys.stderr)
    compare.splice(a.out, section(a.sockets, a.rate, a.duration, r), BEGIN, END)


if __name__ == "__main__":
    main()
