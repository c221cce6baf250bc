//! Templates and their file format.
//!
//! # File format (version 2; version 1 files are still read)
//!
//! A template file is
//!
//! ```text
//! [ safetensors bytes ][ 32-byte BLAKE3 hash of the safetensors bytes ]
//! ```
//!
//! The safetensors part (see <https://github.com/huggingface/safetensors>:
//! u64 little-endian header length, JSON header, raw little-endian tensor
//! data) holds exactly these tensors:
//!
//! | tensor        | dtype | shape                         | content                                  |
//! |---------------|-------|-------------------------------|------------------------------------------|
//! | `delta`       | F32   | `[n]`, n >= 1                 | the LoRA template vector                 |
//! | `reverse_delta` | F32 | `[n]`                         | the vector that undoes the edit (v2)     |
//! | `residual`    | F32   | `[0]` or `[39 * 3]`           | the residual stage after G (v2)          |
//! | `reverse_residual` | F32 | `[0]` or `[39 * 3]`        | the residual stage of the undo (v2)      |
//! | `target_hist` | F32   | `[56]` (`[0]`: from a v1 file) | colour histogram of the after image (v2) |
//! | `source_hist` | F32   | `[56]`                        | colour histogram of the source image     |
//! | `thumbs`      | U8    | `[pairs, 2, 64, 64, 3]`       | before/after RGB8 thumbnails of each pair |
//!
//! `thumbs` is present even when `pairs` is 0 (zero bytes of data then).
//! A version 1 file has only `delta`, `source_hist` and `thumbs`; it reads as
//! `reverse_delta = -delta` and no residual stage.
//! The header's `__metadata__` has one key, `takumi`, whose value is a JSON
//! string of `{format_version, name, model_hash, created_unix, sources, card}`
//! (unknown fields are refused). `sources` lists the pairs in the same order
//! as the first axis of `thumbs`, without the thumbnails; the card's `pairs`
//! and `registration` count the same pairs.
//!
//! Readers check, in order: length >= 32, the checksum, a UTF-8 header, the
//! safetensors structure, `format_version` in [`OLDEST_VERSION`]..=[`FORMAT_VERSION`],
//! every tensor's dtype and shape, then everything [`super::check`] lists:
//! lengths, finite values within bounds ([`MAX_DELTA_ABS`], [`MAX_RESIDUAL_ABS`],
//! [`MAX_CARD_ABS`], histograms that are distributions), hashes that are short hex.
//! The checksum comes first so that a damaged file is reported as damaged rather
//! than as whatever parse error the damage happens to cause. Writers run the same
//! checks, so every file takumi writes reads back.

use std::borrow::Cow;
use std::collections::HashMap;

use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use super::{StoreError, TemplateName};

pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build still reads.
pub const OLDEST_VERSION: u32 = 1;

/// Bytes of one RGB8 before/after thumbnail: the model's own thumbnail, [`THUMB`] px a side.
pub const THUMB_BYTES: usize = THUMB * THUMB * 3;

/// Length of the trailing checksum.
pub const CHECKSUM_LEN: usize = 32;

pub use crate::engine::card::{Card, PairRegistration, PartGains};
use crate::engine::model::THUMB;
use crate::engine::{Engine, LearnOptions, Learned};
use crate::frame::Frame;

