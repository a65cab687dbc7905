//! A file appended to through a shared mapping of the part of it being written, for the capture:
//! an append is a copy into the page cache, not a `write(2)`. What was copied is the kernel's as
//! soon as the copy ends, so a crash or SIGKILL of the shim loses nothing copied before it, as with
//! a `write(2)`.
//!
//! On this 2-core VM a `write(2)` of a small request's record cost about 2 us of the shim's CPU,
//! most of it in ext4's write path: three quarters of what the capture cost. Through the mapping,
//! the capture's share of the shim's CPU under `wrk` fell from 13% to 8% (`perf record`), and its
//! CPU per small request from +5.5 to +2.3 us (`bench/cost.sh`, 6 interleaved pairs).
//!
//! - **Windows.** The file is extended one window at a time (256 KiB, or less for a small
//!   `--capture-max`) by writing zeros past what was appended, in one `pwrite(2)`: that puts the
//!   pages in the page cache and reserves their blocks, so a full disk is an error from that write,
//!   never a SIGBUS at a page fault. The window is then mapped and made writable in one
//!   `madvise(MADV_POPULATE_WRITE)`. (Mapped over blocks from `fallocate(2)` instead, every page was
//!   read in as zeros at its first fault, and the capture cost 11% of the CPU.) An append that does
//!   not fit in a window, or is larger than a quarter of one, is written with `pwrite(2)`.
//! - **Closing** cuts the file to what was written. After a crash the file ends in the zeros of its
//!   last window, which the reader skips.
//! - **Truncation by someone else** (`truncate -s 0`, `: > file`) would make the next copy into the
//!   mapping fault with SIGBUS and kill the process. A SIGBUS handler catches faults inside a
//!   window: it maps anonymous memory over the window, so that the copy completes into memory that
//!   is thrown away, and marks the window. The append then reports the file as truncated and the
//!   capture starts a new file. A SIGBUS anywhere else goes to the handler that was there before
//!   (Rust's own, for stack overflows), or to the default action.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Once;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The largest window.
const WINDOW: usize = 256 << 10;

/// Windows that may be mapped at once in the process (one per capture file being written).
const SLOTS: usize = 16;

/// Each slot: the window's address and length (0 when free), and whether a SIGBUS hit it.
static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static LENS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static HIT: [AtomicBool; SLOTS] = [const { AtomicBool::new(false) }; SLOTS];
static TAKEN: [AtomicBool; SLOTS] = [const { AtomicBool::new(false) }; SLOTS];

/// The SIGBUS action that was there before ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// What happened to an append.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("the file was truncated by another program while it was written")]
    Truncated,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A file being appended to.
#[derive(Debug)]
pub struct MappedFile {
    file: File,
    /// Bytes appended.
    len: u64,
    /// No window goes past this (rounded up to a page): the file's apparent size stays within what
    /// it is meant to grow to.
    limit: u64,
    window: Option<Window>,
    slot: Option<usize>,
}

#[derive(Debug)]
struct Window {
    ptr: *mut u8,
    /// The window's offset in the file.
    start: u64,
    len: usize,
}

// The window is written only through `&mut MappedFile`.
unsafe impl Send for MappedFile {}

impl MappedFile {
    /// Appends to `file` (opened for reading and writing, empty), which is meant to grow to about
    /// `limit` bytes.
    pub fn new(file: File, limit: u64) -> MappedFile {
        install_handler();
        let slot = (0..SLOTS).find(|&i| {
            TAKEN[i]
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        });
        MappedFile {
            file,
            len: 0,
            limit,
            window: None,
            slot,
        }
    }

    /// Bytes appended so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `bytes`.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), AppendError> {
        let (len, end) = (self.len, self.len + bytes.len() as u64);
        let fits = move |w: &Window| w.start <= len && end <= w.start + w.len as u64;
        if self.window.as_ref().is_none_or(|w| !fits(w)) {
            self.unmap();
            if bytes.len() <= WINDOW / 4 {
                self.map()?;
            }
        }
        match (&self.window, self.slot) {
            (Some(w), Some(slot)) if fits(w) => {
                let at = (self.len - w.start) as usize;
                // SAFETY: `at + bytes.len() <= w.len` (`fits`), the window is mapped writable and
                // only this `&mut self` writes to it. A fault from a truncated file is turned into
                // a write to anonymous memory by `on_sigbus`.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), w.ptr.add(at), bytes.len())
                };
                if HIT[slot].load(Ordering::Acquire) {
                    return Err(AppendError::Truncated);
                }
            }
            // (Written past the end of a file truncated meanwhile, it leaves zeros before it,
            // which the reader skips.)
            _ => self.file.write_all_at(bytes, self.len)?,
        }
        self.len = end;
        Ok(())
    }

    /// Maps the window from the page `len` is in, as far as the limit allows, after giving the file
    /// its blocks. Leaves no window when the limit leaves no room for one.
    fn map(&mut self) -> io::Result<()> {
        let page = page_size() as u64;
        let start = self.len / page * page;
        let limit = self.limit.div_ceil(page) * page;
        let len = WINDOW.min(limit.saturating_sub(start) as usize);
        if len == 0 || self.slot.is_none() {
            return Ok(());
        }
        // The window's pages are put in the page cache by writing zeros past what was appended, in
        // one call: mapped and written without this, each page was read in (as zeros) first.
        // (Zeroed memory from the allocator: its pages are the kernel's zero page until written.)
        static ZEROS: std::sync::LazyLock<Box<[u8]>> =
            std::sync::LazyLock::new(|| vec![0; WINDOW].into_boxed_slice());
        let written = (self.len - start) as usize;
        self.file.write_all_at(&ZEROS[written..len], self.len)?;
        let fd = self.file.as_raw_fd();
        // SAFETY: as above; the mapping is unmapped before the file is dropped.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                start as i64,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Every page of the window made writable in one call, rather than by a fault at the first
        // copy into each (a fault per 4 KiB, about three small records). Where the kernel cannot
        // (before Linux 5.14), the faults do it.
        // SAFETY: advice on the mapping just made.
        unsafe { libc::madvise(ptr, len, libc::MADV_POPULATE_WRITE) };
        let slot = self.slot.expect("checked above");
        HIT[slot].store(false, Ordering::Release);
        LENS[slot].store(0, Ordering::Release);
        STARTS[slot].store(ptr as usize, Ordering::Release);
        LENS[slot].store(len, Ordering::Release);
        self.window = Some(Window {
            ptr: ptr.cast(),
            start,
            len,
        });
        Ok(())
    }

    fn unmap(&mut self) {
        if let Some(w) = self.window.take() {
            if let Some(slot) = self.slot {
                LENS[slot].store(0, Ordering::Release);
                STARTS[slot].store(0, Ordering::Release);
            }
            // SAFETY: the window was mapped by `map` with this length, and is no longer used.
            unsafe { libc::munmap(w.ptr.cast(), w.len) };
        }
    }
}

