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