const META_KEY: &str = "takumi";
const T_DELTA: &str = "delta";
const T_REV_DELTA: &str = "reverse_delta";
const T_RESIDUAL: &str = "residual";
const T_REV_RESIDUAL: &str = "reverse_residual";
const T_TARGET_HIST: &str = "target_hist";
const T_HIST: &str = "source_hist";
const T_THUMBS: &str = "thumbs";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourcePair {
    /// Hex BLAKE3 of the before image's decoded pixels (8-bit RGB, row-major interleaved), not
    /// of a file: a pair hashes the same whether it came as files, as MQTT payloads or from the
    /// camera, which gives no file at all.
    pub before_blake3: String,
    pub after_blake3: String,
    /// The size the pair was learned at.
    pub width: u32,
    pub height: u32,
    /// The (upright) size of the files, when learn downscaled them to `width` x `height`
    /// (`Engine::learn_max_px`); absent when learned at their own size, and in files written
    /// before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downscaled_from: Option<[u32; 2]>,
    /// RGB8, [`THUMB`] x [`THUMB`], row-major interleaved.
    #[serde(skip)]
    pub thumb_before: Vec<u8>,
    #[serde(skip)]
    pub thumb_after: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    pub name: TemplateName,
    /// Hex BLAKE3 of the model the template was made for.
    pub model_hash: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    pub sources: Vec<SourcePair>,
    pub card: Card,
    /// The LoRA template vector.
    pub delta: Vec<f32>,
    /// The LoRA vector of the undo (the negated hypernetwork part plus its own fit).
    pub reverse_delta: Vec<f32>,
    /// The residual stage after G, `NF x 3` or empty (engine::bank).
    pub residual: Vec<f32>,
    pub reverse_residual: Vec<f32>,
    /// The source image's colour histogram, used by the quality gate.
    pub source_hist: Vec<f32>,
    /// The after image's colour histogram: the undo's quality gate (empty in version 1 files).
    pub target_hist: Vec<f32>,
}

#[derive(Serialize)]
struct HeaderOut<'a> {
    format_version: u32,
    name: &'a TemplateName,
    model_hash: &'a str,
    created_unix: u64,
    sources: &'a [SourcePair],
    card: &'a Card,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderIn {
    format_version: u32,
    name: TemplateName,
    model_hash: String,
    created_unix: u64,
    sources: Vec<SourcePair>,
    card: Card,
}

/// Read before the full header so a newer file reports its version instead of
/// tripping over fields this build does not know.
#[derive(Deserialize)]
struct VersionProbe {
    format_version: Option<u32>,
}

struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn decode_err(reason: impl Into<String>) -> StoreError {
    StoreError::Decode {
        reason: reason.into(),
    }
}

fn invalid(reason: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        reason: reason.into(),
    }
}

pub use super::check::{MAX_CARD_ABS, MAX_DELTA_ABS, MAX_HASH_LEN, MAX_RESIDUAL_ABS, RESIDUAL_LEN};

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl SourcePair {
    /// The size learned at: "544x384", or "1977x1483 (downscaled from 4032x3024)".
    pub fn size_text(&self) -> String {
        let at = format!("{}x{}", self.width, self.height);
        match self.downscaled_from {
            Some([w, h]) => format!("{at} (downscaled from {w}x{h})"),
            None => at,
        }
    }

    /// Records the size of the images this pair was read from, when learn worked smaller.
    pub fn read_from(&mut self, [w, h]: [u32; 2]) {
        if (self.width, self.height) != (w, h) {
            self.downscaled_from = Some([w, h]);
        }
    }

    /// The record a template keeps of one of its pairs: size, pixel hashes and thumbnails.
    pub fn of(before: &Frame, after: &Frame) -> SourcePair {
        let hash = |f: &Frame| blake3::hash(&f.to_rgb8()).to_hex().to_string();
        let thumb = |f: &Frame| {
            Frame {
                width: THUMB,
                height: THUMB,
                data: crate::engine::filterbank::thumbnail(f),
            }
            .to_rgb8()
        };
        SourcePair {
            before_blake3: hash(before),
            after_blake3: hash(after),
            width: before.width as u32,
            height: before.height as u32,
            downscaled_from: None,
            thumb_before: thumb(before),
            thumb_after: thumb(after),
        }
    }
}

impl Template {
    /// Learns a template from `pairs` (each of one size) and names it: the one place, for the
    /// command line and the station alike, where a learned template gets its name, model,
    /// creation time and the record of its pairs.
    pub fn learn(
        engine: &Engine,
        name: TemplateName,
        pairs: &[(Frame, Frame)],
        opts: LearnOptions,
    ) -> crate::Result<Template> {
        let learned = engine.learn_with(pairs, opts)?;
        let created_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let sources = pairs.iter().map(|(b, a)| SourcePair::of(b, a)).collect();
        Ok(learned.into_template(name, engine.models.hash.clone(), created_unix, sources))
    }
}

