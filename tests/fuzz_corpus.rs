//! Replays the fuzzers' corpus (fuzz/corpus/<target>/, minimised with `cargo fuzz cmin`) through
//! the same functions the fuzz targets call (fuzz/harness.rs), on the stable toolchain: every
//! input a fuzzer kept, crashes it once found included, stays checked in CI without nightly.
//! How to fuzz: fuzz/README.md.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_input_is_handled_without_a_panic() {
    let mut failed = Vec::new();
    for (target, run) in harness::TARGETS {
        let files = corpus(target);
        assert!(!files.is_empty(), "fuzz/corpus/{target} is empty");
        for path in files {
            let data = std::fs::read(&path).unwrap();
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "inputs that panicked: {failed:#?}");
}

/// The template corpus is only worth replaying if it gets past the checksum and the container
/// into the value checks and the save/load round trip: at least one input must load.
#[test]
fn the_template_corpus_reaches_a_loadable_template() {
    let loads = corpus("template_file").iter().any(|p| {
        let mut file = std::fs::read(p).unwrap();
        let sum = blake3::hash(&file);
        file.extend_from_slice(sum.as_bytes());
        takumi::store::Template::from_bytes(&file).is_ok()
    });
    assert!(
        loads,
        "no input of fuzz/corpus/template_file loads as a template"
    );
}

/// Likewise the image corpus must hold images that decode, not only ones refused up front.
#[test]
fn the_image_corpus_reaches_a_decoded_image() {
    let limits = takumi::capture::file::ImageLimits::default();
    let decodes = corpus("image_decode")
        .iter()
        .any(|p| takumi::capture::file::decode_image(&std::fs::read(p).unwrap(), &limits).is_ok());
    assert!(decodes, "no input of fuzz/corpus/image_decode decodes");
}

/// Found by the image_decode target: a PNG whose palette chunk (PLTE) is 49 bytes, not a whole
/// number of RGB entries, made the png decoder panic. It is refused with a reason instead.
#[test]
fn a_png_with_a_ragged_palette_is_refused() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus/image_decode/png_plte_not_multiple_of_3");
    let bytes = std::fs::read(&path).unwrap();
    let limits = takumi::capture::file::ImageLimits::default();
    match takumi::capture::file::decode_image(&bytes, &limits) {
        Err(takumi::Error::BadImage { reason, .. }) => {
            assert!(
                reason.contains("PLTE") && reason.contains("49 bytes"),
                "{reason}"
            )
        }
        other => panic!("expected a bad image, got {other:?}"),
    }
}
