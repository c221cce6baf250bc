//! Template store tests on real files in temporary directories.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod common;

use takumi::capture::load_image;
use takumi::engine::quality::HIST;
use takumi::engine::{Edit, Engine, Precision};
use takumi::store::{
    Card, PairRegistration, PartGains, SourcePair, StoreError, THUMB_BYTES, Template, TemplateName,
    TemplateStore,
    template::{MAX_DELTA_ABS, MAX_RESIDUAL_ABS, RESIDUAL_LEN},
};

const CRASH_CHILD_ENV: &str = "TAKUMI_STORE_CHILD_DIR";
const ENOSPC_CHILD_ENV: &str = "TAKUMI_STORE_ENOSPC_DIR";

fn name(s: &str) -> TemplateName {
    TemplateName::new(s).unwrap()
}

fn sample(n: &str, pairs: usize, delta_len: usize, seed: u64) -> Template {
    let s = seed as f32;
    Template {
        name: name(n),
        model_hash: blake3::hash(b"model").to_hex().to_string(),
        created_unix: 1_700_000_000 + seed,
        sources: (0..pairs)
            .map(|p| SourcePair {
                before_blake3: blake3::hash(format!("b{p}").as_bytes())
                    .to_hex()
                    .to_string(),
                after_blake3: blake3::hash(format!("a{p}").as_bytes())
                    .to_hex()
                    .to_string(),
                width: 4000 + p as u32,
                height: 3000,
                downscaled_from: None,
                thumb_before: (0..THUMB_BYTES)
                    .map(|i| ((i + p + seed as usize) % 251) as u8)
                    .collect(),
                thumb_after: (0..THUMB_BYTES)
                    .map(|i| ((i * 7 + p) % 241) as u8)
                    .collect(),
            })
            .collect(),
        card: Card {
            exposure_ev: 0.5 + s,
            wb_shift: [0.1, -0.2],
            contrast: 1.1,
            saturation: 0.9,
            sharpness: 0.3,
            self_psnr_db: 38.5,
            pairs: pairs as u32,
            fit_used: true,
            validated_gain_db: Some(6.5),
            reverse_gain_db: None,
            part_gains_db: PartGains {
                hypernet: 0.5,
                tone: 4.0,
                bank: 0.0,
                position: 1.0,
                blurs: 0.0,
            },
            heldout_pair_psnr_db: None,
            zero_prior: false,
            distribution_gain_db: None,
            round_trip_db: None,
            registration: (0..pairs)
                .map(|p| PairRegistration {
                    registered: p % 2 == 0,
                    dx: 3.0,
                    dy: -2.5,
                    angle_deg: 1.5,
                    scale: 1.02,
                    residual_px: 0.2,
                })
                .collect(),
        },
        delta: (0..delta_len)
            .map(|i| (i % 977) as f32 * 0.001 + s)
            .collect(),
        reverse_delta: (0..delta_len).map(|i| -(i as f32) * 0.002).collect(),
        residual: if delta_len > 0 {
            (0..RESIDUAL_LEN).map(|i| i as f32 * 1e-3).collect()
        } else {
            Vec::new()
        },
        reverse_residual: Vec::new(),
        target_hist: ramp(|i| (HIST - i) as f32),
        source_hist: ramp(|i| i as f32),
    }
}

/// A quality-gate histogram (a distribution over HIST cells) shaped by `f`.
fn ramp(f: impl Fn(usize) -> f32) -> Vec<f32> {
    let v: Vec<f32> = (0..HIST).map(f).collect();
    let sum: f32 = v.iter().sum();
    v.iter().map(|x| x / sum).collect()
}

