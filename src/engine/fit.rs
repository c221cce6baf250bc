//! The closed-form parts of a template, fitted in `learn` on the registered pair(s):
//! * `tone`: a global offset of G's coefficient grid (per luminance bin, G's own features);
//! * `bank`: the residual stage's colour, blur scales and bias (see bank.rs);
//! * `position`: the residual stage's smooth position terms (vignette, lens shading): offsets,
//!   and gains that multiply each colour channel alone, as a lens shades it.
//!
//! They correct one of two bases: G with the hypernetwork's template, or B itself.
//!
//! All parts enter linearly, so each is ridge regression from per-pixel features, kept as normal
//! equations per tile of a 4 x 4 grid, per side of the hue circle (and per pair). Validation fits
//! on one side of the frame and scores the other: left/right, top/bottom, centre/border; fits on
//! one half of the hue circle and scores the other; and with several pairs leaves one pair out.
//! A spatial or content-specific fit cannot cheat those splits: one that leans on the colours the
//! pair happens to show scores badly on colours it has not seen, as it would on another part.
//! Where the pair shows one side of the hue circle only, there is no hue fold, and the tone part
//! fits without the hue terms that fold would have checked.
//! The template keeps the combination of base, parts and ridge strength that validates best;
//! doing nothing is one of the candidates, so a kept part always validates better than leaving
//! the capture alone.

use super::bank::{self, NF};
use super::card::PartGains;
use super::filterbank::{Blurs, pixel_at};
use super::model::{CK, HUES, K, LBINS};
use crate::Frame;

const TONE_P: usize = LBINS * K;
/// Unknowns per output channel: the tone offset, then the residual stage's weights.
/// The position terms exist in two frames: where the pixel is in the source frame and where it
/// is in the target's own frame. A vignette that the after shot added sits in the after shot's
/// camera frame, one that the edit removed in the before shot's; for a moved part the two
/// differ, and the fit uses the one frame that fits the pair better (`position_frame`). Both at
/// once split the vignette between them, and at `apply`, where the two frames are the same, the
/// halves did not add up to it (moved vignettes 2-10 dB worse on B, eval_cli.py).
const MOVED: usize = TONE_P + NF;
const P: usize = MOVED + bank::POSITION_LEN;
const TILES: usize = 4;
/// Greys, and the two halves of the hue circle (red to cyan through yellow and green; cyan to red
/// through blue and magenta): each sample goes to one class, by its source colour.
const HUE_CLASSES: usize = 3;
/// Chroma (opponent-colour distance from grey) under which a pixel counts as grey: its hue is
/// noise. Greys are fitted in both hue folds and scored in neither.
const GREY_CHROMA: f32 = 0.04;
/// Samples each half of the hue circle needs for the hue folds (5% of TARGET_SAMPLES): with
/// fewer (a small crop, a nearly single-hue part) the held-out half is a handful of pixels that
/// decides the whole fit. Measured with eval_prior.py: with no floor the fit on 96 px pairs lost
/// 1.2 dB; a floor of 2000 kept most 320x240 quads from the folds (half of the gain gone).
const MIN_HUE_SAMPLES: usize = 1000;
/// Normals a pair accumulates into: tile-major, then hue class. Kept summed two ways (per tile,
/// per hue class), which is all the folds need, in 19 normals a pair instead of 48.
const CELLS: usize = TILES * TILES * HUE_CLASSES;
const TARGET_SAMPLES: f64 = 20000.0;
const LAMBDAS: [f64; 5] = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5];
/// Weight (relative to the mean diagonal) of the tone offset's smoothness across luminance
/// bins: a bin the pair barely shows follows its neighbours instead of fitting a few pixels,
/// so tones that B has and A lacks get the edit of the nearest tones A has. The spatial splits
/// cannot see that extrapolation, so this is fixed rather than validated.
const SMOOTH: f64 = 1e-1;
/// A part must buy at least this much validated gain to be kept; so must the bank's blur
/// features within the bank part. Blurs kept for less cost every capture the residual stage's
/// own blur passes (up to 1.7x G alone) for nothing a capture shows: with this rule 72 of the
/// card's 110 templates apply G alone instead of 32, for -0.03 dB over the families (session 16).
const MIN_PART_GAIN_DB: f64 = 0.5;
/// What the bank's blur features must buy on a resampled pair, or the bank goes without them.
/// Two shots of a moved part sample it at other positions and scales, and the warp that
/// registers them interpolates; blurs fit part of that difference, which is not the edit, and
/// then blur or sharpen every capture (moved colour edits 2-5 dB below the same edit aligned,
/// eval_cli.py). The value: the 95th percentile of that gain on moved pairs of colour edits
/// (no spatial part) from the training photos, `models/train/calibrate_resampled.py`.
const RESAMPLED_BLUR_GAIN_DB: f64 = 1.4;
const GROUPS: usize = 3;
const ALL: u8 = (1 << GROUPS) - 1;

/// What the closed-form parts are regularised toward where the pair does not determine them
/// (tones or hues it never shows, a part it cannot validate): H(A, A')'s template (a MAP fit
/// with H as the prior), or nothing (zero, the fit without H: for ablation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prior {
    Zero,
    #[default]
    Hypernet,
}

/// How a selection picks its base: by validation under a prior, or fixed (the undo takes the
/// edit's base, so that a LoRA edit is undone by its LoRA Reverse, -H, plus its own parts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseRule {
    Choose(Prior),
    Fixed(Base),
}

/// Which unknowns the fit may use, beyond the choice of parts.
#[derive(Clone, Copy, Debug)]
struct Cols {
    /// Whether the hue folds ran, and so whether the tone part may use its hue terms.
    hue_terms: bool,
    frame: PositionFrame,
    /// Whether each output channel's blur features are its own channel's blurred planes only
    /// (the colour, bias and position terms still mix channels); chosen by validation.
    per_channel_blurs: bool,
    /// The bank part's blur scales (`earned_blurs` keeps those that pay for their apply).
    blurs: bank::Scales,
    /// Some pair was resampled: G's own blurs in the tone part (`columns`) then follow
    /// `blurs` as well, so they must earn what the bank's must.
    resampled: bool,
}

/// The frame the position terms are measured in: the source's, or the target's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PositionFrame {
    Source,
    Target,
}

/// Validation scores of every choice of one direction, computed once (the costly part).
pub struct Scored {
    all: Normal,
    scores: Scores,
}

impl Scored {
    /// Whether the blur features earned their place ([`earned_blurs`]), so the selection may
    /// keep them.
    pub fn earns_blurs(&self) -> bool {
        self.scores.cols.blurs != 0
    }
}

/// Base of the fit: what the closed-form parts correct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    Hypernet = 0,
    Identity = 1,
}

/// Normal equations of one region: sum phi phi^T (upper triangle while accumulating), and per
/// base sum phi r^T and sum |r|^2.
#[derive(Clone)]
struct Normal {
    m: Vec<f64>,
    v: [Vec<f64>; 2],
    rr: [f64; 2],
    n: usize,
}

impl Normal {
    fn zeros() -> Self {
        Normal {
            m: vec![0.0; P * P],
            v: [vec![0.0; P * 3], vec![0.0; P * 3]],
            rr: [0.0; 2],
            n: 0,
        }
    }

