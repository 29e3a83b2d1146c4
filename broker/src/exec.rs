//! websocketd mode (`--exec /count=./count.sh`): each WebSocket to the
//! route's path starts its own process. Every stdout line becomes a text
//! message and every client text message becomes a stdin line. The program
//! exiting closes the socket with 1000; the socket closing ends the program
//! (SIGTERM, then SIGKILL after `--exec-grace`).
//!
//! Each program leads a process group of its own, and what the node
//! signals is the group: a shell's pipeline ends with its shell. The
//! program counts against `--exec-max-processes` until no process of its
//! group is left, not only until its leader is reaped.
//!
//! A program that stops reading its stdin does not stall its socket: the
//! client's lines wait in a short queue for a writer of their own, and a
//! line the program does not take within `--write-timeout` ends the socket
//! and the program.
//!
//! The node is its programs' subreaper (and is PID 1 in a container with
//! no init): orphans a program leaves are re-parented to the node, which
//! reaps them ([`reaper`]), never a program's own exit status, which its
//! socket's task waits for.
//!
//! Output the client does not read fast enough is backpressure, never a
//! cut: the socket has one writer fed through a small bounded channel, so
//! when the client stops reading, the writer waits, the channel fills, the
//! node stops reading the pipe and the program blocks on its next write.
//!
//! Uses: `sync`, `clock`, `config`, `metrics`, `http`, `node`.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use herald_protocol::ws::{self, Message, OpCode, Reader};
use herald_protocol::{Disconnect, ErrorCode};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use rustix::process::{Pid, Signal, WaitOptions};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::config::ExecRoute;
use crate::http::handshake::{self, Refused};
use crate::http::{self, Body};
use crate::metrics::{ConnectionSlot, Metrics};
use crate::node::Node;
use crate::sync::Lock;

/// Frames that may wait for the socket's writer: a few, so a client that
/// stops reading stops the program within a few lines.
const QUEUE: usize = 4;

/// Client lines that may wait for the program's stdin: a few, each at most
/// `--max-message-bytes`, so the queue's bytes are bounded.
const STDIN_QUEUE: usize = 4;

/// How often a program's group is looked at while it is going away.
const POLL: Duration = Duration::from_millis(20);

/// The pids of the programs the node started and has not reaped yet: the
/// reaper of orphans leaves these to their sockets' tasks. Held while a
/// program is spawned, so none is seen before it is listed here.
static LEADERS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// One running program, counted in `herald_exec_processes` until the last
/// process of its group is gone.
struct Running(Arc<Metrics>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.exec_processes.fetch_sub(1, Relaxed);
    }
}

/// Answers a handshake on an `--exec` route.
pub async fn upgrade(
    node: Arc<Node>,
    mut req: Request<Incoming>,
    remote: SocketAddr,
    route: ExecRoute,
) -> Response<Body> {
    match admitted(&node, &mut req, remote, route) {
        Ok(r) => r,
        Err(refused) => *refused,
    }
}

fn admitted(
    node: &Arc<Node>,
    req: &mut Request<Incoming>,
    remote: SocketAddr,
    route: ExecRoute,
) -> Result<Response<Body>, Refused> {
    handshake::screen(node, req)?;
    // The rates, the slot and a program's place before the token, as for
    // `/ws`: a refused token gives back what these took.
    let slot = handshake::admit(node, req, remote)?;
    let metrics = &node.metrics;
    let max = node.config.exec_max_processes as i64;
    if metrics.exec_processes.fetch_add(1, Relaxed) >= max {
        metrics.exec_processes.fetch_sub(1, Relaxed);
        let msg = format!("exec_limit: {max} programs running (--exec-max-processes)");
        let status = (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::ExecLimit);
        return Err(handshake::refuse(
            node,
            status,
            &msg,
            "exec_limit",
            "raise --exec-max-processes, or add nodes",
        ));
    }
    let running = Running(metrics.clone());
    let query = req.uri().query().unwrap_or("");
    // Percent-decoded as every query value is.
    let token = match http::query_param(query, "token") {
        Ok(t) => t,
        Err(e) => {
            let status = (StatusCode::BAD_REQUEST, ErrorCode::BadRequest);
            return Err(handshake::refuse(
                node,
                status,
                &e,
                "url_parameters",
                "percent-encode the token",
            ));
        }
    };
    let token = token.as_deref().or(handshake::bearer(req));
    // With access control on, a program runs for token holders only.
    if let Some(identity) = handshake::access(node, token, [])? {
        if !identity.has_token() {
            let msg = "unauthorized: --exec routes need a connection token when access control is on";
            let status = (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized);
            let fix = "connect with ?token= or an Authorization: Bearer header";
            return Err(handshake::refuse(node, status, msg, "exec_token", fix));
        }
    }
    let env = cgi_env(req, remote, &route);
    let (response, fut) = fastwebsockets::upgrade::upgrade(req).map_err(|e| {
        let status = (StatusCode::BAD_REQUEST, ErrorCode::BadRequest);
        handshake::refuse(
            node,
            status,
            &e.to_string(),
            "upgrade",
            "send a WebSocket handshake (RFC 6455)",
        )
    })?;
    let node2 = node.clone();
    node.sessions.track(async move {
        if let Some((stream, early)) = handshake::stream(fut).await {
            run(node2, stream, early, route, env, slot, running).await;
        }
    });
    let (parts, _) = response.into_parts();
    Ok(Response::from_parts(parts, http::empty()))
}

