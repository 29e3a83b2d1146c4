//! Presence you can ask for: member lists and counts over WebSocket and
//! HTTP, joins and leaves per user, the same list on every node, and no
//! ghosts when a node dies or is cut off from NATS.

use std::time::Duration;

use serde_json::{json, Value};

use crate::cluster::{nodes, wait_linked};
use crate::common::*;
use crate::external::{free_port, NatsServer};

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

/// Publishes `marker` on chat:lobby with the tests' API key.
async fn publish(h: &Herald, marker: &str) {
    let body = format!(r#"{{"topic":"chat:lobby","data":"{marker}"}}"#);
    let (s, b) = h.post("/v1/publish", "Authorization: Bearer k\r\n", &body).await;
    assert_eq!(s, 200, "{b}");
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
    let key = KeyFile::new("presence");
    let h = Herald::start(&[
        "--presence",
        "chat:*",
        "--presence-by",
        "user",
        "--auth-hmac-key-file",
        key.arg(),
        "--api-key",
        "k",
    ]);
    let token = |sub: &str| key.token(sub, &["chat:*"]);
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

fn user_list(v: &Value) -> Vec<String> {
    let mut u: Vec<String> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap_or("?").to_owned())
        .collect();
    u.sort();
    u
}

/// Three nodes behind a real HAProxy, 20 users with three tabs each spread
/// over the nodes: every node lists the same 20 users. SIGKILL one node:
/// users with tabs elsewhere do not leave, the two whose only tab was there
/// leave once each; a returning client rejoins once.
#[tokio::test]
async fn twenty_users_sixty_tabs_behind_haproxy_and_a_node_death() {
    let key = KeyFile::new("presence-lb");
    let nats = NatsServer::start().await;
    let k = key.arg().to_owned();
    let args = [
        "--presence",
        "chat:*",
        "--presence-by",
        "user",
        "--presence-ttl",
        "3s",
        "--auth-hmac-key-file",
        &k,
        "--api-key",
        "k",
    ];
    let mut ns = nodes(3, &nats.url(), &args);
    wait_linked(&ns).await;
    let lb = crate::external::Haproxy::start(&ns.iter().map(|n| n.addr).collect::<Vec<_>>()).await;
    let mut obs =
        Client::connect(&ns[0].url(&format!("sub=chat:lobby&token={}", key.token("obs", &["chat:*"])))).await;
    let mut tabs = Vec::new();
    for u in 0..20 {
        let t = key.token(&format!("u{u:02}"), &["chat:*"]);
        for _ in 0..3 {
            tabs.push(Client::connect(&lb.url(&format!("sub=chat:lobby&token={t}"))).await);
        }
    }
    let mut alone = Vec::new();
    for x in ["x0", "x1"] {
        let t = key.token(x, &["chat:*"]);
        alone.push(Client::connect(&ns[2].url(&format!("sub=chat:lobby&token={t}"))).await);
    }
    eventually("every node lists the same 23 users over 63 sockets", || async {
        let mut lists = Vec::new();
        for n in &ns {
            let v = http_presence(n, "?topic=chat:lobby").await;
            if v["clients"] != 63 {
                return false;
            }
            lists.push(user_list(&v));
        }
        lists.iter().all(|l| l.len() == 23 && *l == lists[0])
    })
    .await;
    // Every user's three tabs landed on three nodes (round robin).
    ns[2].sigkill();
    let mut left = Vec::new();
    while left.len() < 2 {
        let (v, _) = until(&mut obs, |v| v["event"] == "leave").await;
        left.push(v["user"].as_str().unwrap().to_owned());
    }
    left.sort();
    assert_eq!(left, ["x0", "x1"], "only the users whose only tab was there");
    publish(&ns[0], "marker").await;
    let (_, before) = until(&mut obs, |v| v["data"] == "marker").await;
    assert!(before.iter().all(|v| v["event"] != "leave"), "{before:?}");
    // Each survivor drops the dead node on its own clock: converged soon.
    eventually("the survivors list 21 users on 41 sockets", || async {
        let mut ok = true;
        for n in ns.iter().take(2) {
            let v = http_presence(n, "?topic=chat:lobby").await;
            ok &= user_list(&v).len() == 21 && v["clients"] == 41;
        }
        ok
    })
    .await;
    // The node comes back; a returning client rejoins, once.
    let addr = ns[2].addr;
    let nats_url = nats.url();
    let mut again = vec!["--nats", nats_url.as_str()];
    again.extend_from_slice(&args);
    ns[2] = Herald::start_on(addr, &again);
    wait_linked(&ns[2..]).await;
    let t = key.token("x0", &["chat:*"]);
    let _back = Client::connect(&ns[2].url(&format!("sub=chat:lobby&token={t}"))).await;
    let (v, _) = until(&mut obs, |v| v["event"] == "join").await;
    assert_eq!(v["user"], "x0", "{v}");
    publish(&ns[0], "marker 2").await;
    let (_, before) = until(&mut obs, |v| v["data"] == "marker 2").await;
    assert!(
        before.iter().all(|v| v["event"] != "join"),
        "rejoined once: {before:?}"
    );
    drop(tabs);
}

/// A node cut off from NATS: the others drop its members after the TTL;
/// when it comes back they have them again, once, and so does it.
#[tokio::test]
async fn a_node_cut_from_nats_comes_back_without_ghosts_or_duplicates() {
    let (c1, c2) = (free_port(), free_port());
    let nats1 = NatsServer::start_in_cluster_unadvertised(c1, &[c2]).await;
    let mut nats2 = NatsServer::start_in_cluster_unadvertised(c2, &[c1]).await;
    let args = ["--presence", "chat:*", "--presence-ttl", "2s"];
    let mut ns = nodes(1, &nats1.url(), &args);
    ns.extend(nodes(1, &nats2.url(), &args));
    wait_linked(&ns).await;
    let mut obs = Client::connect(&ns[0].url("sub=chat:lobby&name=obs")).await;
    let _b1 = Client::connect(&ns[1].url("sub=chat:lobby&name=b1")).await;
    let b1 = loop {
        let (v, _) = until(&mut obs, |v| v["event"] == "join").await;
        if v["name"] == "b1" {
            break v["client"].as_str().unwrap().to_owned();
        }
    };
    nats2.kill(); // node 1 is cut off
    let (v, _) = until(&mut obs, |v| v["event"] == "leave").await;
    assert_eq!(v["client"].as_str(), Some(b1.as_str()), "no ghost: {v}");
    assert_eq!(
        clients(&http_presence(&ns[0], "?topic=chat:lobby").await).len(),
        1
    );
    nats2.restart().await;
    let (v, _) = until(&mut obs, |v| v["event"] == "join").await;
    assert_eq!(v["client"].as_str(), Some(b1.as_str()), "re-announced: {v}");
    eventually("both nodes list both sockets, once each", || async {
        let mut lists = Vec::new();
        for n in &ns {
            lists.push(clients(&http_presence(n, "?topic=chat:lobby").await));
        }
        lists.iter().all(|l| l.len() == 2 && *l == lists[0])
    })
    .await;
    ns[0].publish("chat:lobby", "\"marker\"").await;
    let (_, before) = until(&mut obs, |v| v["data"] == "marker").await;
    assert!(
        before.iter().all(|v| v["event"] != "join"),
        "joined once: {before:?}"
    );
}

/// A URL subscription that recovers (`last`, `since`) announces its join
/// once its replay is sent; a socket that vanishes meanwhile has left
/// already, and its join must not come after its leave: 110 sockets that
/// open with a long replay and vanish at once leave no member behind.
#[tokio::test]
async fn a_socket_gone_during_its_url_recovery_leaves_no_ghost() {
    let h = Herald::start(&[
        "--history",
        "room:*=200",
        "--presence",
        "room:*",
        "--publish-rate",
        "0",
    ]);
    let mut first = h.connect("sub=room:a").await;
    let big = format!("\"{}\"", "x".repeat(30_000));
    for _ in 0..200 {
        h.publish("room:a", &big).await;
    }
    let epoch = loop {
        // Its own join notice comes first.
        let v: Value = serde_json::from_str(&first.recv_text().await).expect("json");
        if let Some(e) = v["epoch"].as_str() {
            break e.to_owned();
        }
    };
    drop(first);
    for i in 0..110 {
        // Half ask for everything kept (6 MB to replay), half for the last.
        let query = if i % 2 == 0 {
            "sub=room:a&last=1".to_owned()
        } else {
            format!("sub=room:a&since={epoch}:0")
        };
        let c = RawWs::connect(h.addr, &format!("/ws?{query}")).await;
        drop(c);
    }
    // A socket that stays, to see every other one gone.
    let _stay = h.connect("sub=room:b").await;
    eventually("no member left on room:a", || async {
        let v = http_presence(&h, "?topic=room:a").await;
        clients(&v).is_empty()
    })
    .await;
    // And none comes back later: joins after a leave would.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let v = http_presence(&h, "?topic=room:a").await;
    assert!(clients(&v).is_empty(), "ghosts: {v}");
}

/// `presence` answers cost the node a member list each: a socket gets
/// `--presence-rate` of them a second (`presence_stats` included), then
/// `rate_limited` errors with the request's id, and stays open.
#[tokio::test]
async fn presence_requests_have_a_budget() {
    let h = Herald::start(&["--presence", "chat:*"]);
    let _ann = h.connect("sub=chat:lobby").await;
    let mut c = h.connect("").await;
    let n = 300;
    for i in 0..n {
        let op = if i % 2 == 0 { "presence" } else { "presence_stats" };
        c.send(json!({"op":op,"topic":"chat:lobby","id":i}).to_string())
            .await;
    }
    let (mut answered, mut limited) = (0, 0);
    for i in 0..n {
        let v = c.recv().await;
        assert_eq!(v["id"], i, "answers in order, each with its id: {v}");
        match v["op"].as_str() {
            Some("ack") => answered += 1,
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                assert!(
                    v["message"].as_str().unwrap_or("").contains("presence_rate"),
                    "{v}"
                );
                limited += 1;
            }
            _ => panic!("{v}"),
        }
    }
    assert!(answered >= 1, "the first requests are answered");
    assert!(limited > 0, "{n} requests in a burst: none refused");
    assert_eq!(
        h.metric("herald_errors_total{code=\"rate_limited\"}").await,
        limited as f64
    );
    // The socket stays open and serves other requests.
    c.sub("chat:other").await;
}

