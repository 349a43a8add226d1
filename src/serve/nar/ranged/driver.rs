//! The running part of a parallel transfer: which range goes to which
//! connection, retries, and the in-order writer (see ranged.rs).
//!
//! Two futures run side by side on the worker: the driver starts range
//! fetches and hands finished ranges, in order, to the writer; the writer
//! writes them to the client and hands each buffer back. At most
//! `connections` buffers exist, so a slow client stops new ranges.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::{select, Either};
use futures_util::stream::{FuturesUnordered, StreamExt};
use monoio::buf::IoBuf;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use monoio::time::Instant;

use super::super::failover::Object;
use super::super::hedge::Held;
use super::super::{Candidates, Failures};
use super::fetch::{self, Job, Miss, Target};
use crate::config::ranges::NarRanges;
use crate::http::client::Response as UpResponse;
use crate::serve::narinfo::fail_kind;
use crate::upstream::limits::RETRY;
use crate::upstream::UpstreamSet;
use crate::worker::WorkerCtx;

/// Failures of one holder (transport errors, stalls) before it is asked
/// for no more ranges of this transfer.
const MAX_FAILURES: u32 = 3;

/// Most bytes of one client write (each bounded by `timeouts.idle`).
const WRITE_STEP: usize = 256 * 1024;

/// Why a transfer ended before its last byte.
#[derive(Debug)]
pub enum Failed {
    /// Writing to the client failed.
    Client(io::Error),
    /// No holder could supply a range.
    NoHolder,
}

pub struct Outcome {
    /// Bytes the client got.
    pub sent: u64,
    pub result: Result<(), Failed>,
}

/// An upstream that holds the object, at its path.
struct Holder {
    slot: usize,
    path: Rc<str>,
    known_same: bool,
    failures: u32,
    excluded: bool,
}

/// A connection's place: the holder it asks and its stream permit. None
/// for the client's own first response (its permit is the caller's).
type Lane<'a> = Option<(usize, Held<'a>)>;
type Fetch<'a> = Pin<Box<dyn Future<Output = (Job, Lane<'a>, Result<(), Miss>)> + 'a>>;

/// One parallel transfer, ready to run.
pub struct Transfer<'a> {
    pub ctx: &'a WorkerCtx,
    pub set: &'a UpstreamSet,
    pub cfg: NarRanges,
    pub object: &'a Object,
    /// The upstream of the first response: slot, path, identity proved.
    pub origin: (usize, Rc<str>, bool),
    /// Other candidates, asked (and proved) when the holders known so far
    /// cannot take another range.
    pub rest: Candidates,
}

/// Why no range could start now.
#[derive(Debug, PartialEq, Eq)]
enum Blocked {
    /// Nothing to start, or every connection is busy.
    Busy,
    /// Every buffer is in use (ranges waiting for the client).
    Buffers,
    /// Holders remain but none has a free stream permit.
    Permits,
    /// No holder is left.
    NoHolder,
}

struct State<'a> {
    t: Transfer<'a>,
    holders: Vec<Holder>,
    /// Idle connections' lanes, reused before new permits are taken.
    spare: Vec<(usize, Held<'a>)>,
    running: FuturesUnordered<Fetch<'a>>,
    /// Ranges to ask again, with the bytes they already have.
    retry: Vec<Job>,
    /// Finished ranges not yet handed to the writer.
    done: BTreeMap<usize, Vec<u8>>,
    /// Empty buffers, and how many exist.
    free: Vec<Vec<u8>>,
    buffers: usize,
    chunks: usize,
    next_new: usize,
    next_write: usize,
    leader_active: bool,
}