fn new_store() -> (tempfile::TempDir, TemplateStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = TemplateStore::open(dir.path().join("templates")).unwrap();
    (dir, store)
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn seal(mut body: Vec<u8>) -> Vec<u8> {
    let sum = blake3::hash(&body);
    body.extend_from_slice(sum.as_bytes());
    body
}

fn corrupt_reason(r: Result<Template, StoreError>) -> String {
    match r {
        Err(StoreError::Corrupt { reason, .. }) => reason,
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

fn decode_reason(r: Result<Template, StoreError>) -> String {
    match r {
        Err(StoreError::Decode { reason }) => reason,
        other => panic!("expected Decode, got {other:?}"),
    }
}

#[test]
fn round_trip_save_load_list_remove() {
    let (_tmp, store) = new_store();
    let alpha = sample("alpha", 1, 11_600, 1);
    let beta = sample("beta", 3, 11_600, 2);
    store.save(&alpha).unwrap();
    store.save(&beta).unwrap();

    assert_eq!(store.load(&name("alpha")).unwrap(), alpha);
    let loaded = store.load(&name("beta")).unwrap();
    assert_eq!(loaded.sources.len(), 3);
    assert_eq!(loaded, beta);

    let list = store.list().unwrap();
    let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert_eq!(list[0].1.as_ref().unwrap(), &alpha);
    assert_eq!(list[1].1.as_ref().unwrap(), &beta);

    // Overwrite replaces the content.
    let alpha2 = sample("alpha", 2, 500, 9);
    store.save(&alpha2).unwrap();
    assert_eq!(store.load(&name("alpha")).unwrap(), alpha2);

    store.remove(&name("alpha")).unwrap();
    assert!(matches!(
        store.load(&name("alpha")),
        Err(StoreError::NotFound { name }) if name == "alpha"
    ));
    let list = store.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].0.as_str(), "beta");
    // Only template files, no temp leftovers.
    assert_eq!(file_names(store.dir()), ["beta.tkt"]);
    assert_eq!(store.path_of(&name("beta")), store.dir().join("beta.tkt"));
}

#[test]
fn bytes_round_trip_with_zero_pairs_and_no_residual_stage() {
    let mut t = sample("empty", 0, 1, 3);
    t.residual.clear();
    let bytes = t.to_bytes();
    assert!(!bytes.is_empty());
    assert_eq!(Template::from_bytes(&bytes).unwrap(), t);
}

#[test]
fn name_validation() {
    for bad in [
        "../x",
        "/abs",
        "/etc/passwd",
        "a/b",
        "..",
        ".",
        "",
        "A",
        "Alpha",
        "a.b",
        "a b",
        "é",
        "a\0b",
        "a\\b",
    ] {
        match TemplateName::new(bad) {
            Err(StoreError::BadName { name, reason }) => {
                assert_eq!(name, bad);
                assert!(!reason.is_empty());
            }
            other => panic!("{bad:?} accepted: {other:?}"),
        }
        assert!(bad.parse::<TemplateName>().is_err());
        let json = serde_json::to_string(bad).unwrap();
        assert!(
            serde_json::from_str::<TemplateName>(&json).is_err(),
            "{bad:?}"
        );
    }
    assert!(TemplateName::new(&"a".repeat(49)).is_err());
    let long = "a".repeat(48);
    assert_eq!(TemplateName::new(&long).unwrap().as_str(), long);
    let n: TemplateName = "line-3_ok".parse().unwrap();
    assert_eq!(n.to_string(), "line-3_ok");
    assert_eq!(n.as_ref(), "line-3_ok");

    // Every valid name maps to a file directly inside the store.
    let (_tmp, store) = new_store();
    for ok in ["-", "_", "--", "a-b_c9", long.as_str()] {
        let p = store.path_of(&name(ok));
        assert_eq!(p.parent().unwrap(), store.dir(), "{ok}");
    }
}

#[test]
fn flipped_byte_is_reported_as_checksum_mismatch() {
    let (_tmp, store) = new_store();
    let t = sample("flip", 1, 1000, 4);
    store.save(&t).unwrap();
    let path = store.path_of(&t.name);
    let good = fs::read(&path).unwrap();
    let len = good.len();
    for pos in [0, 1, 8, len / 3, len / 2, len - 33, len - 32, len - 1] {
        let mut bad = good.clone();
        bad[pos] ^= 0x40;
        fs::write(&path, &bad).unwrap();
        let reason = corrupt_reason(store.load(&t.name));
        assert!(reason.contains("checksum"), "byte {pos}: {reason}");
        let msg = store.load(&t.name).unwrap_err().to_string();
        assert!(msg.contains("flip.tkt") && !msg.contains('\n'), "{msg}");
    }
    fs::write(&path, &good).unwrap();
    assert_eq!(store.load(&t.name).unwrap(), t);
}

#[test]
fn every_single_byte_flip_is_refused() {
    let bytes = sample("all", 1, 100, 5).to_bytes();
    for pos in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[pos] = bad[pos].wrapping_add(1 + (pos % 255) as u8);
        let reason = decode_reason(Template::from_bytes(&bad));
        assert!(reason.contains("checksum"), "byte {pos}: {reason}");
    }
}

