//! The binaries' global allocator: the system's, but for blocks of 2 MiB or more, which on Linux
//! are mapped on their own in whole huge pages and kept for reuse until the process is idle.
//!
//! A prompt's every step makes and drops tensors of megabytes (a 512-token prompt's hidden
//! states are 4 MiB in qwen3moe). glibc maps blocks that large afresh each time, or keeps them at
//! the top of an arena it trims, so every 4 KiB page of each was faulted in and zeroed again,
//! one fault at a time: on the 2-layer Q4_K_M qwen3moe, adding two 4 MiB tensors took 12 ms,
//! and a 512-token prompt 0.30 s where it now takes 0.25. Here a freed block is kept (up to 32
//! of them, 32 MiB in all) for the next block of its size, which gets it with its pages already
//! in; a block made afresh is advised for transparent huge pages, two faults for 4 MiB instead
//! of 1,024. [`give_back`] unmaps the kept blocks: after a model loads, whenever the daemon's
//! engine goes idle, and when the daemon gives freed memory back, so theirs goes back to the
//! system between requests. (With pages larger than 4 KiB, as some aarch64 kernels use, a huge
//! page is larger than 2 MiB: blocks are still mapped and kept, only not on huge pages.)
//!
//! Smaller blocks, and those aligned beyond a page, stay glibc's, whose heap reuses them: the
//! expert matrices copied out of their reads among them (smaller ones; larger ones are held in
//! their read buffers, `store::held`), which a store under a memory limit frees and reads again
//! all the time. Mapping those afresh too (from 512 KiB) made a 40-token prompt 15% slower to
//! its first token at a 2 GB limit.
//!
//! Elsewhere (macOS, whose allocator keeps large blocks itself) every block is the system's.
//!
//! Beside it, the aligned buffers expert reads fill ([`read_buffers`]) are kept for the next
//! reads, and given back with the blocks.

/// Fixes glibc's thresholds for the blocks it still serves, once, before any thread starts.
///
/// By default glibc maps blocks of 128 KiB or more on their own until it sees one that large
/// freed, then raises that threshold to the largest block freed (up to 32 MiB) and keeps up to
/// twice that free at the top of every thread's arena; `malloc_trim` cannot reach those tops, so
/// a freed model or KV cache could stay resident (44 MiB of 61 after unloading the demo model).
/// Fixed, every block glibc serves under 4 MiB (all but over-aligned ones are under 2 MiB) comes
/// from its heap, and an arena keeps
/// at most 8 MiB free at its top: at 4 MiB, SmolLM2's 1 MiB tensors were trimmed away and
/// faulted in again at every layer (a 512-token prompt 15% slower). Left alone, with large
/// blocks no longer freed through glibc, its threshold would stay at 128 KiB.
pub fn configure_system_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const FOUR_MIB: nix::libc::c_int = 4 << 20;
        const EIGHT_MIB: nix::libc::c_int = 8 << 20;
        // SAFETY: mallopt only sets the allocator's parameters; called before any other thread
        // allocates.
        unsafe {
            nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, FOUR_MIB);
            nix::libc::mallopt(nix::libc::M_TRIM_THRESHOLD, EIGHT_MIB);
        }
    }
}

/// Read buffers kept for the next reads. Each expert read used to map and populate its own
/// buffers and unmap them after: in decode at a 2 GB limit (qwen3moe Q4_K_M, 4 MiB of reads a
/// layer) that took a third of the process's CPU time, zeroing pages and pinning them, time a
/// 2-core machine took from the layers' compute. A kept buffer's pages are in already. A
/// buffer comes back when its read is copied out or, where the expert is held in the buffer it
/// was read into (`store::held`), when the expert is evicted; up to `MOST_BUFFERS` and
/// `MOST_BYTES` are kept, about what the store's reads in flight at once take, and
/// [`give_back`] unmaps them all.
pub mod read_buffers {
    use std::sync::Mutex;

    use memmap2::{MmapMut, MmapOptions};

