//! One door, tokens, CORS and limits, against real nodes on a real Redis.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use ssegate::config::Settings;
use ssegate::event::{NewEvent, Topic};

use crate::helpers::{settings, spawn_app, RedisServer, Sse, TestApp, PATIENCE};
use crate::raw::{Raw, RawResponse};

pub const SECRET: &str = "integration-test-secret-0123456789abcdef";
const APP_ORIGIN: &str = "http://app.test";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims granting `publish` and `subscribe`, expiring in `ttl` seconds (negative: expired).
pub fn grants(publish: &[&str], subscribe: &[&str], ttl: i64) -> Value {
    json!({
        "ssegate": { "publish": publish, "subscribe": subscribe },
        "exp": now().saturating_add_signed(ttl),
    })
}

fn sign(claims: &Value, alg: Algorithm, key: &EncodingKey, kid: Option<&str>) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// A token signed with [`SECRET`] (HS256).
pub fn hs(claims: &Value) -> String {
    sign(
        claims,
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        None,
    )
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap()
}

/// A token with `alg: none` and no signature, as an attacker would forge it.
fn unsigned(claims: &Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    )
}

/// Settings with an HMAC key, `public.*` open to anonymous clients and one CORS origin.
pub fn secured(redis: Option<&RedisServer>) -> Settings {
    let mut s = settings(redis);
    s.auth.jwt_key = Some(SECRET.into());
    s.auth.anonymous_subscribe = vec!["public.*".into()];
    s.cors.allowed_origins = vec![APP_ORIGIN.into()];
    s
}

fn get(target: &str, headers: &[(&str, String)]) -> String {
    let mut r = format!("GET {target} HTTP/1.1\r\nHost: gateway.test\r\n");
    for (name, value) in headers {
        r.push_str(&format!("{name}: {value}\r\n"));
    }
    r.push_str("\r\n");
    r
}

/// The response without `date`, headers sorted, the body cut after `until`.
fn comparable(mut r: RawResponse, until: Option<&str>) -> RawResponse {
    assert!(r.header("date").is_some(), "every response has a date");
    r.headers.retain(|(n, _)| n != "date");
    r.headers.sort();
    if let Some(u) = until {
        let text = r.text();
        if let Some(i) = text.find(u) {
            r.body.truncate(i + u.len());
        }
    }
    r
}

