//! The Mercure hub with the clients Mercure users run: Mercure's conformance cases in headless
//! Chromium, Symfony's publisher (Debian's php-symfony-mercure) with a browser holding the
//! cookie Symfony sets, and the npm `eventsource` client resuming across a node kill.

use std::sync::{Arc, OnceLock};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::browser::{Chromium, Page, Proxy};
use crate::helpers::{spawn_app, RedisServer};
use crate::mercure::{form, keyed, publisher, query, subscriber, HUB};
use crate::process::Binary;
use crate::security::SECRET;

fn manifest_dir() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One case of Mercure's conformance suite (`conformance-tests/mercure.spec.ts` at v0.24.2).
fn case(name: &str, received: bool, topics: &[String], selectors: &[String]) -> Value {
    json!({"name": name, "mustBeReceived": received, "updateTopics": topics, "topicSelectors": selectors})
}

/// The suite's cases, with its random topic names drawn from a printed seed.
fn conformance_cases() -> Vec<Value> {
    let seed: u64 = std::env::var("MERCURE_CONFORMANCE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("conformance cases: MERCURE_CONFORMANCE_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut random = || {
        (0..20)
            .map(|_| format!("{:02x}", rng.random::<u8>()))
            .collect::<String>()
    };
    let r: Vec<String> = (0..6).map(|_| random()).collect();
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    let uri = |x: &str| format!("https://example.net/foo/{x}");
    let mut cases = vec![
        case("raw string", true, &[r[0].clone()], &[r[0].clone()]),
        case(
            "multiple topics",
            true,
            &[random(), r[1].clone()],
            &[r[1].clone()],
        ),
        case(
            "multiple topic selectors",
            true,
            &[r[2].clone()],
            &["foo".into(), r[2].clone()],
        ),
        case("URI", true, &[uri(&r[3])], &[uri(&r[3])]),
        case(
            "URI template",
            true,
            &[uri(&r[4])],
            &s(&["https://example.net/foo/{random}"]),
        ),
        case(
            "nonmatching raw string",
            false,
            &s(&["will-not-match}"]),
            &s(&["another-name"]),
        ),
        case(
            "nonmatching URI",
            false,
            &s(&["https://example.net/foo/will-not-match}"]),
            &s(&["https://example.net/foo/another-name"]),
        ),
        case(
            "nonmatching URI template",
            false,
            &s(&["https://example.net/foo/will-not-match}"]),
            &s(&["https://example.net/bar/{var}"]),
        ),
    ];
    for (name, topics, selectors) in [
        ("private raw string", vec![r[0].clone()], vec![r[0].clone()]),
        ("private URI", vec![uri(&r[3])], vec![uri(&r[3])]),
        (
            "private URI template",
            vec![uri(&r[4])],
            s(&["https://example.net/foo/{random}"]),
        ),
    ] {
        let mut c = case(name, false, &topics, &selectors);
        c["private"] = json!(true);
        cases.push(c);
    }
    cases
}

/// Mercure's conformance cases in headless Chromium: the page subscribes anonymously with an
/// `EventSource` on one node and publishes each case with `fetch` to the other, as the upstream
/// suite does. Where the suite waits two seconds for an update that must not come, the page
/// publishes a marker on a topic of its own right after it and checks what came before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mercure_conformance_cases_in_chromium() {
    let redis = RedisServer::start().await;
    let mut s = keyed(&redis);
    s.mercure.anonymous = true;
    s.cors.allowed_origins = vec!["*".into()];
    let a = spawn_app(s.clone()).await;
    let b = spawn_app(s).await;
    let cases = conformance_cases();
    let html = format!(
        r#"<!doctype html><html><body><script>
// Reports go one after another, so they arrive in the order the page saw things.
let reports = Promise.resolve();
const report = (what) => {{
  reports = reports.then(() => fetch('/report', {{method: 'POST', body: JSON.stringify(what)}}));
}};
const subscribeTo = 'http://{sub}/.well-known/mercure';
const publishTo = 'http://{publ}/.well-known/mercure';
const token = '{token}';
const post = (body) => fetch(publishTo, {{
  method: 'POST', headers: {{Authorization: 'Bearer ' + token}}, body}});
(async () => {{
  for (const [i, data] of {cases}.entries()) {{
    const marker = 'urn:conformance:marker:' + i;
    const url = new URL(subscribeTo);
    [...data.topicSelectors, marker].forEach((t) => url.searchParams.append('topic', t));
    const es = new EventSource(url);
    await new Promise((resolve) => es.onopen = resolve);
    const got = [];
    const done = new Promise((resolve) => es.onmessage = (e) => {{
      if (e.data === 'marker ' + i) resolve(); else got.push(e);
    }});
    const event = new URLSearchParams();
    data.updateTopics.forEach((t) => event.append('topic', t));
    event.set('id', `id-${{JSON.stringify(data.updateTopics)}}-${{i}}`);
    event.set('data', `data for

        ${{data.name}}`);
    if (data.private) event.set('private', 'on');
    const resp = await post(event);
    const body = await resp.text();
    const m = new URLSearchParams();
    m.append('topic', marker);
    m.set('data', 'marker ' + i);
    await post(m);
    await done;
    es.close();
    const isIt = (e) => e.type === 'message' && e.lastEventId === event.get('id')
                        && e.data === event.get('data');
    report({{
      name: data.name,
      mustBeReceived: data.mustBeReceived,
      received: got.some(isIt),
      others: got.filter((e) => !isIt(e)).length,
      status: resp.status,
      contentType: resp.headers.get('Content-Type'),
      body,
      id: event.get('id'),
    }});
  }}
  report({{kind: 'done'}});
}})();
</script></body></html>"#,
        sub = b.addr,
        publ = a.addr,
        token = publisher(),
        cases = Value::Array(cases.clone()),
    );
    let mut page = Page::serve_html(html).await;
    let _browser = Chromium::open(&format!("{}/page.html", page.origin()));
    for expected in &cases {
        let report = page.next_report().await;
        let name = &expected["name"];
        assert_eq!(&report["name"], name, "{report}");
        assert_eq!(report["received"], expected["mustBeReceived"], "{report}");
        assert_eq!(report["others"], 0, "nothing else arrived: {report}");
        assert_eq!(report["status"], 200, "{report}");
        assert!(
            report["contentType"]
                .as_str()
                .is_some_and(|t| t.starts_with("text/plain")),
            "{report}"
        );
        assert_eq!(report["body"], report["id"], "the publisher's id: {report}");
    }
    assert_eq!(page.next_report().await["kind"], "done");
}

