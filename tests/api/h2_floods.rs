//! The known HTTP/2 floods against a real node: rapid reset, CONTINUATION flood, PING and SETTINGS
//! floods. Each is sent as raw frames over h2c (the same HTTP/2 server as behind TLS). The node
//! must cut the offender off, keep serving everyone else, and keep its memory bounded.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{RedisServer, PATIENCE};
use crate::process::Binary;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK block for `GET path` (static-table names, literal values without indexing).
fn get_block(path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86]; // :method GET, :scheme http
    b.push(0x04); // :path, literal value
    b.push(path.len() as u8);
    b.extend_from_slice(path.as_bytes());
    b.push(0x01); // :authority
    b.push(9);
    b.extend_from_slice(b"localhost");
    b
}

/// What the server sent on a connection until it closed it.
#[derive(Debug)]
struct Closed {
    /// The error code of its `GOAWAY`, if it sent one.
    goaway: Option<u32>,
    /// Responses it began (`HEADERS` frames).
    answers: usize,
}

async fn read_until_closed(mut read: tokio::net::tcp::OwnedReadHalf) -> Closed {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut closed = Closed {
        goaway: None,
        answers: 0,
    };
    loop {
        match read.read(&mut chunk).await {
            Ok(0) | Err(_) => return closed,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            if buf[3] == GOAWAY && len >= 8 {
                closed.goaway = Some(u32::from_be_bytes([buf[13], buf[14], buf[15], buf[16]]));
            }
            if buf[3] == HEADERS {
                closed.answers += 1;
            }
            buf.drain(..9 + len);
        }
    }
}

async fn h2c(base: &str) -> TcpStream {
    let addr = base.trim_start_matches("http://");
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut start = PREFACE.to_vec();
    start.extend(frame(SETTINGS, 0, 0, &[]));
    tcp.write_all(&start).await.unwrap();
    tcp
}

/// Whether the node answers another client now.
async fn serves(base: &str) -> bool {
    let r = tokio::time::timeout(PATIENCE, reqwest::get(format!("{base}/healthz"))).await;
    matches!(r, Ok(Ok(r)) if r.status() == 200)
}

/// `ENHANCE_YOUR_CALM`: the code a server closes a connection with for excessive load.
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// What the node's memory may grow by while one offender floods it.
const RSS_BOUND: u64 = 32 * 1024 * 1024;

fn write_timeout_1s() -> [(&'static str, &'static str); 1] {
    [("SSEGATE_WRITE_TIMEOUT", "1s")]
}

/// Writes `batch` again and again until the node refuses more (it closed the connection), at
/// most `rounds` times; returns how many were written.
async fn flood(write: &mut tokio::net::tcp::OwnedWriteHalf, batch: &[u8], rounds: usize) -> usize {
    let mut written = 0;
    let flooding = async {
        for _ in 0..rounds {
            if write.write_all(batch).await.is_err() {
                return;
            }
            written += 1;
        }
    };
    tokio::time::timeout(PATIENCE, flooding)
        .await
        .expect("the node cuts the flood off in time");
    written
}

/// Rapid reset (CVE-2023-44487): a request and its cancellation, again and again, so the server
/// starts work it is told at once to drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_cut_off() {
    let redis = RedisServer::start().await;
    let node = Binary::start(&redis, &[]);
    let rss_before = node.rss_bytes();
    let (read, mut write) = h2c(&node.base).await.into_split();
    let reader = tokio::spawn(read_until_closed(read));
    let block = get_block("/v1/events?topic=rr");
    let mut stream = 1u32;
    let mut batches = Vec::new();
    for _ in 0..100 {
        let mut batch = Vec::new();
        for _ in 0..100 {
            batch.extend(frame(HEADERS, END_STREAM | END_HEADERS, stream, &block));
            batch.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
            stream += 2;
        }
        batches.push(batch);
    }
    let mut sent = 0;
    for batch in &batches {
        if flood(&mut write, batch, 1).await == 0 {
            break;
        }
        sent += 100;
    }
    let closed = tokio::time::timeout(PATIENCE, reader)
        .await
        .expect("the node closes the connection")
        .unwrap();
    let rss_after = node.rss_bytes();
    println!("rapid reset: {sent} streams sent, {closed:?}, RSS {rss_before} -> {rss_after}");
    assert_eq!(closed.goaway, Some(ENHANCE_YOUR_CALM));
    assert!(
        closed.answers < sent / 10,
        "cut off early: {closed:?} of {sent}"
    );
    assert!(
        rss_after < rss_before + RSS_BOUND,
        "{rss_before} -> {rss_after}"
    );
    assert!(serves(&node.base).await);
}

/// CONTINUATION flood (CVE-2024-27316 and its kin): a header block that never ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_that_never_ends_is_cut_off() {
    let redis = RedisServer::start().await;
    let node = Binary::start(&redis, &[]);
    let rss_before = node.rss_bytes();
    let (read, mut write) = h2c(&node.base).await.into_split();
    let reader = tokio::spawn(read_until_closed(read));
    let mut start = frame(HEADERS, END_STREAM, 1, &get_block("/v1/events?topic=c"));
    // Literal headers with new names, 4 KiB each, without END_HEADERS, forever.
    let mut junk = vec![0x00, 0x7f, 0x00];
    junk.extend(std::iter::repeat_n(b'x', 127));
    let piece: Vec<u8> = junk.iter().copied().cycle().take(4096).collect();
    let continuation = frame(CONTINUATION, 0, 1, &piece);
    start.extend(&continuation);
    write.write_all(&start).await.unwrap();
    let batch: Vec<u8> = continuation.repeat(64);
    let rounds = flood(&mut write, &batch, 4096).await;
    let closed = tokio::time::timeout(PATIENCE, reader)
        .await
        .expect("the node closes the connection")
        .unwrap();
    let rss_after = node.rss_bytes();
    println!(
        "continuation flood: {} KiB sent, {closed:?}, RSS {rss_before} -> {rss_after}",
        rounds * 64 * 4
    );
    assert!(rounds < 4096, "cut off before the flood ended");
    assert!(closed.goaway.is_some(), "told why: {closed:?}");
    assert_eq!(closed.answers, 0);
    assert!(
        rss_after < rss_before + RSS_BOUND,
        "{rss_before} -> {rss_after}"
    );
    assert!(serves(&node.base).await);
}

/// PING and SETTINGS floods (CVE-2019-9512, CVE-2019-9515): frames the server must answer, from a
/// client that reads none of the answers. The node stops reading when its answers cannot be
/// written, and the connection is cut after `write_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_settings_floods_are_cut_off() {
    let redis = RedisServer::start().await;
    let node = Binary::start(&redis, &write_timeout_1s());
    for (name, one) in [
        ("PING", frame(PING, 0, 0, &[7; 8])),
        ("SETTINGS", frame(SETTINGS, 0, 0, &[])),
    ] {
        let rss_before = node.rss_bytes();
        let (read, mut write) = h2c(&node.base).await.into_split();
        let batch = one.repeat(4096);
        // At most ~1.4 GB: far more than the socket buffers between the two hold.
        let rounds = flood(&mut write, &batch, 20_000).await;
        let rss_after = node.rss_bytes();
        println!(
            "{name} flood: {} frames sent, RSS {rss_before} -> {rss_after}",
            rounds * 4096
        );
        assert!(rounds < 20_000, "{name}: cut off before the flood ended");
        assert!(
            rss_after < rss_before + RSS_BOUND,
            "{name}: {rss_before} -> {rss_after}"
        );
        assert!(serves(&node.base).await, "{name}");
        drop(read);
    }
}
