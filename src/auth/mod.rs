//! Who may publish and subscribe: JWTs whose `ssegate` claim lists topic patterns, and, at the
//! Mercure hub, whose `mercure` claim lists topic selectors.
//!
//! ```json
//! {"ssegate": {"publish": ["news.*"], "subscribe": ["user.42", "news.*"]}, "exp": 1767225600}
//! ```
//!
//! [`Authenticator::authenticate`] turns a request's token into an [`Access`] (the HTTP layer does
//! this for every request, in one place); handlers then ask it about the topics they touch. With no
//! key configured, every request gets [`Access::Open`] and everything is allowed.
//!
//! A request comes through one of several [`Door`]s: the native API, or the Mercure hub (as a
//! publisher or a subscriber). A door decides where the token is looked for and which key
//! verifies it; what a verified token grants is read from all its claims at once.

mod keys;
pub mod pattern;
pub mod revocations;
pub mod token;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use self::keys::{Jwks, Key, Keys};
use self::revocations::Revocations;
use crate::config::{Auth as AuthSettings, Mercure as MercureSettings};
use crate::event::Topic;

/// Which rules read a request's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// `/v1`: `Authorization: Bearer` > the `auth.cookie_name` cookie > `?access_token=`, verified
    /// with the `auth` key.
    Native,
    /// A Mercure publish: `Authorization: Bearer` > `?authorization=` > the
    /// `mercure.cookie_name` cookie, verified with `mercure.publisher_jwt_key` (else the `auth`
    /// key).
    MercurePublish,
    /// A Mercure subscription: as a publish, with `mercure.subscriber_jwt_key`.
    MercureSubscribe,
}

/// A request's credentials before any token is verified.
// Lives on the stack for one request; boxing the access would allocate on every request.
#[allow(clippy::large_enum_variant)]
enum Credentials<'k> {
    /// No token to verify: the access is known.
    Decided(Access),
    /// A token to verify with these keys; whether it came in a cookie.
    Token {
        token: String,
        keys: &'k Keys,
        from_cookie: bool,
    },
}

/// A token's header, which names its key and algorithm.
fn decode_header(token: &str) -> Result<jsonwebtoken::Header, AuthError> {
    jsonwebtoken::decode_header(token).map_err(|_| {
        AuthError::Malformed(
            "the token is malformed, or its header names an algorithm ssegate does not accept",
        )
    })
}

/// Why a request is not allowed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error(
        "a token is required: send `Authorization: Bearer <token>`, the cookie, or ?access_token= (?authorization= at the Mercure hub)"
    )]
    Missing,
    #[error("{0}")]
    Malformed(&'static str),
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token's algorithm is not accepted for the configured key")]
    Algorithm,
    #[error("the token has expired (exp)")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token is for another audience (aud)")]
    Audience,
    #[error("the token is from another issuer (iss)")]
    Issuer,
    #[error("the token names a key (kid) the key set does not hold")]
    UnknownKey,
    #[error("the signing keys cannot be fetched right now; retry later")]
    KeysUnavailable,
    #[error("the token was revoked (by its jti, or every token of its sub issued until then); get a new one")]
    Revoked,
    #[error("the token does not allow {action} to topic `{topic}`")]
    Forbidden { action: &'static str, topic: String },
    #[error("{0}")]
    Refused(String),
    /// A valid token that does not reach what is asked where the protocol answers `401` for
    /// it (Mercure's subscriptions API).
    #[error("{0}")]
    Uncovered(&'static str),
}

impl AuthError {
    /// A short name for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::Signature => "signature",
            AuthError::Algorithm => "algorithm",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Audience => "audience",
            AuthError::Issuer => "issuer",
            AuthError::UnknownKey => "unknown_key",
            AuthError::KeysUnavailable => "keys_unavailable",
            AuthError::Revoked => "revoked",
            AuthError::Forbidden { .. } | AuthError::Refused(_) => "forbidden",
            AuthError::Uncovered(_) => "uncovered",
        }
    }

    /// `403` rather than `401`: the token is good, it just does not cover the topic.
    pub fn is_forbidden(&self) -> bool {
        matches!(self, AuthError::Forbidden { .. } | AuthError::Refused(_))
    }
}