    /// Most buffers kept. The store makes room for a layer's misses at once, before reading
    /// them: where experts are held in their buffers, the evicted experts' buffers come back
    /// together and the reads take them one by one. A 40-token prompt misses most of a
    /// layer's 64 experts (192 slices) on the 18-layer qwen3moe at a 2 GB limit; kept 16 at
    /// most, nearly every read mapped a new buffer and the prompt took 1.3-1.7x as long.
    pub(super) const MOST_BUFFERS: usize = 1024;
    /// Most bytes kept: buffers waiting for the reads their room was made for are in the
    /// budget already, so this bounds only those of lengths no read is asking for.
    const MOST_BYTES: usize = 256 << 20;
    /// The largest buffer kept: held experts' buffers come back to be read into again, and
    /// one made afresh is zeroed page by page before its read can start (33 MB for a slice of
    /// Mixtral 8x7B in Q4_K, 57 MB for 8x22B). A checksum index's reads of whole layout files of
    /// such experts are not kept.
    pub(super) const LARGEST: usize = 64 << 20;
    /// How much longer than a read a kept buffer it takes may be: a slice of a given length
    /// read directly spans one block more or less, as its offset falls.
    pub(super) const SLACK: usize = 8 << 10;

    static KEPT: Mutex<Kept> = Mutex::new(Kept(Vec::new()));

    /// Buffers waiting for a read.
    pub(super) struct Kept(pub(super) Vec<MmapMut>);

    impl Kept {
        /// The smallest kept buffer of at least `len` bytes, if it is at most [`SLACK`] longer:
        /// a buffer may become the memory of the expert read into it (`store::held`), where
        /// bytes beyond the read would be held uncounted.
        pub(super) fn take(&mut self, len: usize) -> Option<MmapMut> {
            let best = (0..self.0.len())
                .filter(|&i| self.0[i].len() >= len)
                .min_by_key(|&i| self.0[i].len())?;
            (self.0[best].len() - len <= SLACK).then(|| self.0.remove(best))
        }

        /// Keeps `map` for a later read, unmapping the buffers kept longest if there is no
        /// room for it: the lengths reads ask for change with the experts they read.
        pub(super) fn put(&mut self, map: MmapMut) {
            if map.len() > LARGEST {
                return;
            }
            self.0.push(map);
            while self.0.len() > MOST_BUFFERS
                || self.0.iter().map(|m| m.len()).sum::<usize>() > MOST_BYTES
            {
                self.0.remove(0);
            }
        }
    }

    fn lock() -> std::sync::MutexGuard<'static, Kept> {
        crate::lock::recover(KEPT.lock())
    }

    /// The smallest kept buffer of at least `len` bytes, if one is not much longer.
    pub fn take(len: usize) -> Option<MmapMut> {
        lock().take(len)
    }

    /// Keeps `map` for a later read, unmapping the buffers kept longest if there is no room.
    pub fn put(map: MmapMut) {
        lock().put(map);
    }

    /// Unmaps every kept buffer, returning them to the system.
    pub fn release() {
        // Unmapped once the lock is let go: reads need not wait on it.
        let kept = std::mem::take(&mut lock().0);
        drop(kept);
    }

    /// A new anonymous mapping of at least `len` bytes, its pages already in. Pages are at least
    /// 4 KiB (16 KiB on Apple Silicon): aligned for O_DIRECT. Populated at once: a 5 MiB buffer
    /// took 1.5 ms against 1.8 ms faulted page by page, and 2.6 ms from the heap. On Linux, a
    /// buffer of a huge page or more is advised for huge pages before it is populated: a direct
    /// read then pins and transfers each huge page in one piece rather than 512. On a qwen3moe
    /// with Mixtral's expert width (slices of 31 MB, 1 GB budget) an expert's read went from
    /// 65-68 ms to 46-48 ms (p50), and decode from 4.1-4.2 to 5.8-6.0 tok/s.
    pub fn map(len: usize) -> MmapMut {
        #[cfg(target_os = "linux")]
        if len >= super::huge_pages::HUGE_BLOCK {
            let map = anonymous(MmapOptions::new().len(len));
            // Hints: without transparent huge pages the buffer is small pages, and without
            // MADV_POPULATE_WRITE (Linux 5.14) its first read faults them in.
            let _ = map.advise(memmap2::Advice::HugePage);
            let _ = map.advise(memmap2::Advice::PopulateWrite);
            return map;
        }
        anonymous(MmapOptions::new().len(len.max(1)).populate())
    }

    fn anonymous(options: &MmapOptions) -> MmapMut {
        options
            .map_anon()
            .unwrap_or_else(|e| panic!("cannot map anonymous memory for a read: {e}"))
    }
}

