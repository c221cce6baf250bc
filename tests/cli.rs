//! The `takumi` command line on real files: the happy path, and every bad input refused with one
//! line that names the file, with nothing written.

mod common;

use std::path::Path;

use common::*;
use takumi::store::{TemplateName, TemplateStore};

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read(e.path()).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(13u32.to_be_bytes());
    out.extend(&ihdr);
    out.extend(crc32fast::hash(&ihdr).to_be_bytes());
    out
}

#[test]
fn learn_apply_list_show_rm() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    learn_sample(&store, "warm");
    let out = d.path().join("out");
    let text = run_ok(
        takumi(&store)
            .args(["apply", "--template", "warm", "--input"])
            .arg(samples().join("captures"))
            .arg("--output")
            .arg(&out),
    );
    assert_eq!(text.lines().count(), 3, "{text}");
    for n in ["chelsea", "astronaut", "rocket"] {
        let o = takumi::capture::load_image(&out.join(format!("{n}.jpg")), &Default::default())
            .unwrap();
        let i = takumi::capture::load_image(
            &samples().join(format!("captures/{n}.jpg")),
            &Default::default(),
        )
        .unwrap();
        assert_eq!((o.width, o.height), (i.width, i.height));
    }
    let single = d.path().join("one.png");
    run_ok(
        takumi(&store)
            .args(["apply", "--reverse", "--template", "warm", "--input"])
            .arg(samples().join("captures/rocket.jpg"))
            .arg("--output")
            .arg(&single),
    );
    assert!(single.exists());
    assert!(run_ok(takumi(&store).args(["templates", "list"])).starts_with("warm\t"));
    let shown = run_ok(takumi(&store).args(["templates", "show", "warm"]));
    assert!(shown.contains("self-PSNR"), "{shown}");
    // what apply runs for this template: G alone, or the residual stage's passes after it
    assert!(shown.contains("\napply        G"), "{shown}");
    run_ok(takumi(&store).args(["templates", "rm", "warm"]));
    assert_eq!(run_ok(takumi(&store).args(["templates", "list"])), "");
}

#[test]
fn store_flag_overrides_the_environment() {
    let d = tempfile::tempdir().unwrap();
    let env_store = d.path().join("env");
    let flag_store = d.path().join("flag");
    let s = samples();
    run_ok(
        takumi(&env_store)
            .args(["learn", "--name", "x", "--store"])
            .arg(&flag_store)
            .arg("--before")
            .arg(s.join("pair_before.jpg"))
            .arg("--after")
            .arg(s.join("pair_after.jpg")),
    );
    assert!(flag_store.join("x.tkt").exists());
    assert!(!env_store.join("x.tkt").exists());
}

/// Learning from `before`/`after` must fail naming `culprit`, and leave the store as it was.
fn learn_fails(before: &Path, after: &Path, culprit: &Path, what: &str) {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    learn_sample(&store, "keep");
    let before_state = snapshot(&store);
    let err = run_err(
        takumi(&store)
            .args(["learn", "--name", "new", "--before"])
            .arg(before)
            .arg("--after")
            .arg(after),
    );
    assert!(
        err.contains(&culprit.display().to_string()),
        "{what}: error does not name the file: {err}"
    );
    assert_eq!(snapshot(&store), before_state, "{what}: the store changed");
}

