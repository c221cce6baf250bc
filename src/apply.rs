//! `takumi apply` over files: each input decoded once, applied, encoded and written to a
//! temporary file of one [`Batch`], which the caller puts in place only when every input was
//! made. The same routine serves the command line and `takumi bench`'s folder figure, so the
//! figure is what a user pays.

use std::path::{Path, PathBuf};

use crate::capture::{Image, read_image};
use crate::config::Config;
use crate::engine::Engine;
use crate::publish::file::{Batch, ImageKind, PendingFile, encode_image, lost_in};
use crate::store::Template;
use crate::{Error, Frame, Result};

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

/// How an input went: made (with its line and any warning), or unreadable (it could not be
/// decoded).
enum Step {
    Made(PendingFile, String, Option<String>),
    Unreadable(Error),
}

/// Applies the job to every (input, output) pair; `progress` is called after each input.
///
/// Every input is read even after one fails, so the error names each unreadable one; after a
/// failure the rest are only decoded, since nothing will be written. Unreadable inputs take
/// precedence over other errors, as they are what the user can fix first.
pub fn render(
    job: &Job,
    files: &[(PathBuf, PathBuf)],
    mut progress: impl FnMut(),
) -> Result<Rendered> {
    let mut batch = Batch::default();
    let mut lines = Vec::with_capacity(files.len());
    let mut warnings = Vec::new();
    let mut unreadable = Vec::new();
    let mut other: Option<Error> = None;
    for (i, o) in files {
        let failed = !unreadable.is_empty() || other.is_some();
        match step(job, i, o, failed) {
            Ok(Some(Step::Made(f, line, warning))) => {
                batch.push(f);
                lines.push(line);
                warnings.extend(warning);
            }
            Ok(Some(Step::Unreadable(e))) => unreadable.push(e),
            Ok(None) => {}
            Err(e) => other = other.or(Some(e)),
        }
        progress();
    }
    if let Some(e) = failures(files.len(), unreadable).or(other) {
        return Err(e);
    }
    Ok(Rendered {
        batch,
        lines,
        warnings,
    })
}

/// Decodes one input, and unless an earlier input `failed`, applies, encodes and writes it.
fn step(job: &Job, input: &Path, output: &Path, failed: bool) -> Result<Option<Step>> {
    let img = match read_image(input, &job.cfg.limits) {
        Ok(img) => img,
        Err(e) => return Ok(Some(Step::Unreadable(e))),
    };
    if failed {
        return Ok(None);
    }
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
    let line = line(job, input, output, &img.frame);
    let made = make(job, input, output, img, kind)?;
    Ok(Some(Step::Made(made, line, warning)))
}

/// The edit applies to the colours; the alpha and depth go to the output as they came.
fn make(
    job: &Job,
    input: &Path,
    output: &Path,
    img: Image,
    kind: ImageKind,
) -> Result<PendingFile> {
    // errors that are not about a file say which input they came from
    let frame = job
        .eng
        .apply_edit(job.template.edit(job.reverse), &img.frame)
        .map_err(|e| match e {
            Error::Invalid(m) => Error::Invalid(format!("{}: {m}", input.display())),
            other => other,
        })?;
    let out = Image { frame, ..img };
    PendingFile::write(output, &encode_image(&out, kind)?)
}

/// The line printed for a made output: its quality-gate score, flagged when it needs review.
fn line(job: &Job, input: &Path, output: &Path, frame: &Frame) -> String {
    let t = job.template;
    let score = job.eng.score(t.gate_hist(job.reverse), frame);
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
