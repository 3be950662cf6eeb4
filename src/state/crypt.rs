//! Encryption at rest of the state (and of saved plans), for every backend:
//! an envelope of AES-256-GCM data under a key from a key provider.
//!
//! - `passphrase`: the key is PBKDF2-HMAC-SHA512 of the passphrase (at
//!   least 16 characters) with a random salt, 600,000 iterations
//!   (OpenTofu's strength). Derived once per process and salt: a process
//!   keeps writing with the salt it read, so a run derives once.
//! - `transit`: Vault/OpenBao Transit makes a data key per write
//!   (`datakey/plaintext`); the envelope keeps it wrapped, and reading
//!   unwraps it (`decrypt`), once per process and key.
//! - A `fallback` provider opens what the primary cannot: rotation. Every
//!   write seals with the primary, so the next write re-encrypts.
//!
//! The envelope is JSON: `{"encryption_version": 1, "serial", "lineage",
//! "epoch", "meta": {…provider…}, "encrypted_data": base64(nonce ‖
//! ciphertext ‖ tag)}`; serial, lineage and epoch stay readable (backends
//! and lock epochs use them) and are bound to the ciphertext as associated
//! data. A wrong or missing key is `ENKSTATEKEY`, and nothing is written.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::http::JsonBody as _;
use super::StateError;
use crate::config::{KeySource, PassphraseSource, StateEncryption};

/// OpenTofu's PBKDF2 strength.
pub const PBKDF2_ITERATIONS: u32 = 600_000;
/// The shortest passphrase accepted.
pub const MIN_PASSPHRASE: usize = 16;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// What the clear part of an envelope says about the state inside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub serial: u64,
    pub lineage: String,
    #[serde(default)]
    pub epoch: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    encryption_version: u32,
    serial: u64,
    lineage: String,
    #[serde(default)]
    epoch: u64,
    meta: Value,
    encrypted_data: String,
}

/// Whether `bytes` is an encrypted envelope (and its clear head).
pub fn envelope_head(bytes: &[u8]) -> Option<Head> {
    let e: Envelope = serde_json::from_slice(bytes).ok()?;
    Some(Head {
        serial: e.serial,
        lineage: e.lineage,
        epoch: e.epoch,
    })
}

fn key_err(detail: impl Into<String>) -> StateError {
    StateError::Key {
        detail: detail.into(),
    }
}

fn aad(head: &Head) -> String {
    format!(
        "nanokit-state/{}/{}/{}",
        head.serial, head.lineage, head.epoch
    )
}

/// A key and what the envelope must say to find it again.
struct DataKey {
    key: [u8; 32],
    meta: Value,
}

/// One key provider of the configuration.
enum Provider {
    Passphrase(Passphrase),
    Transit(Transit),
}

impl Provider {
    fn of(source: &KeySource) -> Provider {
        match source {
            KeySource::Passphrase(p) => Provider::Passphrase(Passphrase {
                source: p.clone(),
                salt: Mutex::new(None),
            }),
            KeySource::Transit {
                key,
                mount,
                address,
            } => Provider::Transit(Transit {
                key: key.clone(),
                mount: mount.clone(),
                address: address.clone(),
            }),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Provider::Passphrase(_) => "passphrase",
            Provider::Transit(_) => "transit",
        }
    }

    async fn new_key(&self) -> Result<DataKey, StateError> {
        match self {
            Provider::Passphrase(p) => p.new_key(),
            Provider::Transit(t) => t.new_key().await,
        }
    }

    /// The key of an envelope written with this kind of provider, `None`
    /// when the envelope's meta is of another kind.
    async fn key_for(&self, meta: &Value) -> Result<Option<[u8; 32]>, StateError> {
        if meta.get("key_provider").and_then(Value::as_str) != Some(self.name()) {
            return Ok(None);
        }
        match self {
            Provider::Passphrase(p) => p.key_for(meta).map(Some),
            Provider::Transit(t) => t.key_for(meta).await.map(Some),
        }
    }

    /// After this provider opened an envelope: keep writing like it
    /// (the passphrase's salt, so that the key is derived once).
    fn adopt(&self, meta: &Value) {
        if let Provider::Passphrase(p) = self {
            if let Some(salt) = meta.get("salt").and_then(Value::as_str) {
                *p.salt.lock().unwrap_or_else(|e| e.into_inner()) = Some(salt.to_string());
            }
        }
    }
}

/// A passphrase's digest and a salt.
type DerivedId = (Vec<u8>, String);

