//! A capture file appended to through a ring of mapped pages beside it, for the capture: an append
//! is a copy into the page cache, not a `write(2)`. What was copied is the kernel's as soon as the
//! copy ends, so a crash or SIGKILL of the shim loses nothing copied before it, as with a
//! `write(2)`.
//!
//! On this 2-core VM a `write(2)` of a small request's record cost about 2 us of the shim's CPU,
//! most of it in ext4's write path: three quarters of what the capture cost. Through a mapping,
//! the capture's share of the shim's CPU under `wrk` fell from 13% to 8% (`perf record`), and its
//! CPU per small request from +5.5 to +2.3 us (`bench/cost.sh`, 6 interleaved pairs).
//!
//! - **The ring.** Beside `capture-….rec` is `capture-….rec.ring`: a page of header and four
//!   segments of 512 KiB, mapped once. Records are copied into the segment that stands for the
//!   part of the file being written; the header says, for each segment, where in the file it
//!   belongs and how many of its bytes are written (stored after each append, so a record torn by
//!   a crash is not counted).
//! - **Whole segments go to the file with `O_DIRECT`** on tokio's blocking pool, straight from the
//!   ring's pages to the disk: the capture takes no new page cache, and the ring's pages are used
//!   again and again. Mapping windows of the file itself instead (each made by a `pwrite` of zeros,
//!   then mapped) took a new page of memory every three small requests, which on this VM (free
//!   page reporting hands free memory back to the host) cost 3-6 us a page from one hour to the
//!   next, against 0.3 us a page for the `O_DIRECT` write. Where the filesystem has no `O_DIRECT`
//!   (tmpfs), the segment is written with a plain `pwrite`.
//! - **The segment being filled** is written to the file with a plain `pwrite` when the capture
//!   has been idle a moment, or a second has passed ([`MappedFile::flush`], called by the capture),
//!   and when the file is closed; then the ring is removed. A reader finds every record in the file
//!   but those of the last second at most, which [`overlay`] adds from the ring.
//! - **After a crash** the ring is still there: [`overlay`] lets a reader see what it holds, and
//!   [`recover`] writes it into the file (each segment where it belongs: writing one twice does no
//!   harm) and removes it.
//! - **Truncation by someone else** (`truncate -s 0`, `: > file`) of the ring would make the next
//!   copy into the mapping fault with SIGBUS and kill the process. A SIGBUS handler catches faults
//!   inside a ring: it maps anonymous memory over it, so that the copy completes into memory that
//!   is thrown away, and marks the ring. The append then reports the file as truncated and the
//!   capture starts a new file. Truncating the `.rec` file itself drops what it held; the records
//!   written after go on at their offsets, after a run of zeros that the reader skips. A SIGBUS
//!   anywhere else goes to the handler that was there before (Rust's own, for stack overflows), or
//!   to the default action.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};

/// A segment of the ring: what goes to the file in one `O_DIRECT` write. At the capture's rate
/// under `bench/cost.sh`'s load (40 MB/s) a segment fills in 12 ms and is written in 0.3-0.5 ms.
const SEGMENT: usize = 512 << 10;

/// Segments in the ring: one being filled while the others are written.
const SEGMENTS: usize = 4;

/// The header: a magic number, then each segment's offset in the file and bytes written.
const HEADER: usize = 4096;

/// The ring file's size.
const RING: usize = HEADER + SEGMENT * SEGMENTS;

const MAGIC: u64 = u64::from_le_bytes(*b"gsring01");

/// Rings that may be mapped at once in the process (one per capture file being written).
const SLOTS: usize = 16;

/// Each slot: the ring's address and length (0 when free), and whether a SIGBUS hit it.
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

/// The ring beside `file`.
pub fn ring_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".ring");
    PathBuf::from(name)
}

/// A file being appended to.
#[derive(Debug)]
pub struct MappedFile {
    file: Arc<File>,
    /// The same file opened with `O_DIRECT`; `None` where the filesystem has none.
    direct: Option<Arc<File>>,
    /// `None` where no ring could be made (or more than [`SLOTS`] files are written at once):
    /// each append is then a `pwrite`.
    ring: Option<Ring>,
    ring_path: PathBuf,
    /// Bytes appended.
    len: u64,
    /// Where the last [`MappedFile::flush`] ended: what it wrote of the segment being filled.
    flushed: u64,
    /// Whole segments being written, each with where its result will come.
    writing: [Option<mpsc::Receiver<io::Result<()>>>; SEGMENTS],
    slot: Option<usize>,
}

