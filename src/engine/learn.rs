//! `learn`: a template from one or more (before, after) pairs of the same edit.
//! 1. H(A, A') gives the LoRA template (averaged over the pairs);
//! 2. each pair is registered (a similarity: shift, rotation, scale) and A' warped onto A;
//! 3. the closed-form parts are fitted and validated on the overlap (fit.rs), once per
//!    direction: A -> A' for the edit, A' -> A for its undo;
//! 4. the card says what the change does, how each pair registered and what validated.

use super::align::{self, Registration, Similarity};
use super::card::{Card, MIN_DISTRIBUTION_GAIN_DB, PairRegistration};
use super::fit::{self, Base, BaseRule, Prior, Selection};
use super::{Engine, Learned, bank, card, filterbank, quality, slice};
use crate::frame::psnr;
use crate::{Error, Frame, Result};

/// Quantiles per channel that stand for a colour distribution.
const QUANTILES: usize = 33;
/// How far from a frame edge a pair's pixels are left out of the fit where the part moved
/// ([`align::mask_frame_edges`]): the reach of the bank's sigma 2.5 blur (3 sigma, rounded up),
/// at most an eighth of the shorter side on a small pair.
const EDGE_REACH_PX: f64 = 8.0;

/// One direction's fit sums, apart: the pixels away from where the part moved past a frame
/// edge, and the bands near those edges ([`align::mask_frame_edges`]; empty on an aligned pair).
#[derive(Default)]
struct Sides {
    inner: fit::Accumulator,
    band: fit::Accumulator,
}

impl Sides {
    /// Adds one pair: its inner pixels, and its bands where it has any. An aligned pair has
    /// none, and summing nothing would cost as much as summing (every cell's sums are zeroed
    /// and added up), so the bands get a pair only once some pair has them.
    fn add_pair(&mut self, d: &fit::PairData, band: &[bool]) {
        self.inner.add_pair(d);
        if band.contains(&true) {
            self.pad_band(self.inner.pairs() - 1);
            self.band.add_pair(&fit::PairData { mask: band, ..*d });
        }
    }

    /// Empty pairs in the bands' sums up to `pairs`, where the pairs before had no band.
    fn pad_band(&mut self, pairs: usize) {
        while self.band.pairs() < pairs {
            self.band.add_empty_pair();
        }
    }

    /// The scores to select from, and the sums they came from. The blur features are judged
    /// on the inner pixels alone: where those earn them, the fit keeps to the inner pixels, as
    /// the bands would teach it a blur the edit did not make (a moved blur 7 dB, eval_cli.py's
    /// moved set). Otherwise every pixel counts: a colour edit loses nothing in the bands, and
    /// its rarer colours may lie there (a moved selective-colour edit lost 6 dB without them).
    fn scores(mut self) -> (fit::Accumulator, Option<fit::Scored>) {
        if self.band.samples() == 0 {
            let s = self.inner.scores();
            return (self.inner, s);
        }
        if let Some(s) = self.inner.scores().filter(fit::Scored::earns_blurs) {
            return (self.inner, Some(s));
        }
        self.pad_band(self.inner.pairs());
        let all = self.inner.merged(&self.band);
        let s = all.scores();
        (all, s)
    }
}

/// How `learn` builds a template; the defaults are the product's, the rest are for ablation.
#[derive(Clone, Copy, Debug)]
pub struct LearnOptions {
    pub prior: Prior,
    /// False: no closed-form parts at all, the template is H(A, A') alone.
    pub closed_form: bool,
}

impl Default for LearnOptions {
    fn default() -> Self {
        LearnOptions {
            prior: Prior::Hypernet,
            closed_form: true,
        }
    }
}

impl Engine {
    pub fn learn(&self, pairs: &[(Frame, Frame)]) -> Result<Learned> {
        self.learn_with(pairs, LearnOptions::default())
    }