/// Derived keys of this process.
static DERIVED: std::sync::LazyLock<Mutex<HashMap<DerivedId, [u8; 32]>>> =
    std::sync::LazyLock::new(Default::default);

struct Passphrase {
    source: PassphraseSource,
    /// The salt this process writes with.
    salt: Mutex<Option<String>>,
}

impl Passphrase {
    fn secret(&self) -> Result<String, StateError> {
        let value = match &self.source {
            PassphraseSource::Env { name, value } => value.clone().ok_or_else(|| {
                key_err(format!(
                    "the state encryption passphrase is read from the environment variable {name}, which is not set"
                ))
            })?,
            PassphraseSource::File(path) => std::fs::read_to_string(path)
                .map_err(|e| {
                    key_err(format!(
                        "cannot read the state encryption passphrase from {}: {e}",
                        path.display()
                    ))
                })?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
        };
        if value.chars().count() < MIN_PASSPHRASE {
            return Err(key_err(format!(
                "the state encryption passphrase ({}) has fewer than {MIN_PASSPHRASE} characters",
                self.source.describe()
            )));
        }
        Ok(value)
    }

    fn derive(&self, salt_b64: &str, iterations: u32) -> Result<[u8; 32], StateError> {
        use sha2::{Digest, Sha256};
        let secret = self.secret()?;
        let id = (
            Sha256::digest(secret.as_bytes()).to_vec(),
            salt_b64.to_string(),
        );
        if let Some(k) = DERIVED.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
            return Ok(*k);
        }
        let salt = B64
            .decode(salt_b64)
            .map_err(|_| key_err("the envelope's salt is not base64"))?;
        let mut key = [0u8; 32];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA512,
            NonZeroU32::new(iterations.max(1)).expect("at least 1"),
            &salt,
            secret.as_bytes(),
            &mut key,
        );
        DERIVED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, key);
        Ok(key)
    }

    fn new_key(&self) -> Result<DataKey, StateError> {
        let salt = {
            let mut s = self.salt.lock().unwrap_or_else(|e| e.into_inner());
            match s.as_ref() {
                Some(s) => s.clone(),
                None => {
                    let mut raw = [0u8; 16];
                    SystemRandom::new()
                        .fill(&mut raw)
                        .map_err(|_| key_err("no random numbers for a salt"))?;
                    let fresh = B64.encode(raw);
                    *s = Some(fresh.clone());
                    fresh
                }
            }
        };
        Ok(DataKey {
            key: self.derive(&salt, PBKDF2_ITERATIONS)?,
            meta: json!({
                "key_provider": "passphrase",
                "kdf": "pbkdf2",
                "hash": "sha512",
                "iterations": PBKDF2_ITERATIONS,
                "salt": salt,
            }),
        })
    }

    fn key_for(&self, meta: &Value) -> Result<[u8; 32], StateError> {
        let salt = meta
            .get("salt")
            .and_then(Value::as_str)
            .ok_or_else(|| key_err("the envelope has no salt"))?;
        let iterations = meta
            .get("iterations")
            .and_then(Value::as_u64)
            .unwrap_or(PBKDF2_ITERATIONS as u64);
        if meta.get("hash").and_then(Value::as_str).unwrap_or("sha512") != "sha512" {
            return Err(key_err(
                "the envelope's key derivation is not PBKDF2-SHA512",
            ));
        }
        self.derive(salt, iterations.min(u32::MAX as u64) as u32)
    }
}

/// Unwrapped Transit data keys of this process, by wrapped key.
static UNWRAPPED: std::sync::LazyLock<Mutex<HashMap<String, [u8; 32]>>> =
    std::sync::LazyLock::new(Default::default);

struct Transit {
    key: String,
    mount: String,
    address: Option<String>,
}

impl Transit {
    /// The address, token, namespace and client, as for the Vault backend.
    fn connection(&self) -> Result<super::vault::Connection, StateError> {
        super::vault::Connection::from_env(self.address.as_deref(), "the Transit key provider")
            .map_err(|e| key_err(e.to_string()))
    }