#[test]
fn bad_images_are_refused_by_learn() {
    let d = tempfile::tempdir().unwrap();
    let good = samples().join("pair_before.jpg");
    let missing = d.path().join("missing.png");
    learn_fails(&good, &missing, &missing, "missing file");

    let corrupt = d.path().join("corrupt.png");
    std::fs::write(&corrupt, b"this is not an image at all").unwrap();
    learn_fails(&corrupt, &good, &corrupt, "corrupt image");

    let truncated = d.path().join("truncated.jpg");
    let bytes = std::fs::read(samples().join("pair_after.jpg")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    learn_fails(&good, &truncated, &truncated, "truncated image");

    let empty = d.path().join("zero.png");
    std::fs::write(&empty, png_header(0, 0)).unwrap();
    learn_fails(&empty, &good, &empty, "0x0 image");

    let huge = d.path().join("huge.png");
    std::fs::write(&huge, png_header(60_000, 60_000)).unwrap();
    learn_fails(&good, &huge, &huge, "60000x60000 image");

    let other = samples().join("captures/rocket.jpg");
    learn_fails(&good, &other, &other, "before and after of different sizes");
}

#[test]
fn bad_names_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let s = samples();
    for name in ["../evil", "/etc/passwd", "UPPER", "", "a.b"] {
        let err = run_err(
            takumi(&store)
                .args(["learn", "--name", name, "--before"])
                .arg(s.join("pair_before.jpg"))
                .arg("--after")
                .arg(s.join("pair_after.jpg")),
        );
        assert!(err.contains("name"), "{err}");
    }
    assert!(!d.path().join("evil.tkt").exists());
    assert!(snapshot(&store).is_empty());
}

fn apply_fails(store: &Path, template: &str, input: &Path, output: &Path, needle: &str) {
    let before_state = snapshot(store);
    let err = run_err(
        takumi(store)
            .args(["apply", "--template", template, "--input"])
            .arg(input)
            .arg("--output")
            .arg(output),
    );
    assert!(
        err.contains(needle),
        "error does not mention {needle}: {err}"
    );
    assert!(
        !output.exists() || output.is_dir() && snapshot(output).is_empty(),
        "output was written: {}",
        output.display()
    );
    assert_eq!(snapshot(store), before_state, "the store changed");
}

#[test]
fn bad_apply_inputs_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    learn_sample(&store, "warm");
    let cap = samples().join("captures/rocket.jpg");
    let out = d.path().join("out.png");

    apply_fails(&store, "nosuch", &cap, &out, "nosuch");

    let missing = d.path().join("missing.jpg");
    apply_fails(
        &store,
        "warm",
        &missing,
        &out,
        &missing.display().to_string(),
    );

    // a folder with one corrupt image: nothing is written for the good ones either
    let inputs = d.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    std::fs::copy(&cap, inputs.join("a.jpg")).unwrap();
    std::fs::write(inputs.join("b.png"), b"garbage").unwrap();
    apply_fails(&store, "warm", &inputs, &d.path().join("outdir"), "b.png");

    // unwritable output: a folder that does not exist, and an unsupported extension
    let nodir = d.path().join("no/such/dir/out.png");
    apply_fails(&store, "warm", &cap, &nodir, &nodir.display().to_string());
    apply_fails(&store, "warm", &cap, &d.path().join("out.bmp"), "out.bmp");
}

#[test]
fn corrupt_template_file_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    learn_sample(&store, "warm");
    let f = store.join("warm.tkt");
    let mut bytes = std::fs::read(&f).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&f, &bytes).unwrap();
    let out = d.path().join("out.png");
    apply_fails(
        &store,
        "warm",
        &samples().join("captures/rocket.jpg"),
        &out,
        "checksum",
    );
    let err = run_err(takumi(&store).args(["templates", "show", "warm"]));
    assert!(err.contains("warm"), "{err}");
}

#[test]
fn template_from_another_model_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    learn_sample(&store, "warm");
    let s = TemplateStore::open(&store).unwrap();
    let name = TemplateName::new("warm").unwrap();
    let mut t = s.load(&name).unwrap();
    t.model_hash = "0123456789abcdef".into();
    s.save(&t).unwrap();
    let out = d.path().join("out.png");
    apply_fails(
        &store,
        "warm",
        &samples().join("captures/rocket.jpg"),
        &out,
        "made for model 0123456789abcdef",
    );
}

