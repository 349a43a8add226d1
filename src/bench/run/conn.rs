//! One client thread and its connections' request loops.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::herd::Herd;
use super::{Clock, Live, Plan, Workload};
use crate::bench::args::Scenario;
use crate::bench::report::{ErrorKind, Stats};
use crate::bench::rng::{mix, Rng};
use crate::bench::wire::{ClientConn, WireError};
use crate::proto::store_path::HASH_LEN;
use crate::rt::Warning;

/// Read buffer per connection: NAR bodies stream through a larger one.
const SMALL_BUF: usize = 16 * 1024;
const LARGE_BUF: usize = 256 * 1024;

/// Builds the runtime, reports ready, waits for the shared clock, runs this
/// thread's connections (every `threads`-th, starting at `t`) to the end.
pub(super) fn client_thread(
    t: usize,
    plan: Arc<Plan>,
    ready: Sender<Result<(), String>>,
    clock: Receiver<Clock>,
    live: Arc<Live>,
) -> Result<Stats, String> {
    let rt = crate::rt::build_pinned(plan.cpus.get(t).copied(), |w| match w {
        Warning::Unpinned { cpu, error } => {
            eprintln!("bench client thread {t}: cannot pin to CPU {cpu}: {error:?}");
        }
        Warning::Epoll(e) => {
            eprintln!("bench client thread {t}: cannot set up io_uring, using epoll: {e}")
        }
    });
    let mut rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            let msg = format!("client thread {t}: cannot build runtime: {e}");
            // The receiver only goes away when the run is already failing.
            let _ = ready.send(Err(msg.clone()));
            return Err(msg);
        }
    };
    let _ = ready.send(Ok(()));
    drop(ready);
    let clock = clock
        .recv()
        .map_err(|_| format!("client thread {t}: run aborted before it started"))?;
    let per_thread = |n: u64| {
        let (q, r) = (n / plan.threads as u64, n % plan.threads as u64);
        q + u64::from((t as u64) < r)
    };
    let shared = Rc::new(ThreadShared {
        tickets: Cell::new(match plan.limit {
            super::Limit::Requests(n) => Some(per_thread(n)),
            super::Limit::Duration(_) => None,
        }),
        rng: RefCell::new(Rng::new(mix(plan.seed ^ mix(t as u64 + 1) ^ nanos()))),
        stats: RefCell::new(Stats::default()),
        plan,
        clock,
        live,
    });
    let stats = rt.block_on(async move {
        let mut tasks = Vec::new();
        for c in (t..shared.plan.connections).step_by(shared.plan.threads) {
            tasks.push(monoio::spawn(connection(shared.clone(), c)));
        }
        for task in tasks {
            task.await;
        }
        shared.stats.take()
    });
    Ok(stats)
}

/// Sub-second clock bits, so that two runs draw different miss hashes.
fn nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()))
}

/// What one thread's connections share (never crosses threads).
struct ThreadShared {
    plan: Arc<Plan>,
    clock: Clock,
    /// Measured requests this thread may still send (request-count runs).
    tickets: Cell<Option<u64>>,
    rng: RefCell<Rng>,
    stats: RefCell<Stats>,
    live: Arc<Live>,
}

impl ThreadShared {
    fn take_ticket(&self) -> bool {
        match self.tickets.get() {
            None => true,
            Some(0) => false,
            Some(n) => {
                self.tickets.set(Some(n - 1));
                true
            }
        }
    }

    fn past_end(&self, t: Instant) -> bool {
        self.clock.end.is_some_and(|end| t >= end)
    }
}

/// One connection's loop: wait for the next send time (open loop), send,
/// record, until the run's end or its request budget.
async fn connection(sh: Rc<ThreadShared>, index: usize) {
    let plan = &sh.plan;
    if let Some(herd) = &plan.herd {
        return herd_connection(&sh, herd).await;
    }
    let large = matches!(plan.scenario, Scenario::Nar | Scenario::Closure);
    let mut conn = ClientConn::new(&plan.target, if large { LARGE_BUF } else { SMALL_BUF });
    let mut step = Step::new(plan, index);
    // Open loop: this connection's share of the rate, its first send
    // staggered so connections do not fire together.
    let interval = plan
        .rate
        .map(|r| Duration::from_secs_f64(plan.connections as f64 / r));
    let mut next = sh.clock.start
        + interval.map_or(Duration::ZERO, |iv| {
            iv.mul_f64(index as f64 / plan.connections as f64)
        });
    loop {
        // `slot`: where this request sits in the run (decides warm-up and
        // the end); `start`: what its latency is counted from.
        let (slot, start) = match interval {
            Some(iv) => {
                let intended = next;
                next += iv;
                if sh.past_end(intended) || sh.tickets.get() == Some(0) {
                    break;
                }
                wait_until(intended).await;
                // Sent late (server behind): count from the intended time.
                // Sent early (timer granularity): count from the real send.
                (intended, intended.min(Instant::now()))
            }
            None => {
                let now = Instant::now();
                if sh.past_end(now) {
                    break;
                }
                // Connections start as soon as their thread has the clock,
                // up to 2 ms before `start`: such a request belongs to the
                // run (with --once it uses up a list entry), not to a warm-up.
                (now.max(sh.clock.start), now)
            }
        };
        let measured = slot >= sh.clock.warm_end;
        if measured && !sh.take_ticket() {
            break;
        }
        if !step.run(&sh, &mut conn, start, measured).await {
            break;
        }
    }
}