/// What a request may do, decided once per request from its token.
// Decided once per request and moved, not stored in bulk: boxing the token would cost an
// allocation per request for a few bytes saved on the other variants.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Access {
    /// No key is configured: everything is allowed.
    Open,
    /// No token was sent: only `auth.anonymous_subscribe` topics.
    Anonymous,
    /// A valid token.
    Token(Verified),
    /// A token was sent and is not valid: every topic that needs a token is refused with this.
    Invalid(AuthError),
}

impl Access {
    /// When a stream opened with this access must end: the token's `exp` plus the leeway.
    pub fn expires(&self) -> Option<SystemTime> {
        match self {
            Access::Token(v) => v.expires,
            _ => None,
        }
    }
}

/// What a valid token allows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Grants {
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Topics whose server API (presence, …) the token may use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin: Vec<String>,
    /// What the application says about the token's holder (a name, an avatar): shown with its
    /// subscriptions in presence and in join and leave events. Not a grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

/// What a token's `mercure` claim (or its namespaced form, `https://mercure.rocks/`) holds:
/// topic selectors for publishing and for receiving private updates, and a payload that is
/// attached to the token's subscriptions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MercureGrants {
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

/// The claims ssegate reads; others are ignored.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    #[serde(default)]
    ssegate: Grants,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mercure: Option<MercureGrants>,
    #[serde(
        default,
        rename = "https://mercure.rocks/",
        skip_serializing_if = "Option::is_none"
    )]
    mercure_namespaced: Option<MercureGrants>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    /// The token's id, by which it can be revoked alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    /// Who the token is for, shown in presence. Any JSON value is accepted and kept as text: a
    /// number where a string was meant should not lock a user out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<serde_json::Value>,
}

/// A verified token's grants and when it stops being valid.
#[derive(Debug, Clone)]
pub struct Verified {
    pub grants: Grants,
    /// The token's `sub`, as text.
    pub sub: Option<String>,
    /// The token's `jti` and `iat`, which revocations name.
    pub jti: Option<String>,
    pub iat: Option<u64>,
    /// The `mercure` claim, if the token has one.
    pub mercure: Option<MercureGrants>,
    /// `exp` plus the leeway; `None` if the token has no `exp`.
    pub expires: Option<SystemTime>,
    /// The token came in a cookie, which a browser sends with any request to the gateway, from
    /// any page: a Mercure publish with it must also come from an allowed origin.
    pub from_cookie: bool,
}

/// Verifies tokens and applies the rules.
pub struct Authenticator {
    /// `None`: authorization is off.
    keys: Option<Keys>,
    /// The Mercure hub's own keys, when configured (otherwise `keys` serves it too).
    mercure_publisher: Option<Keys>,
    mercure_subscriber: Option<Keys>,
    /// The cookie a Mercure token comes in.
    mercure_cookie: String,
    /// `aud`, `iss`, leeway; the algorithm is set per token.
    validation: Validation,
    leeway: Duration,
    cookie_name: String,
    anonymous_subscribe: Vec<String>,
    /// Tokens refused before their `exp`, kept in step across nodes by [`crate::control`].
    revocations: Arc<Revocations>,
}

