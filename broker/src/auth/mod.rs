//! Who a socket or request is, and what it may do: connection tokens (JWT,
//! RFC 7519) checked against the configured keys, and the grants they carry.
//!
//! The algorithms a token may use are exactly those its key implies: an HMAC
//! secret accepts HS256/384/512, an RSA key RS* and PS*, an EC key ES256/384,
//! an Ed25519 key EdDSA. `alg: none` names no algorithm at all and is
//! refused by the parser, with that reason. A configured audience or
//! issuer must be present in the token, and match. Parsing and signatures
//! are `jsonwebtoken`'s; this module picks the key, checks the claims
//! Herald adds (`herald` grants, `iat`), and turns every failure into a short reason for the client.
//!
//! Uses: `sync`, `clock`, `config`.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use herald_protocol::topic::covers;
use herald_protocol::{ErrorCode, ErrorReply, Pattern};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::config::Config;
use crate::sync::{Lock, ReadWrite};

/// Longest token accepted, in bytes. A token with a few dozen grants is
/// well under 2 KiB.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Most patterns a token may grant for subscribing and for publishing each.
pub const MAX_GRANTS: usize = 256;

/// Why a node could not load its keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// A key file's contents are not a key of the kind expected.
    #[error("{path}: {message}")]
    Bad {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// What a socket or request may do. `None` in a session means the node has
/// no access control: everything is allowed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Grants {
    /// Patterns the holder may subscribe within.
    pub subscribe: Vec<Box<str>>,
    /// Patterns whose topics the holder may publish to.
    pub publish: Vec<Box<str>>,
}

impl Grants {
    /// Whether a subscription to `pattern` is allowed: every topic it can
    /// match must be covered by one granted pattern.
    pub fn may_subscribe(&self, pattern: &str) -> bool {
        self.subscribe.iter().any(|g| covers(g, pattern))
    }

    /// Whether a publish to the concrete `topic` is allowed.
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|g| covers(g, topic))
    }

    /// Grants nothing.
    pub fn is_empty(&self) -> bool {
        self.subscribe.is_empty() && self.publish.is_empty()
    }
}

/// Whom a verified token names, and what it grants.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The token's `sub`, if any.
    pub user: Option<Arc<str>>,
    /// What the token grants.
    pub grants: Arc<Grants>,
    /// Unix time (seconds) after which the token is no longer valid,
    /// leeway included.
    pub expires: u64,
}

impl Identity {
    /// The grants of clients without a token (`--anonymous-*`).
    pub fn anonymous(grants: Arc<Grants>) -> Identity {
        Identity {
            user: None,
            grants,
            expires: u64::MAX,
        }
    }

    /// Whether this came from a token (rather than the anonymous grants).
    pub fn has_token(&self) -> bool {
        self.expires != u64::MAX
    }

    /// Why this holder may not subscribe to (or publish on) `topic`, if its
    /// grants do not allow it: the text of a `forbidden` error.
    pub fn forbids(&self, topic: &str, publish: bool) -> Option<String> {
        let (ok, verb) = if publish {
            (self.grants.may_publish(topic), "publish to")
        } else {
            (self.grants.may_subscribe(topic), "subscribe to")
        };
        let who = self.user.as_deref().unwrap_or("anonymous");
        (!ok).then(|| format!("forbidden: {who:?} may not {verb} {topic:?}"))
    }
}

/// One key a token can be checked with.
struct Verifier {
    /// Set for keys from a JWKS: a token must name it.
    kid: Option<String>,
    key: DecodingKey,
    validation: Validation,
}

/// The node's token settings and keys. Keys from `--auth-jwks-file` can be
/// re-read ([`Auth::reload`]) while the node runs.
pub struct Auth {
    verifiers: RwLock<Vec<Verifier>>,
    /// Grants of sockets and requests without a token.
    pub anonymous: Arc<Grants>,
    leeway: u64,
    audience: Option<String>,
    issuer: Option<String>,
    hmac: Option<String>,
    public: Option<String>,
    jwks: Option<String>,
    /// The key files' modification times when last read.
    stamps: std::sync::Mutex<Vec<Option<SystemTime>>>,
}

fn read(path: &str) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })
}

fn bad(path: &str, message: impl Into<String>) -> KeyError {
    KeyError::Bad {
        path: path.to_owned(),
        message: message.into(),
    }
}

const HS: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];
const EC: [Algorithm; 2] = [Algorithm::ES256, Algorithm::ES384];
const ED: [Algorithm; 1] = [Algorithm::EdDSA];

