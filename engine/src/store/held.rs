//! Read buffers held as the memory of the matrices read into them.
//!
//! An expert's slice used to be copied out of its read buffer into a new heap block, whose pages
//! the kernel faulted in and zeroed one by one, because glibc's per-thread arenas give memory
//! back as the store's evictions and reads move it from one arena to another. At a 2 GB limit
//! on the 18-layer Q4_K_M qwen3moe (prefetch off), the I/O threads spent 7.5% of the process's
//! CPU samples zeroing those pages inside the copy, and 2.3% more copying. Held instead, a slice
//! costs no copy, and its buffer goes back to [`read_buffers`](crate::allocator::read_buffers)
//! when the expert is evicted, pages still in, for the next read.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::fetch::AlignedBuf;

/// Reads from this length on are held (a slice's aligned span, or a whole expert file of the
/// odmoe layout). The store counts the slices; a held buffer is longer by the blocks a direct
/// read spans around its slice (under 8 KiB), by what a kept buffer may exceed the read
/// (`read_buffers::SLACK`, 8 KiB), and by the rest of its last page: under 16 KiB with 4 KiB
/// pages, under 24 KiB with Apple's 16 KiB ones (whose reads are not direct). That is under 5%
/// from here on, and under 3% for a Q4_K slice of Qwen3-30B-A3B (864 KiB). Smaller slices are
/// copied, as the fixtures' tiny ones are: the heap packs them without that slack.
pub const HOLD_FROM: usize = 512 << 10;

/// Most buffers held at once. Each is a mapping of its own, and Linux allows a process 65,530
/// by default; past this, slices are copied out of their buffers as smaller ones are.
const MOST_HELD: usize = 16 << 10;

static HELD: AtomicUsize = AtomicUsize::new(0);

/// A read buffer held as matrices' memory, counted while it lives.
struct Held(AlignedBuf);

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `buf`, shared, to be held as the memory of the matrices read into it; or `buf` back if it is
/// shorter than [`HOLD_FROM`] or [`MOST_HELD`] buffers are held already.
pub fn hold(buf: AlignedBuf) -> Result<Arc<dyn AsRef<[u8]> + Send + Sync>, AlignedBuf> {
    if buf.len() < HOLD_FROM {
        return Err(buf);
    }
    if HELD.fetch_add(1, Ordering::Relaxed) >= MOST_HELD {
        HELD.fetch_sub(1, Ordering::Relaxed);
        return Err(buf);
    }
    Ok(Arc::new(Held(buf)))
}