/// websocketd's CGI-style environment: the client's address, the query,
/// the path, and every request header as `HTTP_*`. Nothing else of the
/// node's environment but `PATH`, `HOME` and the locale.
fn cgi_env(req: &Request<Incoming>, remote: SocketAddr, route: &ExecRoute) -> Vec<(String, String)> {
    let mut env = vec![
        ("REMOTE_ADDR".into(), remote.ip().to_string()),
        ("REMOTE_PORT".into(), remote.port().to_string()),
        ("QUERY_STRING".into(), req.uri().query().unwrap_or("").into()),
        ("PATH_INFO".into(), String::new()),
        ("SCRIPT_NAME".into(), route.path.clone()),
        ("REQUEST_METHOD".into(), "GET".into()),
        ("REQUEST_URI".into(), req.uri().to_string()),
        ("SERVER_PROTOCOL".into(), "HTTP/1.1".into()),
        (
            "SERVER_SOFTWARE".into(),
            format!("herald/{}", env!("CARGO_PKG_VERSION")),
        ),
        ("GATEWAY_INTERFACE".into(), "websocketd-CGI/0.1".into()),
    ];
    for (name, value) in req.headers() {
        if let Ok(v) = value.to_str() {
            let n = name.as_str().to_ascii_uppercase().replace('-', "_");
            env.push((format!("HTTP_{n}"), v.to_owned()));
        }
    }
    for keep in ["PATH", "HOME", "LANG", "LC_ALL", "TZ"] {
        if let Ok(v) = std::env::var(keep) {
            env.push((keep.into(), v));
        }
    }
    env
}

/// Reads one line of at most `max` bytes (a longer line comes out in
/// pieces of `max`), without its line ending; `None` at end of input.
async fn next_line(
    r: &mut (impl AsyncBufRead + Unpin),
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<()>> {
    buf.clear();
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok((!buf.is_empty()).then_some(()));
        }
        let room = max - buf.len();
        let newline = avail.iter().position(|&b| b == b'\n').filter(|&i| i <= room);
        let take = newline.map_or(avail.len().min(room), |i| i + 1);
        buf.extend_from_slice(&avail[..take]);
        r.consume(take);
        if newline.is_some() {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(Some(()));
        }
        if buf.len() >= max {
            return Ok(Some(()));
        }
    }
}
/// An open `--exec` socket in the node's table, for the drain; out of it
/// when dropped.
struct Registered<'a> {
    node: &'a Node,
    id: u64,
    token: tokio_util::sync::CancellationToken,
}

impl<'a> Registered<'a> {
    fn new(node: &'a Node) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, Relaxed);
        let token = tokio_util::sync::CancellationToken::new();
        node.execs.insert(id, token.clone());
        Registered { node, id, token }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.node.execs.remove(&self.id);
    }
}

