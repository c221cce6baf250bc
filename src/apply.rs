//! `takumi apply` over files: each input decoded once, applied, encoded and written to a
//! temporary file of one [`Batch`], which the caller puts in place only when every input was
//! made. The same routine serves the command line and `takumi bench`'s folder figure, so the
//! figure is what a user pays.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, channel, sync_channel};

use crate::capture::{Image, read_image};
use crate::config::Config;
use crate::engine::Engine;
use crate::publish::file::{Batch, ImageKind, PendingFile, encode_image, lost_in};
use crate::store::Template;
use crate::{Error, Result};

/// What one call of [`render`] made: the batch to commit, a line per input to print once it is
/// in place, and a warning per output that lost what its input had (a JPEG keeps no alpha and
/// no 16 bits).
pub struct Rendered {
    pub batch: Batch,
    pub lines: Vec<String>,
    pub warnings: Vec<String>,
}

/// One direction of one template, as `apply` runs it.
pub struct Job<'a> {
    pub cfg: &'a Config,
    pub eng: &'a Engine,
    pub template: &'a Template,
    pub reverse: bool,
}

/// Inputs decoded, and outputs waiting to be encoded, ahead of the frame being applied.
const AHEAD: usize = 2;

/// An applied frame on its way to the encoder: its position among the inputs, where it goes and
/// as what.
struct Made {
    index: usize,
    out: Image,
    output: PathBuf,
    kind: ImageKind,
}

/// What [`render`] gathers as it goes; assembled into a [`Rendered`] or the error at the end.
#[derive(Default)]
struct Tally {
    /// by input index, in the order the inputs finish
    lines: Vec<(usize, (String, Option<String>))>,
    unreadable: Vec<(usize, Error)>,
    /// the first error that is not an unreadable input, with the input it came from
    other: Option<(usize, Error)>,
}

/// What became of one input ([`outcome`]).
enum Outcome {
    Made((String, Option<String>)),
    Unreadable(Error),
    Failed(Error),
    /// not applied: an earlier input failed, so nothing will be written
    Skipped,
}

impl Tally {
    fn record(&mut self, index: usize, o: Outcome) {
        match o {
            Outcome::Made(line) => self.lines.push((index, line)),
            Outcome::Unreadable(e) => self.unreadable.push((index, e)),
            Outcome::Failed(e) => self.fail(index, e),
            Outcome::Skipped => {}
        }
    }

    fn failed(&self) -> bool {
        !self.unreadable.is_empty() || self.other.is_some()
    }

    fn fail(&mut self, index: usize, e: Error) {
        if self.other.as_ref().is_none_or(|(i, _)| index < *i) {
            self.other = Some((index, e));
        }
    }

    /// The batch of every written output with its line and warning, in input order, or the one
    /// error to report (`written`: the writer's results, one per line; `total`: the inputs).
    fn finish(
        mut self,
        mut written: Vec<(usize, Result<PendingFile>)>,
        total: usize,
    ) -> Result<Rendered> {
        written.sort_by_key(|w| w.0);
        self.lines.sort_by_key(|l| l.0);
        self.unreadable.sort_by_key(|u| u.0);
        let mut r = Rendered {
            batch: Batch::default(),
            lines: Vec::with_capacity(written.len()),
            warnings: Vec::new(),
        };
        for ((index, file), (_, (line, warning))) in
            written.into_iter().zip(std::mem::take(&mut self.lines))
        {
            match file {
                Ok(f) => {
                    r.batch.push(f);
                    r.lines.push(line);
                    r.warnings.extend(warning);
                }
                Err(e) => self.fail(index, e),
            }
        }
        let other = self.other.map(|(_, e)| e);
        let unreadable = self.unreadable.into_iter().map(|(_, e)| e).collect();
        match failures(total, unreadable).or(other) {
            Some(e) => Err(e),
            None => Ok(r),
        }
    }
}

