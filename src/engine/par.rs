//! Row-parallel loops on scoped std threads: the frame work splits into independent row bands,
//! and a thread pool crate would add nothing for two to four cores.

/// Calls `f(first_row, rows)` for bands of `out` (`row_len` values a row) on up to `threads` threads.
pub fn rows<F>(out: &mut [f32], row_len: usize, threads: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let n_rows = out.len() / row_len.max(1);
    let threads = threads.clamp(1, n_rows.max(1));
    if threads == 1 {
        f(0, out);
        return;
    }
    let band = n_rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(band * row_len).enumerate() {
            let f = &f;
            s.spawn(move || f(i * band, chunk));
        }
    });
}