async fn run(
    node: Arc<Node>,
    stream: TcpStream,
    early: Bytes,
    route: ExecRoute,
    env: Vec<(String, String)>,
    slot: ConnectionSlot,
    running: Running,
) {
    let path = route.path.as_str();
    let spawned = {
        let mut leaders = LEADERS.locked();
        let spawned = Command::new(&route.argv[0])
            .args(&route.argv[1..])
            .env_clear()
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A group of its own: what the node signals is the group.
            .process_group(0)
            .kill_on_drop(true)
            .spawn();
        if let Some(pid) = spawned.as_ref().ok().and_then(Child::id) {
            leaders.insert(pid as i32);
        }
        spawned
    };
    let (rd, mut wr) = stream.into_split();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(path, program = %route.argv[0], error = %e, "exec: cannot start");
            if let Some(f) = Disconnect::ExecFailed.frame() {
                let _ = wr.write_all(&f).await;
            }
            return;
        }
    };
    let pid = child.id().unwrap_or(0);
    tracing::debug!(path, pid, "exec: started");
    let Some(mut group) = Group::of(pid) else {
        return;
    };
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return;
    };
    let config = &node.config;
    let (log_path, max) = (route.path.clone(), config.max_message_bytes);
    node.tasks.spawn(async move {
        // Bounded like stdout: a line without end cannot grow the node.
        let (mut r, mut line) = (BufReader::new(stderr), Vec::new());
        while let Ok(Some(())) = next_line(&mut r, &mut line, max).await {
            tracing::warn!(path = %log_path, pid, "{}", String::from_utf8_lossy(&line));
        }
    });
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    let write_timeout = config.write_timeout;
    let writer = node.tasks.spawn_owned(async move {
        while let Some(frame) = rx.recv().await {
            match tokio::time::timeout(write_timeout, wr.write_all(&frame)).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
        Some(wr)
    });
    let out_tx = tx.clone();
    // Since when (the node's clock, ms) the reader has waited on the pipe
    // with nothing to read; 0 while it has a line to hand on.
    let waiting = Arc::new(AtomicU64::new(0));
    let out_waiting = waiting.clone();
    let out = async move {
        let mut r = BufReader::new(stdout);
        let mut line = Vec::new();
        loop {
            out_waiting.store(crate::clock::now_ms().max(1), Relaxed);
            let read = next_line(&mut r, &mut line, max).await;
            out_waiting.store(0, Relaxed);
            if !matches!(read, Ok(Some(()))) {
                break;
            }
            let text = String::from_utf8_lossy(&line);
            if out_tx
                .send(ws::encode_frame(OpCode::Text, text.as_bytes()))
                .await
                .is_err()
            {
                break;
            }
        }
        Disconnect::ProgramExited
    };
    let ping = if config.ping_interval.is_zero() {
        Duration::MAX
    } else {
        config.ping_interval
    };
    let (lines, queued) = mpsc::channel(STDIN_QUEUE);
    let input = read_client(rd, early, lines, tx.clone(), max, ping);
    let feed = feed_stdin(stdin, queued, write_timeout);
    let stop = node.exec_stop.clone();
    // This socket's own close, which the drain spreads with the others.
    let mine = Registered::new(&node);
    let grace = node.config.exec_grace;
    tokio::pin!(out);
    let end = tokio::select! {
        e = &mut out => e,
        // The program exited: what it wrote is read to its end, for
        // --exec-grace at most (something it started may hold the pipe
        // open for ever), and the socket closes with 1000.
        _ = child.wait() => {
            // Everything it wrote still goes out, however slowly the client
            // reads (a stalled one is cut by --write-timeout); only a pipe
            // left open with nothing in it for --exec-grace ends the wait.
            let grace_ms = grace.as_millis() as u64;
            loop {
                tokio::select! {
                    _ = &mut out => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {
                        let since = waiting.load(Relaxed);
                        if since != 0 && crate::clock::now_ms().saturating_sub(since) >= grace_ms {
                            break;
                        }
                    }
                }
            }
            Disconnect::ProgramExited
        }
        e = input => e,
        e = feed => e,
        _ = stop.cancelled() => Disconnect::GoingAway,
        _ = mine.token.cancelled() => Disconnect::GoingAway,
    };
    drop(mine);
    if end != Disconnect::ProgramExited {
        terminate(&mut child, &group, grace).await;
    } else if tokio::time::timeout(grace, child.wait()).await.is_err() {
        // Closed its stdout but kept running: end it like any other.
        terminate(&mut child, &group, grace).await;
    }
    LEADERS.locked().remove(&(pid as i32));
    // A protocol error's close frame is queued already.
    if let (Some(f), false) = (end.frame(), matches!(end, Disconnect::Protocol(_))) {
        let _ = tokio::time::timeout(node.config.close_timeout, tx.send(f)).await;
    }
    drop(tx);
    // The close (the frames queued, then the close frame) within
    // --close-timeout, or the connection is cut; the slot counts the
    // socket until the node has let go of it.
    let mut writer = writer;
    match tokio::time::timeout(node.config.close_timeout, &mut writer).await {
        Ok(Ok(Some(mut wr))) => {
            let _ = wr.shutdown().await;
        }
        Ok(_) => {}
        Err(_) => {
            writer.abort();
            let _ = writer.await;
        }
    }
    drop(slot);
    // The rest of its group (a pipeline's other commands, what it started
    // in the background) goes too, and is counted until it has.
    group.end(grace).await;
    drop(running);
    tracing::debug!(path, pid, "exec: ended");
}

