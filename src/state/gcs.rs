//! The state in Google Cloud Storage: `gs://bucket/path/state.json`, over
//! the JSON API.
//!
//! Writes are `uploadType=multipart` uploads with `ifGenerationMatch` (the
//! generation read, or 0 for "only if absent"): that form is enforced by GCS
//! and by fake-gcs-server alike (the latter ignores preconditions on `media`
//! uploads). `STORAGE_EMULATOR_HOST` points at an emulator (no credentials,
//! unless some are named by the variables below). Credentials come from `GOOGLE_APPLICATION_CREDENTIALS` (a
//! service-account key: an RS256 JWT exchanged at its `token_uri`; or
//! `authorized_user` credentials: a refresh token), else from the metadata
//! server (`GCE_METADATA_HOST`, default `metadata.google.internal`).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Deserialize;

use super::http::{FormBody as _, JsonBody as _};
use super::object::{Cond, Object, ObjectStore};
use super::url::StoreUrl;
use super::{StateError, Version};

const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_write";

/// Where access tokens come from.
#[derive(Debug, Clone)]
enum Auth {
    /// An emulator: none.
    None,
    ServiceAccount {
        email: String,
        key_pem: String,
        token_uri: String,
    },
    AuthorizedUser {
        client_id: String,
        client_secret: String,
        refresh_token: String,
        token_uri: String,
    },
    /// The metadata server at this host.
    Metadata(String),
}

#[derive(Deserialize)]
struct CredentialsFile {
    #[serde(rename = "type")]
    kind: String,
    client_email: Option<String>,
    private_key: Option<String>,
    token_uri: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    refresh_token: Option<String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// One object of a GCS bucket.
pub struct Gcs {
    http: reqwest::Client,
    base: String,
    bucket: String,
    key: String,
    auth: Auth,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
    describe: String,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

impl Gcs {
    pub fn open(url: &str) -> Result<Gcs, StateError> {
        let u = StoreUrl::parse(url, "gs", "gs://bucket/path/state.json")?;
        u.only(url, &[])?;
        let location = format!("gs://{}/{}", u.authority, u.path);
        let backend_err = |detail: String| StateError::Backend {
            location: location.clone(),
            detail,
        };
        let emulator = env("STORAGE_EMULATOR_HOST");
        let base = match &emulator {
            Some(h) if h.starts_with("http://") || h.starts_with("https://") => {
                h.trim_end_matches('/').to_string()
            }
            Some(h) => format!("http://{}", h.trim_end_matches('/')),
            None => "https://storage.googleapis.com".to_string(),
        };
        // An emulator needs no credentials, unless some are named.
        let auth = if emulator.is_some()
            && env("GOOGLE_APPLICATION_CREDENTIALS").is_none()
            && env("GCE_METADATA_HOST").is_none()
        {
            Auth::None
        } else {
            credentials(&location)?
        };
        let http = super::http::client(&super::http::Trust {
            plain_only: base.starts_with("http://"),
            ..Default::default()
        })
        .map_err(backend_err)?;
        Ok(Gcs {
            http,
            base,
            bucket: u.authority,
            key: u.path,
            auth,
            token: tokio::sync::Mutex::new(None),
            describe: location,
        })
    }

    fn unavailable(&self, detail: String) -> StateError {
        StateError::Unavailable {
            location: self.describe.clone(),
            detail,
        }
    }

    fn auth_err(&self, detail: String) -> StateError {
        StateError::Auth {
            location: self.describe.clone(),
            detail,
        }
    }