#[test]
fn truncated_files_are_corrupt() {
    let (_tmp, store) = new_store();
    let t = sample("trunc", 2, 1000, 6);
    store.save(&t).unwrap();
    let path = store.path_of(&t.name);
    let good = fs::read(&path).unwrap();
    let len = good.len();
    for cut in [0, 1, 8, 31, 32, 33, 100, len / 2, len - 32, len - 1] {
        fs::write(&path, &good[..cut]).unwrap();
        let reason = corrupt_reason(store.load(&t.name));
        assert!(!reason.is_empty(), "{cut}");
    }
    // Whole file plus a trailing byte is also wrong.
    let mut longer = good.clone();
    longer.push(0);
    fs::write(&path, &longer).unwrap();
    corrupt_reason(store.load(&t.name));
}

#[test]
fn garbage_is_corrupt_and_never_panics() {
    let (_tmp, store) = new_store();
    let path = store.path_of(&name("junk"));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for len in [1usize, 7, 31, 32, 40, 64, 1000, 100_000] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        fs::write(&path, &bytes).unwrap();
        corrupt_reason(store.load(&name("junk")));
        // The same garbage with a valid checksum must fail on structure instead.
        decode_reason(Template::from_bytes(&seal(bytes)));
    }
    fs::write(&path, vec![0xFF; 4096]).unwrap();
    corrupt_reason(store.load(&name("junk")));
}

