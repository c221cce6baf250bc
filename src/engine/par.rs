//! Row-parallel loops on scoped std threads: the frame work splits into independent row bands,
//! the calling thread working one of them. Starting a thread costs tens of microseconds, a few
//! times per apply (a few percent of a 640x480 apply on the build machine).

/// Calls `f(first_row, rows)` for bands of `out` (`row_len` values a row) on up to `threads` threads.
pub fn rows<F>(out: &mut [f32], row_len: usize, threads: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    planes([out], row_len, threads, |y0, [band]| f(y0, band));
}

/// [`rows`] over `P` planes of the same shape at once: `f(first_row, bands)` gets the same rows
/// of every plane, so one pass can write several outputs (the blurs' six planes, slicing's three).
pub fn planes<const P: usize, F>(outs: [&mut [f32]; P], row_len: usize, threads: usize, f: F)
where
    F: Fn(usize, [&mut [f32]; P]) + Sync,
{
    let n_rows = outs.first().map_or(0, |o| o.len() / row_len.max(1));
    let threads = threads.clamp(1, n_rows.max(1));
    if threads == 1 {
        f(0, outs);
        return;
    }
    let band = n_rows.div_ceil(threads);
    let mut chunks = outs.map(|o| o.chunks_mut(band * row_len));
    std::thread::scope(|s| {
        let first = next_all(&mut chunks);
        for i in 1..threads {
            let Some(bands) = next_all(&mut chunks) else {
                break;
            };
            let f = &f;
            s.spawn(move || f(i * band, bands));
        }
        // the calling thread takes the first band rather than wait: one thread fewer to start
        if let Some(bands) = first {
            f(0, bands);
        }
    });
}

/// The next band of every plane, or None once any plane has run out.
fn next_all<'a, const P: usize>(
    chunks: &mut [std::slice::ChunksMut<'a, f32>; P],
) -> Option<[&'a mut [f32]; P]> {
    let next = chunks.each_mut().map(|c| c.next());
    next.iter()
        .all(Option::is_some)
        .then(|| next.map(Option::unwrap))
}
