//! CORS and cookies in a real browser: headless Chromium opens an `EventSource` with credentials
//! from a page on another origin.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::helpers::{spawn_app, RedisServer, PATIENCE};
use crate::security::{grants, hs, secured};

/// A page on its own origin that subscribes to the gateway and reports what happens by posting
/// to its own server.
struct Page {
    addr: SocketAddr,
    reports: mpsc::UnboundedReceiver<Value>,
}

impl Page {
    /// Serves the page; `gateway` is filled in once the gateway runs, before the page is opened.
    async fn serve(gateway: Arc<OnceLock<SocketAddr>>, token: &str) -> Page {
        let token = token.to_owned();
        let html = move |gateway: SocketAddr| {
            format!(
                r#"<!doctype html><html><body><pre id="log"></pre><script>
const report = (what) => fetch('/report', {{method: 'POST', body: JSON.stringify(what)}});
document.cookie = 'ssegate_token={token}; path=/';
let messages = 0;
const source = new EventSource('http://{gateway}/v1/events?topic=browser&lastEventId=0',
                               {{withCredentials: true}});
source.onopen = () => report({{kind: 'open'}});
source.onmessage = (e) => {{
  messages += 1;
  document.getElementById('log').textContent += e.lastEventId + ' ' + e.data + '\n';
  report({{kind: 'message', id: e.lastEventId, data: e.data}});
}};
source.onerror = () => {{
  report({{kind: 'error', messages, readyState: source.readyState}});
  source.close();
}};
</script></body></html>"#
            )
        };
        let (tx, reports) = mpsc::unbounded_channel();
        let router = axum::Router::new()
            .route(
                "/page.html",
                axum::routing::get(move || {
                    let page = html(*gateway.get().expect("the gateway runs"));
                    async move { axum::response::Html(page) }
                }),
            )
            .route(
                "/report",
                axum::routing::post(move |body: String| {
                    let tx = tx.clone();
                    async move {
                        let _ = tx.send(serde_json::from_str(&body).unwrap_or(Value::Null));
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        Page { addr, reports }
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn next_report(&mut self) -> Value {
        tokio::time::timeout(PATIENCE * 2, self.reports.recv())
            .await
            .expect("the page reports in time")
            .expect("the page server runs")
    }
}

/// Headless Chromium showing one page; killed on drop.
struct Chromium {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Chromium {
    fn open(url: &str) -> Chromium {
        let profile = tempfile::tempdir().unwrap();
        let binary = ["chromium", "chromium-browser"]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .expect("Chromium must be installed (scripts/test.sh installs Debian's chromium)");
        let child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Chromium {
            child,
            _profile: profile,
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_origin_streams_with_its_cookie_and_an_unlisted_one_does_not() {
    let redis = RedisServer::start().await;
    // Pages first: the listed origin goes into the gateway's settings.
    let reader = hs(&grants(&[], &["browser"], 600));
    let gateway = Arc::new(OnceLock::new());
    let mut listed = Page::serve(gateway.clone(), &reader).await;
    let mut unlisted = Page::serve(gateway.clone(), &reader).await;
    let mut s = secured(Some(&redis));
    s.cors.allowed_origins = vec![listed.origin()];
    let app = spawn_app(s).await;
    gateway.set(app.addr).unwrap();
    let publisher = hs(&grants(&["browser"], &[], 600));
    let replayed = app.publish_as("browser", "replayed", &publisher).await;

    // The listed origin: the cookie goes along, the stream opens, history and live events arrive.
    let browser = Chromium::open(&format!("{}/page.html", listed.origin()));
    assert_eq!(listed.next_report().await["kind"], "open");
    let first = listed.next_report().await;
    assert_eq!(
        first,
        json!({"kind": "message", "id": replayed, "data": "replayed"})
    );
    let live = app.publish_as("browser", "live", &publisher).await;
    let second = listed.next_report().await;
    assert_eq!(
        second,
        json!({"kind": "message", "id": live, "data": "live"})
    );
    drop(browser);

    // An unlisted origin: the same request is answered, with both events in it, but the browser
    // withholds the response from the page.
    let _browser = Chromium::open(&format!("{}/page.html", unlisted.origin()));
    let report = unlisted.next_report().await;
    assert_eq!(report["kind"], "error", "{report}");
    assert_eq!(report["messages"], 0, "{report}");
}
