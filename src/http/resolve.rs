//! Upstream name resolution that never blocks a worker.
//!
//! `getaddrinfo` is blocking and monoio has no resolver, so lookups run on
//! one dedicated std thread fed over a flume channel; workers await the reply
//! with `recv_async` (cross-thread wakes need monoio's `sync` feature, which
//! ncro enables). Answers are cached in a map shared by all workers: it is
//! only touched when a new upstream connection is opened, never per request,
//! so a plain mutex is enough. IP literals never leave the calling thread.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a failed lookup is remembered, so a dead name is not hammered.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Above this many entries, expired ones are swept on insert.
const SWEEP_ABOVE: usize = 256;

type Lookup = io::Result<Arc<[SocketAddr]>>;

struct Job {
    host: String,
    port: u16,
    /// bounded(1); the resolver thread sends exactly one answer, and a
    /// worker that stopped waiting simply drops the receiver.
    reply: flume::Sender<Lookup>,
}

#[derive(Clone)]
enum Cached {
    Addrs(Arc<[SocketAddr]>),
    /// io::Error is not Clone; keep what is needed to rebuild it.
    Failed(io::ErrorKind, Arc<str>),
}

struct Entry {
    value: Cached,
    expires: Instant,
}

struct Shared {
    /// The resolver thread exits once every clone of this sender is gone,
    /// i.e. when the last `Resolver` is dropped.
    jobs: flume::Sender<Job>,
    cache: Mutex<HashMap<(String, u16), Entry>>,
    ttl: Duration,
}

/// Cheap, shareable handle to the resolver thread and its cache.
#[derive(Clone)]
pub struct Resolver {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("ttl", &self.shared.ttl)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// Starts the resolver thread; answers are cached for `ttl`.
    ///
    /// # Panics
    /// If the OS refuses to start a thread. This runs once at startup, where
    /// that is fatal anyway.
    pub fn new(ttl: Duration) -> Resolver {
        // Detached: the thread ends by itself when the job channel closes.
        Self::start(ttl).0
    }

    fn start(ttl: Duration) -> (Resolver, std::thread::JoinHandle<()>) {
        let (jobs, rx) = flume::unbounded::<Job>();
        let thread = std::thread::Builder::new()
            .name("ncro-dns".into())
            .spawn(move || {
                for job in rx.iter() {
                    let answer = lookup(&job.host, job.port);
                    // The worker may have given up (timeout, cancelled race).
                    let _ = job.reply.send(answer);
                }
            })
            .expect("spawning the DNS resolver thread");
        let resolver = Resolver {
            shared: Arc::new(Shared {
                jobs,
                cache: Mutex::new(HashMap::new()),
                ttl,
            }),
        };
        (resolver, thread)
    }

    /// Addresses for `host:port`, in the order getaddrinfo returned them.
    /// `host` may be a DNS name, an IPv4 literal or an IPv6 literal with or
    /// without brackets.
    pub async fn resolve(&self, host: &str, port: u16) -> io::Result<Arc<[SocketAddr]>> {
        if let Some(ip) = ip_literal(host) {
            return Ok(Arc::from([SocketAddr::new(ip, port)]));
        }
        let now = Instant::now();
        if let Some(hit) = self.cached(host, port, now) {
            return hit;
        }
        let (reply, answer) = flume::bounded(1);
        let job = Job {
            host: host.to_owned(),
            port,
            reply,
        };
        self.shared
            .jobs
            .send(job)
            .map_err(|_| io::Error::other("resolver thread is gone"))?;
        let result = answer
            .recv_async()
            .await
            .map_err(|_| io::Error::other("resolver thread dropped the lookup"))?;
        self.store(host, port, &result, Instant::now());
        result
    }

    fn cached(&self, host: &str, port: u16, now: Instant) -> Option<Lookup> {
        let cache = self
            .shared
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = cache.get(&(host.to_owned(), port))?;
        if entry.expires <= now {
            return None;
        }
        Some(match &entry.value {
            Cached::Addrs(addrs) => Ok(addrs.clone()),
            Cached::Failed(kind, msg) => Err(io::Error::new(*kind, msg.to_string())),
        })
    }

