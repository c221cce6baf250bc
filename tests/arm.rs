//! Kernels, with evidence: tract-linalg picks the SIMD kernels of the machine it runs on, not a
//! portable fallback. On aarch64 (under qemu: `-cpu cortex-a72`, see .cargo/config.toml) the f32
//! matmul is a NEON `arm64simd_*` kernel and never SVE; on armv7 with `TRACT_CPU_ARM32_NEON=1`
//! an `armv7neon_*` kernel; on x86_64 an AVX/FMA one. `board/cross-build.sh ARCH --test` runs
//! this file under qemu; on the host it checks the same on x86_64.

mod common;

use common::*;
use takumi::engine::kernels;

/// What a kernel of this architecture's SIMD tree is called.
fn native_simd(name: &str) -> bool {
    if cfg!(target_arch = "aarch64") {
        name.starts_with("arm64simd_") && !name.contains("sve")
    } else if cfg!(target_arch = "arm") {
        if std::env::var("TRACT_CPU_ARM32_NEON").as_deref() == Ok("1") {
            name.starts_with("armv7neon_")
        } else {
            // no NEON claimed: the VFP kernel is what a NEON-less core gets
            name.starts_with("armv7neon_") || name.starts_with("armvfpv2_")
        }
    } else if cfg!(target_arch = "x86_64") {
        name.starts_with("fma_") || name.starts_with("avx")
    } else {
        true
    }
}

#[test]
fn dispatch_picks_the_native_simd_f32_kernels() {
    let c = kernels::chosen();
    eprintln!("{c}");
    for k in [&c.mmm_f32, &c.mmv_f32] {
        assert!(
            native_simd(k),
            "{k} is not this machine's SIMD kernel ({c})"
        );
    }
    if cfg!(target_arch = "aarch64") {
        assert!(!c.isa.contains("sve"), "SVE claimed: {c}");
        assert!(c.tiers.contains(&"arm64simd"), "{c}");
    }
    if cfg!(target_arch = "arm") && std::env::var("TRACT_CPU_ARM32_NEON").as_deref() == Ok("1") {
        assert!(c.isa.contains("neon"), "{c}");
    }
}

#[test]
fn the_optimised_backbone_runs_them() {
    for f in ["backbone.onnx", "hypernet.onnx"] {
        let ks = kernels::onnx_kernels(&models().join(f)).unwrap();
        eprintln!("{f}: {ks:?}");
        assert!(!ks.is_empty(), "{f}: no matmul in the optimised plan");
        for k in &ks {
            assert!(
                native_simd(k),
                "{f} runs {k}, not this machine's SIMD kernel"
            );
        }
    }
}

/// The QDQ int8 models are folded back to float by tract: their optimised plans hold f32
/// matmul kernels and no integer one, so `precision = "int8"` buys file size only (see
/// board/README.md, "Precision per board").
#[test]
fn qdq_int8_runs_float_kernels() {
    for f in ["backbone.int8.onnx", "hypernet.int8.onnx"] {
        let ks = kernels::onnx_kernels(&models().join(f)).unwrap();
        eprintln!("{f}: {ks:?}");
        assert!(!ks.is_empty(), "{f}: no matmul in the optimised plan");
        assert!(
            ks.iter().all(|k| k.contains("f32") && !k.contains("i32")),
            "{f} runs {ks:?}: tract no longer folds QDQ to float; measure int8 again"
        );
    }
}

/// Not a check: the workload whose guest instructions board/precision/measure.sh counts under
/// qemu with a TCG plugin. It loads the engine on one thread, a capture resized to 640x480 and
/// a stored template, then applies it `TAKUMI_PROBE_APPLIES` times; the count of a run with 3
/// applies minus that of a run with 1, halved, is one apply and nothing else (no start-up, no
/// decoding or encoding). `TAKUMI_PROBE_PRECISION` (float, f16, int8), `TAKUMI_PROBE_MODELS`,
/// `TAKUMI_PROBE_STORE` and `TAKUMI_PROBE_TEMPLATE` say what to apply; with
/// `TAKUMI_PROBE_STAGE=backbone` only G's CNN runs (on the frame's 64x64 thumbnail), the part
/// of an apply that the precision changes and that does not grow with the frame.
#[test]
#[ignore = "a workload for board/precision/measure.sh"]
fn probe_apply_640x480() {
    use takumi::engine::{Engine, Precision};
    use takumi::store::{TemplateName, TemplateStore};
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let applies: usize = var("TAKUMI_PROBE_APPLIES").parse().unwrap();
    let precision: Precision = var("TAKUMI_PROBE_PRECISION").parse().unwrap();
    let store = TemplateStore::open(var("TAKUMI_PROBE_STORE")).unwrap();
    let t = store
        .load(&TemplateName::new(&var("TAKUMI_PROBE_TEMPLATE")).unwrap())
        .unwrap();
    // one thread: instructions spent spinning or waiting on other threads would vary run to run
    let eng = Engine::load(
        std::path::Path::new(&var("TAKUMI_PROBE_MODELS")),
        precision,
        1,
    )
    .unwrap();
    eprintln!("probe: {precision} runs {:?}", eng.models.matmul_kernels());
    let cap = image::open(samples().join("captures/rocket.jpg"))
        .unwrap()
        .to_rgb8();
    let (w, h) = (cap.width() as usize, cap.height() as usize);
    let cap = takumi::Frame::from_rgb8(w, h, cap.as_raw());
    let vga = cap.resized(640, 480);
    let backbone_only = std::env::var("TAKUMI_PROBE_STAGE").as_deref() == Ok("backbone");
    let thumb = takumi::engine::filterbank::thumbnail(&vga);
    for _ in 0..applies {
        if backbone_only {
            let grid = eng.models.backbone(&thumb, &t.delta).unwrap();
            assert!(!grid.is_empty());
        } else {
            let out = eng.apply_edit(t.edit(false), &vga).unwrap();
            assert_eq!((out.width, out.height), (640, 480));
        }
    }
}
