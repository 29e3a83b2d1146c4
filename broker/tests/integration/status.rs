//! The status page: who may see it, that its figures follow the node, and
//! that every node of a cluster shows the others.

use serde_json::Value;

use crate::cluster::{nodes, wait_linked};
use crate::common::*;
use crate::external::NatsServer;

async fn status_json(h: &Herald, extra: &str) -> (u16, Value) {
    let (status, body) = h
        .http(&format!(
            "GET /status.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n"
        ))
        .await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn loopback_or_the_admin_key_only() {
    let h = Herald::start(&["--trusted-proxies", "127.0.0.1"]);
    let (status, body) = h.get("/status").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("Herald status") && !body.contains("https://"),
        "self-contained"
    );
    // Read-only: GET (and HEAD) only, as the route table lists it.
    for method in ["POST", "DELETE"] {
        for path in ["/status", "/status.json"] {
            let (status, body) = h
                .http(&format!(
                    "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                ))
                .await;
            assert_eq!(status, 405, "{method} {path}: {body}");
        }
    }
    // A 405 says what is allowed (RFC 9110 asks for the header).
    for (request, allow) in [
        ("POST /status HTTP/1.1\r\nContent-Length: 0\r\n", "GET, HEAD"),
        ("GET /v1/publish HTTP/1.1\r\n", "POST"),
    ] {
        let text = http_raw(
            h.addr,
            format!("{request}Host: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        let head = text
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 405"), "{text}");
        assert!(
            head.contains(&format!("\r\nallow: {}", allow.to_ascii_lowercase())),
            "{text}"
        );
    }
    // Through a trusted proxy, a remote client is not loopback.
    let (status, v) = status_json(&h, "X-Forwarded-For: 203.0.113.5\r\n").await;
    assert_eq!(status, 403, "{v}");
    // A proxy appends its line after the client's: the client's own claim
    // to be loopback, first, does not count; nor does a hop that does not
    // parse fall back to the (loopback) proxy.
    for forged in [
        "X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-For: 203.0.113.5\r\n",
        "X-Forwarded-For: 127.0.0.1, 203.0.113.5\r\n",
        "X-Forwarded-For: unknown\r\n",
        "X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-For: unknown\r\n",
    ] {
        let (status, v) = status_json(&h, forged).await;
        assert_eq!(status, 403, "{forged:?}: {v}");
    }
    let (status, _) = status_json(&h, "X-Forwarded-For: 203.0.113.5, 127.0.0.2\r\n").await;
    assert_eq!(
        status, 200,
        "the right-most untrusted hop is loopback (the proxy's client)"
    );

    let k = Herald::start(&["--admin-key", "s3cret"]);
    assert_eq!(
        status_json(&k, "").await.0,
        403,
        "a key is set: loopback is not enough"
    );
    let (status, _) = k
        .http("GET /status.json?key=s3cret HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status, 200);
    assert_eq!(status_json(&k, "Authorization: Bearer s3cret\r\n").await.0, 200);
    assert_eq!(status_json(&k, "Authorization: Bearer wrong\r\n").await.0, 403);
}

/// With `--admin-key` set the key is asked of loopback clients too (behind
/// a sidecar every client is loopback): the 403 says so, and the docs and
/// the refusal without a key say what that node answers instead.
#[tokio::test]
async fn the_refusal_names_what_the_node_asks() {
    let k = Herald::start(&["--admin-key", "s3cret"]);
    let (status, body) = k.get("/status.json").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--admin-key"), "{body}");
    assert!(
        !body.contains("answers loopback"),
        "a loopback client was refused: the message may not offer loopback: {body}"
    );
    let open = Herald::start(&["--trusted-proxies", "127.0.0.1"]);
    let (status, body) = open.http(
        "GET /status.json HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.5\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("loopback clients only"), "{body}");
    let ops = include_str!("../../../docs/operations.md");
    assert!(
        ops.contains("loopback clients included"),
        "docs/operations.md says a key set is asked of loopback clients too"
    );
}

#[tokio::test]
async fn figures_follow_the_node_and_every_node_shows_the_cluster() {
    let nats = NatsServer::start().await;
    let ns = nodes(2, &nats.url(), &[]);
    wait_linked(&ns).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(&ns[1].url("sub=a&sub=b")).await);
    }
    eventually("node 0 shows node 1's three sockets", || async {
        let (_, v) = status_json(&ns[0], "").await;
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        nodes.len() == 2
            && nodes
                .iter()
                .any(|n| n["connections"] == 3 && n["subscriptions"] == 6)
    })
    .await;
    for _ in 0..20 {
        ns[0].publish("a", "1").await;
    }
    eventually("deliveries per second moved on node 1", || async {
        let (_, v) = status_json(&ns[1], "").await;
        v["history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|s| s["deliveries_per_s"].as_f64() > Some(0.0)))
    })
    .await;
    let (_, v) = status_json(&ns[1], "").await;
    assert_eq!(v["nodes"][0]["nats"], "connected");
    assert!(v["history"].as_array().unwrap().len() <= 300);
}

/// `?key=` is percent-decoded, as a browser's URLSearchParams writes it
/// (an admin key with `+`, `/` or `=`); a refusal says why in the log.
#[tokio::test]
async fn the_key_is_decoded_and_a_refusal_is_logged() {
    let h = Herald::start_logged(&["--admin-key", "a+b/c=="]);
    let (status, _) = h
        .http("GET /status.json?key=a%2Bb%2Fc%3D%3D HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status, 200, "the key as URLSearchParams writes it");
    let (status, _) = h
        .http("GET /status.json?key=a+b/c== HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status, 403, "+ is a space");
    eventually("the refusal is logged", || async {
        h.log()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("status") && l.contains("--admin-key"))
    })
    .await;
}
