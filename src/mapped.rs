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
//! - **Windows.** The file is extended one window at a time (1 MiB, or less for a small
//!   `--capture-max`) by writing zeros past what was appended, in one `pwrite(2)`: that puts the
//!   pages in the page cache and reserves their blocks, so a full disk is an error from that write,
//!   never a SIGBUS at a page fault. The window is then mapped and made writable in one
//!   `madvise(MADV_POPULATE_WRITE)`. (Mapped over blocks from `fallocate(2)` instead, every page was
//!   read in as zeros at its first fault, and the capture cost 11% of the CPU.) An append that
//!   is larger than a quarter of a window is written with `pwrite(2)`; one that does not fit in
//!   what is left of a window goes on into the next.
//! - **Ahead.** In a tokio runtime, the next window is made ready on its blocking pool as soon as
//!   one is started (the window left is unmapped there too), so the thread that serves connections
//!   only copies: at the capture's rate under load, a window lasts about 5 ms.
//! - **Closing** cuts the file to what was written. After a crash the file ends in the zeros of its
//!   last window, which the reader skips.
//! - **Truncation by someone else** (`truncate -s 0`, `: > file`) would make the next copy into the
//!   mapping fault with SIGBUS and kill the process. A SIGBUS handler catches faults inside a
//!   window: it maps anonymous memory over the window, so that the copy completes into memory that
//!   is thrown away, and marks the window. The append then reports the file as truncated and the
//!   capture starts a new file. The window made ready ahead is not made if the file has become
//!   shorter than the current window's end, since its `pwrite` would extend the file again over the
//!   truncation. (Truncated in the microseconds between that check and the `pwrite`, the truncation
//!   goes unseen: what was written before it is lost, as the truncation meant, and the records go
//!   on after a run of zeros.) A SIGBUS anywhere else goes to the handler that was there before
//!   (Rust's own, for stack overflows), or to the default action.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Once;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};

/// The largest window. ext4 puts a large `pwrite` of zeros into large folios (one folio for a 1 MiB
/// write on Linux 6.18, from `/proc/kpageflags`), which cost less per page to make and to map: in a
/// script of the same calls, `pwrite`, `mmap`, `madvise` and `munmap` took 1.5 us per 4 KiB page
/// with 256 KiB windows and 1.1 us with 1 MiB ones (0.9 us with 2 MiB). Under `bench/cost.sh`'s load
/// with `--capture`, 1 MiB windows took 3.3 us less CPU per small request than 256 KiB ones and
/// 2 MiB windows 2.65 us less (8 interleaved rounds, on a day when the capture cost 4.5-6.5 us per
/// request with 256 KiB windows); in one `bench/run.py --runs 5` with both builds, the capture kept
/// 0.81x of the small-request req/s at c16 against 0.67x. Mapped, a window and the one made ready
/// ahead add up to 2 MiB of page cache to the shim's RSS.
const WINDOW: usize = 1 << 20;

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
    file: Arc<File>,
    /// Bytes appended.
    len: u64,
    /// No window goes past this (rounded up to a page): the file's apparent size stays within what
    /// it is meant to grow to.
    limit: u64,
    window: Option<Window>,
    /// The window after this one, being made ready on another thread.
    next: Option<mpsc::Receiver<io::Result<Window>>>,
    slot: Option<usize>,
}

#[derive(Debug)]
struct Window {
    ptr: *mut u8,
    /// The window's offset in the file.
    start: u64,
    len: usize,
}

impl Window {
    fn end(&self) -> u64 {
        self.start + self.len as u64
    }
}