/// A safetensors body built by hand, so tests can make files that the
/// encoder never would.
fn st_body(meta: Option<&str>, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if let Some(m) = meta {
        header.insert("__metadata__".into(), serde_json::json!({ "takumi": m }));
    }
    let mut data = Vec::new();
    for (n, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            (*n).into(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let header = serde_json::to_vec(&header).unwrap();
    raw_body(&header, &data)
}

fn raw_body(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

fn header_json(version: u32, n: &str, pairs: usize) -> String {
    let t = sample("x", pairs, 0, 0);
    serde_json::json!({
        "format_version": version,
        "name": n,
        "model_hash": t.model_hash,
        "created_unix": 5,
        "sources": t.sources,
        "card": t.card,
    })
    .to_string()
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A valid histogram tensor: uniform over the HIST cells.
fn hist_tensor(name: &str) -> (&str, &'static str, Vec<usize>, Vec<u8>) {
    (name, "F32", vec![HIST], f32s(&ramp(|_| 1.0)))
}

fn thumbs(pairs: usize) -> (&'static str, &'static str, Vec<usize>, Vec<u8>) {
    (
        "thumbs",
        "U8",
        vec![pairs, 2, 64, 64, 3],
        vec![7; pairs * 2 * THUMB_BYTES],
    )
}

#[test]
fn hand_built_files_with_valid_checksum() {
    let ok_header = header_json(1, "hand", 1);
    let good = st_body(
        Some(&ok_header),
        &[
            ("delta", "F32", vec![3], f32s(&[1.0, 2.0, 3.0])),
            hist_tensor("source_hist"),
            thumbs(1),
        ],
    );
    // The hand-built layout is accepted, so the failures below are about
    // exactly what each one changes.
    let t = Template::from_bytes(&seal(good)).unwrap();
    assert_eq!(t.delta, [1.0, 2.0, 3.0]);
    assert_eq!(t.sources[0].thumb_after, vec![7; THUMB_BYTES]);

    // a version 1 body of the usual tensors: delta, source histogram, `pairs` thumbnails
    let v1 = |header: Option<&str>, pairs: usize| {
        st_body(
            header,
            &[
                ("delta", "F32", vec![1], f32s(&[1.0])),
                hist_tensor("source_hist"),
                thumbs(pairs),
            ],
        )
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "not a finite",
            st_body(
                Some(&ok_header),
                &[
                    ("delta", "F32", vec![3], f32s(&[1.0, f32::NAN, 3.0])),
                    hist_tensor("source_hist"),
                    thumbs(1),
                ],
            ),
        ),
        (
            "not a finite",
            st_body(
                Some(&ok_header),
                &[
                    ("delta", "F32", vec![1], f32s(&[1.0])),
                    ("source_hist", "F32", vec![HIST], {
                        let mut h = ramp(|_| 1.0);
                        h[HIST - 1] = f32::INFINITY;
                        f32s(&h)
                    }),
                    thumbs(1),
                ],
            ),
        ),
        (
            "type",
            st_body(
                Some(&ok_header),
                &[
                    ("delta", "F64", vec![1], 1.0f64.to_le_bytes().to_vec()),
                    hist_tensor("source_hist"),
                    thumbs(1),
                ],
            ),
        ),
        (
            "one dimension",
            st_body(
                Some(&ok_header),
                &[
                    ("delta", "F32", vec![2, 1], f32s(&[1.0, 2.0])),
                    hist_tensor("source_hist"),
                    thumbs(1),
                ],
            ),
        ),
        (
            "source pairs",
            v1(Some(&ok_header), 2),
        ),
        (
            "source pairs",
            v1(Some(&header_json(1, "hand", 3)), 0),
        ),
        (
            "expected",
            st_body(
                Some(&ok_header),
                &[
                    ("delta", "F32", vec![1], f32s(&[1.0])),
                    hist_tensor("source_hist"),
                ],
            ),
        ),
        (
            "expected",
            st_body(
                Some(&ok_header),
                &[
                    ("delta", "F32", vec![1], f32s(&[1.0])),
                    ("extra", "F32", vec![1], f32s(&[1.0])),
                    hist_tensor("source_hist"),
                    thumbs(1),
                ],
            ),
        ),
        (
            "no takumi header",
            v1(None, 1),
        ),
        (
            "unknown field",
            v1(Some(&ok_header.replacen('{', "{\"extra\":1,", 1)), 1),
        ),
        (
            "invalid template name",
            v1(Some(&header_json(1, "../etc", 1)), 1),
        ),
        (
            "not a finite",
            v1(Some(&ok_header.replace("38.5", "1e300")), 1),
        ),
        (
            "format_version",
            v1(Some(&ok_header.replace("\"format_version\":1,", "")), 1),
        ),
        // Declared sizes whose sum overflows 64 bits, and no data at all.
        (
            "malformed",
            raw_body(
                {
                    let size = (1u64 << 61) - 1;
                    let entries: Vec<String> = (0..8u64)
                        .map(|k| {
                            format!(
                                "\"t{k}\":{{\"dtype\":\"U8\",\"shape\":[{size}],\"data_offsets\":[{},{}]}}",
                                k * size,
                                (k + 1) * size
                            )
                        })
                        .collect();
                    format!("{{{}}}", entries.join(",")).into_bytes()
                }
                .as_slice(),
                &[],
            ),
        ),
        (
            "malformed",
            raw_body(
                br#"{"delta":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,18446744073709551615]}}"#,
                &[],
            ),
        ),
        ("malformed", raw_body(b"{not json", &[])),
        ("malformed", {
            let mut b = u64::MAX.to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            b
        }),
        ("malformed", (1u64 << 40).to_le_bytes().to_vec()),
        ("malformed", vec![1, 2, 3]),
    ];
    for (i, (want, body)) in cases.into_iter().enumerate() {
        let reason = decode_reason(Template::from_bytes(&seal(body)));
        assert!(
            reason.contains(want),
            "case {i}: want {want:?} in {reason:?}"
        );
        assert!(!reason.contains('\n'), "case {i}: {reason:?}");
    }
}

#[test]
fn version_mismatch_is_reported() {
    let t = sample("ver", 1, 100, 7);
    let bytes = t.to_bytes();
    let mut body = bytes[..bytes.len() - 32].to_vec();
    // The header is JSON inside a JSON string, so its quotes are escaped.
    let from = br#"format_version\":2,"#;
    let to = br#"format_version\":3,"#;
    let at = body
        .windows(from.len())
        .position(|w| w == from)
        .expect("version field in the header");
    body[at..at + to.len()].copy_from_slice(to);
    let bytes = seal(body);
    assert!(matches!(
        Template::from_bytes(&bytes),
        Err(StoreError::Version { found: 3 })
    ));

    let (_tmp, store) = new_store();
    fs::write(store.path_of(&t.name), &bytes).unwrap();
    let err = store.load(&t.name).unwrap_err();
    assert!(matches!(err, StoreError::Version { found: 3 }), "{err:?}");
    assert!(err.to_string().contains("version 3"), "{err}");
}

#[test]
fn renamed_file_is_refused() {
    let (_tmp, store) = new_store();
    let one = sample("one", 1, 100, 8);
    store.save(&one).unwrap();
    fs::copy(store.path_of(&name("one")), store.path_of(&name("two"))).unwrap();
    let reason = corrupt_reason(store.load(&name("two")));
    assert!(
        reason.contains("'one'") && reason.contains("'two'"),
        "{reason}"
    );

    let list = store.list().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].1.as_ref().unwrap(), &one);
    assert!(matches!(list[1].1, Err(StoreError::Corrupt { .. })));
}

#[test]
fn list_skips_files_that_are_not_templates() {
    let (_tmp, store) = new_store();
    store.save(&sample("real", 1, 10, 9)).unwrap();
    for other in [
        "README",
        "Bad.tkt",
        ".hidden.tkt",
        "a.b.tkt",
        "x.tkt.bak",
        ".real.tmp.1",
    ] {
        fs::write(store.dir().join(other), b"not a template").unwrap();
    }
    fs::write(store.dir().join("broken.tkt"), b"not a template").unwrap();
    let list = store.list().unwrap();
    let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["broken", "real"]);
    assert!(matches!(list[0].1, Err(StoreError::Corrupt { .. })));
    assert!(list[1].1.is_ok());
}