/// SIGTERM to the program's group, then SIGKILL after `grace`; reaps the
/// program either way.
async fn terminate(child: &mut Child, group: &Group, grace: Duration) {
    group.signal(Signal::TERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        group.signal(Signal::KILL);
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

/// A program's process group (its id is the program's pid). Dropped
/// before it is known to be gone (the node stopping mid-way), it is killed;
/// dropped, its leader is no longer listed in [`LEADERS`].
struct Group {
    id: Pid,
    gone: bool,
}

impl Group {
    fn of(pid: u32) -> Option<Group> {
        Pid::from_raw(pid as i32).map(|id| Group { id, gone: false })
    }

    fn signal(&self, sig: Signal) {
        if !self.gone {
            let _ = rustix::process::kill_process_group(self.id, sig);
        }
    }

    /// Whether any process of the group is left, zombies included. Only
    /// after the leader is reaped: then the group's own children (orphans
    /// the node adopted) are reaped here, never the leader's status.
    fn left(&mut self) -> bool {
        while let Ok(Some(_)) = rustix::process::waitpgid(self.id, WaitOptions::NOHANG) {}
        let left = !matches!(
            rustix::process::test_kill_process_group(self.id),
            Err(rustix::io::Errno::SRCH)
        );
        self.gone = !left;
        left
    }

    /// Whether the group is gone within `within`.
    async fn gone_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.left() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
        true
    }

    /// After its leader is reaped: what is left of the group gets SIGTERM,
    /// then SIGKILL after `grace`; returns once none is left (or, if some
    /// outlive even SIGKILL for another `grace`, with a warning).
    async fn end(&mut self, grace: Duration) {
        if !self.left() {
            return;
        }
        self.signal(Signal::TERM);
        if self.gone_within(grace).await {
            return;
        }
        self.signal(Signal::KILL);
        if !self.gone_within(grace).await {
            tracing::warn!(
                pgid = self.id.as_raw_nonzero().get(),
                "exec: processes of a program's group outlive SIGKILL"
            );
            self.gone = true;
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.signal(Signal::KILL);
        // Reaped by now, or (a task ended early) left to tokio, which
        // reaps a dropped child itself: either way no longer the socket's.
        LEADERS.locked().remove(&self.id.as_raw_nonzero().get());
    }
}

/// The program's stdin side: writes the client's lines as they come, each
/// within `deadline`. A program that closed its stdin gets no more lines
/// (they are dropped); one that takes none within `deadline` ends the
/// socket with [`Disconnect::WriteTimeout`]. Otherwise never returns.
async fn feed_stdin(
    mut stdin: tokio::process::ChildStdin,
    mut lines: mpsc::Receiver<Vec<u8>>,
    deadline: Duration,
) -> Disconnect {
    while let Some(line) = lines.recv().await {
        match tokio::time::timeout(deadline, stdin.write_all(&line)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                drop(stdin);
                while lines.recv().await.is_some() {}
                break;
            }
            Err(_) => return Disconnect::WriteTimeout,
        }
    }
    std::future::pending().await
}

/// When the node has `--exec` routes or is PID 1: makes it its
/// descendants' subreaper, and returns the task that reaps the orphans
/// re-parented to it (on each SIGCHLD, and every few seconds in case one
/// was missed), leaving the programs themselves to their sockets' tasks.
pub fn reaper(node: &Node) -> Option<impl Future<Output = ()> + Send + 'static> {
    let pid1 = rustix::process::getpid().is_init();
    if !pid1 && node.config.exec.is_empty() && node.config.exec_shell.is_empty() {
        return None;
    }
    if !pid1 {
        if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
            tracing::warn!(error = %e, "exec: cannot become the programs' subreaper");
        }
    }
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok()?;
    Some(async move {
        let mut sweep = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = sweep.tick() => {}
            }
            reap_orphans();
        }
    })
}

