//! `takumi apply` over files: each input decoded once, applied, encoded and written to a
//! temporary file of one [`Batch`], which the caller puts in place only when every input was
//! made. The same routine serves the command line and `takumi bench`'s folder figure, so the
//! figure is what a user pays.

use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

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
    lines: Vec<(String, Option<String>)>,
    unreadable: Vec<Error>,
    /// the first error that is not an unreadable input, with the input it came from
    other: Option<(usize, Error)>,
}

impl Tally {
    fn failed(&self) -> bool {
        !self.unreadable.is_empty() || self.other.is_some()
    }

    fn fail(&mut self, index: usize, e: Error) {
        if self.other.as_ref().is_none_or(|(i, _)| index < *i) {
            self.other = Some((index, e));
        }
    }

    /// The batch of every written output with its line and warning, or the one error to report
    /// (`written`: the writer's results, in the order of `lines`; `total`: the inputs).
    fn finish(
        mut self,
        written: Vec<(usize, Result<PendingFile>)>,
        total: usize,
    ) -> Result<Rendered> {
        let mut r = Rendered {
            batch: Batch::default(),
            lines: Vec::with_capacity(written.len()),
            warnings: Vec::new(),
        };
        for ((index, file), (line, warning)) in
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
        match failures(total, self.unreadable).or(other) {
            Some(e) => Err(e),
            None => Ok(r),
        }
    }
}

/// Applies the job to every (input, output) pair; `progress` is called after each input.
///
/// Three stages overlap on their own threads: decoding the next inputs, applying this one, and
/// encoding and writing the last ones, so a frame costs about its slowest stage rather than
/// the sum (decoding and encoding are single-threaded and together cost more than the apply).
/// Every input is read even after one fails, so the error names each unreadable one; after a
/// failure the rest are only decoded, since nothing will be written. Unreadable inputs take
/// precedence over other errors, as they are what the user can fix first.
pub fn render(
    job: &Job,
    files: &[(PathBuf, PathBuf)],
    mut progress: impl FnMut(),
) -> Result<Rendered> {
    let limits = &job.cfg.limits;
    let (tally, written) = std::thread::scope(|s| {
        let (decoded_tx, decoded) = sync_channel(AHEAD);
        s.spawn(move || {
            for (input, _) in files {
                if decoded_tx.send(read_image(input, limits)).is_err() {
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
        let mut tally = Tally::default();
        for (index, ((input, output), img)) in files.iter().zip(decoded).enumerate() {
            match img {
                Err(e) => tally.unreadable.push(e),
                Ok(_) if tally.failed() => {}
                Ok(img) => match apply_one(job, input, output, img) {
                    Ok((out, kind, line)) => {
                        tally.lines.push(line);
                        let made = Made {
                            index,
                            out,
                            output: output.clone(),
                            kind,
                        };
                        if made_tx.send(made).is_err() {
                            break; // the writer stopped: only a panic there does that
                        }
                    }
                    Err(e) => tally.fail(index, e),
                },
            }
            progress();
        }
        drop(made_tx);
        (tally, writer.join())
    });
    let written = written.map_err(|_| Error::Invalid("the image writer thread panicked".into()))?;
    tally.finish(written, files.len())
}

/// Applies the edit to one decoded input: the output image (the edit applies to the colours;
/// the alpha and depth go to the output as they came), its format, and its line and warning.
fn apply_one(
    job: &Job,
    input: &Path,
    output: &Path,
    img: Image,
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
        .apply_scored(t.edit(job.reverse), &img.frame, t.gate_hist(job.reverse))
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
