//! The hub's HTTP side (hyper, HTTP/1.1): the checks every request passes,
//! the page, the JSON API and the event streams.
//!
//! Every request: a `Host` of `127.0.0.1:<port>` or `localhost:<port>` (else
//! 403: a page of another site whose name was made to resolve to 127.0.0.1
//! sends its own name), then the token, from the cookie the first load
//! sets, the `x-nanokit-token` header or a `token` query parameter of a GET
//! (else 401). A POST must carry the header: the cookie alone, which a
//! browser would send with a form another page submits, is not enough. Every
//! response forbids framing, sniffing and any origin but the hub's own.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::live::{Live, Snapshot, ALL};
use super::query::{query, Query};
use super::respond::{error, event_stream, full, json_bytes, json_response, sse, text, Body};
use super::{actions, assets, logs, view};

/// The page's Content-Security-Policy: nothing from anywhere but the hub.
pub(super) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The largest request body (an action's JSON).
const MAX_BODY: usize = 64 * 1024;
/// A comment on an idle event stream this often, so a dead peer is seen.
const KEEPALIVE: Duration = Duration::from_secs(15);

pub(super) struct Server {
    pub token: String,
    pub port: u16,
    pub live: Live,
    pub stop: CancellationToken,
}

/// Accepts connections until the hub stops; then lets each connection end
/// its response in progress (event streams end at once).
pub(super) async fn serve(server: Arc<Server>, listener: TcpListener) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("hub: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = server.stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        super::spawn(async move {
            let stop = server.stop.clone();
            let svc = hyper::service::service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.handle(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                }
            }
        });
    }
}

/// `127.0.0.1:<port>`, `localhost:<port>` or `[::1]:<port>`.
fn loopback_authority(authority: &str) -> bool {
    let a = authority.to_ascii_lowercase();
    let Some((host, port)) = a.rsplit_once(':') else {
        return false;
    };
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
        && !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
}