    /// A bearer token (cached until a minute before it expires).
    async fn token(&self) -> Result<Option<String>, StateError> {
        if matches!(self.auth, Auth::None) {
            return Ok(None);
        }
        let mut cached = self.token.lock().await;
        if let Some((t, until)) = cached.as_ref() {
            if Instant::now() < *until {
                return Ok(Some(t.clone()));
            }
        }
        let req = match &self.auth {
            Auth::None => unreachable!("checked above"),
            Auth::ServiceAccount {
                email,
                key_pem,
                token_uri,
            } => {
                let jwt =
                    service_account_jwt(email, key_pem, token_uri).map_err(|e| self.auth_err(e))?;
                self.http.post(token_uri).form_body(&[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", &jwt),
                ])
            }
            Auth::AuthorizedUser {
                client_id,
                client_secret,
                refresh_token,
                token_uri,
            } => self.http.post(token_uri).form_body(&[
                ("grant_type", "refresh_token"),
                ("client_id", client_id),
                ("client_secret", client_secret),
                ("refresh_token", refresh_token),
            ]),
            Auth::Metadata(host) => self
                .http
                .get(format!(
                    "http://{host}/computeMetadata/v1/instance/service-accounts/default/token"
                ))
                .header("Metadata-Flavor", "Google"),
        };
        let resp = req.send().await.map_err(|e| {
            self.auth_err(format!(
                "cannot get an access token ({}); set GOOGLE_APPLICATION_CREDENTIALS, or STORAGE_EMULATOR_HOST for an emulator",
                super::http::describe(&e)
            ))
        })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(self.auth_err(format!(
                "the token endpoint answered {status}: {}",
                text.chars().take(300).collect::<String>()
            )));
        }
        let t: TokenResponse = serde_json::from_str(&text).map_err(|e| {
            self.auth_err(format!("the token endpoint's answer is not a token: {e}"))
        })?;
        let life = Duration::from_secs(t.expires_in.unwrap_or(3600).saturating_sub(60).max(1));
        *cached = Some((t.access_token.clone(), Instant::now() + life));
        Ok(Some(t.access_token))
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, StateError> {
        let req = match self.token().await? {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = super::http::send(req)
            .await
            .map_err(|e| self.unavailable(super::http::describe(&e)))?;
        if matches!(resp.status().as_u16(), 401 | 403) {
            return Err(self.auth_err(super::http::answer(resp).await));
        }
        Ok(resp)
    }

    async fn failed(&self, resp: reqwest::Response) -> StateError {
        self.unavailable(super::http::answer(resp).await)
    }
}

/// Where tokens come from: `GOOGLE_APPLICATION_CREDENTIALS`, else the
/// metadata server.
fn credentials(location: &str) -> Result<Auth, StateError> {
    let Some(file) = env("GOOGLE_APPLICATION_CREDENTIALS") else {
        return Ok(Auth::Metadata(
            env("GCE_METADATA_HOST").unwrap_or_else(|| "metadata.google.internal".into()),
        ));
    };
    let auth_err = |detail: String| StateError::Auth {
        location: location.to_string(),
        detail,
    };
    let text = std::fs::read_to_string(&file).map_err(|e| {
        auth_err(format!(
            "cannot read GOOGLE_APPLICATION_CREDENTIALS {file}: {e}"
        ))
    })?;
    let c: CredentialsFile = serde_json::from_str(&text).map_err(|e| {
        auth_err(format!(
            "GOOGLE_APPLICATION_CREDENTIALS {file} is not a credentials file: {e}"
        ))
    })?;
    let missing = |what: &str| {
        auth_err(format!(
            "GOOGLE_APPLICATION_CREDENTIALS {file} has no {what}"
        ))
    };
    let token_uri = c
        .token_uri
        .unwrap_or_else(|| "https://oauth2.googleapis.com/token".into());
    match c.kind.as_str() {
        "service_account" => Ok(Auth::ServiceAccount {
            email: c.client_email.ok_or_else(|| missing("client_email"))?,
            key_pem: c.private_key.ok_or_else(|| missing("private_key"))?,
            token_uri,
        }),
        "authorized_user" => Ok(Auth::AuthorizedUser {
            client_id: c.client_id.ok_or_else(|| missing("client_id"))?,
            client_secret: c.client_secret.ok_or_else(|| missing("client_secret"))?,
            refresh_token: c.refresh_token.ok_or_else(|| missing("refresh_token"))?,
            token_uri,
        }),
        other => Err(auth_err(format!(
            "GOOGLE_APPLICATION_CREDENTIALS {file} is of type {other:?}; use a service_account key or authorized_user credentials"
        ))),
    }
}

/// The signed JWT a service account exchanges for a token.
fn service_account_jwt(email: &str, key_pem: &str, aud: &str) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let header = b64.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = b64.encode(
        serde_json::json!({
            "iss": email, "scope": SCOPE, "aud": aud, "iat": now, "exp": now + 3600,
        })
        .to_string(),
    );
    let input = format!("{header}.{claims}");
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("the service account's private_key is not a PKCS#8 PEM key ({e})"))?;
    let key = ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
        .map_err(|e| format!("the service account's private_key is not an RSA key ({e})"))?;
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .map_err(|_| "cannot sign with the service account's key".to_string())?;
    Ok(format!("{input}.{}", b64.encode(sig)))
}

#[async_trait]
impl ObjectStore for Gcs {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn probe_key(&self) -> String {
        format!("gs {} {}", self.base, self.bucket)
    }

