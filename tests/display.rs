//! The station display: golden image, state-driven changes, robustness, device errors.
//!
//! The golden image is regenerated with `TAKUMI_BLESS=1 cargo test --test display`; look at
//! the new tests/fixtures/display/golden_480x320.png before committing it.

use std::path::{Path, PathBuf};

use embedded_graphics::pixelcolor::{Rgb888, RgbColor};
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::Rectangle;

use takumi::display::{
    Canvas, Display, DisplayError, DisplayState, FbDisplay, MAX_SIDE, PngDisplay, RgbImage8,
    layout, palette, render,
};

const GOLDEN: &str = "tests/fixtures/display/golden_480x320.png";

fn image(width: u32, height: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage8 {
    let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        for x in 0..width {
            rgb.extend_from_slice(&f(x, y));
        }
    }
    RgbImage8 { width, height, rgb }
}

/// A 64x48 diagonal gradient and a 64x48 checkerboard-tinted copy of it.
fn before_after() -> (RgbImage8, RgbImage8) {
    let before = image(64, 48, |x, y| [(x * 4) as u8, (y * 5) as u8, 128]);
    let after = image(64, 48, |x, y| {
        let on = ((x / 8) + (y / 8)) % 2 == 0;
        [(x * 4) as u8, if on { 220 } else { 40 }, (y * 5) as u8]
    });
    (before, after)
}

fn fixed_state() -> DisplayState {
    let (before, after) = before_after();
    DisplayState {
        template: "bracket-deburr-v3".into(),
        score: 0.912,
        needs_review: true,
        time: "2026-11-26 15:04:05".into(),
        connected: true,
        armed: true,
        queue_depth: 3,
        before: Some(before),
        after: Some(after),
    }
}

fn draw(state: &DisplayState, width: u32, height: u32) -> Canvas {
    let mut canvas = Canvas::new(width, height).expect("canvas size");
    let Ok(()) = render(&mut canvas, state);
    canvas
}

fn show_png(state: &DisplayState, path: &Path, width: u32, height: u32) -> image::RgbImage {
    let mut display = PngDisplay::new(path, width, height).expect("display size");
    display.show(state).expect("show");
    image::open(path).expect("decode PNG").to_rgb8()
}

/// Every pixel position where the two canvases differ.
fn diff(a: &Canvas, b: &Canvas) -> Vec<Point> {
    assert_eq!((a.width(), a.height()), (b.width(), b.height()));
    let mut out = Vec::new();
    for y in 0..a.height() {
        for x in 0..a.width() {
            if a.pixel(x, y) != b.pixel(x, y) {
                out.push(Point::new(x as i32, y as i32));
            }
        }
    }
    out
}

fn count(canvas: &Canvas, area: Rectangle, color: Rgb888) -> usize {
    area.points()
        .filter(|p| canvas.pixel(p.x as u32, p.y as u32) == Some(color))
        .count()
}

fn whole(canvas: &Canvas) -> Rectangle {
    Rectangle::new(Point::zero(), Size::new(canvas.width(), canvas.height()))
}

fn leftovers(dir: &Path, keep: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != keep)
        .collect()
}

#[test]
fn png_matches_the_golden_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("screen.png");
    let actual = show_png(&fixed_state(), &out, 480, 320);
    assert_eq!(leftovers(dir.path(), "screen.png"), Vec::<PathBuf>::new());

    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN);
    if std::env::var_os("TAKUMI_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::copy(&out, &golden).unwrap();
    }
    let expected = image::open(&golden)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; create it with TAKUMI_BLESS=1 cargo test --test display",
                golden.display()
            )
        })
        .to_rgb8();
    assert_eq!(actual.dimensions(), expected.dimensions());
    let wrong: Vec<_> = actual
        .enumerate_pixels()
        .filter(|(x, y, p)| expected.get_pixel(*x, *y) != *p)
        .map(|(x, y, _)| (x, y))
        .collect();
    if !wrong.is_empty() {
        let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("display_actual_480x320.png");
        std::fs::copy(&out, &keep).unwrap();
        panic!(
            "{} of {} pixels differ from the golden image, first at {:?}; actual output kept \
             at {}; if the change is intended, rerun with TAKUMI_BLESS=1",
            wrong.len(),
            480 * 320,
            wrong[0],
            keep.display()
        );
    }
}

