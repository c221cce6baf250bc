//! Fuzz target: `harness::template_file` (fuzz/harness.rs), which tests/fuzz_corpus.rs also replays the
//! corpus through.
#![no_main]

// shared with the replay test; each target calls one of its functions
#[path = "../harness.rs"]
#[allow(dead_code)]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::template_file(data));
