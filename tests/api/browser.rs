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
pub struct Page {
    addr: SocketAddr,
    /// `http`, or `https` for a page served over TLS.
    scheme: &'static str,
    /// The host name the page is opened by (`127.0.0.1`, or `localhost` to be another site).
    host: &'static str,
    reports: mpsc::UnboundedReceiver<Value>,
}

impl Page {
    /// Serves a fixed page.
    pub async fn serve_html(html: String) -> Page {
        Self::serve_with(move || html.clone()).await
    }

    /// Serves the page; `gateway` is filled in once the gateway runs, before the page is opened.
    async fn serve(gateway: Arc<OnceLock<SocketAddr>>, token: &str) -> Page {
        let token = token.to_owned();
        let html = move |gateway: SocketAddr| {
            format!(
                r#"<!doctype html><html><body><pre id="log"></pre><script>
// Reports go one after another, so they arrive in the order the page saw things.
let reports = Promise.resolve();
const report = (what) => {{
  reports = reports.then(() => fetch('/report', {{method: 'POST', body: JSON.stringify(what)}}));
}};
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
        Self::serve_with(move || html(*gateway.get().expect("the gateway runs"))).await
    }

    /// Serves `/page.html` as `page` makes it, and collects what the page reports.
    pub async fn serve_with(page: impl Fn() -> String + Clone + Send + Sync + 'static) -> Page {
        Self::serve_with_headers(page, Vec::new).await
    }

    /// The same, answering the page with the headers `headers` makes too (a `Set-Cookie`, say).
    pub async fn serve_with_headers(
        page: impl Fn() -> String + Clone + Send + Sync + 'static,
        headers: impl Fn() -> Vec<(String, String)> + Clone + Send + Sync + 'static,
    ) -> Page {
        Self::serve_on(page, headers, None, "127.0.0.1").await
    }

    /// The same over TLS with `tls` (HTTP/2 or HTTP/1.1 by ALPN), opened as
    /// `https://{host}:port`.
    pub async fn serve_tls(
        page: impl Fn() -> String + Clone + Send + Sync + 'static,
        headers: impl Fn() -> Vec<(String, String)> + Clone + Send + Sync + 'static,
        tls: tokio_rustls::TlsAcceptor,
        host: &'static str,
    ) -> Page {
        Self::serve_on(page, headers, Some(tls), host).await
    }

    async fn serve_on(
        page: impl Fn() -> String + Clone + Send + Sync + 'static,
        headers: impl Fn() -> Vec<(String, String)> + Clone + Send + Sync + 'static,
        tls: Option<tokio_rustls::TlsAcceptor>,
        host: &'static str,
    ) -> Page {
        let (tx, reports) = mpsc::unbounded_channel();
        let router = axum::Router::new()
            .route(
                "/page.html",
                axum::routing::get(move || {
                    let page = page();
                    let mut map = axum::http::HeaderMap::new();
                    for (name, value) in &headers() {
                        map.append(
                            axum::http::HeaderName::try_from(name.as_str()).unwrap(),
                            axum::http::HeaderValue::try_from(value.as_str()).unwrap(),
                        );
                    }
                    async move { (map, axum::response::Html(page)) }
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
        let scheme = if tls.is_some() { "https" } else { "http" };
        match tls {
            None => {
                tokio::spawn(async move { axum::serve(listener, router).await });
            }
            Some(tls) => {
                tokio::spawn(async move {
                    while let Ok((tcp, _)) = listener.accept().await {
                        let (tls, router) = (tls.clone(), router.clone());
                        tokio::spawn(async move {
                            let Ok(stream) = tls.accept(tcp).await else {
                                return;
                            };
                            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            let service = hyper_util::service::TowerToHyperService::new(router);
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = if h2 {
                                hyper::server::conn::http2::Builder::new(
                                    hyper_util::rt::TokioExecutor::new(),
                                )
                                .serve_connection(io, service)
                                .await
                            } else {
                                hyper::server::conn::http1::Builder::new()
                                    .serve_connection(io, service)
                                    .await
                            };
                        });
                    }
                });
            }
        }
        Page {
            addr,
            scheme,
            host,
            reports,
        }
    }

    pub fn origin(&self) -> String {
        format!("{}://{}:{}", self.scheme, self.host, self.addr.port())
    }

    pub async fn next_report(&mut self) -> Value {
        tokio::time::timeout(PATIENCE * 2, self.reports.recv())
            .await
            .expect("the page reports in time")
            .expect("the page server runs")
    }
}

/// Headless Chromium showing one page; killed on drop. With `CHROMIUM_LOG` set in the environment
/// its stderr is shown, for finding out why a page does not report.
pub struct Chromium {
    child: Child,
    _profile: tempfile::TempDir,
    /// One browser at a time: several starting together on a busy 2-core machine once left a
    /// page without its first report for 30 s.
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// Whose turn it is to run a browser.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Chromium {
    pub fn open(url: &str) -> Chromium {
        Self::open_with(url, &[])
    }

    /// Opens `url` with these flags besides the usual ones.
    pub fn open_with(url: &str, flags: &[String]) -> Chromium {
        // A test that failed with its browser open leaves the lock poisoned, not unusable.
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
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
            .args(flags)
            .arg(url)
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("CHROMIUM_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap();
        Chromium {
            child,
            _profile: profile,
            _turn: turn,
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

/// A TCP proxy between a client and the gateway that can cut every open connection, and hold
/// new ones back until released; it keeps each request head it forwarded. With several
/// upstreams it connects to the first that accepts, as a load balancer fails over.
pub struct Proxy {
    pub addr: SocketAddr,
    heads: tokio::sync::watch::Receiver<Vec<String>>,
    open: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    /// `true` while new connections may reach the gateway.
    gate: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        Self::start_to(vec![upstream]).await
    }

    pub async fn start_to(upstreams: Vec<SocketAddr>) -> Proxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (heads_tx, heads) = tokio::sync::watch::channel(Vec::new());
        let heads_tx = Arc::new(heads_tx);
        let (gate, gate_rx) = tokio::sync::watch::channel(true);
        let open = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tracked = open.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (heads_tx, mut gate_rx) = (heads_tx.clone(), gate_rx.clone());
                let upstreams = upstreams.clone();
                let task = tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if client.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    heads_tx.send_modify(|h| h.push(String::from_utf8_lossy(&head).into_owned()));
                    if gate_rx.wait_for(|open| *open).await.is_err() {
                        return;
                    }
                    let mut server = None;
                    for upstream in upstreams.iter() {
                        if let Ok(s) = tokio::net::TcpStream::connect(upstream).await {
                            server = Some(s);
                            break;
                        }
                    }
                    let Some(mut server) = server else {
                        return;
                    };
                    if server.write_all(&head).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                tracked.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy {
            addr,
            heads,
            open,
            gate,
        }
    }

    /// Drops every connection open now.
    pub fn cut(&self) {
        for task in self.open.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    pub fn hold(&self) {
        self.gate.send_replace(false);
    }

    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    /// Waits until `n` request heads arrived; all of them.
    pub async fn heads(&mut self, n: usize) -> Vec<String> {
        tokio::time::timeout(PATIENCE * 2, self.heads.wait_for(|h| h.len() >= n))
            .await
            .expect("the browser reconnects")
            .unwrap()
            .clone()
    }
}

/// A page subscribing to `topics` on `gateway` (the proxy), reporting every event it sees.
async fn multi_topic_page(gateway: SocketAddr, query: &str) -> Page {
    let html = format!(
        r#"<!doctype html><html><body><script>
// Reports go one after another, so they arrive in the order the page saw things.
let reports = Promise.resolve();
const report = (what) => {{
  reports = reports.then(() => fetch('/report', {{method: 'POST', body: JSON.stringify(what)}}));
}};
const source = new EventSource('http://{gateway}/v1/events?{query}');
source.onopen = () => report({{kind: 'open'}});
source.onmessage = (e) => report({{kind: 'message', id: e.lastEventId, data: JSON.parse(e.data)}});
source.onerror = () => report({{kind: 'error'}});
</script></body></html>"#
    );
    Page::serve_html(html).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_reconnect_resumes_every_topic_with_the_composite_id() {
    let redis = RedisServer::start().await;
    let mut s = crate::helpers::settings(Some(&redis));
    s.cors.allowed_origins = vec!["*".into()];
    s.retry = std::time::Duration::from_millis(100);
    let app = spawn_app(s).await;
    let mut proxy = Proxy::start(app.addr).await;
    let mut page = multi_topic_page(proxy.addr, "topic=a&topic=b").await;
    let _browser = Chromium::open(&format!("{}/page.html", page.origin()));
    assert_eq!(page.next_report().await["kind"], "open");

    // Live events of both topics, each in an envelope, each with a composite id.
    let a1 = app.publish("a", "a1").await;
    let b1 = app.publish("b", "b1").await;
    // The two topics' events may come in either order.
    let mut live = [page.next_report().await, page.next_report().await];
    let last_seen = live[1]["id"].as_str().unwrap().to_owned();
    live.sort_by_key(|r| r["data"]["topic"].as_str().unwrap_or("").to_owned());
    assert_eq!(
        live[0]["data"],
        json!({"topic": "a", "id": a1, "data": "a1"})
    );
    assert_eq!(
        live[1]["data"],
        json!({"topic": "b", "id": b1, "data": "b1"})
    );
    assert!(last_seen.starts_with('m'), "{last_seen}");

    // The connection drops; the browser comes back by itself, held at the proxy while events
    // are published to both topics.
    proxy.hold();
    proxy.cut();
    assert_eq!(page.next_report().await["kind"], "error");
    let heads = proxy.heads(2).await;
    let a2 = app.publish("a", "a2").await;
    let b2 = app.publish("b", "b2").await;
    proxy.release();
    // The browser sent the composite id it last saw, and gets exactly what it missed.
    let resume = heads[1].to_ascii_lowercase();
    assert!(
        resume.contains(&format!(
            "last-event-id: {}",
            last_seen.to_ascii_lowercase()
        )),
        "{resume}"
    );
    assert_eq!(page.next_report().await["kind"], "open");
    let mut missed = [page.next_report().await, page.next_report().await];
    missed.sort_by_key(|r| r["data"]["topic"].as_str().unwrap_or("").to_owned());
    assert_eq!(
        missed[0]["data"],
        json!({"topic": "a", "id": a2, "data": "a2"})
    );
    assert_eq!(
        missed[1]["data"],
        json!({"topic": "b", "id": b2, "data": "b2"})
    );
    // And on, live: nothing repeated in between.
    let a3 = app.publish("a", "a3").await;
    assert_eq!(
        page.next_report().await["data"],
        json!({"topic": "a", "id": a3, "data": "a3"})
    );
}
