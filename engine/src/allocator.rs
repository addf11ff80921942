//! The binaries' global allocator: the system's, but for blocks of 2 MiB or more, which on Linux
//! are mapped on their own, aligned to a huge page and marked for transparent huge pages.
//!
//! A prompt's every step makes and drops tensors of megabytes (a 512-token prompt's hidden
//! states are 4 MiB), and the system allocator maps blocks that large afresh each time, so every
//! 4 KiB page of each is faulted in and zeroed one fault at a time. On the 2-layer Q4_K_M
//! qwen3moe that was a fifth of a 512-token prompt's time: adding two 4 MiB tensors took 12 ms.
//! With huge pages a 4 MiB block takes two faults instead of 1,024. The memory still goes back to
//! the system when the block is freed, which holding freed blocks for reuse would not do.
//!
//! Elsewhere (macOS, whose allocator keeps large blocks itself) every block is the system's.

#[cfg(target_os = "linux")]
pub use huge_pages::HugePageBlocks;
#[cfg(not(target_os = "linux"))]
pub use std::alloc::System as HugePageBlocks;

#[cfg(target_os = "linux")]
mod huge_pages {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use nix::libc;

    /// Blocks from this size on are mapped on their own: the size of an x86-64 huge page.
    pub(super) const HUGE_BLOCK: usize = 2 << 20;

    /// See the [module](super) documentation.
    pub struct HugePageBlocks;

    impl HugePageBlocks {
        /// Whether a block of `layout` is mapped on its own rather than taken from the system.
        pub(super) fn maps(layout: Layout) -> bool {
            layout.size() >= HUGE_BLOCK && layout.align() <= page()
        }
    }

    // SAFETY: blocks are the system allocator's, or whole mappings of at least `layout.size()` bytes
    // aligned to a page (which satisfies `layout.align()`), unmapped only by `dealloc` or moved by
    // `realloc`; which kind a block is follows from its layout alone.
    unsafe impl GlobalAlloc for HugePageBlocks {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if Self::maps(layout) {
                map(layout.size())
            } else {
                // SAFETY: the caller's layout, passed on.
                unsafe { System.alloc(layout) }
            }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            if Self::maps(layout) {
                // A fresh anonymous mapping reads as zeros.
                map(layout.size())
            } else {
                // SAFETY: the caller's layout, passed on.
                unsafe { System.alloc_zeroed(layout) }
            }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if Self::maps(layout) {
                // SAFETY: `ptr` is a mapping of `layout.size()` bytes made by `alloc`.
                unsafe { unmap(ptr, layout.size()) }
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

    fn mapped_length(size: usize) -> usize {
        size.next_multiple_of(page())
    }

    /// A zeroed mapping of `size` bytes that starts on a huge-page boundary (so that its every
    /// whole huge page can be one), or null when the system has no memory to give.
    fn map(size: usize) -> *mut u8 {
        let length = mapped_length(size);
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
    /// `ptr` is a mapping of `size` bytes made by [`map`] or [`remap`], not used after this.
    unsafe fn unmap(ptr: *mut u8, size: usize) {
        // SAFETY: the caller's mapping, whose length is `size` rounded as `map` rounded it.
        unsafe { libc::munmap(ptr.cast(), mapped_length(size)) };
    }

    /// The mapping `ptr` of `size` bytes grown or shrunk to `new_size`, moved if it must be (its
    /// pages move with it, uncopied), or null with the old mapping kept.
    ///
    /// # Safety
    /// `ptr` is a mapping of `size` bytes made by [`map`] or [`remap`].
    unsafe fn remap(ptr: *mut u8, size: usize, new_size: usize) -> *mut u8 {
        let (old, new) = (mapped_length(size), mapped_length(new_size));
        if old == new {
            return ptr;
        }
        // SAFETY: the caller's mapping of `old` bytes; the kernel keeps its huge-page advice.
        let moved = unsafe { libc::mremap(ptr.cast(), old, new, libc::MREMAP_MAYMOVE) };
        if moved == libc::MAP_FAILED {
            std::ptr::null_mut()
        } else {
            moved.cast()
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    use super::huge_pages::{HUGE_BLOCK, page};
    use super::*;

    /// The `VmFlags` line of the mapping that holds `address`, from `/proc/self/smaps`.
    fn flags_of_mapping(address: usize) -> String {
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
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.to_string();
            }
        }
        panic!("no mapping holds {address:#x}");
    }

    #[test]
    fn a_large_block_is_its_own_huge_page_aligned_mapping_and_keeps_its_contents() {
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
            // Grown in place or moved, shrunk below the threshold: the contents follow.
            let grown = allocator.realloc(block, layout, 5 * HUGE_BLOCK);
            let grown_layout = Layout::from_size_align(5 * HUGE_BLOCK, 8).unwrap();
            let small = allocator.realloc(grown, grown_layout, 1000);
            let kept = std::slice::from_raw_parts(small, 1000);
            assert!(kept.iter().enumerate().all(|(i, &b)| b == i as u8));
            // And back above it.
            let small_layout = Layout::from_size_align(1000, 8).unwrap();
            let large = allocator.realloc(small, small_layout, HUGE_BLOCK);
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
}