impl Auth {
    /// The node's token settings, or `None` when no key is configured (the
    /// node is open). Reads every key file once.
    pub fn from_config(config: &Config) -> Result<Option<Self>, KeyError> {
        let (hmac, public, jwks) = (
            config.auth_hmac_key_file.clone(),
            config.auth_public_key_file.clone(),
            config.auth_jwks_file.clone(),
        );
        if hmac.is_none() && public.is_none() && jwks.is_none() {
            return Ok(None);
        }
        let grants = |v: &[String]| v.iter().map(|p| Box::from(p.as_str())).collect();
        let auth = Auth {
            verifiers: RwLock::new(Vec::new()),
            anonymous: Arc::new(Grants {
                subscribe: grants(&config.anonymous_subscribe),
                publish: grants(&config.anonymous_publish),
            }),
            leeway: config.auth_leeway.as_secs(),
            audience: config.auth_audience.clone(),
            issuer: config.auth_issuer.clone(),
            hmac,
            public,
            jwks,
            stamps: Default::default(),
        };
        auth.reload()?;
        Ok(Some(auth))
    }

    fn validation(&self, algs: &[Algorithm]) -> Validation {
        let mut v = Validation::new(algs[0]);
        v.algorithms = algs.to_vec();
        v.leeway = self.leeway;
        v.validate_exp = true;
        v.validate_nbf = true;
        // A configured audience or issuer is required, not only checked
        // when present: a token that leaves the claim out was not minted
        // for this node.
        let mut required = vec!["exp"];
        required.extend(self.audience.as_ref().map(|_| "aud"));
        required.extend(self.issuer.as_ref().map(|_| "iss"));
        v.set_required_spec_claims(&required);
        if let Some(a) = &self.audience {
            v.set_audience(&[a]);
        } else {
            v.validate_aud = false;
        }
        if let Some(i) = &self.issuer {
            v.set_issuer(&[i]);
        }
        v
    }

    fn stamps(&self) -> Vec<Option<SystemTime>> {
        [&self.hmac, &self.public, &self.jwks]
            .iter()
            .map(|p| {
                let p = p.as_ref()?;
                std::fs::metadata(p).and_then(|m| m.modified()).ok()
            })
            .collect()
    }

    /// Whether a key file changed since it was read (a mounted Secret
    /// updated in place): the node then reloads without a SIGHUP.
    pub fn changed(&self) -> bool {
        *self.stamps.locked() != self.stamps()
    }

