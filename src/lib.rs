//! ncro — the Nix Cache Route Optimizer.
//!
//! A thread-per-core HTTP/1.1 proxy in front of several Nix binary caches.
//! Each worker thread is pinned to a CPU and runs its own monoio runtime
//! (io_uring, epoll fallback), its own SO_REUSEPORT listener, its own
//! upstream connection pools and its own race engine. Shared state is either
//! lock-free to read (immutable snapshots) or sharded (the route cache).
//!
//! # Layout
//! HOT = on a worker's request path; COLD = startup, control or writer thread.
//!
//! | module | temperature | what it owns |
//! |---|---|---|
//! | [`cli`] | COLD | clap definitions only |
//! | [`config`] | COLD | raw TOML -> validated [`config::Config`], env overrides, embedded default |
//! | [`app`] | COLD | startup wiring: shared state, workers, control and writer threads, shutdown |
//! | [`worker`] | COLD/HOT | per-core threads, listeners, the accept loop and drain |
//! | [`rt`] | COLD | pinning a thread and building its monoio runtime (io_uring, epoll fallback); settling its sockets at exit, retrying a port still held at start; the wall clock |
//! | [`serve`] | HOT | per-connection HTTP/1.1 loop and the endpoints |
//! | [`http`] | HOT | request parsing, response writing, upstream client on httparse |
//! | [`proto`] | HOT | pure Nix formats: base32, store hashes, narinfo, signatures |
//! | [`upstream`] | HOT read / COLD write | upstream set (append-only slots, swapped snapshots), health snapshot and ordering, limits and cooldowns, filters |
//! | [`route`] | HOT read / COLD write | shared route cache; SQLite writer thread |
//! | [`index`] | HOT read / COLD write | upstreams' membership summaries (NixBloom, RFC 0195) and ncro's own filter |
//! | [`race`] | HOT | fan-out to upstreams, first good answer wins, single-flight |
//! | [`s3`] | HOT presign / COLD credentials | S3 upstreams: presigned requests, AWS credential chain on its own tokio thread |
//! | [`control`] | COLD | control core (its own monoio runtime): health probes, mDNS discovery, index summaries; publishes the upstream set and health snapshots |
//! | [`mesh`] | COLD | signed UDP gossip of race results between nodes (ncro 2.2 wire format), on the control core |
//! | [`metrics`] | HOT write / COLD read | per-worker counters merged at scrape time |
//! | [`systemd`] | COLD | socket activation, sd_notify, watchdog |
//! | [`signals`] | COLD | SIGTERM/SIGINT masking and waiting |
//! | [`bench`] | COLD | `ncro bench`: load generator, synthetic upstream, local demo |

pub mod app;
pub mod bench;
pub mod cli;
pub mod config;
pub mod control;
pub mod http;
pub mod index;
pub mod mesh;
pub mod metrics;
pub mod proto;
pub mod race;
pub mod route;
pub mod rt;
pub mod s3;
pub mod serve;
pub mod signals;
pub mod systemd;
pub mod upstream;
pub mod worker;