    fn add(&mut self, o: &Normal) {
        self.m.iter_mut().zip(&o.m).for_each(|(a, b)| *a += b);
        for k in 0..2 {
            self.v[k].iter_mut().zip(&o.v[k]).for_each(|(a, b)| *a += b);
            self.rr[k] += o.rr[k];
        }
        self.n += o.n;
    }

    fn sum<'a>(parts: impl IntoIterator<Item = &'a Normal>) -> Normal {
        let mut s = Normal::zeros();
        for p in parts {
            s.add(p);
        }
        s
    }
}

/// What one pair contributes, in one direction: features come from `src` (with G's blurs and
/// the residual stage's planes), the target is `target` where `mask` holds, and `pred` is
/// G(hypernetwork's template, src).
pub struct PairData<'a> {
    pub src: &'a Frame,
    pub blurs: &'a Blurs,
    pub planes: &'a bank::Planes,
    pub pred: &'a Frame,
    pub target: &'a Frame,
    pub mask: &'a [bool],
    /// Where a source pixel sits in the target's own frame (the warp that made `target`).
    pub sim: &'a super::align::Similarity,
}

#[derive(Default)]
pub struct Accumulator {
    /// `TILES * TILES` normals per pair (all hue classes), pair-major.
    tiles: Vec<Normal>,
    /// `HUE_CLASSES` normals per pair (all tiles), pair-major.
    hues: Vec<Normal>,
    /// Some pair's target frame is not its source frame: the position terms have two frames.
    moved: bool,
    /// Some pair's target was resampled (`Similarity::resamples`): the blur features must then
    /// buy RESAMPLED_BLUR_GAIN_DB instead of MIN_PART_GAIN_DB.
    resampled: bool,
}

/// The chosen template parts for one direction.
pub struct Selection {
    pub base: Base,
    /// G's grid offset in the template's layout `[(l*3 + c)*K + k]`, or None.
    pub tone: Option<Vec<f32>>,
    /// The residual stage's weights (`NF x 3`), or empty.
    pub residual: Vec<f32>,
    /// Validated gain in dB over doing nothing, in all and per part (0 for a part not kept).
    pub gain_db: f32,
    pub part_gains_db: PartGains,
    /// PSNR of the chosen fit on all its pairs.
    pub fit_psnr_db: f32,
    /// With two or more pairs: mean PSNR on each pair when fitted on the others.
    pub heldout_pair_psnr_db: Option<f32>,
}

fn stride(w: usize, h: usize) -> usize {
    (((w * h) as f64 / TARGET_SAMPLES).sqrt().round() as usize).max(1)
}

impl Accumulator {
    pub fn pairs(&self) -> usize {
        self.tiles.len() / (TILES * TILES)
    }

    /// Samples added, over every pair.
    pub fn samples(&self) -> usize {
        self.tiles.iter().map(|t| t.n).sum()
    }

    /// A pair with no samples, so that sums kept apart stay pair for pair ([`Self::merged`]).
    pub fn add_empty_pair(&mut self) {
        self.tiles
            .extend((0..TILES * TILES).map(|_| Normal::zeros()));
        self.hues.extend((0..HUE_CLASSES).map(|_| Normal::zeros()));
    }

    /// The sums of `self` and `other`, which hold other pixels of the same pairs, added in
    /// the same order: as if each pair had been added once with both masks.
    pub fn merged(&self, other: &Accumulator) -> Accumulator {
        let add = |a: &[Normal], b: &[Normal]| {
            a.iter().zip(b).map(|(a, b)| Normal::sum([a, b])).collect()
        };
        debug_assert_eq!(self.pairs(), other.pairs());
        Accumulator {
            tiles: add(&self.tiles, &other.tiles),
            hues: add(&self.hues, &other.hues),
            moved: self.moved || other.moved,
            resampled: self.resampled || other.resampled,
        }
    }

    /// Adds one pair; the top and bottom halves of the tile grid accumulate on two threads.
    pub fn add_pair(&mut self, d: &PairData) {
        let mut cells = vec![Normal::zeros(); CELLS];
        let (top, bottom) = cells.split_at_mut(CELLS / 2);
        let h = d.src.height;
        let split = (TILES / 2 * h).div_ceil(TILES);
        std::thread::scope(|sc| {
            sc.spawn(|| accumulate(d, 0..split, top, 0));
            accumulate(d, split..h, bottom, TILES / 2);
        });
        let by_tile = cells.chunks(HUE_CLASSES).map(Normal::sum);
        self.tiles.extend(by_tile);
        let by_hue =
            (0..HUE_CLASSES).map(|c| Normal::sum(cells.iter().skip(c).step_by(HUE_CLASSES)));
        self.hues.extend(by_hue);
        self.moved |= *d.sim != super::align::Similarity::IDENTITY;
        self.resampled |= d.sim.resamples(d.src.width, d.src.height);
    }

    /// Chooses base, parts and ridge strength by validation, then fits them on everything.
    pub fn select(&self, prior: Prior) -> Option<Selection> {
        Some(self.select_from(self.scores()?, BaseRule::Choose(prior)))
    }

    /// The validation scores of every (base, parts, ridge); None with too few samples to fit.
    pub fn scores(&self) -> Option<Scored> {
        let all = Normal::sum(&self.tiles);
        if all.n < 64 {
            return None;
        }
        let (folds, hue_terms) = self.folds();
        let cols = Cols {
            hue_terms,
            frame: if self.moved {
                position_frame(&all, hue_terms)
            } else {
                PositionFrame::Source
            },
            per_channel_blurs: false,
            blurs: bank::SCALES_ALL,
            resampled: self.resampled,
        };
        let mixed = Scores::new(&folds, cols, None);
        let own_cols = Cols {
            per_channel_blurs: true,
            ..cols
        };
        let own = Scores::new(&folds, own_cols, Some(&mixed));
        let best = |s: &Scores| s.search(|_, _| true).3;
        let scores = if best(&own) < best(&mixed) {
            own
        } else {
            mixed
        };
        let min_gain = if self.resampled {
            RESAMPLED_BLUR_GAIN_DB
        } else {
            MIN_PART_GAIN_DB
        };
        let scores = earned_blurs(scores, &folds, cols, best, min_gain);
        Some(Scored { all, scores })
    }

    /// The selection from scores computed by `scores`, under `rule`.
    pub fn select_from(&self, scored: Scored, rule: BaseRule) -> Selection {
        let Scored { all, scores } = scored;
        let (base, set, lam) = match rule {
            BaseRule::Choose(prior) => scores.choose(prior),
            BaseRule::Fixed(base) => scores.on(base),
        };
        let best = scores.get(base, set, lam);
        let part = |g: usize| {
            if set & (1 << g) == 0 {
                0.0
            } else {
                gain_db(scores.best_without(base, set & !(1 << g)).3, best) as f32
            }
        };
        let other = match base {
            Base::Hypernet => Base::Identity,
            Base::Identity => Base::Hypernet,
        };
        let part_gains_db = PartGains {
            hypernet: if base == Base::Hypernet {
                gain_db(scores.best_of_base(other), best) as f32
            } else {
                0.0
            },
            tone: part(0),
            bank: part(1),
            position: part(2),
            // 0 when earned_blurs left them out
            blurs: if set & 2 != 0 {
                scores.blur_gain as f32
            } else {
                0.0
            },
        };
        let d = solve(&all, base, set, lam, scores.cols);
        let fit_err = match &d {
            Some(d) => val_error(&all, base, &columns(set, scores.cols), d),
            None => all.rr[base as usize],
        };
        let (tone, residual) = unpack(d.as_deref(), set);
        Selection {
            base,
            tone,
            residual,
            gain_db: gain_db(scores.identity(), best) as f32,
            part_gains_db,
            fit_psnr_db: psnr(fit_err, all.n),
            heldout_pair_psnr_db: self.heldout_pairs(base, set, lam, scores.cols),
        }
    }

