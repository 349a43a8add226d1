//! COLD: the `ncro-s3-creds` thread. It runs a current-thread tokio runtime
//! (the AWS provider chain needs one; workers and the control thread run
//! monoio) with one refresh task per S3 upstream, and publishes each
//! upstream's credentials in a [`CredentialCell`] that workers read with
//! one atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::provider_config::ProviderConfig;
use aws_config::Region;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_smithy_http_client::tls;
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use aws_smithy_runtime_api::client::identity::Identity;

use super::Presigner;

/// Credentials without an expiry (env, static profile keys) are read again
/// this often, so a rotated shared credentials file is picked up.
pub const STATIC_REFRESH: Duration = Duration::from_secs(15 * 60);
/// Expiring credentials are replaced this long before they expire, leaving
/// room for a few failed attempts.
pub const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);
/// Never ask the chain again sooner than this after a success.
pub const MIN_REFRESH: Duration = Duration::from_secs(10);
/// First retry after a failed attempt; doubles up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(5);
pub const MAX_RETRY: Duration = Duration::from_secs(5 * 60);

/// One resolved set of credentials, ready for signing.
pub struct Snapshot {
    pub(super) identity: Identity,
    /// Bumped whenever the credentials change; starts at 1.
    pub(super) generation: u64,
    credentials: Credentials,
}

impl Snapshot {
    pub fn expires(&self) -> Option<SystemTime> {
        self.credentials.expiry()
    }

    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires().is_some_and(|e| e <= now)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// An S3 upstream's current credentials. Written by the credentials thread
/// only; read by every worker when it presigns.
#[derive(Default)]
pub struct CredentialCell {
    current: ArcSwapOption<Snapshot>,
    generations: AtomicU64,
}

impl CredentialCell {
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// Publishes `creds`; returns the new generation, or `None` when they
    /// equal the current ones (a periodic re-read of unchanged keys keeps
    /// the generation, and with it the "these credentials work" mark).
    pub fn publish(&self, creds: Credentials) -> Option<u64> {
        if let Some(cur) = self.current.load().as_deref() {
            let c = &cur.credentials;
            if c.access_key_id() == creds.access_key_id()
                && c.secret_access_key() == creds.secret_access_key()
                && c.session_token() == creds.session_token()
            {
                // Same keys, maybe a later expiry: keep the generation.
                self.current.store(Some(Arc::new(Snapshot {
                    identity: creds.clone().into(),
                    generation: cur.generation,
                    credentials: creds,
                })));
                return None;
            }
        }
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        self.current.store(Some(Arc::new(Snapshot {
            identity: creds.clone().into(),
            generation,
            credentials: creds,
        })));
        Some(generation)
    }
}

/// When to ask the provider chain again after a success at `now`.
pub fn next_refresh(now: SystemTime, expiry: Option<SystemTime>) -> Duration {
    match expiry {
        None => STATIC_REFRESH,
        Some(at) => at
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
            .saturating_sub(REFRESH_BEFORE_EXPIRY)
            .clamp(MIN_REFRESH, STATIC_REFRESH),
    }
}

/// When to try again after `failures` failed attempts in a row (>= 1).
pub fn retry_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY)
}

/// The running `ncro-s3-creds` thread.
pub struct CredentialsThread {
    /// Sending (or dropping) ends the runtime and every refresh task.
    stop: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl CredentialsThread {
    /// Starts refreshing the credentials of `presigners` (none: no thread)
    /// and waits until each has had its first answer from the chain, at
    /// most `first_wait`: requests before that would fail for want of
    /// credentials. A chain that is still trying (IMDS timing out, say)
    /// keeps trying in the background.
    pub fn start(
        presigners: Vec<Arc<Presigner>>,
        first_wait: Duration,
    ) -> std::io::Result<Option<CredentialsThread>> {
        if presigners.is_empty() {
            return Ok(None);
        }
        let want = presigners.len();
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let (first_tx, first_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ncro-s3-creds".into())
            .spawn(move || run(presigners, first_tx, stop_rx))?;
        let deadline = Instant::now() + first_wait;
        let mut answered = 0;
        while answered < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match first_rx.recv_timeout(left) {
                Ok(()) => answered += 1,
                Err(_) => {
                    tracing::warn!(
                        waited_ms = first_wait.as_millis() as u64,
                        pending = want - answered,
                        "S3 credentials not resolved yet; serving anyway (S3 requests fail until they are)"
                    );
                    break;
                }
            }
        }
        Ok(Some(CredentialsThread { stop, thread }))
    }

    /// Stops the thread and waits for it, at most `grace`.
    pub fn stop(self, grace: Duration) {
        let _ = self.stop.send(()); // the runtime may already be gone
        let deadline = Instant::now() + grace;
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.thread.is_finished() {
            let _ = self.thread.join(); // a panic was already logged by the hook
        }
    }
}

fn run(
    presigners: Vec<Arc<Presigner>>,
    first: mpsc::Sender<()>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the S3 credentials runtime; S3 upstreams get no credentials");
            return;
        }
    };
    rt.block_on(async move {
        // ring, like the rest of ncro: no aws-lc in the build.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        for p in presigners {
            let provider = chain(&p, http.clone()).await;
            tokio::spawn(refresh(p, provider, first.clone()));
        }
        drop(first);
        let _ = stop.await; // a dropped sender means stop too
    });
}

/// The standard AWS chain for one upstream: environment, shared config and
/// credentials files (with `profile=`), web identity, ECS, IMDS.
async fn chain(p: &Presigner, http: SharedHttpClient) -> SharedCredentialsProvider {
    let conf = ProviderConfig::without_region().with_http_client(http);
    let mut builder = DefaultCredentialsChain::builder()
        .region(Region::new(p.region().to_owned()))
        .configure(conf);
    if let Some(profile) = p.profile() {
        builder = builder.profile_name(profile);
    }
    SharedCredentialsProvider::new(builder.build().await)
}

/// Keeps `p`'s credentials fresh until the runtime stops. Signals `first`
/// after the first attempt, whatever its outcome.
pub async fn refresh(
    p: Arc<Presigner>,
    provider: SharedCredentialsProvider,
    first: mpsc::Sender<()>,
) {
    let mut first = Some(first);
    let mut failures = 0u32;
    loop {
        let wait = match provider.provide_credentials().await {
            Ok(creds) => {
                failures = 0;
                let expiry = creds.expiry();
                if let Some(generation) = p.credentials().publish(creds) {
                    let expires = expiry.map_or_else(
                        || "never".to_owned(),
                        |at| humantime::format_rfc3339_seconds(at).to_string(),
                    );
                    tracing::info!(
                        upstream = p.url(),
                        generation,
                        expires,
                        "S3 credentials loaded"
                    );
                }
                next_refresh(SystemTime::now(), expiry)
            }
            Err(e) => {
                failures += 1;
                let retry = retry_after(failures);
                tracing::warn!(upstream = p.url(), error = %error_chain(&e), failures, retry_s = retry.as_secs(), "cannot get S3 credentials from the AWS provider chain");
                retry
            }
        };
        if let Some(tx) = first.take() {
            let _ = tx.send(()); // start() may have stopped waiting
        }
        tokio::time::sleep(wait).await;
    }
}

/// An error and its sources on one line: the chain's top-level error alone
/// ("no providers in chain provided credentials") hides why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
