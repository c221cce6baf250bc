//! An RGB frame as planar f32 in [0, 1]: planar rows make the separable blurs and the slicing
//! loops contiguous, which is what lets them vectorise.

/// The smallest side a frame may have anywhere in takumi: the model's centre patch must fit.
/// `[limits] min_side` may raise it, never lower it.
pub const MIN_SIDE: usize = 64;

#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub width: usize,
    pub height: usize,
    /// `[3][height][width]`, channel-major.
    pub data: Vec<f32>,
}

impl Frame {
    pub fn zeros(width: usize, height: usize) -> Self {
        Frame {
            width,
            height,
            data: vec![0.0; 3 * width * height],
        }
    }

    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.width * self.height;
        &self.data[c * n..(c + 1) * n]
    }

    pub fn plane_mut(&mut self, c: usize) -> &mut [f32] {
        let n = self.width * self.height;
        &mut self.data[c * n..(c + 1) * n]
    }

    /// The three planes at once, for passes that write them side by side.
    pub fn planes_mut(&mut self) -> [&mut [f32]; 3] {
        let n = self.width * self.height;
        let (r, gb) = self.data.split_at_mut(n);
        let (g, b) = gb.split_at_mut(n);
        [r, g, &mut b[..n]]
    }

    pub fn from_rgb8(width: usize, height: usize, rgb: &[u8]) -> Self {
        Frame::from_interleaved(width, height, rgb, 3)
    }

    /// From 16-bit RGB, straight to f32: a 16-bit file keeps its 65,536 levels.
    pub fn from_rgb16(width: usize, height: usize, rgb: &[u16]) -> Self {
        Frame::from_interleaved(width, height, rgb, 3)
    }

    /// From interleaved 8- or 16-bit samples, `channels` (3 or 4) per pixel, of which the first
    /// three are RGB; a fourth (alpha) is the caller's to keep.
    pub fn from_interleaved<T: Sample>(
        width: usize,
        height: usize,
        px: &[T],
        channels: usize,
    ) -> Self {
        let n = width * height;
        let mut data = vec![0.0; 3 * n];
        let (r, gb) = data.split_at_mut(n);
        let (g, b) = gb.split_at_mut(n);
        for (((px, r), g), b) in px.chunks_exact(channels).zip(r).zip(g).zip(b) {
            [*r, *g, *b] = [px[0], px[1], px[2]].map(T::to_unit);
        }
        Frame {
            width,
            height,
            data,
        }
    }

    pub fn to_rgb8(&self) -> Vec<u8> {
        self.rows_interleaved(0..self.height)
    }

    /// 16-bit RGB, row-major interleaved: what a 16-bit PNG is written from.
    pub fn to_rgb16(&self) -> Vec<u16> {
        self.rows_interleaved(0..self.height)
    }

    /// 8-bit RGB of rows `rows`, row-major interleaved; rows past the end are not there.
    pub fn rgb8_rows(&self, rows: std::ops::Range<usize>) -> Vec<u8> {
        self.rows_interleaved(rows)
    }

    /// Row-major interleaved RGB samples of rows `rows`, rounded to the nearest level.
    fn rows_interleaved<T: Sample>(&self, rows: std::ops::Range<usize>) -> Vec<T> {
        let n = self.width * self.height;
        let at = |c: usize| {
            let plane = &self.data[c * n..(c + 1) * n];
            plane
                .get(rows.start * self.width..rows.end.min(self.height) * self.width)
                .unwrap_or_default()
        };
        let (r, g, b) = (at(0), at(1), at(2));
        let mut out = vec![T::from_level(0); 3 * r.len()];
        for (((o, &r), &g), &b) in out.chunks_exact_mut(3).zip(r).zip(g).zip(b) {
            o.copy_from_slice(&[r, g, b].map(level::<T>));
        }
        out
    }

    /// Rounds through 8 bits, as a written 8-bit PNG would.
    pub fn quantised(&self) -> Self {
        Frame::from_rgb8(self.width, self.height, &self.to_rgb8())
    }

    /// Bilinear resize (through 8 bits), for making frames of other sizes from a capture.
    pub fn resized(&self, w: usize, h: usize) -> Self {
        let img = image::RgbImage::from_raw(self.width as u32, self.height as u32, self.to_rgb8())
            .unwrap_or_default();
        let r = image::imageops::resize(
            &img,
            w as u32,
            h as u32,
            image::imageops::FilterType::Triangle,
        );
        Frame::from_rgb8(w, h, r.as_raw())
    }

    /// Copy of the rectangle at (x, y) of size (w, h); the caller keeps it inside the frame.
    pub fn crop(&self, x: usize, y: usize, w: usize, h: usize) -> Self {
        let mut out = Frame::zeros(w, h);
        for c in 0..3 {
            let src = self.plane(c);
            let dst = out.plane_mut(c);
            for r in 0..h {
                let s = (y + r) * self.width + x;
                dst[r * w..(r + 1) * w].copy_from_slice(&src[s..s + w]);
            }
        }
        out
    }
}

