//! onnxruntime on the same float models, inputs and threads as tract, through
//! models/train/ort_bench.py: the reference for tract's speed on the two ONNX models; and on the
//! backbone with the template folded in, the reference for tract's specialised plan.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use crate::engine::Engine;
use crate::engine::model::THUMB;
use crate::{Error, Result};

/// The backbone on its two tract plans, medians: the generic plan (the template an input), the
/// plan specialised for `delta`, and the time to build that plan.
pub struct Plans {
    pub generic: f64,
    pub specialised: f64,
    pub build: f64,
}

pub fn backbone_plans(eng: &Engine, thumb: &[f32], delta: &[f32], iters: usize) -> Result<Plans> {
    let m = &eng.models;
    let plan = m
        .specialise(delta)?
        .ok_or_else(|| Error::Invalid("this backbone has no template input".into()))?;
    Ok(Plans {
        generic: super::time_ms(iters, || m.backbone(thumb, delta))?,
        specialised: super::time_ms(iters, || m.backbone_with(&plan, thumb))?,
        build: super::time_ms(iters.div_ceil(4), || m.specialise(delta))?,
    })
}

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
    let p = backbone_plans(float, &thumbs[0], delta, iters)?;
    println!(
        "tract float: hypernet {hyper:.2} ms, backbone {:.2} ms generic plan, {:.2} ms specialised plan (built in {:.2} ms)",
        p.generic, p.specialised, p.build
    );
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
        Ok(o) => {
            println!(
                "onnxruntime float: hypernet {:.2} ms, backbone {:.2} ms as shipped (template an input), {:.2} ms with the template folded in",
                o.hyper, o.backbone, o.folded
            );
            // like for like: tract's generic plan against the model as shipped, its specialised
            // plan against onnxruntime given the same folded weights
            println!(
                "ratio takumi/onnxruntime: hypernet {:.2}, backbone {:.2} generic / {:.2} specialised (each against onnxruntime on the same form), \
                 hypernet + backbone {:.2} generic / {:.2} specialised; specialised against onnxruntime as shipped: backbone {:.2}, both {:.2}",
                hyper / o.hyper,
                p.generic / o.backbone,
                p.specialised / o.folded,
                (hyper + p.generic) / (o.hyper + o.backbone),
                (hyper + p.specialised) / (o.hyper + o.folded),
                p.specialised / o.backbone,
                (hyper + p.specialised) / (o.hyper + o.backbone),
            );
        }
        Err(e) => println!("onnxruntime comparison skipped: {e}"),
    }
    Ok(())
}

/// onnxruntime on the backbone with the template folded in: the template input made an
/// initializer, which onnxruntime's constant folding turns into `W + B·A` weights at session
/// start, as tract's specialised plan does. Inline, beside ort_bench.py's figures for the model
/// as shipped, with the same inputs file. Prints the median ms.
const ORT_FOLDED: &str = r#"
import sys, time
import numpy as np, onnx, onnxruntime as ort
from onnx import numpy_helper
models, inputs, threads, iters, side = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
raw = np.fromfile(inputs, dtype="<f4")
n = 3 * side * side
thumb, tmpl = raw[:n].reshape(1, 3, side, side), raw[4 * n:].reshape(1, -1)
m = onnx.load(models + "/backbone.onnx")
m.graph.input.remove(next(i for i in m.graph.input if i.name == "template"))
m.graph.initializer.append(numpy_helper.from_array(tmpl, "template"))
so = ort.SessionOptions()
so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
s.run(None, {"thumb": thumb})
ts = []
for _ in range(iters):
    t0 = time.perf_counter()
    s.run(None, {"thumb": thumb})
    ts.append((time.perf_counter() - t0) * 1e3)
print(f"{float(np.median(ts)):.4f}")
"#;

/// onnxruntime's medians: hypernet and backbone as shipped, and the backbone with the template
/// folded in.
struct Ort {
    hyper: f64,
    backbone: f64,
    folded: f64,
}

fn onnxruntime(
    python: &str,
    models: &Path,
    threads: usize,
    iters: usize,
    thumbs: &[Vec<f32>; 4],
    delta: &[f32],
) -> Result<Ort> {
    let dir = std::env::temp_dir().join(format!("takumi-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut raw = Vec::new();
    for t in thumbs.iter().map(|v| v.as_slice()).chain([delta]) {
        raw.extend(t.iter().flat_map(|v| v.to_le_bytes()));
    }
    let input = dir.join("inputs.f32");
    let run = || -> Result<Ort> {
        std::fs::write(&input, &raw).map_err(|e| Error::io(&input, e))?;
        let script = models.join("train/ort_bench.py");
        let args = [models.as_os_str(), input.as_os_str()];
        let (t, n) = (threads.to_string(), iters.to_string());
        let shipped = run_python(python, &[script.as_os_str()], &args, &[&t, &n])?;
        let side = THUMB.to_string();
        let folded = run_python(
            python,
            &["-c".as_ref(), ORT_FOLDED.as_ref()],
            &args,
            &[&t, &n, &side],
        )?;
        match (shipped.as_slice(), folded.as_slice()) {
            (&[hyper, backbone], &[folded]) => Ok(Ort {
                hyper,
                backbone,
                folded,
            }),
            _ => Err(Error::Invalid(format!(
                "unexpected output from {}",
                script.display()
            ))),
        }
    };
    let out = run();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// The numbers `python` prints when run with `script` (a file, or `-c` and its text), `paths`
/// and `nums` as arguments; its stderr's last line as the error when it fails.
fn run_python(
    python: &str,
    script: &[&OsStr],
    paths: &[&OsStr],
    nums: &[&String],
) -> Result<Vec<f64>> {
    let out = Command::new(python)
        .args(script)
        .args(paths)
        .args(nums)
        .output()
        .map_err(|e| Error::Invalid(format!("{python}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Invalid(
            err.lines().last().unwrap_or("failed").to_string(),
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .filter_map(|v| v.parse::<f64>().ok())
        .collect())
}
