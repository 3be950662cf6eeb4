//! The secret masker: every value that may be a secret, built once from a
//! loaded configuration, and applied at every place nanokit records or prints
//! a string (trace spans and files, the timeline, hook logs, events, errors
//! stored in state, saved plans, CLI output, JS results).
//!
//! What is a secret (`Config::masker` collects them):
//! - every value of the `.env` file beside nanokit.yml;
//! - every value a `${VAR}` interpolation took from the environment (or the
//!   `vars` given instead of it);
//! - the value of every service env variable whose name looks secret
//!   ([`secret_name`]: PASSWORD, PASSWD, PASSPHRASE, SECRET, TOKEN,
//!   CREDENTIAL, APIKEY, AUTH (not as AUTHOR or AUTHORITY), PRIVATE, COOKIE,
//!   SALT, SIGNATURE, DSN as a part of the name, KEY / PASS / PWD / PW /
//!   CREDS as a whole `_`-part);
//! - the password of every `scheme://user:password@…` URL in a service's env
//!   or in the state URL, and the state URL itself.
//!
//! Values shorter than [`MIN_LEN`] (6) characters are not masked: ports
//! (at most 5 digits), `true` / `false`, small numbers and short words such
//! as `local` or `debug` would otherwise be starred out of every message
//! they happen to occur in, and a secret that short is guessable anyway.
//!
//! Masking replaces each occurrence, anywhere inside a string, with `***`.
//! Occurrences of different secrets that overlap (one contains, or runs
//! into, another) are merged and masked as one stretch, so no part of
//! either is left showing.

use std::sync::{Arc, OnceLock, RwLock};

/// Values shorter than this (in bytes) are never masked.
pub const MIN_LEN: usize = 6;

/// What a masked stretch is replaced with.
pub const MASK: &str = "***";

/// Parts of a variable name that make its value a secret wherever they
/// occur in the name (case-insensitive).
const SECRET_PARTS: &[&str] = &[
    "PASSWORD",
    "PASSWD",
    "PASSPHRASE",
    "SECRET",
    "TOKEN",
    "CREDENTIAL",
    "APIKEY",
    "AUTH",
    "PRIVATE",
    "COOKIE",
    "SALT",
    "SIGNATURE",
    "DSN",
];

/// `_`-separated words of a variable name that make its value a secret
/// (`API_KEY`, `DB_PASS`, `DB_PWD`, `AWS_CREDS`), but not as part of a
/// longer word (`KEYBOARD_LAYOUT`, `PASSTHROUGH`).
const SECRET_WORDS: &[&str] = &["KEY", "KEYS", "PASS", "PWD", "PW", "CREDS"];

/// Whether the variable `name` looks like it holds a secret. `PWD` and
/// `OLDPWD` (the shell's working directories) do not.
pub fn secret_name(name: &str) -> bool {
    let up = name.to_ascii_uppercase();
    if up == "PWD" || up == "OLDPWD" {
        return false;
    }
    SECRET_PARTS
        .iter()
        .any(|p| up.match_indices(p).any(|(at, _)| !authorship(&up[at..])))
        || up
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| SECRET_WORDS.contains(&w))
}

/// Whether `rest` starts with an author or an authority (`GIT_AUTHOR_NAME`,
/// `CERT_AUTHORITY`) rather than an authorization (`HTTP_AUTHORIZATION`).
fn authorship(rest: &str) -> bool {
    rest.starts_with("AUTHOR") && !rest.starts_with("AUTHORIZ") && !rest.starts_with("AUTHORIS")
}

/// The password of a `scheme://user:password@host…` URL.
pub fn url_password(value: &str) -> Option<&str> {
    let (_, rest) = value.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (_, pass) = userinfo.split_once(':')?;
    (!pass.is_empty()).then_some(pass)
}

/// A set of secret values; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Masker {
    /// Longest first, no duplicates, none shorter than [`MIN_LEN`].
    secrets: Arc<Vec<String>>,
}

