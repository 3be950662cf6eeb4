//! The state in S3 or an S3-compatible store:
//! `s3://bucket/path/state.json?region=&endpoint=&path_style=true`.
//!
//! Requests and signing are object_store's S3 client (over our own
//! rustls/ring HTTP client, [`super::http`]); writes carry `If-Match` on the
//! ETag read or `If-None-Match: *`. Credentials follow the standard AWS chain:
//! the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`), then the shared files (`AWS_PROFILE`, default
//! `default`, in `AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`, region
//! from `AWS_CONFIG_FILE` or `~/.aws/config`), then web identity
//! (`AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`), container credentials,
//! and the instance metadata service (unless `AWS_EC2_METADATA_DISABLED`).
//! `AWS_CA_BUNDLE` names extra CAs.
//!
//! A small record created once (a deploy-lock epoch, its release marker) is
//! an empty object with the record in its user metadata (`x-amz-meta-nanokit`,
//! base64): stores such as SeaweedFS then write no data chunk, about half
//! the cost of a write with data. Such an object's ETag is that of no data,
//! the same for all of them, so the lock uses it only while the object is
//! as created; every later write carries data.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpClient, HttpConnector};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, ClientOptions, ObjectStore as _, ObjectStoreExt as _, PutMode,
    PutOptions, PutPayload, RetryConfig, UpdateVersion,
};

use super::object::{Cond, Object, ObjectStore};
use super::url::StoreUrl;
use super::{StateError, Version};

/// The HTTP client object_store uses: ours.
#[derive(Debug)]
struct Connector(reqwest::Client);

impl HttpConnector for Connector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(self.0.clone()))
    }
}

/// The user metadata holding a small record (`x-amz-meta-nanokit`).
const RECORD_META: &str = "nanokit";

/// The longest record kept in metadata, base64 (AWS allows 2 KB of user
/// metadata in all); longer ones are written as data.
const RECORD_META_MAX: usize = 1800;

/// One object of an S3 bucket.
pub struct S3 {
    store: Arc<AmazonS3>,
    bucket: String,
    key: String,
    endpoint: String,
    describe: String,
}

/// The `[section]`s of an INI file (the AWS shared files), keys lowercased.
fn ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(section.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// An access key, its secret and a session token.
struct Keys {
    id: String,
    secret: String,
    token: Option<String>,
}

/// The keys of profile `AWS_PROFILE` (or `default`) in the shared
/// credentials file, and its region in the config file.
fn profile() -> (Option<Keys>, Option<String>) {
    let name = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let creds_file = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".aws/credentials")));
    let config_file = env("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".aws/config")));
    let read = |p: Option<PathBuf>| {
        p.and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| ini(&t))
    };
    let creds = read(creds_file).and_then(|f| {
        let s = f.get(&name)?;
        Some(Keys {
            id: s.get("aws_access_key_id")?.clone(),
            secret: s.get("aws_secret_access_key")?.clone(),
            token: s.get("aws_session_token").cloned(),
        })
    });
    let region = read(config_file).and_then(|f| {
        let section = if name == "default" {
            "default".to_string()
        } else {
            format!("profile {name}")
        };
        f.get(&section)?.get("region").cloned()
    });
    (creds, region)
}

fn is_true(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes")
}