#[test]
fn invalid_template_is_refused_and_old_one_kept() {
    let (_tmp, store) = new_store();
    let good = sample("keep", 1, 100, 10);
    store.save(&good).unwrap();

    let mut nan = sample("keep", 1, 100, 11);
    nan.delta[50] = f32::NAN;
    let mut inf = sample("keep", 1, 100, 12);
    inf.card.self_psnr_db = f32::INFINITY;
    let mut thumb = sample("keep", 2, 100, 13);
    thumb.sources[1].thumb_after.pop();
    for bad in [nan, inf, thumb] {
        let err = store.save(&bad).unwrap_err();
        assert!(matches!(err, StoreError::Invalid { .. }), "{err:?}");
        assert!(bad.to_bytes().is_empty());
    }
    assert_eq!(store.load(&good.name).unwrap(), good);
    assert_eq!(file_names(store.dir()), ["keep.tkt"]);
}

/// The version 2 file of `t` laid out as the encoder would, but without its checks, and with
/// a valid checksum: what a crafted file looks like.
fn crafted(t: &Template) -> Vec<u8> {
    seal(crafted_body(t))
}

fn crafted_body(t: &Template) -> Vec<u8> {
    let header = serde_json::json!({
        "format_version": 2,
        "name": t.name,
        "model_hash": t.model_hash,
        "created_unix": t.created_unix,
        "sources": t.sources,
        "card": t.card,
    })
    .to_string();
    let thumbs: Vec<u8> = t
        .sources
        .iter()
        .flat_map(|s| [s.thumb_before.as_slice(), &s.thumb_after].concat())
        .collect();
    let floats = |n, v: &[f32]| (n, "F32", vec![v.len()], f32s(v));
    st_body(
        Some(&header),
        &[
            floats("delta", &t.delta),
            floats("reverse_delta", &t.reverse_delta),
            floats("residual", &t.residual),
            floats("reverse_residual", &t.reverse_residual),
            floats("target_hist", &t.target_hist),
            floats("source_hist", &t.source_hist),
            ("thumbs", "U8", vec![t.sources.len(), 2, 64, 64, 3], thumbs),
        ],
    )
}

/// Every file of `dir` with its bytes.
fn dir_state(dir: &Path) -> Vec<(String, Vec<u8>)> {
    file_names(dir)
        .into_iter()
        .map(|f| {
            let bytes = fs::read(dir.join(&f)).unwrap();
            (f, bytes)
        })
        .collect()
}

type Tweak = fn(&mut Template);

/// Crafted templates, each with one defect, and a word the refusal must contain.
fn crafted_cases() -> Vec<(&'static str, Tweak, &'static str)> {
    vec![
        (
            "empty source_hist",
            |t| t.source_hist.clear(),
            "source_hist) has 0 values, expected 56",
        ),
        (
            "short target_hist",
            |t| t.target_hist.truncate(10),
            "target_hist) has 10 values",
        ),
        (
            "all-zero histogram",
            |t| t.source_hist.fill(0.0),
            "sums to 0",
        ),
        (
            "negative histogram cell",
            |t| {
                t.source_hist[0] -= 0.5;
                t.source_hist[1] += 0.5;
            },
            "negative",
        ),
        (
            "NaN in delta",
            |t| t.delta[7] = f32::NAN,
            "value 7 of the template vector (delta) is not a finite",
        ),
        ("huge delta", |t| t.delta[3] = 1e30, "beyond the bound"),
        (
            "infinite residual",
            |t| t.residual[0] = f32::INFINITY,
            "residual stage is not a finite",
        ),
        (
            "huge reverse residual",
            |t| t.reverse_residual = vec![2e3; RESIDUAL_LEN],
            "reverse residual stage is 2e3, beyond",
        ),
        (
            "short residual",
            |t| t.residual.truncate(100),
            "residual has 100 values",
        ),
        (
            "short reverse_delta",
            |t| {
                t.reverse_delta.pop();
            },
            "reverse_delta has 99",
        ),
        (
            "empty delta",
            |t| {
                t.delta.clear();
                t.reverse_delta.clear();
            },
            "delta) is empty",
        ),
        (
            "huge card field",
            |t| t.card.contrast = 1e20,
            "card field contrast",
        ),
        // (JSON has no NaN: serde writes null, refused as a type error like any other)
        (
            "huge registration",
            |t| t.card.registration[0].scale = -1e7,
            "registration.scale",
        ),
        (
            "pairs miscounted",
            |t| t.card.pairs = 5,
            "1 source pairs for the 5 pairs",
        ),
        (
            "extra registration",
            |t| t.card.registration.push(PairRegistration::default()),
            "2 registrations for the 1 pairs",
        ),
        (
            "non-hex model hash",
            |t| t.model_hash = "é".repeat(8),
            "model_hash must be 1 to 64 lowercase hex",
        ),
        (
            "empty model hash",
            |t| t.model_hash.clear(),
            "model_hash must be",
        ),
        (
            "huge source hash",
            |t| t.sources[0].before_blake3 = "a".repeat(100_000),
            "before_blake3 must be",
        ),
    ]
}