impl<'a> Transfer<'a> {
    /// Runs the transfer: `leader` is the client's own response (it
    /// supplies the first range), `probe` the second range's open answer.
    pub async fn run(
        self,
        dst: &mut TcpStream,
        leader: UpResponse,
        probe: (Job, UpResponse, Held<'a>),
    ) -> Outcome {
        let sent = Cell::new(0u64);
        let (data_tx, data_rx) = flume::unbounded::<Vec<u8>>();
        let (free_tx, free_rx) = flume::unbounded::<Vec<u8>>();
        let idle = self.ctx.shared.config.timeouts.idle;
        let writer = pin!(write_out(dst, data_rx, free_tx, idle, &sent));
        let driver = pin!(self.drive(leader, probe, data_tx, free_rx));
        let result = match select(writer, driver).await {
            Either::Left((Err(e), _)) => Err(Failed::Client(e)),
            // The writer ends cleanly only after the driver finished.
            Either::Left((Ok(()), _)) => Err(Failed::NoHolder),
            Either::Right((Ok(()), writer)) => writer.await.map_err(Failed::Client),
            Either::Right((Err(f), _)) => Err(f),
        };
        Outcome {
            sent: sent.get(),
            result,
        }
    }

    async fn drive(
        self,
        leader: UpResponse,
        probe: (Job, UpResponse, Held<'a>),
        data: flume::Sender<Vec<u8>>,
        free: flume::Receiver<Vec<u8>>,
    ) -> Result<(), Failed> {
        let (start, end, _) = self.object.span();
        let chunk = self.cfg.chunk_size;
        let chunks = (end - start + 1).div_ceil(chunk) as usize;
        let (slot, path, known_same) = self.origin.clone();
        let mut s = State {
            t: self,
            holders: vec![Holder {
                slot,
                path,
                known_same,
                failures: 0,
                excluded: false,
            }],
            spare: Vec::new(),
            running: FuturesUnordered::new(),
            retry: Vec::new(),
            done: BTreeMap::new(),
            free: Vec::new(),
            buffers: 2,
            chunks,
            next_new: 2,
            next_write: 0,
            leader_active: true,
        };
        let first = Job {
            index: 0,
            from: start,
            to: end.min(start + chunk - 1),
            buf: Vec::with_capacity(chunk as usize),
        };
        s.running.push(Box::pin(async move {
            let mut leader = leader;
            let mut job = first;
            let r = fetch::fill(&mut leader, &mut job).await;
            // An unread rest closes the connection here.
            drop(leader);
            (job, None, r)
        }));
        let (mut second, mut resp, permit) = probe;
        second.buf.reserve_exact(chunk as usize);
        s.running.push(Box::pin(async move {
            let r = fetch::fill(&mut resp, &mut second).await;
            drop(resp);
            (second, Some((0, permit)), r)
        }));
        // When no range could start for want of permits: until when to wait.
        let mut waiting_since: Option<Instant> = None;
        loop {
            while let Some(buf) = s.done.remove(&s.next_write) {
                // The writer is alive while the driver runs (it ends only
                // after `data` is dropped, or with an error that ends both).
                let _ = data.send(buf);
                s.next_write += 1;
            }
            if s.next_write == s.chunks {
                return Ok(());
            }
            let blocked = s.schedule().await;
            if s.running.is_empty() {
                match blocked {
                    Blocked::NoHolder => return Err(Failed::NoHolder),
                    Blocked::Buffers | Blocked::Busy => match free.recv_async().await {
                        Ok(buf) => s.give_back(buf),
                        Err(_) => return Err(Failed::NoHolder),
                    },
                    Blocked::Permits => {
                        let since = *waiting_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > s.t.ctx.shared.config.timeouts.first_byte {
                            return Err(Failed::NoHolder);
                        }
                        monoio::time::sleep(RETRY).await;
                    }
                }
                continue;
            }
            waiting_since = None;
            monoio::select! {
                done = s.running.next() => {
                    if let Some((job, lane, result)) = done {
                        s.finished(job, lane, result);
                    }
                }
                buf = free.recv_async() => match buf {
                    Ok(buf) => s.give_back(buf),
                    Err(_) => return Err(Failed::NoHolder),
                },
            }
        }
    }
}

impl<'a> State<'a> {
    fn give_back(&mut self, mut buf: Vec<u8>) {
        buf.clear();
        self.free.push(buf);
    }

    fn job_bounds(&self, index: usize) -> (u64, u64) {
        let (start, end, _) = self.t.object.span();
        let from = start + index as u64 * self.t.cfg.chunk_size;
        (from, end.min(from + self.t.cfg.chunk_size - 1))
    }

    /// Starts ranges while connections, buffers and permits allow.
    async fn schedule(&mut self) -> Blocked {
        loop {
            let lanes = self.running.len() - usize::from(self.leader_active);
            let max = self.t.cfg.connections as usize - usize::from(self.leader_active);
            if lanes >= max {
                return Blocked::Busy;
            }
            let job = if let Some(pos) = (0..self.retry.len()).min_by_key(|&i| self.retry[i].index)
            {
                self.retry.swap_remove(pos)
            } else if self.next_new < self.chunks {
                let buf = match self.free.pop() {
                    Some(b) => b,
                    None if self.buffers < self.t.cfg.connections as usize => {
                        self.buffers += 1;
                        Vec::with_capacity(self.t.cfg.chunk_size as usize)
                    }
                    None => return Blocked::Buffers,
                };
                let index = self.next_new;
                self.next_new += 1;
                let (from, to) = self.job_bounds(index);
                Job {
                    index,
                    from,
                    to,
                    buf,
                }
            } else {
                return Blocked::Busy;
            };
            let Some(lane) = self.lane().await else {
                self.retry.push(job);
                return if self.holders.iter().all(|h| h.excluded) {
                    Blocked::NoHolder
                } else {
                    Blocked::Permits
                };
            };
            self.start(job, lane);
        }
    }

    fn start(&mut self, mut job: Job, lane: (usize, Held<'a>)) {
        let h = &self.holders[lane.0];
        let (ctx, set, object) = (self.t.ctx, self.t.set, self.t.object);
        let (slot, path, known_same) = (h.slot, h.path.clone(), h.known_same);
        let stall = self.t.cfg.stall_timeout;
        self.running.push(Box::pin(async move {
            let Some(up) = set.live(slot) else {
                return (job, Some(lane), Err(Miss::Misbehaved(0)));
            };
            let t = Target {
                up,
                path: &path,
                known_same,
                stall,
            };
            let r = fetch::fetch(ctx, t, object, &mut job).await;
            (job, Some(lane), r)
        }));
    }

    /// A connection for the next range: an idle one, a new permit from a
    /// known holder (the first response's upstream first), or a new holder
    /// from the candidates left, proved as for a mid-stream failover.
    async fn lane(&mut self) -> Option<(usize, Held<'a>)> {
        if let Some(l) = self.spare.pop() {
            return Some(l);
        }
        let ctx = self.t.ctx;
        for (i, h) in self.holders.iter().enumerate() {
            if h.excluded {
                continue;
            }
            let Some(up) = self.t.set.live(h.slot) else {
                continue;
            };
            if let Some(held) = Held::take(ctx, h.slot, up) {
                return Some((i, held));
            }
        }
        if !ctx.shared.config.server.nar_failover {
            // Bytes from another upstream only with failover on.
            return None;
        }
        let (_, _, content_addressed) = self.t.object.span();
        let mut unproved = Failures::default();
        let mut full = Vec::new();
        let mut found = None;
        while let Some(pending) = self.t.rest.take(&mut unproved) {
            let slot = pending.upstream();
            if self.holders.iter().any(|h| h.slot == slot) {
                continue;
            }
            let Some(up) = self.t.set.live(slot) else {
                continue;
            };
            let Some(held) = Held::take(ctx, slot, up) else {
                full.push(pending);
                continue;
            };
            let Ok(c) = pending.prove(ctx, self.t.set).await else {
                continue;
            };
            let known_same = c.proven || (content_addressed && c.path == self.holders[0].path);
            if !known_same && !self.t.object.has_etag() {
                continue;
            }
            tracing::debug!(upstream = %up.url, path = &*c.path, "NAR ranges: another holder joins");
            self.holders.push(Holder {
                slot,
                path: c.path,
                known_same,
                failures: 0,
                excluded: false,
            });
            found = Some((self.holders.len() - 1, held));
            break;
        }
        self.t.rest.give_back(std::iter::empty(), full);
        found
    }

    fn finished(&mut self, job: Job, lane: Lane<'a>, result: Result<(), Miss>) {
        let holder = lane.as_ref().map_or(0, |l| l.0);
        if lane.is_none() {
            self.leader_active = false;
        }
        let slot = self.holders[holder].slot;
        match result {
            Ok(()) => {
                if let Some(u) = self.t.ctx.metrics.upstreams.get(slot) {
                    u.nar_bytes.add(job.len());
                }
                if let Some(l) = lane {
                    self.spare.push(l);
                }
                self.done.insert(job.index, job.buf);
            }
            Err(miss) => {
                drop(lane);
                let h = &mut self.holders[holder];
                match &miss {
                    Miss::Misbehaved(_) => h.excluded = true,
                    Miss::Error(e) => {
                        h.failures += 1;
                        h.excluded |= h.failures >= MAX_FAILURES;
                        if !e.is_request_fault() {
                            self.t.ctx.shared.routing.failed(slot, fail_kind(e));
                        }
                    }
                }
                let excluded = h.excluded;
                self.t.ctx.metrics.nar_ranged.retries.inc();
                tracing::debug!(slot, range = job.index, missing = job.missing(), excluded, why = ?miss, "NAR range failed; asking again");
                if excluded {
                    self.spare.retain(|l| l.0 != holder);
                }
                self.retry.push(job);
            }
        }
    }
}

/// Writes the ranges to the client as they come, in order, and gives each
/// buffer back. Ends when the driver drops its sender.
async fn write_out(
    dst: &mut TcpStream,
    data: flume::Receiver<Vec<u8>>,
    free: flume::Sender<Vec<u8>>,
    idle: Duration,
    sent: &Cell<u64>,
) -> io::Result<()> {
    while let Ok(mut buf) = data.recv_async().await {
        // Each write is bounded by the idle timeout, as in the
        // single-stream relay: a slow client is slow, not dead.
        let mut at = 0;
        while at < buf.len() {
            let end = (at + WRITE_STEP).min(buf.len());
            let write = dst.write_all(buf.slice(at..end));
            let Ok((written, slice)) = monoio::time::timeout(idle, write).await else {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client write timed out",
                ));
            };
            buf = slice.into_inner();
            written?;
            sent.set(sent.get() + (end - at) as u64);
            at = end;
        }
        let _ = free.send(buf);
    }
    Ok(())
}
