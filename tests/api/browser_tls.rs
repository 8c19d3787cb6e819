//! HTTP/2 in a real browser: headless Chromium keeps 20 `EventSource`s to one origin open over
//! HTTPS and HTTP/2, where HTTP/1.1 gives it six.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use serde_json::{json, Value};

use crate::browser::{Chromium, Page};
use crate::helpers::{settings, spawn_app, RedisServer, TestApp};
use crate::security::{grants, hs, secured};
use crate::tls::{CertFiles, TestCa};

/// A page's `report(what)`: posts `what` to the page's server, in the order the page saw things.
const REPORT: &str = "let reports = Promise.resolve();
const report = (what) => {
  reports = reports.then(() => fetch('/report', {method: 'POST', body: JSON.stringify(what)}));
};";

/// Frames (documents) of the page, each with its own `EventSource`s.
const FRAMES: usize = 4;
/// `EventSource`s per frame.
const PER_FRAME: usize = 5;
const SOURCES: usize = FRAMES * PER_FRAME;

/// The page: without `?frame=`, it holds [`FRAMES`] frames of itself; a frame opens
/// [`PER_FRAME`] `EventSource`s on topic `many` and reports what each sees. A source closes when
/// it receives `close-<its number>`.
fn page(gateway: &str) -> String {
    format!(
        r#"<!doctype html><html><body><script>
{REPORT}
const frame = new URLSearchParams(location.search).get('frame');
if (frame === null) {{
  for (let k = 0; k < {FRAMES}; k++) {{
    const f = document.createElement('iframe');
    f.src = '/page.html?frame=' + k;
    document.body.appendChild(f);
  }}
}} else {{
  for (let j = 0; j < {PER_FRAME}; j++) {{
    const n = Number(frame) * {PER_FRAME} + j;
    const source = new EventSource('{gateway}/v1/events?topic=many&lastEventId=0');
    source.onopen = () => report({{kind: 'open', n}});
    source.onmessage = (e) => {{
      report({{kind: 'message', n, id: e.lastEventId, data: e.data}});
      if (e.data === 'close-' + n) source.close();
    }};
    source.onerror = () => report({{kind: 'error', n, readyState: source.readyState}});
  }}
}}
</script></body></html>"#
    )
}

/// What the page's sources have reported so far.
#[derive(Default)]
struct Seen {
    opens: BTreeMap<u64, usize>,
    /// Each source's messages, in order: (id, data).
    messages: BTreeMap<u64, Vec<(String, String)>>,
}

impl Seen {
    fn note(&mut self, report: &Value) {
        let n = report["n"].as_u64().expect("a source's number");
        match report["kind"].as_str() {
            Some("open") => *self.opens.entry(n).or_default() += 1,
            Some("message") => self.messages.entry(n).or_default().push((
                report["id"].as_str().unwrap_or_default().to_owned(),
                report["data"].as_str().unwrap_or_default().to_owned(),
            )),
            _ => {}
        }
    }

    /// Sources whose last message has `id`.
    fn at(&self, id: &str) -> BTreeSet<u64> {
        self.messages
            .iter()
            .filter(|(_, m)| m.last().is_some_and(|(i, _)| i == id))
            .map(|(n, _)| *n)
            .collect()
    }
}

async fn until(page: &mut Page, seen: &mut Seen, done: impl Fn(&Seen) -> bool) {
    while !done(seen) {
        let report = page.next_report().await;
        seen.note(&report);
    }
}