#[test]
fn crafted_files_with_valid_checksums_are_refused_and_leave_the_store_alone() {
    let good = sample("victim", 1, 100, 14);
    // the crafting itself is faithful: an untouched template reads back equal
    assert_eq!(Template::from_bytes(&crafted(&good)).unwrap(), good);
    let (_tmp, store) = new_store();
    store.save(&good).unwrap();
    store.save(&sample("other", 2, 100, 15)).unwrap();
    let before = dir_state(store.dir());
    let path = store.path_of(&good.name);
    for (what, tweak, needle) in crafted_cases() {
        let mut t = good.clone();
        tweak(&mut t);
        let bytes = crafted(&t);
        let reason = decode_reason(Template::from_bytes(&bytes));
        assert!(
            reason.contains(needle),
            "{what}: want {needle:?} in {reason:?}"
        );
        assert!(
            !reason.contains('\n') && reason.len() < 300,
            "{what}: {reason:?}"
        );
        // the encoder runs the same checks, so no such file is ever written
        assert!(
            matches!(t.encode(), Err(StoreError::Invalid { .. })),
            "{what}"
        );

        let err = store.install(&bytes).unwrap_err();
        assert!(err.to_string().contains(needle), "{what}: {err}");
        assert_eq!(dir_state(store.dir()), before, "{what}: the store changed");

        // the same file put in place by hand is refused on load, naming the file
        fs::write(&path, &bytes).unwrap();
        let msg = store.load(&good.name).unwrap_err().to_string();
        assert!(
            msg.contains("victim.tkt") && msg.contains(needle),
            "{what}: {msg}"
        );
        fs::write(
            &path,
            &before.iter().find(|(f, _)| f == "victim.tkt").unwrap().1,
        )
        .unwrap();
    }
    assert_eq!(store.load(&good.name).unwrap(), good);
}

#[test]
fn header_that_is_not_utf8_is_refused() {
    let mut t = sample("utf", 1, 10, 16);
    t.model_hash = "abcdef".repeat(8);
    let mut body = crafted_body(&t);
    let at = body
        .windows(6)
        .position(|w| w == b"abcdef")
        .expect("the model hash in the header");
    body[at + 2] = 0xFF;
    let reason = decode_reason(Template::from_bytes(&seal(body)));
    assert!(reason.contains("not valid UTF-8"), "{reason}");
}

#[test]
fn install_accepts_a_valid_file_and_replaces_atomically() {
    let (_tmp, store) = new_store();
    store.save(&sample("swap", 1, 100, 17)).unwrap();
    let newer = sample("swap", 2, 100, 18);
    assert_eq!(store.install(&crafted(&newer)).unwrap(), newer);
    assert_eq!(store.load(&newer.name).unwrap(), newer);
    assert_eq!(file_names(store.dir()), ["swap.tkt"]);
}

