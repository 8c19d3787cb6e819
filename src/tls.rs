//! TLS on the listener: the certificate and key from PEM files, ALPN, and reloading.
//!
//! The certificate is held behind a lock that every handshake reads, so a reload swaps it for new
//! connections while open ones keep the session they made. Files are reloaded on `SIGHUP` and when
//! either file changes on disk (its modification time or length, read every
//! `tls.reload_interval`): cert-manager and certbot replace files without signalling anyone. A
//! file that cannot be used stops start-up with its name; on reload it is logged and the old
//! certificate stays.
//!
//! The crypto provider is ring: it builds with a C compiler alone (aws-lc-rs needs CMake, and
//! NASM on some targets), and the gateway already links it for JWKS fetches.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::shutdown::Shutdown;

/// ALPN protocols offered, preferred first.
pub const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// TLS 1.2 sessions remembered for resumption (TLS 1.3 resumes from tickets, which cost the
/// server nothing to keep). ~100 bytes each; a reconnect wave of this many clients then
/// resumes instead of signing again.
const SESSION_CACHE: usize = 16 * 1024;

/// Why a certificate or key file cannot be used; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct TlsError {
    pub path: PathBuf,
    pub problem: String,
}

/// How many reloads took and failed since start, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReloadCount {
    pub loaded: u64,
    pub failed: u64,
}

/// The node's certificate, replaceable while the listener serves.
pub struct Certificates {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    /// What handshakes use now.
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' stamps when last loaded: a change starts a reload.
    stamps: Mutex<(FileStamp, FileStamp)>,
    /// Reloads so far; tests wait on it rather than on time.
    reloads: watch::Sender<ReloadCount>,
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificates")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl Certificates {
    /// Loads both files; the error names the one that cannot be used.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Certificates>, TlsError> {
        let provider = Arc::new(ring::default_provider());
        let stamps = (FileStamp::of(cert), FileStamp::of(key));
        let loaded = certified_key(cert, key, &provider)?;
        Ok(Arc::new(Certificates {
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            provider,
            current: RwLock::new(Arc::new(loaded)),
            stamps: Mutex::new(stamps),
            reloads: watch::Sender::new(ReloadCount::default()),
        }))
    }

    /// The acceptor for the listener: ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3, and this
    /// certificate as it is at each handshake.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, TlsError> {
        let problem = |e: &dyn fmt::Display| TlsError {
            path: self.cert_path.clone(),
            problem: e.to_string(),
        };
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| problem(&e))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
        config.ticketer = ring::Ticketer::new().map_err(|e| problem(&e))?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Reloads both files now. On failure the old certificate stays, and the reason is logged.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = (
            FileStamp::of(&self.cert_path),
            FileStamp::of(&self.key_path),
        );
        match certified_key(&self.cert_path, &self.key_path, &self.provider) {
            Ok(loaded) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
                *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
                self.reloads.send_modify(|r| r.loaded += 1);
                info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                // Not retried until the files change again or another SIGHUP.
                *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
                self.reloads.send_modify(|r| r.failed += 1);
                warn!(error = %e, "TLS certificate not reloaded; keeping the one in use");
                Err(e)
            }
        }
    }

    /// Reloads counted so far.
    pub fn reloads(&self) -> watch::Receiver<ReloadCount> {
        self.reloads.subscribe()
    }

    /// Whether either file differs from what was last loaded.
    fn changed(&self) -> bool {
        let now = (
            FileStamp::of(&self.cert_path),
            FileStamp::of(&self.key_path),
        );
        *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) != now
    }

    /// Reloads on `SIGHUP` and when the files change, until shutdown.
    pub fn watch(self: Arc<Self>, interval: Duration, shutdown: Shutdown) {
        // Registered before returning, so a SIGHUP from now on reloads rather than ends the
        // process (the signal's default).
        let mut hangup = hangup();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = next_hangup(&mut hangup) => {
                        let _ = self.reload();
                    }
                    _ = tick.tick() => {
                        if self.changed() {
                            let _ = self.reload();
                        }
                    }
                }
            }
        });
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// What tells a replaced file from the one loaded: cert-manager swaps a symlink, certbot writes a
/// new file; both change the modification time or the length of what the path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp(Option<(SystemTime, u64)>);

impl FileStamp {
    fn of(path: &Path) -> FileStamp {
        FileStamp(
            std::fs::metadata(path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len()))),
        )
    }
}

/// The chain and key in the two files, checked to belong together.
fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let cert_problem = |problem: String| TlsError {
        path: cert.to_owned(),
        problem,
    };
    let key_problem = |problem: String| TlsError {
        path: key.to_owned(),
        problem,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_problem(format!("cannot read the certificate chain: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_problem(format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(cert_problem("holds no PEM CERTIFICATE block".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        key_problem(format!(
            "no usable PEM private key (PKCS#8, RSA or EC): {e}"
        ))
    })?;
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| key_problem(format!("cannot use the private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        // A key type whose public half the provider cannot show: the handshake is the check.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(e) => Err(key_problem(format!(
            "does not match the certificate in {}: {e}",
            cert.display()
        ))),
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

#[cfg(unix)]
fn hangup() -> Hangup {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP; certificates reload on file changes only");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangup() -> Hangup {}

#[cfg(unix)]
async fn next_hangup(hangup: &mut Hangup) {
    match hangup {
        Some(s) => {
            if s.recv().await.is_none() {
                *hangup = None;
            }
        }
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangup) {
    std::future::pending().await
}