#[test]
fn config_errors_name_the_key() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("bad.toml");
    std::fs::write(&cfg, "[engine]\nthreads = 2\ntreads = 3\n").unwrap();
    let err = run_err(
        takumi(d.path())
            .arg("--config")
            .arg(&cfg)
            .args(["templates", "list"]),
    );
    assert!(err.contains("treads"), "{err}");
    std::fs::write(&cfg, "[engine]\nprecision = \"fp16\"\n").unwrap();
    let err = run_err(
        takumi(d.path())
            .arg("--config")
            .arg(&cfg)
            .args(["templates", "list"]),
    );
    assert!(err.contains("engine.precision"), "{err}");
    std::fs::write(&cfg, "[quality]\nreview_threshold = 7.0\n").unwrap();
    let err = run_err(
        takumi(d.path())
            .arg("--config")
            .arg(&cfg)
            .args(["templates", "list"]),
    );
    assert!(err.contains("quality.review_threshold"), "{err}");
}

/// Copies of the sample captures as `names` in a new folder `dir`.
fn captures_as(dir: &Path, names: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    let caps = ["astronaut.jpg", "chelsea.jpg", "rocket.jpg"];
    for (n, c) in names.iter().zip(caps.iter().cycle()) {
        std::fs::copy(samples().join("captures").join(c), dir.join(n)).unwrap();
    }
}

fn apply_folder(store: &Path, input: &Path, output: &Path) -> std::process::Command {
    let mut c = takumi(store);
    c.args(["apply", "--template", "warm", "--input"])
        .arg(input)
        .arg("--output")
        .arg(output);
    c
}

#[test]
fn folder_apply_is_all_or_nothing() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    learn_sample(&store, "warm");

    // good images around a corrupt and a truncated one: both named, nothing written, not even
    // the output folders
    let inputs = d.path().join("in");
    captures_as(&inputs, &["a.jpg", "c.jpg", "e.jpg"]);
    std::fs::write(inputs.join("b.png"), b"not an image").unwrap();
    let jpeg = std::fs::read(samples().join("captures/rocket.jpg")).unwrap();
    std::fs::write(inputs.join("d.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    let fresh = d.path().join("new/out");
    let err = run_err(&mut apply_folder(&store, &inputs, &fresh));
    for want in [
        "2 of 5 inputs failed",
        "b.png",
        "d.jpg",
        "nothing was written",
    ] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
    assert!(!d.path().join("new").exists(), "output folders were left");

    // an existing output folder keeps its files as they were
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("a.jpg"), b"yesterday's result").unwrap();
    std::fs::write(out.join("notes.txt"), b"kept").unwrap();
    let before = snapshot(&out);
    run_err(&mut apply_folder(&store, &inputs, &out));
    assert_eq!(snapshot(&out), before, "the output folder changed");

    // every input good, but one output cannot be put in place (a folder holds its name): the
    // outputs renamed before it are taken back, the replaced one restored
    let good = d.path().join("good");
    captures_as(&good, &["a.jpg", "b.jpg", "c.jpg"]);
    std::fs::create_dir_all(out.join("b.jpg/inside")).unwrap();
    let before = snapshot(&out);
    let err = run_err(&mut apply_folder(&store, &good, &out));
    assert!(
        err.contains(&out.join("b.jpg").display().to_string()),
        "{err}"
    );
    assert_eq!(snapshot(&out), before, "a failed batch left files behind");

    // once it can, the whole batch lands, replacing the old result, with no leftovers
    std::fs::remove_dir_all(out.join("b.jpg")).unwrap();
    let text = run_ok(&mut apply_folder(&store, &good, &out));
    assert_eq!(text.lines().count(), 3, "{text}");
    // in input order, though frames are applied side by side
    for (line, n) in text.lines().zip(["a.jpg", "b.jpg", "c.jpg"]) {
        assert!(line.contains(&good.join(n).display().to_string()), "{text}");
    }
    let names: Vec<String> = snapshot(&out).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["a.jpg", "b.jpg", "c.jpg", "notes.txt"]);
    for n in ["a.jpg", "b.jpg", "c.jpg"] {
        takumi::capture::load_image(&out.join(n), &Default::default()).unwrap();
    }
}

