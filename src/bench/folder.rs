//! `takumi apply` over a folder, files in and files out, as the command runs it
//! ([`crate::apply::render`] and the batch's commit): decode, apply, encode, write, per frame.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::apply::{Job, render};
use crate::publish::file::{ImageKind, encode};
use crate::{Error, Frame, Result};

/// Inputs a run applies to: enough that per-run set-up is noise next to the frames.
pub const FILES: usize = 20;

/// Writes `FILES` JPEG copies of `frames` (cycled) into `dir`/in; returns the (input, output)
/// pairs, outputs going to `dir`/out.
pub fn inputs(dir: &Path, frames: &[Frame]) -> Result<Vec<(PathBuf, PathBuf)>> {
    let (src, dst) = (dir.join("in"), dir.join("out"));
    for d in [&src, &dst] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let mut jobs = Vec::with_capacity(FILES);
    for (i, f) in frames.iter().cycle().take(FILES).enumerate() {
        let name = format!("frame{i:03}.jpg");
        let p = src.join(&name);
        std::fs::write(&p, encode(f, ImageKind::Jpeg)?).map_err(|e| Error::io(&p, e))?;
        jobs.push((p, dst.join(name)));
    }
    Ok(jobs)
}

/// Median ms per frame of `iters` folder runs over `jobs`, outputs replaced each run.
pub fn ms_per_frame(job: &Job, jobs: &[(PathBuf, PathBuf)], iters: usize) -> Result<f64> {
    let once = || -> Result<f64> {
        let t = Instant::now();
        render(job, jobs, || {})?.batch.commit()?;
        Ok(t.elapsed().as_secs_f64() * 1e3 / jobs.len().max(1) as f64)
    };
    once()?; // warm-up: the page cache and the output files exist from here on
    let v = (0..iters.max(1))
        .map(|_| once())
        .collect::<Result<Vec<_>>>()?;
    Ok(super::median(v))
}