impl Masker {
    /// A masker of `values` (short ones are dropped).
    pub fn new<I, S>(values: I) -> Masker
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut v: Vec<String> = values
            .into_iter()
            .map(Into::into)
            .filter(|s| s.len() >= MIN_LEN)
            .collect();
        v.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        v.dedup();
        Masker {
            secrets: Arc::new(v),
        }
    }

    /// This masker and `other`'s secrets together.
    pub fn merged(&self, other: &Masker) -> Masker {
        if other.is_empty() {
            return self.clone();
        }
        if self.is_empty() {
            return other.clone();
        }
        Masker::new(self.secrets.iter().chain(other.secrets.iter()).cloned())
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// How many secret values it masks.
    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    /// The byte ranges of `text` covered by a secret, merged where they
    /// overlap or touch, in order.
    fn covered(&self, text: &str) -> Vec<(usize, usize)> {
        let mut ranges = Vec::new();
        for s in self.secrets.iter() {
            let mut from = 0;
            while let Some(i) = text[from..].find(s.as_str()) {
                let start = from + i;
                ranges.push((start, start + s.len()));
                // Next match may overlap this one (`aaa` in `aaaa`).
                from = start + text[start..].chars().next().map_or(1, char::len_utf8);
                if from >= text.len() {
                    break;
                }
            }
        }
        ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
        for (a, b) in ranges {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        merged
    }

    /// `text` with every secret in it replaced by `***`; None when it holds
    /// none (nothing to copy).
    pub fn mask_opt(&self, text: &str) -> Option<String> {
        if self.is_empty() || text.len() < MIN_LEN {
            return None;
        }
        let ranges = self.covered(text);
        if ranges.is_empty() {
            return None;
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (a, b) in ranges {
            out.push_str(&text[at..a]);
            out.push_str(MASK);
            at = b;
        }
        out.push_str(&text[at..]);
        Some(out)
    }

    /// `text` with every secret in it replaced by `***`.
    pub fn mask(&self, text: &str) -> String {
        self.mask_opt(text).unwrap_or_else(|| text.to_string())
    }

    /// Masks `text` in place.
    pub fn mask_in_place(&self, text: &mut String) {
        if let Some(m) = self.mask_opt(text) {
            *text = m;
        }
    }

    /// Masks every string (and object key) inside a JSON value.
    pub fn mask_json(&self, value: &mut serde_json::Value) {
        use serde_json::Value;
        if self.is_empty() {
            return;
        }
        match value {
            Value::String(s) => self.mask_in_place(s),
            Value::Array(items) => items.iter_mut().for_each(|v| self.mask_json(v)),
            Value::Object(map) => {
                let old = std::mem::take(map);
                for (mut k, mut v) in old {
                    self.mask_in_place(&mut k);
                    self.mask_json(&mut v);
                    map.insert(k, v);
                }
            }
            _ => {}
        }
    }

    /// `value` serialised, with every string in it masked.
    pub fn to_json<T: serde::Serialize>(&self, value: &T) -> serde_json::Value {
        let mut v = serde_json::to_value(value).expect("value serialises");
        self.mask_json(&mut v);
        v
    }

    /// `value` with every string in it masked (through its JSON form).
    pub fn masked<T>(&self, value: &T) -> T
    where
        T: serde::Serialize + serde::de::DeserializeOwned + Clone,
    {
        if self.is_empty() {
            return value.clone();
        }
        serde_json::from_value(self.to_json(value)).unwrap_or_else(|_| value.clone())
    }
}

/// The secrets of every configuration this process loaded for a CLI
/// command: what its stderr log lines and printed errors are masked with.
fn global() -> &'static RwLock<Masker> {
    static G: OnceLock<RwLock<Masker>> = OnceLock::new();
    G.get_or_init(|| RwLock::new(Masker::default()))
}

/// Adds `m`'s secrets to the process-wide masker.
pub fn register(m: &Masker) {
    if m.is_empty() {
        return;
    }
    let mut g = global().write().unwrap_or_else(|e| e.into_inner());
    *g = g.merged(m);
}

/// The process-wide masker (see [`register`]).
pub fn registered() -> Masker {
    global().read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A writer to stderr that masks the registered secrets in what it writes
/// (the CLI's `NANOKIT_LOG` lines). Collects one log line, writes it masked
/// on flush or drop.
#[derive(Default)]
pub struct MaskedStderr {
    buf: Vec<u8>,
}

impl std::io::Write for MaskedStderr {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        let text = registered().mask(&text);
        std::io::stderr().lock().write_all(text.as_bytes())
    }
}

impl Drop for MaskedStderr {
    fn drop(&mut self) {
        let _ = std::io::Write::flush(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_substrings_longest_first_and_overlaps_as_one() {
        let m = Masker::new(["s3cr3t-value", "s3cr3t", "80", "true"]);
        assert_eq!(m.len(), 2, "short values are dropped");
        assert_eq!(
            m.mask("curl -H 'x: s3cr3t-value' :80 s3cr3t true"),
            "curl -H 'x: ***' :80 *** true"
        );
        // Two secrets that overlap: no part of either stays visible.
        let m = Masker::new(["abcdef12", "ef123456"]);
        assert_eq!(m.mask("<abcdef123456>"), "<***>");
        // Repeated and self-overlapping occurrences.
        let m = Masker::new(["aaaaaa"]);
        assert_eq!(m.mask("aaaaaaa b aaaaaa"), "*** b ***");
        // Multi-byte text around a secret.
        let m = Masker::new(["pässwörd"]);
        assert_eq!(m.mask("é pässwörd é"), "é *** é");
        assert_eq!(m.mask_opt("nothing here"), None);
    }

    #[test]
    fn secret_names() {
        for k in [
            "DB_PASSWORD",
            "dbPassword",
            "API_KEY",
            "SECRET_TOKEN",
            "GITHUB_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
            "DB_PASS",
            "DB_PWD",
            "GOOGLE_CREDENTIALS",
            "AUTH_HEADER",
            "HTTP_AUTHORIZATION",
            "authorisationHeader",
            "OAUTH_CLIENT",
            "GIT_AUTHOR_TOKEN",
            "SENTRY_DSN",
            "PRIVATE_KEY_PEM",
        ] {
            assert!(secret_name(k), "{k}");
        }
        for k in [
            "PORT",
            "NODE_ENV",
            "PWD",
            "KEYBOARD",
            "PASSTHROUGH",
            "HOME",
            "API_URL",
            "GIT_AUTHOR_NAME",
            "GIT_AUTHOR_EMAIL",
            "gitAuthorDate",
            "CERT_AUTHORITY",
        ] {
            assert!(!secret_name(k), "{k}");
        }
    }

    #[test]
    fn url_passwords() {
        assert_eq!(
            url_password("postgres://u:p4ss:w@db:5432/x?y=@"),
            Some("p4ss:w")
        );
        assert_eq!(url_password("http://user@host/"), None);
        assert_eq!(url_password("http://host/a:b@c"), None);
        assert_eq!(url_password("not a url"), None);
    }

    #[test]
    fn masks_json_strings_and_keys() {
        let m = Masker::new(["hunter22"]);
        let mut v = serde_json::json!({"a": ["x hunter22", 1], "hunter22": "k"});
        m.mask_json(&mut v);
        assert_eq!(v, serde_json::json!({"a": ["x ***", 1], "***": "k"}));
    }
}
