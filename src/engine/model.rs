//! The two ONNX models, loaded and optimised once with tract, and the constants they were
//! trained with (checked against models/model.json at load, so a model/code mismatch is an
//! error at start-up rather than wrong pixels later).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;
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

impl ModelMeta {
    /// Checks that the model is the one this build's Rust stages were written for, and returns
    /// the offset of the grid's global coefficient offset inside the template vector.
    fn check(&self) -> std::result::Result<usize, String> {
        let expect = [
            (self.thumb, THUMB, "thumb"),
            (self.patch, PATCH, "patch"),
            (self.grid, GRID, "grid"),
            (self.lbins, LBINS, "lbins"),
            (self.k, K, "k"),
            (self.hues, HUES, "hues"),
        ];
        if let Some((got, want, key)) = expect.into_iter().find(|(got, want, _)| got != want) {
            return Err(format!(
                "{key} is {got}, this build expects {want}: rebuild takumi for this model"
            ));
        }
        if self.sigmas != SIGMAS {
            return Err("filter-bank sigmas differ from this build".into());
        }
        let mut offset_at = None;
        let mut n = 0;
        for (name, shape) in &self.layout {
            if name == "offset" {
                offset_at = Some(n);
            }
            n += shape.iter().product::<usize>();
        }
        offset_at
            .filter(|_| n == self.template_len)
            .ok_or_else(|| "template layout has no offset or a wrong length".into())
    }
}

type Plan = Arc<TypedRunnableModel>;

/// Specialised backbone plans kept at once: a station arms one template and applies it to every
/// capture, and an operator flips between a few (the edit, its undo, a second template).
pub const CACHED_PLANS: usize = 4;

/// The backbone plan for one template: its LoRA factors folded into constant, pre-packed
/// convolution weights (see [`Models::specialise`]).
#[derive(Clone)]
pub struct Specialised {
    plan: Plan,
}

impl Specialised {
    /// The names of the plan's operators, in evaluation order (for tests and `bench`).
    pub fn ops(&self) -> Vec<String> {
        plan_ops(&self.plan)
    }
}

fn plan_ops(plan: &Plan) -> Vec<String> {
    let m = plan.model();
    m.eval_order()
        .unwrap_or_default()
        .iter()
        .map(|&n| m.node(n).op.name().to_string())
        .collect()
}

