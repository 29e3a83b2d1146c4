//! The route table: every request's path (and method, where it matters)
//! decided once, to a [`Route`] naming the built-in endpoint that answers
//! it or the `--exec` route it opens.
//!
//! Pure data and one lookup: the handlers are elsewhere. The same lookup
//! ([`builtin`]) refuses an `--exec` path at start ([`Routes::new`]) and
//! routes each request ([`Routes::decide`]), so the two cannot disagree: a
//! path with a built-in row is never an exec route, whatever `--demo` or
//! `--metrics-listen` say.
//!
//! Paths are compared byte for byte with the request's path as it came
//! (no percent-decoding, no case folding, a trailing slash counts), and the
//! query is no part of them.

use hyper::Method;

use crate::config::{Config, ExecRoute};

/// What a request is, once its path and method are looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A pub/sub WebSocket: `/ws`, or a handshake on the bare address
    /// (`root`).
    Socket {
        /// Opened on `/` (raw mode on `--root-topic` without parameters).
        root: bool,
    },
    /// `POST /v1/publish`.
    Publish,
    /// `GET /v1/presence` (members), or `/v1/presence/stats` (counts).
    Presence {
        /// Counts only.
        stats: bool,
    },
    /// `GET /v1/history`.
    History,
    /// `GET /healthz`.
    Health,
    /// `GET /readyz`.
    Ready,
    /// `/status` (the page) or `/status.json` (what it draws).
    Status {
        /// `/status.json`.
        json: bool,
    },
    /// `GET /metrics`.
    Metrics,
    /// `GET /metrics` on the public listener while `--metrics-listen`
    /// serves it: 404, pointing there.
    MetricsElsewhere,
    /// `GET /`: the demo page.
    Demo,
    /// `GET /herald.js`: the browser client.
    Client,
    /// The `--exec` route of this index in [`Routes::exec`].
    Exec(usize),
    /// A built-in path asked with a method it does not answer: 405, with
    /// the methods it does answer.
    WrongMethod(Methods),
    /// No route: 404.
    NotFound,
}

/// The methods a built-in row answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Methods {
    /// Every method; the handler decides (a WebSocket handshake needs none
    /// in particular).
    Any,
    /// GET and HEAD.
    Get,
    /// POST.
    Post,
}

impl Methods {
    /// The `Allow` header's value.
    pub fn allowed(self) -> &'static str {
        match self {
            Methods::Any => "GET, HEAD, POST, PUT, DELETE, OPTIONS",
            Methods::Get => "GET, HEAD",
            Methods::Post => "POST",
        }
    }

    fn allow(self, method: &Method) -> bool {
        match self {
            Methods::Any => true,
            Methods::Get => method == Method::GET || method == Method::HEAD,
            Methods::Post => method == Method::POST,
        }
    }
}

/// One built-in endpoint: where it is and what answers it.
#[derive(Debug)]
pub struct Builtin {
    /// The path, exactly.
    pub path: &'static str,
    /// What people call it, in a refusal.
    pub name: &'static str,
    /// Method and path as a refusal shows them.
    pub shown: &'static str,
    /// The route of a request with one of `methods`.
    pub route: Route,
    /// The methods it answers.
    pub methods: Methods,
    /// What another method gets: [`Route::WrongMethod`] (with the row's
    /// methods), or the
    /// [`Route::NotFound`] of an unknown path.
    pub otherwise: Route,
    /// A WebSocket handshake here, whatever its method, is this route.
    pub handshake: Option<Route>,
    /// Answered only with `--demo` (else as an unknown path); the path
    /// stays the node's either way.
    pub demo: bool,
    /// With `--metrics-listen`, answered there, and here with
    /// [`Route::MetricsElsewhere`].
    pub moves: bool,
    /// Also served on the `--metrics-listen` address.
    pub admin: bool,
    /// How the 404 message lists it (`None`: not listed).
    pub listed: Option<&'static str>,
}

const fn row(path: &'static str, name: &'static str, shown: &'static str, route: Route) -> Builtin {
    Builtin {
        path,
        name,
        shown,
        route,
        methods: Methods::Get,
        otherwise: Route::WrongMethod(Methods::Get),
        handshake: None,
        demo: false,
        moves: false,
        admin: false,
        listed: None,
    }
}

