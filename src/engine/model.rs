//! The two ONNX models, loaded and optimised once with tract, and the constants they were
//! trained with (checked against models/model.json at load, so a model/code mismatch is an
//! error at start-up rather than wrong pixels later).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::transform::{NodeFilter, build_float_translator};

use crate::{Error, Result};

pub const THUMB: usize = 64;
pub const PATCH: usize = 64;
pub const GRID: usize = 8;
pub const LBINS: usize = 8;
pub const K: usize = 16;
pub const HUES: usize = 6;
pub const SIGMAS: [f32; 2] = [1.5, 6.0];
pub const LUMA: [f32; 3] = [0.299, 0.587, 0.114];
/// Largest grid coefficient `apply` accepts. A learned template's grid maps features in
/// [0, 1] to colour changes of a few units; a crafted one whose values pass the store's bounds
/// can still multiply up through the LoRA layers to 1e30 or infinity, and slicing would then
/// write NaN pixels (inf - inf). Refusing such a grid keeps every output finite.
pub const GRID_MAX_ABS: f32 = 1e6;
/// Coefficients per grid cell and luminance bin: 3 outputs x K features.
pub const CK: usize = 3 * K;
pub const GRID_CH: usize = LBINS * CK;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Float,
    /// The float models run in half precision (tract's `f32_to_f16` transform): for ARMv8.2
    /// cores with fp16 arithmetic (Pi 5's A76, Orin's A78AE), where tract has fp16 kernels.
    F16,
    Int8,
}

/// For the CLI's `--precision` (clap parses through this, so the engine needs no clap).
impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "float" => Ok(Precision::Float),
            "f16" => Ok(Precision::F16),
            "int8" => Ok(Precision::Int8),
            _ => Err(format!("{s:?}: expected float, f16 or int8")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Float => "float",
            Precision::F16 => "f16",
            Precision::Int8 => "int8",
        })
    }
}

#[derive(Debug, Deserialize)]
struct ModelMeta {
    template_len: usize,
    thumb: usize,
    patch: usize,
    grid: usize,
    lbins: usize,
    k: usize,
    sigmas: Vec<f32>,
    hues: usize,
    layout: Vec<(String, Vec<usize>)>,
}

type Plan = Arc<TypedRunnableModel>;

pub struct Models {
    hyper: Plan,
    backbone: Plan,
    pub template_len: usize,
    /// Offset of the grid's global coefficient offset inside the template vector.
    pub offset_at: usize,
    /// blake3 of model.json and the float ONNX files: the identity templates are bound to.
    pub hash: String,
    pub precision: Precision,
    pub dir: PathBuf,
}

fn model_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Model {
        path: path.into(),
        reason: e.to_string(),
    }
}

fn load_plan(path: &Path, precision: Precision) -> Result<Plan> {
    let load = || -> TractResult<Plan> {
        let mut model = tract_onnx::onnx()
            .model_for_path(path)?
            .into_typed()?
            .into_decluttered()?;
        if precision == Precision::F16 {
            // after declutter and before optimise, so that the optimiser picks f16 kernels; the
            // model's inputs and outputs become f16 too (see `input` and `to_vec`)
            build_float_translator(DatumType::F32, DatumType::F16, NodeFilter::default())
                .transform(&mut model)?;
        }
        model.into_optimized()?.into_runnable()
    };
    load().map_err(|e| model_err(path, format!("cannot load: {e:#}")))
}

