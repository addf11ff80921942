//! Reading expert bytes: large explicit reads (`pread`), bypassing the page cache where the
//! platform allows so that the store's working set is the only copy in memory.
//!
//! Platform code stays here and small: Linux uses O_DIRECT with aligned buffers (falling back to a
//! buffered read followed by `posix_fadvise(DONTNEED)` where O_DIRECT is refused, as on tmpfs);
//! macOS uses `F_NOCACHE`.

use std::fs::File;
use std::path::Path;

use crate::allocator::read_buffers;

/// Alignment O_DIRECT needs for buffer address, offset and length.
pub const DIRECT_ALIGN: usize = 4096;

/// How one read goes: whole, in one call, or, for a guess, in pieces with a question before
/// each.
#[derive(Clone, Copy)]
pub enum Pace<'a> {
    Whole,
    /// Asked, with the bytes left, what to do: the asker may wait first (while demand reads
    /// need the disk).
    Pieces(&'a (dyn Fn(usize) -> Next + Sync)),
}

/// What a read in pieces does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// A piece of this many bytes, at most those left: [`PIECE`] or [`WIDE_PIECE`] for a
    /// store.
    Piece(usize),
    /// The rest at once: the read is needed now.
    Rest,
    GiveUp,
}

/// A guess's read piece: a demand read that comes while guesses are read waits at most this
/// long behind each (0.2 ms at 1.3 GB/s), and a guess shown wrong stops within it.
pub const PIECE: usize = 256 << 10;

/// A guess's read piece while guesses are nearly always right and several are read at once
/// (`store::width`): misses are rare then, and larger pieces keep the disk busier. With every
/// guess right, four layers ahead, 1 MiB pieces decoded 1.37-1.48x as fast as no prefetch
/// where 256 KiB pieces did 1.27-1.28x (skewed 18-layer qwen3moe at a 2 GB limit, two rounds).
pub const WIDE_PIECE: usize = 1 << 20;

/// The message of a read given up between pieces.
pub const GIVEN_UP: &str = "read given up: the guess was wrong";