    async fn call(&self, op: &str, body: Value) -> Result<Value, StateError> {
        let c = self.connection()?;
        let resp = c
            .post(&format!("{}/{op}/{}", self.mount, self.key), &body)
            .await
            .map_err(|e| key_err(format!("Transit {op} failed: {e}")))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(key_err(format!(
                "Transit {op} with key {:?} answered {status}: {}",
                self.key,
                text.trim().chars().take(300).collect::<String>()
            )));
        }
        resp.json_body::<Value>()
            .await
            .map_err(|e| key_err(format!("Transit {op}: {e}")))
    }

    fn unwrap_b64(v: &Value) -> Result<[u8; 32], StateError> {
        let raw = v
            .pointer("/data/plaintext")
            .and_then(Value::as_str)
            .and_then(|p| B64.decode(p).ok())
            .ok_or_else(|| key_err("Transit gave no plaintext key"))?;
        raw.try_into()
            .map_err(|_| key_err("Transit's data key is not 256 bits"))
    }

    async fn new_key(&self) -> Result<DataKey, StateError> {
        let v = self.call("datakey/plaintext", json!({"bits": 256})).await?;
        let key = Self::unwrap_b64(&v)?;
        let wrapped = v
            .pointer("/data/ciphertext")
            .and_then(Value::as_str)
            .ok_or_else(|| key_err("Transit gave no wrapped key"))?
            .to_string();
        UNWRAPPED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(wrapped.clone(), key);
        Ok(DataKey {
            key,
            meta: json!({"key_provider": "transit", "key": self.key, "ciphertext": wrapped}),
        })
    }

    async fn key_for(&self, meta: &Value) -> Result<[u8; 32], StateError> {
        let wrapped = meta
            .get("ciphertext")
            .and_then(Value::as_str)
            .ok_or_else(|| key_err("the envelope has no wrapped key"))?;
        if let Some(k) = UNWRAPPED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(wrapped)
        {
            return Ok(*k);
        }
        let v = self.call("decrypt", json!({"ciphertext": wrapped})).await?;
        let key = Self::unwrap_b64(&v)?;
        UNWRAPPED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(wrapped.to_string(), key);
        Ok(key)
    }
}

/// How a state is sealed and opened: in the clear, or in an envelope.
#[derive(Clone, Default)]
pub struct Codec {
    primary: Option<Arc<Provider>>,
    fallback: Option<Arc<Provider>>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("primary", &self.primary.as_ref().map(|p| p.name()))
            .field("fallback", &self.fallback.as_ref().map(|p| p.name()))
            .finish()
    }
}

impl Codec {
    /// In the clear.
    pub fn plain() -> Codec {
        Codec::default()
    }

    /// As `infra.state_encryption` says (in the clear without it).
    pub fn of(config: Option<&StateEncryption>) -> Codec {
        match config {
            None => Codec::plain(),
            Some(c) => Codec {
                primary: Some(Arc::new(Provider::of(&c.key))),
                fallback: c.fallback.as_ref().map(|f| Arc::new(Provider::of(f))),
            },
        }
    }

    pub fn encrypts(&self) -> bool {
        self.primary.is_some()
    }