/// Runs `tests/mercure/symfony.php`; its one line of output.
async fn symfony(args: &[&str]) -> String {
    let out = tokio::process::Command::new("php")
        .arg(manifest_dir().join("tests/mercure/symfony.php"))
        .args(args)
        .output()
        .await
        .expect("php must be installed (scripts/test.sh installs php-cli and php-symfony-mercure)");
    assert!(
        out.status.success(),
        "symfony.php {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Symfony's `Hub` publishes to one node: private and multi-topic updates with ids, types and
/// retries. An `EventSource` in Chromium, on a page whose server set the cookie Symfony's
/// `Authorization::createCookie()` makes, subscribes on the other node and receives what the
/// cookie's token allows: its user's private update (through the alternate topic) and the
/// public one, not another user's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symfony_publishes_and_a_browser_reads_with_symfonys_cookie() {
    let redis = RedisServer::start().await;
    let gateway = Arc::new(OnceLock::<std::net::SocketAddr>::new());
    // The page's server answers with Symfony's cookie, made once the hub's address is known.
    let cookie = Arc::new(OnceLock::<String>::new());
    let html = {
        let gateway = gateway.clone();
        move || {
            format!(
                r#"<!doctype html><html><body><script>
let reports = Promise.resolve();
const report = (what) => {{
  reports = reports.then(() => fetch('/report', {{method: 'POST', body: JSON.stringify(what)}}));
}};
const url = new URL('http://{hub}/.well-known/mercure');
url.searchParams.append('topic', 'https://example.com/books/{{id}}');
const source = new EventSource(url, {{withCredentials: true}});
source.onopen = () => report({{kind: 'open'}});
source.addEventListener('book', (e) =>
  report({{kind: 'book', id: e.lastEventId, data: e.data}}));
source.onmessage = (e) => report({{kind: 'message', id: e.lastEventId, data: e.data}});
source.onerror = () => report({{kind: 'error'}});
</script></body></html>"#,
                hub = gateway.get().expect("the gateway runs")
            )
        }
    };
    let page = {
        let cookie = cookie.clone();
        // The page is served after the cookie is set below.
        Page::serve_with_headers(html, move || {
            vec![(
                "set-cookie".to_owned(),
                cookie.get().expect("the cookie is made").clone(),
            )]
        })
        .await
    };
    let mut page = page;
    let mut s = keyed(&redis);
    s.cors.allowed_origins = vec![page.origin()];
    let a = spawn_app(s.clone()).await;
    let b = spawn_app(s).await;
    gateway.set(b.addr).unwrap();
    let hub_b = b.url(HUB);
    let made = symfony(&[
        "cookie",
        &hub_b,
        &format!("{}/page.html", page.origin()),
        SECRET,
        "https://example.com/users/42/{?topic}",
    ])
    .await;
    assert!(made.starts_with("mercureAuthorization="), "{made}");
    assert!(made.contains("path=/.well-known/mercure"), "{made}");
    cookie.set(made).unwrap();

    let _browser = Chromium::open(&format!("{}/page.html", page.origin()));
    assert_eq!(page.next_report().await["kind"], "open");

    let hub_a = a.url(HUB);
    let alternate = |user: u32| {
        format!("https://example.com/users/{user}/?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1")
    };
    let publish = |update: Value| {
        let hub_a = hub_a.clone();
        async move { symfony(&["publish", &hub_a, SECRET, &update.to_string()]).await }
    };
    let for_43 = publish(json!({
        "topics": ["https://example.com/books/1", alternate(43)],
        "data": "for user 43", "private": true, "id": "urn:symfony:43",
    }))
    .await;
    assert_eq!(for_43, "urn:symfony:43", "Symfony reads the id back");
    let for_42 = publish(json!({
        "topics": ["https://example.com/books/1", alternate(42)],
        "data": "for user 42", "private": true, "id": "urn:symfony:42",
        "type": "book", "retry": 2500,
    }))
    .await;
    let public = publish(json!({
        "topics": ["urn:elsewhere", "https://example.com/books/2"],
        "data": "{\"title\": \"public\"}",
    }))
    .await;
    assert!(public.starts_with("urn:uuid:"), "{public}");

    assert_eq!(
        page.next_report().await,
        json!({"kind": "book", "id": for_42, "data": "for user 42"})
    );
    assert_eq!(
        page.next_report().await,
        json!({"kind": "message", "id": public, "data": "{\"title\": \"public\"}"})
    );
}

/// The npm `eventsource` client reads through a load balancer; the node it is on is killed
/// (SIGKILL) while updates are published; it reconnects by itself to the other node with its
/// last id and gets exactly what it missed, then live updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_npm_eventsource_client_resumes_across_a_node_kill() {
    let redis = RedisServer::start().await;
    let env = [
        ("SSEGATE_AUTH__JWT_KEY", SECRET),
        ("SSEGATE_RETRY", "100ms"),
    ];
    let mut first = Binary::start(&redis, &env);
    let second = Binary::start(&redis, &env);
    let addr = |b: &Binary| b.base.trim_start_matches("http://").parse().unwrap();
    let mut proxy = Proxy::start_to(vec![addr(&first), addr(&second)]).await;
    let topic = "https://example.com/npm/{id}";
    let url = format!("http://{}{}", proxy.addr, query(&[topic], &[]));
    let (_child, mut lines) = crate::helpers::npm_eventsource(&url, &subscriber(&[]), None);
    let mut next = async || crate::helpers::next_json_line(&mut lines).await;
    assert_eq!(next().await["kind"], "open");

    // Published on the second node; the client reads them through the first.
    let http = reqwest::Client::new();
    let publish_on = async |base: &str, fields: &[(&str, &str)]| -> String {
        let response = http
            .post(format!("{base}{HUB}"))
            .bearer_auth(publisher())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(fields))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    };
    let mut seen = Vec::new();
    for i in 0..3 {
        let id = format!("urn:npm:{i}");
        let mut fields = vec![("topic", "https://example.com/npm/1"), ("data", "before")];
        if i != 1 {
            fields.push(("id", &id));
        }
        seen.push(publish_on(&second.base, &fields).await);
    }
    for id in &seen {
        let m = next().await;
        assert_eq!(
            (m["kind"].as_str(), m["id"].as_str()),
            (Some("message"), Some(id.as_str()))
        );
    }

    // The first node dies; the client's reconnection is held at the balancer while more is
    // published, so what follows can only come from history.
    proxy.hold();
    first.kill();
    assert_eq!(next().await["kind"], "error");
    let heads = proxy.heads(2).await;
    let mut missed = Vec::new();
    for i in 3..6 {
        let id = format!("urn:npm:{i}");
        missed.push(
            publish_on(
                &second.base,
                &[
                    ("topic", "https://example.com/npm/2"),
                    ("id", &id),
                    ("data", "missed"),
                ],
            )
            .await,
        );
    }
    proxy.release();
    let resume = heads[1].to_ascii_lowercase();
    assert!(
        resume.contains(&format!("last-event-id: {}", seen[2].to_ascii_lowercase())),
        "{resume}"
    );
    assert_eq!(next().await["kind"], "open");
    for id in &missed {
        let m = next().await;
        assert_eq!(
            (m["id"].as_str(), m["data"].as_str()),
            (Some(id.as_str()), Some("missed"))
        );
    }
    let live = publish_on(&second.base, &[("topic", "https://example.com/npm/3")]).await;
    let m = next().await;
    assert_eq!(
        m["id"].as_str(),
        Some(live.as_str()),
        "then live, nothing twice: {m}"
    );
}