    /// (fit, validate) pairs of regions: the spatial splits, the hue halves, then leave one
    /// pair out.
    fn folds(&self) -> (Vec<(Normal, Normal)>, bool) {
        let np = self.pairs();
        let region = |keep: &dyn Fn(usize, usize) -> bool| {
            Normal::sum(self.tiles.iter().enumerate().filter_map(|(i, t)| {
                let tile = i % (TILES * TILES);
                keep(tile / TILES, tile % TILES).then_some(t)
            }))
        };
        let hues = |keep: &dyn Fn(usize) -> bool| {
            Normal::sum(
                self.hues
                    .iter()
                    .enumerate()
                    .filter_map(|(i, t)| keep(i % HUE_CLASSES).then_some(t)),
            )
        };
        let centre =
            |ty: usize, tx: usize| (1..TILES - 1).contains(&ty) && (1..TILES - 1).contains(&tx);
        let halves: [(Normal, Normal); 3] = [
            (
                region(&|_, tx| tx < TILES / 2),
                region(&|_, tx| tx >= TILES / 2),
            ),
            (
                region(&|ty, _| ty < TILES / 2),
                region(&|ty, _| ty >= TILES / 2),
            ),
            (region(&centre), region(&|ty, tx| !centre(ty, tx))),
        ];
        let mut folds = Vec::new();
        for (a, b) in halves {
            folds.push((a.clone(), b.clone()));
            folds.push((b, a));
        }
        let sides: Vec<_> = (1..HUE_CLASSES)
            .map(|side| (hues(&|c| c != side), hues(&|c| c == side)))
            .collect();
        let hue_folds = sides.iter().all(|(_, held)| held.n >= MIN_HUE_SAMPLES);
        if hue_folds {
            folds.extend(sides);
        }
        if np >= 2 {
            for p in 0..np {
                folds.push(self.leave_out(p));
            }
        }
        (folds, hue_folds)
    }

    /// (every other pair, pair p).
    fn leave_out(&self, p: usize) -> (Normal, Normal) {
        let per = TILES * TILES;
        let held = Normal::sum(&self.tiles[p * per..(p + 1) * per]);
        let rest = Normal::sum(
            self.tiles
                .iter()
                .enumerate()
                .filter(|(i, _)| i / per != p)
                .map(|(_, t)| t),
        );
        (rest, held)
    }

    fn heldout_pairs(&self, base: Base, set: u8, lam: usize, cols: Cols) -> Option<f32> {
        let np = self.pairs();
        if np < 2 {
            return None;
        }
        let sum: f32 = (0..np)
            .map(|p| {
                let (fit, held) = self.leave_out(p);
                let err = match solve(&fit, base, set, lam, cols) {
                    Some(d) => val_error(&held, base, &columns(set, cols), &d),
                    None => held.rr[base as usize],
                };
                psnr(err, held.n)
            })
            .sum();
        Some(sum / np as f32)
    }
}

fn psnr(sq_err: f64, n: usize) -> f32 {
    let mse = (sq_err / (3 * n.max(1)) as f64).max(1e-12);
    (10.0 * (1.0 / mse).log10()).min(99.0) as f32
}

fn gain_db(reference: f64, err: f64) -> f64 {
    10.0 * (reference.max(1e-18) / err.max(1e-18)).log10()
}

/// Validation error of every (base, parts, lambda), summed over the folds.
struct Scores {
    /// `[base][set][lambda]`; set 0 (no parts) is the base alone, the same for every lambda.
    err: [[[f64; LAMBDAS.len()]; 1 << GROUPS]; 2],
    identity: f64,
    cols: Cols,
    /// What the bank's blur features gain over the same fit without them, once
    /// [`earned_blurs`] has kept them; 0 until then or without them.
    blur_gain: f64,
}

impl Scores {
    /// `same`: scores already computed with the same columns for the sets without the bank
    /// part (where `per_channel_blurs` changes nothing), copied instead of computed again.
    fn new(folds: &[(Normal, Normal)], cols: Cols, same: Option<&Scores>) -> Self {
        let mut err = [[[0.0f64; LAMBDAS.len()]; 1 << GROUPS]; 2];
        let idxs: [Idx; 1 << GROUPS] = std::array::from_fn(|set| columns(set as u8, cols));
        // `same` differs in the bank's columns, and in the tone part's where G's blurs differ
        let tone_differs = same.is_none_or(|s| {
            cols.resampled && (s.cols.blurs ^ cols.blurs) & bank::SCALES_FOLDED != 0
        });
        let computed = |set: u8| {
            set != 0 && (set & 2 != 0 || (set & 1 != 0 && tone_differs) || same.is_none())
        };
        for (fit, val) in folds {
            for (e, rr) in err.iter_mut().zip(val.rr) {
                e[0].iter_mut().for_each(|x| *x += rr);
            }
            let dense: [Vec<Vec<f64>>; 1 << GROUPS] = std::array::from_fn(|set| {
                let set = set as u8;
                if computed(set) {
                    gather(val, &idxs[set as usize])
                } else {
                    Vec::new()
                }
            });
            for (li, lam) in LAMBDAS.iter().enumerate() {
                let mut shared: [Option<Vec<f64>>; 1 << GROUPS] = Default::default();
                for (set, from) in FACTOR_ORDER {
                    if !computed(set) {
                        continue;
                    }
                    let idx = &idxs[set as usize];
                    let from = from.and_then(|f| shared[f as usize].as_deref());
                    let own = shared_factor(fit, idx, *lam, from);
                    let chol = own.as_ref().and_then(|s| extend(fit, idx, *lam, s));
                    for (b, base) in [Base::Hypernet, Base::Identity].into_iter().enumerate() {
                        err[b][set as usize][li] += match &chol {
                            Some(l) => {
                                let d = solve_with(l, fit, base, idx);
                                val_error_on(val, base, idx, &dense[set as usize], &d)
                            }
                            None => f64::INFINITY,
                        };
                    }
                    shared[set as usize] = own;
                }
            }
        }
        if let Some(same) = same {
            for (b, by_set) in err.iter_mut().enumerate() {
                for set in (0..1u8 << GROUPS).filter(|&set| !computed(set)) {
                    by_set[set as usize] = same.err[b][set as usize];
                }
            }
        }
        let identity = err[Base::Identity as usize][0][0];
        Scores {
            err,
            identity,
            cols,
            blur_gain: 0.0,
        }
    }