/// An 8- or 16-bit sample of an image file, as the frame reads it.
/// `v` rounded to the nearest of `T`'s levels. Adding one half and truncating rounds the
/// clamped (non-negative) value: `f32::round` is a libm call per sample on baseline x86-64,
/// which made converting a 640x480 result about 3x slower (measured).
pub(crate) fn level<T: Sample>(v: f32) -> T {
    // max/min, not clamp: NaN becomes 0 (clamp keeps it), so x is always finite
    #[allow(clippy::manual_clamp)]
    let x = v.max(0.0).min(1.0) * T::MAX + 0.5;
    // Rust's saturating `as` kept this loop scalar (0.9 ms for a 640x480 frame, 0.3 ms so)
    // SAFETY: x is finite and within 0.5..=MAX + 0.5, which i32 holds
    let i: i32 = unsafe { x.to_int_unchecked() };
    T::from_level(i)
}

pub trait Sample: Copy {
    /// The sample's full scale, which maps to 1.0.
    const MAX: f32;
    fn to_f32(self) -> f32;
    /// The sample over its full scale: a division, not a multiplication by 1/MAX, so 8-bit
    /// samples keep the bits they always had.
    fn to_unit(self) -> f32 {
        self.to_f32() / Self::MAX
    }
    /// From a level within 0..=MAX (larger values wrap).
    fn from_level(v: i32) -> Self;
}

/// Every 8-bit level over 255, looked up: a division per sample cost about as much as decoding
/// a 640x480 JPEG capture.
const U8_UNIT: [f32; 256] = {
    let mut lut = [0.0; 256];
    let mut i = 0;
    while i < 256 {
        lut[i] = i as f32 / 255.0;
        i += 1;
    }
    lut
};

impl Sample for u8 {
    const MAX: f32 = 255.0;
    fn to_f32(self) -> f32 {
        f32::from(self)
    }
    fn to_unit(self) -> f32 {
        U8_UNIT[usize::from(self)]
    }
    fn from_level(v: i32) -> Self {
        v as u8
    }
}

impl Sample for u16 {
    const MAX: f32 = 65535.0;
    fn to_f32(self) -> f32 {
        f32::from(self)
    }
    fn from_level(v: i32) -> Self {
        v as u16
    }
}

/// PSNR in dB of `a` against `b` (same size), for values in [0, 1].
pub fn psnr(a: &Frame, b: &Frame) -> f32 {
    let mse: f64 = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| {
            let d = (x.clamp(0.0, 1.0) - y.clamp(0.0, 1.0)) as f64;
            d * d
        })
        .sum::<f64>()
        / a.data.len().max(1) as f64;
    (10.0 * (1.0 / mse.max(1e-12)).log10()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Levels round to the nearest, and what is outside [0, 1] (NaN and infinities too) is
    /// clamped, as Rust's saturating `as` did before the conversion was made unchecked.
    #[test]
    fn levels_round_and_clamp_every_value() {
        let cases = [
            (f32::NAN, 0u8, 0u16),
            (f32::NEG_INFINITY, 0, 0),
            (-1.0, 0, 0),
            (0.0, 0, 0),
            (0.49 / 255.0, 0, 126),
            (0.51 / 255.0, 1, 131),
            (128.0 / 255.0, 128, 32896),
            (1.0, 255, 65535),
            (1e30, 255, 65535),
            (f32::INFINITY, 255, 65535),
        ];
        for (v, want8, want16) in cases {
            assert_eq!(level::<u8>(v), want8, "{v} to 8 bits");
            assert_eq!(level::<u16>(v), want16, "{v} to 16 bits");
        }
        let f = Frame {
            width: 2,
            height: 1,
            data: vec![0.0, 1.0, f32::NAN, 0.5, 2.0, -3.0],
        };
        assert_eq!(f.to_rgb8(), [0, 0, 255, 255, 128, 0]);
    }
}