/// `GET /v1/presence` and `/v1/history` decode their query as `/ws` does
/// (and as a browser's URLSearchParams writes it): `%3A` is `:`, `+` a
/// space.
#[tokio::test]
async fn http_queries_are_percent_decoded() {
    let h = Herald::start(&["--presence", "chat:*", "--history", "chat:*=10"]);
    let _ann = Client::connect(&h.url("sub=chat%3Alobby&name=ann")).await;
    h.publish("chat:lobby", "1").await;
    h.publish("chat:lobby", "2").await;
    let (status, body) = h.get("/v1/presence?topic=chat%3Alobby").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["topic"], "chat:lobby", "{v}");
    assert_eq!(v["members"][0]["name"], "ann", "{v}");
    let (status, body) = h.get("/v1/presence/stats?topic=chat%3alobby").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["clients"], 1);
    let (status, body) = h.get("/v1/history?topic=chat%3Alobby&limit=%31").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["messages"].as_array().map(Vec::len), Some(1), "{v}");
    // `+` is a space, which no topic has; a bad escape is a bad request.
    let (status, body) = h.get("/v1/presence?topic=chat+lobby").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("chat lobby"), "{body}");
    let (status, body) = h.get("/v1/history?topic=chat%3").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("percent"), "{body}");
}