impl Authenticator {
    /// From the settings; an unreadable key file is an error naming it.
    pub fn new(
        settings: &AuthSettings,
        mercure: &MercureSettings,
    ) -> Result<Authenticator, String> {
        let keys = if let Some(secret) = &settings.jwt_key {
            Some(Keys::hmac(secret))
        } else if let Some(path) = &settings.jwt_public_key {
            Some(Keys::pem(path)?)
        } else {
            settings
                .jwks_url
                .clone()
                .map(|url| Keys::Jwks(Jwks::new(url)))
        };
        let mut validation = Validation::new(Algorithm::HS256);
        // Tokens without `exp` are accepted (a publisher's long-lived key, say); when present it
        // is enforced, as is `nbf`.
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = settings.leeway.as_secs();
        match &settings.audience {
            Some(aud) => validation.set_audience(&[aud]),
            // Without a configured audience, a token's `aud` is not checked (jsonwebtoken would
            // otherwise refuse every token that has one).
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &settings.issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Authenticator {
            keys,
            mercure_publisher: mercure.publisher_jwt_key.as_deref().map(Keys::hmac),
            mercure_subscriber: mercure.subscriber_jwt_key.as_deref().map(Keys::hmac),
            mercure_cookie: mercure.cookie_name.clone(),
            validation,
            leeway: settings.leeway,
            cookie_name: settings.cookie_name.clone(),
            anonymous_subscribe: settings.anonymous_subscribe.clone(),
            revocations: Arc::default(),
        })
    }