/// The store's side of `learn`: the engine knows nothing of names, sources or files.
impl Learned {
    /// The template to store: the one place a learned template gets its name and sources.
    pub fn into_template(
        self,
        name: TemplateName,
        model_hash: String,
        created_unix: u64,
        sources: Vec<SourcePair>,
    ) -> Template {
        Template {
            name,
            model_hash,
            created_unix,
            sources,
            card: self.card,
            delta: self.delta,
            reverse_delta: self.reverse_delta,
            residual: self.residual,
            reverse_residual: self.reverse_residual,
            source_hist: self.source_hist,
            target_hist: self.target_hist,
        }
    }
}

impl Template {
    /// Checks everything a reader checks (see [`super::check`]), so a bad template is
    /// refused at save time rather than at load time.
    pub fn validate(&self) -> Result<(), StoreError> {
        super::check::template(self).map_err(invalid)
    }

    /// Encodes the template in the file format, after [`Template::validate`].
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        self.validate()?;
        let header = serde_json::to_string(&HeaderOut {
            format_version: FORMAT_VERSION,
            name: &self.name,
            model_hash: &self.model_hash,
            created_unix: self.created_unix,
            sources: &self.sources,
            card: &self.card,
        })
        .map_err(|e| invalid(format!("cannot write the template header: {e}")))?;

        let mut thumbs = Vec::with_capacity(self.sources.len() * 2 * THUMB_BYTES);
        for s in &self.sources {
            thumbs.extend_from_slice(&s.thumb_before);
            thumbs.extend_from_slice(&s.thumb_after);
        }
        let floats = |v: &[f32]| Raw {
            dtype: Dtype::F32,
            shape: vec![v.len()],
            data: f32_bytes(v),
        };
        let tensors = [
            (T_DELTA, floats(&self.delta)),
            (T_REV_DELTA, floats(&self.reverse_delta)),
            (T_RESIDUAL, floats(&self.residual)),
            (T_REV_RESIDUAL, floats(&self.reverse_residual)),
            (T_TARGET_HIST, floats(&self.target_hist)),
            (
                T_HIST,
                Raw {
                    dtype: Dtype::F32,
                    shape: vec![self.source_hist.len()],
                    data: f32_bytes(&self.source_hist),
                },
            ),
            (
                T_THUMBS,
                Raw {
                    dtype: Dtype::U8,
                    shape: vec![self.sources.len(), 2, THUMB, THUMB, 3],
                    data: thumbs,
                },
            ),
        ];
        let meta = HashMap::from([(META_KEY.to_owned(), header)]);
        let mut bytes = safetensors::serialize(tensors.iter().map(|(n, r)| (*n, r)), Some(meta))
            .map_err(|e| invalid(format!("cannot encode the tensors: {e}")))?;
        let sum = blake3::hash(&bytes);
        bytes.extend_from_slice(sum.as_bytes());
        Ok(bytes)
    }

    /// The file bytes; empty if [`Template::validate`] refuses the template
    /// (use [`Template::encode`] to learn why). Never panics.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode().unwrap_or_default()
    }

    /// Decodes a template file and checks it in full (see [`super::check`]). Never panics,
    /// whatever the input.
    pub fn from_bytes(bytes: &[u8]) -> Result<Template, StoreError> {
        let body = verified_body(bytes)?;
        let file = Container::parse(body)?;
        let (version, header) = file.header()?;
        let t = file.template(version, header)?;
        super::check::template(&t).map_err(decode_err)?;
        Ok(t)
    }

    /// The direction `apply` runs: the edit, or its undo.
    pub fn edit(&self, reverse: bool) -> crate::engine::Edit<'_> {
        let (delta, residual) = if reverse {
            (&self.reverse_delta, &self.reverse_residual)
        } else {
            (&self.delta, &self.residual)
        };
        crate::engine::Edit { delta, residual }
    }

    /// The histogram the quality gate compares an input of `apply` with: the before images'
    /// for the edit, the after images' for the undo (version 1 files: the before images').
    pub fn gate_hist(&self, reverse: bool) -> &[f32] {
        if reverse && !self.target_hist.is_empty() {
            &self.target_hist
        } else {
            &self.source_hist
        }
    }
}

