//! The template store: a directory holding one file per template, `NAME.tkt`.
//!
//! Crash safety ([`crate::atomic_write`]): a template is written to a temporary
//! file in the same directory (`.NAME.tmp.PID.SEQ`), flushed to disk, renamed over `NAME.tkt`
//! and the directory entry flushed too. Rename is atomic, so after a crash
//! `NAME.tkt` is the old or the new template, never a mix. Temporary files a
//! crash leaves behind are removed by the next [`TemplateStore::open`]; a
//! writer that is still alive holds a lock on its temporary file, so it is
//! left alone.
//!
//! The file format is described in [`template`].

mod check;
mod name;
pub mod template;

use std::fs::{self, File, TryLockError};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use name::{MAX_NAME_LEN, TemplateName};

use crate::atomic_write::{Durability, Step, sync_dir, write_atomic};
pub use template::{
    CHECKSUM_LEN, Card, FORMAT_VERSION, PairRegistration, PartGains, SourcePair, THUMB_BYTES,
    Template,
};

/// Extension of template files.
pub const EXTENSION: &str = "tkt";

/// Files larger than this are refused unread; real templates are well under
/// a megabyte, so anything this big is not one.
pub const MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;

const TMP_MARK: &str = "tmp";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // not `source`: the message holds the cause, and the CLI prints the chain
    #[error("file system error on {}: {cause}", path.display())]
    Io { path: PathBuf, cause: io::Error },
    /// `name` is the rejected text, cut to 64 characters.
    #[error("invalid template name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("no template named '{name}' in the store")]
    NotFound { name: String },
    #[error("template file {} is unusable: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "template file format version {found} is not supported (this takumi reads version {FORMAT_VERSION}); \
         it was made by another takumi release"
    )]
    Version { found: u32 },
    /// Bytes given to [`Template::from_bytes`] are not a valid template.
    /// [`TemplateStore::load`] reports this as `Corrupt`, with the path.
    #[error("template data is unusable: {reason}")]
    Decode { reason: String },
    /// The template cannot be written (for example a NaN weight); nothing was saved.
    #[error("template cannot be saved: {reason}")]
    Invalid { reason: String },
}

impl From<StoreError> for crate::Error {
    fn from(e: StoreError) -> Self {
        crate::Error::Store(Box::new(e))
    }
}

/// One template of [`TemplateStore::list`]: its name and how loading it went.
pub type ListEntry = (TemplateName, Result<Template, StoreError>);

#[derive(Clone, Debug)]
pub struct TemplateStore {
    dir: PathBuf,
}