    /// The node's revocation list, which every verified token is checked against.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    pub fn enabled(&self) -> bool {
        self.keys.is_some()
    }

    /// Whether a door requires tokens (some key verifies them).
    pub fn enabled_at(&self, door: Door) -> bool {
        self.keys_for(door).is_some()
    }

    /// The keys that verify tokens coming through `door`.
    fn keys_for(&self, door: Door) -> Option<&Keys> {
        match door {
            Door::Native => self.keys.as_ref(),
            Door::MercurePublish => self.mercure_publisher.as_ref().or(self.keys.as_ref()),
            Door::MercureSubscribe => self.mercure_subscriber.as_ref().or(self.keys.as_ref()),
        }
    }

    /// The access a request's credentials give.
    pub async fn authenticate(
        &self,
        door: Door,
        headers: &HeaderMap,
        raw_query: Option<&str>,
    ) -> Access {
        match self.credentials(door, headers, raw_query) {
            Credentials::Decided(access) => access,
            Credentials::Token {
                token,
                keys,
                from_cookie,
            } => verified(self.verify_with(keys, &token).await, from_cookie),
        }
    }

    /// The same without waiting, which is the usual case: `None` only when the token's key must
    /// first be fetched (see [`Authenticator::authenticate`]).
    pub fn authenticate_now(
        &self,
        door: Door,
        headers: &HeaderMap,
        raw_query: Option<&str>,
    ) -> Option<Access> {
        match self.credentials(door, headers, raw_query) {
            Credentials::Decided(access) => Some(access),
            Credentials::Token {
                token,
                keys,
                from_cookie,
            } => Some(verified(self.verify_now(keys, &token)?, from_cookie)),
        }
    }

    /// What a request's credentials are, short of verifying a token.
    fn credentials(
        &self,
        door: Door,
        headers: &HeaderMap,
        raw_query: Option<&str>,
    ) -> Credentials<'_> {
        let Some(keys) = self.keys_for(door) else {
            return Credentials::Decided(Access::Open);
        };
        let found = match door {
            Door::Native => token::extract(headers, raw_query, &self.cookie_name),
            Door::MercurePublish | Door::MercureSubscribe => {
                token::extract_mercure(headers, raw_query, &self.mercure_cookie)
            }
        };
        match found {
            Ok(None) => Credentials::Decided(Access::Anonymous),
            Ok(Some((token, source))) => Credentials::Token {
                token,
                keys,
                from_cookie: source == token::Source::Cookie,
            },
            Err(e) => Credentials::Decided(Access::Invalid(e)),
        }
    }

    /// Checks a token's signature (with the native door's key) and claims.
    pub async fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        let keys = self.keys.as_ref().ok_or(AuthError::Missing)?;
        self.verify_with(keys, token).await
    }

    async fn verify_with(&self, keys: &Keys, token: &str) -> Result<Verified, AuthError> {
        let header = decode_header(token)?;
        let key = keys.find(header.kid.as_deref(), header.alg).await?;
        self.check(token, header.alg, &key)
    }

    /// The same when the key is at hand: `None` when the key set must be fetched first.
    fn verify_now(&self, keys: &Keys, token: &str) -> Option<Result<Verified, AuthError>> {
        let header = match decode_header(token) {
            Ok(header) => header,
            Err(e) => return Some(Err(e)),
        };
        let key = keys.find_cached(header.kid.as_deref(), header.alg)?;
        Some(key.and_then(|key| self.check(token, header.alg, &key)))
    }

    /// Checks a token's signature with `key`, then its claims.
    fn check(&self, token: &str, alg: Algorithm, key: &Key) -> Result<Verified, AuthError> {
        let mut validation = self.validation.clone();
        validation.algorithms = vec![alg];
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::InvalidSignature => AuthError::Signature,
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                        AuthError::Algorithm
                    }
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    ErrorKind::InvalidAudience => AuthError::Audience,
                    ErrorKind::InvalidIssuer => AuthError::Issuer,
                    _ => AuthError::Malformed(
                        "the token is malformed, or its claims are not of the expected types",
                    ),
                }
            })?;
        let expires = data
            .claims
            .exp
            .map(|exp| UNIX_EPOCH + Duration::from_secs(exp) + self.leeway);
        // RFC 7519: not accepted *on or after* `exp`; jsonwebtoken still accepts during that
        // second, when a stream opened with the token would end at once.
        if expires.is_some_and(|at| at <= SystemTime::now()) {
            return Err(AuthError::Expired);
        }
        let sub = data.claims.sub.map(sub_text);
        let (jti, iat) = (data.claims.jti, data.claims.iat);
        // In memory: no round trip, and nothing at all while nothing is revoked.
        if self
            .revocations
            .revoked(jti.as_deref(), sub.as_deref(), iat)
        {
            return Err(AuthError::Revoked);
        }
        Ok(Verified {
            grants: data.claims.ssegate,
            sub,
            jti,
            iat,
            mercure: data.claims.mercure.or(data.claims.mercure_namespaced),
            expires,
            from_cookie: false,
        })
    }

    /// Refuses at once a request that can subscribe to nothing: a bad token, or none while no
    /// topic is open to anonymous clients. Checked before the request is even parsed.
    pub fn may_try_subscribing(&self, access: &Access) -> Result<(), AuthError> {
        match access {
            Access::Invalid(e) => Err(e.clone()),
            Access::Anonymous if self.anonymous_subscribe.is_empty() => Err(AuthError::Missing),
            _ => Ok(()),
        }
    }

    /// Refuses at once a request that can publish nothing: no token, or a bad one.
    pub fn may_try_publishing(&self, access: &Access) -> Result<(), AuthError> {
        match access {
            Access::Invalid(e) => Err(e.clone()),
            Access::Anonymous => Err(AuthError::Missing),
            _ => Ok(()),
        }
    }

    /// Whether `access` may read `topic`.
    pub fn may_subscribe(&self, access: &Access, topic: &Topic) -> Result<(), AuthError> {
        if pattern::any_matches(&self.anonymous_subscribe, topic.as_str())
            && !matches!(access, Access::Invalid(_))
        {
            return Ok(());
        }
        check(access, topic, "subscribing", |g| &g.subscribe)
    }

    /// Whether `access` may use the server API on `topic` (its `ssegate.admin` patterns cover
    /// it). Open access (no key configured) may; no token is `401`, another token `403`.
    pub fn may_administer(&self, access: &Access, topic: &str) -> Result<(), AuthError> {
        match access {
            Access::Open => Ok(()),
            Access::Anonymous => Err(AuthError::Missing),
            Access::Invalid(e) => Err(e.clone()),
            Access::Token(v) if pattern::any_matches(&v.grants.admin, topic) => Ok(()),
            Access::Token(_) => Err(AuthError::Forbidden {
                action: "administering",
                topic: topic.to_owned(),
            }),
        }
    }

    /// Whether `access` may publish to every one of `topics`.
    pub fn may_publish<'t>(
        &self,
        access: &Access,
        topics: impl IntoIterator<Item = &'t Topic>,
    ) -> Result<(), AuthError> {
        for topic in topics {
            check(access, topic, "publishing", |g| &g.publish)?;
        }
        Ok(())
    }
}