/// A narinfo-herd connection: one request per round, every round.
async fn herd_connection(sh: &ThreadShared, herd: &Herd) {
    let Workload::Hashes(hashes) = &sh.plan.workload else {
        return;
    };
    let mut conn = ClientConn::new(&sh.plan.target, SMALL_BUF);
    let mut rx = herd.subscribe();
    for k in 0u64.. {
        if !Herd::wait(&mut rx, k).await {
            break;
        }
        let hash = hashes[k as usize % hashes.len()].as_bytes();
        let parts: [&[u8]; 3] = [b"/", hash, b".narinfo"];
        request(sh, &mut conn, &parts, false, Instant::now(), true).await;
        herd.finish(k, sh.past_end(Instant::now()));
    }
}

/// Sleeps until about `t`, erring early. monoio 0.2.4's timer wakes a
/// `sleep(n ms)` about one millisecond late (measured: n + 1.02 ms at the
/// median), so this asks for one millisecond less and sends up to a
/// millisecond early; an early request is timed from its real send, so
/// nothing is hidden, whereas a late one would add the timer's slack to
/// every open-loop latency.
async fn wait_until(t: Instant) {
    let left = t.saturating_duration_since(Instant::now());
    let ms = (left.as_millis() as u64).saturating_sub(1);
    if ms > 0 {
        monoio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// A connection's position in the workload and its reusable buffers.
struct Step {
    cursor: usize,
    hash: [u8; HASH_LEN],
    url: Vec<u8>,
}

impl Step {
    fn new(plan: &Plan, index: usize) -> Step {
        // Spread connections over the list instead of all starting at 0.
        let len = plan.workload.len();
        Step {
            cursor: index * len / plan.connections.max(1),
            hash: [b'0'; HASH_LEN],
            url: Vec::with_capacity(128),
        }
    }

    /// One request (two for closure); false once `--once` has used up the list.
    async fn run(
        &mut self,
        sh: &ThreadShared,
        conn: &mut ClientConn,
        start: Instant,
        measured: bool,
    ) -> bool {
        let c = match &sh.plan.once {
            Some(shared) => {
                let c = shared.fetch_add(1, Ordering::Relaxed);
                if c >= sh.plan.workload.len() {
                    return false;
                }
                c
            }
            None => {
                let c = self.cursor;
                self.cursor = self.cursor.wrapping_add(1);
                c
            }
        };
        match (&sh.plan.workload, sh.plan.scenario) {
            (Workload::Random, _) => {
                sh.rng.borrow_mut().fill_hash(&mut self.hash);
                let parts: [&[u8]; 3] = [b"/", &self.hash, b".narinfo"];
                request(sh, conn, &parts, false, start, measured).await;
            }
            (Workload::Urls(urls), _) => {
                let url = urls[c % urls.len()].as_bytes();
                request(sh, conn, &[b"/", url], false, start, measured).await;
            }
            (Workload::Hashes(hashes), scenario) => {
                let hash = hashes[c % hashes.len()].as_bytes();
                let closure = scenario == Scenario::Closure;
                let parts: [&[u8]; 3] = [b"/", hash, b".narinfo"];
                let status = request(sh, conn, &parts, closure, start, measured).await;
                if closure && status == Some(200) && self.nar_url(&conn.captured) {
                    if measured && !sh.take_ticket() {
                        return false;
                    }
                    let parts: [&[u8]; 2] = [b"/", &self.url];
                    request(sh, conn, &parts, false, Instant::now(), measured).await;
                }
            }
        }
        true
    }

    /// Copies the narinfo's relative `URL:` into `self.url`.
    fn nar_url(&mut self, narinfo: &[u8]) -> bool {
        let Some(line) = narinfo
            .split(|&b| b == b'\n')
            .find(|l| l.starts_with(b"URL:"))
        else {
            return false;
        };
        let url = line[4..].trim_ascii();
        if url.is_empty() || url.windows(3).any(|w| w == b"://") {
            return false; // absolute URLs point elsewhere
        }
        self.url.clear();
        self.url
            .extend_from_slice(url.strip_prefix(b"/").unwrap_or(url));
        true
    }
}

/// Sends one GET and records it; returns the status of a full response.
async fn request(
    sh: &ThreadShared,
    conn: &mut ClientConn,
    parts: &[&[u8]],
    capture: bool,
    start: Instant,
    measured: bool,
) -> Option<u16> {
    let res = monoio::time::timeout(sh.plan.timeout, conn.get(parts, capture)).await;
    let outcome = match res {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(e)) => Err(kind_of(&e)),
        Err(_) => Err(ErrorKind::Timeout),
    };
    if outcome.is_err() {
        conn.close();
    }
    if measured {
        let expect_404 = sh.plan.scenario == Scenario::NarinfoMiss;
        let mut stats = sh.stats.borrow_mut();
        let (bytes, error) = match outcome {
            Ok(o) => {
                let e = ErrorKind::of_status(o.status, expect_404);
                stats.response(start.elapsed(), o.status, o.bytes, e);
                (o.bytes, e.is_some())
            }
            Err(kind) => {
                stats.failure(kind);
                (0, true)
            }
        };
        sh.live.requests.fetch_add(1, Ordering::Relaxed);
        sh.live.bytes.fetch_add(bytes, Ordering::Relaxed);
        sh.live
            .errors
            .fetch_add(u64::from(error), Ordering::Relaxed);
    }
    outcome.ok().map(|o| o.status)
}

fn kind_of(e: &WireError) -> ErrorKind {
    match e {
        WireError::Connect(_) => ErrorKind::Connect,
        WireError::Reset => ErrorKind::Reset,
        WireError::Closed => ErrorKind::Closed,
        WireError::Io(_) => ErrorKind::Io,
        WireError::Protocol(_) => ErrorKind::Protocol,
    }
}
