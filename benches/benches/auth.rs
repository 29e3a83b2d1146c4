//! Access control's costs: checking a connection token per algorithm (the
//! signature dominates), and checking a subscription against grants.

use divan::{black_box, Bencher};
use herald_broker::Config;
use herald_broker::{Auth, Grants};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

#[global_allocator]
static ALLOC: divan::AllocProfiler = divan::AllocProfiler::system();

fn main() {
    divan::main();
}

fn key(name: &str) -> String {
    format!("{}/../broker/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn token(alg: Algorithm) -> (Auth, String) {
    let read = |n: &str| std::fs::read(key(n)).unwrap();
    let (config, enc) = match alg {
        Algorithm::HS256 => (
            Config {
                auth_hmac_key_file: Some(key("hmac.key")),
                ..Config::default()
            },
            EncodingKey::from_secret(read("hmac.key").trim_ascii()),
        ),
        Algorithm::ES256 => (
            Config {
                auth_public_key_file: Some(key("ec.pub")),
                ..Config::default()
            },
            EncodingKey::from_ec_pem(&read("ec.key")).unwrap(),
        ),
        _ => (
            Config {
                auth_public_key_file: Some(key("rsa.pub")),
                ..Config::default()
            },
            EncodingKey::from_rsa_pem(&read("rsa.key")).unwrap(),
        ),
    };
    let exp = herald_broker::unix_secs() + 3600;
    let claims = serde_json::json!({"sub": "42", "exp": exp,
        "herald": {"subscribe": ["chat:*", "user:42:>"], "publish": ["chat:lobby"]}});
    let t = jsonwebtoken::encode(&Header::new(alg), &claims, &enc).unwrap();
    (Auth::from_config(&config).unwrap().unwrap(), t)
}

#[divan::bench(args = ["HS256", "ES256", "RS256"])]
fn verify_token(bencher: Bencher, alg: &str) {
    let (auth, t) = token(alg.parse().unwrap());
    bencher.bench(|| auth.verify(black_box(&t)).is_ok());
}

#[divan::bench(args = ["user:42:inbox", "chat:*", "orders:>"])]
fn grant_check(pattern: &str) -> bool {
    let g = Grants {
        subscribe: ["chat:*", "user:42:>", "news:eu:*", "ops:alerts"]
            .map(Box::from)
            .to_vec(),
        publish: Vec::new(),
    };
    g.may_subscribe(black_box(pattern))
}