/// Reaps every zombie child of the node that is not a program a socket's
/// task waits for.
fn reap_orphans() {
    let leaders = LEADERS.locked();
    for pid in zombie_children() {
        if !leaders.contains(&pid.as_raw_nonzero().get()) {
            let _ = rustix::process::waitpid(Some(pid), WaitOptions::NOHANG);
        }
    }
}

/// The node's children that have exited and wait to be reaped: from each
/// thread's `children` list, or by a scan of `/proc` where there is none.
fn zombie_children() -> Vec<Pid> {
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let stat = |pid: i32| -> Option<(char, i32)> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let mut f = s.get(s.rfind(')')? + 2..)?.split(' ');
        Some((f.next()?.chars().next()?, f.next()?.parse().ok()?))
    };
    let numbers = |dir: &str| -> Vec<i32> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    };
    let pids: Vec<i32> = if std::path::Path::new(&format!("/proc/self/task/{me}/children")).exists() {
        numbers("/proc/self/task")
            .into_iter()
            .filter_map(|t| std::fs::read_to_string(format!("/proc/self/task/{t}/children")).ok())
            .flat_map(|list| {
                list.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect()
    } else {
        numbers("/proc")
            .into_iter()
            .filter(|&p| stat(p).is_some_and(|s| s.1 == me))
            .collect()
    };
    pids.into_iter()
        .filter(|&p| stat(p).is_some_and(|s| s.0 == 'Z'))
        .filter_map(Pid::from_raw)
        .collect()
}

/// The client's side: text messages become stdin lines; pings are answered;
/// ends at the client's close or loss.
async fn read_client(
    rd: OwnedReadHalf,
    early: Bytes,
    lines: mpsc::Sender<Vec<u8>>,
    tx: mpsc::Sender<Bytes>,
    max: usize,
    ping: Duration,
) -> Disconnect {
    let mut buf = BytesMut::from(&early[..]);
    let mut reader = Reader::new();
    let mut pinged = false;
    loop {
        loop {
            match reader.read(&mut buf, max) {
                Ok(Some(Message::Text(t))) => {
                    // A full queue makes this wait, the client's frames
                    // waiting in TCP, for at most the stdin writer's
                    // deadline: it takes a line or ends the socket.
                    let _ = lines.send([&t[..], b"\n"].concat()).await;
                }
                Ok(Some(Message::Ping(p))) => {
                    let _ = tx.send(ws::encode_frame(OpCode::Pong, &p)).await;
                }
                Ok(Some(Message::Close(code, _))) => return Disconnect::ClientClosed(code),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    let why = Disconnect::Protocol(e);
                    if let Some(f) = why.frame() {
                        let _ = tx.send(f).await;
                    }
                    return why;
                }
            }
        }
        // A client that answers nothing (not even a ping) for two ping
        // intervals is gone: its program ends.
        match tokio::time::timeout(ping, rd.readable()).await {
            Ok(Ok(())) => pinged = false,
            Ok(Err(_)) => return Disconnect::ConnectionLost,
            Err(_) if pinged => return Disconnect::HeartbeatTimeout,
            Err(_) => {
                pinged = true;
                let _ = tx.send(ws::encode_frame(OpCode::Ping, b"")).await;
                continue;
            }
        }
        buf.reserve(4096);
        match rd.try_read_buf(&mut buf) {
            Ok(0) => return Disconnect::ConnectionLost,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Disconnect::ConnectionLost,
        }
    }
}