#[cfg(target_os = "linux")]
pub use huge_pages::HugePageBlocks;
#[cfg(not(target_os = "linux"))]
pub use std::alloc::System as HugePageBlocks;

/// Unmaps what is kept for reuse: the large blocks (none are kept off Linux) and the expert
/// reads' buffers (see [`read_buffers`]).
pub fn give_back() {
    #[cfg(target_os = "linux")]
    huge_pages::give_back();
    read_buffers::release();
}

#[cfg(target_os = "linux")]
mod huge_pages {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use nix::libc;

    /// Blocks from this size on are mapped on their own, in whole huge pages, and kept for
    /// reuse: the size of an x86-64 huge page.
    pub(super) const HUGE_BLOCK: usize = 2 << 20;

    /// Most freed blocks kept for reuse: the tensors a layer of a prompt frees are fewer.
    const KEPT_BLOCKS: usize = 32;

    /// Most bytes kept for reuse: qwen3moe's prompts gained as much from 32 MiB as from 64.
    const KEPT_BYTES: usize = 32 << 20;

    /// Freed blocks, by address and mapped length, waiting for a block of the same length.
    struct Kept {
        blocks: [(usize, usize); KEPT_BLOCKS],
        count: usize,
        bytes: usize,
    }

    static KEPT: Mutex<Kept> = Mutex::new(Kept {
        blocks: [(0, 0); KEPT_BLOCKS],
        count: 0,
        bytes: 0,
    });