/// Byte range of tensor `name`'s data inside a safetensors body.
fn tensor_range(body: &[u8], name: &str) -> std::ops::Range<usize> {
    let n = u64::from_le_bytes(body[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&body[8..8 + n]).unwrap();
    let at = |k: usize| 8 + n + header[name]["data_offsets"][k].as_u64().unwrap() as usize;
    at(0)..at(1)
}

/// Writes `pristine` (a template file) with `edit` applied to its safetensors body, under a
/// recomputed checksum: a crafted file that passes the integrity check.
fn craft(file: &Path, pristine: &[u8], edit: impl FnOnce(&mut Vec<u8>)) {
    let mut body = pristine[..pristine.len() - 32].to_vec();
    edit(&mut body);
    let sum = blake3::hash(&body);
    body.extend_from_slice(sum.as_bytes());
    std::fs::write(file, body).unwrap();
}

fn fill_f32(body: &mut [u8], name: &str, value: f32, count: Option<usize>) {
    let r = tensor_range(body, name);
    let n = count.unwrap_or(r.len() / 4);
    for w in body[r].chunks_exact_mut(4).take(n) {
        w.copy_from_slice(&value.to_le_bytes());
    }
}

#[test]
fn crafted_template_files_are_refused_not_panicked_on() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    learn_sample(&store, "warm");
    let file = store.join("warm.tkt");
    let pristine = std::fs::read(&file).unwrap();
    let hash = TemplateStore::open(&store)
        .unwrap()
        .load(&TemplateName::new("warm").unwrap())
        .unwrap()
        .sources[0]
        .before_blake3
        .clone();
    let cap = samples().join("captures/rocket.jpg");
    let out = d.path().join("out.png");
    type Edit = Box<dyn FnOnce(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit)> = vec![
        // the same byte length as the hex digest, so every offset stays right; `templates
        // show` used to panic slicing it
        (
            "before_blake3",
            Box::new(move |b| {
                let at = b.windows(64).position(|w| w == hash.as_bytes()).unwrap();
                b[at..at + 64].copy_from_slice("é".repeat(32).as_bytes());
            }),
        ),
        (
            "not a finite",
            Box::new(|b| fill_f32(b, "delta", f32::NAN, Some(1))),
        ),
        (
            "beyond the bound",
            Box::new(|b| fill_f32(b, "delta", 1e30, Some(1))),
        ),
        (
            "source_hist",
            Box::new(|b| fill_f32(b, "source_hist", 0.0, None)),
        ),
    ];
    for (needle, edit) in cases {
        craft(&file, &pristine, edit);
        let err = run_err(takumi(&store).args(["templates", "show", "warm"]));
        assert!(err.contains("warm.tkt") && err.contains(needle), "{err}");
        let list = run_ok(takumi(&store).args(["templates", "list"]));
        assert!(
            list.contains("UNREADABLE") && list.contains(needle),
            "{list}"
        );
        apply_fails(&store, "warm", &cap, &out, needle);
    }
    // a LoRA vector at the store's bound loads, but drives the model out of range: apply
    // refuses it rather than writing NaN pixels (black)
    craft(&file, &pristine, |b| {
        fill_f32(b, "delta", takumi::store::template::MAX_DELTA_ABS, None)
    });
    run_ok(takumi(&store).args(["templates", "show", "warm"]));
    apply_fails(&store, "warm", &cap, &out, "out of range");
}