impl Drop for MappedFile {
    /// Unmaps the window and cuts the file to what was appended.
    fn drop(&mut self) {
        self.unmap();
        if let Some(slot) = self.slot {
            TAKEN[slot].store(false, Ordering::Release);
        }
        if self.file.metadata().is_ok_and(|m| m.len() > self.len) {
            let _ = self.file.set_len(self.len);
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096).max(4096)
}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: sigaction with a zeroed struct filled in; the old action is kept for chaining.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &action, &mut previous) == 0 {
                let _ = PREVIOUS.set(previous);
            }
        }
    });
}

/// The SIGBUS handler. Only async-signal-safe work: atomics, `mmap`, `sigaction`.
extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in 0..SLOTS {
        let start = STARTS[slot].load(Ordering::Acquire);
        let len = LENS[slot].load(Ordering::Acquire);
        if len != 0 && (start..start + len).contains(&addr) {
            // SAFETY: replaces the window, which only its writer (the faulting thread) uses.
            let ptr = unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if ptr != libc::MAP_FAILED {
                HIT[slot].store(true, Ordering::Release);
                return;
            }
        }
    }
    // Not a window's: what would have happened without this handler.
    match PREVIOUS.get() {
        Some(previous)
            if previous.sa_sigaction != libc::SIG_DFL && previous.sa_sigaction != libc::SIG_IGN =>
        {
            if previous.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: an SA_SIGINFO handler has this signature.
                let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(previous.sa_sigaction) };
                handler(signal, info, context);
            } else {
                // SAFETY: a plain handler has this signature.
                let handler: extern "C" fn(libc::c_int) =
                    unsafe { std::mem::transmute(previous.sa_sigaction) };
                handler(signal);
            }
        }
        _ => {
            // SAFETY: resets SIGBUS to its default action; returning re-runs the faulting access,
            // which then ends the process as it would have without this handler.
            unsafe {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(name: &str) -> (std::path::PathBuf, File) {
        let dir = std::env::temp_dir().join(format!("glance-shim-mapped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    #[test]
    fn appends_across_windows_and_large_ones_read_back_and_the_file_is_cut_at_close() {
        let (path, file) = open("appends");
        let mut f = MappedFile::new(file, 1 << 30);
        let mut expected = Vec::new();
        for i in 0..3000u32 {
            let len = [10, 1500, 40_000, 100_000][i as usize % 4] + i as usize % 7;
            let record: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
            f.append(&record).unwrap();
            expected.extend_from_slice(&record);
        }
        assert_eq!(f.len(), expected.len() as u64);
        // The last window's zeros are there until the file is closed.
        assert!(std::fs::metadata(&path).unwrap().len() >= expected.len() as u64);
        drop(f);
        assert!(std::fs::read(&path).unwrap() == expected);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn windows_stay_within_the_limit() {
        let (path, file) = open("limit");
        let mut f = MappedFile::new(file, 8192);
        f.append(&[1; 100]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192);
        f.append(&[2; 9000]).unwrap();
        f.append(&[3; 100]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 9200);
        drop(f);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_file_truncated_by_someone_else_is_reported_not_a_sigbus() {
        let (path, file) = open("truncated");
        let mut f = MappedFile::new(file, 1 << 30);
        f.append(&[b'x'; 10_000]).unwrap();
        // `truncate -s 0` by another program, with the window still mapped.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        let mut result = Ok(());
        for _ in 0..100 {
            result = f.append(&[b'y'; 1000]);
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(AppendError::Truncated)), "{result:?}");
        drop(f);
        std::fs::remove_file(&path).unwrap();
    }
}