    /// With the zero prior, the best fit on B. With H's prior, the fit on H's template (where
    /// the pair is silent, the parts' ridge and smoothness leave H's template standing) when it
    /// validates at least MIN_PART_GAIN_DB better than the fit on B, like any other part.
    /// Measured (models/train/eval_prior.py): taking H's base whenever it is within that margin
    /// instead cost 1.6 dB on under-determined pairs, because H's guess where the pair is
    /// silent is still worse than the fit's own smooth extrapolation when it is not better where
    /// the pair speaks.
    fn choose(&self, prior: Prior) -> (Base, u8, usize) {
        let plain = self.on(Base::Identity);
        if prior == Prior::Zero {
            return plain;
        }
        let h = self.on(Base::Hypernet);
        let (eh, ep) = (self.get(h.0, h.1, h.2), self.get(plain.0, plain.1, plain.2));
        if gain_db(ep, eh) >= MIN_PART_GAIN_DB && eh < self.identity {
            h
        } else {
            plain
        }
    }

    /// The best parts and ridge on `base`, pruned.
    fn on(&self, base: Base) -> (Base, u8, usize) {
        let (b, s, l, _) = self.best_without(base, ALL);
        self.prune(b, s, l)
    }

    /// Drops, one at a time, the parts that buy less than MIN_PART_GAIN_DB.
    fn prune(&self, mut base: Base, mut set: u8, mut lam: usize) -> (Base, u8, usize) {
        loop {
            let best = self.get(base, set, lam);
            let weak = (0..GROUPS).find(|g| {
                set & (1 << g) != 0
                    && gain_db(self.best_without(base, set & !(1 << g)).3, best) < MIN_PART_GAIN_DB
            });
            let Some(g) = weak else {
                return (base, set, lam);
            };
            (base, set, lam, _) = self.best_without(base, set & !(1 << g));
        }
    }

    fn get(&self, base: Base, set: u8, lam: usize) -> f64 {
        self.err[base as usize][set as usize][lam]
    }

    fn identity(&self) -> f64 {
        self.identity
    }

    /// Best configuration on `base` whose parts are a subset of `allowed`.
    fn best_without(&self, base: Base, allowed: u8) -> (Base, u8, usize, f64) {
        self.search(|b, s| b == base && s & !allowed == 0)
    }

    fn best_of_base(&self, base: Base) -> f64 {
        self.search(|b, _| b == base).3
    }

    fn search(&self, ok: impl Fn(Base, u8) -> bool) -> (Base, u8, usize, f64) {
        let mut best = (Base::Identity, 0u8, 0usize, f64::INFINITY);
        for base in [Base::Identity, Base::Hypernet] {
            for set in 0..(1u8 << GROUPS) {
                if !ok(base, set) {
                    continue;
                }
                for (l, &e) in self.err[base as usize][set as usize].iter().enumerate() {
                    if e < best.3 * (1.0 - 1e-9) {
                        best = (base, set, l, e);
                    }
                }
            }
        }
        best
    }
}

/// `scores` (every blur scale), or the same fit with the cheapest set of blur scales that buys
/// as much: the blurs at all must buy `min_gain` over none (MIN_PART_GAIN_DB like any part, or
/// RESAMPLED_BLUR_GAIN_DB on a resampled pair, where what blurs gain below that is the two shots'
/// sampling and the warp, not the edit), and each costlier set as much again over the one kept
/// before it: G's blurs (free at apply), then the sigma-12 blur (a quarter-resolution pass), then
/// sigma 1 or sigma 2.5 (a full-resolution blur per channel), then both (up to 1.5x G alone).
fn earned_blurs(
    scores: Scores,
    folds: &[(Normal, Normal)],
    cols: Cols,
    best: impl Fn(&Scores) -> f64,
    min_gain: f64,
) -> Scores {
    let with = |blurs: bank::Scales| {
        let per_channel_blurs = blurs != 0 && scores.cols.per_channel_blurs;
        let cols = Cols {
            blurs,
            per_channel_blurs,
            ..cols
        };
        Scores::new(folds, cols, Some(&scores))
    };
    let none = with(0);
    let e_none = best(&none);
    let g = gain_db(e_none, best(&scores));
    tracing::debug!("fit: the blur features gain {g:.3} dB (kept from {min_gain} dB)");
    if g < min_gain {
        return none;
    }
    let wide = bank::SCALES_FOLDED | bank::SCALES_WIDE;
    let cheaper = [
        bank::SCALES_FOLDED,
        wide,
        wide | bank::SCALES_FINE,
        wide | bank::SCALES_MID,
    ]
    .map(with);
    let mut kept = none;
    for next in cheaper.into_iter().chain([scores]) {
        let g = gain_db(best(&kept), best(&next));
        tracing::debug!(
            "fit: blur scales {:05b} gain {g:.3} dB more",
            next.cols.blurs
        );
        if g >= min_gain {
            kept = next;
        }
    }
    Scores {
        blur_gain: gain_db(e_none, best(&kept)),
        ..kept
    }
}

/// Unknowns used by a set of parts (bit 0 tone, 1 bank, 2 position). Without `hue_terms` the
/// tone part leaves out G's hue features (the last HUES of each bin's K): where the pair shows
/// one side of the hue circle only, no fold can check how those terms carry the edit to the
/// other side, and they carried it badly (hue rotations 3.5 dB below the same fit without
/// them, eval_cli.py); the tone part's colour terms then extrapolate linearly per luminance bin.
fn columns(set: u8, cols: Cols) -> Idx {
    let mut idx = Vec::new();
    if set & 1 != 0 {
        let hue = |i: &usize| cols.hue_terms || i % K < K - HUES;
        // On a resampled pair the tone part's blur features (G's sigma 1.5 and 6) are kept or
        // dropped with the bank's same scales (`earned_blurs`): kept unchecked, a pair shot half
        // a pixel over with no edit at all learned a "tone" edit from the two shots' sampling
        // (+0.5 to +0.9 dB on held-out regions; the capture 53-60 dB from itself after), and a
        // moved dark vignette pair lost 1.5 of its 3 dB on B to it (eval_cli.py's moved set).
        // On a pair not resampled they stay: there they are the edit's, and held to the rule
        // there an aligned vignette pair took H's base and lost 10 dB.
        let blur = |i: &usize| {
            !cols.resampled
                || bank::slicing_blur_scale(i % K).is_none_or(|sc| cols.blurs >> sc & 1 != 0)
        };
        idx.extend((0..TONE_P).filter(hue).filter(blur));
    }
    let own = set & 2 != 0 && cols.per_channel_blurs && cols.blurs != 0;
    let kept = |j: &usize| cols.blurs >> bank::scale(*j) & 1 != 0;
    if set & 2 != 0 {
        let mixed = |j: &usize| !bank::BLURS.contains(j) || (!own && kept(j));
        idx.extend(bank::BANK.filter(mixed).map(|j| TONE_P + j));
    }
    // the position terms' first unknown in the frame they are fitted in
    let position = (set & 4 != 0).then_some(match cols.frame {
        PositionFrame::Source => TONE_P + bank::POSITION.start,
        PositionFrame::Target => MOVED,
    });
    if let Some(at) = position {
        idx.extend(at..at + bank::POSITION_OFFSETS);
    }
    let shared = idx.len();
    let channel = |c: usize| {
        let mut cols = idx.clone();
        // Each channel's gain field multiplies that channel alone, as a lens shades it: fitted
        // with the other channels too, on a dark and dull pair (its channels all but equal) the
        // split between them was a guess, and a brighter, more colourful capture paid for it
        // (vignette quad 79's undo 39.4 dB against an exact undo of 54.2; eval_cli.py).
        if let Some(at) = position {
            let gains = (0..bank::POSITION_OFFSETS).map(|k| at + bank::position_gain(k, c));
            cols.extend(gains);
        }
        if own {
            cols.extend(
                bank::BLURS
                    .skip(c)
                    .step_by(3)
                    .filter(kept)
                    .map(|j| TONE_P + j),
            );
        }
        cols
    };
    Idx {
        of: std::array::from_fn(channel),
        shared,
    }
}

