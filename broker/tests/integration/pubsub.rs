//! Subscribe, unsubscribe, publish, wildcards, URL subscriptions, HTTP
//! publish, presence notices.

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn sub_unsub_pub_with_acks() {
    let h = Herald::start(&[]);
    let mut a = h.connect("").await;
    let mut b = h.connect("").await;
    let ack = a.request(json!({"op":"sub","topic":"todo:count","id":1})).await;
    assert_eq!(ack, json!({"op":"ack","id":1}));
    a.sub("other").await;
    // Data travels byte for byte, odd whitespace included.
    b.send(r#"{"op":"pub","topic":"todo:count","data":{ "n" : 1,"s":"é\u00e9" },"id":"x"}"#)
        .await;
    assert_eq!(b.recv_text().await, r#"{"op":"ack","id":"x"}"#);
    assert_eq!(
        a.recv_text().await,
        r#"{"topic":"todo:count","data":{ "n" : 1,"s":"é\u00e9" }}"#
    );
    // A publish without an id gets no ack but is delivered.
    b.send(r#"{"op":"pub","topic":"todo:count","data":2}"#).await;
    assert_eq!(a.recv().await, json!({"topic":"todo:count","data":2}));
    let ack = a
        .request(json!({"op":"unsub","topic":"todo:count","id":"u"}))
        .await;
    assert_eq!(ack, json!({"op":"ack","id":"u"}));
    b.publish("todo:count", json!(3)).await;
    b.publish("other", json!("sentinel")).await;
    // The first thing `a` sees after unsubscribing is the sentinel.
    assert_eq!(a.recv().await, json!({"topic":"other","data":"sentinel"}));
    // Unsubscribing twice is an error that names the topic.
    let e = a.request(json!({"op":"unsub","topic":"todo:count","id":9})).await;
    assert_eq!(e["code"], "not_subscribed");
    assert_eq!(e["id"], 9);
    // Subscribing twice is idempotent: still one delivery per message.
    a.sub("other").await;
    b.publish("other", json!(1)).await;
    b.publish("other", json!(2)).await;
    assert_eq!(a.recv().await["data"], 1);
    assert_eq!(a.recv().await["data"], 2);
}

/// Topics received until the `end` sentinel.
async fn got(c: &mut Client) -> Vec<String> {
    let mut v = vec![];
    loop {
        let m = c.recv().await;
        if m["topic"] == "end" {
            return v;
        }
        v.push(m["topic"].as_str().unwrap().to_owned());
    }
}

#[tokio::test]
async fn wildcards_star_and_tail() {
    let h = Herald::start(&[]);
    let mut star = h.connect("").await;
    let mut tail = h.connect("").await;
    let mut both = h.connect("").await;
    star.sub("todo:*").await;
    star.sub("end").await;
    tail.sub("chat:>").await;
    tail.sub("end").await;
    both.sub("todo:count").await;
    both.sub("todo:*").await;
    both.sub(">").await;
    let mut p = h.connect("").await;
    for t in ["todo:count", "todo:a:b", "chat:lobby", "chat:x:y", "chat", "todo"] {
        p.publish(t, json!(t)).await;
    }
    p.publish("end", json!("end")).await;
    assert_eq!(got(&mut star).await, vec!["todo:count"]);
    assert_eq!(got(&mut tail).await, vec!["chat:lobby", "chat:x:y"]);
    // Three subscriptions match todo:count, and `>` matches everything: each
    // message still arrives once.
    assert_eq!(
        got(&mut both).await,
        vec!["todo:count", "todo:a:b", "chat:lobby", "chat:x:y", "chat", "todo"]
    );
    assert_eq!(h.metric("herald_patterns").await, 3.0);
}

#[tokio::test]
async fn url_subscriptions_for_read_only_clients() {
    let h = Herald::start(&[]);
    // `>` as a browser escapes it.
    let mut c = h.connect("sub=todo:*&sub=chat%3Alobby&sub=feed:%3E").await;
    let mut p = h.connect("").await;
    h.publish("todo:count", "1").await;
    p.publish("chat:lobby", json!("hi")).await;
    p.publish("feed:a:b", json!(true)).await;
    assert_eq!(c.recv().await, json!({"topic":"todo:count","data":1}));
    assert_eq!(c.recv().await, json!({"topic":"chat:lobby","data":"hi"}));
    assert_eq!(c.recv().await, json!({"topic":"feed:a:b","data":true}));
    // A bad pattern in a real handshake is refused before the 101.
    let (status, body) = h.http(&upgrade_request("/ws?sub=a..b", "x", "")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bad_topic") && body.contains("a..b"), "{body}");
}

#[tokio::test]
async fn http_publish_reaches_websocket_subscribers() {
    let h = Herald::start(&["--api-key", "s3cret"]);
    let mut c = h.connect("sub=todo:*").await;
    let auth = "Authorization: Bearer s3cret\r\n";
    let (status, body) = h
        .post("/v1/publish", auth, r#"{"topic":"todo:count","data":{"n":41}}"#)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, r#"{"published":1,"deliveries":1}"#);
    assert_eq!(c.recv().await, json!({"topic":"todo:count","data":{"n":41}}));
    let batch = r#"[{"topic":"todo:a","data":1},{"topic":"nobody","data":2},{"topic":"todo:b","data":"x"}]"#;
    let (status, body) = h.post("/v1/publish", auth, batch).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, r#"{"published":3,"deliveries":2}"#);
    assert_eq!(c.recv().await, json!({"topic":"todo:a","data":1}));
    assert_eq!(c.recv().await, json!({"topic":"todo:b","data":"x"}));
    let (status, body) = h.post("/v1/publish", "", r#"{"topic":"a","data":1}"#).await;
    assert_eq!(status, 401);
    assert!(body.contains("unauthorized"), "{body}");
    let wrong = "Authorization: Bearer nope\r\n";
    let (status, _) = h.post("/v1/publish", wrong, r#"{"topic":"a","data":1}"#).await;
    assert_eq!(status, 401);
    // A bad item refuses the whole batch: nothing from it is delivered.
    let bad = r#"[{"topic":"todo:c","data":1},{"topic":"todo:*","data":2}]"#;
    let (status, body) = h.post("/v1/publish", auth, bad).await;
    assert_eq!(status, 400);
    assert!(body.contains("bad_topic") && body.contains("item 1"), "{body}");
    h.post("/v1/publish", auth, r#"{"topic":"todo:end","data":0}"#)
        .await;
    assert_eq!(c.recv().await["topic"], "todo:end");
    assert_eq!(h.metric("herald_errors_total{code=\"unauthorized\"}").await, 2.0);
}

#[tokio::test]
async fn join_and_leave_notices() {
    let h = Herald::start(&["--presence", "chat:*"]);
    let mut ann = h.connect("sub=chat:lobby&name=ann").await;
    // Ann sees her own join first.
    let j = ann.recv().await;
    assert_eq!(j["event"], "join");
    assert_eq!(j["name"], "ann");
    let mut bob = h.connect("").await;
    bob.sub("chat:lobby").await;
    let j = ann.recv().await;
    assert_eq!(j["topic"], "chat:lobby");
    assert_eq!(j["event"], "join");
    let bob_id = j["client"].as_str().unwrap().to_owned();
    assert!(j.get("name").is_none());
    assert_eq!(bob.recv().await["event"], "join");
    bob.ws.close(None).await.unwrap();
    let l = ann.recv().await;
    assert_eq!(l, json!({"topic":"chat:lobby","event":"leave","client":bob_id}));
    // Unsubscribing is leaving too; topics outside the pattern are silent.
    let mut cy = h.connect("sub=chat:lobby&sub=news").await;
    assert_eq!(ann.recv().await["event"], "join");
    let ack = cy
        .request(json!({"op":"unsub","topic":"chat:lobby","id":1}))
        .await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(ann.recv().await["event"], "leave");
    cy.ws.close(None).await.unwrap();
    h.publish("chat:lobby", "\"after\"").await;
    // Cy's close left only `news`, which has no presence: next is the data.
    assert_eq!(ann.recv().await, json!({"topic":"chat:lobby","data":"after"}));
}

#[tokio::test]
async fn heartbeat_word_is_answered_and_never_published() {
    let h = Herald::start(&[]);
    let mut c = h.connect("").await;
    c.send("HeartBeat").await;
    assert_eq!(c.recv_text().await, "HeartBeat");
    let h2 = Herald::start(&["--heartbeat-word", "ping"]);
    let mut raw = h2.connect("topic=room&format=raw").await;
    raw.send("ping").await;
    assert_eq!(raw.recv_text().await, "ping");
    raw.send("hello").await;
    // The word was answered, not published: the next delivery is "hello".
    assert_eq!(raw.recv_text().await, "hello");
}

/// An `unsub` is in effect before its ack: while another socket floods the
/// topic, nothing published after the client has the ack reaches it.
/// (Messages already in flight when the node took the unsub may still be
/// queued behind the ack, as with any broker.)
#[tokio::test]
async fn nothing_arrives_on_a_topic_after_its_unsub_ack() {
    let h = Herald::start(&["--publish-rate", "0", "--subscribe-rate", "0"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = {
        let (url, stop) = (h.url(""), stop.clone());
        tokio::spawn(async move {
            let mut p = Client::connect(&url).await;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..50 {
                    p.send(r#"{"op":"pub","topic":"busy:t","data":1}"#).await;
                }
                // Bounded (some 50,000 a second at most): a flood the
                // socket under test keeps up with on a loaded machine,
                // rather than one that cuts it as a slow consumer.
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        })
    };
    let mut c = h.connect("sub=busy:marker").await;
    // Frames are read in wire order: nothing is set aside.
    async fn until_ack(c: &mut Client, id: &str) {
        loop {
            let v: serde_json::Value = serde_json::from_str(&c.recv_text().await).expect("json");
            if v["op"] == "ack" && v["id"] == id {
                return;
            }
        }
    }
    for round in 0..100 {
        c.send(json!({"op":"sub","topic":"busy:t","id":format!("s{round}")}).to_string())
            .await;
        until_ack(&mut c, &format!("s{round}")).await;
        c.send(json!({"op":"unsub","topic":"busy:t","id":format!("u{round}")}).to_string())
            .await;
        until_ack(&mut c, &format!("u{round}")).await;
        // Published after the client has the ack: it must never arrive.
        // The marker follows it, so once the marker is read, all is read.
        h.publish("busy:t", "\"after\"").await;
        h.publish("busy:marker", &round.to_string()).await;
        loop {
            let v: serde_json::Value = serde_json::from_str(&c.recv_text().await).expect("json");
            assert_ne!(
                v["data"], "after",
                "a message published after the unsub ack arrived (round {round})"
            );
            if v["topic"] == "busy:marker" && v["data"] == round {
                break;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flooder.await.expect("flooder");
}

/// A big room, joined and left in any order across the list's chunks:
/// every member present gets each message exactly once, and nobody who
/// left gets it.
#[tokio::test]
async fn a_big_room_delivers_to_exactly_its_members() {
    let h = Herald::start(&[]);
    let mut members = Vec::new();
    for _ in 0..300 {
        members.push(h.connect("sub=room:big").await);
    }
    // Every third member leaves, some by unsub, some by closing.
    let mut stay = Vec::new();
    for (i, mut c) in members.into_iter().enumerate() {
        match i % 3 {
            0 => {
                let v = c.request(json!({"op":"unsub","topic":"room:big","id":1})).await;
                assert_eq!(v["op"], "ack");
                stay.push((false, c));
            }
            1 if i % 2 == 0 => drop(c),
            _ => stay.push((true, c)),
        }
    }
    let (status, body) = h
        .post("/v1/publish", "", r#"{"topic":"room:big","data":1}"#)
        .await;
    assert_eq!(status, 200, "{body}");
    h.publish("room:big", "2").await;
    let expected = stay.iter().filter(|(member, _)| *member).count();
    for (member, c) in &mut stay {
        if *member {
            assert_eq!(c.recv().await["data"], 1);
            assert_eq!(c.recv().await["data"], 2);
        }
    }
    // The first publish counted each member once (the closed ones may
    // still be leaving, so count only those who asked to leave as gone).
    let deliveries: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(deliveries["deliveries"].as_u64().unwrap() >= expected as u64);
    for (member, c) in &mut stay {
        if !*member {
            c.sub("probe").await;
            h.publish("probe", "0").await;
            assert_eq!(c.recv().await["topic"], "probe", "a member who left got room:big");
        }
    }
}