/// Every path the node serves itself, in the order the 404 message lists
/// them. One listener's share is a flag of the row: the `--metrics-listen`
/// address serves the `admin` rows, the same endpoints on the same paths.
pub const BUILTIN: [Builtin; 12] = [
    Builtin {
        methods: Methods::Any,
        listed: Some("/ws (WebSocket)"),
        ..row("/ws", "websocket", "WebSocket /ws", Route::Socket { root: false })
    },
    Builtin {
        methods: Methods::Post,
        listed: Some("POST /v1/publish"),
        ..row("/v1/publish", "publish", "POST /v1/publish", Route::Publish)
    },
    Builtin {
        otherwise: Route::NotFound,
        listed: Some("GET /v1/presence?topic="),
        ..row(
            "/v1/presence",
            "presence",
            "GET /v1/presence",
            Route::Presence { stats: false },
        )
    },
    Builtin {
        otherwise: Route::NotFound,
        listed: Some("GET /v1/presence/stats?topic="),
        ..row(
            "/v1/presence/stats",
            "presence stats",
            "GET /v1/presence/stats",
            Route::Presence { stats: true },
        )
    },
    Builtin {
        otherwise: Route::NotFound,
        listed: Some("GET /v1/history?topic=&since=&limit="),
        ..row("/v1/history", "history", "GET /v1/history", Route::History)
    },
    Builtin {
        admin: true,
        listed: Some("/healthz"),
        ..row("/healthz", "health", "GET /healthz", Route::Health)
    },
    Builtin {
        admin: true,
        listed: Some("/readyz"),
        ..row("/readyz", "readiness", "GET /readyz", Route::Ready)
    },
    Builtin {
        listed: Some("/status (loopback or --admin-key)"),
        ..row("/status", "status", "GET /status", Route::Status { json: false })
    },
    Builtin {
        ..row(
            "/status.json",
            "status json",
            "GET /status.json",
            Route::Status { json: true },
        )
    },
    Builtin {
        moves: true,
        admin: true,
        listed: Some("/metrics"),
        ..row("/metrics", "metrics", "GET /metrics", Route::Metrics)
    },
    Builtin {
        otherwise: Route::NotFound,
        handshake: Some(Route::Socket { root: true }),
        demo: true,
        listed: Some("/ (the demo page)"),
        ..row("/", "root", "GET / and WebSocket /", Route::Demo)
    },
    Builtin {
        otherwise: Route::NotFound,
        demo: true,
        listed: Some("/herald.js (the browser client)"),
        ..row("/herald.js", "browser client", "GET /herald.js", Route::Client)
    },
];

/// The built-in row of `path`, if the node serves it itself: the one
/// lookup behind both the start check and the routing.
pub fn builtin(path: &str) -> Option<&'static Builtin> {
    BUILTIN.iter().find(|b| b.path == path)
}

/// Which address a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `--listen`: every route.
    Public,
    /// `--metrics-listen`: the `admin` rows only.
    Admin,
}

/// A configuration whose routes have no single answer: the node does not
/// start.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Collision {
    /// An `--exec` path is a built-in route's.
    #[error("{flag} {path}: the path is the built-in route {:?} ({})", .builtin.name, .builtin.shown)]
    Builtin {
        /// `--exec` or `--exec-shell`.
        flag: &'static str,
        /// The path.
        path: String,
        /// The route it would take.
        builtin: &'static Builtin,
    },
    /// Two `--exec` routes on one path.
    #[error("{flag} {path}: the path is given twice (also as {first} {path})")]
    Twice {
        /// The flag of the later one.
        flag: &'static str,
        /// The path.
        path: String,
        /// The flag of the earlier one.
        first: &'static str,
    },
}