#[derive(Debug)]
struct Ring {
    ptr: *mut u8,
}

impl Ring {
    /// Stores the header's word `i`, little-endian as [`segments`] reads it.
    fn set(&self, i: usize, value: u64) {
        // SAFETY: the header page is mapped for the ring's life and 8-byte aligned.
        let word = unsafe { &*self.ptr.add(8 * i).cast::<AtomicU64>() };
        word.store(value.to_le(), Ordering::Release);
    }

    fn set_offset(&self, segment: usize, offset: u64) {
        self.set(2 + 2 * segment, offset);
    }

    fn set_filled(&self, segment: usize, filled: usize) {
        self.set(3 + 2 * segment, filled as u64);
    }

    fn data(&self, segment: usize) -> *mut u8 {
        // SAFETY: within the mapping.
        unsafe { self.ptr.add(HEADER + segment * SEGMENT) }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: mapped by `MappedFile::new` with this length, and no longer used.
        unsafe { libc::munmap(self.ptr.cast(), RING) };
    }
}

// The ring is written only through `&mut MappedFile`; a segment being written to the file is not
// written to until that is done.
unsafe impl Send for MappedFile {}
unsafe impl Send for Ring {}

impl MappedFile {
    /// Appends to `file` (opened for reading and writing, empty), at `path`.
    pub fn new(file: File, path: &Path) -> MappedFile {
        install_handler();
        let ring_path = ring_path(path);
        let slot = (0..SLOTS).find(|&i| {
            TAKEN[i]
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        });
        let ring = slot.and_then(|slot| {
            let ring = make_ring(&ring_path).ok()?;
            HIT[slot].store(false, Ordering::Release);
            STARTS[slot].store(ring.ptr as usize, Ordering::Release);
            LENS[slot].store(RING, Ordering::Release);
            Some(ring)
        });
        let direct = ring.as_ref().and_then(|_| {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .ok()
                .map(Arc::new)
        });
        MappedFile {
            file: Arc::new(file),
            direct,
            ring,
            ring_path,
            len: 0,
            flushed: 0,
            writing: [const { None }; SEGMENTS],
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

    /// Appends `bytes`: copied into the ring, a segment after another.
    pub fn append(&mut self, mut bytes: &[u8]) -> Result<(), AppendError> {
        if self.ring.is_none() {
            // Written past the end of a file truncated meanwhile, it leaves zeros before it, which
            // the reader skips.
            self.file.write_all_at(bytes, self.len)?;
            self.len += bytes.len() as u64;
            return Ok(());
        }
        while !bytes.is_empty() {
            let (segment, at, start) = self.position();
            if at == 0 {
                // The segment's last round must be in the file before it is written over.
                if let Some(written) = self.writing[segment].take() {
                    written.recv().unwrap_or(Ok(()))?;
                }
            }
            let ring = self.ring.as_ref().expect("checked above");
            if at == 0 {
                ring.set_filled(segment, 0);
                ring.set_offset(segment, start);
                if self.hit() {
                    return Err(AppendError::Truncated);
                }
            }
            let n = bytes.len().min(SEGMENT - at);
            // SAFETY: `at + n <= SEGMENT`, the ring is mapped writable, only this `&mut self`
            // writes to it, and this segment is not being written to the file. A fault from a
            // truncated ring is turned into a write to anonymous memory by `on_sigbus`.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ring.data(segment).add(at), n) };
            if self.hit() {
                return Err(AppendError::Truncated);
            }
            ring.set_filled(segment, at + n);
            self.len += n as u64;
            bytes = &bytes[n..];
            if at + n == SEGMENT {
                self.write_segment(segment, start)?;
            }
        }
        Ok(())
    }

    /// Where the next byte goes: its segment, its place in it, and where that segment starts in
    /// the file.
    fn position(&self) -> (usize, usize, u64) {
        let at = (self.len % SEGMENT as u64) as usize;
        let segment = (self.len / SEGMENT as u64) as usize % SEGMENTS;
        (segment, at, self.len - at as u64)
    }

    /// Whether a SIGBUS hit the ring: someone truncated it.
    fn hit(&self) -> bool {
        self.slot
            .is_some_and(|slot| HIT[slot].load(Ordering::Acquire))
    }

    /// The ring is no longer written: a SIGBUS in it is no longer ours to catch, and its slot is
    /// free.
    fn release_slot(&mut self) {
        if let Some(slot) = self.slot.take() {
            LENS[slot].store(0, Ordering::Release);
            STARTS[slot].store(0, Ordering::Release);
            TAKEN[slot].store(false, Ordering::Release);
        }
    }

    /// Has the full `segment`, from `start` in the file, written there: on tokio's blocking pool
    /// when there is a runtime, else now.
    fn write_segment(&mut self, segment: usize, start: u64) -> io::Result<()> {
        let ring = self.ring.as_ref().expect("only with a ring");
        let (data, file, direct) = (
            ring.data(segment) as usize,
            self.file.clone(),
            self.direct.clone(),
        );
        let job = move || {
            // SAFETY: the segment stays mapped and unwritten until this job's result is taken
            // (`append` and `Drop` wait for it).
            let data = unsafe { std::slice::from_raw_parts(data as *const u8, SEGMENT) };
            write_at(&file, direct.as_deref(), data, start)
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let (tell, result) = mpsc::sync_channel(1);
                drop(runtime.spawn_blocking(move || {
                    let _ = tell.send(job());
                }));
                self.writing[segment] = Some(result);
                Ok(())
            }
            Err(_) => job(),
        }
    }

    /// Writes the segment being filled to the file, as far as it goes: a reader of the file then
    /// finds every record appended so far.
    pub fn flush(&mut self) -> io::Result<()> {
        let Some(ring) = &self.ring else {
            return Ok(());
        };
        let (segment, at, start) = self.position();
        let from = self.flushed.max(start);
        if at == 0 || from >= self.len {
            return Ok(());
        }
        // SAFETY: within the segment, which only this `&mut self` writes.
        let data = unsafe {
            std::slice::from_raw_parts(
                ring.data(segment).add((from - start) as usize),
                (self.len - from) as usize,
            )
        };
        self.file.write_all_at(data, from)?;
        self.flushed = self.len;
        Ok(())
    }

    /// The segments being written, waited for: the first failure.
    fn wait(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        for written in self.writing.iter_mut().filter_map(Option::take) {
            if let Ok(Err(e)) = written.recv()
                && result.is_ok()
            {
                result = Err(e);
            }
        }
        result
    }
}

/// Writes a whole segment at `start`: with `O_DIRECT` if the file has it, else (or if that fails)
/// through the page cache.
fn write_at(file: &File, direct: Option<&File>, data: &[u8], start: u64) -> io::Result<()> {
    if let Some(direct) = direct
        && direct.write_all_at(data, start).is_ok()
    {
        return Ok(());
    }
    file.write_all_at(data, start)
}

/// Makes the ring file (0600, as the capture's), maps it and makes its pages writable.
fn make_ring(path: &Path) -> io::Result<Ring> {
    let file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    // The ring's pages, written with zeros (mapped over a hole, each page would be made at its
    // first fault). From a static, not the heap: glibc would keep a freed 2 MiB block's size as
    // its threshold for what it maps apart, and the heap's RSS grew by 2 MiB under load.
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    for at in (0..RING).step_by(ZEROS.len()) {
        file.write_all_at(&ZEROS[..ZEROS.len().min(RING - at)], at as u64)?;
    }
    // SAFETY: a new shared mapping of the file's pages; unmapped when the ring is dropped.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            RING,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        let error = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(error);
    }
    // SAFETY: advice on the mapping just made.
    unsafe { libc::madvise(ptr, RING, libc::MADV_POPULATE_WRITE) };
    let ring = Ring { ptr: ptr.cast() };
    ring.set(0, MAGIC);
    Ok(ring)
}