/// A buffer aligned to [`DIRECT_ALIGN`], in pages of its own (an anonymous mapping). From the
/// heap, each aligned temporary left slack beside the experts copied out of it: resident memory
/// grew 1.14x what the store counts for Q4_K experts of 108 KiB (`engine/tests/expert_memory.rs`).
/// Dropped, it is kept for the next read (see [`read_buffers`]).
pub struct AlignedBuf {
    /// Always `Some` until dropped, when the mapping goes back to [`read_buffers`].
    map: Option<memmap2::MmapMut>,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` bytes for a read to fill: a kept one, holding an earlier read's bytes,
    /// when one is large enough and not much larger, else a new mapping.
    fn for_read(len: usize) -> Self {
        let map = read_buffers::take(len).unwrap_or_else(|| read_buffers::map(len));
        Self {
            map: Some(map),
            len,
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(map) = self.map.take() {
            read_buffers::put(map);
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map.as_ref().expect("mapped until dropped")[..self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.map.as_mut().expect("mapped until dropped")[..self.len]
    }
}

/// Reads `len` bytes at `offset` of `path` into an aligned buffer with explicit reads (one, or
/// one a piece). `offset` and `len` must be multiples of [`DIRECT_ALIGN`] when `bypass_cache`
/// is set.
pub fn read_aligned(
    path: &Path,
    offset: u64,
    len: usize,
    bypass_cache: bool,
    pace: Pace,
) -> std::io::Result<AlignedBuf> {
    let mut buf = AlignedBuf::for_read(len);
    let (file, direct) = platform::open(path, bypass_cache)?;
    read_exact_at(&file, &mut buf, offset, pace)?;
    if bypass_cache && !direct {
        platform::drop_cached(&file, offset, len as u64);
    }
    Ok(buf)
}

/// Opens `path` for [`read_range`]: with O_DIRECT when `bypass_cache` asks and the filesystem
/// allows; says whether it is direct.
pub fn open_for_ranges(path: &Path, bypass_cache: bool) -> std::io::Result<(File, bool)> {
    platform::open(path, bypass_cache)
}

/// Opens `path` for buffered reads ([`read_at`]); with `bypass_cache`, macOS keeps even the
/// first read out of its buffer cache (F_NOCACHE is set here, not after a read), and Linux
/// drops each read's pages once done.
pub fn open_buffered(path: &Path, bypass_cache: bool) -> std::io::Result<File> {
    let file = File::open(path)?;
    #[cfg(target_os = "macos")]
    if bypass_cache {
        platform::no_cache(&file);
    }
    #[cfg(not(target_os = "macos"))]
    let _ = bypass_cache;
    Ok(file)
}

/// Reads `len` bytes at any `offset` of a file from [`open_for_ranges`]. A direct file is read
/// over the aligned blocks around the range (at most two blocks more); otherwise the read is
/// buffered and, with `bypass_cache`, dropped from the page cache after. Returns the buffer and
/// where the range starts in it.
pub fn read_range(
    file: &File,
    direct: bool,
    offset: u64,
    len: usize,
    bypass_cache: bool,
    pace: Pace,
) -> std::io::Result<(AlignedBuf, usize)> {
    if !direct {
        let mut buf = AlignedBuf::for_read(len);
        read_exact_at(file, &mut buf, offset, pace)?;
        if bypass_cache {
            platform::drop_cached(file, offset, len as u64);
        }
        return Ok((buf, 0));
    }
    let align = DIRECT_ALIGN as u64;
    let start = offset / align * align;
    let end = (offset + len as u64).next_multiple_of(align);
    let mut buf = AlignedBuf::for_read((end - start) as usize);
    // The last block may run past the end of the file: a short read there is expected.
    let filled = fill(file, &mut buf, start, pace)?;
    let skip = (offset - start) as usize;
    if filled < skip + len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{len} bytes at {offset}: the file ends first"),
        ));
    }
    Ok((buf, skip))
}

/// Reads `len` bytes at `offset` (no alignment needed) and drops them from the page cache after.
pub fn read_at(
    file: &File,
    offset: u64,
    len: usize,
    bypass_cache: bool,
    pace: Pace,
) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    read_exact_at(file, &mut buf, offset, pace)?;
    if bypass_cache {
        platform::drop_cached(file, offset, len as u64);
    }
    Ok(buf)
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64, pace: Pace) -> std::io::Result<()> {
    if fill(file, buf, offset, pace)? < buf.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{} bytes at {offset}: the file ends first", buf.len()),
        ));
    }
    Ok(())
}

/// Reads into `buf` from `offset` as `pace` says, until it is full or the file ends; returns
/// the bytes read.
fn fill(file: &File, buf: &mut [u8], offset: u64, pace: Pace) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut whole = matches!(pace, Pace::Whole);
    let mut filled = 0;
    while filled < buf.len() {
        let mut end = buf.len();
        if let (false, Pace::Pieces(next)) = (whole, pace) {
            match next(buf.len() - filled) {
                Next::Piece(piece) => end = filled + piece.clamp(1, buf.len() - filled),
                Next::Rest => whole = true,
                Next::GiveUp => return Err(std::io::Error::other(GIVEN_UP)),
            }
        }
        match file.read_at(&mut buf[filled..end], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Lowers the calling thread's CPU priority, for threads whose work can wait (guesses' reads).
pub fn lower_thread_priority() {
    platform::lower_thread_priority();
}

/// Lets the calling thread, and the threads it starts, take a core as soon as they wake: for
/// threads that start reads and hand their bytes on, which a layer's compute waits for (see
/// the platform's [`platform::wake_promptly`]). Returns whether the scheduler took it.
pub fn wake_promptly() -> bool {
    platform::wake_promptly()
}

#[cfg(target_os = "linux")]
mod platform {
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Path;

    use nix::fcntl::{OFlag, PosixFadviseAdvice, posix_fadvise};

    /// Opens for reading, with O_DIRECT when asked and supported; says whether it is direct.
    pub fn open(path: &Path, bypass_cache: bool) -> std::io::Result<(File, bool)> {
        if bypass_cache {
            match OpenOptions::new()
                .read(true)
                .custom_flags(OFlag::O_DIRECT.bits())
                .open(path)
            {
                Ok(file) => return Ok((file, true)),
                // EINVAL: the filesystem refuses O_DIRECT (tmpfs); read buffered and advise.
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((File::open(path)?, false))
    }

    /// Asks the kernel to drop a range from the page cache; advice only, so failure is ignored.
    pub fn drop_cached(file: &File, offset: u64, len: u64) {
        let _ = posix_fadvise(
            file,
            offset as i64,
            len as i64,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }

    /// The scheduler's shortest slice, 0.1 ms, for the calling thread (threads it starts
    /// inherit it). Since Linux 6.12 a waking thread whose slice is shorter than the running
    /// one's preempts it at once (`PREEMPT_SHORT`). Without it, a read's thread that woke while
    /// both cores computed a layer waited out the layer thread's slice: 0.47 ms on average at a
    /// 2 GB limit (`perf sched latency`), 0.10 ms with it, and decode from the page cache went
    /// from 31 to 35 tok/s. Its nice value is kept. Older kernels ignore the slice.
    pub fn wake_promptly() -> bool {
        // SAFETY: getpriority reads the calling thread's nice value; sched_setattr changes only
        // the calling thread's (tid 0) scheduling, from a zeroed, fully sized attribute.
        unsafe {
            let nice = nix::libc::getpriority(nix::libc::PRIO_PROCESS, 0);
            let mut attr: nix::libc::sched_attr = std::mem::zeroed();
            attr.size = std::mem::size_of::<nix::libc::sched_attr>() as u32;
            attr.sched_policy = nix::libc::SCHED_OTHER as u32;
            attr.sched_nice = nice;
            attr.sched_runtime = SHORTEST_SLICE_NS;
            let attr: *const nix::libc::sched_attr = &attr;
            nix::libc::syscall(nix::libc::SYS_sched_setattr, 0, attr, 0) == 0
        }
    }

    /// The shortest slice Linux grants a thread of the fair class.
    pub const SHORTEST_SLICE_NS: u64 = 100_000;

    /// The calling thread's nice value 10 higher (a nice value is a thread's own on Linux): the
    /// scheduler gives the layers' threads nine times its share when both want a core. Advice
    /// only.
    pub fn lower_thread_priority() {
        // SAFETY: getpriority and setpriority only read and change the calling thread's nice
        // value.
        unsafe {
            let nice = nix::libc::getpriority(nix::libc::PRIO_PROCESS, 0);
            nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, (nice + 10).min(19));
        }
    }
}

#[cfg(target_os = "macos")]
mod platform {
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::path::Path;

    /// Opens for reading; F_NOCACHE keeps the read out of the unified buffer cache.
    pub fn open(path: &Path, bypass_cache: bool) -> std::io::Result<(File, bool)> {
        let file = File::open(path)?;
        if bypass_cache {
            no_cache(&file);
        }
        Ok((file, bypass_cache))
    }

    pub fn drop_cached(file: &File, _offset: u64, _len: u64) {
        no_cache(file);
    }

    /// Keeps `file`'s reads out of the unified buffer cache from now on.
    pub fn no_cache(file: &File) {
        // SAFETY: fcntl on a descriptor we own, with an integer argument.
        unsafe { nix::libc::fcntl(file.as_raw_fd(), nix::libc::F_NOCACHE, 1) };
    }

    /// macOS has no slice to shorten: the user-interactive class, which the layers' threads
    /// have (candle's pool), so that a read's thread is not queued behind them.
    pub fn wake_promptly() -> bool {
        // SAFETY: sets only the calling thread's quality-of-service class.
        unsafe {
            nix::libc::pthread_set_qos_class_self_np(
                nix::libc::qos_class_t::QOS_CLASS_USER_INTERACTIVE,
                0,
            ) == 0
        }
    }

    /// The utility quality of service for the calling thread, below the layers' default.
    pub fn lower_thread_priority() {
        // SAFETY: sets only the calling thread's quality-of-service class.
        unsafe {
            nix::libc::pthread_set_qos_class_self_np(nix::libc::qos_class_t::QOS_CLASS_UTILITY, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_reads_return_the_file_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3 * DIRECT_ALIGN).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        for bypass in [false, true] {
            let buf = read_aligned(
                &path,
                DIRECT_ALIGN as u64,
                2 * DIRECT_ALIGN,
                bypass,
                Pace::Whole,
            )
            .unwrap();
            assert_eq!(&buf[..], &data[DIRECT_ALIGN..]);
            assert_eq!(buf.as_ptr() as usize % DIRECT_ALIGN, 0);
        }
        assert!(
            read_aligned(&path, 0, 4 * DIRECT_ALIGN, false, Pace::Whole).is_err(),
            "short file must fail"
        );
    }

    #[test]
    fn ranges_at_any_offset_return_the_file_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // Not a whole number of blocks, so the last range's block runs past the end.
        let data: Vec<u8> = (0..3 * DIRECT_ALIGN + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        for bypass in [false, true] {
            let (file, direct) = open_for_ranges(&path, bypass).unwrap();
            for (offset, len) in [
                (0, 10),
                (17, DIRECT_ALIGN),
                (4000, 200),
                (5000, data.len() - 5000),
            ] {
                let (buf, at) =
                    read_range(&file, direct, offset as u64, len, bypass, Pace::Whole).unwrap();
                assert_eq!(
                    &buf[at..at + len],
                    &data[offset..offset + len],
                    "{offset} {len}"
                );
            }
            assert!(
                read_range(&file, direct, 5000, data.len(), bypass, Pace::Whole).is_err(),
                "a range past the end must fail"
            );
        }
    }

    #[test]
    fn a_read_into_a_kept_buffer_holds_its_own_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // Over 4 MiB, a size the fixtures' reads do not take.
        let len = (4 << 20) + 3 * DIRECT_ALIGN;
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        drop(read_aligned(&path, 0, len, false, Pace::Whole).unwrap());
        std::fs::write(&path, data.iter().map(|b| !b).collect::<Vec<u8>>()).unwrap();
        // Other tests' reads may take the kept buffer first; whichever this read gets, it holds
        // this read's bytes, none of the last one's.
        let again = read_aligned(&path, 0, len, false, Pace::Whole).unwrap();
        assert!(again.iter().zip(&data).all(|(a, b)| *a == !b));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_lowered_thread_runs_at_nice_10_and_the_others_keep_theirs() {
        // SAFETY: getpriority only reads the calling thread's nice value.
        let nice = || unsafe { nix::libc::getpriority(nix::libc::PRIO_PROCESS, 0) };
        let before = nice();
        let lowered = std::thread::spawn(move || {
            lower_thread_priority();
            nice()
        });
        assert_eq!(lowered.join().unwrap(), (before + 10).min(19));
        assert_eq!(nice(), before);
    }

    /// The calling thread's slice as the scheduler reports it (`sched_getattr`).
    #[cfg(target_os = "linux")]
    fn slice_ns() -> u64 {
        // SAFETY: sched_getattr fills at most `size` bytes of the zeroed attribute, for the
        // calling thread.
        unsafe {
            let mut attr: nix::libc::sched_attr = std::mem::zeroed();
            let size = std::mem::size_of::<nix::libc::sched_attr>() as u32;
            let attr_ptr: *mut nix::libc::sched_attr = &mut attr;
            let done = nix::libc::syscall(nix::libc::SYS_sched_getattr, 0, attr_ptr, size, 0);
            assert_eq!(
                done,
                0,
                "sched_getattr: {}",
                std::io::Error::last_os_error()
            );
            attr.sched_runtime
        }
    }

    /// Whether the running kernel takes a slice per thread (Linux 6.12 and later).
    #[cfg(target_os = "linux")]
    fn kernel_takes_slices() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut numbers = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        (major, minor) >= (6, 12)
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_that_wakes_promptly_has_the_shortest_slice_and_its_threads_too() {
        // SAFETY: getpriority only reads the calling thread's nice value.
        let nice = || unsafe { nix::libc::getpriority(nix::libc::PRIO_PROCESS, 0) };
        let before = (nice(), slice_ns());
        let (taken, after, nice_after, started) = std::thread::spawn(move || {
            let taken = wake_promptly();
            let started = std::thread::spawn(slice_ns).join().unwrap();
            (taken, slice_ns(), nice(), started)
        })
        .join()
        .unwrap();
        assert!(taken, "sched_setattr refused the slice");
        assert_eq!(nice_after, before.0, "the nice value is kept");
        assert_eq!((nice(), slice_ns()), before, "other threads keep theirs");
        if !kernel_takes_slices() {
            eprintln!("this kernel has no slice per thread: only the call is checked");
            return;
        }
        assert_ne!(before.1, platform::SHORTEST_SLICE_NS);
        assert_eq!(after, platform::SHORTEST_SLICE_NS);
        assert_eq!(
            started,
            platform::SHORTEST_SLICE_NS,
            "a thread it starts inherits it"
        );
    }
}