    pub fn learn_with(&self, pairs: &[(Frame, Frame)], opts: LearnOptions) -> Result<Learned> {
        if pairs.is_empty() {
            return Err(Error::Invalid(
                "learn needs at least one before/after pair".into(),
            ));
        }
        for (a, a2) in pairs {
            self.check(a)?;
            self.check(a2)?;
            if (a.width, a.height) != (a2.width, a2.height) {
                return Err(Error::Invalid("before and after differ in size".into()));
            }
        }
        let largest = pairs
            .iter()
            .map(|(a, _)| a)
            .max_by_key(|a| a.width * a.height);
        if let Some(a) = largest {
            self.check_memory(a, pairs.len())?;
        }
        let t0 = std::time::Instant::now();
        let lap = |what: &str| {
            tracing::debug!(
                "learn: {what} at {:.1} ms",
                t0.elapsed().as_secs_f64() * 1e3
            )
        };
        let hyper = self.hypernet_template(pairs)?;
        lap("hypernetwork");
        let undo: Vec<f32> = hyper.iter().map(|v| -v).collect();
        let (mut fwd, mut rev) = (Sides::default(), Sides::default());
        let mut regs = Vec::with_capacity(pairs.len());
        for (a, a2) in pairs {
            let reg = align::register(a, a2, self.threads)?;
            lap("register");
            if reg.registered && opts.closed_form {
                // a spatial edit is measured in the after shot's pixels, as the captures it
                // applies to are shot and as the position terms may be: the edit's blurs read
                // A at sigma / scale (its undo reads A' itself)
                let k = (1.0 / reg.sim.scale) as f32;
                self.accumulate(&mut fwd, a, a2, &reg.sim, &hyper, k)?;
                self.accumulate(&mut rev, a2, a, &reg.sim.inverse(), &undo, 1.0)?;
                lap("fit accumulate");
            }
            regs.push(reg);
        }
        // the two directions are scored side by side; the undo then takes the edit's base
        let (sf, (rev, scored_r)) = std::thread::scope(|sc| {
            let h = sc.spawn(move || {
                let (acc, scored) = fwd.scores();
                scored.map(|s| acc.select_from(s, BaseRule::Choose(opts.prior)))
            });
            let scored_r = rev.scores();
            (h.join(), scored_r)
        });
        let sf = sf.map_err(|_| Error::Invalid("learn: the fit's worker thread failed".into()))?;
        let sr = scored_r.map(|s| {
            let rule = match &sf {
                Some(f) => BaseRule::Fixed(f.base),
                None => BaseRule::Choose(opts.prior),
            };
            rev.select_from(s, rule)
        });
        lap("fit select");
        let (gf, gr) = if sf.is_none() && sr.is_none() {
            self.distribution_gains(pairs, (&hyper, &undo), opts)?
        } else {
            (None, None)
        };
        let prior = |g: Option<f32>| match g {
            Some(g) if g < MIN_DISTRIBUTION_GAIN_DB => Prior::Zero,
            _ => opts.prior,
        };
        let (delta, residual) = self.compose(&hyper, sf.as_ref(), prior(gf));
        let (mut reverse_delta, mut reverse_residual) = self.compose(&undo, sr.as_ref(), prior(gr));
        let mut card = self.card(pairs, (sf.as_ref(), sr.as_ref()), &regs, opts.prior);
        card.distribution_gain_db = gf;
        if sr.is_some() && card.saturation == card::NOT_MEASURED {
            let rev = (&mut reverse_delta, &mut reverse_residual);
            self.check_grey_undo(pairs, (&delta, &residual), rev, &mut card)?;
        }
        let source_hist = histogram(pairs.iter().map(|(a, _)| a));
        let target_hist = histogram(pairs.iter().map(|(_, a2)| a2));
        lap("card");
        Ok(Learned {
            delta,
            reverse_delta,
            residual,
            reverse_residual,
            card,
            source_hist,
            target_hist,
        })
    }

    /// H(A, A'), averaged over the pairs.
    fn hypernet_template(&self, pairs: &[(Frame, Frame)]) -> Result<Vec<f32>> {
        let mut delta = vec![0.0f32; self.models.template_len];
        for (a, a2) in pairs {
            let t = self.models.hypernet([
                &filterbank::thumbnail(a),
                &filterbank::thumbnail(a2),
                &filterbank::centre_patch(a),
                &filterbank::centre_patch(a2),
            ])?;
            for (d, v) in delta.iter_mut().zip(&t) {
                *d += v / pairs.len() as f32;
            }
        }
        Ok(delta)
    }