impl S3 {
    /// The object `url` names, with credentials from the AWS chain.
    pub fn open(url: &str) -> Result<S3, StateError> {
        let u = StoreUrl::parse(url, "s3", "s3://bucket/path/state.json")?;
        u.only(url, &["region", "endpoint", "path_style"])?;
        let bad = |detail: String| StateError::Url {
            url: crate::pg::redact_url(url),
            detail,
        };
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&u.authority);
        let (profile_creds, profile_region) = profile();
        let mut profile_creds_used = false;
        if env("AWS_ACCESS_KEY_ID").is_none() {
            if let Some(k) = profile_creds {
                profile_creds_used = true;
                b = b.with_access_key_id(k.id).with_secret_access_key(k.secret);
                if let Some(t) = k.token {
                    b = b.with_token(t);
                }
            }
        }
        // The SDKs' switch for the instance metadata service, the chain's
        // last resort: with it set and no other credentials, say so.
        let no_imds = env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| is_true(&v));
        let has_other = env("AWS_ACCESS_KEY_ID").is_some()
            || profile_creds_used
            || env("AWS_WEB_IDENTITY_TOKEN_FILE").is_some()
            || env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").is_some()
            || env("AWS_CONTAINER_CREDENTIALS_FULL_URI").is_some();
        if no_imds && !has_other {
            return Err(StateError::Auth {
                location: format!("s3://{}/{}", u.authority, u.path),
                detail: "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (the instance metadata service is off: AWS_EC2_METADATA_DISABLED)".into(),
            });
        }
        let region = u
            .param("region")
            .map(str::to_string)
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or(profile_region)
            .unwrap_or_else(|| "us-east-1".into());
        b = b.with_region(&region);
        let endpoint = u.param("endpoint").map(str::to_string);
        let path_style = u.param("path_style").is_some_and(is_true);
        if let Some(e) = &endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(bad(format!(
                    "endpoint={e:?} must be an http:// or https:// URL"
                )));
            }
            b = b
                .with_endpoint(e)
                .with_allow_http(e.starts_with("http://"))
                .with_virtual_hosted_style_request(!path_style);
        }
        let ca = env("AWS_CA_BUNDLE").map(PathBuf::from);
        let plain_only = endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        let http = super::http::client(&super::http::Trust {
            ca_files: ca.iter().map(|p| p.as_path()).collect(),
            identity: None,
            plain_only,
        })
        .map_err(|e| StateError::Backend {
            location: format!("s3://{}", u.authority),
            detail: e,
        })?;
        let store = b
            .with_http_connector(Connector(http))
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(20),
                ..RetryConfig::default()
            })
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let endpoint_name = endpoint.clone().unwrap_or_else(|| format!("aws {region}"));
        Ok(S3 {
            store: Arc::new(store),
            describe: format!("s3://{}/{} ({endpoint_name})", u.authority, u.path),
            bucket: u.authority,
            key: u.path,
            endpoint: endpoint_name,
        })
    }

    fn err(&self, e: object_store::Error) -> StateError {
        let location = self.describe.clone();
        match e {
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => StateError::Auth {
                location,
                detail: format!(
                    "{source}; check the AWS credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / the instance role)"
                ),
            },
            e => StateError::Unavailable {
                location,
                detail: e.to_string(),
            },
        }
    }

    fn path(&self, key: &str) -> Result<ObjectPath, StateError> {
        ObjectPath::parse(key).map_err(|e| StateError::Url {
            url: self.describe.clone(),
            detail: e.to_string(),
        })
    }

    /// Writes `payload` to `key` with `opts`: the new ETag, or `None` when
    /// the store refused the write for its precondition.
    async fn write(
        &self,
        key: &str,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<Option<Version>, StateError> {
        match self.store.put_opts(&self.path(key)?, payload, opts).await {
            Ok(r) => r
                .e_tag
                .map(|e| Some(Version(e)))
                .ok_or_else(|| StateError::Backend {
                    location: self.describe.clone(),
                    detail: "it returns no ETag for a write, which conditional writes need".into(),
                }),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }
}

#[async_trait]
impl ObjectStore for S3 {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn probe_key(&self) -> String {
        format!("s3 {} {}", self.endpoint, self.bucket)
    }

    fn key(&self) -> &str {
        &self.key
    }

    async fn get(&self, key: &str) -> Result<Option<Object>, StateError> {
        let r = match self.store.get(&self.path(key)?).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let etag = r.meta.e_tag.clone().ok_or_else(|| StateError::Backend {
            location: self.describe.clone(),
            detail: "it returns no ETag, which conditional writes need".into(),
        })?;
        let record = r
            .attributes
            .get(&Attribute::Metadata(RECORD_META.into()))
            .map(|v| v.as_ref().to_string());
        let mut bytes = r.bytes().await.map_err(|e| self.err(e))?.to_vec();
        if bytes.is_empty() {
            if let Some(b64) = record {
                use base64::Engine as _;
                bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|e| StateError::Backend {
                        location: self.describe.clone(),
                        detail: format!("the record in the metadata of {key} is not base64: {e}"),
                    })?;
            }
        }
        Ok(Some(Object {
            bytes,
            version: Version(etag),
        }))
    }

    async fn put(
        &self,
        key: &str,
        bytes: &[u8],
        cond: Cond<'_>,
    ) -> Result<Option<Version>, StateError> {
        let mode = match cond {
            Cond::Any => PutMode::Overwrite,
            Cond::Absent => PutMode::Create,
            Cond::Matches(v) => PutMode::Update(UpdateVersion {
                e_tag: Some(v.0.clone()),
                version: None,
            }),
        };
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        self.write(key, PutPayload::from(bytes.to_vec()), opts)
            .await
    }

    async fn create_small(&self, key: &str, bytes: &[u8]) -> Result<Option<Version>, StateError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        if b64.len() > RECORD_META_MAX {
            return self.put(key, bytes, Cond::Absent).await;
        }
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::Metadata(RECORD_META.into()), b64.into());
        let opts = PutOptions {
            mode: PutMode::Create,
            attributes,
            ..PutOptions::default()
        };
        self.write(key, PutPayload::default(), opts).await
    }

    async fn delete(&self, key: &str) -> Result<(), StateError> {
        match self.store.delete(&self.path(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        use futures::StreamExt as _;
        let folder = self.path(prefix.trim_end_matches('/'))?;
        let mut stream = self.store.list(Some(&folder));
        let mut names = Vec::new();
        while let Some(meta) = stream.next().await {
            let meta = meta.map_err(|e| self.err(e))?;
            if let Some(name) = meta.location.as_ref().strip_prefix(prefix) {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ini_sections_and_keys() {
        let f = ini("# c\n[default]\naws_access_key_id = AK\nAWS_Secret_Access_Key=SK\n\n[profile x]\nregion = eu-west-3\n");
        assert_eq!(f["default"]["aws_access_key_id"], "AK");
        assert_eq!(f["default"]["aws_secret_access_key"], "SK");
        assert_eq!(f["profile x"]["region"], "eu-west-3");
    }
}
