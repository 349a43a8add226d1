//! The heap home of one miss's race future, reused from miss to miss.
//!
//! Every route-cache miss boxes its flight (single-flight, race, attempts:
//! several KiB, kept out of every idle connection's task). The future holds
//! monoio `Sleep`s, which are aligned to 128 bytes, so `Box::pin` went
//! through glibc's slow aligned path (`posix_memalign`: a larger chunk,
//! split, and its ends freed) and, because a worker's arena gives freed
//! memory at its top back to the kernel, often touched fresh pages again
//! (a page fault per miss). A [`RaceBox`] takes its memory from a small
//! per-thread list of blocks that earlier misses gave back, and only
//! allocates when the list has none of its layout.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// Bytes of spare blocks a thread keeps; blocks given back past it are
/// freed. About the flights of 64 misses in flight at once on one worker.
const SPARE_BYTES: usize = 1024 * 1024;

/// Blocks given back, with their layouts, and their total size.
struct Spares {
    blocks: Vec<(Layout, NonNull<u8>)>,
    bytes: usize,
}

impl Spares {
    fn take(&mut self, layout: Layout) -> Option<NonNull<u8>> {
        let at = self.blocks.iter().rposition(|&(l, _)| l == layout)?;
        self.bytes -= layout.size();
        Some(self.blocks.swap_remove(at).1)
    }

    /// Keeps `block` if there is room, else frees it.
    fn give(&mut self, layout: Layout, block: NonNull<u8>) {
        if self.bytes + layout.size() <= SPARE_BYTES {
            self.bytes += layout.size();
            self.blocks.push((layout, block));
        } else {
            // SAFETY: `block` came from `alloc(layout)` and is no longer used.
            unsafe { dealloc(block.as_ptr(), layout) }
        }
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        for &(layout, block) in &self.blocks {
            // SAFETY: as in `give`: allocated with `layout`, unused.
            unsafe { dealloc(block.as_ptr(), layout) }
        }
    }
}

thread_local! {
    static SPARES: RefCell<Spares> = const {
        RefCell::new(Spares { blocks: Vec::new(), bytes: 0 })
    };
}

/// A future on the heap, in a block reused across misses (see the module
/// docs). Like `Pin<Box<F>>`: the future never moves once placed.
pub(super) struct RaceBox<F> {
    fut: NonNull<F>,
}

impl<F> RaceBox<F> {
    pub(super) fn new(fut: F) -> RaceBox<F> {
        let layout = Layout::new::<F>();
        let block = if layout.size() == 0 {
            NonNull::<F>::dangling().cast()
        } else {
            let spare = SPARES
                .try_with(|s| s.borrow_mut().take(layout))
                .ok()
                .flatten();
            spare.unwrap_or_else(|| {
                // SAFETY: `layout` has a non-zero size.
                NonNull::new(unsafe { alloc(layout) }).unwrap_or_else(|| handle_alloc_error(layout))
            })
        };
        let fut_ptr = block.cast::<F>();
        // SAFETY: `block` is valid for writes of `F` and aligned for it
        // (allocated with `F`'s layout, or dangling for a zero-sized `F`).
        unsafe { fut_ptr.as_ptr().write(fut) };
        RaceBox { fut: fut_ptr }
    }
}

impl<F> Drop for RaceBox<F> {
    fn drop(&mut self) {
        let layout = Layout::new::<F>();
        // SAFETY: `fut` holds a live `F` written by `new` and dropped only
        // here; it is never used again.
        unsafe { self.fut.as_ptr().drop_in_place() };
        if layout.size() == 0 {
            return;
        }
        let block = self.fut.cast::<u8>();
        let kept = SPARES.try_with(|s| s.borrow_mut().give(layout, block));
        if kept.is_err() {
            // The thread is exiting: its list is gone.
            // SAFETY: allocated with `layout`, now unused.
            unsafe { dealloc(block.as_ptr(), layout) }
        }
    }
}

// The future is pinned on the heap; moving the handle does not move it.
impl<F> Unpin for RaceBox<F> {}

impl<F: Future> Future for RaceBox<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the future stays at `fut` until `drop` (it is never moved
        // out), so it may be polled pinned; `&mut self` is exclusive.
        unsafe { Pin::new_unchecked(&mut *self.get_mut().fut.as_ptr()) }.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    /// Aligned like a future holding a monoio `Sleep`.
    #[repr(align(128))]
    struct Big {
        bytes: [u8; 3000],
        /// Counts the live futures.
        _alive: Rc<()>,
    }

    fn big(fill: u8, alive: &Rc<()>) -> Big {
        Big {
            bytes: [fill; 3000],
            _alive: alive.clone(),
        }
    }

    impl Future for Big {
        type Output = usize;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<usize> {
            Poll::Ready(self.bytes.len())
        }
    }

    fn run<F: Future>(mut f: F) -> F::Output {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // SAFETY: `f` is not moved after this.
        match unsafe { Pin::new_unchecked(&mut f) }.poll(&mut cx) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("pending"),
        }
    }

    #[test]
    fn block_is_reused_and_future_dropped() {
        let alive = Rc::new(());
        let a = RaceBox::new(big(1, &alive));
        let first = a.fut.as_ptr() as usize;
        assert_eq!(first % 128, 0);
        assert_eq!(run(a), 3000);
        assert_eq!(Rc::strong_count(&alive), 1, "the future was dropped");
        let b = RaceBox::new(big(2, &alive));
        assert_eq!(b.fut.as_ptr() as usize, first, "the spare block is reused");
        // Two at once: the second gets a block of its own.
        let c = RaceBox::new(big(3, &alive));
        assert_ne!(c.fut.as_ptr() as usize, first);
        assert_eq!(c.fut.as_ptr() as usize % 128, 0);
        drop((b, c));
        assert_eq!(Rc::strong_count(&alive), 1);
    }

    #[test]
    fn spares_are_bounded() {
        let alive = Rc::new(());
        let many: Vec<_> = (0..2 * SPARE_BYTES / std::mem::size_of::<Big>())
            .map(|_| RaceBox::new(big(0, &alive)))
            .collect();
        drop(many);
        assert_eq!(Rc::strong_count(&alive), 1);
        SPARES.with(|s| {
            let s = s.borrow();
            assert!(s.bytes <= SPARE_BYTES);
            assert_eq!(s.bytes, s.blocks.len() * std::mem::size_of::<Big>());
        });
    }

    struct Seven;

    impl Future for Seven {
        type Output = usize;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<usize> {
            Poll::Ready(7)
        }
    }

    #[test]
    fn zero_sized_futures_need_no_block() {
        assert_eq!(run(RaceBox::new(Seven)), 7);
        // A small one of ordinary alignment works the same way.
        assert_eq!(run(RaceBox::new(std::future::ready(5u8))), 5);
    }
}