/// The unknowns of each output channel: the first `shared` are the same for all three (the
/// channel's own come last, so that one Cholesky factor of the shared ones serves all three).
struct Idx {
    of: [Vec<usize>; 3],
    shared: usize,
}

/// `cholesky` of each output channel's unknowns: one factor when they are the same, else the
/// shared unknowns' factor extended by each channel's own.
fn factor(n: &Normal, idx: &Idx, lam: f64) -> Option<Vec<Vec<f64>>> {
    let shared = shared_factor(n, idx, lam, None)?;
    extend(n, idx, lam, &shared)
}

/// The order `Scores::new` factors the parts' sets in, each with the set whose shared factor it
/// starts from: a Cholesky factor's leading block is the factor of the leading unknowns (the same
/// arithmetic, so the same bits), and `columns` orders them tone, bank, position, so the tone
/// block, the largest, is factored once per fold and ridge instead of four times.
const FACTOR_ORDER: [(u8, Option<u8>); 7] = [
    (7, None),
    (3, Some(7)),
    (1, Some(3)),
    (6, None),
    (2, Some(6)),
    (5, Some(1)),
    (4, None),
];

/// The factor of `idx`'s shared unknowns, from `from` (a factor whose unknowns begin with them, or
/// that they begin with) where given.
fn shared_factor(n: &Normal, idx: &Idx, lam: f64, from: Option<&[f64]>) -> Option<Vec<f64>> {
    let q = idx.shared;
    match from {
        Some(f) if f.len().isqrt() >= q => Some(leading(f, q)),
        from => cholesky(n, &idx.of[0][..q], lam, from),
    }
}

/// The leading `k` x `k` block of a factor.
fn leading(f: &[f64], k: usize) -> Vec<f64> {
    let q = f.len().isqrt();
    let mut l = vec![0.0f64; k * k];
    for i in 0..k {
        l[i * k..i * k + i + 1].copy_from_slice(&f[i * q..i * q + i + 1]);
    }
    l
}

/// Each channel's factor from the shared unknowns' one: itself, or extended by the channel's own.
fn extend(n: &Normal, idx: &Idx, lam: f64, shared: &[f64]) -> Option<Vec<Vec<f64>>> {
    if idx.shared == idx.of[0].len() {
        return Some(vec![shared.to_vec()]);
    }
    idx.of
        .iter()
        .map(|of| cholesky(n, of, lam, Some(shared)))
        .collect()
}

/// The frame whose position terms fit all the pair(s) better, with every part in use (a ridge in
/// the middle of LAMBDAS); the source frame on a tie, as for an aligned pair, where the two are
/// the same.
fn position_frame(all: &Normal, hue_terms: bool) -> PositionFrame {
    let err = |frame| {
        let cols = Cols {
            hue_terms,
            frame,
            per_channel_blurs: false,
            blurs: bank::SCALES_ALL,
            resampled: false,
        };
        solve(all, Base::Identity, ALL, LAMBDAS.len() / 2, cols).map_or(f64::INFINITY, |d| {
            val_error(all, Base::Identity, &columns(ALL, cols), &d)
        })
    };
    if err(PositionFrame::Target) < err(PositionFrame::Source) {
        PositionFrame::Target
    } else {
        PositionFrame::Source
    }
}

/// m[i][j] for i <= j is accumulated; read either triangle through this.
#[inline]
fn sym(m: &[f64], i: usize, j: usize) -> f64 {
    if i <= j { m[i * P + j] } else { m[j * P + i] }
}

/// The full-length solution (zeros outside `set`) of the ridge problem, or None.
fn solve(n: &Normal, base: Base, set: u8, lam: usize, cols: Cols) -> Option<Vec<f64>> {
    if set == 0 {
        return Some(vec![0.0; P * 3]);
    }
    let idx = columns(set, cols);
    let l = factor(n, &idx, LAMBDAS[lam])?;
    Some(solve_with(&l, n, base, &idx))
}

/// The smoothness penalty's entry (i, j): first differences between the same feature in
/// adjacent luminance bins of the tone offset.
fn smooth(i: usize, j: usize, mu: f64) -> f64 {
    if i >= TONE_P || j >= TONE_P || i % K != j % K {
        return 0.0;
    }
    let (li, lj) = (i / K, j / K);
    if li == lj {
        mu * if li == 0 || li == LBINS - 1 { 1.0 } else { 2.0 }
    } else if li.abs_diff(lj) == 1 {
        -mu
    } else {
        0.0
    }
}

/// Cholesky factor of (m + smoothness + lam I) restricted to `idx`; hand-written because a
/// ~170 x 170 solve a few hundred times per template does not justify a linear-algebra
/// dependency. `lam` is relative to the mean diagonal. `prefix`: the factor of the first
/// unknowns of `idx` (a Cholesky factor's leading rows depend on those unknowns only).
fn cholesky(n: &Normal, idx: &[usize], lam: f64, prefix: Option<&[f64]>) -> Option<Vec<f64>> {
    let scale = ((0..P).map(|i| n.m[i * P + i]).sum::<f64>() / P as f64).max(1e-12);
    let (lam, mu) = (lam * scale, SMOOTH * scale);
    let q = idx.len();
    let mut l = vec![0.0f64; q * q];
    let p = prefix.map_or(0, |f| f.len().isqrt());
    if let Some(f) = prefix {
        for i in 0..p {
            l[i * q..i * q + i + 1].copy_from_slice(&f[i * p..i * p + i + 1]);
        }
    }
    for i in p..q {
        for j in 0..=i {
            let mut s = sym(&n.m, idx[i], idx[j])
                + smooth(idx[i], idx[j], mu)
                + if i == j { lam } else { 0.0 };
            let (ri, rj) = (&l[i * q..i * q + j], &l[j * q..j * q + j]);
            s -= ri.iter().zip(rj).map(|(a, b)| a * b).sum::<f64>();
            if i == j {
                if s <= 0.0 {
                    return None;
                }
                l[i * q + i] = s.sqrt();
            } else {
                l[i * q + j] = s / l[j * q + j];
            }
        }
    }
    Some(l)
}

/// `ls`: `factor`'s one factor for all channels, or one per channel.
fn solve_with(ls: &[Vec<f64>], n: &Normal, base: Base, idx: &Idx) -> Vec<f64> {
    let v = &n.v[base as usize];
    let mut d = vec![0.0f64; P * 3];
    for c in 0..3 {
        let (l, idx) = (&ls[c.min(ls.len() - 1)], &idx.of[c]);
        let q = idx.len();
        let mut y = vec![0.0f64; q];
        for i in 0..q {
            let s = v[idx[i] * 3 + c] - (0..i).map(|k| l[i * q + k] * y[k]).sum::<f64>();
            y[i] = s / l[i * q + i];
        }
        let mut x = vec![0.0f64; q];
        for i in (0..q).rev() {
            let s = y[i] - (i + 1..q).map(|k| l[k * q + i] * x[k]).sum::<f64>();
            x[i] = s / l[i * q + i];
        }
        for (i, &j) in idx.iter().enumerate() {
            d[j * 3 + c] = x[i];
        }
    }
    d
}