#[test]
fn png_display_replaces_the_file_and_leaves_no_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("screen.png");
    std::fs::write(&out, b"old contents, not a PNG").unwrap();
    let mut state = fixed_state();
    let first = show_png(&state, &out, 320, 240);
    state.connected = false;
    let second = show_png(&state, &out, 320, 240);
    assert_ne!(first, second, "the second show did not replace the file");
    assert_eq!(second.as_raw(), draw(&state, 320, 240).as_rgb());
    assert_eq!(leftovers(dir.path(), "screen.png"), Vec::<PathBuf>::new());
}

#[test]
fn connection_arming_and_queue_change_only_the_header() {
    let base = fixed_state();
    let on = draw(&base, 480, 320);
    let l = layout(whole(&on));
    for (what, state) in [
        (
            "disconnected",
            DisplayState {
                connected: false,
                ..base.clone()
            },
        ),
        (
            "idle",
            DisplayState {
                armed: false,
                ..base.clone()
            },
        ),
        (
            "queue",
            DisplayState {
                queue_depth: 12,
                ..base.clone()
            },
        ),
    ] {
        let changed = diff(&on, &draw(&state, 480, 320));
        assert!(!changed.is_empty(), "{what}: nothing changed");
        let outside: Vec<_> = changed.iter().filter(|p| !l.header.contains(**p)).collect();
        assert!(
            outside.is_empty(),
            "{what}: changed outside the header at {outside:?}"
        );
    }

    let off = draw(
        &DisplayState {
            connected: false,
            ..base.clone()
        },
        480,
        320,
    );
    assert!(count(&on, l.header, palette::CONNECTED) > 0);
    assert_eq!(count(&on, l.header, palette::DISCONNECTED), 0);
    assert!(count(&off, l.header, palette::DISCONNECTED) > 0);
    assert_eq!(count(&off, l.header, palette::CONNECTED), 0);
}

#[test]
fn needs_review_shows_amber_in_the_footer_only_when_flagged() {
    for (w, h) in [(320, 240), (480, 320), (1920, 1080)] {
        let flagged = draw(&fixed_state(), w, h);
        let clear_state = DisplayState {
            needs_review: false,
            ..fixed_state()
        };
        let clear = draw(&clear_state, w, h);
        let l = layout(whole(&flagged));
        assert!(count(&flagged, l.footer, palette::AMBER) > 0, "{w}x{h}");
        assert_eq!(count(&clear, whole(&clear), palette::AMBER), 0, "{w}x{h}");
        let changed = diff(&flagged, &clear);
        assert!(changed.iter().all(|p| l.footer.contains(*p)), "{w}x{h}");
    }
}

/// Bounding box of the pixels in `panel` that are not the panel background.
fn drawn_box(canvas: &Canvas, panel: Rectangle) -> Rectangle {
    let pts: Vec<Point> = panel
        .points()
        .filter(|p| canvas.pixel(p.x as u32, p.y as u32) != Some(palette::PANEL))
        .collect();
    assert!(!pts.is_empty(), "nothing drawn in {panel:?}");
    let min = pts.iter().fold(pts[0], |a, p| a.component_min(*p));
    let max = pts.iter().fold(pts[0], |a, p| a.component_max(*p));
    Rectangle::with_corners(min, max)
}

#[test]
fn images_fit_their_panels_with_aspect_kept_and_nearest_neighbour_sampling() {
    let bands = [Rgb888::RED, Rgb888::GREEN, Rgb888::BLUE, Rgb888::WHITE];
    // 4x1: one pixel per band, so any blending would show up as a fifth colour.
    let wide = image(4, 1, |x, _| {
        let c = bands[x as usize];
        [c.r(), c.g(), c.b()]
    });
    let tall = image(1, 3, |_, y| {
        let c = bands[y as usize];
        [c.r(), c.g(), c.b()]
    });
    for (w, h) in [(320, 240), (480, 320), (1920, 1080)] {
        let state = DisplayState {
            before: Some(wide.clone()),
            after: Some(tall.clone()),
            ..fixed_state()
        };
        let canvas = draw(&state, w, h);
        let l = layout(whole(&canvas));

        let b = drawn_box(&canvas, l.before);
        assert_eq!(
            b.size.width, l.before.size.width,
            "{w}x{h}: wide image not full width"
        );
        assert!(
            b.size.width.abs_diff(b.size.height * 4) <= 4,
            "{w}x{h}: {b:?}"
        );
        let mut seen = Vec::new();
        for p in b.points() {
            let c = canvas.pixel(p.x as u32, p.y as u32).unwrap();
            assert!(bands.contains(&c), "{w}x{h}: blended colour {c:?} at {p:?}");
            if seen.last() != Some(&c) && p.y == b.top_left.y {
                seen.push(c);
            }
        }
        assert_eq!(seen, bands, "{w}x{h}: bands out of order");

        let a = drawn_box(&canvas, l.after);
        assert_eq!(
            a.size.height, l.after.size.height,
            "{w}x{h}: tall image not full height"
        );
        assert!(
            a.size.height.abs_diff(a.size.width * 3) <= 3,
            "{w}x{h}: {a:?}"
        );
        let centre = l.after.center();
        assert!(a.contains(centre), "{w}x{h}: tall image not centred");
    }
}