    /// The kept blocks, the lock taken whatever a panic elsewhere left (the list is whole
    /// between any two statements that change it).
    fn kept() -> std::sync::MutexGuard<'static, Kept> {
        crate::lock::recover(KEPT.lock())
    }

    impl Kept {
        /// A kept block of mapped length `length`, taken out of the list.
        fn take(&mut self, length: usize) -> Option<*mut u8> {
            let i = self.blocks[..self.count]
                .iter()
                .position(|&(_, kept)| kept == length)?;
            let (address, _) = self.blocks[i];
            self.count -= 1;
            self.blocks[i] = self.blocks[self.count];
            self.bytes -= length;
            Some(address as *mut u8)
        }

        /// Keeps the block at `address` of mapped length `length`, if there is room.
        fn keep(&mut self, address: *mut u8, length: usize) -> bool {
            if self.count == KEPT_BLOCKS || self.bytes + length > KEPT_BYTES {
                return false;
            }
            self.blocks[self.count] = (address as usize, length);
            self.count += 1;
            self.bytes += length;
            true
        }
    }

    /// Unmaps every block kept for reuse, giving its memory back to the system.
    pub fn give_back() {
        // Copied out, so that nothing allocates or unmaps while the list is locked.
        let (blocks, count) = {
            let mut kept = kept();
            let count = kept.count;
            (kept.count, kept.bytes) = (0, 0);
            (kept.blocks, count)
        };
        for &(address, length) in &blocks[..count] {
            // SAFETY: a kept block is a whole mapping of `length` bytes nothing else refers to.
            unsafe { unmap(address as *mut u8, length) };
        }
    }

    /// See the [module](super) documentation.
    pub struct HugePageBlocks;

    impl HugePageBlocks {
        /// Whether a block of `layout` is mapped on its own rather than taken from the system.
        pub(super) fn maps(layout: Layout) -> bool {
            layout.size() >= HUGE_BLOCK && layout.align() <= page()
        }
    }

    // SAFETY: blocks are the system allocator's, or whole mappings of at least `layout.size()` bytes
    // aligned to a page (which satisfies `layout.align()`), unmapped only by `dealloc` or
    // `give_back` (once kept) or moved by `realloc`; which kind a block is follows from its
    // layout alone.
    unsafe impl GlobalAlloc for HugePageBlocks {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if Self::maps(layout) {
                let length = mapped_length(layout.size());
                let kept = kept().take(length);
                kept.unwrap_or_else(|| map(length))
            } else {
                // SAFETY: the caller's layout, passed on.
                unsafe { System.alloc(layout) }
            }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            if Self::maps(layout) {
                let length = mapped_length(layout.size());
                let kept = kept().take(length);
                match kept {
                    Some(block) => {
                        // Zeroing pages already in costs less than faulting fresh ones in.
                        // SAFETY: a kept block of `length` bytes, now the caller's.
                        unsafe { block.write_bytes(0, length) };
                        block
                    }
                    // A fresh anonymous mapping reads as zeros.
                    None => map(length),
                }
            } else {
                // SAFETY: the caller's layout, passed on.
                unsafe { System.alloc_zeroed(layout) }
            }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if Self::maps(layout) {
                let length = mapped_length(layout.size());
                if !kept().keep(ptr, length) {
                    // SAFETY: `ptr` is a mapping of `length` bytes made by `alloc`.
                    unsafe { unmap(ptr, length) }
                }
            } else {
                // SAFETY: the caller's block and layout, passed on.
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: the caller guarantees `new_size`, rounded to the alignment, does not overflow.
            let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            match (Self::maps(layout), Self::maps(new_layout)) {
                // SAFETY: `ptr` is a mapping of `layout.size()` bytes made by `alloc`.
                (true, true) => unsafe { remap(ptr, layout.size(), new_size) },
                // SAFETY: the caller's block and layout, passed on.
                (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
                // Across the threshold: a new block of the other kind, the contents copied.
                _ => {
                    // SAFETY: a valid layout (the caller's guarantee), for a new block.
                    let new = unsafe { self.alloc(new_layout) };
                    if !new.is_null() {
                        // SAFETY: both blocks hold at least the smaller size and are distinct; the
                        // old one was the caller's to give up.
                        unsafe {
                            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                            self.dealloc(ptr, layout);
                        }
                    }
                    new
                }
            }
        }
    }

    /// The system's page size, asked once: mappings are aligned to it, and their lengths
    /// rounded up to it.
    pub(super) fn page() -> usize {
        static PAGE: AtomicUsize = AtomicUsize::new(0);
        match PAGE.load(Ordering::Relaxed) {
            0 => {
                // SAFETY: sysconf only reads a system constant.
                let size =
                    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
                PAGE.store(size, Ordering::Relaxed);
                size
            }
            size => size,
        }
    }

    /// Whole huge pages: a block's last one, if partial, would be faulted in 4 KiB at a time.
    fn mapped_length(size: usize) -> usize {
        size.next_multiple_of(HUGE_BLOCK)
    }

    /// [`map_once`], again after giving back the kept blocks if the system had no memory.
    fn map(length: usize) -> *mut u8 {
        let block = map_once(length);
        if !block.is_null() {
            return block;
        }
        give_back();
        map_once(length)
    }

    /// A zeroed mapping of `length` bytes (a [`mapped_length`]) that starts on a huge-page
    /// boundary, so that each of its huge pages can be one, or null when the system has no
    /// memory to give.
    fn map_once(length: usize) -> *mut u8 {
        // Over-map by a huge page less a page, then unmap the head and tail around the aligned
        // start: the kernel aligns large mappings itself only in some versions.
        let span = length + HUGE_BLOCK - page();
        // SAFETY: a new private anonymous mapping, at an address the kernel chooses.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        let base = base as usize;
        let start = base.next_multiple_of(HUGE_BLOCK);
        let (head, tail) = (start - base, base + span - (start + length));
        // SAFETY: the head and tail are the parts of the new mapping outside [start, start +
        // length), which nothing refers to. Failing to unmap them leaks address space only.
        unsafe {
            if head > 0 {
                libc::munmap(base as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((start + length) as *mut libc::c_void, tail);
            }
            // Only a hint: without transparent huge pages the block is small pages, as before.
            libc::madvise(start as *mut libc::c_void, length, libc::MADV_HUGEPAGE);
        }
        start as *mut u8
    }

    /// # Safety
    /// `ptr` is a mapping of `length` bytes made by [`map`] or [`remap`], not used after this.
    unsafe fn unmap(ptr: *mut u8, length: usize) {
        // SAFETY: the caller's mapping.
        unsafe { libc::munmap(ptr.cast(), length) };
    }

    /// The mapping `ptr` of `size` bytes grown or shrunk to `new_size`: in place if it can be,
    /// else moved to a new huge-page-aligned mapping (its pages move with it, uncopied); or null
    /// with the old mapping kept.
    ///
    /// # Safety
    /// `ptr` is a mapping of `mapped_length(size)` bytes made by [`map`] or [`remap`].
    unsafe fn remap(ptr: *mut u8, size: usize, new_size: usize) -> *mut u8 {
        let (old, new) = (mapped_length(size), mapped_length(new_size));
        if old == new {
            return ptr;
        }
        // SAFETY: the caller's mapping of `old` bytes. In place (a shrink always is), it keeps
        // its aligned start and its huge-page advice.
        let resized = unsafe { libc::mremap(ptr.cast(), old, new, 0) };
        if resized != libc::MAP_FAILED {
            return resized.cast();
        }
        let destination = map(new);
        if destination.is_null() {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's mapping moved over the new one, which nothing else refers to.
        let moved = unsafe {
            libc::mremap(
                ptr.cast(),
                old,
                new,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                destination as *mut libc::c_void,
            )
        };
        if moved == libc::MAP_FAILED {
            // SAFETY: the new mapping, unused.
            unsafe { unmap(destination, new) };
            return std::ptr::null_mut();
        }
        moved.cast()
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    use std::sync::Mutex;

    use super::huge_pages::{HUGE_BLOCK, page};
    use super::*;

    /// The kept blocks are the process's: one test at a time takes and gives them.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    /// The `VmFlags` line of the mapping that holds `address`, from `/proc/self/smaps`.
    fn flags_of_mapping(address: usize) -> String {
        line_of_mapping(address, "VmFlags:")
    }

    /// What follows `field` in the `/proc/self/smaps` entry of the mapping that holds `address`.
    fn line_of_mapping(address: usize, field: &str) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((start, end)) = range.split_once('-')
                && let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                )
            {
                inside = (start..end).contains(&address);
            } else if inside && let Some(rest) = line.strip_prefix(field) {
                return rest.to_string();
            }
        }
        panic!("no mapping holds {address:#x}");
    }

    #[test]
    fn a_read_buffer_of_a_huge_page_or_more_is_advised_for_huge_pages_and_populated() {
        let len = 3 * HUGE_BLOCK + 12_288;
        let buffer = read_buffers::map(len);
        assert_eq!(buffer.len(), len);
        assert_eq!(buffer.as_ptr() as usize % page(), 0, "aligned for O_DIRECT");
        let address = buffer.as_ptr() as usize;
        if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            let flags = flags_of_mapping(address);
            assert!(flags.contains(" hg"), "advised for huge pages: {flags}");
        }
        let resident_kb: usize = line_of_mapping(address, "Rss:")
            .trim()
            .trim_end_matches(" kB")
            .parse()
            .unwrap();
        assert!(
            resident_kb * 1024 >= len,
            "populated: {resident_kb} kB resident"
        );
        let small = read_buffers::map(HUGE_BLOCK - page());
        let flags = flags_of_mapping(small.as_ptr() as usize);
        assert!(!flags.contains(" hg"), "smaller ones are not: {flags}");
    }

    #[test]
    fn a_large_block_is_its_own_huge_page_aligned_mapping_and_keeps_its_contents() {
        let _alone = crate::lock::recover(ONE_AT_A_TIME.lock());
        let allocator = HugePageBlocks;
        let layout = Layout::from_size_align(3 * HUGE_BLOCK + 100, 8).unwrap();
        // SAFETY: a valid layout; every block is written within its size and freed once.
        unsafe {
            let block = allocator.alloc_zeroed(layout);
            assert!(!block.is_null());
            assert_eq!(block as usize % HUGE_BLOCK, 0, "aligned to a huge page");
            let values = std::slice::from_raw_parts_mut(block, layout.size());
            assert!(values.iter().all(|&b| b == 0), "a zeroed block reads zeros");
            values
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = i as u8);
            if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
                let flags = flags_of_mapping(block as usize);
                assert!(flags.contains(" hg"), "advised for huge pages: {flags}");
            }
            // Grown in place or moved, still aligned; shrunk below the threshold: the contents
            // follow.
            let grown = allocator.realloc(block, layout, 5 * HUGE_BLOCK);
            assert!(!grown.is_null());
            assert_eq!(
                grown as usize % HUGE_BLOCK,
                0,
                "still aligned to a huge page"
            );
            let grown_layout = Layout::from_size_align(5 * HUGE_BLOCK, 8).unwrap();
            let small = allocator.realloc(grown, grown_layout, 1000);
            assert!(!small.is_null());
            let kept = std::slice::from_raw_parts(small, 1000);
            assert!(kept.iter().enumerate().all(|(i, &b)| b == i as u8));
            // And back above it.
            let small_layout = Layout::from_size_align(1000, 8).unwrap();
            let large = allocator.realloc(small, small_layout, HUGE_BLOCK);
            assert!(!large.is_null());
            let kept = std::slice::from_raw_parts(large, 1000);
            assert!(kept.iter().enumerate().all(|(i, &b)| b == i as u8));
            allocator.dealloc(large, Layout::from_size_align(HUGE_BLOCK, 8).unwrap());
        }
    }

    #[test]
    fn small_blocks_and_overaligned_ones_are_the_systems() {
        let small = Layout::from_size_align(HUGE_BLOCK - 1, 8).unwrap();
        let aligned = Layout::from_size_align(HUGE_BLOCK, 2 * page()).unwrap();
        assert!(!HugePageBlocks::maps(small));
        assert!(!HugePageBlocks::maps(aligned));
        assert!(HugePageBlocks::maps(
            Layout::from_size_align(HUGE_BLOCK, 64).unwrap()
        ));
    }

    #[test]
    fn a_freed_block_is_reused_by_the_next_of_its_size_and_zeroed_when_asked() {
        let _alone = crate::lock::recover(ONE_AT_A_TIME.lock());
        let allocator = HugePageBlocks;
        // A size no other test uses: the kept blocks are the process's.
        let layout = Layout::from_size_align(HUGE_BLOCK + 3 * page(), 8).unwrap();
        // SAFETY: a valid layout; every block is written within its size and freed once.
        unsafe {
            let first = allocator.alloc(layout);
            first.write_bytes(7, layout.size());
            allocator.dealloc(first, layout);
            let again = allocator.alloc_zeroed(layout);
            assert_eq!(again, first, "the kept block is reused");
            let values = std::slice::from_raw_parts(again, layout.size());
            assert!(values.iter().all(|&b| b == 0), "and zeroed, as asked");
            again.write_bytes(9, layout.size());
            allocator.dealloc(again, layout);
            give_back();
            let fresh = allocator.alloc(layout);
            let values = std::slice::from_raw_parts(fresh, layout.size());
            assert!(
                values.iter().all(|&b| b == 0),
                "after give_back, a fresh mapping"
            );
            allocator.dealloc(fresh, layout);
        }
    }
}

