//! tract runs the same function as onnxruntime and the PyTorch reference: the golden vectors in
//! tests/fixtures/golden were written by models/train/export.py.

mod common;

use common::*;
use takumi::Frame;
use takumi::engine::{Models, Precision, filterbank, slice};

/// int8 tolerance stated in models/MODEL_CARD.md: tract computes the QDQ graph in float, while
/// onnxruntime runs true int8 kernels, so they differ by a few quantisation steps.
const INT8_TOL_TEMPLATE: f32 = 0.05;
const INT8_TOL_GRID: f32 = 0.02;

fn golden(name: &str) -> std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> {
    tensors(
        &repo()
            .join("tests/fixtures/golden")
            .join(format!("{name}.safetensors")),
    )
}

fn check(precision: Precision, tol_t: f32, tol_g: f32) {
    let tag = precision.to_string();
    let m = Models::load(&models(), precision).unwrap();
    let h = golden(&format!("hypernet_{tag}"));
    let t = m
        .hypernet([
            &h["thumb_a"].1,
            &h["thumb_a2"].1,
            &h["patch_a"].1,
            &h["patch_a2"].1,
        ])
        .unwrap();
    let d = max_abs_diff(&t, &h["template"].1);
    assert!(d <= tol_t, "{tag} hypernet differs from onnxruntime by {d}");
    let g = golden(&format!("backbone_{tag}"));
    let grid = m.backbone(&g["thumb"].1, &g["template"].1).unwrap();
    let d = max_abs_diff(&grid, &g["grid"].1);
    assert!(d <= tol_g, "{tag} backbone differs from onnxruntime by {d}");
    // the plan `apply` runs from a template's second apply on: the template folded into the
    // weights (issue 13)
    let plan = m.specialise(&g["template"].1).unwrap().unwrap();
    let grid = m.backbone_with(&plan, &g["thumb"].1).unwrap();
    let d = max_abs_diff(&grid, &g["grid"].1);
    assert!(
        d <= tol_g,
        "{tag} specialised backbone differs from onnxruntime by {d}"
    );
}

#[test]
fn float_models_match_onnxruntime() {
    check(Precision::Float, 1e-4, 1e-4);
}

#[test]
fn int8_models_match_onnxruntime_within_stated_tolerance() {
    check(Precision::Int8, INT8_TOL_TEMPLATE, INT8_TOL_GRID);
}

fn frame(t: &(Vec<usize>, Vec<f32>)) -> Frame {
    let s = &t.0;
    Frame {
        width: s[3],
        height: s[2],
        data: t.1.clone(),
    }
}

#[test]
fn full_resolution_stages_match_pytorch() {
    let p = golden("pipeline");
    let img = frame(&p["image"]);
    let d = max_abs_diff(&filterbank::thumbnail(&img), &p["thumb"].1);
    assert!(d <= 1e-5, "thumbnail differs by {d}");
    let src = frame(&p["patch_src"]);
    let d = max_abs_diff(&filterbank::centre_patch(&src), &p["patch"].1);
    assert_eq!(d, 0.0, "centre patch differs");
    // features: colour, two blurs, bias, hue terms
    let blurs = filterbank::blurs(&img, 2);
    let n = img.width * img.height;
    let feats = &p["features"].1;
    let mut f = [0.0f32; 16];
    let mut worst = 0.0f32;
    for i in 0..n {
        let rgb = [img.data[i], img.data[n + i], img.data[2 * n + i]];
        let b0 = std::array::from_fn(|c| blurs.planes[0][c][i]);
        let b1 = std::array::from_fn(|c| blurs.planes[1][c][i]);
        filterbank::pixel_features(rgb, b0, b1, &mut f);
        for (k, v) in f.iter().enumerate() {
            worst = worst.max((v - feats[k * n + i]).abs());
        }
    }
    assert!(worst <= 1e-5, "features differ by {worst}");
    let out = slice::apply(&img, &blurs, &p["grid"].1, 2);
    let d = max_abs_diff(&out.data, &p["output"].1);
    assert!(d <= 1e-4, "sliced output differs by {d}");
}

#[test]
fn the_whole_g_matches_pytorch() {
    let p = golden("pipeline");
    let img = frame(&p["image"]);
    let m = Models::load(&models(), Precision::Float).unwrap();
    let grid = m
        .backbone(&filterbank::thumbnail(&img), &p["template"].1)
        .unwrap();
    let out = slice::apply(&img, &filterbank::blurs(&img, 1), &grid, 1);
    let d = max_abs_diff(&out.data, &p["output"].1);
    assert!(d <= 1e-4, "G differs from the PyTorch reference by {d}");
}