/// sum over the region of |r - phi.d|^2, from its normal equations.
fn val_error(n: &Normal, base: Base, idx: &Idx, d: &[f64]) -> f64 {
    val_error_on(n, base, idx, &gather(n, idx), d)
}

/// The region's normal matrix on each output channel's unknowns, dense (one when the channels
/// share them): gathered once per fold and part set, then read by every ridge and base.
fn gather(n: &Normal, idx: &Idx) -> Vec<Vec<f64>> {
    let dense = |of: &Vec<usize>| {
        of.iter()
            .flat_map(|&p| of.iter().map(move |&q| sym(&n.m, p, q)))
            .collect()
    };
    if idx.shared == idx.of[0].len() {
        vec![dense(&idx.of[0])]
    } else {
        idx.of.iter().map(dense).collect()
    }
}

/// `val_error` with the normal matrix `gather`ed: the same products summed in the same order.
fn val_error_on(n: &Normal, base: Base, idx: &Idx, g: &[Vec<f64>], d: &[f64]) -> f64 {
    let v = &n.v[base as usize];
    let mut e = n.rr[base as usize];
    for (c, of) in idx.of.iter().enumerate() {
        if of.is_empty() {
            continue; // no parts: the base's own error
        }
        let g = &g[c.min(g.len() - 1)];
        let x: Vec<f64> = of.iter().map(|&p| d[p * 3 + c]).collect();
        for ((&p, row), &dp) in of.iter().zip(g.chunks_exact(of.len())).zip(&x) {
            let md: f64 = row.iter().zip(&x).map(|(m, xq)| m * xq).sum();
            e += dp * md - 2.0 * dp * v[p * 3 + c];
        }
    }
    e.max(0.0)
}

/// Splits a solution into the template's tone offset and the residual stage's weights.
fn unpack(d: Option<&[f64]>, set: u8) -> (Option<Vec<f32>>, Vec<f32>) {
    let Some(d) = d else {
        return (None, Vec::new());
    };
    let tone = (set & 1 != 0).then(|| {
        let mut out = vec![0.0f32; LBINS * CK];
        for l in 0..LBINS {
            for c in 0..3 {
                for k in 0..K {
                    out[(l * 3 + c) * K + k] = d[(l * K + k) * 3 + c] as f32;
                }
            }
        }
        out
    });
    let residual = if set & 6 != 0 {
        let mut w: Vec<f32> = (0..NF * 3).map(|i| d[TONE_P * 3 + i] as f32).collect();
        for (k, j) in bank::POSITION.enumerate() {
            for c in 0..3 {
                w[3 * j + c] += d[(MOVED + k) * 3 + c] as f32;
            }
        }
        w
    } else {
        Vec::new()
    };
    (tone, residual)
}

/// One thread's share of `add_pair`: rows `rows`, into the cells (tile, hue class) of tile rows
/// from `tile_row0`.
fn accumulate(d: &PairData, rows: std::ops::Range<usize>, cells: &mut [Normal], tile_row0: usize) {
    let (w, h) = (d.src.width, d.src.height);
    let n = w * h;
    let s = stride(w, h);
    let mut f = [0.0f32; K];
    let mut phi = [0.0f32; NF];
    let mut moved = [0.0f32; bank::POSITION_LEN];
    let mut bins = [[0.0f64; K]; 2];
    let mut res = [0.0f64; NF + bank::POSITION_LEN];
    let m = d.sim.matrix(w, h);
    for y in rows.filter(|y| y % s == s / 2) {
        let trow = y * TILES / h - tile_row0;
        for x in (s / 2..w).step_by(s) {
            let i = y * w + x;
            if !d.mask[i] {
                continue;
            }
            let (rgb, (l0, w0, w1)) = pixel_at(d.src, d.blurs, i, &mut f);
            let t = &mut cells[(trow * TILES + x * TILES / w) * HUE_CLASSES + hue_class(rgb)];
            bank::features(d.src, d.blurs, d.planes, x, y, &mut phi);
            let (u, v) = target_uv(&m, w, h, x, y);
            bank::position(u, v, rgb, &mut moved);
            // phi is sparse: two luminance bins of the tone offset, then the residual stage
            let mut segs: [(usize, &[f64]); 3] = [(0, &[]); 3];
            let mut ns = 0;
            for ((l, wl), out) in [(l0, w0), (l0 + 1, w1)].into_iter().zip(bins.iter_mut()) {
                if l < LBINS && wl != 0.0 {
                    out.iter_mut()
                        .zip(&f)
                        .for_each(|(o, fk)| *o = (wl * fk) as f64);
                    segs[ns] = (l * K, &out[..]);
                    ns += 1;
                }
            }
            let all = phi.iter().chain(&moved);
            res.iter_mut().zip(all).for_each(|(o, p)| *o = *p as f64);
            segs[ns] = (TONE_P, &res[..]);
            let tgt: [f64; 3] = std::array::from_fn(|c| d.target.data[c * n + i] as f64);
            let r = [
                std::array::from_fn::<f64, 3, _>(|c| tgt[c] - d.pred.data[c * n + i] as f64),
                std::array::from_fn::<f64, 3, _>(|c| tgt[c] - rgb[c] as f64),
            ];
            add_sample(t, &segs[..=ns], &r);
        }
    }
}

/// Where pixel (x, y) of a w x h source frame sits in the target's frame, in the [-1, 1]
/// coordinates of the position terms; `m` is `Similarity::matrix` (once per pair, not per pixel).
fn target_uv(m: &[f64; 6], w: usize, h: usize, x: usize, y: usize) -> (f32, f32) {
    let (x, y) = (x as f64, y as f64);
    let uv = |p: f64, n: usize| (2.0 * p / (n - 1).max(1) as f64 - 1.0) as f32;
    (
        uv(m[0] * x + m[1] * y + m[2], w),
        uv(m[3] * x + m[4] * y + m[5], h),
    )
}

/// A pixel's class for the hue folds: 0 grey, 1 or 2 its side of the hue circle.
fn hue_class([r, g, b]: [f32; 3]) -> usize {
    let (oa, ob) = (r - 0.5 * (g + b), 0.866_025_4 * (g - b));
    if oa * oa + ob * ob < GREY_CHROMA * GREY_CHROMA {
        0
    } else if ob >= 0.0 {
        1
    } else {
        2
    }
}

/// out += a * x, on contiguous slices so that it vectorises.
#[inline]
fn axpy(out: &mut [f64], a: f64, x: &[f64]) {
    out.iter_mut().zip(x).for_each(|(o, v)| *o += a * v);
}

