//! Which tract-linalg kernels this machine runs: the evidence that a board gets its NEON (or
//! fp16, or x86 FMA) code and not a portable fallback.
//!
//! tract probes the CPU once (aarch64: HWCAPs and `/proc/cpuinfo`; armv7: `/proc/cpuinfo`, or
//! `TRACT_CPU_ARM32_NEON=1`) and then picks a matrix-multiplication kernel per shape.
//! [`chosen`] asks the same dispatcher the convolutions use (`MmmDispatch::native().pick`) for
//! the shapes of our models, and [`plan_kernels`] reads the kernels an optimised model really
//! holds. `takumi` logs [`chosen`] at start-up at debug level (`TAKUMI_LOG=debug`).
//!
//! The full-resolution stages (blurs, slicing) run on pulp's SIMD, which probes the CPU the same
//! way: [`simd`] runs them, and [`stage_isa`] names what it picked.

use std::fmt;

use pulp::WithSimd;
use tract_linalg::isa::IsaSet;
use tract_linalg::mmm::Query;
use tract_linalg::{Func, MmmDispatch, routines};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::matmul::optimized::OptMatMul;

/// A convolution of the backbone as a matmul: m output channels, k = 3x3 taps x input channels,
/// n output pixels (a 64x64 thumbnail).
const CONV: (usize, usize, usize) = (32, 288, 64 * 64);

/// The element-wise and reduction routines worth naming: the ones our models use.
const ROUTINES: [Func; 5] = [
    Func::Sigmoid,
    Func::Tanh,
    Func::Exp,
    Func::ReduceSum,
    Func::ReduceMax,
];

/// What this machine's tract-linalg dispatch picks.
#[derive(Clone, Debug)]
pub struct Chosen {
    /// The probed instruction set, e.g. `aarch64` or `arm,neon` or `x86_64,avx,fma,...`.
    pub isa: String,
    /// The dispatch tiers that speak for it, highest precedence first.
    pub tiers: Vec<&'static str>,
    /// The f32 matmul kernel for a convolution of the models (m, k, n = [`CONV`]).
    pub mmm_f32: String,
    /// The f32 matrix-vector kernel (n = 1).
    pub mmv_f32: String,
    /// The f16 matmul kernel, where the CPU has fp16 arithmetic (ARMv8.2 `asimdhp`).
    pub mmm_f16: Option<String>,
    /// The int8 x int8 -> i32 matmul kernel (QLinearConv / ConvInteger).
    pub mmm_i8: Option<String>,
    /// f32 routines: (function, kernel).
    pub routines: Vec<(&'static str, &'static str)>,
    /// The SIMD of the blurs and slicing ([`stage_isa`]).
    pub stages: &'static str,
}

/// Runs a full-resolution pass on the widest SIMD this CPU has (pulp's run-time detection:
/// AVX-512, AVX2+FMA, NEON), or on pulp's scalar path (one lane) on other CPUs and for rows
/// narrower than the widest vector, `filterbank::MAX_LANES`.
pub(crate) fn simd<Op: WithSimd>(row_len: usize, op: Op) -> Op::Output {
    if row_len < super::filterbank::MAX_LANES {
        op.with_simd(pulp::Scalar)
    } else {
        pulp::Arch::new().dispatch(op)
    }
}

/// What [`simd`] runs on, on rows as wide as a frame.
pub fn stage_isa() -> &'static str {
    struct Name;
    impl WithSimd for Name {
        type Output = &'static str;
        fn with_simd<S: pulp::Simd>(self, _: S) -> &'static str {
            match S::F32_LANES {
                16 => "avx512",
                8 => "avx2+fma",
                4 if cfg!(target_arch = "aarch64") => "neon",
                1 => "scalar",
                _ => "simd",
            }
        }
    }
    simd(usize::MAX, Name)
}

fn pick(dispatch: &MmmDispatch, acc: DatumType, n: usize) -> Option<String> {
    let (m, k, _) = CONV;
    // as a convolution asks: weights packed ahead of time, so no panel extractor
    let query = Query {
        allow_extractor: false,
        ..Query::plain(acc, Some(m), Some(k), Some(n))
    };
    dispatch
        .pick(&query)
        .map(|(mmm, _, _)| mmm.name().to_string())
}

/// The kernels this machine's dispatch picks, as tract's own optimiser asks for them.
pub fn chosen() -> Chosen {
    let isa: IsaSet = tract_linalg::isa::native();
    let dispatch = MmmDispatch::native();
    let n = CONV.2;
    Chosen {
        isa: format!("{isa:?}"),
        tiers: dispatch.tiers().iter().map(|t| t.name).collect(),
        mmm_f32: pick(dispatch, DatumType::F32, n).unwrap_or_else(|| "none".into()),
        mmv_f32: pick(dispatch, DatumType::F32, 1).unwrap_or_else(|| "none".into()),
        mmm_f16: isa
            .fp16_arithmetic()
            .then(|| pick(dispatch, DatumType::F16, n))
            .flatten(),
        mmm_i8: pick(dispatch, DatumType::I32, n),
        routines: ROUTINES
            .iter()
            .filter_map(|f| {
                routines::best_for(*f, DatumType::F32, &isa).map(|r| (f.name(), r.name()))
            })
            .collect(),
        stages: stage_isa(),
    }
}

impl fmt::Display for Chosen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "isa [{}], tiers [{}], f32 matmul {}, f32 matvec {}, f16 matmul {}, int8 matmul {}",
            self.isa,
            self.tiers.join(" > "),
            self.mmm_f32,
            self.mmv_f32,
            self.mmm_f16
                .as_deref()
                .unwrap_or("none (no fp16 arithmetic)"),
            self.mmm_i8.as_deref().unwrap_or("none"),
        )?;
        for (func, kernel) in &self.routines {
            write!(f, ", {func} {kernel}")?;
        }
        write!(f, "; blurs and slicing on {}", self.stages)
    }
}

/// Logs [`chosen`] at debug level; called once at start-up.
pub fn log_chosen() {
    if tracing::enabled!(tracing::Level::DEBUG) {
        tracing::debug!("tract-linalg kernels: {}", chosen());
    }
}

/// The distinct matmul kernels an optimised model holds, sorted by name.
pub fn plan_kernels(model: &TypedModel) -> Vec<String> {
    let mut names: Vec<String> = model
        .nodes()
        .iter()
        .filter_map(|n| n.op_as::<OptMatMul>())
        .flat_map(|op| op.mmm.iter().map(|k| k.name().to_string()))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Loads and optimises an ONNX model as the engine does, and returns [`plan_kernels`] of it.
pub fn onnx_kernels(path: &std::path::Path) -> TractResult<Vec<String>> {
    let model = tract_onnx::onnx().model_for_path(path)?.into_optimized()?;
    Ok(plan_kernels(&model))
}
