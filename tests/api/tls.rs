//! HTTPS and HTTP/2 on the listener: ALPN, h2c with prior knowledge, the same door on every
//! version, certificate files that cannot be used, and certificates replaced under open streams.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use reqwest::Version;
use serde_json::json;
use ssegate::config::Settings;
use ssegate::shutdown::Shutdown;
use ssegate::startup::Application;
use ssegate::tls::ReloadCount;

use crate::helpers::{
    assert_spread_retries, open_bodies, settings, spawn_app, Sse, TestApp, PATIENCE,
};
use crate::security::{grants, hs, SECRET};

/// A test certificate authority; each one signs leaf certificates for `localhost` and
/// `127.0.0.1`.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("ssegate test CA {name}"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        TestCa { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate and its PKCS#8 key, as PEM.
    pub fn leaf(&self) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A client that trusts this CA only and speaks whatever ALPN settles (h2 here).
    pub fn client(&self) -> reqwest::Client {
        self.client_builder().build().unwrap()
    }

    fn client_builder(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.pem().as_bytes()).unwrap())
            .tls_info(true)
    }
}

/// A certificate and key written where the gateway reads them.
pub struct CertFiles {
    pub dir: tempfile::TempDir,
}

impl CertFiles {
    pub fn new(cert: &str, key: &str) -> CertFiles {
        let files = CertFiles {
            dir: tempfile::tempdir().unwrap(),
        };
        files.replace(cert, key);
        files
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }

    /// Replaces both files as certbot and cert-manager do: written aside, then renamed over.
    fn replace(&self, cert: &str, key: &str) {
        for (path, text) in [(self.key(), key), (self.cert(), cert)] {
            let aside = path.with_extension("new");
            std::fs::write(&aside, text).unwrap();
            std::fs::rename(&aside, &path).unwrap();
        }
    }

    pub fn settings(&self, base: Settings) -> Settings {
        let mut s = base;
        s.tls.cert = Some(self.cert());
        s.tls.key = Some(self.key());
        s
    }
}

async fn spawn_tls(files: &CertFiles, base: Settings, ca: &TestCa) -> TestApp {
    let mut app = spawn_app(files.settings(base)).await;
    app.http = ca.client();
    app
}

/// The DER of the certificate a response's connection presented.
fn peer_certificate(response: &reqwest::Response) -> Vec<u8> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("a TLS response carries the peer's certificate")
        .to_vec()
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