/// Work over the memory budget is refused up front with one error naming the key, and nothing
/// is stored or written; under the budget the same work goes through.
#[test]
fn work_over_the_memory_budget_is_refused_up_front() {
    let d = tempfile::tempdir().unwrap();
    let (store, cfg) = (d.path().join("store"), d.path().join("small.toml"));
    // the sample pair (544x384) needs ~68 MB to learn, a 640x427 capture ~59 MB to apply
    std::fs::write(&cfg, "[engine]\nmemory_mb = 50\n").unwrap();
    let s = samples();
    let err = run_err(
        takumi(&store)
            .arg("--config")
            .arg(&cfg)
            .args(["learn", "--name", "big", "--before"])
            .arg(s.join("pair_before.jpg"))
            .arg("--after")
            .arg(s.join("pair_after.jpg")),
    );
    assert!(
        err.contains("memory_mb") && err.contains("learning"),
        "{err}"
    );
    assert!(snapshot(&store).is_empty(), "{:?}", snapshot(&store));
    learn_sample(&store, "big");
    let out = d.path().join("out.png");
    let apply = |budget: u32| {
        std::fs::write(&cfg, format!("[engine]\nmemory_mb = {budget}\n")).unwrap();
        let mut c = takumi(&store);
        c.arg("--config")
            .arg(&cfg)
            .args(["apply", "--template", "big", "--input"]);
        c.arg(s.join("captures/rocket.jpg"))
            .arg("--output")
            .arg(&out);
        c
    };
    let err = run_err(&mut apply(50));
    assert!(
        err.contains("memory_mb") && err.contains("applying"),
        "{err}"
    );
    assert!(!out.exists());
    run_ok(&mut apply(200));
    assert!(out.exists());
}

#[test]
fn folder_apply_matches_single_apply_and_ends_with_a_summary() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    learn_sample(&store, "warm");
    let inputs = d.path().join("in");
    captures_as(&inputs, &["a.jpg", "b.png", "c.jpg"]);
    let out = d.path().join("out");
    let o = apply_folder(&store, &inputs, &out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // stdout: one line per output, for scripts; the summary goes to stderr, last
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 3);
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("apply: 3 files, 0 failed, "), "{err}");
    assert!(last.contains(" ms per frame"), "{err}");
    // each input decoded once, as a single apply decodes it: the same bytes either way
    for n in ["a.jpg", "b.png", "c.jpg"] {
        let single = d.path().join(format!("single-{n}"));
        run_ok(
            takumi(&store)
                .args(["apply", "--template", "warm", "--input"])
                .arg(inputs.join(n))
                .arg("--output")
                .arg(&single),
        );
        assert_eq!(
            std::fs::read(out.join(n)).unwrap(),
            std::fs::read(&single).unwrap(),
            "{n}: the folder's output differs from a single apply's"
        );
    }
}

/// Outside the repository (no `models/` there, and no package installed in /usr/share), every
/// command that needs the models says once how to point takumi at them.
#[test]
fn missing_models_are_one_error_naming_how_to_point_at_them() {
    if Path::new("/usr/share/takumi/models").exists() {
        eprintln!("skipped: a takumi package is installed here, and would be found");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let s = samples();
    let err = run_err(
        takumi(&d.path().join("store"))
            .current_dir(d.path())
            .env_remove("TAKUMI_MODELS")
            .args(["learn", "--name", "p", "--before"])
            .arg(s.join("pair_before.jpg"))
            .arg("--after")
            .arg(s.join("pair_after.jpg")),
    );
    for want in ["--models", "TAKUMI_MODELS", "no model.json"] {
        assert!(err.contains(want), "{want} not in: {err}");
    }
}

/// `jpeg` with an APP1 Exif segment right after its start marker, holding one tag: orientation
/// `o` (6: a viewer turns the stored image a quarter turn clockwise, as phones tag portraits).
fn with_orientation(jpeg: &[u8], o: u16) -> Vec<u8> {
    let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08".to_vec(); // big-endian TIFF, first IFD at 8
    exif.extend(1u16.to_be_bytes()); // one entry
    exif.extend(0x0112u16.to_be_bytes()); // Orientation
    exif.extend(3u16.to_be_bytes()); // SHORT
    exif.extend(1u32.to_be_bytes()); // one value
    exif.extend(o.to_be_bytes());
    exif.extend([0, 0, 0, 0, 0, 0]); // the value's padding, then no next IFD
    let mut out = jpeg[..2].to_vec();
    out.extend([0xff, 0xe1]);
    out.extend(u16::try_from(exif.len() + 2).unwrap().to_be_bytes());
    out.extend(exif);
    out.extend(&jpeg[2..]);
    out
}

fn jpeg_of(img: &image::RgbImage) -> Vec<u8> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let frame = takumi::Frame::from_rgb8(w, h, img.as_raw());
    takumi::publish::file::encode(&frame, takumi::publish::file::ImageKind::Jpeg).unwrap()
}