/// One node's table: the built-in rows, its `--exec` routes, and the
/// settings that change an answer (`--demo`, `--metrics-listen`).
#[derive(Debug, Clone)]
pub struct Routes {
    exec: Vec<(&'static str, ExecRoute)>,
    demo: bool,
    metrics_elsewhere: bool,
}

impl Routes {
    /// The table for `config`, or why its `--exec` routes collide.
    pub fn new(config: &Config) -> Result<Routes, Collision> {
        let mut exec: Vec<(&'static str, ExecRoute)> = Vec::new();
        let given = config
            .exec
            .iter()
            .map(|r| ("--exec", r))
            .chain(config.exec_shell.iter().map(|r| ("--exec-shell", r)));
        for (flag, route) in given {
            let path = route.path.clone();
            if let Some(builtin) = builtin(&path) {
                return Err(Collision::Builtin { flag, path, builtin });
            }
            if let Some(first) = exec.iter().find(|(_, r)| r.path == path).map(|(f, _)| *f) {
                return Err(Collision::Twice { flag, path, first });
            }
            exec.push((flag, route.clone()));
        }
        Ok(Routes {
            exec,
            demo: config.demo,
            metrics_elsewhere: config.metrics_listen.is_some(),
        })
    }

    /// The route of a request to `path` with `method` on `listener`;
    /// `handshake`: it asks for a WebSocket upgrade.
    pub fn decide(&self, listener: Listener, method: &Method, path: &str, handshake: bool) -> Route {
        let Some(b) = builtin(path) else {
            return match self.exec.iter().position(|(_, r)| r.path == path) {
                Some(i) if listener == Listener::Public => Route::Exec(i),
                _ => Route::NotFound,
            };
        };
        match listener {
            Listener::Admin if !b.admin => return Route::NotFound,
            Listener::Admin => {}
            Listener::Public => {
                if let (Some(route), true) = (b.handshake, handshake) {
                    return route;
                }
                if b.demo && !self.demo {
                    return Route::NotFound;
                }
            }
        }
        if !b.methods.allow(method) {
            match b.otherwise {
                Route::WrongMethod(_) => Route::WrongMethod(b.methods),
                other => other,
            }
        } else if b.moves && self.metrics_elsewhere && listener == Listener::Public {
            Route::MetricsElsewhere
        } else {
            b.route
        }
    }

    /// The `--exec` route of a [`Route::Exec`] this table decided.
    pub fn exec(&self, index: usize) -> &ExecRoute {
        &self.exec[index].1
    }

    /// What a 404 on `listener` lists: every route a request there may
    /// take.
    pub fn listed(&self, listener: Listener) -> Vec<String> {
        let shown = BUILTIN.iter().filter(|b| match listener {
            Listener::Admin => b.admin,
            Listener::Public => (self.demo || !b.demo) && !(b.moves && self.metrics_elsewhere),
        });
        let mut out: Vec<String> = shown.filter_map(|b| b.listed).map(String::from).collect();
        if listener == Listener::Public {
            out.extend(
                self.exec
                    .iter()
                    .map(|(_, r)| format!("{} (WebSocket, --exec)", r.path)),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: Config,
        }
        let argv = std::iter::once("herald").chain(args.iter().copied());
        <Wrapper as clap::Parser>::try_parse_from(argv)
            .expect("flags")
            .config
    }

    fn routes(args: &[&str]) -> Routes {
        Routes::new(&config(args)).expect("no collision")
    }

    #[test]
    fn every_built_in_path_maps_to_its_route() {
        let r = routes(&["--exec", "/count=./count.sh"]);
        let get = |path| r.decide(Listener::Public, &Method::GET, path, false);
        assert_eq!(get("/ws"), Route::Socket { root: false });
        assert_eq!(get("/v1/presence"), Route::Presence { stats: false });
        assert_eq!(get("/v1/presence/stats"), Route::Presence { stats: true });
        assert_eq!(get("/v1/history"), Route::History);
        assert_eq!(get("/healthz"), Route::Health);
        assert_eq!(get("/readyz"), Route::Ready);
        assert_eq!(get("/status"), Route::Status { json: false });
        assert_eq!(get("/status.json"), Route::Status { json: true });
        assert_eq!(get("/metrics"), Route::Metrics);
        assert_eq!(get("/"), Route::Demo);
        assert_eq!(get("/herald.js"), Route::Client);
        let post = |path| r.decide(Listener::Public, &Method::POST, path, false);
        assert_eq!(post("/v1/publish"), Route::Publish);
        // Every row is reached by its own path, under its own method.
        for b in &BUILTIN {
            let method = match b.methods {
                Methods::Post => Method::POST,
                _ => Method::HEAD,
            };
            assert_eq!(
                r.decide(Listener::Public, &method, b.path, false),
                b.route,
                "{}",
                b.path
            );
        }
    }

    #[test]
    fn handshakes_methods_and_flags() {
        let r = routes(&[]);
        let decide = |m: Method, path, up| r.decide(Listener::Public, &m, path, up);
        assert_eq!(decide(Method::GET, "/", true), Route::Socket { root: true });
        assert_eq!(decide(Method::GET, "/ws", true), Route::Socket { root: false });
        assert_eq!(decide(Method::POST, "/ws", false), Route::Socket { root: false });
        assert_eq!(
            decide(Method::POST, "/status", false),
            Route::WrongMethod(Methods::Get)
        );
        assert_eq!(
            decide(Method::DELETE, "/status.json", false),
            Route::WrongMethod(Methods::Get)
        );
        assert_eq!(
            decide(Method::HEAD, "/status", false),
            Route::Status { json: false }
        );
        assert_eq!(
            decide(Method::GET, "/v1/publish", false),
            Route::WrongMethod(Methods::Post)
        );
        assert_eq!(
            decide(Method::DELETE, "/healthz", false),
            Route::WrongMethod(Methods::Get)
        );
        assert_eq!(
            decide(Method::PUT, "/metrics", false),
            Route::WrongMethod(Methods::Get)
        );
        // As before the table: these answer other methods with a 404.
        assert_eq!(decide(Method::POST, "/v1/history", false), Route::NotFound);
        assert_eq!(decide(Method::POST, "/v1/presence", false), Route::NotFound);
        assert_eq!(decide(Method::POST, "/", false), Route::NotFound);

        let off = routes(&["--demo", "false", "--metrics-listen", "127.0.0.1:0"]);
        let decide = |m: Method, path, up| off.decide(Listener::Public, &m, path, up);
        assert_eq!(decide(Method::GET, "/", false), Route::NotFound);
        assert_eq!(decide(Method::GET, "/herald.js", false), Route::NotFound);
        assert_eq!(decide(Method::GET, "/", true), Route::Socket { root: true });
        assert_eq!(decide(Method::GET, "/metrics", false), Route::MetricsElsewhere);
        assert_eq!(
            decide(Method::POST, "/metrics", false),
            Route::WrongMethod(Methods::Get)
        );
        let listed = off.listed(Listener::Public).join(", ");
        assert!(
            !listed.contains("/metrics") && !listed.contains("herald.js"),
            "{listed}"
        );
    }

    #[test]
    fn the_admin_listener_serves_its_rows_only() {
        let r = routes(&["--metrics-listen", "127.0.0.1:0", "--exec", "/count=./count.sh"]);
        let get = |path| r.decide(Listener::Admin, &Method::GET, path, false);
        assert_eq!(get("/metrics"), Route::Metrics);
        assert_eq!(get("/healthz"), Route::Health);
        assert_eq!(get("/readyz"), Route::Ready);
        for path in [
            "/ws",
            "/v1/history",
            "/status",
            "/",
            "/herald.js",
            "/count",
            "/nope",
        ] {
            assert_eq!(get(path), Route::NotFound, "{path}");
        }
        assert_eq!(
            r.decide(Listener::Admin, &Method::GET, "/", true),
            Route::NotFound
        );
        assert_eq!(
            r.decide(Listener::Admin, &Method::POST, "/v1/publish", false),
            Route::NotFound
        );
        assert_eq!(
            r.decide(Listener::Admin, &Method::POST, "/metrics", false),
            Route::WrongMethod(Methods::Get)
        );
        assert_eq!(r.listed(Listener::Admin), ["/healthz", "/readyz", "/metrics"]);
    }

    #[test]
    fn exec_paths_map_to_their_route_and_unknown_paths_to_not_found() {
        let r = routes(&[
            // --exec-shell routes come after --exec ones, wherever given.
            "--exec-shell",
            "/tail=tail -f log",
            "--exec",
            "/count=./count.sh",
            // Not a built-in path: compared byte for byte.
            "--exec",
            "/v1/history/=cat",
            "--exec",
            "/STATUS=cat",
            "--exec",
            "/v1/histor%79=cat",
        ]);
        let get = |path| r.decide(Listener::Public, &Method::GET, path, true);
        for (i, path) in ["/count", "/v1/history/", "/STATUS", "/v1/histor%79", "/tail"]
            .into_iter()
            .enumerate()
        {
            assert_eq!(get(path), Route::Exec(i), "{path}");
            assert_eq!(r.exec(i).path, path);
        }
        assert_eq!(r.exec(4).argv[0], "/bin/sh");
        assert_eq!(get("/v1/history"), Route::History);
        for path in ["/nope", "/count/", "/ws/", "/Ws", "", "*", "/status.json/"] {
            assert_eq!(get(path), Route::NotFound, "{path}");
        }
        let listed = r.listed(Listener::Public);
        assert!(
            listed.contains(&"/tail (WebSocket, --exec)".to_owned()),
            "{listed:?}"
        );
    }

    #[test]
    fn an_exec_path_on_a_built_in_path_collides() {
        for b in &BUILTIN {
            for flag in ["--exec", "--exec-shell"] {
                let c = config(&[flag, &format!("{}=cat", b.path)]);
                let err = Routes::new(&c).expect_err(b.path);
                assert_eq!(
                    err.to_string(),
                    format!(
                        "{flag} {}: the path is the built-in route {:?} ({})",
                        b.path, b.name, b.shown
                    )
                );
            }
        }
        let err = Routes::new(&config(&["--exec", "/v1/history=cat"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"--exec /v1/history: the path is the built-in route "history" (GET /v1/history)"#
        );
        // Whatever the flags that turn a built-in answer off.
        let c = config(&[
            "--demo",
            "false",
            "--metrics-listen",
            "127.0.0.1:0",
            "--exec",
            "/herald.js=x",
        ]);
        assert!(Routes::new(&c).is_err());
        let c = config(&["--metrics-listen", "127.0.0.1:0", "--exec", "/metrics=x"]);
        assert!(Routes::new(&c).is_err());
        let err = Routes::new(&config(&["--exec", "/a=x", "--exec-shell", "/a=y"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--exec-shell /a: the path is given twice (also as --exec /a)"
        );
    }
}
