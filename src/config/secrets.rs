//! The secrets of a loaded configuration, as the masker that hides them.

use super::Config;
use crate::trace::mask::{secret_name, url_password, Masker};

impl Config {
    /// The masker of this configuration's secrets (what counts as one:
    /// `trace::mask`).
    pub fn masker(&self) -> Masker {
        let mut values: Vec<String> = self.secrets.clone();
        for svc in self.services.values() {
            for (k, v) in &svc.env {
                if secret_name(k) {
                    values.push(v.clone());
                }
                if let Some(p) = url_password(v) {
                    values.push(p.to_string());
                }
            }
        }
        if let Some(url) = &self.state_url {
            // A PostgreSQL URL can carry a password among its parameters;
            // the other stores' URLs name a bucket or a path, shown in
            // messages, and get their credentials elsewhere.
            if super::is_postgres_url(url) {
                values.push(url.clone());
            }
            if let Some(p) = url_password(url) {
                values.push(p.to_string());
            }
        }
        if let Some(e) = &self.state_encryption {
            for k in std::iter::once(&e.key).chain(e.fallback.iter()) {
                if let super::KeySource::Passphrase(super::PassphraseSource::Env {
                    value: Some(v),
                    ..
                }) = k
                {
                    values.push(v.clone());
                }
            }
        }
        Masker::new(values)
    }
}
