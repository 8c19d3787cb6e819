//! The `ssegate` binary itself: configuration errors at start, and SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::{RedisServer, Sse, PATIENCE};

fn ssegate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ssegate"))
}

#[test]
fn bad_configuration_fails_at_start_naming_the_setting() {
    let out = ssegate()
        .args(["--listen", "127.0.0.1:0"])
        .env("SSEGATE_REPLAY_PAGE_SIZE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("replay_page_size"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ssegate.toml");
    std::fs::write(&file, "[retention]\nmax_events = \"lots\"\n").unwrap();
    let out = ssegate().arg("--config").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_events"), "{stderr}");

    let out = ssegate()
        .args(["--redis-url", "http://nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("redis_url"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_and_exits_in_bounded_time() {
    let redis = RedisServer::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = ssegate()
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--redis-url",
            &redis.url(),
        ])
        .env("SSEGATE_SHUTDOWN_TIMEOUT", "3s")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the "listening" line rather than guessing a delay.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx.recv_timeout(PATIENCE).expect("gateway starts");
        if line.contains("ssegate listening") {
            break;
        }
    }
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let response = http
        .get(format!("{base}/v1/events?topic=drain"))
        .send()
        .await
        .unwrap();
    let mut sse = Sse::from_response(response);
    let r = http
        .post(format!("{base}/v1/events?topic=drain"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(sse.expect().await.data, "x");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(sse.next().await.is_none(), "the open stream ends");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "clean exit: {status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "exits within its deadline"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