impl Models {
    pub fn load(dir: &Path, precision: Precision) -> Result<Self> {
        let meta_path = dir.join("model.json");
        if !meta_path.is_file() {
            return Err(model_err(
                dir,
                "no model.json here: give takumi its models folder with --models DIR, \
                 TAKUMI_MODELS=DIR or [engine] models in the config (the package installs it \
                 in /usr/share/takumi/models)",
            ));
        }
        let meta_bytes = std::fs::read(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
        let meta: ModelMeta =
            serde_json::from_slice(&meta_bytes).map_err(|e| model_err(&meta_path, e))?;
        let expect = [
            (meta.thumb, THUMB, "thumb"),
            (meta.patch, PATCH, "patch"),
            (meta.grid, GRID, "grid"),
            (meta.lbins, LBINS, "lbins"),
            (meta.k, K, "k"),
            (meta.hues, HUES, "hues"),
        ];
        for (got, want, key) in expect {
            if got != want {
                return Err(model_err(
                    &meta_path,
                    format!(
                        "{key} is {got}, this build expects {want}: rebuild takumi for this model"
                    ),
                ));
            }
        }
        if meta.sigmas != SIGMAS {
            return Err(model_err(
                &meta_path,
                "filter-bank sigmas differ from this build",
            ));
        }
        let mut offset_at = None;
        let mut n = 0;
        for (name, shape) in &meta.layout {
            if name == "offset" {
                offset_at = Some(n);
            }
            n += shape.iter().product::<usize>();
        }
        let offset_at = offset_at
            .filter(|_| n == meta.template_len)
            .ok_or_else(|| {
                model_err(
                    &meta_path,
                    "template layout has no offset or a wrong length",
                )
            })?;

        let suffix = match precision {
            Precision::Float | Precision::F16 => "",
            Precision::Int8 => ".int8",
        };
        if precision == Precision::F16 && !tract_linalg::isa::native().fp16_arithmetic() {
            // tract still runs it, on its portable f16 kernel: on a Pi 4's Cortex-A72 (no fp16
            // arithmetic) that is 4.7x float's instructions per apply (board/README.md)
            tracing::warn!(
                "precision f16 on a CPU without fp16 arithmetic: use float on this machine"
            );
        }
        let mut h = blake3::Hasher::new();
        h.update(&meta_bytes);
        for f in ["hypernet.onnx", "backbone.onnx"] {
            let p = dir.join(f);
            let b = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
            h.update(&b);
        }
        let hyper = load_plan(&dir.join(format!("hypernet{suffix}.onnx")), precision)?;
        let backbone = load_plan(&dir.join(format!("backbone{suffix}.onnx")), precision)?;
        let models = Models {
            hyper,
            backbone,
            template_len: meta.template_len,
            offset_at,
            hash: h.finalize().to_hex()[..16].to_string(),
            precision,
            dir: dir.into(),
        };
        // the evidence of what a precision really runs: f16 kernels, or int8 ones where a
        // quantised model is not folded back to float
        tracing::debug!(
            "models ({precision}) run matmul kernels {:?}",
            models.matmul_kernels()
        );
        Ok(models)
    }

    /// The distinct matmul kernels of both optimised plans, sorted by name.
    pub fn matmul_kernels(&self) -> Vec<String> {
        let mut k = crate::engine::kernels::plan_kernels(self.hyper.model());
        k.extend(crate::engine::kernels::plan_kernels(self.backbone.model()));
        k.sort();
        k.dedup();
        k
    }

    /// H: four `[3][64][64]` planar inputs -> template vector.
    pub fn hypernet(&self, inputs: [&[f32]; 4]) -> Result<Vec<f32>> {
        let mut tv: TVec<TValue> = tvec![];
        for x in inputs {
            tv.push(self.input(x, &[1, 3, THUMB, THUMB])?.into());
        }
        let out = self
            .hyper
            .run(tv)
            .map_err(|e| model_err(&self.dir, format!("hypernet: {e:#}")))?;
        let v = to_vec(&out[0], &self.dir)?;
        if v.len() != self.template_len {
            return Err(model_err(&self.dir, "hypernet output has the wrong length"));
        }
        Ok(v)
    }

    /// G's low-resolution CNN: thumbnail of B + template -> grid `[LBINS*3*K][GRID][GRID]`.
    pub fn backbone(&self, thumb: &[f32], template: &[f32]) -> Result<Vec<f32>> {
        let t = self.input(thumb, &[1, 3, THUMB, THUMB])?;
        let d = self.input(template, &[1, self.template_len])?;
        let out = self
            .backbone
            .run(tvec![t.into(), d.into()])
            .map_err(|e| model_err(&self.dir, format!("backbone: {e:#}")))?;
        let v = to_vec(&out[0], &self.dir)?;
        if v.len() != GRID_CH * GRID * GRID {
            return Err(model_err(&self.dir, "backbone output has the wrong size"));
        }
        if let Some(x) = v.iter().find(|x| !x.is_finite() || x.abs() > GRID_MAX_ABS) {
            return Err(Error::Invalid(format!(
                "the template drives the model out of range (a grid coefficient of {x:e}): \
                 it was not learned for this model"
            )));
        }
        Ok(v)
    }
}

impl Models {
    /// A model input: f32, or f16 for the half-precision plans.
    fn input(&self, x: &[f32], shape: &[usize]) -> Result<Tensor> {
        let t = Tensor::from_shape(shape, x)
            .map_err(|e| Error::Invalid(format!("tensor {shape:?}: {e}")))?;
        if self.precision != Precision::F16 {
            return Ok(t);
        }
        t.cast_to_dt(DatumType::F16)
            .map(|c| c.into_owned())
            .map_err(|e| Error::Invalid(format!("tensor {shape:?} to f16: {e}")))
    }
}

/// A model output as f32 (the f16 plans' outputs are f16).
fn to_vec(v: &TValue, dir: &Path) -> Result<Vec<f32>> {
    let f32s = v
        .cast_to::<f32>()
        .map_err(|e| model_err(dir, format!("output is not a float: {e}")))?;
    let view = f32s
        .to_plain_array_view::<f32>()
        .map_err(|e| model_err(dir, format!("output is not f32: {e}")))?;
    Ok(view.iter().copied().collect())
}