/// A `sub` as text: a string as it is, any other JSON value as its JSON text (a number where a
/// string was meant should not lock a user out). Tokens and disconnects name a `sub` alike.
pub fn sub_text(sub: serde_json::Value) -> String {
    match sub {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

/// An access from a token's verification.
fn verified(result: Result<Verified, AuthError>, from_cookie: bool) -> Access {
    match result {
        Ok(v) => Access::Token(Verified { from_cookie, ..v }),
        Err(e) => Access::Invalid(e),
    }
}

fn check(
    access: &Access,
    topic: &Topic,
    action: &'static str,
    patterns: impl Fn(&Grants) -> &Vec<String>,
) -> Result<(), AuthError> {
    match access {
        Access::Open => Ok(()),
        Access::Anonymous => Err(AuthError::Missing),
        Access::Invalid(e) => Err(e.clone()),
        Access::Token(v) if pattern::any_matches(patterns(&v.grants), topic.as_str()) => Ok(()),
        Access::Token(_) => Err(AuthError::Forbidden {
            action,
            topic: topic.to_string(),
        }),
    }
}

/// Signs a token with an HMAC secret (HS256), for `ssegate token`: the `ssegate` claim's grants,
/// and a `mercure` claim when `mercure` is given.
pub fn issue(
    secret: &str,
    sub: Option<serde_json::Value>,
    grants: Grants,
    mercure: Option<MercureGrants>,
    ttl: Duration,
) -> Result<String, String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let claims = Claims {
        ssegate: grants,
        mercure,
        mercure_namespaced: None,
        exp: Some(now + ttl.as_secs()),
        iat: Some(now),
        // Each token its own id, so that it can be revoked alone.
        jti: Some(format!("{:032x}", rand::random::<u128>())),
        sub,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn authenticator(f: impl FnOnce(&mut AuthSettings)) -> Authenticator {
        let mut s = AuthSettings {
            jwt_key: Some(SECRET.into()),
            ..AuthSettings::default()
        };
        f(&mut s);
        Authenticator::new(&s, &MercureSettings::default()).unwrap()
    }

    fn topic(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    #[tokio::test]
    async fn issued_tokens_verify_and_grant_their_patterns() {
        let auth = authenticator(|_| {});
        let grants = Grants {
            publish: vec!["news.*".into()],
            subscribe: vec!["user.42".into()],
            admin: vec!["news.*".into()],
            info: Some(serde_json::json!({"name": "Ada"})),
        };
        let mercure = MercureGrants {
            publish: vec!["https://example.com/{id}".into()],
            subscribe: vec![],
            payload: None,
        };
        let sub = Some(serde_json::json!("ada"));
        let token = issue(SECRET, sub, grants, Some(mercure), Duration::from_secs(60)).unwrap();
        let v = auth.verify(&token).await.unwrap();
        assert_eq!(v.sub.as_deref(), Some("ada"));
        assert_eq!(v.grants.info, Some(serde_json::json!({"name": "Ada"})));
        assert!(v.expires.is_some());
        let m = v.mercure.as_ref().expect("the mercure claim");
        assert_eq!(m.publish, ["https://example.com/{id}"]);
        let access = Access::Token(v);
        assert!(auth.may_publish(&access, [&topic("news.eu")]).is_ok());
        assert!(auth
            .may_publish(&access, [&topic("news.eu"), &topic("sport")])
            .unwrap_err()
            .is_forbidden());
        assert!(auth.may_subscribe(&access, &topic("user.42")).is_ok());
        assert!(auth.may_administer(&access, "news.eu").is_ok());
        assert!(auth
            .may_administer(&access, "user.42")
            .unwrap_err()
            .is_forbidden());
        assert!(matches!(
            auth.may_administer(&Access::Anonymous, "news.eu"),
            Err(AuthError::Missing)
        ));
        assert!(auth
            .may_subscribe(&access, &topic("user.43"))
            .unwrap_err()
            .is_forbidden());
    }

    /// The Mercure claim is read as `mercure` or, namespaced, as `https://mercure.rocks/`.
    #[tokio::test]
    async fn the_mercure_claim_is_read_in_both_spellings() {
        let auth = authenticator(|_| {});
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        for name in ["mercure", "https://mercure.rocks/"] {
            let claims = serde_json::json!({
                name: {"publish": ["*"], "subscribe": ["https://example.com/{id}"], "payload": {"user": 7}},
            });
            let token =
                jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
            let v = auth.verify(&token).await.unwrap();
            let m = v.mercure.expect("the claim");
            assert_eq!(
                (m.publish.as_slice(), m.subscribe.as_slice()),
                (
                    &["*".to_owned()][..],
                    &["https://example.com/{id}".to_owned()][..]
                )
            );
            assert_eq!(m.payload, Some(serde_json::json!({"user": 7})), "{name}");
        }
        // A claim of the wrong shape is a malformed token, not a token without grants.
        let claims = serde_json::json!({"mercure": {"publish": "*"}});
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert!(matches!(
            auth.verify(&token).await,
            Err(AuthError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn anonymous_topics_need_no_token_but_a_bad_token_still_fails() {
        let auth = authenticator(|s| s.anonymous_subscribe = vec!["public.*".into()]);
        assert!(auth
            .may_subscribe(&Access::Anonymous, &topic("public.news"))
            .is_ok());
        assert!(matches!(
            auth.may_subscribe(&Access::Anonymous, &topic("private")),
            Err(AuthError::Missing)
        ));
        let bad = Access::Invalid(AuthError::Expired);
        assert!(matches!(
            auth.may_subscribe(&bad, &topic("public.news")),
            Err(AuthError::Expired)
        ));
        assert!(matches!(
            auth.may_publish(&Access::Anonymous, [&topic("public.news")]),
            Err(AuthError::Missing)
        ));
    }

    #[test]
    fn every_refusal_reason_is_a_known_metric_label() {
        let all = [
            AuthError::Missing,
            AuthError::Malformed("x"),
            AuthError::Signature,
            AuthError::Algorithm,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::Audience,
            AuthError::Issuer,
            AuthError::UnknownKey,
            AuthError::KeysUnavailable,
            AuthError::Uncovered("x"),
            AuthError::Forbidden {
                action: "subscribing",
                topic: "t".into(),
            },
            AuthError::Revoked,
        ];
        assert_eq!(AuthError::Refused("x".into()).code(), "forbidden");
        for e in &all {
            assert!(
                crate::metrics::AUTH_FAILURE_REASONS.contains(&e.code()),
                "{}",
                e.code()
            );
        }
        assert_eq!(all.len(), crate::metrics::AUTH_FAILURE_REASONS.len());
    }

    #[tokio::test]
    async fn open_access_without_keys() {
        let auth =
            Authenticator::new(&AuthSettings::default(), &MercureSettings::default()).unwrap();
        assert!(!auth.enabled());
        let access = auth
            .authenticate(Door::Native, &HeaderMap::new(), None)
            .await;
        assert!(matches!(access, Access::Open));
        assert!(auth.may_publish(&access, [&topic("x")]).is_ok());
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config("hostile_tokens_never_panic"))]
        /// Arbitrary strings, and three base64url segments of arbitrary JSON-ish text.
        #[test]
        fn hostile_tokens_never_panic(
            raw in "\\PC{0,200}",
            header in "[{}\\[\\]\":,a-zA-Z0-9 ]{0,80}",
            claims in "[{}\\[\\]\":,a-zA-Z0-9 ]{0,120}",
            signature in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let forged = format!("{}.{}.{}", b64.encode(&header), b64.encode(&claims), b64.encode(&signature));
            let auth = authenticator(|_| {});
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            for token in [raw.as_str(), forged.as_str()] {
                proptest::prop_assert!(runtime.block_on(auth.verify(token)).is_err());
            }
        }
    }
}