/// 64x96 upright: grey, with a red square at the top left and a blue one at the bottom right.
fn portrait() -> image::RgbImage {
    image::RgbImage::from_fn(64, 96, |x, y| match (x, y) {
        (0..24, 0..24) => image::Rgb([230, 20, 20]),
        (40.., 72..) => image::Rgb([20, 20, 230]),
        _ => image::Rgb([128, 128, (x + y) as u8]),
    })
}

fn apply_file(store: &Path, input: &Path, output: &Path) -> std::process::Output {
    takumi(store)
        .args(["apply", "--template", "warm", "--input"])
        .arg(input)
        .arg("--output")
        .arg(output)
        .output()
        .unwrap()
}

fn rgb_at(img: &image::DynamicImage, x: u32, y: u32) -> [f32; 3] {
    let p = img.to_rgb32f().get_pixel(x, y).0;
    [p[0], p[1], p[2]]
}

/// A phone's portrait, stored sideways with orientation 6, comes out upright: the size a viewer
/// shows, each part where the viewer shows it, and close to the same photo stored upright.
#[test]
fn apply_turns_an_exif_rotated_photo_upright() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    learn_sample(&store, "warm");
    let upright = portrait();
    let sideways = image::imageops::rotate270(&upright);
    let (tagged, plain) = (d.path().join("tagged.jpg"), d.path().join("plain.jpg"));
    std::fs::write(&tagged, with_orientation(&jpeg_of(&sideways), 6)).unwrap();
    std::fs::write(&plain, jpeg_of(&upright)).unwrap();
    let (out_t, out_p) = (d.path().join("t.png"), d.path().join("p.png"));
    for (i, o) in [(&tagged, &out_t), (&plain, &out_p)] {
        let r = apply_file(&store, i, o);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    let got = image::open(&out_t).unwrap();
    assert_eq!((got.width(), got.height()), (64, 96));
    let [r, g, b] = rgb_at(&got, 8, 8);
    assert!(
        r > g + 0.4 && r > b + 0.4,
        "top left is not red: {r} {g} {b}"
    );
    let [r, g, b] = rgb_at(&got, 56, 88);
    assert!(
        b > r + 0.3 && b > g + 0.3,
        "bottom right is not blue: {r} {g} {b}"
    );
    let psnr = takumi::frame::psnr(
        &takumi::capture::load_image(&out_t, &Default::default()).unwrap(),
        &takumi::capture::load_image(&out_p, &Default::default()).unwrap(),
    );
    assert!(psnr > 30.0, "{psnr:.1} dB from the upright photo's output");
}

