//! The parts of a state store URL (`s3://bucket/key?…`, `gs://bucket/key`,
//! `vault://host:port/mount/path`).

use super::StateError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// The bucket, or `host:port`.
    pub authority: String,
    /// The path after the authority, without its leading `/`, decoded.
    pub path: String,
    /// The query's parameters, decoded, in order.
    pub query: Vec<(String, String)>,
}

fn bad(url: &str, detail: impl Into<String>) -> StateError {
    StateError::Url {
        url: crate::pg::redact_url(url),
        detail: detail.into(),
    }
}

fn decode(url: &str, s: &str) -> Result<String, StateError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| bad(url, format!("{s:?} is not UTF-8 once decoded")))
}

impl StoreUrl {
    /// Parses `url` of `scheme` (checked), whose path must name an object.
    pub fn parse(url: &str, scheme: &str, example: &str) -> Result<StoreUrl, StateError> {
        let rest = url
            .strip_prefix(scheme)
            .and_then(|r| r.strip_prefix("://"))
            .ok_or_else(|| bad(url, format!("expected {example}")))?;
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, q),
            None => (rest, ""),
        };
        let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
        if authority.contains('@') {
            return Err(bad(
                url,
                "credentials do not belong in a state URL: they come from the environment (see `nanokit up --help`)",
            ));
        }
        let path = decode(url, path.trim_end_matches('/'))?;
        if path.is_empty()
            || path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad(
                url,
                format!("the path must name an object, without empty, `.` or `..` parts: expected {example}"),
            ));
        }
        let mut params = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            params.push((decode(url, k)?, decode(url, v)?));
        }
        Ok(StoreUrl {
            authority: decode(url, authority)?,
            path,
            query: params,
        })
    }

    /// The value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Refuses query parameters other than `known`.
    pub fn only(&self, url: &str, known: &[&str]) -> Result<(), StateError> {
        match self
            .query
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
        {
            Some((k, _)) => Err(bad(
                url,
                format!(
                    "unknown parameter `{k}`{}",
                    if known.is_empty() {
                        String::new()
                    } else {
                        format!(" (known: {})", known.join(", "))
                    }
                ),
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_decoded_and_bad_paths_refused() {
        let u = StoreUrl::parse(
            "s3://my-bucket/team/a%20b/state.json?region=eu-west-1&path_style=true",
            "s3",
            "s3://bucket/key",
        )
        .unwrap();
        assert_eq!(u.authority, "my-bucket");
        assert_eq!(u.path, "team/a b/state.json");
        assert_eq!(u.param("region"), Some("eu-west-1"));
        assert_eq!(u.param("path_style"), Some("true"));
        assert!(u.only("x", &["region"]).is_err());
        for bad in [
            "s3://bucket",
            "s3://bucket/",
            "s3://bucket/a//b",
            "s3://bucket/../x",
            "s3://key:secret@bucket/x",
            "gs://bucket/x",
        ] {
            let e = StoreUrl::parse(bad, "s3", "s3://bucket/key").unwrap_err();
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }
}
