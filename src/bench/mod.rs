//! `takumi bench`: the figures the engine issue names, measured in one run: learn latency, apply
//! latency at 640x480 and 1920x1080 in float and int8 against this machine's FLOP floor,
//! start-up to first result, trigger to result through the station, folder apply with files in
//! and out, peak RSS, and onnxruntime running the same ONNX models on the same inputs with the
//! same threads. Absolute times on shared machines swing by 3x, so each figure is printed with
//! its reference from the same run.

mod e2e;
mod floor;
mod folder;
mod ort;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::apply::Job;
use crate::capture::load_image;
use crate::config::Config;
use crate::engine::align::{self, Similarity};
use crate::engine::{Edit, Engine, Learned, Precision, bank, filterbank, slice};
use crate::store::{Template, TemplateName};
use crate::{Error, Frame, Result};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Timed repetitions per figure (the median is reported).
    #[arg(long, default_value_t = 15)]
    pub iters: usize,
    /// Sample folder: pair_before.jpg, pair_after.jpg, captures/.
    #[arg(long, default_value = "models/samples")]
    pub samples: PathBuf,
    /// Python with onnxruntime for the comparison; "none" skips it.
    #[arg(long, env = "TAKUMI_PYTHON", default_value = "python3")]
    pub python: String,
    /// Timed triggers per resolution through the station (p50 and p99 are reported).
    #[arg(long, default_value_t = 200)]
    pub captures: usize,
}

fn median(v: Vec<f64>) -> f64 {
    percentile(v, 50.0)
}

/// The nearest-rank percentile `p` (0 to 100) of `v`; NaN for none.
fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = (p / 100.0 * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len().max(1)) - 1)
        .copied()
        .unwrap_or(f64::NAN)
}

fn time_ms<T>(iters: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    f()?; // warm-up
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(v))
}

pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The sample pair and captures, decoded once.
struct Samples {
    before: Frame,
    after: Frame,
    captures: Vec<Frame>,
}