/// The safetensors part of a file whose length and checksum are right.
fn verified_body(bytes: &[u8]) -> Result<&[u8], StoreError> {
    let Some(body_len) = bytes.len().checked_sub(CHECKSUM_LEN) else {
        return Err(decode_err(format!(
            "the file is only {} bytes long; it is truncated or is not a template",
            bytes.len()
        )));
    };
    let (body, sum) = bytes.split_at_checked(body_len).unwrap_or((bytes, &[]));
    if blake3::hash(body).as_bytes().as_slice() != sum {
        return Err(decode_err(
            "checksum mismatch: the file is corrupt or was modified",
        ));
    }
    Ok(body)
}

/// A parsed safetensors container: its header and its data section.
struct Container<'a> {
    meta: Metadata,
    data: &'a [u8],
}

impl<'a> Container<'a> {
    fn parse(body: &'a [u8]) -> Result<Self, StoreError> {
        check_raw_header(body)?;
        let (header_len, meta) = SafeTensors::read_metadata(body)
            .map_err(|e| decode_err(format!("the tensor container is malformed: {e}")))?;
        let data = 8usize
            .checked_add(header_len)
            .and_then(|start| body.get(start..))
            .ok_or_else(|| decode_err("the tensor container is malformed: header too long"))?;
        Ok(Container { meta, data })
    }

    /// The takumi header and its format version.
    fn header(&self) -> Result<(u32, HeaderIn), StoreError> {
        let text = match self.meta.metadata() {
            Some(m) if m.len() == 1 => m.get(META_KEY),
            _ => None,
        }
        .ok_or_else(|| decode_err("the file has no takumi header; it is not a takumi template"))?;
        let probe: VersionProbe = serde_json::from_str(text)
            .map_err(|e| decode_err(format!("the takumi header is unreadable: {e}")))?;
        let version = match probe.format_version {
            Some(v @ OLDEST_VERSION..=FORMAT_VERSION) => v,
            Some(found) => return Err(StoreError::Version { found }),
            None => return Err(decode_err("the takumi header has no format_version")),
        };
        let header: HeaderIn = serde_json::from_str(text)
            .map_err(|e| decode_err(format!("the takumi header is invalid: {e}")))?;
        if header.format_version != version {
            return Err(decode_err("the takumi header's format_version changed"));
        }
        Ok((version, header))
    }

    /// The template the tensors and header describe; its values are checked by the caller.
    fn template(&self, version: u32, header: HeaderIn) -> Result<Template, StoreError> {
        self.expect_tensors(version)?;
        let delta = self.floats(T_DELTA)?;
        let source_hist = self.floats(T_HIST)?;
        let (reverse_delta, residual, reverse_residual, target_hist) = if version == 1 {
            let neg = delta.iter().map(|v| -v).collect();
            (neg, Vec::new(), Vec::new(), Vec::new())
        } else {
            (
                self.floats(T_REV_DELTA)?,
                self.floats(T_RESIDUAL)?,
                self.floats(T_REV_RESIDUAL)?,
                self.floats(T_TARGET_HIST)?,
            )
        };
        let mut sources = header.sources;
        self.thumbs(&mut sources)?;
        Ok(Template {
            name: header.name,
            model_hash: header.model_hash,
            created_unix: header.created_unix,
            sources,
            card: header.card,
            delta,
            reverse_delta,
            residual,
            reverse_residual,
            source_hist,
            target_hist,
        })
    }

    /// Exactly the tensors of `version`, no more and no fewer.
    fn expect_tensors(&self, version: u32) -> Result<(), StoreError> {
        let mut names = self.meta.offset_keys();
        names.sort();
        let mut want = if version == 1 {
            vec![T_DELTA, T_HIST, T_THUMBS]
        } else {
            vec![
                T_DELTA,
                T_REV_DELTA,
                T_RESIDUAL,
                T_REV_RESIDUAL,
                T_TARGET_HIST,
                T_HIST,
                T_THUMBS,
            ]
        };
        want.sort();
        if names != want {
            return Err(decode_err(format!(
                "the file holds tensors {names:?}, expected {want:?}"
            )));
        }
        Ok(())
    }

