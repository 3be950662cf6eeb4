//! The page, compiled into the crate (no CDN, no network): plain HTML, CSS
//! and JavaScript from `assets/`, served as they are. The token is written
//! into the page (a `<meta>`) for the page's POSTs.

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const ICON: &str = include_str!("assets/icon.svg");

/// The page, with the token it sends with actions.
pub(super) fn index(token: &str) -> String {
    // The token is hex: nothing in it needs escaping.
    INDEX.replace("{{TOKEN}}", token)
}

/// An asset by name, with its content type.
pub(super) fn get(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        "app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "app.css" => ("text/css; charset=utf-8", APP_CSS),
        "icon.svg" => ("image/svg+xml", ICON),
        _ => return None,
    })
}
