"""Hostile input, round 3: the figures of issue 24's items 2, 7, 8, 14
and 19, for two builds of Herald side by side in one run (a build from
before the fixes, and this one). Called by `compare.py --section hostile
--before BIN`; each figure is measured on a fresh node of each build.

Every client here is raw Python on loopback: the measures are about what
one hostile client makes the node do, not about throughput.
"""
import base64
import json
import os
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One `herald serve` on loopback, stopped by PID."""

    def __init__(self, binary, args, metrics=False):
        self.port = free_port()
        self.mport = free_port() if metrics else None
        cmd = [binary, "serve", "--listen", f"127.0.0.1:{self.port}", "--log-level", "error"] + list(args)
        if metrics:
            cmd += ["--metrics-listen", f"127.0.0.1:{self.mport}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"herald did not start: {cmd}")
        self.base = f"http://127.0.0.1:{self.port}"

    def cpu(self):
        """User plus system CPU seconds so far."""
        f = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def rss(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def post(self, path, body):
        req = urllib.request.Request(self.base + path, data=body.encode(), method="POST")
        return urllib.request.urlopen(req, timeout=30).read()

    def get(self, path, port=None):
        url = f"http://127.0.0.1:{port or self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class WS:
    """A minimal WebSocket client: masked text frames out, pings answered."""

    def __init__(self, port, path="/ws"):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.s.sendall((f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = self.s.recv(4096)
            if not d:
                raise RuntimeError("refused")
            buf += d
        head, self.buf = buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(head.split(b"\r\n")[0].decode())

    def send(self, text, op=1):
        p = text.encode() if isinstance(text, str) else text
        m = os.urandom(4)
        n = len(p)
        h = bytes([0x80 | op]) + (bytes([0x80 | n]) if n < 126 else
                                  bytes([0xFE]) + struct.pack(">H", n) if n < 65536 else
                                  bytes([0xFF]) + struct.pack(">Q", n))
        self.s.sendall(h + m + bytes(b ^ m[i % 4] for i, b in enumerate(p)))

    def frame(self):
        while True:
            b = self.buf
            if len(b) >= 2:
                n, o = b[1] & 127, 2
                if n == 126 and len(b) >= 4:
                    n, o = struct.unpack(">H", b[2:4])[0], 4
                elif n == 127 and len(b) >= 10:
                    n, o = struct.unpack(">Q", b[2:10])[0], 10
                if n < 126 or o > 2:
                    if len(b) >= o + n:
                        op, p = b[0] & 15, b[o:o + n]
                        self.buf = b[o + n:]
                        if op == 9:
                            self.send(p, 10)
                            continue
                        return op, p
            d = self.s.recv(65536)
            if not d:
                return None, b""
            self.buf += d

    def text(self):
        while True:
            op, p = self.frame()
            if op is None or op == 8:
                return None
            if op == 1:
                return p.decode()

    def close(self):
        self.s.close()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def ms(x):
    return f"{x * 1000:.1f} ms" if x >= 0.001 else f"{x * 1e6:.0f} µs"


# -- item 2: CPU per refused bad-token handshake -------------------------------

def bad_tokens(binary, count):
    """`count` handshakes in a row from one address, each with an ES384
    token whose signature is wrong, against a P-384 key: the statuses, and
    node CPU per handshake."""
    d = tempfile.mkdtemp(prefix="herald-bench-p384-")
    key, pub = os.path.join(d, "k.pem"), os.path.join(d, "p.pem")
    subprocess.run(["openssl", "ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out", key], check=True)
    subprocess.run(["openssl", "ec", "-in", key, "-pubout", "-out", pub], check=True, capture_output=True)

    def b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    claims = {"sub": "x", "exp": int(time.time()) + 3600, "herald": {"subscribe": [">"]}}
    token = b64(b'{"alg":"ES384","typ":"JWT"}') + "." + b64(json.dumps(claims).encode()) + "." + b64(os.urandom(96))
    n = Node(binary, ["--auth-public-key-file", pub, "--connect-rate-per-ip", "20"])
    try:
        statuses = {}
        before = n.cpu()
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", n.port), timeout=10)
            s.sendall((f"GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
            line = s.recv(4096).split(b"\r\n")[0].decode()
            s.close()
            code = line.split()[1] if len(line.split()) > 1 else "none"
            statuses[code] = statuses.get(code, 0) + 1
        return statuses, (n.cpu() - before) / count
    finally:
        n.stop()


# -- item 7: bytes per history topic and per message against the cap ----------

CAP = 2_000_000


def history_memory(binary, topics, messages):
    """RSS grown by `topics` distinct history topics of one byte each, and,
    on a fresh node, by `messages` one-byte messages on one topic, under
    `--history-bytes 2000000`."""
    out = []
    for rule, count, make in (("t:>=1", topics, lambda i: f"t:{i}"),
                              (f"t:>={messages}", messages, lambda i: "t:one")):
        n = Node(binary, ["--history", rule, "--history-bytes", str(CAP), "--publish-rate", "0"])
        try:
            n.post("/v1/publish", json.dumps([{"topic": "warm", "data": 1}]))
            base = n.rss()
            for start in range(0, count, 1000):
                items = [{"topic": make(i), "data": 1} for i in range(start, min(count, start + 1000))]
                n.post("/v1/publish", json.dumps(items))
            time.sleep(0.5)
            grown = n.rss() - base
            out.append((grown / count, grown))
        finally:
            n.stop()
    return out


# -- item 8: an unrelated socket's heartbeat while recoveries run ---------------

def recoveries_heartbeat(binary, topics, seconds):
    """`topics` history topics of one message each; four sockets loop
    `sub since`/`unsub` on one concrete topic while an unrelated socket
    sends the heartbeat word every 20 ms and /healthz is asked every
    100 ms: the round trips."""
    n = Node(binary, ["--history", "t:>=1", "--history-bytes", str(1 << 30), "--publish-rate", "0",
                      "--subscribe-rate", "0"])
    try:
        for start in range(0, topics, 1000):
            items = [{"topic": f"t:{i}", "data": 1} for i in range(start, min(topics, start + 1000))]
            n.post("/v1/publish", json.dumps(items))
        _, page = n.get("/v1/history?topic=t:5&since=0")
        page = json.loads(page)
        since = {"seq": page["messages"][0]["seq"] - 1, "epoch": page["epoch"]}
        stop = time.time() + seconds
        done = [0]

        def loop():
            c = WS(n.port)
            while time.time() < stop:
                c.send(json.dumps({"op": "sub", "topic": "t:5", "id": 1, "since": since}))
                while True:
                    t = c.text()
                    if t is None or '"id":1' in t:
                        break
                c.send(json.dumps({"op": "unsub", "topic": "t:5", "id": 2}))
                while True:
                    t = c.text()
                    if t is None or '"id":2' in t:
                        break
                done[0] += 1
            c.close()
        threads = [threading.Thread(target=loop) for _ in range(4)]
        for t in threads:
            t.start()
        hz = []

        def probe():
            while time.time() < stop:
                t0 = time.time()
                n.get("/healthz")
                hz.append(time.time() - t0)
                time.sleep(0.1)
        p = threading.Thread(target=probe)
        p.start()
        c = WS(n.port)
        rtts = []
        while time.time() < stop:
            t0 = time.time()
            c.send("HeartBeat")
            while c.text() != "HeartBeat":
                pass
            rtts.append(time.time() - t0)
            time.sleep(0.02)
        for t in threads + [p]:
            t.join()
        c.close()
        return rtts, hz, done[0]
    finally:
        n.stop()


# -- item 14: presence answers per second per socket ----------------------------

def presence_rate(binary, members, seconds):
    """`members` sockets on a presence topic; one socket sends presence
    requests as fast as it can (a window of 32 in flight): answers and
    refusals per second."""
    n = Node(binary, ["--presence", "room:*"])
    try:
        held = [WS(n.port, f"/ws?sub=room:a&name=member{i:04}") for i in range(members)]
        c = WS(n.port)
        ok = refused = sent = 0
        end = time.time() + seconds
        inflight = 0
        while time.time() < end:
            while inflight < 32:
                c.send(json.dumps({"op": "presence", "topic": "room:a", "id": sent}))
                sent += 1
                inflight += 1
            t = c.text()
            if t is None:
                break
            if '"rate_limited"' in t:
                refused += 1
                inflight -= 1
            elif '"members"' in t:
                ok += 1
                inflight -= 1
        c.close()
        for h in held:
            h.close()
        return ok / seconds, refused / seconds
    finally:
        n.stop()


# -- item 19: /healthz on the metrics listener under an idle flood -------------

def healthz_flood(binary, conns):
    """`conns` idle TCP connections to the public port, then /healthz on
    the metrics listener."""
    n = Node(binary, [], metrics=True)
    held = []
    try:
        for _ in range(conns):
            held.append(socket.create_connection(("127.0.0.1", n.port), timeout=10))
        time.sleep(0.5)
        t0 = time.time()
        status, _ = n.get("/healthz", port=n.mport)
        return status, time.time() - t0
    finally:
        for s in held:
            s.close()
        n.stop()


def section(before, after, quick):
    """The extended rows of the hostile section, before and after."""
    builds = [("before", before), ("after", after)]
    hs = 150 if quick else 600
    topics = 20_000 if quick else 100_000
    messages = 100_000 if quick else 1_000_000
    rec_topics = 100_000 if quick else 1_000_000
    secs = 3 if quick else 10
    L = ["", "### Round 3 of hostile input: before and after",
         "",
         "Each figure on a fresh node of each build, one build after the other in one run: `before` is "
         "the commit before the fixes of the hostile-input round 3, `after` this one "
         "(`python3 benches/compare.py --section hostile3 --before BEFORE/herald --after target/ci/herald`, "
         "both built with `cargo build --profile ci`; the two cores were shared with other work).",
         "",
         f"**Bad tokens before the limits** (item 2). {hs} handshakes in a row from one address, each with "
         "an ES384 token whose signature is wrong, against a P-384 `--auth-public-key-file` and "
         "`--connect-rate-per-ip 20`: the before build verified every token first.",
         "",
         "| build | answers | node CPU per refused handshake |", "|---|---|---|"]
    for name, b in builds:
        st, cpu = bad_tokens(b, hs)
        L.append(f"| {name} | {', '.join(f'{v}× {k}' for k, v in sorted(st.items()))} | {cpu * 1e6:.0f} µs |")
    L += ["", f"**History memory against the cap** (item 7). `--history-bytes {CAP}`: RSS grown by {topics:,} "
          f"distinct history topics of one 1-byte message each, and, on a fresh node, by {messages:,} 1-byte "
          "messages on one topic. Where the cap counts what holding costs, it holds what fits (about "
          "5,000 one-message topics in 2 MB) and evicts the oldest, so RSS grows by the cap, not per topic.",
          "",
          "| build | RSS per topic | RSS grown (topics) | RSS per message | RSS grown (messages) |",
          "|---|---|---|---|---|"]
    for name, b in builds:
        (pt, gt), (pm, gm) = history_memory(b, topics, messages)
        L.append(f"| {name} | {pt:.0f} B | {gt / 1e6:.1f} MB | {pm:.0f} B | {gm / 1e6:.1f} MB |")
    L += ["", f"**Recoveries over {rec_topics:,} history topics** (item 8). Four sockets loop `sub since`/`unsub` "
          f"on one concrete topic (`--subscribe-rate 0`) for {secs} s, while an unrelated socket sends the "
          "heartbeat word every 20 ms and `/healthz` is asked every 100 ms.", "",
          "| build | recoveries done | heartbeat p50 | p99 | max | `/healthz` p99 | max |",
          "|---|---|---|---|---|---|---|"]
    for name, b in builds:
        rtts, hz, done = recoveries_heartbeat(b, rec_topics, secs)
        L.append(f"| {name} | {done} | {ms(pct(rtts, .5))} | {ms(pct(rtts, .99))} | {ms(max(rtts))} | "
                 f"{ms(pct(hz, .99))} | {ms(max(hz))} |")
    L += ["", "**Presence requests** (item 14). 200 members on `room:a`; one socket asks `presence` as fast "
          f"as it can, 32 requests in flight, for {secs} s.", "",
          "| build | answered per second | refused `rate_limited` per second |", "|---|---|---|"]
    for name, b in builds:
        ok, refused = presence_rate(b, 200, secs)
        L.append(f"| {name} | {ok:.0f} | {refused:.0f} |")
    L += ["", "**Probes under a connection flood** (item 19). 2,000 idle TCP connections to the public port, "
          "then `/healthz` on `--metrics-listen`.", "",
          "| build | `/healthz` status | answered in |", "|---|---|---|"]
    for name, b in builds:
        st, took = healthz_flood(b, 2000)
        L.append(f"| {name} | {st} | {ms(took)} |")
    L.append("")
    return L
