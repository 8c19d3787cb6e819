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

/// The real binary serving on a free loopback port, its stderr collected line by line.
/// The `ssegate` binary running as its own process on one Redis.
pub struct Binary {
    child: std::process::Child,
    pub base: String,
    /// What it logged up to the "listening" line.
    startup: Vec<String>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Binary {
    /// Starts it with `env` and waits for its "listening" line.
    pub fn start(redis: &RedisServer, env: &[(&str, &str)]) -> Binary {
        Binary::start_on(&redis.url(), env)
    }

    /// Starts it on the Redis (or Redis Cluster) at `url`.
    pub fn start_on(url: &str, env: &[(&str, &str)]) -> Binary {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = ssegate()
            .args(["--listen", &format!("127.0.0.1:{port}"), "--redis-url", url])
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut binary = Binary {
            child,
            base: format!("http://127.0.0.1:{port}"),
            startup: Vec::new(),
            lines,
        };
        loop {
            let line = binary.lines.recv_timeout(PATIENCE).expect("gateway starts");
            let listening = line.contains("ssegate listening");
            binary.startup.push(line);
            if listening {
                return binary;
            }
        }
    }

    /// The process's resident memory now.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kib * 1024
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for a clean exit within `patience`.
    async fn exits_cleanly_within(&mut self, patience: Duration) {
        let deadline = std::time::Instant::now() + patience;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "clean exit: {status}");
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "exits within its deadline"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_and_exits_in_bounded_time() {
    let redis = RedisServer::start().await;
    let mut gateway = Binary::start(
        &redis,
        &[("SSEGATE_SHUTDOWN_TIMEOUT", "3s"), ("RUST_LOG", "info")],
    );
    let base = gateway.base.clone();
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

    gateway.terminate();
    assert!(sse.next().await.is_none(), "the open stream ends");
    gateway.exits_cleanly_within(Duration::from_secs(10)).await;
}

const KEY: &str = "process-test-secret-0123456789abcdef";

#[test]
fn the_token_command_signs_with_the_configured_key() {
    let out = ssegate()
        .args([
            "token",
            "--publish",
            "news.*",
            "--subscribe",
            "*",
            "--ttl",
            "1h",
        ])
        .env("SSEGATE_AUTH__JWT_KEY", KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_aud = false;
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        token.trim(),
        &jsonwebtoken::DecodingKey::from_secret(KEY.as_bytes()),
        &validation,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["ssegate"]["publish"], serde_json::json!(["news.*"]));
    assert_eq!(claims["ssegate"]["subscribe"], serde_json::json!(["*"]));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = claims["exp"].as_u64().unwrap();
    assert!((now + 3590..=now + 3600).contains(&exp), "{exp} vs {now}");

    // The Mercure hub's claim.
    let out = ssegate()
        .args([
            "token",
            "--mercure-publish",
            "*",
            "--mercure-subscribe",
            "https://example.com/users/{id}",
        ])
        .env("SSEGATE_AUTH__JWT_KEY", KEY)
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        token.trim(),
        &jsonwebtoken::DecodingKey::from_secret(KEY.as_bytes()),
        &validation,
    )
    .unwrap()
    .claims;
    assert_eq!(
        claims["mercure"],
        serde_json::json!({"publish": ["*"], "subscribe": ["https://example.com/users/{id}"]})
    );

    let out = ssegate()
        .args(["token", "--subscribe", "*"])
        .env_remove("SSEGATE_AUTH__JWT_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.jwt_key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_the_logs() {
    let redis = RedisServer::start().await;
    let mut gateway = Binary::start(
        &redis,
        &[("SSEGATE_AUTH__JWT_KEY", KEY), ("RUST_LOG", "trace")],
    );
    let base = gateway.base.clone();
    let out = ssegate()
        .args(["token", "--publish", "*", "--subscribe", "*"])
        .env("SSEGATE_AUTH__JWT_KEY", KEY)
        .output()
        .unwrap();
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    // A bad token, distinctive enough to find.
    let bad = "eyJhbGciOiJIUzI1NiJ9.bm90LWEtcmVhbC1jbGFpbQ.c2lnbmF0dXJlLXRoYXQtZmFpbHM";
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/v1/events?topic=logs"))
        .bearer_auth(&token)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for (query, cookie, status) in [
        (format!("&access_token={token}"), None, 200),
        (String::new(), Some(format!("ssegate_token={token}")), 200),
        (format!("&access_token={bad}"), None, 401),
        (String::new(), Some(format!("ssegate_token={bad}")), 401),
    ] {
        let mut req = http.get(format!("{base}/v1/events?topic=logs&lastEventId=0{query}"));
        if let Some(c) = cookie {
            req = req.header("Cookie", c);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), status);
        if status == 200 {
            let mut sse = Sse::from_response(r);
            assert_eq!(sse.expect().await.data, "x");
        }
    }
    gateway.terminate();
    gateway.exits_cleanly_within(Duration::from_secs(10)).await;
    let log: Vec<String> = gateway.lines.try_iter().collect();
    assert!(
        log.iter().any(|l| l.contains("credentials refused")),
        "the refusals are logged (without their tokens): {log:#?}"
    );
    for line in &log {
        for secret in [&token[..], bad, KEY] {
            // Any long piece of a token would do; the signature part is the most secret one.
            let signature = secret.rsplit('.').next().unwrap();
            assert!(!line.contains(signature), "a token in the log: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variables_a_kubernetes_service_injects_do_not_stop_the_gateway() {
    let redis = RedisServer::start().await;
    let gateway = Binary::start(
        &redis,
        &[
            ("SSEGATE_PORT", "tcp://10.96.0.12:8080"),
            ("SSEGATE_SERVICE_HOST", "10.96.0.12"),
            ("SSEGATE_SERVICE_PORT", "8080"),
            ("SSEGATE_PORT_8080_TCP_ADDR", "10.96.0.12"),
            ("SSEGATE_HEARTBEAT_INTERVAL", "7s"),
            ("RUST_LOG", "info"),
        ],
    );
    let warning = gateway
        .startup
        .iter()
        .find(|l| l.contains("name no setting"))
        .unwrap_or_else(|| panic!("one warning line: {:#?}", gateway.startup));
    for name in [
        "SSEGATE_PORT",
        "SSEGATE_SERVICE_HOST",
        "SSEGATE_PORT_8080_TCP_ADDR",
    ] {
        assert!(warning.contains(name), "{warning}");
    }
    assert!(
        !warning.contains("HEARTBEAT"),
        "a real setting is not ignored: {warning}"
    );
    let r = reqwest::get(format!("{}/healthz", gateway.base))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn a_typo_in_the_config_file_stops_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ssegate.toml");
    std::fs::write(&file, "[retention]\nmax_event = 5\n").unwrap();
    let out = ssegate().arg("--config").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_event"), "{stderr}");
}

#[test]
fn the_kubernetes_config_map_holds_a_valid_configuration() {
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/configmap.yaml"),
    )
    .unwrap();
    // The block under `ssegate.toml: |`, indented four spaces.
    let toml: String = manifest
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("ssegate.toml: |"))
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(toml.contains("redis_url"), "{toml}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ssegate.toml");
    std::fs::write(&file, &toml).unwrap();
    ssegate::config::Settings::load(ssegate::config::Overrides {
        config_file: Some(file),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}\n{toml}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_and_rejections_are_logged_without_tokens() {
    let redis = RedisServer::start().await;
    let mut gateway = Binary::start(
        &redis,
        &[
            ("SSEGATE_LOG_FORMAT", "json"),
            ("SSEGATE_AUTH__JWT_KEY", KEY),
            ("RUST_LOG", "info,ssegate::rejected=debug"),
        ],
    );
    let http = reqwest::Client::new();
    let secret = "not-a-token-but-secret-enough";
    let r = http
        .get(format!(
            "{}/v1/events?topic=orders.42&access_token={secret}",
            gateway.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{}/v1/events?topic=bad%20topic", gateway.base))
        .bearer_auth(secret)
        .body("payload-that-must-not-be-logged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    gateway.terminate();
    gateway.exits_cleanly_within(Duration::from_secs(10)).await;
    let mut lines = gateway.startup.clone();
    lines.extend(gateway.lines.try_iter());
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(parsed.iter().any(|v| v["message"] == "ssegate listening"));
    let rejected: Vec<&serde_json::Value> = parsed
        .iter()
        .filter(|v| v["message"] == "request rejected")
        .collect();
    assert_eq!(rejected.len(), 2, "{lines:#?}");
    assert_eq!(rejected[0]["status"], 401);
    assert_eq!(rejected[0]["code"], "unauthorized");
    assert_eq!(rejected[0]["topic"], "orders.42");
    assert_eq!(rejected[0]["path"], "/v1/events");
    for line in &lines {
        assert!(!line.contains(secret), "a token in the log: {line}");
        assert!(
            !line.contains("payload-that"),
            "a payload in the log: {line}"
        );
    }
}

/// TLS set as the deploy files set it (`SSEGATE_TLS__CERT`, `SSEGATE_TLS__KEY`): the binary
/// serves HTTPS and HTTP/2, and the container's health check (`curl -k https://…/healthz`)
/// passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_from_the_environment_serves_https_and_h2() {
    use crate::tls::{CertFiles, TestCa};
    let redis = RedisServer::start().await;
    let ca = TestCa::new("process");
    let (cert, key) = ca.leaf();
    let files = CertFiles::new(&cert, &key);
    let (cert_path, key_path) = (files.cert(), files.dir.path().join("tls.key"));
    let gateway = Binary::start(
        &redis,
        &[
            ("SSEGATE_TLS__CERT", cert_path.to_str().unwrap()),
            ("SSEGATE_TLS__KEY", key_path.to_str().unwrap()),
        ],
    );
    let base = gateway.base.replace("http://", "https://");
    let r = ca
        .client()
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, reqwest::Version::HTTP_2)
    );
    let check = tokio::process::Command::new("curl")
        .args(["-kfsS", &format!("{base}/healthz")])
        .output()
        .await
        .unwrap();
    assert!(check.status.success(), "{check:?}");
}
