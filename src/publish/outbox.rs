//! Durable outbox: one file per message until the broker's PUBACK for it arrives.
//!
//! Entry file `<seq:020>.msg`, little-endian:
//! `b"TKOB" | version u8 | qos u8 | flags u8 (bit 0 = retain) | 0u8 | seq u64 | topic_len u32 |
//! payload_len u64 | topic | payload | blake3(all bytes before it)`.
//! A file whose length, header or hash does not match (a torn write, a bad disk) is deleted on
//! open with a warning; the link then never sends it.
//!
//! A message is readable (so sent) from memory as soon as it has its sequence number, while its
//! file is still being written: the fsyncs are off the path from result to broker. Sending first
//! loses nothing: until the file is durable a crash would lose the message either way, and once
//! it is, the message is resent until its PUBACK. If the file cannot be written (a full disk),
//! a message already sent counts as stored when its PUBACK comes within `ACK_WAIT`, so the line
//! never both receives a result and hears that it was lost.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::mqtt::LinkError;
use crate::atomic_write::{self, Durability};

const MAGIC: &[u8; 4] = b"TKOB";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 28;
const HASH_LEN: usize = 32;
const ENTRY_EXT: &str = "msg";
const TMP_EXT: &str = "tmp";
/// Highest sequence number handed out, reserved in blocks so a restart never reuses one even
/// when every entry has been acked and deleted.
const SEQ_FILE: &str = "seq.next";
const SEQ_BLOCK: u64 = 1024;
/// Room beyond the bounds for `push_reserved`: a full outbox refuses work, but the events that
/// say so must still be stored, or the refusal itself would vanish in a broker outage; and so
/// must the results of work accepted just before the bound was reached (a few large JPEGs).
pub const RESERVE_ENTRIES: usize = 256;
pub const RESERVE_BYTES: u64 = 32 << 20;
/// How long a message whose file could not be written waits for the PUBACK of its copy already
/// sent: the broker having it is as good as stored, and the caller must not be told "lost" for a
/// message the line receives.
const ACK_WAIT: Duration = Duration::from_secs(2);

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub seq: u64,
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub payload: Vec<u8>,
}

/// What [`Outbox::push_all`] stores: topic, payload, retain.
pub type Message<'a> = (&'a str, &'a [u8], bool);

/// A bounded directory of messages waiting for their PUBACK. One `Outbox` (and one link) per
/// directory: a second user would send and delete the first one's entries.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    max_entries: usize,
    max_bytes: u64,
    state: Mutex<State>,
    /// Signalled when a message being written gets its PUBACK.
    acked: Condvar,
}

#[derive(Debug)]
struct State {
    /// seq -> file size in bytes
    entries: BTreeMap<u64, u64>,
    bytes: u64,
    next_seq: u64,
    /// Messages handed a seq whose files are still being written.
    writing: BTreeMap<u64, Staged>,
    writing_bytes: u64,
    /// Sequence numbers below this are reserved on disk.
    reserved_to: u64,
}

/// A message being written, read from memory meanwhile.
#[derive(Debug)]
struct Staged {
    entry: Arc<OutboxEntry>,
    size: u64,
    /// Read to be sent: the broker may have it even if its file cannot be written.
    sent: bool,
    /// Its PUBACK came before its file was written: the file is deleted once it is.
    acked: bool,
}

