//! The built-in page, driven in headless Chromium (Playwright, `tests/ui/drive.mjs`).

use std::process::Command;

use serde_json::Value;

use crate::helpers::{settings, spawn_app, RedisServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_subscribes_publishes_and_resumes_in_a_browser() {
    let redis = RedisServer::start().await;
    let app = spawn_app(settings(Some(&redis))).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let screenshot = dir.join("target/ui-page.png");
    let base = app.url("");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(dir.join("tests/ui/drive.mjs"))
            .arg(&base)
            .arg(&screenshot)
            .output()
            .expect("node must be installed (scripts/test.sh installs the page test's packages)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap();
    // The event missed while dropped came on resuming after the one seen before.
    let stream = redis.stream_ids("ui.demo").await;
    assert_eq!(stream.len(), 2);
    assert_eq!(seen["first"], stream[0].as_str());
    assert_eq!(seen["missed"], stream[1].as_str());
    assert_eq!(seen["last"], stream[1].as_str());
    assert_eq!(
        seen["resumedAfter"],
        format!("connected after {}", stream[0]).as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_can_be_switched_off() {
    let mut s = settings(None);
    let app = spawn_app(s.clone()).await;
    let page = app.http.get(app.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("new EventSource"));
    s.ui = false;
    let app = spawn_app(s).await;
    assert_eq!(
        app.http.get(app.url("/")).send().await.unwrap().status(),
        404
    );
}