/// Applies the job to every (input, output) pair; `progress` is called after each input.
///
/// The stages overlap on their own threads: decoding the next inputs, applying, and encoding and
/// writing the last outputs (decoding and encoding are single-threaded and together cost more
/// than the apply). Frames are applied side by side, one engine thread each, where the memory
/// budget allows ([`workers`]): a frame's stages split over threads wait on each other and on
/// the codecs' threads, whole frames do not. Every input is read even after one fails, so the
/// error names each unreadable one; after a failure the rest are only decoded, since nothing
/// will be written. Unreadable inputs take precedence over other errors, as they are what the
/// user can fix first.
pub fn render(
    job: &Job,
    files: &[(PathBuf, PathBuf)],
    mut progress: impl FnMut(),
) -> Result<Rendered> {
    let limits = &job.cfg.limits;
    let workers = workers(job, files.len());
    let failed = AtomicBool::new(false);
    let (decoded_tx, decoded) = sync_channel(AHEAD);
    let decoded = Mutex::new(decoded);
    let (tally, written) = std::thread::scope(|s| {
        s.spawn(move || {
            for (index, (input, _)) in files.iter().enumerate() {
                if decoded_tx.send((index, read_image(input, limits))).is_err() {
                    break;
                }
            }
        });
        let (made_tx, made_rx) = sync_channel::<Made>(AHEAD);
        let writer = s.spawn(move || {
            made_rx
                .iter()
                .map(|m| (m.index, write(&m.out, &m.output, m.kind)))
                .collect::<Vec<_>>()
        });
        let (done_tx, done) = channel();
        let (decoded, failed) = (&decoded, &failed);
        for _ in 0..workers {
            let (made_tx, done_tx) = (made_tx.clone(), done_tx.clone());
            let threads = (job.eng.threads / workers).max(1);
            s.spawn(move || {
                // the lock is held while waiting: the other workers would wait for it anyway
                while let Some((index, img)) = decoded.lock().ok().and_then(|d| d.recv().ok()) {
                    let skip = failed.load(Ordering::Relaxed);
                    let outcome = outcome(job, &files[index], index, img, skip, threads, &made_tx);
                    if done_tx.send((index, outcome)).is_err() {
                        break;
                    }
                }
            });
        }
        drop((made_tx, done_tx));
        let mut tally = Tally::default();
        for (index, outcome) in done {
            tally.record(index, outcome);
            failed.store(tally.failed(), Ordering::Relaxed);
            progress();
        }
        (tally, writer.join())
    });
    let written = written.map_err(|_| Error::Invalid("the image writer thread panicked".into()))?;
    tally.finish(written, files.len())
}

/// Frames applied side by side: one per engine thread, when that many applies of the largest
/// frame the limits take fit the engine's memory budget (a board's `[engine] memory_mb`), else
/// one at a time on all the threads.
fn workers(job: &Job, files: usize) -> usize {
    let (eng, l) = (job.eng, &job.cfg.limits);
    let each = Engine::peak_mb(l.max_width as usize, l.max_height as usize, 0);
    let n = eng.threads.min(files).max(1);
    if eng.memory_mb == 0 || n as u64 * each <= u64::from(eng.memory_mb) {
        n
    } else {
        1
    }
}

/// What became of one decoded input: applied and handed to the writer, or why not.
fn outcome(
    job: &Job,
    (input, output): &(PathBuf, PathBuf),
    index: usize,
    img: Result<Image>,
    skip: bool,
    threads: usize,
    made_tx: &SyncSender<Made>,
) -> Outcome {
    let img = match img {
        Err(e) => return Outcome::Unreadable(e),
        Ok(_) if skip => return Outcome::Skipped,
        Ok(img) => img,
    };
    match apply_one(job, input, output, img, threads) {
        Ok((out, kind, line)) => {
            let made = Made {
                index,
                out,
                output: output.clone(),
                kind,
            };
            // the writer stopped: only a panic there does that, and render reports it
            match made_tx.send(made) {
                Ok(()) => Outcome::Made(line),
                Err(_) => Outcome::Skipped,
            }
        }
        Err(e) => Outcome::Failed(e),
    }
}

/// Applies the edit to one decoded input: the output image (the edit applies to the colours;
/// the alpha and depth go to the output as they came), its format, and its line and warning.
fn apply_one(
    job: &Job,
    input: &Path,
    output: &Path,
    img: Image,
    threads: usize,
) -> Result<(Image, ImageKind, (String, Option<String>))> {
    let kind = ImageKind::from_path(output).unwrap_or(ImageKind::Png);
    let warning = lost_in(&img, kind).map(|lost| {
        let it = if lost.contains(" and ") { "them" } else { "it" };
        format!(
            "warning: {}: written without the {lost} of {}, which JPEG cannot hold (a .png \
             output keeps {it})",
            output.display(),
            input.display()
        )
    });
    let t = job.template;
    // errors that are not about a file say which input they came from
    let (frame, score) = job
        .eng
        .apply_scored(
            t.edit(job.reverse),
            &img.frame,
            t.gate_hist(job.reverse),
            threads,
        )
        .map_err(|e| match e {
            Error::Invalid(m) => Error::Invalid(format!("{}: {m}", input.display())),
            other => other,
        })?;
    let line = line(job, input, output, score);
    Ok((Image { frame, ..img }, kind, (line, warning)))
}

fn write(out: &Image, output: &Path, kind: ImageKind) -> Result<PendingFile> {
    PendingFile::write(output, &encode_image(out, kind)?)
}

/// The line printed for a made output: its quality-gate score, flagged when it needs review.
fn line(job: &Job, input: &Path, output: &Path, score: f32) -> String {
    let t = job.template;
    let flag = if job.cfg.quality.needs_review(score, &t.card, job.reverse) {
        " needs_review"
    } else {
        ""
    };
    format!(
        "{} -> {}  score {score:.3}{flag}",
        input.display(),
        output.display()
    )
}

/// One error that names every unreadable input, or None when all were read.
fn failures(total: usize, mut failed: Vec<Error>) -> Option<Error> {
    match failed.len() {
        0 => None,
        1 if total == 1 => Some(failed.remove(0)),
        n => Some(Error::Inputs {
            failed: n,
            total,
            each: failed
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        }),
    }
}