    /// `plain` as it is stored: itself, or an envelope under the primary
    /// key whose clear part is `head`.
    pub async fn seal(&self, plain: &[u8], head: &Head) -> Result<Vec<u8>, StateError> {
        let Some(p) = &self.primary else {
            return Ok(plain.to_vec());
        };
        let dk = p.new_key().await?;
        let sealing = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &dk.key).map_err(|_| key_err("bad key length"))?,
        );
        let mut nonce = [0u8; 12];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| key_err("no random numbers for a nonce"))?;
        let mut data = plain.to_vec();
        sealing
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(head).as_bytes()),
                &mut data,
            )
            .map_err(|_| key_err("encryption failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        let env = Envelope {
            encryption_version: 1,
            serial: head.serial,
            lineage: head.lineage.clone(),
            epoch: head.epoch,
            meta: dk.meta,
            encrypted_data: B64.encode(out),
        };
        let mut bytes = serde_json::to_vec_pretty(&env).expect("an envelope serialises");
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// The plain state in `stored`: an envelope opened with the primary key,
    /// else the fallback; a state stored in the clear as it is.
    ///
    /// Boxed: one instance of the opening in the binary, however many
    /// futures await it.
    pub fn open<'a>(
        &'a self,
        stored: &'a [u8],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, StateError>> + Send + 'a>>
    {
        Box::pin(self.open_inner(stored))
    }

    async fn open_inner(&self, stored: &[u8]) -> Result<Vec<u8>, StateError> {
        let Ok(env) = serde_json::from_slice::<Envelope>(stored) else {
            return Ok(stored.to_vec());
        };
        if env.encryption_version != 1 {
            return Err(key_err(format!(
                "the state is encrypted with envelope version {}; upgrade nanokit",
                env.encryption_version
            )));
        }
        let providers: Vec<&Arc<Provider>> =
            self.primary.iter().chain(self.fallback.iter()).collect();
        if providers.is_empty() {
            return Err(key_err(
                "the state is encrypted, and infra.state_encryption is not configured: configure the key it was written with",
            ));
        }
        let raw = B64
            .decode(&env.encrypted_data)
            .map_err(|_| key_err("the envelope's data is not base64"))?;
        if raw.len() < 12 + 16 {
            return Err(key_err("the envelope's data is too short"));
        }
        let head = Head {
            serial: env.serial,
            lineage: env.lineage.clone(),
            epoch: env.epoch,
        };
        let mut tried = Vec::new();
        for p in providers {
            let key = match p.key_for(&env.meta).await {
                Ok(Some(k)) => k,
                Ok(None) => continue,
                Err(e) => {
                    tried.push(e.to_string());
                    continue;
                }
            };
            let opening = LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, &key).map_err(|_| key_err("bad key length"))?,
            );
            let (nonce, rest) = raw.split_at(12);
            let mut data = rest.to_vec();
            let nonce = Nonce::try_assume_unique_for_key(nonce).expect("12 bytes");
            if let Ok(plain) =
                opening.open_in_place(nonce, Aad::from(aad(&head).as_bytes()), &mut data)
            {
                let n = plain.len();
                data.truncate(n);
                p.adopt(&env.meta);
                return Ok(data);
            }
            tried.push(format!("the {} key does not open it", p.name()));
        }
        Err(key_err(format!(
            "the state cannot be decrypted with the configured key{} ({}; it was written with the {} provider): give the key it was written with, or the old one as `fallback`",
            if self.fallback.is_some() { "s" } else { "" },
            if tried.is_empty() { "no configured provider is of that kind".to_string() } else { tried.join("; ") },
            env.meta.get("key_provider").and_then(Value::as_str).unwrap_or("unknown"),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KeySource, PassphraseSource, StateEncryption};
    use crate::error::ErrorCode;

    fn pass(v: &str) -> KeySource {
        KeySource::Passphrase(PassphraseSource::Env {
            name: "P".into(),
            value: Some(v.into()),
        })
    }

    fn codec(key: &str, fallback: Option<&str>) -> Codec {
        Codec::of(Some(&StateEncryption {
            key: pass(key),
            fallback: fallback.map(pass),
        }))
    }

    #[tokio::test]
    async fn seals_opens_rotates_and_refuses_wrong_keys() {
        let head = Head {
            serial: 7,
            lineage: "l".into(),
            epoch: 3,
        };
        let t0 = std::time::Instant::now();
        let old = codec("an old passphrase, 16+", None);
        let sealed = old.seal(b"{\"secret\": \"plain\"}", &head).await.unwrap();
        let first = t0.elapsed();
        assert!(!String::from_utf8_lossy(&sealed).contains("plain"));
        assert_eq!(envelope_head(&sealed), Some(head.clone()));
        // Derived once per process and salt: the second seal is cheap.
        let t1 = std::time::Instant::now();
        let again = old.seal(b"x", &head).await.unwrap();
        assert!(t1.elapsed() * 10 < first, "{:?} vs {first:?}", t1.elapsed());
        assert_eq!(old.open(&again).await.unwrap(), b"x");
        let wrong = codec("another passphrase, 16+", None);
        assert_eq!(wrong.open(&sealed).await.unwrap_err().code(), "ENKSTATEKEY");
        assert_eq!(
            Codec::plain().open(&sealed).await.unwrap_err().code(),
            "ENKSTATEKEY"
        );
        let rotated = codec("another passphrase, 16+", Some("an old passphrase, 16+"));
        let plain = rotated.open(&sealed).await.unwrap();
        let resealed = rotated.seal(&plain, &head).await.unwrap();
        assert_eq!(wrong.open(&resealed).await.unwrap(), plain);
        assert!(old.open(&resealed).await.is_err());
        // Tampering with the clear head is detected.
        let forged = String::from_utf8(sealed.clone())
            .unwrap()
            .replace("\"serial\": 7", "\"serial\": 8");
        assert!(old.open(forged.as_bytes()).await.is_err());
        assert_eq!(
            codec("short", None)
                .seal(b"x", &head)
                .await
                .unwrap_err()
                .code(),
            "ENKSTATEKEY"
        );
    }
}