    fn key(&self) -> &str {
        &self.key
    }

    async fn get(&self, key: &str) -> Result<Option<Object>, StateError> {
        let url = format!(
            "{}/storage/v1/b/{}/o/{}?alt=media",
            self.base,
            enc(&self.bucket),
            enc(key)
        );
        let resp = self.send(self.http.get(url)).await?;
        match resp.status().as_u16() {
            404 => return Ok(None),
            200 => {}
            _ => return Err(self.failed(resp).await),
        }
        let generation = resp
            .headers()
            .get("x-goog-generation")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| StateError::Backend {
                location: self.describe.clone(),
                detail: "it returns no x-goog-generation, which conditional writes need".into(),
            })?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.unavailable(super::http::describe(&e)))?;
        Ok(Some(Object {
            bytes: bytes.to_vec(),
            version: Version(generation),
        }))
    }

    async fn put(
        &self,
        key: &str,
        bytes: &[u8],
        cond: Cond<'_>,
    ) -> Result<Option<Version>, StateError> {
        let precondition = match cond {
            Cond::Absent => "&ifGenerationMatch=0".to_string(),
            Cond::Matches(v) => format!("&ifGenerationMatch={}", enc(&v.0)),
            Cond::Any => String::new(),
        };
        let url = format!(
            "{}/upload/storage/v1/b/{}/o?uploadType=multipart{precondition}",
            self.base,
            enc(&self.bucket),
        );
        let boundary = format!("nanokit-{}", uuid::Uuid::new_v4().simple());
        let meta = serde_json::json!({"name": key, "contentType": "application/json"});
        let mut body = format!(
            "--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{meta}\r\n--{boundary}\r\nContent-Type: application/json\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let req = self
            .http
            .post(url)
            .header(
                "Content-Type",
                format!("multipart/related; boundary={boundary}"),
            )
            .body(body);
        let resp = self.send(req).await?;
        match resp.status().as_u16() {
            412 => return Ok(None),
            200 => {}
            _ => return Err(self.failed(resp).await),
        }
        #[derive(Deserialize)]
        struct Written {
            generation: String,
        }
        let w: Written = resp.json_body().await.map_err(|e| self.unavailable(e))?;
        Ok(Some(Version(w.generation)))
    }

    async fn delete(&self, key: &str) -> Result<(), StateError> {
        let url = format!(
            "{}/storage/v1/b/{}/o/{}",
            self.base,
            enc(&self.bucket),
            enc(key)
        );
        let resp = self.send(self.http.delete(url)).await?;
        match resp.status().as_u16() {
            200 | 204 | 404 => Ok(()),
            _ => Err(self.failed(resp).await),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        #[derive(Deserialize)]
        struct Item {
            name: String,
        }
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            items: Vec<Item>,
            #[serde(rename = "nextPageToken")]
            next: Option<String>,
        }
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!(
                "{}/storage/v1/b/{}/o?prefix={}",
                self.base,
                enc(&self.bucket),
                enc(prefix)
            );
            if let Some(t) = &token {
                url.push_str(&format!("&pageToken={}", enc(t)));
            }
            let resp = self.send(self.http.get(url)).await?;
            if resp.status().as_u16() != 200 {
                return Err(self.failed(resp).await);
            }
            let page: Page = resp.json_body().await.map_err(|e| self.unavailable(e))?;
            names.extend(
                page.items
                    .into_iter()
                    .filter_map(|i| i.name.strip_prefix(prefix).map(str::to_string)),
            );
            match page.next {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(names),
            }
        }
    }
}