/// A template whose values sit at the store's bounds loads; applying it gives finite pixels or
/// a clear error, never NaN (which would be written as black).
#[test]
fn values_at_the_bounds_never_give_nan_pixels() {
    let eng = Engine::load(&common::models(), Precision::Float, 1).unwrap();
    let cap = common::samples().join("captures/rocket.jpg");
    let frame = load_image(&cap, &Default::default()).unwrap();
    let n = eng.models.template_len;
    let finite = |f: &takumi::Frame| f.data.iter().all(|v| v.is_finite());
    let zeros = vec![0.0; n];
    for w in [MAX_RESIDUAL_ABS, -MAX_RESIDUAL_ABS] {
        let residual = vec![w; RESIDUAL_LEN];
        let mut t = sample("bound", 1, n, 19);
        (t.delta, t.residual) = (zeros.clone(), residual.clone());
        Template::from_bytes(&t.to_bytes()).unwrap();
        let edit = Edit {
            delta: &zeros,
            residual: &residual,
        };
        let out = eng.apply_edit(edit, &frame).unwrap();
        assert!(finite(&out), "residual at {w}: non-finite pixels");
    }
    let alternating: Vec<f32> = (0..n)
        .map(|i| {
            if i % 2 == 0 {
                MAX_DELTA_ABS
            } else {
                -MAX_DELTA_ABS
            }
        })
        .collect();
    for (what, delta) in [("+bound", vec![MAX_DELTA_ABS; n]), ("±bound", alternating)] {
        let mut t = sample("bound", 1, n, 20);
        (t.delta, t.reverse_delta) = (delta.clone(), delta.clone());
        Template::from_bytes(&t.to_bytes()).unwrap();
        match eng.apply_edit(
            Edit {
                delta: &delta,
                residual: &[],
            },
            &frame,
        ) {
            Ok(out) => assert!(finite(&out), "{what}: non-finite pixels"),
            Err(e) => assert!(e.to_string().contains("out of range"), "{what}: {e}"),
        }
    }
    // every LoRA factor at +bound multiplies up past f32 through the backbone's layers: only
    // the engine's range check stands between it and NaN pixels
    let all = vec![MAX_DELTA_ABS; n];
    let err = eng
        .apply_edit(
            Edit {
                delta: &all,
                residual: &[],
            },
            &frame,
        )
        .unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
}

#[test]
fn remove_missing_is_not_found() {
    let (_tmp, store) = new_store();
    let err = store.remove(&name("ghost")).unwrap_err();
    assert!(matches!(&err, StoreError::NotFound { name } if name == "ghost"));
    assert!(err.to_string().contains("ghost"), "{err}");
    assert!(matches!(
        store.load(&name("ghost")),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn open_on_a_regular_file_is_an_io_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain-file");
    fs::write(&file, b"x").unwrap();
    match TemplateStore::open(&file) {
        Err(StoreError::Io {
            path,
            cause: source,
        }) => {
            assert_eq!(path, file);
            assert_eq!(source.kind(), std::io::ErrorKind::NotADirectory);
        }
        other => panic!("expected Io, got {other:?}"),
    }
    let msg = TemplateStore::open(&file).unwrap_err().to_string();
    assert!(msg.contains("plain-file"), "{msg}");
    // Below a file is no better.
    assert!(matches!(
        TemplateStore::open(file.join("sub")),
        Err(StoreError::Io { .. })
    ));
}

#[test]
fn open_removes_only_stale_temp_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let stale = dir.join(".alpha.tmp.4242.0");
    let live = dir.join(".beta.tmp.4243.7");
    let keep = [
        ".alpha.tmp.1",
        "notes.txt",
        ".alpha.tmp.x.1",
        "alpha.tmp.1.2",
    ];
    fs::write(&stale, b"half a template").unwrap();
    fs::write(&live, b"being written").unwrap();
    for k in keep {
        fs::write(dir.join(k), b"x").unwrap();
    }
    // A writer that is still alive holds a lock on its temp file.
    let writer = fs::File::open(&live).unwrap();
    writer.lock().unwrap();

    TemplateStore::open(dir).unwrap();
    assert!(!stale.exists());
    assert!(live.exists());
    for k in keep {
        assert!(dir.join(k).exists(), "{k}");
    }
    drop(writer);
    TemplateStore::open(dir).unwrap();
    assert!(!live.exists());
}

fn crash_template(n: &str, seq: u64, len: usize) -> Template {
    let mut t = sample(n, 1, 0, 0);
    t.created_unix = seq;
    // distinct per save, and within the store's bound on template values
    t.delta = (0..len)
        .map(|i| (seq % 997) as f32 * 0.5 + (i % 1000) as f32 * 1e-3)
        .collect();
    t.reverse_delta = t.delta.iter().map(|v| -v).collect();
    t
}

/// Writer half of `sigkill_during_saves_never_leaves_a_broken_template`; does
/// nothing unless that test started it.
#[test]
fn crash_child_writer() {
    let Some(dir) = std::env::var_os(CRASH_CHILD_ENV) else {
        return;
    };
    let store = TemplateStore::open(PathBuf::from(dir)).unwrap();
    let start = Instant::now();
    let mut seq = 0;
    // Bounded in case the parent dies without killing us.
    while start.elapsed() < Duration::from_secs(60) {
        seq += 1;
        store.save(&crash_template("big", seq, 2_000_000)).unwrap();
        store.save(&crash_template("small", seq, 1000)).unwrap();
    }
}

fn is_temp_looking(f: &str) -> bool {
    f.starts_with('.') && f.contains(".tmp.")
}

#[test]
fn sigkill_during_saves_never_leaves_a_broken_template() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let exe = std::env::current_exe().unwrap();
    let mut rng = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    let (mut kills, mut mid_write_kills, mut loaded) = (0, 0, 0);
    // At least 5 kills; more while none has yet landed in the middle of a write.
    while kills < 5 || (mid_write_kills == 0 && kills < 25) {
        // Opened before the kill, so listing below sees any temp file left.
        let store = TemplateStore::open(&dir).unwrap();
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child_writer", "--test-threads=1"])
            .env(CRASH_CHILD_ENV, &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(200 + rng % 1300));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the writer stopped by itself: a save failed"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;

        let files = file_names(&dir);
        if files.iter().any(|f| is_temp_looking(f)) {
            mid_write_kills += 1;
        }
        for f in &files {
            assert!(
                is_temp_looking(f) || f == "big.tkt" || f == "small.tkt",
                "unexpected file {f}"
            );
        }
        for (n, t) in store.list().unwrap() {
            let t = t.unwrap_or_else(|e| panic!("after kill {kills}: {n}: {e}"));
            let len = if n.as_str() == "big" { 2_000_000 } else { 1000 };
            assert_eq!(t, crash_template(n.as_str(), t.created_unix, len));
            loaded += 1;
        }
        TemplateStore::open(&dir).unwrap();
        let left: Vec<String> = file_names(&dir)
            .into_iter()
            .filter(|f| is_temp_looking(f))
            .collect();
        assert!(left.is_empty(), "stale temp files after reopen: {left:?}");
    }
    eprintln!("kills {kills}, mid-write {mid_write_kills}, loaded {loaded}");
    assert!(loaded > 0, "the writer never completed a save");
    assert!(
        mid_write_kills > 0,
        "none of {kills} kills landed during a write"
    );
}