    /// Grey before shots show the edit on the grey axis only, so nothing validated what the
    /// undo does to colours; the round trip checks that. Where the undo takes the probe
    /// further from itself than leaving it (fitted toward grey, it takes colours to grey that
    /// the edit never made), the undo is the identity.
    fn check_grey_undo(
        &self,
        pairs: &[(Frame, Frame)],
        edit: (&[f32], &[f32]),
        (reverse_delta, reverse_residual): (&mut Vec<f32>, &mut Vec<f32>),
        card: &mut Card,
    ) -> Result<()> {
        card.round_trip_db = self.round_trip_db(pairs, edit, (reverse_delta, reverse_residual))?;
        if card.round_trip_failed() {
            reverse_delta.fill(0.0);
            reverse_residual.clear();
            card.reverse_gain_db = Some(0.0);
        }
        Ok(())
    }

    /// How much closer the undo brings an edited probe back to itself than doing nothing, in
    /// dB, mean over the pairs: PSNR of undo(edit(P)) against P, less that of edit(P), where P
    /// is the pair's after shot in every hue ([`every_hue`]). The pair validates the undo on
    /// A' -> A only; from a grey before shot, that undo may take every colour to grey. None
    /// when the edit leaves every probe as it is (nothing to undo, nothing measured).
    fn round_trip_db(
        &self,
        pairs: &[(Frame, Frame)],
        (delta, residual): (&[f32], &[f32]),
        (reverse_delta, reverse_residual): (&[f32], &[f32]),
    ) -> Result<Option<f32>> {
        let mut gains = Vec::with_capacity(pairs.len());
        for (_, a2) in pairs {
            let probe = every_hue(a2);
            let edited = self.apply_edit(super::Edit { delta, residual }, &probe)?;
            if edited.data == probe.data {
                continue;
            }
            let back = self.apply_edit(
                super::Edit {
                    delta: reverse_delta,
                    residual: reverse_residual,
                },
                &edited,
            )?;
            gains.push(psnr(&back, &probe) - psnr(&edited, &probe));
        }
        Ok((!gains.is_empty()).then(|| gains.iter().sum::<f32>() / gains.len() as f32))
    }

    /// With no pair registered (and H's prior in use), H's template and its undo are checked
    /// on the colour distributions instead of pixel by pixel.
    fn distribution_gains(
        &self,
        pairs: &[(Frame, Frame)],
        (hyper, undo): (&[f32], &[f32]),
        opts: LearnOptions,
    ) -> Result<(Option<f32>, Option<f32>)> {
        if !opts.closed_form || opts.prior != Prior::Hypernet {
            return Ok((None, None));
        }
        let fwd = self.distribution_gain_db(pairs.iter().map(|(a, b)| (a, b)), hyper)?;
        let rev = self.distribution_gain_db(pairs.iter().map(|(a, b)| (b, a)), undo)?;
        Ok((Some(fwd), Some(rev)))
    }