    fn tensor(&self, name: &str, dtype: Dtype) -> Result<(&[usize], &'a [u8]), StoreError> {
        let info = self
            .meta
            .info(name)
            .ok_or_else(|| decode_err(format!("tensor {name} is missing")))?;
        if info.dtype != dtype {
            return Err(decode_err(format!(
                "tensor {name} has type {:?}, expected {dtype:?}",
                info.dtype
            )));
        }
        let (s, e) = info.data_offsets;
        let bytes = self
            .data
            .get(s..e)
            .ok_or_else(|| decode_err(format!("tensor {name} lies outside the file")))?;
        Ok((&info.shape, bytes))
    }

    /// A one-dimensional F32 tensor; its length and values are checked with the template.
    fn floats(&self, name: &str) -> Result<Vec<f32>, StoreError> {
        let (shape, bytes) = self.tensor(name, Dtype::F32)?;
        let (words, rest) = bytes.as_chunks::<4>();
        if shape.len() != 1 || shape[0] != words.len() {
            return Err(decode_err(format!(
                "tensor {name} has shape {shape:?}, expected one dimension of {} values",
                words.len()
            )));
        }
        if !rest.is_empty() {
            return Err(decode_err(format!("tensor {name} is cut short")));
        }
        Ok(words.iter().map(|w| f32::from_le_bytes(*w)).collect())
    }

    /// Fills in each source pair's thumbnails from the `thumbs` tensor.
    fn thumbs(&self, sources: &mut [SourcePair]) -> Result<(), StoreError> {
        let (shape, thumbs) = self.tensor(T_THUMBS, Dtype::U8)?;
        let want = [sources.len(), 2, THUMB, THUMB, 3];
        if shape != want {
            return Err(decode_err(format!(
                "tensor {T_THUMBS} has shape {shape:?}, expected {want:?} for {} source pairs",
                sources.len()
            )));
        }
        let chunks = thumbs.chunks_exact(2 * THUMB_BYTES);
        if chunks.len() != sources.len() || !chunks.remainder().is_empty() {
            return Err(decode_err(format!(
                "the file has {} bytes of thumbnails but describes {} source pairs",
                thumbs.len(),
                sources.len()
            )));
        }
        for (s, chunk) in sources.iter_mut().zip(chunks) {
            let (before, after) = chunk
                .split_at_checked(THUMB_BYTES)
                .ok_or_else(|| decode_err("a thumbnail is cut short"))?;
            s.thumb_before = before.to_vec();
            s.thumb_after = after.to_vec();
        }
        Ok(())
    }
}

/// Checks the raw header before the safetensors reader sees it: that it is UTF-8 (to say so
/// plainly), and that no declared offset lies past the end of the data, because the reader adds
/// offsets without overflow checks and a crafted header (with a valid checksum) could make it
/// panic. Anything else malformed is left to the reader to report.
fn check_raw_header(body: &[u8]) -> Result<(), StoreError> {
    let Some((len_bytes, rest)) = body.split_first_chunk::<8>() else {
        return Ok(());
    };
    let Ok(header_len) = usize::try_from(u64::from_le_bytes(*len_bytes)) else {
        return Ok(());
    };
    let (Some(header), Some(data)) = (rest.get(..header_len), rest.get(header_len..)) else {
        return Ok(());
    };
    if let Err(e) = std::str::from_utf8(header) {
        return Err(decode_err(format!(
            "the file's header is not valid UTF-8 (at byte {} of the header)",
            e.valid_up_to()
        )));
    }
    let Ok(AllEntries(entries)) = serde_json::from_slice::<AllEntries>(header) else {
        return Ok(());
    };
    let limit = data.len() as u64;
    for (name, entry) in &entries {
        let Some(offsets) = entry.get("data_offsets").and_then(|o| o.as_array()) else {
            continue;
        };
        if offsets
            .iter()
            .any(|o| o.as_u64().is_some_and(|o| o > limit))
        {
            return Err(decode_err(format!(
                "the tensor container is malformed: tensor {name:?} points past the end of the file"
            )));
        }
    }
    Ok(())
}

/// Every entry of a JSON object, duplicates included (a map would keep one).
struct AllEntries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for AllEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = AllEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<AllEntries, A::Error> {
                let mut all = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    all.push(entry);
                }
                Ok(AllEntries(all))
            }
        }
        d.deserialize_map(V)
    }
}