/// A subscribe case: its name, request target, headers and expected status.
type Case = (&'static str, String, Vec<(&'static str, String)>, u16);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscribe_case_is_answered_the_same_on_new_and_kept_alive_connections() {
    let redis = RedisServer::start().await;
    let app = spawn_app(secured(Some(&redis))).await;
    let first = app
        .publish_as("room", "one", &hs(&grants(&["*"], &[], 60)))
        .await;
    let last = app
        .publish_as("room", "two", &hs(&grants(&["*"], &[], 60)))
        .await;
    app.publish_as("public.news", "p", &hs(&grants(&["*"], &[], 60)))
        .await;

    let good = hs(&grants(&[], &["room"], 600));
    let bearer = format!("Bearer {good}");
    let from_zero = ("Last-Event-ID", "0".to_string());
    // The signature's first character changed (its last one carries padding bits too, and may
    // already be the replacement).
    let forged = {
        let t = hs(&grants(&[], &["room"], 600));
        let (unsigned, signature) = t.rsplit_once('.').unwrap();
        let first = if signature.starts_with('A') { 'B' } else { 'A' };
        format!("{unsigned}.{first}{}", &signature[1..])
    };
    let cases: Vec<Case> = vec![
        (
            "bearer",
            "/v1/events?topic=room".into(),
            vec![("Authorization", bearer.clone()), from_zero.clone()],
            200,
        ),
        (
            "cookie",
            "/v1/events?topic=room".into(),
            vec![
                ("Cookie", format!("theme=dark; ssegate_token={good}")),
                from_zero.clone(),
            ],
            200,
        ),
        (
            "query token",
            format!("/v1/events?topic=room&access_token={good}"),
            vec![from_zero.clone()],
            200,
        ),
        (
            "anonymous topic",
            "/v1/events?topic=public.news".into(),
            vec![from_zero.clone()],
            200,
        ),
        (
            "fragment",
            "/v1/events?topic=room#frag".into(),
            vec![("Authorization", bearer.clone()), from_zero.clone()],
            200,
        ),
        (
            "listed origin",
            "/v1/events?topic=room".into(),
            vec![
                ("Origin", APP_ORIGIN.into()),
                ("Authorization", bearer.clone()),
                from_zero.clone(),
            ],
            200,
        ),
        (
            "unlisted origin",
            "/v1/events?topic=room".into(),
            vec![
                ("Origin", "http://evil.test".into()),
                ("Authorization", bearer.clone()),
                from_zero.clone(),
            ],
            200,
        ),
        ("no token", "/v1/events?topic=room".into(), vec![], 401),
        (
            "no token, listed origin",
            "/v1/events?topic=room".into(),
            vec![("Origin", APP_ORIGIN.into())],
            401,
        ),
        (
            "forged signature",
            "/v1/events?topic=room".into(),
            vec![("Authorization", format!("Bearer {forged}"))],
            401,
        ),
        (
            "expired",
            "/v1/events?topic=room".into(),
            vec![(
                "Authorization",
                format!("Bearer {}", hs(&grants(&[], &["room"], -600))),
            )],
            401,
        ),
        (
            "basic auth",
            "/v1/events?topic=room".into(),
            vec![("Authorization", "Basic dXNlcjpwYXNz".into())],
            401,
        ),
        (
            "other topic",
            "/v1/events?topic=other".into(),
            vec![("Authorization", bearer.clone())],
            403,
        ),
        (
            "missing topic",
            "/v1/events".into(),
            vec![("Authorization", bearer.clone())],
            400,
        ),
        (
            "invalid topic",
            "/v1/events?topic=a%20b".into(),
            vec![("Authorization", bearer.clone())],
            400,
        ),
        (
            "invalid cursor",
            "/v1/events?topic=room".into(),
            vec![
                ("Authorization", bearer.clone()),
                ("Last-Event-ID", "nope".into()),
            ],
            400,
        ),
        (
            "quote in the target",
            "/v1/events?topic=ro\"om".into(),
            vec![("Authorization", bearer.clone())],
            400,
        ),
    ];
    let mut streams = 0;
    for (label, target, headers, status) in &cases {
        let request = get(target, headers);
        let public = target.contains("public.");
        let until = (*status == 200).then_some(if public {
            "data: p

"
        } else {
            "data: two

"
        });
        let before = app.server.direct_streams();
        println!("case: {label}");
        let fresh = Raw::connect(app.addr).await.request(&request, until).await;
        assert_eq!(
            app.server.direct_streams() - before,
            u64::from(*status == 200)
        );
        let kept = Raw::kept_alive(app.addr)
            .await
            .request(&request, until)
            .await;
        assert_eq!(
            app.server.direct_streams() - before,
            u64::from(*status == 200),
            "{label}: the kept-alive connection is served by hyper"
        );
        assert_eq!(fresh.status, *status, "{label}: {}", fresh.text());
        let (fresh, kept) = (comparable(fresh, until), comparable(kept, until));
        assert_eq!(fresh, kept, "{label}");
        if *status == 200 {
            streams += 1;
            let text = fresh.text();
            assert!(text.starts_with("retry: 2000\n\n"), "{label}: {text}");
            if !public {
                assert!(text.contains(&format!("id: {first}\n")), "{label}");
                assert!(text.contains(&format!("id: {last}\n")), "{label}");
            }
        }
        if *status == 401 {
            assert_eq!(fresh.json()["error"], "unauthorized", "{label}");
            assert!(fresh
                .header("www-authenticate")
                .unwrap()
                .starts_with("Bearer"));
        }
        let origin = headers.iter().find(|(n, _)| *n == "Origin");
        match origin {
            Some((_, o)) if o == APP_ORIGIN => {
                assert_eq!(
                    fresh.header("access-control-allow-origin"),
                    Some(APP_ORIGIN)
                );
                assert_eq!(
                    fresh.header("access-control-allow-credentials"),
                    Some("true")
                );
            }
            _ => assert_eq!(fresh.header("access-control-allow-origin"), None),
        }
    }
    assert_eq!(streams, 7);
}