impl Samples {
    fn load(dir: &Path, cfg: &Config) -> Result<Self> {
        let lim = &cfg.limits;
        let caps = dir.join("captures");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&caps)
            .map_err(|e| Error::io(&caps, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        // rocket first: the capture the single-frame figures have always used
        names.sort_by_key(|p| !p.ends_with("rocket.jpg"));
        Ok(Samples {
            before: load_image(&dir.join("pair_before.jpg"), lim)?,
            after: load_image(&dir.join("pair_after.jpg"), lim)?,
            captures: names
                .iter()
                .map(|p| load_image(p, lim))
                .collect::<Result<_>>()?,
        })
    }

    fn pair(&self) -> [(Frame, Frame); 1] {
        [(self.before.clone(), self.after.clone())]
    }

    fn captures_at(&self, w: usize, h: usize) -> Vec<Frame> {
        self.captures.iter().map(|c| c.resized(w, h)).collect()
    }
}

/// The sizes every apply figure is given at.
const SIZES: [(usize, usize); 2] = [(640, 480), (1920, 1080)];

pub fn run(cfg: &Config, args: &BenchArgs) -> Result<()> {
    let t_start = Instant::now();
    let s = Samples::load(&args.samples, cfg)?;
    let threads = cfg.engine.threads;
    let float = Engine::load(&cfg.engine.models, Precision::Float, threads)?;
    let first = float.learn(&s.pair())?;
    let frames: Vec<Frame> = SIZES
        .iter()
        .map(|&(w, h)| s.captures[0].resized(w, h))
        .collect();
    float.apply_edit(first.edit(false), &frames[0])?;
    let startup = t_start.elapsed().as_secs_f64() * 1e3;
    println!(
        "takumi bench: {threads} threads, {} iterations, medians",
        args.iters
    );
    println!("start-up to first result (load, learn, apply 640x480): {startup:.0} ms");
    learn_figures(&float, &s, args.iters)?;
    let g_ms = apply_figures(cfg, &float, &first, &frames, args.iters)?;
    let floor = floor::Floor::measure(&cfg.engine.models, args.iters)?;
    println!("{}", floor.describe(threads));
    for (f, ms) in frames.iter().zip(&g_ms) {
        let fl = floor.ms(f.width, f.height);
        println!(
            "apply {}x{} float: {ms:.1} ms = {:.1}x its FLOP floor ({fl:.2} ms, same run)",
            f.width,
            f.height,
            ms / fl
        );
    }
    stage_figures(&float, &first, &frames, args.iters)?;
    residual_figures(&float, &first, &frames, args.iters)?;
    let thumbs = [
        filterbank::thumbnail(&s.before),
        filterbank::thumbnail(&s.after),
        filterbank::centre_patch(&s.before),
        filterbank::centre_patch(&s.after),
    ];
    let delta = first.delta.clone();
    let t = first.into_template(
        TemplateName::new("bench").map_err(|e| Error::Invalid(e.to_string()))?,
        float.models.hash.clone(),
        0,
        Vec::new(),
    );
    user_figures(cfg, &float, &t, &s, args)?;
    ort::compare(&float, &args.python, args.iters * 4, &thumbs, &delta)?;
    println!("peak RSS: {:.0} MB", peak_rss_mb());
    Ok(())
}

fn learn_figures(float: &Engine, s: &Samples, iters: usize) -> Result<()> {
    let learn = time_ms(iters, || float.learn(&s.pair()))?;
    let (w, h) = (s.before.width, s.before.height);
    println!("learn (one {w}x{h} pair, float): {learn:.1} ms");
    let vga = [(s.before.resized(640, 480), s.after.resized(640, 480))];
    let learn_vga = time_ms(iters, || float.learn(&vga))?;
    println!("learn (one 640x480 pair, float): {learn_vga:.1} ms");
    // the part turned and scaled in the after shot: registration resamples it, and the before
    // shot is low-passed to match (what a whole-pixel shift skips)
    let turn = Similarity {
        dx: 12.0,
        dy: -8.0,
        angle_deg: 3.0,
        scale: 1.04,
    };
    let turned = [(vga[0].0.clone(), align::warp(&vga[0].1, &turn).0)];
    let learn_turned = time_ms(iters, || float.learn(&turned))?;
    println!("learn (one 640x480 pair turned 3 deg, scaled x1.04, float): {learn_turned:.1} ms");
    Ok(())
}

/// Apply (G alone) in float and int8 at each size; returns the float medians.
fn apply_figures(
    cfg: &Config,
    float: &Engine,
    first: &Learned,
    frames: &[Frame],
    iters: usize,
) -> Result<Vec<f64>> {
    let g = |eng: &Engine, f: &Frame| time_ms(iters, || eng.apply(&first.delta, f, false));
    let ms: Vec<f64> = frames.iter().map(|f| g(float, f)).collect::<Result<_>>()?;
    let int8 = Engine::load(&cfg.engine.models, Precision::Int8, float.threads)?;
    for (f, fl) in frames.iter().zip(&ms) {
        println!("apply {}x{} float: {fl:.1} ms", f.width, f.height);
        println!(
            "apply {}x{} int8: {:.1} ms",
            f.width,
            f.height,
            g(&int8, f)?
        );
    }
    let thumb = filterbank::thumbnail(&frames[0]);
    for eng in [float, &int8] {
        let p = ort::backbone_plans(eng, &thumb, &first.delta, iters)?;
        println!(
            "backbone {}: generic plan {:.2} ms, specialised plan {:.2} ms = {:.2}x, built in {:.2} ms = {:.1} generic runs",
            eng.models.precision,
            p.generic,
            p.specialised,
            p.specialised / p.generic,
            p.build,
            p.build / p.generic
        );
    }
    Ok(ms)
}

/// Where G's time goes: the full-resolution blurs and slicing, and the backbone on the
/// thumbnail (on the template's specialised plan, as apply runs it after its first time).
fn stage_figures(float: &Engine, first: &Learned, frames: &[Frame], iters: usize) -> Result<()> {
    let n = float.threads;
    for f in frames {
        let blurs = filterbank::blurs(f, n);
        let thumb = filterbank::thumbnail(f);
        let grid = float.models.backbone_cached(&thumb, &first.delta)?;
        let b = time_ms(iters, || Ok(filterbank::blurs(f, n)))?;
        let t = time_ms(iters, || Ok(filterbank::thumbnail_on(f, n)))?;
        let g = time_ms(iters, || float.models.backbone_cached(&thumb, &first.delta))?;
        let s = time_ms(iters, || Ok(slice::apply(f, &blurs, &grid, n)))?;
        println!(
            "apply {}x{} float, by stage: blurs {b:.1} ms, thumbnail {t:.1} ms, backbone {g:.1} ms, slicing {s:.1} ms",
            f.width, f.height
        );
    }
    Ok(())
}

/// Apply with the residual stage against G alone: every feature in use (the worst case), the
/// bank group alone (colour, blurs, bias), and the bank group without its sigma 2.5 blur, what
/// most of the card's templates that run a full-resolution blur pass keep (model card).
fn residual_figures(float: &Engine, first: &Learned, frames: &[Frame], iters: usize) -> Result<()> {
    let full = vec![1e-3f32; bank::NF * 3];
    let mut bank_only = full.clone();
    bank_only[3 * bank::POSITION.start..].fill(0.0);
    let mut sigma_1 = bank_only.clone();
    for j in bank::BLURS.filter(|&j| bank::SCALES_MID >> bank::scale(j) & 1 != 0) {
        sigma_1[3 * j..3 * (j + 1)].fill(0.0);
    }
    for f in frames {
        let g_only = time_ms(iters, || float.apply(&first.delta, f, false))?;
        for (what, residual) in [
            ("the full residual stage", &full),
            ("the bank group", &bank_only),
            ("the bank group without sigma 2.5", &sigma_1),
        ] {
            let edit = Edit {
                delta: &first.delta,
                residual,
            };
            let ms = time_ms(iters, || float.apply_edit(edit, f))?;
            println!(
                "apply {}x{} float, with {what}: {ms:.1} ms ({:.2}x G alone, {g_only:.1} ms, same run)",
                f.width,
                f.height,
                ms / g_only
            );
        }
    }
    Ok(())
}

/// A folder under the system's temporary folder, removed with everything in it on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Result<Self> {
        let d = std::env::temp_dir().join(format!("takumi-bench-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        Ok(Scratch(d))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a user pays: folder apply with files in and out, and trigger to result through the
/// station, each against apply of the same template at the same size, in this run.
fn user_figures(
    cfg: &Config,
    float: &Engine,
    t: &Template,
    s: &Samples,
    args: &BenchArgs,
) -> Result<()> {
    let mut cfg = cfg.clone();
    cfg.engine.precision = Precision::Float;
    let job = Job {
        cfg: &cfg,
        eng: float,
        template: t,
        reverse: false,
    };
    for (i, &(w, h)) in SIZES.iter().enumerate() {
        let frames = s.captures_at(w, h);
        let apply = time_ms(args.iters, || float.apply_edit(t.edit(false), &frames[0]))?;
        println!(
            "apply {w}x{h} float, the sample template as stored: {apply:.1} ms (the reference below)"
        );
        if i == 0 {
            let dir = Scratch::new("folder")?;
            let jobs = folder::inputs(&dir.0, &frames)?;
            let ms = folder::ms_per_frame(&job, &jobs, args.iters.div_ceil(3))?;
            println!(
                "folder apply {w}x{h} JPEG, files in and out (decode, apply, encode, write; {} files): {ms:.1} ms per frame = {:.2}x apply",
                jobs.len(),
                ms / apply
            );
        }
        let dir = Scratch::new("station")?;
        let v = e2e::run(&cfg, &dir.0, &frames, t, args.captures)?;
        let (p50, p99) = (percentile(v.clone(), 50.0), percentile(v, 99.0));
        println!(
            "trigger -> result acknowledged {w}x{h} (embedded broker, {} captures): p50 {p50:.1} ms = {:.2}x apply, p99 {p99:.1} ms = {:.2}x apply",
            args.captures,
            p50 / apply,
            p99 / apply
        );
    }
    Ok(())
}
