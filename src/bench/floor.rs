//! The machine's own limit for apply: G's floating-point work per frame, divided by this
//! machine's f32 multiply-add throughput measured in the same run. A ratio of apply time to that
//! floor travels between machines where absolute times do not.

use std::path::Path;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::Cost;
use tract_onnx::tract_core::ops::cnn::Conv;
use tract_onnx::tract_core::ops::einsum::EinSum;

use crate::engine::filterbank::gauss_kernel;
use crate::engine::model::{self, CK, K, SIGMAS};
use crate::{Error, Result};

/// Side of the square matmul that measures throughput: 2.1 GFLOP, long enough (milliseconds)
/// for the timer and the thread start-up to vanish, and 12 MB, as small as a board allows.
const SIDE: usize = 1024;

fn tract_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{what}: {e:#}"))
}

/// f32 GFLOP/s of tract's matrix kernel on a `SIDE`^3 matmul, median of `iters`, on the
/// threads tract was set up with (the engine sets its executor at load).
pub fn throughput_gflops(iters: usize) -> Result<f64> {
    let plan = matmul_plan().map_err(|e| tract_err("throughput matmul", e))?;
    let a = Tensor::from_shape(&[SIDE, SIDE], &vec![0.5f32; SIDE * SIDE])
        .map_err(|e| tract_err("throughput matmul", e))?;
    let ms = super::time_ms(iters, || {
        plan.run(tvec![a.clone().into()])
            .map(drop)
            .map_err(|e| tract_err("throughput matmul", e))
    })?;
    Ok(2.0 * (SIDE * SIDE * SIDE) as f64 / (ms * 1e6))
}

/// A[m][k] x B[k][n] with B constant, as a convolution's packed weights are.
fn matmul_plan() -> TractResult<Arc<TypedRunnableModel>> {
    let mut model = TypedModel::default();
    let a = model.add_source("a", f32::fact([SIDE, SIDE]))?;
    let b = model.add_const(
        "b",
        Tensor::from_shape(&[SIDE, SIDE], &vec![0.25f32; SIDE * SIDE])?,
    )?;
    let axes = "mk,kn->mn".parse()?;
    let c = model.wire_node("mm", EinSum::new(axes, f32::datum_type()), &[a, b])?;
    model.select_output_outlets(&c)?;
    model.into_optimized()?.into_runnable()
}

/// FLOP of the backbone ONNX model per frame: 2 x the multiply-adds of its convolutions and
/// matmuls, as tract's cost model counts them on the decluttered graph (the same for every
/// frame size: the backbone sees the thumbnail), once the template is a constant. The LoRA
/// products `B·A` (1.1 MFLOP) and the last layer's constant ones-channel are then folded away,
/// as in the plan specialised per template that apply runs: they cost once per template, not
/// per frame.
pub fn backbone_flop(path: &Path) -> Result<f64> {
    count_macs(path)
        .map(|m| 2.0 * m)
        .map_err(|e| tract_err(&path.display().to_string(), e))
}

fn count_macs(path: &Path) -> TractResult<f64> {
    let mut model = tract_onnx::onnx()
        .model_for_path(path)?
        .into_typed()?
        .into_decluttered()?;
    if let Some(input) = model::template_input(&model) {
        let len = model.input_fact(input)?.shape.volume().to_i64()? as usize;
        // any value folds the same products: 0.5, since a zero could be simplified away
        let t = Tensor::from_shape(&[1, len], &vec![0.5f32; len])?;
        model = model::constantize(model, input, t)?.into_decluttered()?;
    }
    let mut macs = 0.0;
    for node in model.nodes() {
        if !(node.op_is::<Conv>() || node.op_is::<EinSum>()) {
            continue;
        }
        let facts = model.node_input_facts(node.id)?;
        for (cost, n) in node.op.cost(&facts)? {
            if let Cost::FMA(_) = cost {
                macs += n.to_i64()? as f64;
            }
        }
    }
    Ok(macs)
}

/// FLOP per pixel of G's full-resolution stages, 2 per multiply-add: the separable blurs (rows
/// and columns, three channels, each sigma) and slicing (the coefficients interpolated from
/// four grid corners and luminance bins, then each output channel's dot product with the
/// pixel's K features).
pub fn full_res_flop_per_px() -> f64 {
    let blur: usize = SIGMAS.iter().map(|&s| 3 * 2 * gauss_kernel(s).len()).sum();
    let slice = 4 * CK + 3 * K;
    2.0 * (blur + slice) as f64
}

/// Wall time the FLOP of one frame of `w x h` takes at `gflops`: the floor apply can reach.
pub fn floor_ms(backbone_flop: f64, w: usize, h: usize, gflops: f64) -> f64 {
    let flop = backbone_flop + full_res_flop_per_px() * (w * h) as f64;
    flop / (gflops * 1e6)
}

/// The floor's inputs, measured once per run.
pub struct Floor {
    pub gflops: f64,
    pub backbone_flop: f64,
}

impl Floor {
    pub fn measure(models: &Path, iters: usize) -> Result<Self> {
        // measured first, before the backbone's graph is loaded and dropped again
        let gflops = throughput_gflops(iters)?;
        let backbone_flop = backbone_flop(&models.join("backbone.onnx"))?;
        Ok(Floor {
            gflops,
            backbone_flop,
        })
    }

    pub fn ms(&self, w: usize, h: usize) -> f64 {
        floor_ms(self.backbone_flop, w, h, self.gflops)
    }

    pub fn describe(&self, threads: usize) -> String {
        format!(
            "FLOP floor: f32 multiply-add throughput {:.1} GFLOP/s (tract matmul {SIDE}^3 on {threads} threads, this run); \
             G per frame = backbone {:.1} MFLOP (ONNX conv/matmul multiply-adds x2, the template folded) + {:.0} FLOP per pixel (blurs, slicing)",
            self.gflops,
            self.backbone_flop / 1e6,
            full_res_flop_per_px()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-frame count leaves out what the specialised plan folds: the seven LoRA products
    /// `B·A` of models/model.json's layout (559,648 multiply-adds), and the final 1x1
    /// convolution's constant ones-channel, which becomes a bias (384 outputs x 64 cells).
    #[test]
    fn backbone_flop_leaves_out_the_folded_lora_products() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/backbone.onnx");
        let folded = backbone_flop(&path).unwrap();
        let generic = {
            let m = tract_onnx::onnx().model_for_path(&path).unwrap();
            let m = m.into_typed().unwrap().into_decluttered().unwrap();
            let mut macs = 0.0;
            for n in m.nodes() {
                if n.op_is::<Conv>() || n.op_is::<EinSum>() {
                    for (c, k) in n.op.cost(&m.node_input_facts(n.id).unwrap()).unwrap() {
                        if let Cost::FMA(_) = c {
                            macs += k.to_i64().unwrap() as f64;
                        }
                    }
                }
            }
            2.0 * macs
        };
        assert_eq!(generic - folded, 2.0 * (559_648.0 + 384.0 * 64.0));
    }
}