/// Runs inside a private mount namespace on a 1 MiB tmpfs; see
/// `full_disk_is_an_io_error_and_keeps_the_old_template`.
#[test]
fn enospc_child() {
    let Some(dir) = std::env::var_os(ENOSPC_CHILD_ENV) else {
        return;
    };
    let store = TemplateStore::open(PathBuf::from(dir)).unwrap();
    let small = crash_template("keep", 1, 1000);
    store.save(&small).unwrap();
    for n in ["keep", "fresh"] {
        let err = store.save(&crash_template(n, 2, 2_000_000)).unwrap_err();
        match &err {
            StoreError::Io {
                path,
                cause: source,
            } => {
                assert_eq!(path, &store.path_of(&name(n)));
                assert_eq!(source.raw_os_error(), Some(28), "{source}");
            }
            other => panic!("expected Io, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("{n}.tkt")) && !msg.contains('\n'),
            "{msg}"
        );
    }
    assert_eq!(store.load(&name("keep")).unwrap(), small);
    assert_eq!(file_names(store.dir()), ["keep.tkt"]);
    // The failed writes gave their space back.
    let next = crash_template("keep", 3, 1000);
    store.save(&next).unwrap();
    assert_eq!(store.load(&name("keep")).unwrap(), next);
}

#[test]
fn full_disk_is_an_io_error_and_keeps_the_old_template() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small-disk");
    fs::create_dir(&mnt).unwrap();
    let exe = std::env::current_exe().unwrap();
    let script = r#"mount -t tmpfs -o size=1m tmpfs "$1" || exit 77
exec "$2" --exact enospc_child --test-threads=1 --nocapture"#;
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", script, "sh"])
        .arg(&mnt)
        .arg(&exe)
        .env(ENOSPC_CHILD_ENV, &mnt)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED: cannot run unshare to make a small file system: {e}");
            return;
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The harness exits 101 when a test fails; other codes mean no namespace or mount.
    match out.status.code() {
        Some(0) => assert!(text.contains("1 passed"), "{text}"),
        Some(101) => panic!("full-disk child failed:\n{text}"),
        _ => eprintln!("SKIPPED: no private tmpfs here ({:?}): {text}", out.status),
    }
}