#[cfg(test)]
mod read_buffer_tests {
    use super::read_buffers;

    const PAGE_4K: usize = 4096;

    #[test]
    fn read_buffers_are_kept_for_the_next_read_best_fit_and_bounded() {
        let mut kept = read_buffers::Kept(Vec::new());
        let [small, large] = [PAGE_4K, 4 * PAGE_4K].map(read_buffers::map);
        let (small_at, large_at) = (small.as_ptr(), large.as_ptr());
        kept.put(large);
        kept.put(small);
        assert!(kept.take(5 * PAGE_4K).is_none(), "none large enough");
        let fit = kept.take(PAGE_4K / 2).unwrap();
        assert_eq!(fit.as_ptr(), small_at, "the smallest that fits");
        assert_eq!(kept.take(2 * PAGE_4K).unwrap().as_ptr(), large_at);
        assert!(kept.take(1).is_none());
        kept.put(read_buffers::map(read_buffers::LARGEST + 1));
        assert!(
            kept.0.is_empty(),
            "a buffer over the largest kept is not kept"
        );
        kept.put(read_buffers::map(1 << 20));
        assert!(
            kept.take(256 << 10).is_none(),
            "a buffer four times too long is not taken"
        );
        assert!(
            kept.take((1 << 20) - read_buffers::SLACK - 1).is_none(),
            "nor one a byte longer than the slack allows"
        );
        assert!(
            kept.take((1 << 20) - read_buffers::SLACK).is_some(),
            "one as long as it allows is"
        );
        for _ in 0..read_buffers::MOST_BUFFERS + 4 {
            kept.put(read_buffers::map(PAGE_4K));
        }
        let newest = read_buffers::map(2 * PAGE_4K);
        let newest_at = newest.as_ptr();
        kept.put(newest);
        assert_eq!(
            kept.0.len(),
            read_buffers::MOST_BUFFERS,
            "at most so many are kept"
        );
        let taken = kept.take(2 * PAGE_4K).unwrap();
        assert_eq!(
            taken.as_ptr(),
            newest_at,
            "the newest stays: the buffers kept longest are unmapped first"
        );
    }
}