/// `a == b` in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl Server {
    fn cookie_name(&self) -> String {
        format!("nkhub_{}", self.port)
    }

    /// The `Host` names the loopback address: `127.0.0.1`, `localhost` or
    /// `[::1]`, with a port (any: an SSH forward may use another local
    /// port). A page whose own name was made to resolve to 127.0.0.1 (DNS
    /// rebinding) sends that name, and is refused.
    fn host_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(loopback_authority)
    }

    fn token_header_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get("x-nanokit-token")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| same(t, &self.token))
    }

    fn authorized(&self, req: &Request<Incoming>, q: &Query) -> bool {
        let h = req.headers();
        self.token_header_ok(h)
            || cookie(h, &self.cookie_name()).is_some_and(|t| same(t, &self.token))
            || (req.method() == Method::GET && q.get("token").is_some_and(|t| same(t, &self.token)))
    }

    /// A POST from the page: the token header, JSON, and (when the browser
    /// says) our own origin.
    fn post_ok(&self, headers: &HeaderMap) -> Result<(), Box<Response<Body>>> {
        if !self.token_header_ok(headers) {
            return Err(Box::new(error(
                StatusCode::FORBIDDEN,
                "ENKHUBTOKEN",
                "actions need the x-nanokit-token header (the page sends it); nothing was done",
            )));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let ok = origin
                .to_str()
                .ok()
                .and_then(|o| o.strip_prefix("http://"))
                .is_some_and(loopback_authority);
            if !ok {
                return Err(Box::new(error(
                    StatusCode::FORBIDDEN,
                    "ENKHUBORIGIN",
                    "a request from another origin; nothing was done",
                )));
            }
        }
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !json {
            return Err(Box::new(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "ENKHUBREQUEST",
                "actions take a JSON body (content-type: application/json); nothing was done",
            )));
        }
        Ok(())
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let mut r = self.route(req).await;
        let h = r.headers_mut();
        h.insert("content-security-policy", HeaderValue::from_static(CSP));
        h.insert(
            "x-content-type-options",
            HeaderValue::from_static("nosniff"),
        );
        h.insert("x-frame-options", HeaderValue::from_static("DENY"));
        h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
        h.insert(
            "cross-origin-opener-policy",
            HeaderValue::from_static("same-origin"),
        );
        h.insert(
            "cross-origin-resource-policy",
            HeaderValue::from_static("same-origin"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        if !self.host_ok(req.headers()) {
            return text(
                StatusCode::FORBIDDEN,
                "forbidden: the hub answers only to Host 127.0.0.1:<port> or localhost:<port> (open the URL it printed)",
            );
        }
        let q = query(req.uri());
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        if method == Method::GET && path == "/" {
            if let Some(t) = q.get("token") {
                if !same(t, &self.token) {
                    return unauthorized();
                }
                // The token moves to a cookie and out of the address bar.
                let mut r = text(StatusCode::SEE_OTHER, "");
                let cookie = format!(
                    "{}={}; Path=/; HttpOnly; SameSite=Strict",
                    self.cookie_name(),
                    self.token
                );
                r.headers_mut().insert(
                    header::SET_COOKIE,
                    HeaderValue::from_str(&cookie).expect("a token is header-safe"),
                );
                r.headers_mut()
                    .insert(header::LOCATION, HeaderValue::from_static("/"));
                return r;
            }
        }
        if !self.authorized(&req, &q) {
            return unauthorized();
        }
        match (method, path.as_str()) {
            (Method::GET, "/") => full(
                StatusCode::OK,
                "text/html; charset=utf-8",
                assets::index(&self.token).into(),
            ),
            (Method::GET, p) if p.starts_with("/assets/") => match assets::get(&p[8..]) {
                Some((ct, gz)) => asset(req.headers(), ct, gz),
                None => text(StatusCode::NOT_FOUND, "not found"),
            },
            (Method::GET, "/api/view") => {
                let snap = self.fresh_view().await;
                json_bytes(StatusCode::OK, snapshot_json(&snap, &|_, _| true))
            }
            (Method::GET, "/api/events") => self.events(),
            (Method::GET, p) if p.starts_with("/api/runs/") => self.run(&p[10..]),
            (Method::GET, "/api/logs") => logs::stream(&self.live, &q),
            (Method::GET, "/api/logs/search") => super::boxed(logs::search(&self.live, &q)).await,
            (Method::POST, p) if p.starts_with("/api/actions/") => {
                if let Err(r) = self.post_ok(req.headers()) {
                    return *r;
                }
                let name = p[13..].to_string();
                let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(_) => {
                        return error(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "ENKHUBREQUEST",
                            "the request body is too large or was cut; nothing was done",
                        )
                    }
                };
                let body: Value = match serde_json::from_slice(&body) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "ENKHUBREQUEST",
                            "the body must be a JSON object; nothing was done",
                        )
                    }
                };
                super::boxed(actions::run(&self.live, &name, body)).await
            }
            (_, p) if p.starts_with("/api/") || p == "/" => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            _ => text(StatusCode::NOT_FOUND, "not found"),
        }
    }

    /// The view after a round that includes everything asked now.
    async fn fresh_view(&self) -> Arc<Snapshot> {
        // Subscribed while waiting: the loop works only while someone looks.
        let sub = self.live.subscribe();
        let mut served = self.live.served();
        let asked = self.live.request(ALL);
        let _ =
            tokio::time::timeout(Duration::from_secs(5), served.wait_for(|s| *s >= asked)).await;
        let snap = sub.borrow().clone();
        snap
    }

    /// The live view: `view` (every section) at once, then `patch` (the
    /// sections that changed) as they change.
    fn events(&self) -> Response<Body> {
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let live = self.live.clone();
        let stop = self.stop.clone();
        let mut sub = live.subscribe();
        let asked = live.request(ALL);
        super::spawn(async move {
            let mut served = live.served();
            let _ = tokio::time::timeout(Duration::from_secs(5), served.wait_for(|s| *s >= asked))
                .await;
            let mut last = sub.borrow_and_update().clone();
            let view = sse(
                "view",
                Some(last.version),
                &snapshot_json(&last, &|_, _| true),
            );
            let first = [&b"retry: 1000\n"[..], &view].concat();
            if tx.send(Bytes::from(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    r = sub.changed() => {
                        if r.is_err() {
                            return;
                        }
                        let snap = sub.borrow_and_update().clone();
                        let changed = |k: &str, v: &Arc<Value>| {
                            last.get(k).is_none_or(|old| !Arc::ptr_eq(old, v))
                        };
                        if !snap.sections.iter().any(|(k, v)| changed(k, v)) {
                            last = snap;
                            continue;
                        }
                        let patch = sse("patch", Some(snap.version), &snapshot_json(&snap, &changed));
                        last = snap;
                        if tx.send(patch).await.is_err() {
                            return;
                        }
                    }
                    _ = tokio::time::sleep(KEEPALIVE) => {
                        if tx.send(Bytes::from_static(b": keepalive\n\n")).await.is_err() {
                            return;
                        }
                    }
                    _ = stop.cancelled() => return,
                    _ = tx.closed() => return,
                }
            }
        });
        event_stream(rx)
    }

    /// One run's timeline data (a run's exact name, never a path).
    fn run(&self, name: &str) -> Response<Body> {
        let name = percent_encoding::percent_decode_str(name)
            .decode_utf8_lossy()
            .into_owned();
        let Some(p) = self.live.projects().into_iter().next() else {
            return text(StatusCode::NOT_FOUND, "no project");
        };
        match view::run_detail(&p.config.file, &name) {
            Some(mut v) => {
                self.live.masker().mask_json(&mut v);
                json_response(StatusCode::OK, &v)
            }
            None => error(
                StatusCode::NOT_FOUND,
                "ENKTRACE",
                &format!("no run `{name}` in this project's traces"),
            ),
        }
    }
}

