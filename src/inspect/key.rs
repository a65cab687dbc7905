//! The inspector's per-run key, which every replay needs, and the file `glance-shim replay` reads it
//! from (as Jupyter keeps its token): whoever can read the start-up line or that file may replay; a
//! page elsewhere cannot.

use base64::Engine as _;

/// A new per-run key: 144 random bits, URL-safe.
pub fn new() -> String {
    let mut bytes = [0u8; 18];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random number generator works");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Where the key of the inspector on `port` is written for `glance-shim replay` to find:
/// `$XDG_RUNTIME_DIR/glance-shim/`, or else `~/.cache/glance-shim/run/`.
pub fn file(port: u16) -> Option<std::path::PathBuf> {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(run) => std::path::PathBuf::from(run).join("glance-shim"),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".cache/glance-shim/run"),
    };
    Some(dir.join(format!("inspector-{port}.key")))
}

/// The key file written for this run: removed when dropped (the shim stops, however it stops short
/// of being killed), so that no key of a run that is over stays on disk, if it still holds this
/// run's key (a later run on the same port may have written its own).
#[derive(Debug)]
pub struct KeyFile {
    pub path: std::path::PathBuf,
    key: String,
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        if std::fs::read(&self.path).is_ok_and(|k| k == self.key.as_bytes()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes the key for `glance-shim replay` (directory 0700, file 0600).
pub fn write_file(port: u16, key: &str) -> std::io::Result<KeyFile> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let path = file(port).ok_or_else(|| std::io::Error::other("no XDG_RUNTIME_DIR or HOME"))?;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(key.as_bytes())?;
    Ok(KeyFile {
        path,
        key: key.to_owned(),
    })
}