// A window is written only through `&mut MappedFile`; one being made ready is not written.
unsafe impl Send for MappedFile {}
unsafe impl Send for Window {}

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
            file: Arc::new(file),
            len: 0,
            limit: limit.div_ceil(page_size() as u64) * page_size() as u64,
            window: None,
            next: None,
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

    /// Appends `bytes`: copied into the window, and on into the next one where it ends.
    pub fn append(&mut self, mut bytes: &[u8]) -> Result<(), AppendError> {
        if bytes.len() > WINDOW / 4 || self.slot.is_none() {
            // Written past the end of a file truncated meanwhile, it leaves zeros before it, which
            // the reader skips.
            self.unmap_all();
            self.file.write_all_at(bytes, self.len)?;
            self.len += bytes.len() as u64;
            return Ok(());
        }
        while !bytes.is_empty() {
            if self.window.as_ref().is_none_or(|w| self.len >= w.end()) {
                self.advance()?;
            }
            let Some(w) = &self.window else {
                // The limit leaves no room for a window.
                self.file.write_all_at(bytes, self.len)?;
                self.len += bytes.len() as u64;
                return Ok(());
            };
            let at = (self.len - w.start) as usize;
            let n = bytes.len().min(w.len - at);
            // SAFETY: `at + n <= w.len`, the window is mapped writable and only this `&mut self`
            // writes to it. A fault from a truncated file is turned into a write to anonymous
            // memory by `on_sigbus`.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), w.ptr.add(at), n) };
            if self
                .slot
                .is_some_and(|slot| HIT[slot].load(Ordering::Acquire))
            {
                return Err(AppendError::Truncated);
            }
            self.len += n as u64;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Moves to the window from the page `len` is in: the one made ready meanwhile if there is one,
    /// else one made ready now. Then has the one after it made ready on tokio's blocking pool,
    /// which also unmaps the window left: the serving thread only copies. (Made ready and unmapped
    /// on the serving thread, the `pwrite`, `madvise`, `mmap` and `munmap` of each window were 2.9%
    /// of its time under `bench/cost.sh`'s load; made ready ahead, the capture's share of that
    /// thread fell from 6.8% to 4.3% (`perf`), and req/s with `--capture` rose 2% (`bench/cost.sh`,
    /// 12 interleaved pairs of the two builds).)
    fn advance(&mut self) -> Result<(), AppendError> {
        let left = self.window.take();
        self.forget_window();
        let page = page_size() as u64;
        let start = self.len / page * page;
        let ready = match self.next.take().map(|next| next.recv()) {
            Some(Ok(Ok(w))) if w.start == start => Some(w),
            // Truncated before the window ahead was made, and not seen by a copy since.
            Some(Ok(Err(e))) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(AppendError::Truncated);
            }
            Some(Ok(Err(e))) => return Err(e.into()),
            // Not the window needed, or the pool did not run the job (the runtime is stopping).
            Some(Ok(Ok(_)) | Err(mpsc::RecvError)) | None => None,
        };
        let window = match ready {
            Some(w) => Some(w),
            None => prepare(&self.file, start, self.len, self.limit)?,
        };
        let Some(window) = window else {
            return Ok(());
        };
        let slot = self.slot.expect("appends without a slot use pwrite");
        HIT[slot].store(false, Ordering::Release);
        LENS[slot].store(0, Ordering::Release);
        STARTS[slot].store(window.ptr as usize, Ordering::Release);
        LENS[slot].store(window.len, Ordering::Release);
        let following = window.end();
        self.window = Some(window);
        let runtime = tokio::runtime::Handle::try_current();
        match runtime {
            Ok(runtime) if following < self.limit => {
                let (tell, next) = mpsc::sync_channel(1);
                let (file, limit) = (self.file.clone(), self.limit);
                drop(runtime.spawn_blocking(move || {
                    drop(left);
                    // Truncated meanwhile: the current window's next copy faults and says so.
                    let ready = match file.metadata() {
                        Ok(m) if m.len() < following => Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the capture file was truncated by another program",
                        )),
                        _ => prepare(&file, following, following, limit)
                            .map(|w| w.expect("below the limit")),
                    };
                    let _ = tell.send(ready);
                }));
                self.next = Some(next);
            }
            _ => drop(left),
        }
        Ok(())
    }

    /// The window is no longer written: a SIGBUS in it is no longer ours to catch.
    fn forget_window(&mut self) {
        if let Some(slot) = self.slot {
            LENS[slot].store(0, Ordering::Release);
            STARTS[slot].store(0, Ordering::Release);
        }
    }

    /// Unmaps the window and the one being made ready (waiting for it).
    fn unmap_all(&mut self) {
        self.forget_window();
        self.window = None;
        if let Some(next) = self.next.take() {
            drop(next.recv());
        }
    }
}

/// Makes the window from `start` (a page boundary) ready for copies from `from`, as far as `limit`
/// allows: gives the file its blocks and pages by writing zeros from `from` to the window's end, in
/// one call (mapped and written without this, each page was read in, as zeros, first), maps it,
/// and makes every page writable in one `madvise(MADV_POPULATE_WRITE)`, rather than by a fault at
/// the first copy into each (where the kernel cannot, before Linux 5.14, the faults do it).
/// `None` when the limit leaves no room.
fn prepare(file: &File, start: u64, from: u64, limit: u64) -> io::Result<Option<Window>> {
    let len = WINDOW.min(limit.saturating_sub(start) as usize);
    if len == 0 {
        return Ok(None);
    }
    // (Zeroed memory from the allocator: its pages are the kernel's zero page until written.)
    static ZEROS: std::sync::LazyLock<Box<[u8]>> =
        std::sync::LazyLock::new(|| vec![0; WINDOW].into_boxed_slice());
    file.write_all_at(&ZEROS[(from - start) as usize..len], from)?;
    // SAFETY: a new shared mapping of the file's pages; unmapped before the file is dropped.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            start as i64,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: advice on the mapping just made.
    unsafe { libc::madvise(ptr, len, libc::MADV_POPULATE_WRITE) };
    Ok(Some(Window {
        ptr: ptr.cast(),
        start,
        len,
    }))
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: the window was mapped by `prepare` with this length, and is no longer used.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl Drop for MappedFile {
    /// Unmaps the windows and cuts the file to what was appended (after the window being made
    /// ready, whose zeros would otherwise extend it again).
    fn drop(&mut self) {
        self.unmap_all();
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
        appends_read_back("appends");
    }

    /// In a runtime, each next window is made ready on its blocking pool while the one before is
    /// written: records that span two windows, and large ones written with `pwrite` between them.
    #[test]
    fn with_windows_made_ready_ahead_appends_read_back_the_same() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _in_runtime = runtime.enter();
        appends_read_back("ahead");
    }

    fn appends_read_back(name: &str) {
        let (path, file) = open(name);
        let mut f = MappedFile::new(file, 1 << 30);
        let mut expected = Vec::new();
        for i in 0..800u32 {
            let len = [10, 1500, 40_000, 300_000][i as usize % 4] + i as usize % 7;
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