#[test]
fn malformed_images_render_the_placeholder_at_every_size() {
    let (good, _) = before_after();
    let short = RgbImage8 {
        width: 64,
        height: 48,
        rgb: vec![200; 64 * 48 * 3 - 1],
    };
    let empty = RgbImage8 {
        width: 0,
        height: 0,
        rgb: Vec::new(),
    };
    let zero_high = RgbImage8 {
        width: 3,
        height: 0,
        rgb: vec![1; 9],
    };
    let huge = RgbImage8 {
        width: u32::MAX,
        height: u32::MAX,
        rgb: vec![7; 12],
    };
    let pairs = [
        (Some(short.clone()), Some(good.clone())),
        (Some(good.clone()), Some(short)),
        (Some(empty.clone()), Some(empty)),
        (Some(zero_high), Some(good.clone())),
        (Some(huge.clone()), Some(huge)),
        (Some(good.clone()), None),
        (None, Some(good.clone())),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (w, h) in [(320, 240), (480, 320), (1920, 1080)] {
        let none = DisplayState {
            before: None,
            after: None,
            ..fixed_state()
        };
        let placeholder = draw(&none, w, h);
        let l = layout(whole(&placeholder));
        assert!(
            count(&placeholder, l.body, palette::DIM) > 0,
            "{w}x{h}: no placeholder"
        );
        assert!(
            !diff(&placeholder, &draw(&fixed_state(), w, h)).is_empty(),
            "{w}x{h}: valid images look like the placeholder"
        );
        for (i, (before, after)) in pairs.iter().enumerate() {
            let state = DisplayState {
                before: before.clone(),
                after: after.clone(),
                ..fixed_state()
            };
            // Through the real PNG target, so the file path is exercised at every size.
            let png = show_png(&state, &dir.path().join(format!("{w}x{h}-{i}.png")), w, h);
            assert_eq!(png.as_raw(), placeholder.as_rgb(), "{w}x{h}: case {i}");
        }
    }
}

#[test]
fn extreme_but_valid_inputs_render() {
    let long = image(100_000, 1, |x, _| [(x % 256) as u8, 0, 255]);
    let high = image(1, 100_000, |_, y| [0, (y % 256) as u8, 255]);
    let state = DisplayState {
        template: format!("line\nbreak\t{}", "名前".repeat(5_000)),
        score: f32::NAN,
        needs_review: true,
        time: "x".repeat(10_000),
        connected: false,
        armed: false,
        queue_depth: usize::MAX,
        before: Some(long),
        after: Some(high),
    };
    for (w, h) in [
        (0, 0),
        (1, 1),
        (10, 10),
        (100, 50),
        (320, 240),
        (1920, 1080),
    ] {
        let canvas = draw(&state, w, h);
        if w >= 320 {
            let l = layout(whole(&canvas));
            drawn_box(&canvas, l.before);
            drawn_box(&canvas, l.after);
        }
    }
}

#[test]
fn png_display_rejects_bad_sizes_and_missing_directories() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("screen.png");
    for (w, h) in [
        (0, 240),
        (320, 0),
        (MAX_SIDE + 1, 240),
        (u32::MAX, u32::MAX),
    ] {
        let err = PngDisplay::new(&path, w, h).unwrap_err();
        assert!(matches!(err, DisplayError::Size { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    let missing = dir.path().join("no-such-dir").join("screen.png");
    let err = PngDisplay::new(&missing, 320, 240)
        .unwrap()
        .show(&fixed_state())
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
}

#[test]
fn fb_open_on_a_missing_device_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fb0");
    let err = FbDisplay::open(&path).unwrap_err();
    match &err {
        DisplayError::FbOpen { cause: source, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
        }
        other => panic!("wrong error: {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
}

#[test]
fn fb_open_on_a_regular_file_says_it_is_not_a_framebuffer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fb0");
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let err = FbDisplay::open(&path).unwrap_err();
    assert!(
        matches!(err, DisplayError::NotFramebuffer { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}