    /// Reads the key files again (SIGHUP, or a file changed: a rotated
    /// JWKS). On an error the keys in use stay as they were.
    pub fn reload(&self) -> Result<usize, KeyError> {
        let stamps = self.stamps();
        let mut out = Vec::new();
        if let Some(path) = &self.hmac {
            let secret = read(path)?;
            let secret = secret.trim_ascii();
            if secret.len() < 32 {
                return Err(bad(path, "an HMAC key needs at least 32 bytes"));
            }
            out.push(Verifier {
                kid: None,
                key: DecodingKey::from_secret(secret),
                validation: self.validation(&HS),
            });
        }
        if let Some(path) = &self.public {
            let pem = read(path)?;
            let (key, algs) = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (k, &RSA[..])
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (k, &EC[..])
            } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
                (k, &ED[..])
            } else {
                return Err(bad(path, "not a PEM RSA, EC or Ed25519 public key"));
            };
            out.push(Verifier {
                kid: None,
                key,
                validation: self.validation(algs),
            });
        }
        if let Some(path) = &self.jwks {
            let set: JwkSet =
                serde_json::from_slice(&read(path)?).map_err(|e| bad(path, format!("not a JWKS: {e}")))?;
            for jwk in &set.keys {
                let kid = jwk
                    .common
                    .key_id
                    .clone()
                    .ok_or_else(|| bad(path, "every key in the JWKS needs a kid"))?;
                let algs: &[Algorithm] = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => &RSA,
                    AlgorithmParameters::EllipticCurve(_) => &EC,
                    AlgorithmParameters::OctetKeyPair(_) => &ED,
                    AlgorithmParameters::OctetKey(_) => &HS,
                };
                let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(path, format!("key {kid:?}: {e}")))?;
                out.push(Verifier {
                    kid: Some(kid),
                    key,
                    validation: self.validation(algs),
                });
            }
        }
        let n = out.len();
        *self.verifiers.writing() = out;
        *self.stamps.locked() = stamps;
        Ok(n)
    }

    /// Checks `token` and returns whom it names and what it grants, or a
    /// reason fit to show the client (never the token itself).
    pub fn verify(&self, token: &str) -> Result<Identity, String> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(format!("token longer than {MAX_TOKEN_LEN} bytes"));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match header_alg(token) {
            Some(alg) if alg.eq_ignore_ascii_case("none") => {
                "malformed token: alg \"none\" (an unsigned token) is never accepted".to_owned()
            }
            Some(alg) => format!("malformed token: alg {:?} is not a JWS algorithm", shorten(&alg)),
            None => format!("malformed token: {}", reason(e.kind())),
        })?;
        let verifiers = self.verifiers.reading();
        let verifier = match &header.kid {
            Some(kid) if verifiers.iter().any(|v| v.kid.is_some()) => verifiers
                .iter()
                .find(|v| v.kid.as_deref() == Some(kid))
                .ok_or_else(|| format!("unknown kid {:?}", shorten(kid)))?,
            _ => verifiers
                .iter()
                .find(|v| v.kid.is_none() && v.validation.algorithms.contains(&header.alg))
                .ok_or_else(|| format!("algorithm {:?} not accepted by the configured keys", header.alg))?,
        };
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &verifier.key, &verifier.validation)
            .map_err(|e| reason(e.kind()))?;
        drop(verifiers);
        self.identity(&data.claims)
    }

    /// Checks `token` as the replacement of `old`'s: it must be valid and
    /// name the same `sub`. The error is an error frame's code and text.
    pub fn refresh(&self, old: &Identity, token: &str) -> Result<Identity, ErrorReply> {
        if !old.has_token() {
            let msg = "refresh replaces a token; this socket has none (send auth first)";
            return Err(ErrorReply::new(ErrorCode::BadRequest, msg));
        }
        let new = self.verify(token).map_err(|why| {
            let msg = format!("unauthorized: {why}; the current token stays until it expires");
            ErrorReply::new(ErrorCode::Unauthorized, msg)
        })?;
        if new.user != old.user {
            let msg = "unauthorized: a refreshed token must name the same sub";
            return Err(ErrorReply::new(ErrorCode::Unauthorized, msg));
        }
        Ok(new)
    }

    fn identity(&self, claims: &Map<String, Value>) -> Result<Identity, String> {
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or("exp must be a number of seconds")?;
        if claims.get("nbf").is_some_and(|n| !n.is_u64()) {
            return Err("nbf must be a number of seconds".into());
        }
        if let Some(iat) = claims.get("iat") {
            let iat = iat.as_u64().ok_or("iat must be a number of seconds")?;
            if iat > crate::clock::unix_secs() + self.leeway {
                return Err("iat is in the future".into());
            }
        }
        let user = match claims.get("sub") {
            None => None,
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => Some(Arc::from(s.as_str())),
            Some(_) => return Err("sub must be a string of 1 to 256 bytes".into()),
        };
        let grants = match claims.get("herald") {
            None => Grants::default(),
            Some(Value::Object(h)) => Grants {
                subscribe: patterns(h.get("subscribe"), "subscribe")?,
                publish: patterns(h.get("publish"), "publish")?,
            },
            Some(_) => return Err("the herald claim must be an object".into()),
        };
        Ok(Identity {
            user,
            grants: Arc::new(grants),
            expires: exp.saturating_add(self.leeway),
        })
    }
}

/// A grant list: absent, or an array of at most [`MAX_GRANTS`] valid
/// patterns.
fn patterns(v: Option<&Value>, field: &str) -> Result<Vec<Box<str>>, String> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let list = v
        .as_array()
        .ok_or_else(|| format!("herald.{field} must be an array of patterns"))?;
    if list.len() > MAX_GRANTS {
        return Err(format!("herald.{field} has more than {MAX_GRANTS} patterns"));
    }
    list.iter()
        .map(|p| {
            let s = p
                .as_str()
                .ok_or_else(|| format!("herald.{field} must hold strings"))?;
            if Pattern::parse(s).is_ok() {
                Ok(Box::from(s))
            } else {
                Err(format!("herald.{field}: {:?} is not a valid pattern", shorten(s)))
            }
        })
        .collect()
}

/// The `alg` a token's header names, read without `jsonwebtoken` (which
/// refuses a header whose `alg` it does not know, `none` among them, as
/// JSON of the wrong type): so the refusal can name the real reason.
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let head = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("alg")?.as_str().map(str::to_owned)
}

fn shorten(s: &str) -> String {
    s.chars().take(40).collect()
}

/// A failure's reason, in words a client can act on.
fn reason(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "token expired".into(),
        ErrorKind::ImmatureSignature => "token not valid yet (nbf)".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAudience => "wrong audience (aud)".into(),
        ErrorKind::InvalidIssuer => "wrong issuer (iss)".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("missing claim {c:?}"),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::MissingAlgorithm => {
            "algorithm not accepted".into()
        }
        ErrorKind::Base64(_) => "bad base64".into(),
        ErrorKind::Json(_) => "claims are not a JSON object of the expected types".into(),
        ErrorKind::Utf8(_) => "not UTF-8".into(),
        ErrorKind::InvalidToken => "not a JWT (header.claims.signature)".into(),
        _ => "invalid token".into(),
    }
}