/// A gzipped asset: as it is when the client accepts gzip, else unpacked.
fn asset(headers: &HeaderMap, content_type: &'static str, gz: &'static [u8]) -> Response<Body> {
    // One header (as browsers send it).
    let gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(assets::accepts_gzip);
    let mut r = if gzip {
        let mut r = full(StatusCode::OK, content_type, Bytes::from_static(gz));
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        full(StatusCode::OK, content_type, assets::gunzip(gz).into())
    };
    r.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    r
}

fn unauthorized() -> Response<Body> {
    text(
        StatusCode::UNAUTHORIZED,
        "unauthorized: open the URL that `nanokit hub` printed (it carries the token)",
    )
}

/// `{ version, sections }`: the sections of `s` that `pick` takes, as JSON.
fn snapshot_json(s: &Snapshot, pick: &dyn Fn(&str, &Arc<Value>) -> bool) -> Vec<u8> {
    struct Sections<'a>(&'a Snapshot, &'a dyn Fn(&str, &Arc<Value>) -> bool);
    impl Serialize for Sections<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let picked = self.0.sections.iter().filter(|(k, v)| (self.1)(k, v));
            s.collect_map(picked.map(|(k, v)| (*k, &**v)))
        }
    }
    #[derive(Serialize)]
    struct View<'a> {
        version: u64,
        sections: Sections<'a>,
    }
    let view = View {
        version: s.version,
        sections: Sections(s, pick),
    };
    serde_json::to_vec(&view).expect("JSON serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn only_loopback_hosts_are_accepted() {
        for ok in [
            "127.0.0.1:7420",
            "localhost:9",
            "LOCALHOST:7420",
            "[::1]:7420",
        ] {
            assert!(loopback_authority(ok), "{ok}");
        }
        for bad in [
            "127.0.0.1",
            "evil.example:7420",
            "127.0.0.1.evil.example:7420",
            "localhost.evil:7420",
            "127.0.0.2:7420",
            "0.0.0.0:7420",
            "localhost:",
            "localhost:74x0",
            "user@127.0.0.1:7420",
        ] {
            assert!(!loopback_authority(bad), "{bad}");
        }
    }

    #[test]
    fn the_token_is_compared_whole_and_found_in_cookies_and_queries() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd") && !same("abc", "ab") && !same("", "a"));
        let h = headers(&[("cookie", "a=1; nkhub_7420=tok; b=2"), ("cookie", "c=3")]);
        assert_eq!(cookie(&h, "nkhub_7420"), Some("tok"));
        assert_eq!(cookie(&h, "c"), Some("3"));
        assert_eq!(cookie(&h, "nkhub_7421"), None);
        let q = query(&"/x?token=a%2Bb&q=hello+world&flag".parse().unwrap());
        assert_eq!(q.get("token").unwrap(), "a+b");
        assert_eq!(q.get("q").unwrap(), "hello world");
        assert_eq!(q.get("flag").unwrap(), "");
        assert_eq!(q.get("nope"), None);
    }
}
