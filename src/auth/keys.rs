//! The keys tokens are verified with, and the algorithms each accepts.
//!
//! Each key accepts only the algorithms of its own kind: an HMAC secret HS256/384/512, an RSA key
//! RS* and PS*, an EC key ES256/ES384, an Ed25519 key EdDSA. A token is checked with exactly the
//! algorithm its header names, and only if the key accepts it: `alg: none` never parses, and an HS
//! token can never be checked against a public key's bytes as an HMAC secret.

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::Mutex;

use super::AuthError;

const HMAC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];
const EC: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];
const ED: &[Algorithm] = &[Algorithm::EdDSA];

/// A key and the algorithms it verifies.
#[derive(Clone)]
pub struct Key {
    pub key: Arc<DecodingKey>,
    pub algorithms: &'static [Algorithm],
}

/// Where verification keys come from.
pub enum Keys {
    /// One configured key (HMAC secret or PEM file).
    Fixed(Key),
    /// A JWKS fetched over HTTP.
    Jwks(Jwks),
}

impl Keys {
    pub fn hmac(secret: &str) -> Keys {
        Keys::Fixed(Key {
            key: Arc::new(DecodingKey::from_secret(secret.as_bytes())),
            algorithms: HMAC,
        })
    }

    /// Reads a PEM public key (RSA, EC or Ed25519).
    pub fn pem(path: &Path) -> Result<Keys, String> {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let key = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
            Key {
                key: Arc::new(k),
                algorithms: RSA,
            }
        } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
            Key {
                key: Arc::new(k),
                algorithms: EC,
            }
        } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
            Key {
                key: Arc::new(k),
                algorithms: ED,
            }
        } else {
            return Err(format!(
                "{} is not a PEM RSA, EC or Ed25519 public key",
                path.display()
            ));
        };
        Ok(Keys::Fixed(key))
    }

    /// The key for a token with this header's `kid` and `alg`, fetching the key set first when
    /// it must be.
    pub async fn find(&self, kid: Option<&str>, alg: Algorithm) -> Result<Key, AuthError> {
        match (self.find_cached(kid, alg), self) {
            (Some(found), _) => found,
            (None, Keys::Jwks(jwks)) => accepting(jwks.refresh_and_find(kid, alg).await?, alg),
            // A fixed key is always at hand.
            (None, Keys::Fixed(key)) => accepting(key.clone(), alg),
        }
    }

    /// The same without waiting: `None` when the key set must be fetched first (not fetched yet,
    /// due for a refetch, or without this `kid`).
    pub fn find_cached(&self, kid: Option<&str>, alg: Algorithm) -> Option<Result<Key, AuthError>> {
        let key = match self {
            Keys::Fixed(key) => key.clone(),
            Keys::Jwks(jwks) => match jwks.lookup(kid, alg) {
                (Some(key), false) => key,
                _ => return None,
            },
        };
        Some(accepting(key, alg))
    }
}

/// `key` if it verifies `alg`.
fn accepting(key: Key, alg: Algorithm) -> Result<Key, AuthError> {
    if key.algorithms.contains(&alg) {
        Ok(key)
    } else {
        Err(AuthError::Algorithm)
    }
}

/// Least time between two fetches of the JWKS, so tokens naming unknown `kid`s cannot make the
/// gateway hammer the key server.
const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// Age after which the next token triggers a refetch anyway, so removed keys stop working.
const JWKS_MAX_AGE: Duration = Duration::from_secs(15 * 60);
/// Time allowed for one fetch.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// A JWKS, fetched on first use and again (at most every [`JWKS_REFETCH_INTERVAL`]) when a token
/// names a `kid` it does not hold, or when it is older than [`JWKS_MAX_AGE`].
pub struct Jwks {
    url: String,
    http: reqwest::Client,
    /// The last fetched set; `None` until a fetch succeeds. A blocking lock: it is held only to
    /// look a key up or to swap the set, never across an await, so that a request whose key is
    /// known is verified without waiting.
    keys: RwLock<Option<Fetched>>,
    /// One fetch at a time; holds when the last one started.
    fetching: Mutex<Option<Instant>>,
}

