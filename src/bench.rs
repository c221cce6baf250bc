//! `takumi bench`: the figures the engine issue names, measured in one run: learn latency, apply
//! latency at 640x480 and 1920x1080 in float and int8, start-up to first result, peak RSS, and
//! onnxruntime running the same ONNX models on the same inputs with the same threads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::capture::load_image;
use crate::config::Config;
use crate::engine::{Edit, Engine, Precision, bank, filterbank};
use crate::{Error, Result};

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
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
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

pub fn run(cfg: &Config, args: &BenchArgs) -> Result<()> {
    let t_start = Instant::now();
    let lim = &cfg.limits;
    let s = &args.samples;
    let (a, _) = load_image(&s.join("pair_before.jpg"), lim)?;
    let (a2, _) = load_image(&s.join("pair_after.jpg"), lim)?;
    let (cap, _) = load_image(&s.join("captures/rocket.jpg"), lim)?;
    let threads = cfg.engine.threads;
    let float = Engine::load(&cfg.engine.models, Precision::Float, threads)?;
    let first = float.learn(&[(a.clone(), a2.clone())])?;
    let vga = cap.resized(640, 480);
    float.apply_edit(first.edit(false), &vga)?;
    let startup = t_start.elapsed().as_secs_f64() * 1e3;
    println!(
        "takumi bench: {threads} threads, {} iterations, medians",
        args.iters
    );
    println!("start-up to first result (load, learn, apply 640x480): {startup:.0} ms");
    let learn = time_ms(args.iters, || float.learn(&[(a.clone(), a2.clone())]))?;
    println!(
        "learn (one {}x{} pair, float): {learn:.1} ms",
        a.width, a.height
    );
    let (va, va2) = (a.resized(640, 480), a2.resized(640, 480));
    let learn_vga = time_ms(args.iters, || float.learn(&[(va.clone(), va2.clone())]))?;
    println!("learn (one 640x480 pair, float): {learn_vga:.1} ms");
    let hd = cap.resized(1920, 1080);
    let int8 = Engine::load(&cfg.engine.models, Precision::Int8, threads)?;
    let mut model_ms = (0.0, 0.0);
    for (name, eng) in [("float", &float), ("int8", &int8)] {
        for f in [&vga, &hd] {
            let ms = time_ms(args.iters, || eng.apply(&first.delta, f, false))?;
            println!("apply {}x{} {name}: {ms:.1} ms", f.width, f.height);
        }
    }
    // the worst case of a template: every feature of the residual stage in use
    let full = vec![1e-3f32; bank::NF * 3];
    for f in [&vga, &hd] {
        let g_only = time_ms(args.iters, || float.apply(&first.delta, f, false))?;
        let edit = Edit {
            delta: &first.delta,
            residual: &full,
        };
        let ms = time_ms(args.iters, || float.apply_edit(edit, f))?;
        println!(
            "apply {}x{} float, with the full residual stage: {ms:.1} ms ({:.2}x G alone, {g_only:.1} ms, same run)",
            f.width,
            f.height,
            ms / g_only
        );
    }
    // the ONNX models alone, for the onnxruntime comparison
    let thumbs = [
        filterbank::thumbnail(&a),
        filterbank::thumbnail(&a2),
        filterbank::centre_patch(&a),
        filterbank::centre_patch(&a2),
    ];
    model_ms.0 = time_ms(args.iters * 4, || {
        float
            .models
            .hypernet([&thumbs[0], &thumbs[1], &thumbs[2], &thumbs[3]])
    })?;
    model_ms.1 = time_ms(args.iters * 4, || {
        float.models.backbone(&thumbs[0], &first.delta)
    })?;
    println!(
        "tract float: hypernet {:.2} ms, backbone {:.2} ms",
        model_ms.0, model_ms.1
    );
    println!("peak RSS: {:.0} MB", peak_rss_mb());
    if args.python != "none" {
        match onnxruntime(
            &args.python,
            &cfg.engine.models,
            threads,
            args.iters * 4,
            &thumbs,
            &first.delta,
        ) {
            Ok((h, b)) => {
                println!("onnxruntime float: hypernet {h:.2} ms, backbone {b:.2} ms");
                println!(
                    "ratio takumi/onnxruntime: hypernet {:.2}, backbone {:.2}, both {:.2}",
                    model_ms.0 / h,
                    model_ms.1 / b,
                    (model_ms.0 + model_ms.1) / (h + b)
                );
            }
            Err(e) => println!("onnxruntime comparison skipped: {e}"),
        }
    }
    Ok(())
}

fn onnxruntime(
    python: &str,
    models: &Path,
    threads: usize,
    iters: usize,
    thumbs: &[Vec<f32>; 4],
    delta: &[f32],
) -> Result<(f64, f64)> {
    let dir = std::env::temp_dir().join(format!("takumi-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut raw = Vec::new();
    for t in thumbs.iter().map(|v| v.as_slice()).chain([delta]) {
        raw.extend(t.iter().flat_map(|v| v.to_le_bytes()));
    }
    let input = dir.join("inputs.f32");
    std::fs::write(&input, &raw).map_err(|e| Error::io(&input, e))?;
    let script = models.join("train/ort_bench.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(models)
        .arg(&input)
        .arg(threads.to_string())
        .arg(iters.to_string())
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.map_err(|e| Error::Invalid(format!("{python}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Invalid(
            err.lines().last().unwrap_or("failed").to_string(),
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text
        .split_whitespace()
        .filter_map(|v| v.parse::<f64>().ok());
    match (it.next(), it.next()) {
        (Some(h), Some(b)) => Ok((h, b)),
        _ => Err(Error::Invalid(format!(
            "unexpected output from {}",
            script.display()
        ))),
    }
}