/// A product cut-out keeps its alpha and a 16-bit image its depth through a PNG; a JPEG output
/// of either says what it drops.
#[test]
fn apply_keeps_alpha_and_16_bits_in_a_png_and_says_what_a_jpeg_drops() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    learn_sample(&store, "warm");
    let cutout = image::RgbaImage::from_fn(96, 80, |x, y| {
        let inside = (x as i32 - 48).pow(2) + (y as i32 - 40).pow(2) < 900;
        let a = if inside { 255 } else { (x * 2) as u8 };
        image::Rgba([(x * 2) as u8, 150, (y * 3) as u8, a])
    });
    let cut_in = d.path().join("cutout.png");
    cutout.save(&cut_in).unwrap();
    let cut_out = d.path().join("cutout-out.png");
    let r = apply_file(&store, &cut_in, &cut_out);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got = image::open(&cut_out).unwrap();
    assert_eq!(got.color(), image::ColorType::Rgba8);
    let alpha = |i: &image::RgbaImage| i.pixels().map(|p| p[3]).collect::<Vec<u8>>();
    assert_eq!(alpha(&got.to_rgba8()), alpha(&cutout));

    // a horizontal 16-bit ramp: 1024 levels, four times what 8 bits hold
    let ramp = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(1024, 64, |x, _| {
        let v = (x * 64) as u16;
        image::Rgb([v, v, v])
    });
    let deep_in = d.path().join("deep.png");
    ramp.save(&deep_in).unwrap();
    let deep_out = d.path().join("deep-out.png");
    let r = apply_file(&store, &deep_in, &deep_out);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got = image::open(&deep_out).unwrap();
    assert_eq!(got.color(), image::ColorType::Rgb16);
    let mut levels: Vec<u16> = got.to_rgb16().pixels().map(|p| p[1]).collect();
    levels.sort_unstable();
    levels.dedup();
    assert!(levels.len() > 256, "{} levels of green", levels.len());

    for (input, lost) in [(&cut_in, "alpha channel"), (&deep_in, "16-bit depth")] {
        let jpg = d.path().join("out.jpg");
        let r = apply_file(&store, input, &jpg);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            err.lines()
                .any(|l| l.starts_with("warning: ") && l.contains(lost) && l.contains(".png")),
            "{err}"
        );
        assert_eq!(image::open(&jpg).unwrap().color(), image::ColorType::Rgb8);
    }
}

/// Two phone photos, larger than any frame apply takes, one of them stored sideways: learn
/// turns it upright (so the pair registers), downscales both and says at what size it learned,
/// as `templates show` does. Without the closed-form fit, which takes seconds at this size and
/// has nothing to do with it.
#[test]
fn learn_takes_phone_photos_and_records_the_size_it_learned_at() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let (w, h) = (4032, 3024);
    let big = |name: &str| {
        let f = takumi::capture::load_image(&samples().join(name), &Default::default()).unwrap();
        let rgb = f.resized(w, h).to_rgb8();
        image::RgbImage::from_raw(w as u32, h as u32, rgb).unwrap()
    };
    let (before, after) = (d.path().join("before.jpg"), d.path().join("after.jpg"));
    let sideways = image::imageops::rotate270(&big("pair_before.jpg"));
    std::fs::write(&before, with_orientation(&jpeg_of(&sideways), 6)).unwrap();
    std::fs::write(&after, jpeg_of(&big("pair_after.jpg"))).unwrap();
    let text = run_ok(
        takumi(&store)
            .args(["learn", "--no-fit", "--name", "phone", "--before"])
            .arg(&before)
            .arg("--after")
            .arg(&after),
    );
    let max_px = takumi::engine::Engine::learn_max_px(1);
    let (lw, lh) = takumi::capture::file::fit_pixels((w as u32, h as u32), max_px);
    assert!(lw < 3840 && u64::from(lw * lh) <= max_px, "{lw}x{lh}");
    let size = format!("{lw}x{lh} (downscaled from {w}x{h})");
    assert!(
        text.contains(&format!("pair 0 learned at {size}")),
        "{text}"
    );
    let shown = run_ok(takumi(&store).args(["templates", "show", "phone"]));
    assert!(shown.contains(&size), "{shown}");
    assert!(shown.contains("register 0   ok"), "{shown}");
}

/// An io error from any module (here the store's, on a path through a file) is said once: the
/// module errors keep it in their message, not also as the chain's cause.
#[test]
fn an_io_error_is_said_once() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = run_err(takumi(&file.join("store")).args(["templates", "list"]));
    assert_eq!(err.matches("Not a directory").count(), 1, "{err}");
}
