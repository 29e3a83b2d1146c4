//! Presence you can ask for: member lists and counts over WebSocket and
//! HTTP, joins and leaves per user, the same list on every node, and no
//! ghosts when a node dies or is cut off from NATS.

use serde_json::{json, Value};

use crate::cluster::{nodes, wait_linked};
use crate::common::*;
use crate::external::NatsServer;

async fn http_presence(h: &Herald, query: &str) -> Value {
    let (status, body) = h
        .http(&format!(
            "GET /v1/presence{query} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Frames until one satisfies `want`; returns it and what came before.
async fn until(c: &mut Client, want: impl Fn(&Value) -> bool) -> (Value, Vec<Value>) {
    let mut before = Vec::new();
    loop {
        let v = c.recv().await;
        if want(&v) {
            return (v, before);
        }
        before.push(v);
    }
}

fn clients(v: &Value) -> Vec<String> {
    let mut c: Vec<String> = v["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|x| x["client"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default();
    c.sort();
    c
}

#[tokio::test]
async fn lists_and_counts_over_websocket_and_http() {
    let h = Herald::start(&["--presence", "chat:*"]);
    let mut ann = Client::connect(&h.url("sub=chat:lobby&name=ann")).await;
    let _bob = Client::connect(&h.url("sub=chat:lobby&name=bob")).await;
    let v = ann
        .request(json!({"op":"presence","topic":"chat:lobby","id":1}))
        .await;
    assert_eq!(v["op"], "ack", "{v}");
    let names: Vec<&str> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"ann") && names.contains(&"bob"), "{v}");
    let v = ann
        .request(json!({"op":"presence_stats","topic":"chat:lobby","id":2}))
        .await;
    assert_eq!(
        (v["clients"].as_u64(), v["users"].as_u64()),
        (Some(2), Some(2)),
        "{v}"
    );
    let v = ann
        .request(json!({"op":"presence","topic":"news:x","id":3}))
        .await;
    assert_eq!(v["code"], "bad_request", "{v}");
    assert!(v["message"].as_str().unwrap().contains("--presence"), "{v}");
    let v = http_presence(&h, "?topic=chat:lobby").await;
    assert_eq!(clients(&v).len(), 2, "{v}");
    let v = http_presence(&h, "/stats?topic=chat:lobby").await;
    assert_eq!(v["clients"], 2, "{v}");
    let (status, body) = h.get("/v1/presence?topic=news:x").await;
    assert_eq!(status, 400, "{body}");
}

/// With `--presence-by user`, three tabs of one user join once and leave
/// once, when the last one goes.
#[tokio::test]
async fn a_users_first_socket_joins_and_its_last_leaves() {
    let dir = std::env::temp_dir().join(format!("herald-presence-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("hmac");
    std::fs::write(&key, "p".repeat(40)).unwrap();
    let h = Herald::start(&[
        "--presence",
        "chat:*",
        "--presence-by",
        "user",
        "--auth-hmac-key-file",
        key.to_str().unwrap(),
        "--api-key",
        "k",
    ]);
    let token = |sub: &str| {
        let out = std::process::Command::new(herald_bin())
            .args([
                "token",
                "--key-file",
                key.to_str().unwrap(),
                "--sub",
                sub,
                "--subscribe",
                "chat:*",
            ])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    async fn publish(h: &Herald, marker: &str) {
        let body = format!(r#"{{"topic":"chat:lobby","data":"{marker}"}}"#);
        let (s, b) = h.post("/v1/publish", "Authorization: Bearer k\r\n", &body).await;
        assert_eq!(s, 200, "{b}");
    }
    let mut obs = Client::connect(&h.url(&format!("sub=chat:lobby&token={}", token("obs")))).await;
    let t = token("ann");
    let mut tabs = Vec::new();
    for _ in 0..3 {
        tabs.push(Client::connect(&h.url(&format!("sub=chat:lobby&token={t}"))).await);
    }
    publish(&h, "after three tabs").await;
    let (_, before) = until(&mut obs, |v| v["data"] == "after three tabs").await;
    let anns: Vec<&Value> = before.iter().filter(|v| v["user"] == "ann").collect();
    assert_eq!(anns.len(), 1, "one join for three tabs: {before:?}");
    assert_eq!(anns[0]["event"], "join");
    let v = obs
        .request(json!({"op":"presence_stats","topic":"chat:lobby","id":1}))
        .await;
    assert_eq!(
        (v["clients"].as_u64(), v["users"].as_u64()),
        (Some(4), Some(2)),
        "{v}"
    );
    drop(tabs.pop());
    drop(tabs.pop());
    eventually("two tabs gone", || async {
        http_presence(&h, "/stats?topic=chat:lobby").await["clients"] == 2
    })
    .await;
    publish(&h, "two tabs closed").await;
    let (_, before) = until(&mut obs, |v| v["data"] == "two tabs closed").await;
    assert!(
        before.iter().all(|v| v["event"] != "leave"),
        "no leave while a tab is open: {before:?}"
    );
    drop(tabs.pop());
    let (leave, _) = until(&mut obs, |v| v["event"] == "leave").await;
    assert_eq!(leave["user"], "ann", "{leave}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every node answers with the whole cluster; a SIGKILLed node's members
/// leave, with one notice per observer from the survivors, within the TTL.
#[tokio::test]
async fn the_same_list_everywhere_and_no_ghosts_after_a_node_dies() {
    let nats = NatsServer::start().await;
    let mut ns = nodes(3, &nats.url(), &["--presence", "chat:*", "--presence-ttl", "3s"]);
    wait_linked(&ns).await;
    let mut on = Vec::new();
    for (i, n) in ns.iter().enumerate() {
        on.push(Client::connect(&n.url(&format!("sub=chat:lobby&name=n{i}"))).await);
    }
    eventually("every node lists all three", || async {
        let mut lists = Vec::new();
        for n in &ns {
            lists.push(clients(&http_presence(n, "?topic=chat:lobby").await));
        }
        lists.iter().all(|l| l.len() == 3 && *l == lists[0])
    })
    .await;
    let dead: Vec<String> = {
        let v = http_presence(&ns[2], "?topic=chat:lobby").await;
        v["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["name"] == "n2")
            .map(|m| m["client"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(dead.len(), 1, "{dead:?}");
    ns[2].sigkill();
    for c in on.iter_mut().take(2) {
        let (v, _) = until(c, |v| v["event"] == "leave").await;
        assert_eq!(v["client"].as_str(), Some(dead[0].as_str()), "{v}");
    }
    for n in ns.iter().take(2) {
        assert_eq!(clients(&http_presence(n, "?topic=chat:lobby").await).len(), 2);
    }
    // Exactly once: nothing more leaves before a marker published now.
    ns[0].publish("chat:lobby", "\"marker\"").await;
    for c in on.iter_mut().take(2) {
        let (_, before) = until(c, |v| v["data"] == "marker").await;
        assert!(before.iter().all(|v| v["event"] != "leave"), "{before:?}");
    }
}