pub struct Models {
    hyper: Plan,
    backbone: Plan,
    /// The backbone before optimisation (decluttered, and in f16 for [`Precision::F16`]): what a
    /// specialised plan is built from. `None` where the model has no input named "template".
    backbone_typed: Option<(TypedModel, usize)>,
    plans: Mutex<PlanCache>,
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

/// The decluttered typed model, translated to f16 for [`Precision::F16`]: what both the generic
/// plan and every specialised plan are optimised from.
fn load_typed(path: &Path, precision: Precision) -> Result<TypedModel> {
    let load = || -> TractResult<TypedModel> {
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
        Ok(model)
    };
    load().map_err(|e| model_err(path, format!("cannot load: {e:#}")))
}

fn optimise(model: TypedModel, path: &Path) -> Result<Plan> {
    model
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(|e| model_err(path, format!("cannot optimise: {e:#}")))
}

/// Which of the backbone's inputs is the template vector (by its ONNX name).
pub(crate) fn template_input(model: &TypedModel) -> Option<usize> {
    let inputs = model.input_outlets().ok()?;
    inputs
        .iter()
        .position(|o| model.node(o.node).name == "template")
}

/// The backbone's typed model with its template input replaced by the constant `value`, as
/// tract's CLI `--constantize` does: optimising it then folds every node that depends on the
/// template alone (the slices of the LoRA factors, `W + B·A`, and in the int8 model their
/// quantise/dequantise pairs) into constants, which the convolutions pre-pack.
pub(crate) fn constantize(
    mut model: TypedModel,
    input: usize,
    value: Tensor,
) -> TractResult<TypedModel> {
    let outlet = model.input_outlets()?[input];
    let fact = TypedFact::try_from(value.clone())?;
    let want = model.outlet_fact(outlet)?;
    if want.datum_type != fact.datum_type || want.shape != fact.shape {
        return Err(anyhow::anyhow!(
            "template is {fact:?}, the model's input is {want:?}"
        ));
    }
    model.node_mut(outlet.node).op = Box::new(Const::new(Arc::new(value))?);
    model.set_outlet_fact(outlet, fact)?;
    let rest: Vec<OutletId> = model
        .input_outlets()?
        .iter()
        .copied()
        .filter(|o| *o != outlet)
        .collect();
    model.set_input_outlets(&rest)?;
    Ok(model)
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
        let offset_at = meta.check().map_err(|e| model_err(&meta_path, e))?;

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
        let hyper_path = dir.join(format!("hypernet{suffix}.onnx"));
        let hyper = optimise(load_typed(&hyper_path, precision)?, &hyper_path)?;
        let backbone_path = dir.join(format!("backbone{suffix}.onnx"));
        let typed = load_typed(&backbone_path, precision)?;
        let backbone = optimise(typed.clone(), &backbone_path)?;
        let template_input = template_input(&typed);
        let models = Models {
            hyper,
            backbone,
            backbone_typed: template_input.map(|i| (typed, i)),
            plans: Mutex::new(PlanCache::default()),
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

    /// The names of the generic backbone plan's operators, in evaluation order.
    pub fn backbone_ops(&self) -> Vec<String> {
        plan_ops(&self.backbone)
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

    /// G's low-resolution CNN on the generic plan, which takes the template as an input:
    /// thumbnail of B + template -> grid `[LBINS*3*K][GRID][GRID]`.
    pub fn backbone(&self, thumb: &[f32], template: &[f32]) -> Result<Vec<f32>> {
        let t = self.input(thumb, &[1, 3, THUMB, THUMB])?;
        let d = self.input(template, &[1, self.template_len])?;
        self.grid(self.backbone.run(tvec![t.into(), d.into()]))
    }

    /// The same grid as [`Models::backbone`], on a plan specialised for `template`.
    pub fn backbone_with(&self, plan: &Specialised, thumb: &[f32]) -> Result<Vec<f32>> {
        let t = self.input(thumb, &[1, 3, THUMB, THUMB])?;
        self.grid(plan.plan.run(tvec![t.into()]))
    }

    /// The backbone's output as a grid, refused where the template drove it out of range.
    fn grid(&self, out: TractResult<TVec<TValue>>) -> Result<Vec<f32>> {
        let out = out.map_err(|e| model_err(&self.dir, format!("backbone: {e:#}")))?;
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

/// Specialised backbone plans by template, keyed by blake3 of the template's values.
#[derive(Default)]
struct PlanCache {
    /// Templates applied once and not yet built, most recent first. Kept apart from `built`,
    /// so that templates applied once (learn's) do not push out the armed template's plan.
    seen: Vec<blake3::Hash>,
    /// Built plans, most recently used first; `None` where a template cannot be specialised,
    /// so that it does not pay for a failing build on every apply.
    built: Vec<(blake3::Hash, Option<Specialised>)>,
}

enum Lookup {
    Built(Option<Specialised>),
    /// First apply of this template: run the generic plan.
    FirstSight,
    /// Second apply: build its plan.
    Build,
}

impl PlanCache {
    fn lookup(&mut self, key: blake3::Hash) -> Lookup {
        if let Some(i) = self.built.iter().position(|(k, _)| *k == key) {
            let hit = self.built.remove(i);
            let plan = hit.1.clone();
            self.built.insert(0, hit);
            return Lookup::Built(plan);
        }
        if let Some(i) = self.seen.iter().position(|k| *k == key) {
            self.seen.remove(i);
            return Lookup::Build;
        }
        self.seen.insert(0, key);
        self.seen.truncate(CACHED_PLANS);
        Lookup::FirstSight
    }

    fn insert(&mut self, key: blake3::Hash, plan: Option<Specialised>) {
        self.built.retain(|(k, _)| *k != key);
        self.built.insert(0, (key, plan));
        self.built.truncate(CACHED_PLANS);
    }
}

/// The cache's key for a template: blake3 of its values' bytes, hashed in one call rather than
/// one `update` per value, which would pay blake3's per-call overhead for each of 11,572 values
/// on every apply.
fn template_key(template: &[f32]) -> blake3::Hash {
    let bytes: Vec<u8> = template.iter().flat_map(|v| v.to_le_bytes()).collect();
    blake3::hash(&bytes)
}

impl Models {
    /// A backbone plan for `template` alone: its LoRA factors folded into constant weights
    /// that tract pre-packs. `None` where this backbone has no input named "template".
    pub fn specialise(&self, template: &[f32]) -> Result<Option<Specialised>> {
        let Some((typed, input)) = &self.backbone_typed else {
            return Ok(None);
        };
        if template.len() != self.template_len {
            return Err(Error::Invalid(format!(
                "template has {} values, the model expects {}",
                template.len(),
                self.template_len
            )));
        }
        // cast like the generic plan's input, so the f16 plan folds f16 weights
        let value = self.input(template, &[1, self.template_len])?;
        let model = constantize(typed.clone(), *input, value)
            .map_err(|e| model_err(&self.dir, format!("specialising the backbone: {e:#}")))?;
        Ok(Some(Specialised {
            plan: optimise(model, &self.dir)?,
        }))
    }

    /// The grid for `template` as `apply` runs it: on the template's specialised plan where
    /// one is cached, else on the generic plan. A template's plan is built on its second apply,
    /// not its first: a build costs about 5 generic backbone runs in float and saves 0.4 of one
    /// per apply (int8: 2.5 and 0.5; `takumi bench`), so a template applied once (a one-file
    /// `takumi apply`, learn's own checks) would only lose by it.
    pub fn backbone_cached(&self, thumb: &[f32], template: &[f32]) -> Result<Vec<f32>> {
        let key = template_key(template);
        // the guard is dropped here, not at the end of the match: `Build` takes the lock again
        let found = self.lock_plans().lookup(key);
        let plan = match found {
            Lookup::Built(plan) => plan,
            Lookup::FirstSight => None,
            Lookup::Build => {
                // built outside the lock: another thread's apply of a cached template need not
                // wait for it
                let plan = self.specialise(template).unwrap_or_else(|e| {
                    tracing::warn!("the generic backbone plan runs this template: {e}");
                    None
                });
                self.lock_plans().insert(key, plan.clone());
                plan
            }
        };
        match plan {
            Some(plan) => self.backbone_with(&plan, thumb),
            None => self.backbone(thumb, template),
        }
    }

    /// How many templates have a specialised plan cached.
    pub fn cached_plans(&self) -> usize {
        self.lock_plans()
            .built
            .iter()
            .filter(|b| b.1.is_some())
            .count()
    }

    fn lock_plans(&self) -> std::sync::MutexGuard<'_, PlanCache> {
        // the cache holds no invariant a panicking thread could break halfway
        self.plans.lock().unwrap_or_else(|p| p.into_inner())
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> ModelMeta {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/model.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn a_model_for_another_build_is_refused_with_the_key_that_differs() {
        let ok = shipped().check().unwrap();
        assert!(ok > 0 && ok < shipped().template_len);
        let mut m = shipped();
        m.k += 1;
        let e = m.check().unwrap_err();
        assert!(
            e.starts_with(&format!("k is {}, this build expects {K}", K + 1)),
            "{e}"
        );
        let mut m = shipped();
        m.sigmas[0] += 0.5;
        assert!(m.check().unwrap_err().contains("sigmas"));
        let mut m = shipped();
        m.template_len += 1;
        assert!(m.check().unwrap_err().contains("wrong length"));
        let mut m = shipped();
        m.layout.retain(|(name, _)| name != "offset");
        assert!(m.check().unwrap_err().contains("no offset"));
    }
}
