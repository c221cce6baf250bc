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
        let (o, _) =
            takumi::capture::load_image(&out.join(format!("{n}.jpg")), &Default::default())
                .unwrap();
        let (i, _) = takumi::capture::load_image(
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
    assert!(run_ok(takumi(&store).args(["templates", "show", "warm"])).contains("self-PSNR"));
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