impl Outbox {
    /// Opens (creating if needed) the outbox in `dir`, dropping leftover temp files and
    /// entries that fail their integrity check. Reads every entry once (at most `max_bytes`
    /// from a run with the same bounds).
    pub fn open(
        dir: impl AsRef<Path>,
        max_entries: usize,
        max_bytes: u64,
    ) -> Result<Outbox, LinkError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| LinkError::io(&dir, e))?;
        let mut entries = BTreeMap::new();
        let mut bytes = 0u64;
        let mut max_seq = 0u64;
        let listing = fs::read_dir(&dir).map_err(|e| LinkError::io(&dir, e))?;
        for item in listing {
            let item = item.map_err(|e| LinkError::io(&dir, e))?;
            let path = item.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext == TMP_EXT {
                // A write that never reached its rename: the caller never got a seq for it.
                remove_logged(&path, "unfinished write");
                continue;
            }
            if ext != ENTRY_EXT {
                continue;
            }
            let Some(seq) = seq_of(&path) else {
                tracing::warn!(path = %path.display(), "outbox: ignoring file with a foreign name");
                continue;
            };
            match read_entry(&path, seq) {
                Ok(_) => {
                    let len = item.metadata().map_err(|e| LinkError::io(&path, e))?.len();
                    entries.insert(seq, len);
                    bytes += len;
                    max_seq = max_seq.max(seq);
                }
                Err(ReadError::Corrupt(reason)) => {
                    tracing::warn!(path = %path.display(), %reason, "outbox: discarding damaged entry");
                    remove_logged(&path, "damaged entry");
                    // Its seq was handed out; never hand it out again.
                    max_seq = max_seq.max(seq);
                }
                Err(ReadError::Io(e)) => return Err(LinkError::io(&path, e)),
            }
        }
        let reserved = read_seq_file(&dir.join(SEQ_FILE))?;
        let next_seq = (max_seq + 1).max(reserved).max(1);
        sync_dir(&dir)?;
        if !entries.is_empty() {
            tracing::info!(entries = entries.len(), bytes, dir = %dir.display(), "outbox: pending entries from a previous run");
        }
        Ok(Outbox {
            dir,
            max_entries,
            max_bytes,
            acked: Condvar::new(),
            state: Mutex::new(State {
                entries,
                bytes,
                next_seq,
                writing: BTreeMap::new(),
                writing_bytes: 0,
                reserved_to: reserved,
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores a QoS 1 message durably (temp file, fsync, rename, fsync dir) and returns its
    /// sequence number. Fails with `Full` over the bounds and leaves nothing behind on error.
    pub fn push(&self, topic: &str, payload: &[u8], retain: bool) -> Result<u64, LinkError> {
        let seq = self.stage((topic, payload, retain), 0, 0)?;
        self.commit(seq)
    }

    /// Like `push`, but may also use `RESERVE_ENTRIES` / `RESERVE_BYTES` beyond the bounds:
    /// for events, replies and the results of accepted work, so that nothing already done or
    /// said is lost to a bound that exists to refuse new work.
    pub fn push_reserved(
        &self,
        topic: &str,
        payload: &[u8],
        retain: bool,
    ) -> Result<u64, LinkError> {
        let seq = self.stage((topic, payload, retain), RESERVE_ENTRIES, RESERVE_BYTES)?;
        self.commit(seq)
    }

    /// Stores several messages in order, calling `staged` once all of them can be read and sent
    /// (before any file is written), and returns their sequence numbers. The first one refused
    /// (over the bounds, or its file not written) stops the rest, which are not stored; those
    /// before it are.
    pub fn push_all(
        &self,
        msgs: &[Message],
        reserved: bool,
        staged: impl FnOnce(),
    ) -> Result<Vec<u64>, LinkError> {
        let (entries, bytes) = match reserved {
            true => (RESERVE_ENTRIES, RESERVE_BYTES),
            false => (0, 0),
        };
        let mut seqs = Vec::with_capacity(msgs.len());
        let mut refused = None;
        for m in msgs {
            match self.stage(*m, entries, bytes) {
                Ok(seq) => seqs.push(seq),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        staged();
        for (i, seq) in seqs.iter().enumerate() {
            if let Err(e) = self.commit(*seq) {
                // the rest are not stored either: a result's metadata never outlives its image
                seqs[i + 1..].iter().for_each(|s| self.withdraw(*s));
                return Err(e);
            }
        }
        refused.map_or(Ok(seqs), Err)
    }

    /// Forgets a staged message without writing it.
    fn withdraw(&self, seq: u64) {
        let mut st = self.lock();
        if let Some(w) = st.writing.remove(&seq) {
            st.writing_bytes -= w.size;
        }
    }

    /// Whether either bound is reached: callers refuse new work then, rather than doing it and
    /// dropping its result.
    pub fn is_full(&self) -> bool {
        let st = self.lock();
        st.entries.len() + st.writing.len() >= self.max_entries
            || st.bytes + st.writing_bytes >= self.max_bytes
    }

    /// Hands the message a seq within the bounds (plus `extra_*`) and makes it readable.
    fn stage(
        &self,
        (topic, payload, retain): Message,
        extra_entries: usize,
        extra_bytes: u64,
    ) -> Result<u64, LinkError> {
        let size = (HEADER_LEN + topic.len() + payload.len() + HASH_LEN) as u64;
        let mut st = self.lock();
        let entries = st.entries.len() + st.writing.len();
        let bytes = st.bytes + st.writing_bytes;
        if entries >= self.max_entries + extra_entries
            || bytes + size > self.max_bytes + extra_bytes
        {
            return Err(LinkError::Full { entries, bytes });
        }
        let seq = st.next_seq;
        if seq >= st.reserved_to {
            let upto = seq + SEQ_BLOCK;
            write_atomic(&self.dir, SEQ_FILE, &[&upto.to_le_bytes()])?;
            st.reserved_to = upto;
        }
        st.next_seq = seq + 1;
        let entry = Arc::new(OutboxEntry {
            seq,
            topic: topic.to_string(),
            qos: 1,
            retain,
            payload: payload.to_vec(),
        });
        let (sent, acked) = (false, false);
        st.writing.insert(
            seq,
            Staged {
                entry,
                size,
                sent,
                acked,
            },
        );
        st.writing_bytes += size;
        Ok(seq)
    }

    /// Writes a staged message's file; on error it is gone from memory and disk.
    fn commit(&self, seq: u64) -> Result<u64, LinkError> {
        let Some(entry) = self.lock().writing.get(&seq).map(|s| s.entry.clone()) else {
            return Err(LinkError::io(&self.dir, io::ErrorKind::NotFound.into()));
        };
        // Written without the lock so acks (from the network task) never wait for an fsync.
        let header = encode_header(seq, &entry.topic, entry.payload.len(), entry.retain);
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header);
        hasher.update(entry.topic.as_bytes());
        hasher.update(&entry.payload);
        let hash = hasher.finalize();
        let name = entry_name(seq);
        let parts: [&[u8]; 4] = [
            &header,
            entry.topic.as_bytes(),
            &entry.payload,
            hash.as_bytes(),
        ];
        let written = write_atomic(&self.dir, &name, &parts);
        let mut st = self.lock();
        if written.is_err() {
            st = self.await_ack(st, seq);
        }
        let Some(staged) = st.writing.remove(&seq) else {
            return Err(LinkError::io(&self.dir, io::ErrorKind::NotFound.into()));
        };
        st.writing_bytes -= staged.size;
        if written.is_err() || staged.acked {
            drop(st);
            // After a failed dir fsync the rename may have happened: the caller is told "not
            // stored", so make that true. An acked message needs no file, and is delivered.
            let _ = fs::remove_file(self.dir.join(&name));
            if let (Err(e), true) = (&written, staged.acked) {
                tracing::warn!(seq, error = %e, "outbox: not stored, but the broker has it");
            }
            return written
                .map(|()| seq)
                .or_else(|e| staged.acked.then_some(seq).ok_or(e));
        }
        st.entries.insert(seq, staged.size);
        st.bytes += staged.size;
        Ok(seq)
    }

    /// Waits up to `ACK_WAIT` for the PUBACK of message `seq` if it was read to be sent.
    fn await_ack<'a>(&self, mut st: MutexGuard<'a, State>, seq: u64) -> MutexGuard<'a, State> {
        let until = Instant::now() + ACK_WAIT;
        while st.writing.get(&seq).is_some_and(|w| w.sent && !w.acked) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = match self.acked.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        st
    }

    /// Sequence numbers of all stored entries, oldest first.
    pub fn pending(&self) -> Vec<u64> {
        self.lock().entries.keys().copied().collect()
    }

    /// The oldest entry, stored or being written, with a sequence number above `seq` and no
    /// PUBACK yet. Seqs are handed out in order under the lock and each is readable from then
    /// until acked, so a sender walking upwards from its last seq skips nothing.
    pub fn next_after(&self, seq: u64) -> Option<u64> {
        let st = self.lock();
        let stored = st.entries.range(seq + 1..).next().map(|(s, _)| *s);
        let writing = st.writing.range(seq + 1..).find(|(_, w)| !w.acked);
        match (stored, writing.map(|(s, _)| *s)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The entry, from memory, if its file is still being written and it has no PUBACK yet. It
    /// counts as sent from then on (see `ACK_WAIT`).
    pub fn staged(&self, seq: u64) -> Option<OutboxEntry> {
        let mut st = self.lock();
        let w = st.writing.get_mut(&seq).filter(|w| !w.acked)?;
        w.sent = true;
        Some(OutboxEntry::clone(&w.entry))
    }

    /// Reads one entry, from memory while its file is being written. `Ok(None)` when it is
    /// gone (acked) or was damaged (then it is deleted and logged: resending garbage helps
    /// nobody).
    pub fn read(&self, seq: u64) -> Result<Option<OutboxEntry>, LinkError> {
        if self.lock().writing.contains_key(&seq) {
            return Ok(self.staged(seq));
        }
        if !self.lock().entries.contains_key(&seq) {
            return Ok(None);
        }
        let path = self.dir.join(entry_name(seq));
        match read_entry(&path, seq) {
            Ok(e) => Ok(Some(e)),
            Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(seq);
                Ok(None)
            }
            Err(ReadError::Io(e)) => Err(LinkError::io(&path, e)),
            Err(ReadError::Corrupt(reason)) => {
                tracing::error!(path = %path.display(), %reason, "outbox: discarding damaged entry");
                self.ack(seq)?;
                Ok(None)
            }
        }
    }

    /// Deletes an entry once the broker has it. No directory fsync: after a crash the entry may
    /// come back and be sent again, which at-least-once allows.
    pub fn ack(&self, seq: u64) -> Result<(), LinkError> {
        let mut st = self.lock();
        if let Some(w) = st.writing.get_mut(&seq) {
            w.acked = true;
            self.acked.notify_all();
            return Ok(());
        }
        let Some(size) = st.entries.remove(&seq) else {
            return Ok(());
        };
        st.bytes -= size;
        drop(st);
        let path = self.dir.join(entry_name(seq));
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(LinkError::io(&path, e)),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes on disk for all entries.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    fn forget(&self, seq: u64) {
        let mut st = self.lock();
        if let Some(size) = st.entries.remove(&seq) {
            st.bytes -= size;
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave State inconsistent (plain fields, updated last).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn entry_name(seq: u64) -> String {
    format!("{seq:020}.{ENTRY_EXT}")
}

fn seq_of(path: &Path) -> Option<u64> {
    let stem = path.file_stem()?.to_str()?;
    if stem.len() != 20 {
        return None;
    }
    stem.parse().ok()
}

fn encode_header(seq: u64, topic: &str, payload_len: usize, retain: bool) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(MAGIC);
    h[4] = VERSION;
    h[5] = 1; // QoS 1: the outbox exists for PUBACKs
    h[6] = u8::from(retain);
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..20].copy_from_slice(&(topic.len() as u32).to_le_bytes());
    h[20..28].copy_from_slice(&(payload_len as u64).to_le_bytes());
    h
}

enum ReadError {
    Io(io::Error),
    Corrupt(String),
}

fn read_entry(path: &Path, seq: u64) -> Result<OutboxEntry, ReadError> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(ReadError::Io)?;
    let bad = |r: &str| Err(ReadError::Corrupt(r.to_string()));
    if buf.len() < HEADER_LEN + HASH_LEN {
        return bad("shorter than a header");
    }
    if &buf[0..4] != MAGIC || buf[4] != VERSION {
        return bad("unknown magic or version");
    }
    let u64_at = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
    let topic_len = u32::from_le_bytes(buf[16..20].try_into().expect("4 bytes")) as u64;
    let payload_len = u64_at(20);
    let expect = HEADER_LEN as u64 + topic_len + payload_len + HASH_LEN as u64;
    if buf.len() as u64 != expect {
        return bad(&format!("length {} but header says {expect}", buf.len()));
    }
    if u64_at(8) != seq {
        return bad(&format!("header seq {} differs from file name", u64_at(8)));
    }
    let body_end = buf.len() - HASH_LEN;
    if blake3::hash(&buf[..body_end]).as_bytes() != &buf[body_end..] {
        return bad("checksum mismatch");
    }
    let qos = buf[5];
    let retain = buf[6] & 1 == 1;
    let topic_end = HEADER_LEN + topic_len as usize;
    let Ok(topic) = std::str::from_utf8(&buf[HEADER_LEN..topic_end]).map(str::to_owned) else {
        return bad("topic is not UTF-8");
    };
    buf.truncate(body_end);
    let payload = buf.split_off(topic_end);
    Ok(OutboxEntry {
        seq,
        topic,
        qos,
        retain,
        payload,
    })
}

fn read_seq_file(path: &Path) -> Result<u64, LinkError> {
    match fs::read(path) {
        Ok(b) if b.len() == 8 => Ok(u64::from_le_bytes(b.try_into().expect("8 bytes"))),
        Ok(_) => {
            // Written by rename, so this is not a torn write but foreign damage.
            tracing::warn!(path = %path.display(), "outbox: ignoring malformed sequence file");
            Ok(0)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(LinkError::io(path, e)),
    }
}

/// temp file + fsync + rename + fsync dir ([`crate::atomic_write`]); on any error the temp file
/// is removed.
fn write_atomic(dir: &Path, name: &str, parts: &[&[u8]]) -> Result<(), LinkError> {
    let tmp = dir.join(format!("{name}.{TMP_EXT}"));
    atomic_write::write_atomic(&tmp, &dir.join(name), parts, Durability::Full)
        .map_err(|e| LinkError::io(&e.path, e.cause))
}

fn sync_dir(dir: &Path) -> Result<(), LinkError> {
    atomic_write::sync_dir(dir).map_err(|e| LinkError::io(dir, e))
}

fn remove_logged(path: &Path, what: &str) {
    match fs::remove_file(path) {
        Ok(()) => tracing::warn!(path = %path.display(), "outbox: removed {what}"),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "outbox: cannot remove {what}")
        }
    }
}
