//! One range of a parallel transfer: its request, the proof that the
//! answer carries exactly those bytes of the same object, and its body
//! read into the range's buffer.

use std::time::Duration;

use crate::http::client::{ClientError, Method as UpMethod, Request as UpRequest, Response};
use crate::serve::narinfo::discard_body;
use crate::upstream::Upstream;
use crate::worker::WorkerCtx;

use super::super::failover::Object;

/// One range of the object: bytes `from..=to`; `buf` holds those already
/// received (a range retried elsewhere keeps them and asks only for the
/// rest).
#[derive(Debug)]
pub struct Job {
    pub index: usize,
    pub from: u64,
    pub to: u64,
    pub buf: Vec<u8>,
}

impl Job {
    pub fn len(&self) -> u64 {
        self.to - self.from + 1
    }

    pub fn missing(&self) -> u64 {
        self.len() - self.buf.len() as u64
    }
}

/// Why a range did not arrive whole from one holder.
#[derive(Debug)]
pub enum Miss {
    /// The holder answered the range wrongly (a 200, a wrong
    /// `Content-Range`, another ETag or encoding): never asked again.
    Misbehaved(u16),
    /// Transport error, stall or early end.
    Error(ClientError),
}

/// Where a range request goes.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub up: &'a Upstream,
    pub path: &'a str,
    /// The holder's identity with the object is already proved (the same
    /// hash-named URL, or a canonical candidate's narinfo).
    pub known_same: bool,
    pub stall: Duration,
}

/// Sends the request for the bytes `job` is missing and checks the head.
pub async fn open(
    ctx: &WorkerCtx,
    t: Target<'_>,
    object: &Object,
    job: &Job,
) -> Result<Response, Miss> {
    let from = job.from + job.buf.len() as u64;
    let range = format!("bytes={from}-{}", job.to);
    let headers = [("Range", range.as_bytes())];
    let req = UpRequest {
        method: UpMethod::Get,
        path: t.path,
        headers: &headers,
    };
    let mut resp = ctx
        .client
        .send(t.up.nar_origin(), &req)
        .await
        .map_err(Miss::Error)?;
    if !object.carries(&resp, from, job.to, t.known_same) {
        let status = resp.status();
        tracing::debug!(upstream = %t.up.url, status, path = t.path, range, "NAR range answered wrongly");
        discard_body(resp);
        return Err(Miss::Misbehaved(status));
    }
    let stall = t.up.nar.timeout.map_or(t.stall, |n| n.min(t.stall));
    resp.set_read_timeout(stall);
    Ok(resp)
}

/// Reads the bytes `job` is missing from `resp` (a range answer, or for
/// the first range the client's own response), and no more.
pub async fn fill(resp: &mut Response, job: &mut Job) -> Result<(), Miss> {
    let want = job.len() as usize;
    while job.buf.len() < want {
        match resp.read_chunk().await {
            Ok(Some(piece)) => {
                let take = piece.len().min(want - job.buf.len());
                job.buf.extend_from_slice(&piece[..take]);
            }
            Ok(None) => return Err(Miss::Error(ClientError::ConnectionClosed)),
            Err(e) => return Err(Miss::Error(e)),
        }
    }
    Ok(())
}

/// A whole range from one holder: [`open`] then [`fill`].
pub async fn fetch(
    ctx: &WorkerCtx,
    t: Target<'_>,
    object: &Object,
    job: &mut Job,
) -> Result<(), Miss> {
    let mut resp = open(ctx, t, object, job).await?;
    fill(&mut resp, job).await
}