    /// How much closer G(delta, src) is to dst than src is, over the pairs, in dB of the squared
    /// distance between per-channel quantiles: a registration-free check of H's template.
    fn distribution_gain_db<'a>(
        &self,
        pairs: impl Iterator<Item = (&'a Frame, &'a Frame)>,
        delta: &[f32],
    ) -> Result<f32> {
        let (mut before, mut after) = (0.0f64, 0.0f64);
        for (src, dst) in pairs {
            let edit = super::Edit {
                delta,
                residual: &[],
            };
            let out = self.apply_edit(edit, src)?;
            let q = quantiles(dst);
            before += distance(&quantiles(src), &q);
            after += distance(&quantiles(&out), &q);
        }
        Ok((10.0 * (before.max(1e-12) / after.max(1e-12)).log10()) as f32)
    }

    /// Adds the pair `src -> dst` (dst registered onto src by `sim`) to `acc`, with
    /// G(delta, src) as the hypernetwork base; src's blur features at their sigmas times
    /// `sigma_k`.
    fn accumulate(
        &self,
        acc: &mut Sides,
        src: &Frame,
        dst: &Frame,
        sim: &Similarity,
        delta: &[f32],
        sigma_k: f32,
    ) -> Result<()> {
        let (target, mut inner) = align::warp(dst, sim);
        // A low-passed as the warp low-passed A' (align::match_resampling); the features and
        // G's prediction all read it
        let matched = align::match_resampling(src, sim, self.threads);
        let src = matched.as_ref().unwrap_or(src);
        align::mask_clipped(dst, sim, &mut inner);
        // the band is what the edges take from the mask, which becomes the inner pixels
        let mut band = inner.clone();
        let reach = EDGE_REACH_PX.min(src.width.min(src.height) as f64 / 8.0);
        align::mask_frame_edges(sim, (src.width, src.height), reach, &mut inner);
        band.iter_mut().zip(&inner).for_each(|(b, &i)| *b &= !i);
        let blurs = filterbank::blurs_scaled(src, self.threads, sigma_k);
        let planes = bank::planes_scaled(src, self.threads, sigma_k);
        let grid = self.grid(delta, &filterbank::thumbnail(src))?;
        let pred = slice::apply(src, &blurs, &grid, self.threads);
        let pair = fit::PairData {
            src,
            blurs: &blurs,
            planes: &planes,
            pred: &pred,
            target: &target,
            mask: &inner,
            sim,
        };
        acc.add_pair(&pair, &band);
        Ok(())
    }

    /// The LoRA vector and residual stage of one direction. With nothing validated (no pair
    /// registered), the prior alone: the hypernetwork's template, or nothing.
    fn compose(
        &self,
        hyper: &[f32],
        sel: Option<&Selection>,
        prior: Prior,
    ) -> (Vec<f32>, Vec<f32>) {
        let Some(s) = sel else {
            return match prior {
                Prior::Hypernet => (hyper.to_vec(), Vec::new()),
                Prior::Zero => (vec![0.0; hyper.len()], Vec::new()),
            };
        };
        let mut delta = match s.base {
            Base::Hypernet => hyper.to_vec(),
            Base::Identity => vec![0.0; hyper.len()],
        };
        if let Some(tone) = &s.tone {
            let at = self.models.offset_at;
            for (d, o) in delta[at..at + tone.len()].iter_mut().zip(tone) {
                *d += o;
            }
        }
        (delta, s.residual.clone())
    }

    fn card(
        &self,
        pairs: &[(Frame, Frame)],
        (fwd, rev): (Option<&Selection>, Option<&Selection>),
        regs: &[Registration],
        prior: Prior,
    ) -> Card {
        let changes: Vec<card::Change> = pairs
            .iter()
            .map(|(a, a2)| {
                card::change(
                    &card::stats(a, self.threads),
                    &card::stats(a2, self.threads),
                )
            })
            .collect();
        let np = pairs.len() as f32;
        let mean = |f: fn(&card::Change) -> f32| changes.iter().map(f).sum::<f32>() / np;
        // a ratio averages over the pairs that measure it (a grey before shot has no saturation)
        let ratio = |f: fn(&card::Change) -> f32| card::mean_measured(changes.iter().map(f));
        let ch = card::Change {
            exposure_ev: mean(|c| c.exposure_ev),
            wb_shift: [mean(|c| c.wb_shift[0]), mean(|c| c.wb_shift[1])],
            contrast: ratio(|c| c.contrast),
            saturation: ratio(|c| c.saturation),
            sharpness: ratio(|c| c.sharpness),
        };
        Card {
            exposure_ev: ch.exposure_ev,
            wb_shift: ch.wb_shift,
            contrast: ch.contrast,
            saturation: ch.saturation,
            sharpness: ch.sharpness,
            // 0 = not measured: no pair registered, so none has a pixel-wise error
            self_psnr_db: fwd.map_or(0.0, |s| s.fit_psnr_db),
            pairs: pairs.len() as u32,
            fit_used: fwd.is_some_and(|s| s.tone.is_some() || !s.residual.is_empty()),
            validated_gain_db: fwd.map(|s| s.gain_db),
            reverse_gain_db: rev.map(|s| s.gain_db),
            part_gains_db: fwd.map(|s| s.part_gains_db).unwrap_or_default(),
            heldout_pair_psnr_db: fwd.and_then(|s| s.heldout_pair_psnr_db),
            registration: regs
                .iter()
                .map(|r| PairRegistration {
                    registered: r.registered,
                    dx: r.sim.dx as f32,
                    dy: r.sim.dy as f32,
                    angle_deg: r.sim.angle_deg as f32,
                    scale: r.sim.scale as f32,
                    // infinite when no similarity could be fitted at all
                    residual_px: r.residual_px.min(999.0) as f32,
                })
                .collect(),
            zero_prior: prior == Prior::Zero,
            distribution_gain_db: None,
            round_trip_db: None,
        }
    }
}

