//! The state in Vault or OpenBao, KV version 2:
//! `vault://host:8200/<kv mount>/<path>`.
//!
//! The server's address is `VAULT_ADDR` when it names the same host and
//! port as the URL (or when the URL has no host: `vault:///secret/nanokit`),
//! else `https://host:port`. As the vault CLI: the token is `VAULT_TOKEN`
//! (else `~/.vault-token`), `VAULT_NAMESPACE` the namespace, and TLS trusts
//! `VAULT_CACERT` / `VAULT_CAPATH` (else the platform's roots), presents
//! `VAULT_CLIENT_CERT` / `VAULT_CLIENT_KEY`.
//!
//! Each object is one KV secret whose data is `{"nanokit": "<text>"}`; its
//! version is the KV version. A write is `cas=<version>`, or `cas=0` to
//! create (over a secret whose last version was deleted: `cas=<that
//! version>`). The lock's secrets (one per epoch) are created once and
//! deleted (their metadata) only a day after, so a version of one never
//! names two different writes while the lock can still use it.

use std::path::PathBuf;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use super::http::JsonBody as _;
use super::object::{Cond, Object, ObjectStore};
use super::url::StoreUrl;
use super::{StateError, Version};

/// A Vault/OpenBao server, as the vault CLI reaches it: address, token,
/// namespace and TLS from the environment.
pub struct Connection {
    http: reqwest::Client,
    addr: String,
    token: String,
    namespace: Option<String>,
}

impl Connection {
    /// The server at `address`, else `VAULT_ADDR`, for `what` (messages).
    pub fn from_env(address: Option<&str>, what: &str) -> Result<Connection, StateError> {
        let addr = address
            .map(str::to_string)
            .or_else(|| env("VAULT_ADDR"))
            .ok_or_else(|| StateError::Backend {
                location: what.to_string(),
                detail: "no server: set VAULT_ADDR (or its `address`)".into(),
            })?;
        Connection::new(addr, what.to_string())
    }

    fn new(addr: String, describe: String) -> Result<Connection, StateError> {
        let addr = addr.trim_end_matches('/').to_string();
        let token = match env("VAULT_TOKEN") {
            Some(t) => t,
            None => std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".vault-token"))
                .and_then(|p| std::fs::read_to_string(p).ok())
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .ok_or_else(|| StateError::Auth {
                    location: describe.clone(),
                    detail: "no token: set VAULT_TOKEN (or log in with the vault CLI, which writes ~/.vault-token)".into(),
                })?,
        };
        let mut ca_files: Vec<PathBuf> =
            env("VAULT_CACERT").map(PathBuf::from).into_iter().collect();
        if let Some(dir) = env("VAULT_CAPATH") {
            let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|e| StateError::Backend {
                    location: describe.clone(),
                    detail: format!("cannot read VAULT_CAPATH {dir}: {e}"),
                })?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            found.sort();
            ca_files.extend(found);
        }
        let cert = env("VAULT_CLIENT_CERT").map(PathBuf::from);
        let key = env("VAULT_CLIENT_KEY").map(PathBuf::from);
        if env("VAULT_SKIP_VERIFY").is_some_and(|v| matches!(v.as_str(), "1" | "true")) {
            return Err(StateError::Backend {
                location: describe,
                detail: "VAULT_SKIP_VERIFY is set: nanokit does not talk to a server it cannot verify; give the server's CA with VAULT_CACERT".into(),
            });
        }
        let http = super::http::client(&super::http::Trust {
            ca_files: ca_files.iter().map(|p| p.as_path()).collect(),
            identity: match (&cert, &key) {
                (Some(c), Some(k)) => Some(crate::sys::tls::Identity { cert: c, key: k }),
                (Some(c), None) => Some(crate::sys::tls::Identity { cert: c, key: c }),
                _ => None,
            },
            plain_only: addr.starts_with("http://"),
        })
        .map_err(|detail| StateError::Backend {
            location: describe.clone(),
            detail,
        })?;
        Ok(Connection {
            http,
            addr,
            token,
            namespace: env("VAULT_NAMESPACE"),
        })
    }

    /// `req` with the token and namespace, sent (retried as
    /// [`super::http::send`] does).
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut req = req.header("X-Vault-Token", &self.token);
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        super::http::send(req).await
    }

    /// `POST /v1/<path>` with a JSON body.
    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<reqwest::Response, String> {
        let req = self
            .http
            .post(format!("{}/v1/{path}", self.addr))
            .header("Content-Type", "application/json")
            .body(body.to_string());
        self.send(req).await.map_err(|e| super::http::describe(&e))
    }
}

