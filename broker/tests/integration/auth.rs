//! Access control against real nodes: hostile tokens, the grant matrix,
//! refresh and expiry, key rotation, HTTP publish, per-address admission
//! (directly and behind a real HAProxy).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::common::*;

fn keys() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
}

fn key(name: &str) -> String {
    keys().join(name).to_string_lossy().into_owned()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Base64url without padding.
fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn hmac_secret() -> Vec<u8> {
    std::fs::read(keys().join("hmac.key"))
        .unwrap()
        .trim_ascii()
        .to_vec()
}

/// A token for `claims` signed with `alg` by the test key for that family.
fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let pem = |f: &str| std::fs::read(keys().join(f)).unwrap();
    let key = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => EncodingKey::from_secret(&hmac_secret()),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem("ec.key")).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem("ed.key")).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem("rsa.key")).unwrap(),
    };
    let mut h = Header::new(alg);
    h.kid = kid.map(String::from);
    jsonwebtoken::encode(&h, claims, &key).unwrap()
}

/// Good claims for user `sub` with these grants, valid for `ttl` seconds.
fn claims(sub: &str, subscribe: &[&str], publish: &[&str], ttl: u64) -> Value {
    json!({"sub": sub, "aud": "herald", "iss": "tests", "iat": now(), "exp": now() + ttl,
           "herald": {"subscribe": subscribe, "publish": publish}})
}

/// A token assembled by hand: header and claims as given, any signature.
fn forge(header: &str, claims: &str, sig: &str) -> String {
    format!("{}.{}.{sig}", b64(header.as_bytes()), b64(claims.as_bytes()))
}

/// Answer to a handshake carrying `query`: status, and the body of a
/// refusal (a 101 socket is closed at once).
async fn handshake(h: &Herald, query: &str) -> (u16, String) {
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    let (status, head) = handshake_on(&mut s, &format!("/ws?{query}")).await;
    if status == 101 {
        return (status, head);
    }
    let mut body = String::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_string(&mut body)).await;
    (status, body)
}

/// The node's API key in these tests, so a test can publish past auth.
const KEY: &str = "test-api-key";