/// `f`'s luminance with every hue laid over it, a turn of the hue circle across the frame, at
/// a colourfulness a capture has and a grey before shot lacks: the probe of the round trip.
fn every_hue(f: &Frame) -> Frame {
    // as colourful as a capture (max - min channel 0.23 on average; the eval's captures show
    // 0.24-0.38): at 0.12 an exposure/WB undo fitted from grey kept, 8 dB under doing nothing
    const CHROMA: f32 = 0.2;
    let (w, n) = (f.width, f.width * f.height);
    let mut out = f.clone();
    for i in 0..n {
        let l = filterbank::luminance(f.data[i], f.data[n + i], f.data[2 * n + i]);
        let t = std::f32::consts::TAU * (i % w) as f32 / w as f32;
        let (oa, ob) = (CHROMA * t.cos(), CHROMA * t.sin());
        // opponent axes r - (g + b) / 2 and (g - b) * sqrt(3) / 2; the channels' mean is l
        let rgb = [
            l + oa * 0.667,
            l - oa * 0.333 + ob * 0.577,
            l - oa * 0.333 - ob * 0.577,
        ];
        for (c, v) in rgb.into_iter().enumerate() {
            out.data[c * n + i] = v.clamp(0.0, 1.0);
        }
    }
    out
}

/// The quality gate's histogram of some images, averaged.
fn histogram<'a>(frames: impl ExactSizeIterator<Item = &'a Frame>) -> Vec<f32> {
    let mut hist = vec![0.0f32; quality::HIST];
    let n = frames.len() as f32;
    for f in frames {
        let h = quality::histogram(&filterbank::thumbnail(f));
        for (hv, v) in hist.iter_mut().zip(h) {
            *hv += v / n;
        }
    }
    hist
}

/// Per-channel quantiles of a frame, from at most ~16k pixels.
fn quantiles(f: &Frame) -> [[f32; QUANTILES]; 3] {
    let n = f.width * f.height;
    let step = n.div_ceil(16384).max(1);
    std::array::from_fn(|c| {
        let mut v: Vec<f32> = f.plane(c).iter().step_by(step).copied().collect();
        v.sort_unstable_by(f32::total_cmp);
        std::array::from_fn(|i| v[i * (v.len() - 1) / (QUANTILES - 1)])
    })
}

fn distance(a: &[[f32; QUANTILES]; 3], b: &[[f32; QUANTILES]; 3]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// M(M^-1(p)) = p for a few points.
    #[test]
    fn inverse_undoes_the_similarity() {
        let m = Similarity {
            dx: 12.5,
            dy: -7.0,
            angle_deg: 4.0,
            scale: 1.05,
        };
        let (c, inv) = ((319.5, 239.5), m.inverse());
        let map = |s: &Similarity, (x, y): (f64, f64)| {
            let (sin, cos) = s.angle_deg.to_radians().sin_cos();
            let (u, v) = (x - c.0, y - c.1);
            (
                c.0 + s.scale * (cos * u - sin * v) + s.dx,
                c.1 + s.scale * (sin * u + cos * v) + s.dy,
            )
        };
        for p in [(0.0, 0.0), (639.0, 479.0), (100.0, 400.0)] {
            let q = map(&m, map(&inv, p));
            assert!(
                (q.0 - p.0).abs() < 1e-9 && (q.1 - p.1).abs() < 1e-9,
                "{p:?} -> {q:?}"
            );
        }
    }
}