impl TestApp {
    /// Publishes with a token; panics unless `201`.
    pub async fn publish_as(&self, topic: &str, data: &str, token: &str) -> String {
        let r = self
            .http
            .post(self.url("/v1/events"))
            .bearer_auth(token)
            .json(&json!({ "topic": topic, "data": data }))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// Sends a JSON publish with optional token; the status and JSON answer.
    pub async fn post_as(&self, token: Option<&str>, body: &Value) -> (u16, Value, Option<String>) {
        let mut req = self.http.post(self.url("/v1/events")).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let challenge = r
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, r.json().await.unwrap_or(Value::Null), challenge)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_who_publishes_and_subscribes_where() {
    let redis = RedisServer::start().await;
    let app = spawn_app(secured(Some(&redis))).await;
    let event = |topic: &str| json!({ "topic": topic, "data": "x" });
    let news = hs(&grants(&["news.*"], &["user.42"], 60));

    // No token, or a bad one: 401 naming the problem, with the Bearer challenge.
    let nbf_later = {
        let mut c = grants(&["*"], &[], 600);
        c["nbf"] = json!(now() + 300);
        hs(&c)
    };
    let wrong_key = sign(
        &grants(&["*"], &[], 60),
        Algorithm::HS256,
        &EncodingKey::from_secret(b"another-secret-another-secret-another"),
        None,
    );
    for (token, says) in [
        (None, "token is required"),
        (Some(wrong_key.as_str()), "signature"),
        (Some(&unsigned(&grants(&["*"], &[], 60))), "malformed"),
        (Some(&hs(&grants(&["*"], &[], -600))), "expired"),
        (Some(&nbf_later), "not valid yet"),
        (Some("not-a-jwt"), "malformed"),
    ] {
        let (status, body, challenge) = app.post_as(token, &event("news.a")).await;
        assert_eq!(status, 401, "{token:?}: {body}");
        assert_eq!(body["error"], "unauthorized");
        assert!(body["message"].as_str().unwrap().contains(says), "{body}");
        assert!(challenge.unwrap().starts_with("Bearer realm=\"ssegate\""));
    }

    // A good token outside its patterns: 403 naming the topic; a batch is refused whole.
    let (status, body, _) = app.post_as(Some(&news), &event("sport")).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    assert!(body["message"].as_str().unwrap().contains("`sport`"));
    let batch = json!([event("news.a"), event("news.b"), event("sport")]);
    let (status, _, _) = app.post_as(Some(&news), &batch).await;
    assert_eq!(status, 403);
    assert!(
        redis.stream_ids("news.a").await.is_empty(),
        "nothing stored"
    );

    // Within its patterns: stored.
    let (status, body, _) = app
        .post_as(Some(&news), &json!([event("news.a"), event("news.b")]))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(redis.stream_ids("news.a").await.len(), 1);

    // Subscribing: the header, the cookie and the query all carry the token.
    let sub = |query: &str| app.http.get(app.url(&format!("/v1/events?{query}")));
    let user = hs(&grants(&[], &["user.42"], 60));
    let ok = [
        sub("topic=user.42").bearer_auth(&user),
        sub("topic=user.42").header("Cookie", format!("ssegate_token={user}")),
        sub(&format!("topic=user.42&access_token={user}")),
        sub("topic=public.anything"),
    ];
    for req in ok {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = sub("topic=user.43")
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = sub("topic=user.42").send().await.unwrap();
    assert_eq!(r.status(), 401);
    // The header wins over a good cookie: a bad bearer token is not rescued.
    let r = sub("topic=user.42")
        .bearer_auth("garbage")
        .header("Cookie", format!("ssegate_token={user}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Health endpoints stay open for probes.
    let r = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_keys_accept_their_own_algorithms_only() {
    let mut s = settings(None);
    s.auth.jwt_public_key = Some(fixture("rsa_public.pem"));
    let app = spawn_app(s).await;
    let claims = grants(&["*"], &[], 60);
    let event = json!({ "topic": "t", "data": "x" });
    for alg in [Algorithm::RS256, Algorithm::PS384, Algorithm::RS512] {
        let (status, body, _) = app
            .post_as(Some(&sign(&claims, alg, &rsa_key(), None)), &event)
            .await;
        assert_eq!(status, 201, "{alg:?}: {body}");
    }
    // HS/RS confusion: the public key's own bytes used as an HMAC secret.
    let public_pem = std::fs::read(fixture("rsa_public.pem")).unwrap();
    let confused = sign(
        &claims,
        Algorithm::HS256,
        &EncodingKey::from_secret(&public_pem),
        None,
    );
    let (status, body, _) = app.post_as(Some(&confused), &event).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["message"].as_str().unwrap().contains("algorithm"));
    let (status, _, _) = app.post_as(Some(&unsigned(&claims)), &event).await;
    assert_eq!(status, 401);
    // An EC token against an RSA key.
    let ec = EncodingKey::from_ec_pem(&std::fs::read(fixture("ec_private.pem")).unwrap()).unwrap();
    let (status, _, _) = app
        .post_as(Some(&sign(&claims, Algorithm::ES256, &ec, None)), &event)
        .await;
    assert_eq!(status, 401);

    // And an EC key takes ES256.
    let mut s = settings(None);
    s.auth.jwt_public_key = Some(fixture("ec_public.pem"));
    let app = spawn_app(s).await;
    let (status, body, _) = app
        .post_as(Some(&sign(&claims, Algorithm::ES256, &ec, None)), &event)
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, _, _) = app
        .post_as(
            Some(&sign(&claims, Algorithm::RS256, &rsa_key(), None)),
            &event,
        )
        .await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_and_issuer_are_checked_when_configured() {
    let mut s = secured(None);
    s.auth.audience = Some("ssegate-test".into());
    s.auth.issuer = Some("https://issuer.test".into());
    let app = spawn_app(s).await;
    let event = json!({ "topic": "t", "data": "x" });
    let with = |aud: &str, iss: &str| {
        let mut c = grants(&["*"], &[], 60);
        c["aud"] = json!(aud);
        c["iss"] = json!(iss);
        hs(&c)
    };
    let (status, body, _) = app
        .post_as(Some(&with("ssegate-test", "https://issuer.test")), &event)
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body, _) = app
        .post_as(Some(&with("another-app", "https://issuer.test")), &event)
        .await;
    assert_eq!(status, 401);
    assert!(
        body["message"].as_str().unwrap().contains("audience"),
        "{body}"
    );
    let (status, body, _) = app
        .post_as(
            Some(&with("ssegate-test", "https://elsewhere.test")),
            &event,
        )
        .await;
    assert_eq!(status, 401);
    assert!(
        body["message"].as_str().unwrap().contains("issuer"),
        "{body}"
    );
}

/// Serves a JWKS document on loopback, counting fetches.
async fn serve_jwks(jwks: Value, fetches: Arc<AtomicUsize>) -> SocketAddr {
    let router = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            fetches.fetch_add(1, Ordering::SeqCst);
            async move { axum::Json(jwks) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_is_fetched_cached_and_refetched_at_a_bounded_rate() {
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&rsa_key(), Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let fetches = Arc::new(AtomicUsize::new(0));
    let addr = serve_jwks(json!({ "keys": [jwk] }), fetches.clone()).await;
    let mut s = settings(None);
    s.auth.jwks_url = Some(format!("http://{addr}/jwks.json"));
    let app = spawn_app(s).await;
    let claims = grants(&["*"], &[], 60);
    let event = json!({ "topic": "t", "data": "x" });

    for _ in 0..3 {
        let token = sign(&claims, Algorithm::RS256, &rsa_key(), Some("k1"));
        let (status, body, _) = app.post_as(Some(&token), &event).await;
        assert_eq!(status, 201, "{body}");
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "cached after the first");
    // The JWK says RS256: another RSA algorithm with the same key is refused.
    let ps = sign(&claims, Algorithm::PS256, &rsa_key(), Some("k1"));
    assert_eq!(app.post_as(Some(&ps), &event).await.0, 401);
    // Unknown kids: a refetch at most every 10 s, however many tokens name them.
    for kid in ["k2", "k3", "k4", "k5"] {
        let token = sign(&claims, Algorithm::RS256, &rsa_key(), Some(kid));
        let (status, body, _) = app.post_as(Some(&token), &event).await;
        assert_eq!(status, 401);
        assert!(body["message"].as_str().unwrap().contains("kid"), "{body}");
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_token_expires_and_resumes_with_a_fresh_one() {
    let redis = RedisServer::start().await;
    let mut s = secured(Some(&redis));
    s.auth.leeway = Duration::ZERO;
    let app = spawn_app(s).await;
    let publisher = hs(&grants(&["room"], &[], 600));
    let opened = Instant::now();
    let short = hs(&grants(&[], &["room"], 2));
    let response = app
        .http
        .get(app.url("/v1/events?topic=room"))
        .bearer_auth(&short)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut sse = Sse::from_response(response);
    let first = app.publish_as("room", "before", &publisher).await;
    assert_eq!(sse.expect().await.id, first);
    // The stream ends by itself at `exp` (whole seconds: between 1 and 2 s from now).
    assert!(sse.next().await.is_none(), "the stream ended");
    let lived = opened.elapsed();
    assert!(lived >= Duration::from_millis(900), "{lived:?}");
    // Meanwhile, an event.
    let missed = app.publish_as("room", "while away", &publisher).await;
    // Back with a fresh token and the last id: exactly what was missed, then live.
    let fresh = hs(&grants(&[], &["room"], 600));
    let response = app
        .http
        .get(app.url("/v1/events?topic=room"))
        .bearer_auth(&fresh)
        .header("Last-Event-ID", &first)
        .send()
        .await
        .unwrap();
    let mut sse = Sse::from_response(response);
    assert_eq!(sse.expect().await.id, missed);
    let live = app.publish_as("room", "after", &publisher).await;
    assert_eq!(sse.expect().await.id, live);
    // The expired token itself is refused now.
    let r = app
        .http
        .get(app.url("/v1/events?topic=room"))
        .bearer_auth(&short)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_refuses_new_connections_and_spares_open_streams() {
    let redis = RedisServer::start().await;
    let mut s = settings(Some(&redis));
    s.limits.max_connections = Some(3);
    let app = spawn_app(s).await;
    let topic = Topic::parse("limited").unwrap();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut raw = Raw::connect(app.addr).await;
        let r = raw
            .request(
                &get("/v1/events?topic=limited", &[]),
                Some("retry: 2000\n\n"),
            )
            .await;
        assert_eq!(r.status, 200);
        streams.push(raw);
    }
    assert_eq!(app.server.open_connections(), 3);
    for _ in 0..5 {
        let mut extra = Raw::connect(app.addr).await;
        let r = extra.request(&get("/healthz", &[]), None).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"], "too_many_connections");
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(extra.closed_within(PATIENCE).await);
    }
    assert_eq!(app.server.refused_connections(), 5);
    // The open streams still flow (published through the store: no connection is free).
    let ids = app
        .hub
        .store()
        .append(
            &topic,
            vec![NewEvent {
                event: None,
                data: "still here".into(),
                idempotency_key: None,
                labels: Vec::new(),
            }],
        )
        .await
        .unwrap();
    let marker = format!("id: {}\n", ids[0]);
    for raw in &mut streams {
        let r = raw.response_continues(&marker).await;
        assert!(r.contains("data: still here"), "{r}");
    }
    // A stream goes; a new connection fits again.
    drop(streams.pop());
    app.eventually("the closed stream is counted out", async || {
        app.server.open_connections() == 2
    })
    .await;
    let r = Raw::connect(app.addr)
        .await
        .request(&get("/metrics", &[]), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        crate::ops::sample(&r.text(), "ssegate_rejected_connections_total"),
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_are_cut_at_the_header_timeout_on_every_connection() {
    let mut s = settings(None);
    s.limits.header_timeout = Duration::from_secs(2);
    let app = spawn_app(s).await;
    let head = b"GET /v1/events?topic=slow HTTP/1.1\r\nHost: t\r\n\r\n";
    for kept in [false, true] {
        let mut raw = if kept {
            Raw::kept_alive(app.addr).await
        } else {
            Raw::connect(app.addr).await
        };
        let started = Instant::now();
        // One byte a second: the head would take 47 s.
        let mut cut = false;
        for byte in head {
            if raw.send(&[*byte]).await.is_err() || raw.closed_within(Duration::from_secs(1)).await
            {
                cut = true;
                break;
            }
        }
        let after = started.elapsed();
        assert!(cut, "kept={kept}: never cut");
        assert!(
            after >= Duration::from_millis(1900) && after < Duration::from_secs(6),
            "kept={kept}: cut after {after:?}"
        );
    }
    // An idle kept-alive connection is closed after the same bound.
    let mut idle = Raw::kept_alive(app.addr).await;
    let started = Instant::now();
    assert!(idle.closed_within(PATIENCE).await);
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(1900) && after < Duration::from_secs(6),
        "idle closed after {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431_on_every_connection() {
    let app = spawn_app(settings(None)).await;
    // The same limits on a connection's first request (read by the gateway) and on a kept-alive
    // one (read by hyper): up to 100 header lines, not one more.
    let filler =
        |n: usize| -> Vec<(&str, String)> { (0..n).map(|i| ("X-Filler", i.to_string())).collect() };
    let lines = |request: &str| request.lines().filter(|l| l.contains(": ")).count();
    let own = lines(&get("/v1/events?topic=a", &[]));
    let most = get("/v1/events?topic=a", &filler(100 - own));
    assert_eq!(lines(&most), 100);
    let opened = Some("retry: ");
    let fresh = Raw::connect(app.addr).await.request(&most, opened).await;
    let kept = Raw::kept_alive(app.addr).await.request(&most, opened).await;
    assert_eq!((fresh.status, kept.status), (200, 200));
    let over = get("/v1/events?topic=a", &filler(101 - own));
    let long = get("/v1/events?topic=a", &[("X-Long", "y".repeat(20 * 1024))]);
    for request in [over, long] {
        let fresh = Raw::connect(app.addr).await.request(&request, None).await;
        let kept = Raw::kept_alive(app.addr)
            .await
            .request(&request, None)
            .await;
        assert_eq!((fresh.status, kept.status), (431, 431));
        for r in [fresh, kept] {
            assert_eq!(r.header("content-type"), Some("application/json"));
            let json: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(json["error"], "headers_too_large");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_listed_origins_with_credentials_and_nobody_else() {
    let app = spawn_app(secured(None)).await;
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /v1/events HTTP/1.1\r\nHost: t\r\nOrigin: {origin}\r\n\
             Access-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: authorization, content-type\r\n\r\n"
        )
    };
    let r = Raw::connect(app.addr)
        .await
        .request(&preflight(APP_ORIGIN), None)
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some(APP_ORIGIN));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    let allowed = r.header("access-control-allow-headers").unwrap();
    for h in ["authorization", "content-type", "last-event-id"] {
        assert!(allowed.contains(h), "{allowed}");
    }
    assert!(r
        .header("access-control-allow-methods")
        .unwrap()
        .contains("POST"));
    let r = Raw::connect(app.addr)
        .await
        .request(&preflight("http://evil.test"), None)
        .await;
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert_eq!(r.header("access-control-allow-credentials"), None);

    // `*`: every origin, never with credentials.
    let mut s = secured(None);
    s.cors.allowed_origins = vec!["*".into()];
    let app = spawn_app(s).await;
    let r = Raw::connect(app.addr)
        .await
        .request(&preflight("http://anywhere.test"), None)
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(r.header("access-control-allow-credentials"), None);
}

/// Sends `head`, then `filler` again and again up to `total` bytes, as a client does that has not
/// seen the answer yet, while reading what the node sends until it closes. Panics unless both
/// the reading and the writing end without a reset.
async fn answer_to_a_client_that_keeps_writing(
    addr: SocketAddr,
    kept_alive: bool,
    head: Vec<u8>,
    filler: Vec<u8>,
    total: usize,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    if kept_alive {
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        let mut chunk = [0u8; 1024];
        // `/healthz` answers a small JSON object: the response ends with its closing brace.
        while !seen.ends_with(b"}") {
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(n > 0, "healthz answered");
            seen.extend_from_slice(&chunk[..n]);
        }
    }
    let (mut read, mut write) = tcp.into_split();
    // Writes everything, or fails when the node resets the connection over unread input.
    let writer = tokio::spawn(async move {
        write.write_all(&head).await?;
        let mut sent = head.len();
        while sent < total {
            write.write_all(&filler).await?;
            sent += filler.len();
        }
        // The write half stays open, as for a client waiting for its answer.
        std::io::Result::Ok(write)
    });
    let mut answer = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let read_all = async {
        loop {
            match read.read(&mut chunk).await {
                Ok(0) => return Ok(()),
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e),
            }
        }
    };
    let ended = tokio::time::timeout(PATIENCE, read_all)
        .await
        .expect("the node closes the connection");
    let text = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        ended.is_ok(),
        "the connection was reset: {ended:?}, read {text:?}"
    );
    let written = tokio::time::timeout(PATIENCE, writer)
        .await
        .expect("the node reads what follows its answer")
        .unwrap();
    assert!(
        written.is_ok(),
        "the node reset the connection: {written:?}, read {text:?}"
    );
    text
}

/// An error decided while the request is still arriving reaches the client: the node closes only
/// after its answer is written, reading what the client still sends for a while (lingering
/// close, RFC 9112 9.6), instead of resetting the connection over unread input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_answers_reach_clients_that_keep_writing() {
    let mut s = settings(None);
    s.max_event_bytes = 1024;
    s.max_batch_events = 1;
    let app = spawn_app(s).await;
    let piece = vec![b'y'; 2048];
    let cases: [(&[u8], usize, &str); 3] = [
        // A 64 KiB head (and more) in 2 KiB pieces.
        (
            b"GET /v1/events?topic=a HTTP/1.1\r\nHost: t\r\nX-Long: ",
            4 << 20,
            "431",
        ),
        // A body over the limit, sent on and on.
        (
            b"POST /v1/events?topic=a HTTP/1.1\r\nHost: t\r\nContent-Length: 8388608\r\n\r\n",
            8 << 20,
            "413",
        ),
        // A head hyper cannot parse.
        (
            b"GET /v1/events?topic=a HTTP/1.1\r\nHost: t\r\nBad Header Line\r\n",
            4 << 20,
            "400",
        ),
    ];
    for kept_alive in [false, true] {
        for (head, total, status) in cases {
            let answer = answer_to_a_client_that_keeps_writing(
                app.addr,
                kept_alive,
                head.to_vec(),
                piece.clone(),
                total,
            )
            .await;
            let line = format!("HTTP/1.1 {status}");
            assert!(answer.starts_with(&line), "{kept_alive}: {answer}");
            // A JSON error, whether the router or the HTTP parser decided.
            let (head, body) = answer.split_once("\r\n\r\n").unwrap();
            assert!(head.contains("content-type: application/json"), "{answer}");
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            let code = match status {
                "431" => "headers_too_large",
                "413" => "body_too_large",
                _ => "invalid_request",
            };
            assert_eq!(json["error"], code, "{kept_alive}: {answer}");
        }
    }
}