async fn open_stream(http: &reqwest::Client, app: &TestApp, query: &str) -> (Version, Sse) {
    let response = http
        .get(app.url(&format!("/v1/events{query}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "subscribe failed");
    (response.version(), Sse::from_response(response))
}

#[tokio::test]
async fn https_serves_h2_and_http1_through_the_same_door() {
    let ca = TestCa::new("door");
    let (cert, key) = ca.leaf();
    let files = CertFiles::new(&cert, &key);
    let mut base = settings(None);
    base.auth.jwt_key = Some(SECRET.into());
    let app = spawn_tls(&files, base, &ca).await;
    let token = hs(&grants(&["news"], &["news"], 600));

    // ALPN settles on h2; a stream and a publish share one connection.
    let (version, mut h2_stream) = open_stream(
        &app.http,
        &app,
        &format!("?topic=news&access_token={token}"),
    )
    .await;
    assert_eq!(version, Version::HTTP_2);
    let h1 = ca.client_builder().http1_only().build().unwrap();
    let direct_before = app.server.direct_streams();
    let (version, mut h1_stream) =
        open_stream(&h1, &app, &format!("?topic=news&access_token={token}")).await;
    assert_eq!(version, Version::HTTP_11);
    // An HTTP/1.1 stream over TLS is written on the connection as over cleartext.
    assert_eq!(app.server.direct_streams(), direct_before + 1);

    let published = app
        .http
        .post(app.url("/v1/events"))
        .bearer_auth(&token)
        .json(&json!({"topic": "news", "data": "over h2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(published.version(), Version::HTTP_2);
    assert_eq!(published.status(), 201);
    let id = published.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for stream in [&mut h2_stream, &mut h1_stream] {
        let event = stream.expect().await;
        assert_eq!(
            (event.id.as_str(), event.data.as_str()),
            (id.as_str(), "over h2")
        );
    }

    // Authentication and errors are the router's on h2 as on HTTP/1.1.
    for client in [&app.http, &h1] {
        let refused = client
            .get(app.url("/v1/events?topic=news"))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 401);
        assert!(refused.headers().contains_key("www-authenticate"));
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized");
        let missing = client.get(app.url("/nowhere")).send().await.unwrap();
        assert_eq!(missing.status(), 404);
    }
    let forbidden = app
        .http
        .post(app.url("/v1/events"))
        .bearer_auth(&token)
        .json(&json!({"topic": "other", "data": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
}

#[tokio::test]
async fn cleartext_serves_h2c_with_prior_knowledge_beside_http1() {
    let app = spawn_app(settings(None)).await;
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let (version, mut stream) = open_stream(&h2c, &app, "?topic=t").await;
    assert_eq!(version, Version::HTTP_2);
    let published = h2c
        .post(app.url("/v1/events"))
        .json(&json!({"topic": "t", "data": "one"}))
        .send()
        .await
        .unwrap();
    assert_eq!(published.version(), Version::HTTP_2);
    assert_eq!(published.status(), 201);
    assert_eq!(stream.expect().await.data, "one");
    // HTTP/1.1 on the same listener, as before.
    let id = app.publish("t", "two").await;
    assert_eq!(stream.expect().await.id, id);
    let bad = h2c
        .post(app.url("/v1/events"))
        .json(&json!({"topic": "", "data": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
}

#[tokio::test]
async fn h2_streams_per_connection_are_bounded() {
    let mut s = settings(None);
    s.limits.max_streams_per_connection = 2;
    let app = spawn_app(s).await;
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let mut client = client.ready().await.unwrap();
    let request = || {
        http::Request::get(format!("http://{}/v1/events?topic=t", app.addr))
            .body(())
            .unwrap()
    };
    let (first, _) = client.send_request(request(), true).unwrap();
    // The connection is driven here until the answer, so its settings can be read after.
    let first = tokio::select! {
        r = first => r.unwrap(),
        _ = &mut connection => panic!("the connection ended"),
    };
    assert_eq!(first.status(), 200);
    // The server's SETTINGS, read before its answer, allow two streams at once.
    assert_eq!(connection.max_concurrent_send_streams(), 2);
    assert_eq!(app.server.open_connections(), 1);
}

async fn build_error(settings: Settings) -> String {
    match Application::build(settings, Shutdown::new()).await {
        Ok(_) => panic!("a gateway with unusable TLS files started"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn tls_files_that_cannot_be_used_stop_start_up_naming_the_file() {
    let ca = TestCa::new("bad");
    let (cert, key) = ca.leaf();
    let (_, other_key) = ca.leaf();

    let missing = CertFiles::new(&cert, &key);
    std::fs::remove_file(missing.cert()).unwrap();
    let message = build_error(missing.settings(settings(None))).await;
    assert!(message.contains(&path(&missing.cert())), "{message}");

    let garbage = CertFiles::new("not a certificate\n", &key);
    let message = build_error(garbage.settings(settings(None))).await;
    assert!(message.contains(&path(&garbage.cert())), "{message}");

    let no_key = CertFiles::new(&cert, &cert);
    let message = build_error(no_key.settings(settings(None))).await;
    assert!(message.contains(&path(&no_key.key())), "{message}");

    let mismatched = CertFiles::new(&cert, &other_key);
    let message = build_error(mismatched.settings(settings(None))).await;
    assert!(message.contains(&path(&mismatched.key())), "{message}");
    assert!(message.contains("does not match"), "{message}");
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// RSA (PKCS#1) and EC (SEC1) keys as `openssl` writes them, besides PKCS#8.
#[tokio::test]
async fn rsa_and_ec_keys_in_their_own_pem_forms_are_used() {
    let dir = tempfile::tempdir().unwrap();
    for (name, genkey) in [
        (
            "rsa",
            vec!["genrsa", "-traditional", "-out", "key.pem", "2048"],
        ),
        (
            "ec",
            vec![
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "key.pem",
            ],
        ),
    ] {
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl runs");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        run(&genkey);
        // A CA, and the key's certificate signed by it (a self-signed one would be a CA, which
        // clients refuse as a server's certificate).
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=test CA",
        ]);
        run(&[
            "req",
            "-new",
            "-key",
            "key.pem",
            "-subj",
            "/CN=localhost",
            "-out",
            "leaf.csr",
        ]);
        std::fs::write(dir.path().join("leaf.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        run(&[
            "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-days", "1",
            "-extfile", "leaf.ext", "-out", "cert.pem",
        ]);
        let ca = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
        let key = std::fs::read_to_string(dir.path().join("key.pem")).unwrap();
        let marker = if name == "rsa" {
            "BEGIN RSA PRIVATE KEY"
        } else {
            "BEGIN EC PRIVATE KEY"
        };
        assert!(key.contains(marker), "{name}: {key}");
        let cert = std::fs::read_to_string(dir.path().join("cert.pem")).unwrap();
        let files = CertFiles::new(&cert, &key);
        let mut app = spawn_app(files.settings(settings(None))).await;
        app.http = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
            .build()
            .unwrap();
        let health = app.http.get(app.url("/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200, "{name}");
    }
}

/// Waits until the gateway has counted `until` reloads.
async fn reloads(app: &TestApp, until: impl Fn(&ReloadCount) -> bool) -> ReloadCount {
    let mut watch = app.certificates.as_ref().expect("TLS is on").reloads();
    let seen = tokio::time::timeout(PATIENCE, watch.wait_for(|r| until(r)))
        .await
        .expect("the reload happens")
        .expect("the gateway runs");
    *seen
}

#[tokio::test]
async fn sighup_brings_a_new_certificate_to_new_connections_and_open_streams_go_on() {
    let (ca1, ca2) = (TestCa::new("one"), TestCa::new("two"));
    let (cert1, key1) = ca1.leaf();
    let files = CertFiles::new(&cert1, &key1);
    let mut s = settings(None);
    // Only the signal reloads here.
    s.tls.reload_interval = std::time::Duration::from_secs(3600);
    let app = spawn_tls(&files, s, &ca1).await;
    let (_, mut h2_stream) = open_stream(&app.http, &app, "?topic=r").await;
    let h1 = ca1.client_builder().http1_only().build().unwrap();
    let (_, mut h1_stream) = open_stream(&h1, &app, "?topic=r").await;

    let (cert2, key2) = ca2.leaf();
    files.replace(&cert2, &key2);
    let before = *app.certificates.as_ref().unwrap().reloads().borrow();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    reloads(&app, |r| r.loaded > before.loaded).await;

    // A new connection gets the new certificate, which a client of the old CA refuses.
    let fresh = ca2.client();
    let answered = fresh.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(peer_certificate(&answered), der_of(&cert2));
    assert!(ca1.client().get(app.url("/healthz")).send().await.is_err());

    // The streams opened before go on, over their own sessions.
    let published = fresh
        .post(app.url("/v1/events"))
        .json(&json!({"topic": "r", "data": "after"}))
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), 201);
    assert_eq!(h2_stream.expect().await.data, "after");
    assert_eq!(h1_stream.expect().await.data, "after");
}

#[tokio::test]
async fn replaced_files_are_picked_up_and_a_bad_replacement_keeps_the_old_certificate() {
    let (ca1, ca2) = (TestCa::new("files-one"), TestCa::new("files-two"));
    let (cert1, key1) = ca1.leaf();
    let files = CertFiles::new(&cert1, &key1);
    let mut s = settings(None);
    s.tls.reload_interval = std::time::Duration::from_millis(20);
    let app = spawn_tls(&files, s, &ca1).await;
    let answered = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(peer_certificate(&answered), der_of(&cert1));

    // A key that does not match: counted as failed, the old certificate stays.
    let (_, stray_key) = ca1.leaf();
    let before = *app.certificates.as_ref().unwrap().reloads().borrow();
    files.replace(&cert1, &stray_key);
    reloads(&app, |r| r.failed > before.failed).await;
    let answered = ca1.client().get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(peer_certificate(&answered), der_of(&cert1));

    let (cert2, key2) = ca2.leaf();
    let before = *app.certificates.as_ref().unwrap().reloads().borrow();
    files.replace(&cert2, &key2);
    reloads(&app, |r| r.loaded > before.loaded).await;
    let answered = ca2.client().get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(peer_certificate(&answered), der_of(&cert2));
}

#[tokio::test]
async fn over_the_connection_limit_tls_clients_read_the_503() {
    let ca = TestCa::new("limit");
    let (cert, key) = ca.leaf();
    let files = CertFiles::new(&cert, &key);
    let mut s = settings(None);
    s.limits.max_connections = Some(1);
    let app = spawn_tls(&files, s, &ca).await;
    let (_, _held) = open_stream(&app.http, &app, "?topic=l").await;
    for client in [
        ca.client(),
        ca.client_builder().http1_only().build().unwrap(),
    ] {
        let refused = client.get(app.url("/healthz")).send().await.unwrap();
        assert_eq!(refused.status(), 503);
        assert_eq!(refused.headers()["retry-after"], "1");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["error"], "too_many_connections");
    }
}

/// curl, an independent HTTP/2 client: `--http2` over TLS and `--http2-prior-knowledge` on
/// cleartext, each reading an event from a stream.
#[tokio::test]
async fn curl_streams_events_over_h2_and_h2c() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let ca = TestCa::new("curl");
    let (cert, key) = ca.leaf();
    let files = CertFiles::new(&cert, &key);
    let ca_file = files.dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let tls = spawn_tls(&files, settings(None), &ca).await;
    let plain = spawn_app(settings(None)).await;
    for (app, flags) in [
        (
            &tls,
            vec!["--http2".to_owned(), "--cacert".to_owned(), path(&ca_file)],
        ),
        (&plain, vec!["--http2-prior-knowledge".to_owned()]),
    ] {
        let version = tokio::process::Command::new("curl")
            .args(&flags)
            .args(["-s", "-o", "/dev/null", "-w", "%{http_version}"])
            .arg(app.url("/healthz"))
            .output()
            .await
            .expect("curl runs");
        assert_eq!(String::from_utf8_lossy(&version.stdout), "2", "{flags:?}");

        let mut curl = tokio::process::Command::new("curl")
            .args(&flags)
            .args(["-s", "-N"])
            .arg(app.url("/v1/events?topic=curl"))
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("curl runs");
        let mut lines = BufReader::new(curl.stdout.take().unwrap()).lines();
        // The stream is open once its first line (`retry:`) arrives.
        let first = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .unwrap();
        assert!(first.unwrap().is_some());
        let published = app
            .http
            .post(app.url("/v1/events"))
            .json(&json!({"topic": "curl", "data": "to curl"}))
            .send()
            .await
            .unwrap();
        assert_eq!(published.status(), 201);
        let seen = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line == "data: to curl" {
                    return true;
                }
            }
            false
        })
        .await
        .expect("the event reaches curl");
        assert!(seen, "{flags:?}");
    }
}

/// Shutdown over HTTP/2: every stream of the connection gets the spread `retry:` and ends, and
/// the connection is closed with `GOAWAY`, so the node stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_every_h2_stream_with_a_spread_retry() {
    let ca = TestCa::new("shutdown");
    let (cert, key) = ca.leaf();
    let files = CertFiles::new(&cert, &key);
    let mut s = settings(None);
    s.retry = std::time::Duration::from_secs(1);
    s.shutdown_retry_spread = std::time::Duration::from_secs(3);
    let mut app = spawn_tls(&files, s, &ca).await;
    let bodies = open_bodies(&app, "drain", 5, reqwest::Version::HTTP_2, 1000).await;
    assert_eq!(app.server.open_connections(), 1);
    app.shutdown.trigger();
    assert_spread_retries(bodies, 1000..=4000).await;
    // The node finishes well before shutdown_timeout: the connection closed after GOAWAY.
    let task = app.task.take().unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(3), task)
        .await
        .expect("the node stops")
        .unwrap()
        .unwrap();
}

/// The npm `eventsource` client (Node's fetch) over HTTPS, trusting the test CA as Node does
/// (`NODE_EXTRA_CA_CERTS`): it streams, and after the node restarts it resumes from its last id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_npm_eventsource_client_streams_and_resumes_over_https() {
    let redis = crate::helpers::RedisServer::start().await;
    let ca = TestCa::new("npm");
    let (cert, key) = ca.leaf();
    let files = CertFiles::new(&cert, &key);
    let ca_file = files.dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let mut s = settings(Some(&redis));
    s.auth.jwt_key = Some(SECRET.into());
    s.retry = std::time::Duration::from_millis(200);
    let s = files.settings(s);
    let mut app = spawn_tls(&files, s.clone(), &ca).await;
    let reader = hs(&grants(&[], &["npm"], 600));
    let publisher = hs(&grants(&["npm"], &[], 600));
    let (_child, mut lines) =
        crate::helpers::npm_eventsource(&app.url("/v1/events?topic=npm"), &reader, Some(&ca_file));
    let mut next = async || crate::helpers::next_json_line(&mut lines).await;
    assert_eq!(next().await["kind"], "open");
    let publish = async |app: &TestApp, data: &str| -> String {
        let r = app
            .http
            .post(app.url("/v1/events"))
            .bearer_auth(&publisher)
            .json(&json!({"topic": "npm", "data": data}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<serde_json::Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let first = publish(&app, "first").await;
    assert_eq!(
        next().await,
        json!({"kind": "message", "id": first, "data": "first"})
    );

    // The node restarts; meanwhile an event is stored straight into Redis.
    app.shutdown.trigger();
    app.task.take().unwrap().await.unwrap().unwrap();
    let meanwhile = redis.xadd("npm", "meanwhile", None).await;
    let mut s = s;
    s.listen = app.addr;
    let app = spawn_tls(&files, s, &ca).await;
    // Messages only: the client also reports the error and the reopening.
    let mut next_message = async || loop {
        let m = next().await;
        if m["kind"] == "message" {
            break m;
        }
    };
    assert_eq!(
        next_message().await,
        json!({"kind": "message", "id": meanwhile, "data": "meanwhile"})
    );
    let live = publish(&app, "live").await;
    let m = next_message().await;
    assert_eq!(m, json!({"kind": "message", "id": live, "data": "live"}));
}

/// An h2c client of `app` whose streams have a 16 KiB window, which they give back only when
/// the test says so.
async fn small_window_h2(app: &TestApp) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(16 * 1024)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    client.ready().await.unwrap()
}

/// Opens an event stream of `topic` on `client`.
fn open_h2_stream(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    app: &TestApp,
    topic: &str,
) -> h2::client::ResponseFuture {
    let request = http::Request::get(format!("http://{}/v1/events?topic={topic}", app.addr))
        .body(())
        .unwrap();
    client.send_request(request, true).unwrap().0
}

/// A stream whose HTTP/2 window stays full (its client reads nothing of it) holds up no other
/// stream of the connection: each stream has its own flow control, and the server writes the
/// others on.
#[tokio::test]
async fn a_stream_with_a_full_window_does_not_stall_its_connection() {
    let app = spawn_app(settings(None)).await;
    let mut client = small_window_h2(&app).await;
    let mut open = |topic: &str| open_h2_stream(&mut client, &app, topic);
    let (stuck, flowing) = (open("stuck"), open("flowing"));
    let (stuck, flowing) = (stuck.await.unwrap(), flowing.await.unwrap());
    assert_eq!(
        (stuck.status().as_u16(), flowing.status().as_u16()),
        (200, 200)
    );
    // `stuck` is never read, so its 16 KiB window fills and stays full.
    let _stuck = stuck.into_body();
    let big = "x".repeat(8 * 1024);
    for _ in 0..8 {
        app.publish("stuck", &big).await;
    }
    let mut body = flowing.into_body();
    let mut seen = Vec::new();
    for i in 0..20 {
        let id = app.publish("flowing", &format!("n{i}")).await;
        while !String::from_utf8_lossy(&seen).contains(&format!("id: {id}\n")) {
            let chunk = tokio::time::timeout(PATIENCE, body.data())
                .await
                .expect("the other stream keeps flowing")
                .expect("the stream is open")
                .unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            seen.extend_from_slice(&chunk);
        }
    }
}

/// A stream whose HTTP/2 window stays full for `write_timeout` is reset, as a stalled HTTP/1.1
/// connection is closed, and counted; the connection and its other streams, one reading and one
/// idle, go on.
#[tokio::test]
async fn a_stream_with_a_full_window_is_cut_after_write_timeout() {
    let mut s = settings(None);
    s.write_timeout = Duration::from_millis(500);
    let app = spawn_app(s).await;
    let mut client = small_window_h2(&app).await;
    let mut open = |topic: &str| open_h2_stream(&mut client, &app, topic);
    let (stuck, flowing, idle) = (open("stuck"), open("flowing"), open("idle"));
    let mut stuck = stuck.await.unwrap().into_body();
    let mut flowing = flowing.await.unwrap().into_body();
    let mut idle = idle.await.unwrap().into_body();
    // Before anything is waiting: the cut must come at least write_timeout after this.
    let started = std::time::Instant::now();
    let big = "x".repeat(8 * 1024);
    for _ in 0..4 {
        app.publish("stuck", &big).await;
    }
    // `stuck`'s chunks are read off the connection but their window is never given back, so
    // the server sees a client that stopped reading this stream. The others are read, and
    // `flowing` gets an event at every turn, for longer than write_timeout.
    async fn read_until(body: &mut h2::RecvStream, seen: &mut Vec<u8>, want: &str) {
        while !String::from_utf8_lossy(seen).contains(want) {
            let chunk = tokio::time::timeout(PATIENCE, body.data())
                .await
                .expect("the stream keeps flowing")
                .expect("the stream is open")
                .expect("the stream was not reset");
            let _ = body.flow_control().release_capacity(chunk.len());
            seen.extend_from_slice(&chunk);
        }
    }
    let (mut seen_flowing, mut seen_idle) = (Vec::new(), Vec::new());
    let reset = loop {
        let id = app.publish("flowing", "on").await;
        read_until(&mut flowing, &mut seen_flowing, &format!("id: {id}\n")).await;
        match tokio::time::timeout(Duration::from_millis(50), stuck.data()).await {
            Ok(Some(Err(e))) => break e,
            Ok(None) => panic!("the stuck stream ended instead of being reset"),
            Ok(Some(Ok(_))) | Err(_) => {}
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the stuck stream was never cut"
        );
    };
    assert_eq!(reset.reason(), Some(h2::Reason::CANCEL));
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "cut before write_timeout: {:?}",
        started.elapsed()
    );
    // The others go on, the idle one included, and the cut is counted.
    let id = app.publish("idle", "still here").await;
    read_until(&mut idle, &mut seen_idle, &format!("id: {id}\n")).await;
    let id = app.publish("flowing", "after").await;
    read_until(&mut flowing, &mut seen_flowing, &format!("id: {id}\n")).await;
    let metrics = crate::ops::scrape(&app.url("/metrics")).await;
    assert_eq!(
        crate::ops::sample(&metrics, "ssegate_slow_client_disconnects_total"),
        1.0
    );
}
