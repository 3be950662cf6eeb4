//! The page, compiled into the crate (no CDN, no network): plain HTML, CSS
//! and JavaScript from `assets/`. The scripts, styles and icon are carried
//! gzipped (build.rs) and sent so to a browser that accepts gzip, unpacked
//! for a client that does not. The token is written into the page (a
//! `<meta>`) for the page's POSTs.

use std::io::Read;

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/app.js.gz"));
const APP_CSS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/app.css.gz"));
const ICON: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/icon.svg.gz"));

/// The page, with the token it sends with actions.
pub(super) fn index(token: &str) -> String {
    // The token is hex: nothing in it needs escaping.
    INDEX.replace("{{TOKEN}}", token)
}

/// An asset by name: its content type and its gzipped bytes.
pub(super) fn get(name: &str) -> Option<(&'static str, &'static [u8])> {
    Some(match name {
        "app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "app.css" => ("text/css; charset=utf-8", APP_CSS),
        "icon.svg" => ("image/svg+xml", ICON),
        _ => return None,
    })
}

/// Whether an `Accept-Encoding` header value accepts gzip (not `gzip;q=0`).
pub(super) fn accepts_gzip(accept_encoding: &str) -> bool {
    accept_encoding.split(',').any(|item| {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or("");
        // `q=0`, `q=0.0`, …: refused.
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .is_some_and(|q| q.bytes().all(|b| b == b'0' || b == b'.'))
        });
        (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
    })
}

/// A gzipped asset unpacked.
pub(super) fn gunzip(gz: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut out)
        .expect("the build gzipped it");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_sent_only_when_accepted() {
        for yes in [
            "gzip",
            "gzip, deflate, br, zstd",
            "br;q=1.0, GZIP;q=0.5",
            "*",
        ] {
            assert!(accepts_gzip(yes), "{yes}");
        }
        for no in [
            "",
            "identity",
            "br, deflate",
            "gzip;q=0",
            "gzip; q=0.0",
            "xgzip",
        ] {
            assert!(!accepts_gzip(no), "{no}");
        }
    }

    #[test]
    fn each_asset_unpacks_to_its_source() {
        for (name, source) in [
            ("app.js", &include_bytes!("assets/app.js")[..]),
            ("app.css", include_bytes!("assets/app.css")),
            ("icon.svg", include_bytes!("assets/icon.svg")),
        ] {
            let (_, gz) = get(name).unwrap();
            assert!(gz.len() < source.len(), "{name} is compressed");
            assert_eq!(gunzip(gz), source, "{name}");
        }
        assert!(get("nope.js").is_none());
    }
}