/// A fetched key set.
struct Fetched {
    at: Instant,
    /// The keys by `kid` (`None` for a key without one).
    keys: Vec<(Option<String>, Key)>,
}

impl Jwks {
    pub fn new(url: String) -> Jwks {
        Jwks {
            url,
            http: reqwest::Client::builder()
                .timeout(JWKS_TIMEOUT)
                .build()
                .unwrap_or_default(),
            keys: RwLock::new(None),
            fetching: Mutex::new(None),
        }
    }

    /// The key once the set was refetched (unless another fetch started recently).
    async fn refresh_and_find(&self, kid: Option<&str>, alg: Algorithm) -> Result<Key, AuthError> {
        self.refresh().await;
        match self.lookup(kid, alg) {
            (Some(key), _) => Ok(key),
            (None, _) if self.read().is_none() => Err(AuthError::KeysUnavailable),
            (None, _) => Err(AuthError::UnknownKey),
        }
    }

    /// The set as last fetched. A panic elsewhere while holding the lock cannot leave a
    /// half-written set (it is swapped whole), so a poisoned lock is read all the same.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Option<Fetched>> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The matching key, and whether the set is due for a refetch.
    fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> (Option<Key>, bool) {
        let fetched = self.read();
        let Some(Fetched { at, keys }) = &*fetched else {
            return (None, true);
        };
        let found = keys
            .iter()
            .find(|(k, key)| k.as_deref() == kid && key.algorithms.contains(&alg))
            .or_else(|| {
                // A token without `kid`: any key of its algorithm.
                kid.is_none()
                    .then(|| keys.iter().find(|(_, key)| key.algorithms.contains(&alg)))
                    .flatten()
            })
            .map(|(_, key)| key.clone());
        (found, at.elapsed() > JWKS_MAX_AGE)
    }

    /// Fetches the set unless another fetch started within [`JWKS_REFETCH_INTERVAL`].
    async fn refresh(&self) {
        let mut last = self.fetching.lock().await;
        if last.is_some_and(|t| t.elapsed() < JWKS_REFETCH_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "fetched the JWKS");
                let fetched = Some(Fetched {
                    at: Instant::now(),
                    keys,
                });
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = fetched;
            }
            Err(e) => tracing::warn!(url = %self.url, error = %e, "cannot fetch the JWKS"),
        }
    }

    async fn fetch(&self) -> Result<Vec<(Option<String>, Key)>, String> {
        let response = self
            .http
            .get(&self.url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        let set: JwkSet = response.json().await.map_err(|e| e.to_string())?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let algorithms = match (&jwk.algorithm, jwk.common.key_algorithm) {
                // Symmetric keys have no place in a published key set.
                (AlgorithmParameters::OctetKey(_), _) => continue,
                (_, Some(alg)) => match single(alg) {
                    Some(algs) => algs,
                    None => continue,
                },
                (AlgorithmParameters::RSA(_), None) => RSA,
                (AlgorithmParameters::EllipticCurve(p), None) => match p.curve {
                    EllipticCurve::P256 => &EC[..1],
                    EllipticCurve::P384 => &EC[1..],
                    _ => continue,
                },
                (AlgorithmParameters::OctetKeyPair(_), None) => ED,
                _ => continue,
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            keys.push((
                jwk.common.key_id.clone(),
                Key {
                    key: Arc::new(key),
                    algorithms,
                },
            ));
        }
        Ok(keys)
    }
}

/// The one algorithm a JWK's `alg` names, if it is a signature algorithm for a public key.
fn single(alg: KeyAlgorithm) -> Option<&'static [Algorithm]> {
    let wanted = match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    };
    [RSA, EC, ED].into_iter().find_map(|family| {
        let i = family.iter().position(|a| *a == wanted)?;
        Some(&family[i..=i])
    })
}