/// The base64 SHA-256 of a certificate's public key, which Chromium's
/// `--ignore-certificate-errors-spki-list` takes to trust that certificate.
fn spki_hash(files: &CertFiles) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | openssl enc -base64",
            files.cert().display()
        ))
        .output()
        .expect("openssl runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn publish(app: &TestApp, data: &str) -> String {
    let r = app
        .http
        .post(app.url("/v1/events"))
        .json(&json!({"topic": "many", "data": data}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_event_sources_share_one_h2_connection_and_resume_after_a_restart() {
    let redis = RedisServer::start().await;
    let ca = TestCa::new("browser");
    let (cert, key) = ca.leaf();
    let files = CertFiles::new(&cert, &key);
    let gateway: Arc<OnceLock<SocketAddr>> = Arc::new(OnceLock::new());
    let g = gateway.clone();
    let mut page_server =
        Page::serve_with(move || page(&format!("https://{}", g.get().expect("the gateway runs"))))
            .await;
    let mut s = files.settings(settings(Some(&redis)));
    s.cors.allowed_origins = vec![page_server.origin()];
    s.retry = std::time::Duration::from_millis(200);
    let mut app = spawn_app(s.clone()).await;
    app.http = ca.client();
    gateway.set(app.addr).unwrap();
    let _browser = Chromium::open_with(
        &format!("{}/page.html", page_server.origin()),
        &[format!(
            "--ignore-certificate-errors-spki-list={}",
            spki_hash(&files)
        )],
    );
    let mut seen = Seen::default();
    until(&mut page_server, &mut seen, |s| s.opens.len() == SOURCES).await;
    // Every stream of the origin on one connection (or a spare), where HTTP/1.1 needs one each.
    let connections = app.server.open_connections();
    assert!(
        connections < 6,
        "{connections} connections for {SOURCES} streams"
    );
    let first = publish(&app, "first").await;
    until(&mut page_server, &mut seen, |s| {
        s.at(&first).len() == SOURCES
    })
    .await;

    // The node restarts; meanwhile an event is stored straight into Redis.
    app.shutdown.trigger();
    app.task.take().unwrap().await.unwrap().unwrap();
    let meanwhile = redis.xadd("many", "meanwhile", None).await;
    s.listen = app.addr;
    let mut app = spawn_app(s).await;
    app.http = ca.client();
    until(&mut page_server, &mut seen, |s| {
        s.at(&meanwhile).len() == SOURCES
    })
    .await;
    let live = publish(&app, "live").await;
    until(&mut page_server, &mut seen, |s| {
        s.at(&live).len() == SOURCES
    })
    .await;
    // Each source saw each event once, in order, across the restart.
    for n in 0..SOURCES as u64 {
        let ids: Vec<&str> = seen.messages[&n].iter().map(|(i, _)| i.as_str()).collect();
        assert_eq!(ids, [&first, &meanwhile, &live], "source {n}");
        assert!(seen.opens[&n] >= 2, "source {n} reopened");
    }
}

/// The limit HTTP/2 lifts: over HTTP/1.1 Chromium opens six connections to an origin, so the
/// seventh `EventSource` waits until one of the six closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_the_seventh_event_source_waits_for_one_of_six() {
    let redis = RedisServer::start().await;
    let gateway: Arc<OnceLock<SocketAddr>> = Arc::new(OnceLock::new());
    let g = gateway.clone();
    let mut page_server =
        Page::serve_with(move || page(&format!("http://{}", g.get().expect("the gateway runs"))))
            .await;
    let mut s = settings(Some(&redis));
    s.cors.allowed_origins = vec![page_server.origin()];
    let app = spawn_app(s).await;
    gateway.set(app.addr).unwrap();
    let _browser = Chromium::open(&format!("{}/page.html", page_server.origin()));
    let mut seen = Seen::default();
    until(&mut page_server, &mut seen, |s| s.opens.len() == 6).await;
    // An event through the six, after they opened: the others are still waiting.
    let first = publish(&app, "first").await;
    until(&mut page_server, &mut seen, |s| s.at(&first).len() == 6).await;
    assert_eq!(
        seen.opens.len(),
        6,
        "only six streams open: {:?}",
        seen.opens
    );
    // One of the six closes; a seventh opens on its connection.
    let closing = *seen.opens.keys().next().unwrap();
    publish(&app, &format!("close-{closing}")).await;
    until(&mut page_server, &mut seen, |s| s.opens.len() == 7).await;
}

/// The stream page of an app on another site: an `EventSource` with credentials to the gateway.
fn credentialed_page(gateway: &str) -> String {
    format!(
        r#"<!doctype html><html><body><script>
{REPORT}
let messages = 0;
const source = new EventSource('{gateway}/v1/events?topic=secure&lastEventId=0',
                               {{withCredentials: true}});
source.onopen = () => report({{kind: 'open'}});
source.onmessage = (e) => {{
  messages += 1;
  report({{kind: 'message', id: e.lastEventId, data: e.data}});
}};
source.onerror = () => {{
  report({{kind: 'error', messages}});
  source.close();
}};
</script></body></html>"#
    )
}

/// A cross-origin `EventSource` with credentials over HTTPS, as an app at
/// `https://app.example.com` uses a gateway at `https://events.example.com`: the app's answer sets
/// the token cookie `Secure; SameSite=None` for the host, the page (another origin: another
/// port) opens the stream with credentials, and the browser sends the cookie along. The same
/// cookie without `Secure` is refused by the browser, and so is the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_origin_stream_carries_a_secure_samesite_none_cookie() {
    let redis = RedisServer::start().await;
    let ca = TestCa::new("cookie");
    let (cert, key) = ca.leaf();
    let files = CertFiles::new(&cert, &key);
    let acceptor =
        ssegate::tls::Certificates::load(&files.cert(), &files.dir.path().join("tls.key"))
            .unwrap()
            .acceptor()
            .unwrap();
    let reader = hs(&grants(&[], &["secure"], 600));
    let gateway: Arc<OnceLock<SocketAddr>> = Arc::new(OnceLock::new());
    let mut pages = Vec::new();
    for (attributes, streams) in [("Secure; SameSite=None", true), ("SameSite=None", false)] {
        let g = gateway.clone();
        let cookie = format!("ssegate_token={reader}; {attributes}; Path=/");
        let page = Page::serve_tls(
            move || credentialed_page(&format!("https://{}", g.get().expect("the gateway runs"))),
            move || vec![("Set-Cookie".to_owned(), cookie.clone())],
            acceptor.clone(),
            "127.0.0.1",
        )
        .await;
        pages.push((attributes, streams, page));
    }
    let mut s = files.settings(secured(Some(&redis)));
    s.cors.allowed_origins = pages.iter().map(|(_, _, p)| p.origin()).collect();
    let mut app = spawn_app(s).await;
    app.http = ca.client();
    gateway.set(app.addr).unwrap();
    let publisher = hs(&grants(&["secure"], &[], 600));
    let stored = app.publish_as("secure", "for the cookie", &publisher).await;
    let trust = format!(
        "--ignore-certificate-errors-spki-list={}",
        spki_hash(&files)
    );
    for (attributes, streams, mut page) in pages {
        let _browser = Chromium::open_with(
            &format!("{}/page.html", page.origin()),
            std::slice::from_ref(&trust),
        );
        let first = page.next_report().await;
        if streams {
            assert_eq!(first, json!({"kind": "open"}), "{attributes}");
            assert_eq!(
                page.next_report().await,
                json!({"kind": "message", "id": stored, "data": "for the cookie"})
            );
        } else {
            assert_eq!(
                first,
                json!({"kind": "error", "messages": 0}),
                "{attributes}"
            );
        }
    }
}
