//! onnxruntime on the same float models, inputs and threads as tract, through
//! models/train/ort_bench.py: the reference for tract's speed on the two ONNX models.

use std::path::Path;
use std::process::Command;

use crate::engine::Engine;
use crate::{Error, Result};

/// tract's medians on both models, then onnxruntime's and the ratios when `python` has it.
pub fn compare(
    float: &Engine,
    python: &str,
    iters: usize,
    thumbs: &[Vec<f32>; 4],
    delta: &[f32],
) -> Result<()> {
    let hyper = super::time_ms(iters, || {
        float
            .models
            .hypernet([&thumbs[0], &thumbs[1], &thumbs[2], &thumbs[3]])
    })?;
    let back = super::time_ms(iters, || float.models.backbone(&thumbs[0], delta))?;
    println!("tract float: hypernet {hyper:.2} ms, backbone {back:.2} ms");
    if python == "none" {
        return Ok(());
    }
    match onnxruntime(
        python,
        &float.models.dir,
        float.threads,
        iters,
        thumbs,
        delta,
    ) {
        Ok((h, b)) => {
            println!("onnxruntime float: hypernet {h:.2} ms, backbone {b:.2} ms");
            println!(
                "ratio takumi/onnxruntime: hypernet {:.2}, backbone {:.2}, both {:.2}",
                hyper / h,
                back / b,
                (hyper + back) / (h + b)
            );
        }
        Err(e) => println!("onnxruntime comparison skipped: {e}"),
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