/// One secret of a KV v2 mount.
pub struct Vault {
    conn: Connection,
    mount: String,
    key: String,
    describe: String,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `host:port` of an `http(s)://` address.
fn authority(addr: &str) -> &str {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

#[derive(Deserialize)]
struct Metadata {
    version: u64,
}

impl Vault {
    pub fn open(url: &str) -> Result<Vault, StateError> {
        let u = StoreUrl::parse(url, "vault", "vault://host:8200/<kv mount>/<path>")?;
        u.only(url, &[])?;
        let (mount, path) = u.path.split_once('/').ok_or_else(|| StateError::Url {
            url: crate::pg::redact_url(url),
            detail:
                "the path must be <kv mount>/<path>, e.g. vault://vault:8200/secret/nanokit/state"
                    .into(),
        })?;
        let describe = format!(
            "vault://{}/{mount}/{path}",
            if u.authority.is_empty() {
                env("VAULT_ADDR").map_or(String::new(), |a| authority(&a).to_string())
            } else {
                u.authority.clone()
            }
        );
        let addr = match (env("VAULT_ADDR"), u.authority.as_str()) {
            (Some(a), "") => a,
            (Some(a), host) if authority(&a) == host => a,
            (_, "") => {
                return Err(StateError::Url {
                    url: crate::pg::redact_url(url),
                    detail: "the URL names no server and VAULT_ADDR is not set".into(),
                })
            }
            (_, host) => format!("https://{host}"),
        };
        Ok(Vault {
            conn: Connection::new(addr, describe.clone())?,
            mount: mount.to_string(),
            key: path.to_string(),
            describe,
        })
    }

    fn url(&self, kind: &str, key: &str) -> String {
        let key = key
            .split('/')
            .map(|p| {
                percent_encoding::utf8_percent_encode(p, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join("/");
        format!("{}/v1/{}/{kind}/{key}", self.conn.addr, self.mount)
    }

    fn unavailable(&self, detail: String) -> StateError {
        StateError::Unavailable {
            location: self.describe.clone(),
            detail,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, StateError> {
        let resp = self
            .conn
            .send(req)
            .await
            .map_err(|e| self.unavailable(super::http::describe(&e)))?;
        if resp.status().as_u16() == 403 {
            let text = resp.text().await.unwrap_or_default();
            return Err(StateError::Auth {
                location: self.describe.clone(),
                detail: format!(
                    "permission denied ({}); check VAULT_TOKEN and its policy on {}/data/{}",
                    text.trim(),
                    self.mount,
                    self.key
                ),
            });
        }
        Ok(resp)
    }

    async fn failed(&self, resp: reqwest::Response) -> StateError {
        self.unavailable(super::http::answer(resp).await)
    }

    /// The current version of `key` when its last version was deleted
    /// (a write "only if absent" must name it), `None` when it never was.
    async fn deleted_version(&self, key: &str) -> Result<Option<u64>, StateError> {
        let resp = self
            .send(self.conn.http.get(self.url("metadata", key)))
            .await?;
        if resp.status().as_u16() == 404 {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(self.failed(resp).await);
        }
        #[derive(Deserialize)]
        struct VersionMeta {
            #[serde(default)]
            deletion_time: String,
            #[serde(default)]
            destroyed: bool,
        }
        #[derive(Deserialize)]
        struct Meta {
            current_version: u64,
            versions: std::collections::HashMap<String, VersionMeta>,
        }
        #[derive(Deserialize)]
        struct Resp {
            data: Meta,
        }
        let r: Resp = resp.json_body().await.map_err(|e| self.unavailable(e))?;
        let current = r.data.versions.get(&r.data.current_version.to_string());
        Ok(current
            .filter(|m| m.destroyed || !m.deletion_time.is_empty())
            .map(|_| r.data.current_version))
    }
}

#[async_trait]
impl ObjectStore for Vault {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn probe_key(&self) -> String {
        format!("vault {} {}", self.conn.addr, self.mount)
    }

    fn key(&self) -> &str {
        &self.key
    }

    async fn get(&self, key: &str) -> Result<Option<Object>, StateError> {
        let resp = self.send(self.conn.http.get(self.url("data", key))).await?;
        match resp.status().as_u16() {
            404 => return Ok(None),
            200 => {}
            _ => return Err(self.failed(resp).await),
        }
        #[derive(Deserialize)]
        struct Data {
            data: Option<serde_json::Map<String, serde_json::Value>>,
            metadata: Metadata,
        }
        #[derive(Deserialize)]
        struct Resp {
            data: Data,
        }
        let r: Resp = resp.json_body().await.map_err(|e| self.unavailable(e))?;
        let Some(text) = r
            .data
            .data
            .as_ref()
            .and_then(|d| d.get("nanokit"))
            .and_then(|v| v.as_str())
        else {
            return Err(StateError::RemoteCorrupt {
                location: self.describe.clone(),
                detail: format!(
                    "the secret {}/{key} has no `nanokit` field (another program's secret?)",
                    self.mount
                ),
            });
        };
        Ok(Some(Object {
            bytes: text.as_bytes().to_vec(),
            version: Version(r.data.metadata.version.to_string()),
        }))
    }

    async fn put(
        &self,
        key: &str,
        bytes: &[u8],
        cond: Cond<'_>,
    ) -> Result<Option<Version>, StateError> {
        let text = std::str::from_utf8(bytes).map_err(|_| StateError::Write {
            location: self.describe.clone(),
            detail: "only text can be stored in a Vault secret".into(),
        })?;
        let mut cas = match cond {
            Cond::Absent => Some(0),
            Cond::Matches(v) => Some(v.0.parse::<u64>().map_err(|_| StateError::Write {
                location: self.describe.clone(),
                detail: format!("{:?} is not a KV version", v.0),
            })?),
            Cond::Any => None,
        };
        for _ in 0..2 {
            let body = match cas {
                Some(cas) => json!({"options": {"cas": cas}, "data": {"nanokit": text}}),
                None => json!({"data": {"nanokit": text}}),
            };
            let resp = self
                .send(
                    self.conn
                        .http
                        .post(self.url("data", key))
                        .header("Content-Type", "application/json")
                        .body(body.to_string()),
                )
                .await?;
            let status = resp.status().as_u16();
            if status == 200 {
                #[derive(Deserialize)]
                struct Resp {
                    data: Metadata,
                }
                let r: Resp = resp.json_body().await.map_err(|e| self.unavailable(e))?;
                return Ok(Some(Version(r.data.version.to_string())));
            }
            let text = resp.text().await.unwrap_or_default();
            if status == 400 && text.contains("check-and-set") {
                // Absent, but its last version deleted: that version is the
                // one to name.
                if cas == Some(0) {
                    if let Some(v) = self.deleted_version(key).await? {
                        cas = Some(v);
                        continue;
                    }
                }
                return Ok(None);
            }
            return Err(self.unavailable(format!(
                "{status}: {}",
                text.chars().take(300).collect::<String>()
            )));
        }
        Ok(None)
    }

    async fn delete(&self, key: &str) -> Result<(), StateError> {
        let resp = self
            .send(self.conn.http.delete(self.url("metadata", key)))
            .await?;
        match resp.status().as_u16() {
            200 | 204 | 404 => Ok(()),
            _ => Err(self.failed(resp).await),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        let url = format!(
            "{}/?list=true",
            self.url("metadata", prefix.trim_end_matches('/'))
        );
        let resp = self.send(self.conn.http.get(url)).await?;
        match resp.status().as_u16() {
            404 => return Ok(Vec::new()),
            200 => {}
            _ => return Err(self.failed(resp).await),
        }
        #[derive(Deserialize)]
        struct Keys {
            keys: Vec<String>,
        }
        #[derive(Deserialize)]
        struct Resp {
            data: Keys,
        }
        let r: Resp = resp.json_body().await.map_err(|e| self.unavailable(e))?;
        Ok(r.data.keys)
    }
}