impl MappedFile {
    /// Writes what the ring holds to the file and removes the ring; appends after this are
    /// `pwrite`s. A ring that could not be written out stays, for [`recover`].
    pub fn close(&mut self) {
        let hit = self.hit();
        // A truncated ring holds nothing more to write.
        let written = self
            .wait()
            .and_then(|()| if hit { Ok(()) } else { self.flush() });
        self.release_slot();
        if self.ring.take().is_some() && (written.is_ok() || hit) {
            let _ = std::fs::remove_file(&self.ring_path);
        }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
impl MappedFile {
    /// Leaves the file as a SIGKILL would: the ring not written out, not removed.
    pub fn abandon(mut self) {
        self.wait().unwrap();
        self.release_slot();
        // Unmapped, but the file and its ring stay as they are.
        drop(self.ring.take());
        std::mem::forget(self);
    }
}

/// The segments a ring file holds: where each goes in its capture file, and its bytes.
fn segments(ring: &[u8]) -> Result<Vec<(u64, &[u8])>, String> {
    let word = |i: usize| {
        ring.get(8 * i..8 * i + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if ring.len() != RING || word(0) != Some(MAGIC) {
        return Err("not a capture ring".into());
    }
    let mut segments = Vec::new();
    for segment in 0..SEGMENTS {
        let (offset, filled) = (
            word(2 + 2 * segment).unwrap_or(0),
            word(3 + 2 * segment).unwrap_or(0),
        );
        if filled == 0 {
            continue;
        }
        if filled > SEGMENT as u64 || offset % SEGMENT as u64 != 0 || offset > 1 << 40 {
            return Err(format!("segment {segment} is corrupt"));
        }
        let data = HEADER + segment * SEGMENT;
        segments.push((offset, &ring[data..data + filled as usize]));
    }
    Ok(segments)
}

/// Adds to `bytes`, read from the capture file at `path`, what its ring holds that the file may
/// not: the records of a shim that is still writing it, or that was killed. `Err` names the ring.
pub fn overlay(path: &Path, bytes: &mut Vec<u8>) -> Result<(), String> {
    let ring_path = ring_path(path);
    let ring = match std::fs::read(&ring_path) {
        Ok(ring) => ring,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: cannot be read ({e})", ring_path.display())),
    };
    let segments =
        segments(&ring).map_err(|why| format!("{}: {why}; skipped", ring_path.display()))?;
    for (offset, data) in segments {
        let (from, to) = (offset as usize, offset as usize + data.len());
        if bytes.len() < to {
            bytes.resize(to, 0);
        }
        bytes[from..to].copy_from_slice(data);
    }
    Ok(())
}

/// Writes what the ring beside the capture file at `path` holds into the file, and removes the
/// ring: for a shim that stopped without closing its file. `Err` says why, naming the ring.
pub fn recover(path: &Path) -> Result<(), String> {
    let ring_path = ring_path(path);
    let fail = |why: String| format!("{}: {why}", ring_path.display());
    let ring = std::fs::read(&ring_path).map_err(|e| fail(e.to_string()))?;
    match segments(&ring) {
        Ok(segments) if !segments.is_empty() && path.exists() => {
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| fail(e.to_string()))?;
            for (offset, data) in segments {
                file.write_all_at(data, offset)
                    .map_err(|e| fail(e.to_string()))?;
            }
        }
        Ok(_) => {}
        Err(why) => {
            let _ = std::fs::remove_file(&ring_path);
            return Err(fail(format!("{why}; removed")));
        }
    }
    std::fs::remove_file(&ring_path).map_err(|e| fail(e.to_string()))
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
            // SAFETY: replaces the ring, which only its writer (the faulting thread) uses.
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
    // Not a ring's: what would have happened without this handler.
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

    fn open_in(dir: &Path, name: &str) -> (PathBuf, File) {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(name);
        let _ = std::fs::remove_file(ring_path(&path));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    fn open(name: &str) -> (PathBuf, File) {
        let dir = std::env::temp_dir().join(format!("glance-shim-mapped-{}", std::process::id()));
        open_in(&dir, name)
    }

    /// Records of many sizes, some spanning segments, some larger than the ring.
    fn records() -> Vec<Vec<u8>> {
        (0..300u32)
            .map(|i| {
                let len =
                    [10, 1500, 40_000, 300_000, 1_200_000][i as usize % 5] / (1 + i as usize % 3);
                (0..len).map(|j| (i as usize + j) as u8).collect()
            })
            .collect()
    }

    fn appends_read_back(path: &Path, file: File) {
        let mut f = MappedFile::new(file, path);
        assert!(ring_path(path).exists());
        let mut expected = Vec::new();
        for record in records() {
            f.append(&record).unwrap();
            expected.extend_from_slice(&record);
        }
        assert_eq!(f.len(), expected.len() as u64);
        // Before the close, the file and its ring hold it all.
        let mut read = std::fs::read(path).unwrap();
        overlay(path, &mut read).unwrap();
        assert!(read == expected);
        drop(f);
        assert!(std::fs::read(path).unwrap() == expected);
        assert!(
            !ring_path(path).exists(),
            "the ring is removed at the close"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn appends_across_segments_read_back_and_the_ring_is_gone_at_close() {
        let (path, file) = open("appends");
        appends_read_back(&path, file);
    }

    /// In a runtime, whole segments are written on its blocking pool while the next are filled.
    #[test]
    fn with_segments_written_on_the_blocking_pool_appends_read_back_the_same() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let _in_runtime = runtime.enter();
        let (path, file) = open("pool");
        appends_read_back(&path, file);
    }

    /// Where an `O_DIRECT` write fails (a filesystem without it, or with other alignment rules),
    /// the segment goes through the page cache.
    #[test]
    fn where_o_direct_fails_appends_read_back_the_same() {
        let (path, file) = open("no-direct");
        let mut f = MappedFile::new(file, &path);
        // A handle that cannot write: every `O_DIRECT` write fails.
        f.direct = Some(Arc::new(File::open(&path).unwrap()));
        let mut expected = Vec::new();
        for record in records() {
            f.append(&record).unwrap();
            expected.extend_from_slice(&record);
        }
        drop(f);
        assert!(std::fs::read(&path).unwrap() == expected);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_flush_puts_the_segment_being_filled_in_the_file() {
        let (path, file) = open("flush");
        let mut f = MappedFile::new(file, &path);
        f.append(&[b'a'; SEGMENT + 100]).unwrap();
        // The whole segment is in the file; the 100 bytes after it are only in the ring.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SEGMENT as u64);
        f.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'a'; SEGMENT + 100]);
        f.append(b"bc").unwrap();
        f.flush().unwrap();
        f.flush().unwrap();
        let mut expected = vec![b'a'; SEGMENT + 100];
        expected.extend_from_slice(b"bc");
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        std::fs::remove_file(&path).unwrap();
    }

    /// A shim killed leaves its ring: a reader sees what it holds, and `recover` writes it into
    /// the file. Only an append torn by the kill would be lost.
    #[test]
    fn a_ring_left_by_a_killed_writer_is_read_and_recovered() {
        let (path, file) = open("killed");
        let mut f = MappedFile::new(file, &path);
        let mut expected = Vec::new();
        for record in records().into_iter().take(40) {
            f.append(&record).unwrap();
            expected.extend_from_slice(&record);
        }
        f.abandon();
        let in_file = std::fs::read(&path).unwrap();
        assert!(
            in_file.len() < expected.len(),
            "the last records are only in the ring"
        );
        let mut read = in_file;
        overlay(&path, &mut read).unwrap();
        assert!(read == expected);
        recover(&path).unwrap();
        assert!(std::fs::read(&path).unwrap() == expected);
        assert!(!ring_path(&path).exists());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_corrupt_ring_is_named_and_the_file_read_as_it_is() {
        let (path, file) = open("corrupt");
        drop(file);
        std::fs::write(&path, b"records").unwrap();
        std::fs::write(ring_path(&path), b"not a ring").unwrap();
        let mut read = std::fs::read(&path).unwrap();
        let why = overlay(&path, &mut read).unwrap_err();
        assert!(
            why.contains("corrupt.rec.ring") || why.contains("corrupt.ring"),
            "{why}"
        );
        assert_eq!(read, b"records");
        assert!(recover(&path).is_err());
        assert!(!ring_path(&path).exists(), "a corrupt ring is removed");
        assert_eq!(std::fs::read(&path).unwrap(), b"records");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_ring_truncated_by_someone_else_is_reported_not_a_sigbus() {
        let (path, file) = open("truncated");
        let mut f = MappedFile::new(file, &path);
        f.append(&[b'x'; 10_000]).unwrap();
        // `truncate -s 0` by another program, with the ring mapped.
        OpenOptions::new()
            .write(true)
            .open(ring_path(&path))
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

    #[test]
    fn the_ring_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let (path, file) = open("mode");
        let f = MappedFile::new(file, &path);
        let mode = std::fs::metadata(ring_path(&path))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(f);
        std::fs::remove_file(&path).unwrap();
    }
}
