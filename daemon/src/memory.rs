//! Memory figures of the process and the machine, and giving freed memory
//! back to the system: Linux reads `/proc` and sysconf, macOS asks the kernel
//! (`sysctl hw.memsize`, `proc_pid_rusage`).

/// The machine's physical memory in bytes, when the system says.
pub fn memory_total() -> Option<u64> {
    platform::memory_total()
}

/// The daemon's resident set size in bytes.
pub fn resident_bytes() -> Option<u64> {
    platform::resident_bytes()
}

/// Gives memory freed by evicted experts and dropped sessions back to the
/// system: glibc keeps freed heap memory for reuse until trimmed (macOS's
/// allocator returns it by itself), and the global allocator the large
/// blocks it keeps.
pub fn return_freed_memory() {
    odmoe_engine::allocator::give_back();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

#[cfg(target_os = "linux")]
mod platform {
    use nix::unistd::{SysconfVar, sysconf};

    pub fn memory_total() -> Option<u64> {
        let pages = sysconf(SysconfVar::_PHYS_PAGES).ok()??;
        u64::try_from(pages).ok()?.checked_mul(page_size()?)
    }

    /// From `/proc/self/statm` (pages).
    pub fn resident_bytes() -> Option<u64> {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        pages.checked_mul(page_size()?)
    }

    fn page_size() -> Option<u64> {
        u64::try_from(sysconf(SysconfVar::PAGE_SIZE).ok()??).ok()
    }
}

#[cfg(target_os = "macos")]
mod platform {
    use nix::libc;

    pub fn memory_total() -> Option<u64> {
        let mut bytes: u64 = 0;
        let mut size = std::mem::size_of::<u64>();
        // SAFETY: `hw.memsize` is a 64-bit integer; both pointers are to locals of the sizes
        // given, and nothing is written.
        let status = unsafe {
            libc::sysctlbyname(
                c"hw.memsize".as_ptr(),
                (&raw mut bytes).cast(),
                &mut size,
                std::ptr::null_mut(),
                0,
            )
        };
        (status == 0 && size == std::mem::size_of::<u64>()).then_some(bytes)
    }

    /// `ri_resident_size` of `proc_pid_rusage`, as `ps` shows it.
    pub fn resident_bytes() -> Option<u64> {
        let mut usage = std::mem::MaybeUninit::<libc::rusage_info_v2>::zeroed();
        // SAFETY: the kernel fills a `rusage_info_v2`, the flavour asked for, in the buffer
        // given, which has its size.
        let status = unsafe {
            libc::proc_pid_rusage(
                libc::getpid(),
                libc::RUSAGE_INFO_V2,
                usage.as_mut_ptr().cast(),
            )
        };
        // SAFETY: zeroed is a valid value of this plain struct, filled by the call.
        (status == 0).then(|| unsafe { usage.assume_init() }.ri_resident_size)
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
mod platform {
    pub fn memory_total() -> Option<u64> {
        None
    }

    pub fn resident_bytes() -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_has_memory_and_the_daemon_some_of_it() {
        let total = memory_total().expect("the machine's memory");
        let resident = resident_bytes().expect("the process's resident memory");
        assert!(resident > 0 && resident < total, "{resident} of {total}");
    }
}
