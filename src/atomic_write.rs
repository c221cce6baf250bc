//! Replacing a file so that a reader sees the old content or the new, never a mix: the bytes go
//! to a temporary file beside it, which is renamed over it (rename is atomic within a folder).
//! The one routine behind template files, outbox entries, result images and the PNG display;
//! each caller names its temporary file, because each one's clean-up recognises its own.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// What must be on disk before a write counts as done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Only the rename: a power cut may lose the write (a display frame, redrawn every few
    /// seconds, where syncing each one would only wear the board's flash).
    Atomic,
    /// The file's data before the rename, not the rename itself (result images: the caller
    /// checks the output folder itself).
    Data,
    /// The data and the rename: after a power cut the new file is there (templates, outbox).
    Full,
}

/// The step that failed: `Write` concerns the temporary file, `Rename` the target, `SyncDir`
/// the target's folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Write,
    Rename,
    SyncDir,
}

/// A failed write; the temporary file is gone by then.
#[derive(Debug, thiserror::Error)]
// not `source`: the message holds the cause, and the CLI prints the chain
#[error("{}: {cause}", path.display())]
pub struct WriteFailure {
    pub step: Step,
    /// The file or folder the failed step concerned.
    pub path: PathBuf,
    pub cause: io::Error,
}

/// Writes `parts` to `tmp` and renames it over `dst`. The temporary file is held (and locked,
/// so a clean-up in another process can tell it from a crashed writer's) until it is in place.
pub fn write_atomic(
    tmp: &Path,
    dst: &Path,
    parts: &[&[u8]],
    durability: Durability,
) -> Result<(), WriteFailure> {
    let file = write_temp_open(tmp, parts, durability)?;
    let placed = rename_into(tmp, dst, durability);
    drop(file);
    placed
}

/// The first half of [`write_atomic`], for files that go into place later ([`rename_into`]):
/// writes `parts` to `tmp`, removing it again on failure.
pub fn write_temp(tmp: &Path, parts: &[&[u8]], durability: Durability) -> Result<(), WriteFailure> {
    write_temp_open(tmp, parts, durability).map(drop)
}

/// The second half: renames `tmp` over `dst` (removing `tmp` on failure), then, for
/// [`Durability::Full`], makes the rename durable.
pub fn rename_into(tmp: &Path, dst: &Path, durability: Durability) -> Result<(), WriteFailure> {
    if let Err(source) = std::fs::rename(tmp, dst) {
        let _ = std::fs::remove_file(tmp);
        return Err(WriteFailure {
            step: Step::Rename,
            path: dst.into(),
            cause: source,
        });
    }
    if durability != Durability::Full {
        return Ok(());
    }
    let dir = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(dir).map_err(|source| WriteFailure {
        step: Step::SyncDir,
        path: dir.into(),
        cause: source,
    })
}

/// Makes a rename or removal in `dir` durable: without it a power cut can undo it.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

fn write_temp_open(
    tmp: &Path,
    parts: &[&[u8]],
    durability: Durability,
) -> Result<File, WriteFailure> {
    let written = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)?;
        // a file system without locks only loses the clean-up's protection
        let _ = file.try_lock();
        for p in parts {
            (&file).write_all(p)?;
        }
        if durability != Durability::Atomic {
            file.sync_all()?;
        }
        Ok(file)
    })();
    written.map_err(|source| {
        let _ = std::fs::remove_file(tmp);
        WriteFailure {
            step: Step::Write,
            path: tmp.into(),
            cause: source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let (tmp, dst) = (d.path().join(".a.tmp"), d.path().join("a"));
        std::fs::write(&dst, b"old").unwrap();
        write_atomic(&tmp, &dst, &[b"ne", b"w"], Durability::Full).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"new");
        assert!(!tmp.exists());
    }

    #[test]
    fn a_failed_rename_removes_the_temporary_and_names_the_target() {
        let d = tempfile::tempdir().unwrap();
        let tmp = d.path().join(".a.tmp");
        let dst = d.path().join("missing/a");
        let e = write_atomic(&tmp, &dst, &[b"x"], Durability::Atomic).unwrap_err();
        assert_eq!((e.step, e.path), (Step::Rename, dst));
        assert!(!tmp.exists());
    }

    #[test]
    fn a_failed_write_names_the_temporary() {
        let d = tempfile::tempdir().unwrap();
        let tmp = d.path().join("no-such-dir/.a.tmp");
        let e = write_temp(&tmp, &[b"x"], Durability::Data).unwrap_err();
        assert_eq!((e.step, e.path), (Step::Write, tmp));
    }
}
