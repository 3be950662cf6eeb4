//! A request's query string: its parameters, percent-decoded, in order.

/// A query string's parameters, percent-decoded, in order (a handful:
/// looked up by a walk).
pub(super) struct Query(Vec<(String, String)>);

impl Query {
    /// The first value of `name`.
    pub(super) fn get(&self, name: &str) -> Option<&String> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// The query string's parameters, percent-decoded.
pub(super) fn query(uri: &hyper::Uri) -> Query {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    let params = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect();
    Query(params)
}