/// Adds one sample given as segments (first unknown, values) in increasing order: the upper
/// triangle of phi phi^T, phi r^T and |r|^2.
#[inline]
fn add_sample(t: &mut Normal, segs: &[(usize, &[f64])], r: &[[f64; 3]; 2]) {
    t.n += 1;
    for (a, &(sa, va)) in segs.iter().enumerate() {
        for (i, &vi) in va.iter().enumerate() {
            let p = sa + i;
            let row = &mut t.m[p * P..(p + 1) * P];
            axpy(&mut row[p..sa + va.len()], vi, &va[i..]);
            for &(sb, vb) in &segs[a + 1..] {
                axpy(&mut row[sb..sb + vb.len()], vi, vb);
            }
            for (v, rb) in t.v.iter_mut().zip(r) {
                axpy(&mut v[p * 3..p * 3 + 3], vi, rb);
            }
        }
    }
    for (rr, rb) in t.rr.iter_mut().zip(r) {
        *rr += rb.iter().map(|v| v * v).sum::<f64>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::align::Similarity;
    use crate::engine::filterbank::{blurs, luminance};

    /// The accumulator of the single pair `src` -> `target` (registered, G predicting `src`).
    fn accumulated(src: &Frame, target: &Frame) -> Accumulator {
        moved_pair(src, target, &Similarity::IDENTITY)
    }

    /// As `accumulated`, for a target registered onto `src` by `sim`.
    fn moved_pair(src: &Frame, target: &Frame, sim: &Similarity) -> Accumulator {
        let (b, planes) = (blurs(src, 1), bank::planes(src, 1));
        let mask = vec![true; src.width * src.height];
        let mut acc = Accumulator::default();
        acc.add_pair(&PairData {
            src,
            blurs: &b,
            planes: &planes,
            pred: src,
            target,
            mask: &mask,
            sim,
        });
        acc
    }

    /// The folds a single pair of `src` (edited into itself) validates on.
    fn folds_of(src: &Frame) -> usize {
        accumulated(src, src).folds().0.len()
    }

    /// A 160 x 120 frame: orange on the left, `right` on the right.
    fn two_colours(right: [f32; 3]) -> Frame {
        let mut f = Frame::zeros(160, 120);
        let n = f.width * f.height;
        for i in 0..n {
            let rgb = if i % f.width < f.width / 2 {
                [0.8, 0.5, 0.2]
            } else {
                right
            };
            (0..3).for_each(|c| f.data[c * n + i] = rgb[c]);
        }
        f
    }

    /// A 160 x 120 frame: `left` on the left and `right` on the right, each at every brightness
    /// in every tile (so that a tone curve is not a colour matrix, and every fold sees it).
    fn two_ramps(left: [f32; 3], right: [f32; 3]) -> Frame {
        let mut f = Frame::zeros(160, 120);
        let (w, h) = (f.width, f.height);
        for y in 0..h {
            for x in 0..w {
                let rgb = if x < w / 2 { left } else { right };
                let t = 0.2 + 0.8 * ((x * 7919 + y * 104_729) % 97) as f32 / 96.0;
                (0..3).for_each(|c| f.data[c * w * h + y * w + x] = rgb[c] * t);
            }
        }
        f
    }

    /// Pseudo-random in [0, 1] (splitmix64's finaliser): no pattern a feature could fit.
    fn hash01(i: u64) -> f32 {
        let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) as f32 / u64::MAX as f32
    }

    /// A 160 x 120 frame: columns of 8 px at random brightness, with stripes along y (period
    /// 6 px), so every brightness lies on crests and in troughs alike: a blur is no tone curve,
    /// nor a colour gain with a smooth term of position.
    fn stripes() -> Frame {
        let mut f = Frame::zeros(160, 120);
        let (w, h) = (f.width, f.height);
        for (i, v) in f.data.iter_mut().enumerate() {
            let (c, x, y) = (i / (w * h), i % w, i / w % h);
            let stripe = (std::f32::consts::TAU * y as f32 / 6.0).sin();
            let level = 0.2 + 0.6 * hash01((x / 8) as u64);
            *v = (level + 0.1 * stripe) * [1.0, 0.8, 0.6][c];
        }
        f
    }

    /// `src` moved a fraction `alpha` toward its sigma-1.5 blur, plus noise with `noise` times
    /// that change's energy: what a pair's blur features can fit is then worth
    /// 10 log10(1 + 1 / noise) dB of held-out error.
    fn slightly_blurred(src: &Frame, alpha: f32, noise: f32) -> Frame {
        let b = blurs(src, 1);
        let n = src.width * src.height;
        let change: Vec<f32> = (0..3 * n)
            .map(|i| alpha * (b.planes[0][i / n][i % n] - src.data[i]))
            .collect();
        let rms = (change.iter().map(|d| d * d).sum::<f32>() / change.len() as f32).sqrt();
        // uniform noise in [-a, a] has variance a^2 / 3
        let a = rms * (3.0 * noise).sqrt();
        let mut target = src.clone();
        for (i, t) in target.data.iter_mut().enumerate() {
            *t += change[i] + a * (2.0 * hash01(1_000_000 + i as u64) - 1.0);
        }
        target
    }

    /// On a resampled pair, a change of detail worth less than RESAMPLED_BLUR_GAIN_DB is what
    /// two shots' sampling and the warp leave, not an edit: G's own blurs in the tone part may
    /// not fit it any more than the bank's (`columns`). On a pair not resampled the same
    /// change is the edit's, and the tone part's blurs keep it.
    #[test]
    fn a_slight_blur_of_a_resampled_pair_is_no_edit() {
        let src = stripes();
        // about 1 dB for the blur features: over MIN_PART_GAIN_DB, under RESAMPLED_BLUR_GAIN_DB
        let target = slightly_blurred(&src, 0.5, 3.0);
        let half_pixel = Similarity {
            dx: 0.5,
            ..Similarity::IDENTITY
        };
        let aligned = moved_pair(&src, &target, &Similarity::IDENTITY).select(Prior::Zero);
        let resampled = moved_pair(&src, &target, &half_pixel).select(Prior::Zero);
        let gains = |s: &Option<Selection>| s.as_ref().expect("enough samples").part_gains_db;
        let (a, r) = (gains(&aligned), gains(&resampled));
        assert!(a.tone >= MIN_PART_GAIN_DB as f32, "aligned: {a:?}");
        assert!(a.tone < RESAMPLED_BLUR_GAIN_DB as f32, "aligned: {a:?}");
        assert_eq!(r, PartGains::default(), "resampled: {r:?}");
    }

    /// The tone offset chosen for `src` edited by a lift of the mid-tones, with the zero prior.
    fn tone_of(src: &Frame) -> Vec<f32> {
        let mut target = src.clone();
        let n = src.width * src.height;
        for i in 0..n {
            let [r, g, b] = [0, 1, 2].map(|c| src.data[c * n + i]);
            let lum = luminance(r, g, b);
            (0..3).for_each(|c| target.data[c * n + i] += 0.3 * lum * (1.0 - lum));
        }
        let acc = accumulated(src, &target);
        let sel = acc.select(Prior::Zero).expect("enough samples");
        sel.tone.expect("a tone curve keeps the tone part")
    }

    #[test]
    fn per_channel_blurs_extend_the_shared_factor_exactly() {
        let src = two_ramps([0.9, 0.55, 0.2], [0.2, 0.45, 0.9]);
        let all = Normal::sum(&accumulated(&src, &src).tiles);
        let cols = Cols {
            hue_terms: true,
            frame: PositionFrame::Source,
            per_channel_blurs: true,
            blurs: bank::SCALES_ALL,
            resampled: false,
        };
        let idx = columns(ALL, cols);
        // each channel: the shared unknowns, then its own 5 position gains and 5 blurred planes
        assert!(idx.of.iter().all(|of| of.len() == idx.shared + 10));
        assert!(
            idx.of[1][idx.shared..]
                .iter()
                .all(|j| (j - TONE_P) % 3 == 1)
        );
        let extended = factor(&all, &idx, 1e-3).expect("positive definite");
        for (c, l) in extended.iter().enumerate() {
            let whole = cholesky(&all, &idx.of[c], 1e-3, None).expect("positive definite");
            let worst = l
                .iter()
                .zip(&whole)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                worst <= 1e-9 * whole.iter().fold(1.0, |m, v| v.abs().max(m)),
                "{worst}"
            );
        }
    }

    /// `val_error` as it read before `gather`: straight from the upper triangle.
    fn val_error_sym(n: &Normal, base: Base, idx: &Idx, d: &[f64]) -> f64 {
        let v = &n.v[base as usize];
        let mut e = n.rr[base as usize];
        for (c, idx) in idx.of.iter().enumerate() {
            for &p in idx {
                let dp = d[p * 3 + c];
                let md: f64 = idx.iter().map(|&q| sym(&n.m, p, q) * d[q * 3 + c]).sum();
                e += dp * md - 2.0 * dp * v[p * 3 + c];
            }
        }
        e.max(0.0)
    }

    /// `Scores::new` takes each set's factor from a larger set's where it can (FACTOR_ORDER): the
    /// scores are those of factoring every set on its own, and scoring it from the upper triangle,
    /// to the bit.
    #[test]
    fn scores_from_shared_factors_are_those_of_each_set_alone() {
        let src = two_ramps([0.9, 0.55, 0.2], [0.2, 0.45, 0.9]);
        let target = vignetted(&src, &Similarity::IDENTITY);
        let acc = accumulated(&src, &target);
        let (folds, hue_terms) = acc.folds();
        let cols = |per_channel_blurs| Cols {
            hue_terms,
            frame: PositionFrame::Source,
            per_channel_blurs,
            blurs: bank::SCALES_ALL,
            resampled: false,
        };
        // no parts at all: the base's own error (what `select_from` scores for an identity)
        let all = Normal::sum(&acc.tiles);
        let none = val_error(
            &all,
            Base::Identity,
            &columns(0, cols(false)),
            &[0.0; P * 3],
        );
        assert_eq!(none, all.rr[Base::Identity as usize]);
        let mixed = Scores::new(&folds, cols(false), None);
        // as `scores` makes it: the sets without the bank part copied from `mixed`
        let own = Scores::new(&folds, cols(true), Some(&mixed));
        for (scores, cols) in [(&mixed, cols(false)), (&own, cols(true))] {
            for set in 1..(1u8 << GROUPS) {
                let idx = columns(set, cols);
                for (li, lam) in LAMBDAS.iter().enumerate() {
                    for (b, base) in [Base::Hypernet, Base::Identity].into_iter().enumerate() {
                        let alone: f64 = folds
                            .iter()
                            .map(|(fit, val)| match factor(fit, &idx, *lam) {
                                Some(l) => {
                                    val_error_sym(val, base, &idx, &solve_with(&l, fit, base, &idx))
                                }
                                None => f64::INFINITY,
                            })
                            .sum();
                        assert_eq!(
                            scores.err[b][set as usize][li], alone,
                            "set {set}, ridge {lam}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn one_sided_hue_pairs_fit_no_hue_terms() {
        let uses_hue = |t: Vec<f32>| (0..t.len()).any(|i| i % K >= K - HUES && t[i] != 0.0);
        let (orange, grey, blue) = ([0.9, 0.55, 0.2], [0.6, 0.6, 0.6], [0.2, 0.45, 0.9]);
        // orange and grey: one side of the hue circle, no hue fold, no hue terms
        assert!(!uses_hue(tone_of(&two_ramps(orange, grey))));
        // orange and blue: the hue folds ran, and the tone part may use them
        assert!(uses_hue(tone_of(&two_ramps(orange, blue))));
    }

    #[test]
    fn hue_folds_need_both_halves_of_the_hue_circle() {
        let spatial = 6;
        assert_eq!(hue_class([0.8, 0.5, 0.2]), 1, "orange");
        assert_eq!(hue_class([0.2, 0.4, 0.8]), 2, "blue");
        assert_eq!(hue_class([0.5, 0.5, 0.5]), 0, "grey");
        // orange and blue: each half holds half the samples, so both hue folds run
        assert_eq!(folds_of(&two_colours([0.2, 0.4, 0.8])), spatial + 2);
        // orange and grey: nothing to hold out on the blue side
        assert_eq!(folds_of(&two_colours([0.5, 0.5, 0.5])), spatial);
    }

    /// `src` darkened by a vignette 1 - 0.5 r2 centred in the frame that `sim` maps `src`'s
    /// pixels into (u, v in [-1, 1] across that frame, r2 = (u^2 + v^2) / 2).
    fn vignetted(src: &Frame, sim: &Similarity) -> Frame {
        let (w, h) = (src.width, src.height);
        let mut out = src.clone();
        for y in 0..h {
            for x in 0..w {
                // through `Similarity::map`, not the matrix that `accumulate` uses: the two checked
                // against each other
                let (mx, my) = sim.map(w, h, x as f64, y as f64);
                let (u, v) = (
                    2.0 * mx / (w - 1) as f64 - 1.0,
                    2.0 * my / (h - 1) as f64 - 1.0,
                );
                let k = (1.0 - 0.25 * (u * u + v * v)) as f32;
                (0..3).for_each(|c| out.data[c * w * h + y * w + x] *= k);
            }
        }
        out
    }

    /// What the residual's position terms add to colour `rgb` at (u, v) of the frame at `apply`.
    fn position_effect(residual: &[f32], u: f32, v: f32, rgb: [f32; 3]) -> [f32; 3] {
        let mut pos = [0.0f32; bank::POSITION_LEN];
        bank::position(u, v, rgb, &mut pos);
        std::array::from_fn(|c| {
            let w = |j: usize| residual[3 * (bank::POSITION.start + j) + c];
            pos.iter().enumerate().map(|(j, p)| w(j) * p).sum()
        })
    }

    #[test]
    fn a_vignette_is_fitted_in_the_frame_it_sits_in() {
        let src = two_ramps([0.9, 0.55, 0.2], [0.2, 0.45, 0.9]);
        let sim = Similarity {
            dx: 14.0,
            dy: -9.0,
            angle_deg: 3.0,
            scale: 1.06,
        };
        // added by the after shot's camera (its frame), or removed from the before shot's
        for (frame, vignette_sim) in [
            (PositionFrame::Target, sim),
            (PositionFrame::Source, Similarity::IDENTITY),
        ] {
            let acc = moved_pair(&src, &vignetted(&src, &vignette_sim), &sim);
            assert_eq!(position_frame(&Normal::sum(&acc.tiles), true), frame);
            // at `apply` the two frames are one: the whole vignette, centred, whichever frame
            // the pair showed it in
            let w = acc.select(Prior::Zero).expect("enough samples").residual;
            let grey = [0.5f32; 3];
            for (u, v) in [(0.0, 0.0), (0.8, 0.6), (-0.6, 0.4), (0.5, -0.8)] {
                let want = -0.25 * (u * u + v * v) * 0.5;
                for got in position_effect(&w, u, v, grey) {
                    assert!(
                        (got - want).abs() < 0.01,
                        "{frame:?} at ({u}, {v}): {got:.4}, want {want:.4}"
                    );
                }
            }
        }
    }
}