async fn publish(h: &Herald, topic: &str, data: &str) {
    let body = format!(r#"{{"topic":"{topic}","data":{data}}}"#);
    let (status, text) = h
        .post("/v1/publish", &format!("Authorization: Bearer {KEY}\r\n"), &body)
        .await;
    assert_eq!(status, 200, "{text}");
}

/// Sends a handshake on `stream` and reads the response head: the status
/// and the head's text. The stream stays open (a 101 holds the socket).
async fn handshake_on(stream: &mut TcpStream, path: &str) -> (u16, String) {
    handshake_with(stream, path, "").await
}

/// [`handshake_on`] with `extra` header lines (each ending in CRLF).
async fn handshake_with(stream: &mut TcpStream, path: &str, extra: &str) -> (u16, String) {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, stream.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// A TCP connection to `to` from source address `from` (127.0.0.x).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

fn node_a() -> Herald {
    Herald::start(&[
        "--auth-hmac-key-file",
        &key("hmac.key"),
        "--auth-public-key-file",
        &key("rsa.pub"),
        "--auth-audience",
        "herald",
        "--auth-issuer",
        "tests",
        "--handshake-timeout",
        "2s",
        "--api-key",
        KEY,
    ])
}

/// More than thirty hostile tokens, each refused with 401 `unauthorized`
/// naming the reason at the handshake (and 4501 as a first frame), while a
/// socket with a good token keeps receiving.
#[tokio::test]
async fn hostile_tokens_are_refused_and_nobody_else_notices() {
    let h = node_a();
    let good = |sub: &str| claims(sub, &["chat:*"], &["chat:lobby"], 600);
    let bystander_token = sign(Algorithm::HS256, None, &good("bob"));
    let mut bystander = Client::connect(&h.url(&format!("sub=chat:lobby&token={bystander_token}"))).await;

    let rsa_pub = std::fs::read(keys().join("rsa.pub")).unwrap();
    let hs_with_rsa_pub = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &good("eve"),
        &EncodingKey::from_secret(&rsa_pub),
    )
    .unwrap();
    let hs256 = sign(Algorithm::HS256, None, &good("eve"));
    let parts: Vec<&str> = hs256.split('.').collect();
    let other = sign(Algorithm::HS256, None, &good("mallory"));
    let other_sig = other.rsplit('.').next().unwrap();
    let mut flipped: Vec<char> = hs256.chars().collect();
    let at = flipped.len() - 5;
    flipped[at] = if flipped[at] == 'A' { 'B' } else { 'A' };
    let flipped: String = flipped.into_iter().collect();
    let wrong_secret = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &good("eve"),
        &EncodingKey::from_secret(b"a-completely-different-secret-of-enough-bytes"),
    )
    .unwrap();
    let with = |patch: Value| {
        let mut c = good("eve");
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        sign(Algorithm::HS256, None, &c)
    };
    let hs_claims = |c: &str| {
        let header = r#"{"alg":"HS256","typ":"JWT"}"#;
        let signing = format!("{}.{}", b64(header.as_bytes()), b64(c.as_bytes()));
        // Signed for real, so only the claims are wrong.
        let sig = jsonwebtoken::crypto::sign(
            signing.as_bytes(),
            &EncodingKey::from_secret(&hmac_secret()),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{signing}.{sig}")
    };
    let many: Vec<String> = (0..300).map(|i| format!("t:{i}")).collect();
    let hostile: Vec<(&str, String, &str)> = vec![
        (
            "alg none",
            forge(r#"{"alg":"none","typ":"JWT"}"#, &good("eve").to_string(), ""),
            "malformed",
        ),
        (
            "alg NONE",
            forge(r#"{"alg":"NONE"}"#, &good("eve").to_string(), ""),
            "malformed",
        ),
        (
            "alg missing",
            forge(r#"{"typ":"JWT"}"#, &good("eve").to_string(), "x"),
            "malformed",
        ),
        (
            "HS256 keyed with the RSA public key",
            hs_with_rsa_pub,
            "bad signature",
        ),
        ("HS256 with another secret", wrong_secret, "bad signature"),
        ("a flipped signature byte", flipped, "signature"),
        (
            "another token's signature",
            format!("{}.{}.{other_sig}", parts[0], parts[1]),
            "bad signature",
        ),
        ("no signature", format!("{}.{}.", parts[0], parts[1]), "signature"),
        ("expired", with(json!({"exp": now() - 100})), "expired"),
        ("nbf in the future", with(json!({"nbf": now() + 1000})), "nbf"),
        ("iat in the future", with(json!({"iat": now() + 1000})), "iat"),
        ("wrong aud", with(json!({"aud": "someone-else"})), "aud"),
        ("wrong iss", with(json!({"iss": "someone-else"})), "iss"),
        ("missing exp", with(json!({"exp": null})), "exp"),
        (
            "exp as a string",
            hs_claims(&format!(
                r#"{{"exp":"{}","aud":"herald","iss":"tests"}}"#,
                now() + 60
            )),
            "exp",
        ),
        ("nbf as a string", with(json!({"nbf": "yesterday"})), "nbf"),
        (
            "a 10 KB token",
            format!("{}.{}.{}", parts[0], "A".repeat(10_000), parts[2]),
            "longer than",
        ),
        (
            "bad base64 header",
            format!("e!!!.{}.{}", parts[1], parts[2]),
            "malformed",
        ),
        (
            "bad base64 claims",
            format!("{}.e!!!.{}", parts[0], parts[2]),
            "signature",
        ),
        (
            "a 100 KB token",
            format!("{}.{}.{}", parts[0], "A".repeat(100_000), parts[2]),
            "longer than",
        ),
        ("claims an array", hs_claims("[1,2,3]"), "claims"),
        ("claims a string", hs_claims(r#""hello""#), "claims"),
        (
            "header not JSON",
            format!("{}.{}.{}", b64(b"{nope"), parts[1], parts[2]),
            "malformed",
        ),
        (
            "herald claim a string",
            with(json!({"herald": "everything"})),
            "herald claim",
        ),
        (
            "subscribe grants a string",
            with(json!({"herald": {"subscribe": ">"}})),
            "herald.subscribe",
        ),
        (
            "subscribe grants numbers",
            with(json!({"herald": {"subscribe": [1, 2]}})),
            "herald.subscribe",
        ),
        (
            "an invalid grant pattern",
            with(json!({"herald": {"subscribe": ["a..b"]}})),
            "not a valid pattern",
        ),
        (
            "publish grants an object",
            with(json!({"herald": {"publish": {"a": 1}}})),
            "herald.publish",
        ),
        (
            "300 grants",
            with(json!({"herald": {"subscribe": many}})),
            "more than",
        ),
        ("sub a number", with(json!({"sub": 42})), "sub must be"),
        ("two parts", format!("{}.{}", parts[0], parts[1]), "malformed"),
        ("four parts", format!("{hs256}.extra"), "malformed"),
        ("empty", String::new(), "malformed"),
        (
            "ES256 with no EC key configured",
            sign(Algorithm::ES256, None, &good("eve")),
            "not accepted",
        ),
        (
            "EdDSA with no Ed25519 key configured",
            sign(Algorithm::EdDSA, None, &good("eve")),
            "not accepted",
        ),
        (
            "RS256 from another key",
            {
                let k = EncodingKey::from_rsa_pem(&std::fs::read(keys().join("rsa2.key")).unwrap()).unwrap();
                jsonwebtoken::encode(&Header::new(Algorithm::RS256), &good("eve"), &k).unwrap()
            },
            "bad signature",
        ),
        (
            "HS256 header on an RS256 signature",
            {
                let rs = sign(Algorithm::RS256, None, &good("eve"));
                let p: Vec<&str> = rs.split('.').collect();
                format!("{}.{}.{}", b64(br#"{"alg":"HS256","typ":"JWT"}"#), p[1], p[2])
            },
            "signature",
        ),
    ];
    assert!(hostile.len() >= 30);
    for (what, token, reason) in &hostile {
        let (status, body) = handshake(&h, &format!("token={token}")).await;
        if token.len() > 16_000 {
            // Past the request head limit: refused before any parsing.
            assert_eq!(status, 431, "{what}: {body}");
        } else {
            assert_eq!(status, 401, "{what}: {body}");
            assert!(body.contains("\"unauthorized\""), "{what}: {body}");
            assert!(body.contains(reason), "{what}: expected {reason:?} in {body}");
            assert!(
                !body.contains(token.as_str()) || token.is_empty(),
                "{what}: token echoed"
            );
        }
    }
    // The same tokens as a first frame: close 4501 with the reason.
    for (what, token, reason) in hostile.iter().filter(|(_, t, _)| t.len() < 16_000) {
        let mut c = Client::connect(&h.url("")).await;
        c.send(json!({"op": "auth", "token": token}).to_string()).await;
        let (code, why) = c.recv_close().await;
        assert_eq!(code, 4501, "{what}: {why}");
        assert!(why.starts_with("unauthorized"), "{what}: {why}");
        let short: String = reason.chars().take(20).collect();
        assert!(why.contains(&short) || why.len() >= 120, "{what}: {why}");
    }
    // The 100 KB token as a frame is over the message limit.
    let mut c = Client::connect(&h.url("")).await;
    let huge = &hostile.iter().find(|(w, _, _)| *w == "a 100 KB token").unwrap().1;
    c.send(json!({"op": "auth", "token": huge}).to_string()).await;
    assert_eq!(c.recv_close().await.0, 1009);

    // Good tokens of every family the node's keys imply.
    for alg in [
        Algorithm::HS256,
        Algorithm::HS384,
        Algorithm::HS512,
        Algorithm::RS256,
        Algorithm::PS256,
    ] {
        let t = sign(alg, None, &good("eve"));
        let mut c = Client::connect(&h.url(&format!("token={t}"))).await;
        c.sub("chat:lobby").await;
    }
    let mut first_frame = Client::connect(&h.url("")).await;
    let ack = first_frame
        .request(json!({"op":"auth","token": sign(Algorithm::HS256, None, &good("eve")),"id":1}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    first_frame.sub("chat:lobby").await;

    publish(&h, "chat:lobby", "\"still here\"").await;
    assert_eq!(bystander.recv().await["data"], "still here");
    assert_eq!(first_frame.recv().await["data"], "still here");
}

/// README says `aud` / `iss` are required once `--auth-audience` /
/// `--auth-issuer` are set: a token that leaves either out is refused,
/// naming the claim, at the handshake and as a first frame.
#[tokio::test]
async fn a_configured_audience_and_issuer_must_be_in_the_token() {
    let h = node_a();
    for (what, drop) in [
        ("no aud", &["aud"][..]),
        ("no iss", &["iss"]),
        ("neither", &["aud", "iss"]),
    ] {
        let mut c = claims("eve", &["chat:*"], &[], 600);
        for k in drop {
            c.as_object_mut().unwrap().remove(*k);
        }
        let token = sign(Algorithm::HS256, None, &c);
        let (status, body) = handshake(&h, &format!("token={token}")).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert!(body.contains("missing claim"), "{what}: {body}");
        let mut s = Client::connect(&h.url("")).await;
        s.send(json!({"op": "auth", "token": token}).to_string()).await;
        let (code, why) = s.recv_close().await;
        assert_eq!(code, 4501, "{what}: {why}");
        assert!(why.contains("missing claim"), "{what}: {why}");
    }
    // With both, the same token is admitted.
    let token = sign(Algorithm::HS256, None, &claims("eve", &["chat:*"], &[], 600));
    assert_eq!(handshake(&h, &format!("token={token}")).await.0, 101);
}

/// `alg: none` (in any case) is refused for what it is, an unsigned token,
/// and an `alg` that names no algorithm is named; not as claims of the
/// wrong type.
#[tokio::test]
async fn alg_none_is_refused_as_an_unsigned_token() {
    let h = node_a();
    let c = claims("eve", &["chat:*"], &[], 600).to_string();
    for (header, reason) in [
        (r#"{"alg":"none","typ":"JWT"}"#, "unsigned token"),
        (r#"{"alg":"NONE"}"#, "unsigned token"),
        (r#"{"alg":"HS999"}"#, "not a JWS algorithm"),
    ] {
        let token = forge(header, &c, "");
        let (status, body) = handshake(&h, &format!("token={token}")).await;
        assert_eq!(status, 401, "{header}: {body}");
        assert!(body.contains(reason), "{header}: expected {reason:?} in {body}");
        assert!(!body.contains("claims are not"), "{header}: {body}");
    }
}

/// README: `--api-key-file` is re-read on SIGHUP and when it changes. A
/// key file rewritten in place (as a mounted Secret is) takes effect
/// within the watcher's 5 s without a signal, with a token key configured
/// and without one.
#[tokio::test]
async fn an_api_key_file_is_re_read_when_it_changes() {
    let dir = std::env::temp_dir().join(format!("herald-apikeys-changed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, token_key) in [false, true].into_iter().enumerate() {
        let file = dir.join(format!("keys-{i}"));
        std::fs::write(&file, "# publishers\nold-key\n").unwrap();
        let mut args = vec!["--api-key-file", file.to_str().unwrap()];
        let hmac = key("hmac.key");
        if token_key {
            args.extend(["--auth-hmac-key-file", &hmac]);
        }
        let h = Herald::start_logged_at("info", &args);
        let body = r#"{"topic":"chat:lobby","data":1}"#;
        let with = |k: &'static str| format!("Authorization: Bearer {k}\r\n");
        assert_eq!(h.post("/v1/publish", &with("old-key"), body).await.0, 200);
        assert_eq!(h.post("/v1/publish", &with("new-key"), body).await.0, 401);
        // A later modification time than the first read, however coarse
        // the file system's clock.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        std::fs::write(&file, "new-key\n").unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        while h.post("/v1/publish", &with("new-key"), body).await.0 != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "token key {token_key}: the changed key file was not re-read: {:#?}",
                h.log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(h.post("/v1/publish", &with("old-key"), body).await.0, 401);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An HMAC key under 32 bytes is refused before the node binds its port:
/// it never prints `herald listening on …` and then exits.
#[tokio::test]
async fn a_short_hmac_key_is_refused_before_the_node_listens() {
    let dir = std::env::temp_dir().join(format!("herald-shortkey-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let short = dir.join("hmac");
    std::fs::write(&short, "only-twenty-bytes-xx").unwrap();
    let stderr = Herald::refusal(&["--auth-hmac-key-file", short.to_str().unwrap()]);
    assert!(stderr.contains("32 bytes"), "{stderr}");
    let stderr = Herald::refusal(&["--api-key-file", dir.join("absent").to_str().unwrap()]);
    assert!(stderr.contains("absent"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every key kind: ES256 and RS256 by `kid` from a JWKS (an unknown kid is
/// refused), EdDSA and ES256 from PEM public keys; a JWKS re-read on SIGHUP
/// rotates keys without a restart.
#[tokio::test]
async fn jwks_kids_pem_keys_and_rotation() {
    let dir = std::env::temp_dir().join(format!("herald-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks = dir.join("jwks.json");
    std::fs::copy(keys().join("jwks.json"), &jwks).unwrap();
    let h = Herald::start(&["--auth-jwks-file", jwks.to_str().unwrap()]);
    let c = claims("ann", &["a:>"], &[], 600);
    for (alg, kid) in [(Algorithm::RS256, "r1"), (Algorithm::ES256, "e1")] {
        let (status, body) = handshake(&h, &format!("token={}", sign(alg, Some(kid), &c))).await;
        assert_eq!(status, 101, "{kid}: {body}");
    }
    let (status, body) = handshake(&h, &format!("token={}", sign(Algorithm::RS256, Some("zz"), &c))).await;
    assert_eq!(status, 401);
    assert!(body.contains("unknown kid"), "{body}");
    let (status, body) = handshake(&h, &format!("token={}", sign(Algorithm::ES256, Some("r1"), &c))).await;
    assert_eq!(status, 401, "an EC token under an RSA kid: {body}");
    // Rotate: r1 goes, r2 comes.
    std::fs::copy(keys().join("jwks-rotated.json"), &jwks).unwrap();
    unsafe_kill(h.pid(), "HUP");
    let rsa2 = EncodingKey::from_rsa_pem(&std::fs::read(keys().join("rsa2.key")).unwrap()).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("r2".into());
    let r2 = jsonwebtoken::encode(&header, &c, &rsa2).unwrap();
    let r1 = sign(Algorithm::RS256, Some("r1"), &c);
    eventually("the rotated JWKS is in use", || {
        let (h, r1, r2) = (&h, &r1, &r2);
        async move {
            handshake(h, &format!("token={r2}")).await.0 == 101
                && handshake(h, &format!("token={r1}")).await.0 == 401
        }
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);

    for (pem, alg) in [("ed.pub", Algorithm::EdDSA), ("ec.pub", Algorithm::ES256)] {
        let h = Herald::start(&["--auth-public-key-file", &key(pem)]);
        let (status, body) = handshake(&h, &format!("token={}", sign(alg, None, &c))).await;
        assert_eq!(status, 101, "{pem}: {body}");
        let (status, _) = handshake(&h, &format!("token={}", sign(Algorithm::HS256, None, &c))).await;
        assert_eq!(status, 401, "{pem}: an HS token against a public key");
    }
}

fn unsafe_kill(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} {pid}");
}

/// The grant matrix: wildcard escalations refused over frames, URL and raw
/// mode, publishes checked per topic, HTTP publish by key, token and
/// anonymous grants.
#[tokio::test]
async fn grants_cover_exactly_what_they_name() {
    let dir = std::env::temp_dir().join(format!("herald-apikeys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("keys");
    std::fs::write(&key_file, "# rotated monthly\nold-key-0123\n\nnew-key-4567\n").unwrap();
    let h = Herald::start(&[
        "--auth-hmac-key-file",
        &key("hmac.key"),
        "--anonymous-subscribe",
        "public:>",
        "--anonymous-publish",
        "public:guestbook",
        "--api-key-file",
        key_file.to_str().unwrap(),
    ]);
    let t = sign(
        Algorithm::HS256,
        None,
        &claims(
            "42",
            &["orders:eu:*", "user:42:>"],
            &["orders:eu:7", "chat:*"],
            600,
        ),
    );
    let mut c = Client::connect(&h.url(&format!("token={t}"))).await;
    for ok in ["orders:eu:7", "orders:eu:*", "user:42:inbox", "user:42:>"] {
        c.sub(ok).await;
    }
    for (i, refused) in [
        "orders:>",
        "orders:*:7",
        "*:eu:7",
        ">",
        "*",
        "user:*:inbox",
        "user:43:x",
        "orders:eu",
    ]
    .iter()
    .enumerate()
    {
        let v = c.request(json!({"op":"sub","topic":refused,"id":i})).await;
        assert_eq!(v["code"], "forbidden", "{refused}: {v}");
        assert!(v["message"].as_str().unwrap().contains(refused), "{v}");
    }
    c.publish("orders:eu:7", json!(1)).await;
    assert_eq!(c.recv().await["topic"], "orders:eu:7", "own publish, subscribed");
    let v = c
        .request(json!({"op":"pub","topic":"orders:eu:8","data":1,"id":"x"}))
        .await;
    assert_eq!(v["code"], "forbidden", "{v}");
    c.publish("chat:any", json!(2)).await;

    // URL subscriptions and raw mode follow the same grants.
    for (query, status) in [
        ("sub=orders:eu:*", 101),
        ("sub=orders:%3E", 403),
        ("sub=user:42:a&sub=user:41:a", 403),
        ("topic=orders:eu:7&format=raw", 101),
        ("topic=orders:us:7&format=raw", 403),
    ] {
        let (got, body) = handshake(&h, &format!("{query}&token={t}")).await;
        assert_eq!(got, status, "{query}: {body}");
        if status == 403 {
            assert!(body.contains("forbidden"), "{body}");
        }
    }
    // A raw socket whose token may subscribe but not publish there.
    let sub_only = sign(Algorithm::HS256, None, &claims("7", &["orders:eu:*"], &[], 600));
    let mut raw = Client::connect(&h.url(&format!("topic=orders:eu:1&format=raw&token={sub_only}"))).await;
    raw.send("hello").await;
    let v = raw.recv().await;
    assert_eq!(v["code"], "forbidden", "{v}");

    // Anonymous: only what the flags grant.
    assert_eq!(handshake(&h, "sub=public:news").await.0, 101);
    assert_eq!(handshake(&h, "sub=orders:eu:1").await.0, 403);
    let mut anon = Client::connect(&h.url("sub=public:news")).await;
    let v = anon
        .request(json!({"op":"sub","topic":"orders:eu:1","id":1}))
        .await;
    assert_eq!(v["code"], "forbidden", "{v}");

    // HTTP publish.
    let post = |auth: Option<String>, topic: &str| {
        let headers = auth
            .map(|a| format!("Authorization: Bearer {a}\r\n"))
            .unwrap_or_default();
        let body = json!({"topic": topic, "data": 1}).to_string();
        let h = &h;
        async move { h.post("/v1/publish", &headers, &body).await }
    };
    assert_eq!(
        post(Some("old-key-0123".into()), "orders:us:1").await.0,
        200,
        "API key: any topic"
    );
    assert_eq!(post(Some("new-key-4567".into()), "x").await.0, 200);
    assert_eq!(post(Some("wrong-key".into()), "x").await.0, 401);
    assert_eq!(
        post(Some(t.clone()), "orders:eu:7").await.0,
        200,
        "token with the grant"
    );
    let (status, body) = post(Some(t.clone()), "orders:eu:8").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("forbidden"), "{body}");
    assert_eq!(
        post(Some(sub_only.clone()), "orders:eu:1").await.0,
        403,
        "no publish grant"
    );
    let (status, body) = post(None, "public:guestbook").await;
    assert_eq!(status, 401, "API keys configured: a bearer is needed: {body}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without API keys, anonymous HTTP publishes get the anonymous grants;
/// a socket that presents no token and may do nothing without one is
/// closed with 4501 after the handshake timeout.
#[tokio::test]
async fn anonymous_clients_get_only_the_anonymous_grants() {
    let h = Herald::start(&[
        "--auth-hmac-key-file",
        &key("hmac.key"),
        "--anonymous-publish",
        "public:guestbook",
        "--handshake-timeout",
        "1s",
    ]);
    let ok = h
        .post("/v1/publish", "", r#"{"topic":"public:guestbook","data":1}"#)
        .await;
    assert_eq!(ok.0, 200, "{}", ok.1);
    let no = h.post("/v1/publish", "", r#"{"topic":"chat:x","data":1}"#).await;
    assert_eq!(no.0, 403, "{}", no.1);
    // Nothing is granted without a token here: a silent socket must
    // authenticate within the handshake timeout.
    let h2 = Herald::start(&[
        "--auth-hmac-key-file",
        &key("hmac.key"),
        "--handshake-timeout",
        "1s",
    ]);
    let mut silent = Client::connect(&h2.url("")).await;
    let (code, why) = silent.recv_close().await;
    assert_eq!(code, 4501, "{why}");
    assert!(why.contains("no token"), "{why}");
    // auth must come first.
    let mut late = Client::connect(&h2.url("")).await;
    let v = late.request(json!({"op":"sub","topic":"a","id":1})).await;
    assert_eq!(v["code"], "forbidden", "{v}");
    let t = sign(Algorithm::HS256, None, &claims("1", &["a"], &[], 600));
    let v = late.request(json!({"op":"auth","token":t,"id":2})).await;
    assert_eq!(v["code"], "bad_request", "{v}");
}

/// A refreshed session outlives its first token; one that is not refreshed
/// is closed with 4003; a narrower refresh ends the subscriptions outside
/// it; a refresh to another user is refused.
#[tokio::test]
async fn refresh_extends_and_narrows_expiry_closes() {
    let h = Herald::start(&[
        "--auth-hmac-key-file",
        &key("hmac.key"),
        "--auth-leeway",
        "0s",
        "--api-key",
        KEY,
    ]);
    let short = |sub: &str, grants: &[&str]| sign(Algorithm::HS256, None, &claims(sub, grants, &[], 2));
    let long = |sub: &str, grants: &[&str]| sign(Algorithm::HS256, None, &claims(sub, grants, &[], 600));
    let first_exp = now() + 2;
    let mut refreshed = Client::connect(&h.url(&format!(
        "sub=chat:a&token={}",
        short("ann", &["chat:*", "news:*"])
    )))
    .await;
    let mut lapsed =
        Client::connect(&h.url(&format!("sub=chat:a&token={}", short("bob", &["chat:*"])))).await;
    let mut narrowed = Client::connect(&h.url(&format!("token={}", long("cy", &["chat:*", "news:*"])))).await;
    narrowed.sub("chat:a").await;
    narrowed.sub("news:x").await;

    let v = refreshed
        .request(json!({"op":"refresh","token": long("mallory", &[">"]),"id":1}))
        .await;
    assert_eq!(v["code"], "unauthorized", "another sub: {v}");
    let v = refreshed
        .request(json!({"op":"refresh","token": long("ann", &["chat:*"]),"id":2}))
        .await;
    assert_eq!(v["op"], "ack", "{v}");

    let v = narrowed
        .request(json!({"op":"refresh","token": long("cy", &["chat:*"]),"id":3}))
        .await;
    assert_eq!(v["op"], "ack", "{v}");
    let e = narrowed.recv().await;
    assert_eq!(e["code"], "forbidden", "{e}");
    assert!(e["message"].as_str().unwrap().contains("news:x"), "{e}");

    let (code, why) = lapsed.recv_close().await;
    assert_eq!(code, 4003, "{why}");
    assert!(why.starts_with("token_expired"), "{why}");
    assert!(now() >= first_exp, "closed no earlier than exp");

    // Past the first token's exp, the refreshed socket still receives.
    publish(&h, "news:x", "0").await;
    publish(&h, "chat:a", "\"after exp\"").await;
    assert_eq!(refreshed.recv().await["data"], "after exp");
    assert_eq!(narrowed.recv().await["data"], "after exp", "news:x was dropped");
}

/// A burst of 2,000 handshakes from one address gets 429s with Retry-After,
/// and the address never holds more than its limit; another address
/// still connects.
#[tokio::test]
async fn per_address_limits_refuse_a_burst_but_not_others() {
    let h = Herald::start(&["--max-connections-per-ip", "50", "--connect-rate-per-ip", "100"]);
    let mut held = Vec::new();
    let mut statuses = std::collections::HashMap::<u16, usize>::new();
    let mut retry_after = 0;
    for _ in 0..20 {
        let attempts = (0..100).map(|_| async {
            let mut s = connect_from("127.0.0.1", h.addr).await;
            let (status, head) = handshake_on(&mut s, "/ws").await;
            (s, status, head)
        });
        for (s, status, head) in futures_util::future::join_all(attempts).await {
            *statuses.entry(status).or_default() += 1;
            if status == 429 && head.to_ascii_lowercase().contains("retry-after:") {
                retry_after += 1;
            }
            if status == 101 {
                held.push(s);
            }
        }
    }
    assert!(held.len() <= 50, "{statuses:?}");
    assert!(statuses.get(&429).copied().unwrap_or(0) >= 1900, "{statuses:?}");
    assert_eq!(retry_after, statuses[&429], "every 429 says when to retry");
    let mut other = connect_from("127.0.0.2", h.addr).await;
    assert_eq!(handshake_on(&mut other, "/ws").await.0, 101, "another address");
    // Closing the held sockets frees the address's count.
    drop(held);
    eventually("the address may connect again", || async {
        let mut s = connect_from("127.0.0.1", h.addr).await;
        handshake_on(&mut s, "/ws").await.0 == 101
    })
    .await;
}

/// Behind a real HAProxy, the per-address limit applies to the real
/// client's address: from X-Forwarded-For, then from PROXY v1 and v2.
#[tokio::test]
async fn behind_haproxy_the_limit_follows_the_real_client() {
    for (server_opts, defaults) in [
        ("", "  option forwardfor\n"),
        ("send-proxy", ""),
        ("send-proxy-v2", ""),
    ] {
        let h = Herald::start(&[
            "--max-connections-per-ip",
            "3",
            "--trusted-proxies",
            "127.0.0.1/32",
        ]);
        let lb = crate::external::Haproxy::start_with(&[h.addr], server_opts, defaults).await;
        let to: SocketAddr = format!("127.0.0.1:{}", lb.port).parse().unwrap();
        let mut held = Vec::new();
        // Each claims another address of its own: the proxy's own hop, last,
        // is the one believed.
        let forged = |i: usize| {
            format!(
                "X-Forwarded-For: 198.51.100.{i}\r\nX-Forwarded-For: 127.0.0.{}\r\n",
                5 + i
            )
        };
        for i in 0..3 {
            let mut s = connect_from("127.0.0.2", to).await;
            let (status, head) = handshake_with(&mut s, "/ws", &forged(i)).await;
            assert_eq!(status, 101, "{server_opts}{defaults} #{i}: {head}");
            held.push(s);
        }
        let mut s = connect_from("127.0.0.2", to).await;
        let (status, head) = handshake_with(&mut s, "/ws", &forged(3)).await;
        assert_eq!(
            status, 429,
            "{server_opts}{defaults}: the 4th from one client: {head}"
        );
        for from in ["127.0.0.3", "127.0.0.4"] {
            let mut s = connect_from(from, to).await;
            let (status, head) = handshake_on(&mut s, "/ws").await;
            assert_eq!(status, 101, "{server_opts}{defaults}: {from}: {head}");
            held.push(s);
        }
    }
}

/// From a trusted proxy, an `X-Forwarded-For` hop that is not an address
/// is refused with 400 naming it: the node never falls back to the proxy's
/// own address (which would put every such client on one address, or make
/// a remote client loopback).
#[tokio::test]
async fn a_forwarded_hop_that_does_not_parse_is_refused() {
    let h = Herald::start(&[
        "--max-connections-per-ip",
        "1",
        "--trusted-proxies",
        "127.0.0.1/32",
    ]);
    for extra in [
        "X-Forwarded-For: unknown\r\n",
        "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-For: unknown\r\n",
        "X-Forwarded-For: 203.0.113.9, _hidden\r\n",
    ] {
        let mut s = connect_from("127.0.0.1", h.addr).await;
        let (status, head) = handshake_with(&mut s, "/ws", extra).await;
        assert_eq!(status, 400, "{extra:?}: {head}");
    }
    // A good chain still works, and names the client: one socket each.
    let mut held = Vec::new();
    for client in ["203.0.113.9", "203.0.113.10"] {
        let mut s = connect_from("127.0.0.1", h.addr).await;
        let extra = format!("X-Forwarded-For: {client}\r\n");
        let (status, head) = handshake_with(&mut s, "/ws", &extra).await;
        assert_eq!(status, 101, "{client}: {head}");
        held.push(s);
    }
}

/// `--connect-rate` paces new sockets node-wide, whatever their address:
/// past the burst they get 503 `overloaded` with Retry-After, never more
/// than the bucket allows for the time taken, and the sockets already held
/// stay; a moment later new ones are taken again.
#[tokio::test]
async fn the_node_wide_connect_rate_sheds_a_burst_with_503() {
    let h = Herald::start(&["--connect-rate", "20"]);
    let mut held = h.connect("sub=kept").await;
    let started = std::time::Instant::now();
    let attempts = (0..200).map(|i| async move {
        let mut s = connect_from(&format!("127.0.0.{}", 2 + i % 50), h.addr).await;
        let (status, head) = handshake_on(&mut s, "/ws").await;
        (s, status, head)
    });
    let results = futures_util::future::join_all(attempts).await;
    let elapsed = started.elapsed().as_secs_f64();
    let opened = results.iter().filter(|r| r.1 == 101).count();
    let shed: Vec<_> = results.iter().filter(|r| r.1 == 503).collect();
    assert_eq!(opened + shed.len(), 200, "only 101 or 503");
    // The burst was spent by the first socket and these; the bucket
    // refills at 20 a second.
    assert!(
        opened as f64 <= 20.0 + 20.0 * elapsed + 1.0,
        "{opened} opened in {elapsed:.2} s"
    );
    assert!(!shed.is_empty());
    for (_, _, head) in &shed {
        let head = head.to_ascii_lowercase();
        assert!(head.contains("retry-after: 1"), "{head}");
    }
    // Each refusal is counted under its code (the body names it too).
    let counted = h.metric("herald_errors_total{code=\"overloaded\"}").await;
    assert_eq!(counted, shed.len() as f64);
    // The socket held before the burst still works.
    h.publish("kept", "1").await;
    assert_eq!(held.recv().await["data"], 1);
    eventually("new sockets are taken again", || async {
        let mut s = connect_from("127.0.0.1", h.addr).await;
        handshake_on(&mut s, "/ws").await.0 == 101
    })
    .await;
}

/// A handshake's token is checked only after the cheap limits took it: a
/// burst of handshakes with badly signed tokens from one address is shed
/// with 429 past `--connect-rate-per-ip` (and node-wide with 503 past
/// `--connect-rate`), not each verified and answered 401; and a refused
/// token keeps neither the address's count nor a connection slot.
#[tokio::test]
async fn bad_tokens_are_rate_limited_before_they_are_verified() {
    let c = claims("mallory", &["chat:>"], &[], 3600);
    let good = sign(Algorithm::ES256, None, &c);
    // The same token with another signature: well formed, verified, refused.
    let (head, sig) = good.rsplit_once('.').unwrap();
    let flipped: String = sig
        .chars()
        .rev()
        .map(|ch| if ch == 'A' { 'B' } else { 'A' })
        .collect();
    let bad = format!("{head}.{flipped}");
    let ec = key("ec.pub");
    let at = |h: &Herald, path: &str, token: &str| {
        let (addr, path) = (h.addr, format!("{path}?token={token}"));
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            handshake_on(&mut s, &path).await.0
        }
    };
    for ((flags, shed), path) in [
        (["--connect-rate-per-ip", "5"], 429),
        (["--connect-rate", "5"], 503),
    ]
    .into_iter()
    .flat_map(|f| [(f, "/ws"), (f, "/echo")])
    {
        let mut args = vec!["--auth-public-key-file", ec.as_str(), "--exec", "/echo=cat"];
        args.extend(flags);
        args.extend(["--max-connections-per-ip", "1"]);
        let h = Herald::start(&args);
        let attempts = (0..100).map(|_| at(&h, path, &bad));
        let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
        for status in futures_util::future::join_all(attempts).await {
            *statuses.entry(status).or_default() += 1;
        }
        let refused = statuses.get(&401).copied().unwrap_or(0);
        // 429 also when another handshake of the burst holds the address's
        // one slot for the moment its token is checked.
        assert!(
            statuses.keys().all(|s| [401, 429, 503].contains(s)),
            "{path} {flags:?}: {statuses:?}"
        );
        assert!(
            statuses.get(&shed).copied().unwrap_or(0) >= 50,
            "{path} {flags:?}: past the rate, shed before the token is verified: {statuses:?}"
        );
        let verified = h.metric("herald_errors_total{code=\"unauthorized\"}").await;
        assert_eq!(verified, refused as f64, "{path} {flags:?}");
        // Nothing of the refused handshakes is held: the one socket the
        // address may have opens once the rate allows.
        assert_eq!(h.metric("herald_connections").await, 0.0, "{path} {flags:?}");
        eventually("a good token connects once the rate allows", || async {
            at(&h, path, &good).await == 101
        })
        .await;
    }
}
