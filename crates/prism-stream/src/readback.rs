//! Small read-backs: a device range copied into a pooled pinned slot, read
//! by the host once that copy's fence completed, without waiting for
//! anything else. The slot is host memory the GPU writes, so the host sees
//! it only through [`Readback`], after the fence, and a slot goes back to
//! its pool only when no `Readback` holds it; a slot is handed out again
//! only once its last copy completed (its use list says so).

use std::marker::PhantomData;
use std::sync::Arc;

use crate::memory::{as_bytes_mut, zeroed_vec, Element, PinnedBuffer, SlotPool};
use crate::order::Fence;
use crate::{Error, Result};

/// Values being copied back from the GPU: made by
/// [`Lane::read_async`](crate::Lane::read_async),
/// [`Launch::read_async`](crate::Launch::read_async) and
/// [`GraphLaunch::read_back`](crate::GraphLaunch::read_back). Waiting for
/// it waits for its own copy only (and the work that copy was ordered
/// after), never for later work on any lane.
#[derive(Debug)]
pub struct Readback<T: Element> {
    slot: Option<PinnedBuffer<u8>>,
    fence: Fence,
    n: usize,
    pool: Arc<SlotPool>,
    _t: PhantomData<fn() -> T>,
}

impl<T: Element> Readback<T> {
    /// `n` elements of `T` that `fence` finishes copying into `slot`.
    pub(crate) fn new(slot: PinnedBuffer<u8>, fence: Fence, n: usize, pool: Arc<SlotPool>) -> Self {
        Self {
            slot: Some(slot),
            fence,
            n,
            pool,
            _t: PhantomData,
        }
    }

    /// Elements read.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Never empty (a read of nothing is refused).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The fence after the copy (to await it, or to order other work after it).
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// True once the values have arrived (one `cuEventQuery`; never blocks).
    pub fn is_ready(&self) -> Result<bool> {
        self.fence.is_complete()
    }

    /// The values if they have arrived, without blocking.
    pub fn try_get(&self) -> Result<Option<Vec<T>>> {
        if !self.is_ready()? {
            return Ok(None);
        }
        self.values().map(Some)
    }

    /// Blocks until the values have arrived (waits for this copy's fence
    /// only) and returns them.
    pub fn wait(self) -> Result<Vec<T>> {
        self.fence.wait()?;
        self.values()
    }

    /// [`wait`](Self::wait) for a read of one value.
    pub fn wait_value(self) -> Result<T> {
        let v = self.wait()?;
        v.first()
            .copied()
            .ok_or(Error::ZeroLength { what: "read-back" })
    }

    fn values(&self) -> Result<Vec<T>> {
        let slot = self
            .slot
            .as_ref()
            .ok_or(Error::ZeroLength { what: "read-back" })?;
        // The slot's own use list says whether its copy completed; it
        // refuses (BufferInFlight) otherwise.
        let bytes = slot.as_slice()?;
        let mut out = zeroed_vec::<T>(self.n);
        let dst = as_bytes_mut(&mut out);
        let len = dst.len();
        dst.copy_from_slice(&bytes[..len]);
        Ok(out)
    }
}

impl<T: Element> Drop for Readback<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.pool.put(slot);
        }
    }
}

impl crate::lane::Lane {
    /// The lane's read-back slots (made on first use).
    pub(crate) fn slot_pool(&mut self) -> Arc<SlotPool> {
        Arc::clone(self.slots.get_or_insert_with(SlotPool::new))
    }

    /// Reads `buf[at..at + n]` back without blocking (see
    /// [`Launch::read_async`](crate::Launch::read_async)).
    pub fn read_async<T: Element>(
        &mut self,
        buf: &crate::DeviceBuffer<T>,
        at: usize,
        n: usize,
    ) -> Result<Readback<T>> {
        self.launch().read_async(buf, at, n)
    }

    /// Reads the one value `buf[index]`, blocking until it has arrived: the
    /// copy waits for the value's last writer only, and the host waits for
    /// the copy only, so work queued on other lanes (or after it on this
    /// one) keeps running.
    pub fn read_value<T: Element>(
        &mut self,
        buf: &crate::DeviceBuffer<T>,
        index: usize,
    ) -> Result<T> {
        self.read_async(buf, index, 1)?.wait_value()
    }
}

/// A [`Readback`] being awaited: resolves to its values once its copy
/// completed, without a thread blocked for it (the fence's
/// [`FenceFuture`](crate::FenceFuture) on prism's one completion thread).
#[derive(Debug)]
#[must_use = "futures do nothing unless awaited"]
pub struct ReadbackFuture<T: Element> {
    read: Option<Readback<T>>,
    done: crate::FenceFuture,
}

impl<T: Element> std::future::Future for ReadbackFuture<T> {
    type Output = Result<Vec<T>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match std::pin::Pin::new(&mut self.done).poll(cx) {
            std::task::Poll::Pending => std::task::Poll::Pending,
            std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
            std::task::Poll::Ready(Ok(())) => match self.read.take() {
                Some(r) => std::task::Poll::Ready(r.values()),
                None => std::task::Poll::Ready(Err(Error::ZeroLength {
                    what: "read-back (already taken)",
                })),
            },
        }
    }
}

impl<T: Element> std::future::IntoFuture for Readback<T> {
    type Output = Result<Vec<T>>;
    type IntoFuture = ReadbackFuture<T>;

    /// `readback.await` gives the values once they arrived.
    fn into_future(self) -> ReadbackFuture<T> {
        let done = self.fence.completion();
        ReadbackFuture {
            read: Some(self),
            done,
        }
    }
}