impl TemplateStore {
    /// Opens (creating it if missing) the store at `dir` and removes temporary
    /// files left by writers that crashed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        if let Err(e) = fs::create_dir_all(&dir) {
            let source = if e.kind() == io::ErrorKind::AlreadyExists {
                io::Error::new(
                    io::ErrorKind::NotADirectory,
                    "the path exists but is not a directory",
                )
            } else {
                e
            };
            return Err(StoreError::Io {
                path: dir,
                cause: source,
            });
        }
        let store = Self { dir };
        store.remove_stale_temps()?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_of(&self, name: &TemplateName) -> PathBuf {
        self.dir.join(format!("{name}.{EXTENSION}"))
    }

    /// Atomically replaces (or creates) the template `t.name`. On error the
    /// previous template, if any, is untouched and no temporary file remains.
    pub fn save(&self, t: &Template) -> Result<(), StoreError> {
        let bytes = t.encode()?;
        let target = self.path_of(&t.name);
        let tmp = self.dir.join(temp_file_name(&t.name));
        write_atomic(&tmp, &target, &[&bytes], Durability::Full).map_err(|e| {
            // errors name the template file: the temporary one is an internal detail
            let path = if e.step == Step::SyncDir {
                e.path
            } else {
                target
            };
            StoreError::Io {
                path,
                cause: e.cause,
            }
        })
    }

    /// Installs a template file made elsewhere (a fleet message, a command): it is decoded and
    /// checked in full before anything is written, then saved like any template, so a refused
    /// file leaves the store exactly as it was.
    pub fn install(&self, bytes: &[u8]) -> Result<Template, StoreError> {
        let t = Template::from_bytes(bytes)?;
        self.save(&t)?;
        Ok(t)
    }

    pub fn load(&self, name: &TemplateName) -> Result<Template, StoreError> {
        let path = self.path_of(name);
        let bytes = match read_capped(&path) {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Err(StoreError::Corrupt {
                    path,
                    reason: format!(
                        "the file is larger than {MAX_FILE_BYTES} bytes, far more than any template"
                    ),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    name: name.to_string(),
                });
            }
            Err(source) => {
                return Err(StoreError::Io {
                    path,
                    cause: source,
                });
            }
        };
        let t = match Template::from_bytes(&bytes) {
            Ok(t) => t,
            Err(StoreError::Decode { reason }) => {
                return Err(StoreError::Corrupt { path, reason });
            }
            Err(e) => return Err(e),
        };
        if t.name != *name {
            return Err(StoreError::Corrupt {
                reason: format!(
                    "the file holds template '{}', not '{name}'; it was renamed or copied by hand",
                    t.name
                ),
                path,
            });
        }
        Ok(t)
    }

    /// Every `NAME.tkt` in the store, sorted by name, each with its load
    /// result: one bad file does not hide the others.
    pub fn list(&self) -> Result<Vec<ListEntry>, StoreError> {
        let mut names = Vec::new();
        for entry in self.read_dir()? {
            let file_name = entry.file_name();
            let Some(stem) = file_name
                .to_str()
                .and_then(|f| f.strip_suffix(EXTENSION))
                .and_then(|f| f.strip_suffix('.'))
            else {
                continue;
            };
            if let Ok(name) = TemplateName::new(stem) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names
            .into_iter()
            .map(|n| {
                let t = self.load(&n);
                (n, t)
            })
            .collect())
    }

    pub fn remove(&self, name: &TemplateName) -> Result<(), StoreError> {
        let path = self.path_of(name);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NotFound {
                name: name.to_string(),
            }),
            Err(source) => Err(StoreError::Io {
                path,
                cause: source,
            }),
        }
    }

    fn read_dir(&self) -> Result<Vec<fs::DirEntry>, StoreError> {
        let io_err = |source| StoreError::Io {
            path: self.dir.clone(),
            cause: source,
        };
        fs::read_dir(&self.dir)
            .map_err(io_err)?
            .map(|e| e.map_err(io_err))
            .collect()
    }

    fn remove_stale_temps(&self) -> Result<(), StoreError> {
        for entry in self.read_dir()? {
            let is_temp = entry.file_name().to_str().is_some_and(is_temp_file_name);
            if !is_temp || !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let path = entry.path();
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(StoreError::Io {
                        path,
                        cause: source,
                    });
                }
            };
            if let Err(TryLockError::WouldBlock) = file.try_lock() {
                continue; // a live writer
            }
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StoreError::Io {
                        path,
                        cause: source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Makes a removal durable: without it a power cut can undo it.
    fn sync_dir(&self) -> Result<(), StoreError> {
        sync_dir(&self.dir).map_err(|source| StoreError::Io {
            path: self.dir.clone(),
            cause: source,
        })
    }
}

/// Reads the file, or `None` if it is larger than [`MAX_FILE_BYTES`].
fn read_capped(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len > MAX_FILE_BYTES {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Ok(None);
    }
    Ok(Some(bytes))
}

/// `.NAME.tmp.PID.SEQ`: the leading dot hides it, and the sequence number
/// keeps two saves in one process apart.
fn temp_file_name(name: &TemplateName) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!(".{name}.{TMP_MARK}.{}.{seq}", std::process::id())
}

fn is_temp_file_name(f: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some(rest) = f.strip_prefix('.') else {
        return false;
    };
    let mut parts = rest.split('.');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some(name), Some(TMP_MARK), Some(pid), Some(seq), None) => {
            TemplateName::new(name).is_ok() && digits(pid) && digits(seq)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_recognised_and_nothing_else() {
        let n = TemplateName::new("a-1").unwrap();
        let t = temp_file_name(&n);
        assert!(is_temp_file_name(&t), "{t}");
        assert_ne!(temp_file_name(&n), temp_file_name(&n));
        for other in [
            "a-1.tkt",
            ".a-1.tkt",
            ".a-1.tmp.12",
            ".a-1.tmp.12.x",
            ".A.tmp.1.2",
            ".a-1.tmp.1.2.3",
            "a-1.tmp.1.2",
            "..tmp.1.2",
            ".a.tmp..2",
        ] {
            assert!(!is_temp_file_name(other), "{other}");
        }
    }

    #[test]
    fn messages_are_one_line() {
        let e = StoreError::Io {
            path: "/x/a.tkt".into(),
            cause: io::Error::from(io::ErrorKind::StorageFull),
        };
        let s = e.to_string();
        assert!(s.contains("/x/a.tkt") && !s.contains('\n'), "{s}");
        let s = StoreError::Version { found: 2 }.to_string();
        assert!(s.contains("version 2") && !s.contains('\n'), "{s}");
    }
}