    fn store(&self, host: &str, port: u16, result: &Lookup, now: Instant) {
        let (value, ttl) = match result {
            Ok(addrs) => (Cached::Addrs(addrs.clone()), self.shared.ttl),
            Err(e) => (
                Cached::Failed(e.kind(), Arc::from(e.to_string())),
                NEGATIVE_TTL.min(self.shared.ttl),
            ),
        };
        let mut cache = self
            .shared
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if cache.len() > SWEEP_ABOVE {
            cache.retain(|_, e| e.expires > now);
        }
        cache.insert(
            (host.to_owned(), port),
            Entry {
                value,
                expires: now + ttl,
            },
        );
    }
}

fn ip_literal(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

/// Runs on the resolver thread only: this is the blocking call.
fn lookup(host: &str, port: u16) -> Lookup {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} has no addresses"),
        ));
    }
    Ok(Arc::from(addrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(fut: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
            .block_on(fut)
    }

    #[test]
    fn ip_literals_short_circuit() {
        let r = Resolver::new(Duration::from_secs(60));
        block_on(async {
            let v4 = r.resolve("127.0.0.1", 80).await.expect("v4");
            assert_eq!(&v4[..], &["127.0.0.1:80".parse().expect("addr")]);
            let v6 = r.resolve("[::1]", 8443).await.expect("v6");
            assert_eq!(&v6[..], &["[::1]:8443".parse().expect("addr")]);
            let bare6 = r.resolve("::1", 1).await.expect("bare v6");
            assert_eq!(&bare6[..], &["[::1]:1".parse().expect("addr")]);
        });
        assert!(r.shared.cache.lock().expect("lock").is_empty());
    }

    #[test]
    fn names_resolve_on_the_thread_and_are_cached() {
        let r = Resolver::new(Duration::from_secs(60));
        block_on(async {
            let a = r.resolve("localhost", 8080).await.expect("localhost");
            assert!(a.iter().all(|s| s.ip().is_loopback() && s.port() == 8080));
            let b = r.resolve("localhost", 8080).await.expect("cached");
            assert!(Arc::ptr_eq(&a, &b), "second answer comes from the cache");
        });
    }

    #[test]
    fn expired_entries_are_looked_up_again() {
        let r = Resolver::new(Duration::ZERO);
        block_on(async {
            let a = r.resolve("localhost", 1).await.expect("first");
            let b = r.resolve("localhost", 1).await.expect("second");
            assert!(!Arc::ptr_eq(&a, &b));
        });
    }

    #[test]
    fn failures_are_cached_briefly() {
        let r = Resolver::new(Duration::from_secs(60));
        // std rejects an interior NUL before calling getaddrinfo, so this
        // fails on the resolver thread without any DNS traffic.
        block_on(async {
            let err = r.resolve("bad\0host", 80).await;
            assert!(err.is_err());
            let again = r
                .resolve("bad\0host", 80)
                .await
                .expect_err("cached failure");
            assert_eq!(again.kind(), io::ErrorKind::InvalidInput);
        });
        let cache = r.shared.cache.lock().expect("lock");
        let entry = cache
            .get(&("bad\0host".to_owned(), 80))
            .expect("negative entry");
        assert!(matches!(entry.value, Cached::Failed(..)));
        assert!(entry.expires <= Instant::now() + NEGATIVE_TTL);
    }

    #[test]
    fn thread_exits_when_the_last_clone_is_dropped() {
        let (r, thread) = Resolver::start(Duration::from_secs(60));
        let clone = r.clone();
        block_on(async { clone.resolve("localhost", 1).await.expect("lookup") });
        drop(r);
        assert!(!thread.is_finished(), "a clone is still alive");
        drop(clone);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(thread.is_finished());
        thread.join().expect("resolver thread ended cleanly");
    }

    #[test]
    fn resolver_is_send_sync_and_usable_from_other_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Resolver>();
        let r = Resolver::new(Duration::from_secs(60));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || block_on(r.resolve("localhost", 9)).is_ok())
            })
            .collect();
        for h in handles {
            assert!(h.join().expect("thread"));
        }
    }
}
