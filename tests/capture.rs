//! Capture: pixel conversion against recorded frames, and the frame sources.
//!
//! The fixtures in tests/fixtures/frames/ were made by gen_frames.py there (numpy + Pillow): the
//! expected RGB of the YUYV frame comes from that independent BT.601 implementation, and
//! `yuyv_standard_bars` checks it again against the 75% bar values of the standard.

use std::path::{Path, PathBuf};

use takumi::capture::{
    CaptureError, DirSource, FrameSource, ImageLimits, PixelFormat, SourceConfig, SyntheticSource,
    mjpeg_to_frame, open, yuyv_to_frame,
};

const W: usize = 64;
const H: usize = 48;
const STRIDE: usize = 160;

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/frames")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn reference_rgb() -> Vec<u8> {
    let png = fixture("yuyv_64x48_expected.png");
    let img = image::load_from_memory(&png).unwrap().into_rgb8();
    assert_eq!(img.dimensions(), (W as u32, H as u32));
    img.into_raw()
}

fn pixel(rgb: &[u8], width: usize, x: usize, y: usize) -> [u8; 3] {
    let i = 3 * (y * width + x);
    [rgb[i], rgb[i + 1], rgb[i + 2]]
}

fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

/// The fixture's pixels repacked with another stride and padding byte.
fn repack(raw: &[u8], stride: usize, pad: u8) -> Vec<u8> {
    let mut out = vec![pad; stride * H];
    for y in 0..H {
        out[y * stride..y * stride + 2 * W].copy_from_slice(&raw[y * STRIDE..y * STRIDE + 2 * W]);
    }
    out
}

#[test]
fn yuyv_matches_reference_png() {
    let raw = fixture("yuyv_64x48_s160.yuyv");
    assert_eq!(raw.len(), STRIDE * H);
    let frame = yuyv_to_frame(&raw, W, H, STRIDE, raw.len()).unwrap();
    assert_eq!((frame.width, frame.height), (W, H));
    assert_eq!(frame.data.len(), 3 * W * H);
    let got = frame.to_rgb8();
    let want = reference_rgb();
    let diff = max_diff(&got, &want);
    assert!(diff <= 2, "max channel difference {diff} > 2");
}

#[test]
fn yuyv_standard_bars() {
    let raw = fixture("yuyv_64x48_s160.yuyv");
    let rgb = yuyv_to_frame(&raw, W, H, STRIDE, raw.len())
        .unwrap()
        .to_rgb8();
    let centre = |i: usize| pixel(&rgb, W, (i % 4) * 16 + 8, (i / 4) * 16 + 8);
    // 75% bars, white and black of BT.601: 0.75 * 255 = 191
    let expected: [[u8; 3]; 8] = [
        [191, 191, 0],
        [0, 191, 191],
        [0, 191, 0],
        [191, 0, 191],
        [191, 0, 0],
        [0, 0, 191],
        [255, 255, 255],
        [0, 0, 0],
    ];
    for (i, want) in expected.iter().enumerate() {
        let got = centre(i);
        assert!(max_diff(&got, want) <= 2, "patch {i}: {got:?} != {want:?}");
    }
    // patch 9 alternates luma 50 (even x) and 200 (odd x): Y0 and Y1 land on their own pixels
    let (even, odd) = (pixel(&rgb, W, 16 + 8, 40), pixel(&rgb, W, 16 + 9, 40));
    assert!(even[0] < 50 && odd[0] > 200, "{even:?} {odd:?}");
}

#[test]
fn yuyv_stride_padding_is_ignored() {
    let raw = fixture("yuyv_64x48_s160.yuyv");
    assert!(raw[2 * W..STRIDE].iter().all(|&b| b == 0xAA));
    let base = yuyv_to_frame(&raw, W, H, STRIDE, raw.len()).unwrap();
    for (stride, pad) in [(2 * W, 0u8), (STRIDE, 0x00), (STRIDE, 0xFF), (200, 0x10)] {
        let buf = repack(&raw, stride, pad);
        let frame = yuyv_to_frame(&buf, W, H, stride, buf.len()).unwrap();
        assert_eq!(frame, base, "stride {stride} padding {pad:#x}");
    }
}

#[test]
fn yuyv_needs_no_padding_after_the_last_line() {
    let raw = fixture("yuyv_64x48_s160.yuyv");
    let need = STRIDE * (H - 1) + 2 * W;
    assert!(yuyv_to_frame(&raw, W, H, STRIDE, need).is_ok());
    assert!(yuyv_to_frame(&raw[..need], W, H, STRIDE, raw.len()).is_ok());
    match yuyv_to_frame(&raw, W, H, STRIDE, need - 1) {
        Err(CaptureError::Truncated { expected, got }) => {
            assert_eq!((expected, got), (need, need - 1))
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn yuyv_one_line_short_is_truncated() {
    let raw = fixture("yuyv_64x48_s160.yuyv");
    let short = raw.len() - STRIDE;
    match yuyv_to_frame(&raw, W, H, STRIDE, short) {
        Err(CaptureError::Truncated { expected, got }) => {
            assert_eq!(expected, STRIDE * (H - 1) + 2 * W);
            assert_eq!(got, short);
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn yuyv_buffer_shorter_than_claimed_is_an_error() {
    let raw = fixture("yuyv_64x48_s160.yuyv");
    // the driver claims a full frame but the buffer holds less
    match yuyv_to_frame(&raw[..5000], W, H, STRIDE, raw.len()) {
        Err(CaptureError::Truncated { got, .. }) => assert_eq!(got, 5000),
        other => panic!("expected Truncated, got {other:?}"),
    }
    assert!(yuyv_to_frame(&[], W, H, STRIDE, 0).is_err());
    // sizes so large that the byte count overflows
    assert!(yuyv_to_frame(&raw, usize::MAX - 1, 2, usize::MAX, usize::MAX).is_err());
    assert!(yuyv_to_frame(&raw, 2, usize::MAX, STRIDE, usize::MAX).is_err());
}

#[test]
fn yuyv_bad_geometry_is_an_error() {
    let raw = fixture("yuyv_64x48_s160.yuyv");
    for (w, h, stride) in [
        (63, H, STRIDE),
        (W, 0, STRIDE),
        (0, H, STRIDE),
        (W, H, 2 * W - 2),
    ] {
        match yuyv_to_frame(&raw, w, h, stride, raw.len()) {
            Err(CaptureError::Format(msg)) => assert!(!msg.is_empty()),
            other => panic!("{w}x{h} stride {stride}: expected Format, got {other:?}"),
        }
    }
}

#[test]
fn mjpeg_decodes_to_the_expected_size_and_colours() {
    let jpeg = fixture("mjpeg_64x48.jpg");
    let frame = mjpeg_to_frame(&jpeg, jpeg.len(), W, H).unwrap();
    assert_eq!(
        (frame.width, frame.height, frame.data.len()),
        (W, H, 3 * W * H)
    );
    let got = frame.to_rgb8();
    let want = reference_rgb();
    for i in 0..12 {
        let (x, y) = ((i % 4) * 16 + 8, (i / 4) * 16 + 8);
        let (g, w) = (pixel(&got, W, x, y), pixel(&want, W, x, y));
        assert!(max_diff(&g, &w) <= 24, "patch {i}: {g:?} != {w:?}");
    }
}

#[test]
fn mjpeg_without_huffman_tables_decodes_like_with_them() {
    let with = fixture("mjpeg_64x48.jpg");
    let without = fixture("mjpeg_64x48_nodht.jpg");
    let pos = |b: &[u8], m: u8| b.windows(2).position(|w| w == [0xFF, m]);
    assert!(pos(&with, 0xC4).is_some());
    assert!(pos(&without, 0xC4).is_none_or(|p| p > pos(&without, 0xDA).unwrap()));
    let a = mjpeg_to_frame(&with, with.len(), W, H).unwrap().to_rgb8();
    let b = mjpeg_to_frame(&without, without.len(), W, H)
        .unwrap()
        .to_rgb8();
    assert!(max_diff(&a, &b) <= 1);
}

/// The frame with its DHT segments cut out, as a UVC camera sends it.
fn strip_dht(jpeg: &[u8]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    let mut i = 2;
    while jpeg[i + 1] != 0xDA {
        let end = i + 2 + u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        if jpeg[i + 1] != 0xC4 {
            out.extend(&jpeg[i..end]);
        }
        i = end;
    }
    out.extend(&jpeg[i..]);
    out
}

#[test]
fn mjpeg_without_huffman_tables_from_another_encoder() {
    let img = image::RgbImage::from_fn(W as u32, H as u32, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8])
    });
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&img)
        .unwrap();
    let stripped = strip_dht(&jpeg);
    assert!(stripped.len() + 400 < jpeg.len());
    let a = mjpeg_to_frame(&jpeg, jpeg.len(), W, H).unwrap();
    let b = mjpeg_to_frame(&stripped, stripped.len(), W, H).unwrap();
    assert_eq!(a, b);
    let diff = max_diff(&a.to_rgb8(), img.as_raw());
    assert!(
        diff <= 24,
        "decoded frame differs from the encoded image by {diff}"
    );
}

#[test]
fn mjpeg_uses_only_bytesused() {
    let jpeg = fixture("mjpeg_64x48.jpg");
    let want = mjpeg_to_frame(&jpeg, jpeg.len(), W, H).unwrap();
    // a mapped buffer is larger than the frame: junk after bytesused is not part of it
    let mut buf = jpeg.clone();
    buf.extend(std::iter::repeat_n(0x55, 4096));
    assert_eq!(mjpeg_to_frame(&buf, jpeg.len(), W, H).unwrap(), want);
    // zero padding after the end marker, inside bytesused, as some UVC cameras send
    let mut padded = jpeg.clone();
    padded.extend([0u8; 300]);
    assert_eq!(mjpeg_to_frame(&padded, padded.len(), W, H).unwrap(), want);
    // bytesused past the buffer is clamped to it
    assert_eq!(mjpeg_to_frame(&jpeg, usize::MAX, W, H).unwrap(), want);
    // bytesused that cuts the frame short
    assert!(matches!(
        mjpeg_to_frame(&buf, jpeg.len() - 10, W, H),
        Err(CaptureError::Format(_))
    ));
}

#[test]
fn mjpeg_truncated_is_an_error() {
    let jpeg = fixture("mjpeg_64x48_truncated.jpg");
    match mjpeg_to_frame(&jpeg, jpeg.len(), W, H) {
        Err(CaptureError::Format(msg)) => assert!(msg.contains("truncated"), "{msg}"),
        other => panic!("expected Format, got {other:?}"),
    }
    assert!(mjpeg_to_frame(&[], 0, W, H).is_err());
    assert!(mjpeg_to_frame(&[0xFF, 0xD8, 0xFF, 0xD9], 4, W, H).is_err());
}

#[test]
fn mjpeg_wrong_size_is_refused_from_the_header() {
    let jpeg = fixture("mjpeg_80x60.jpg");
    match mjpeg_to_frame(&jpeg, jpeg.len(), W, H) {
        Err(CaptureError::WrongSize { expected, got }) => {
            assert_eq!(expected, (W, H));
            assert_eq!(got, (80, 60));
        }
        other => panic!("expected WrongSize, got {other:?}"),
    }
    // the header alone decides: the scan after it is garbage that would fail to decode
    let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    let scan = sos + 2 + u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]) as usize;
    let mut fake = jpeg[..scan].to_vec();
    fake.extend([0x13; 64]);
    fake.extend([0xFF, 0xD9]);
    let r = mjpeg_to_frame(&fake, fake.len(), W, H);
    assert!(
        matches!(r, Err(CaptureError::WrongSize { got: (80, 60), .. })),
        "{r:?}"
    );
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn yuyv_random_buffers_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut ok = 0;
    for i in 0..3000 {
        let (w, h) = (rng.below(80), rng.below(60));
        let stride = if i % 2 == 0 {
            2 * w + rng.below(8)
        } else {
            rng.below(200)
        };
        // half the time the buffer is about the right length, so the conversion itself runs
        let len = if i % 2 == 0 {
            (stride * h).saturating_sub(rng.below(4))
        } else {
            rng.below(6000)
        };
        let buf = rng.bytes(len);
        let used = match rng.below(3) {
            0 => len,
            1 => rng.below(len + 100),
            _ => usize::MAX,
        };
        match yuyv_to_frame(&buf, w, h, stride, used) {
            Ok(f) => {
                ok += 1;
                assert_eq!((f.width, f.height, f.data.len()), (w, h, 3 * w * h));
                assert!(f.data.iter().all(|v| (0.0..=1.0).contains(v)));
            }
            Err(e) => assert!(!e.to_string().contains('\n'), "{e:?}"),
        }
    }
    assert!(ok > 300, "only {ok} conversions succeeded");
}

#[test]
fn mjpeg_random_buffers_never_panic() {
    let mut rng = Rng(0x0123_4567_89AB_CDEF);
    let jpegs = [fixture("mjpeg_64x48.jpg"), fixture("mjpeg_64x48_nodht.jpg")];
    let mut decoded = 0;
    for i in 0..5000 {
        let mut buf = match i % 3 {
            0 => {
                let n = rng.below(2000);
                let mut b = rng.bytes(n);
                if rng.below(2) == 0 && b.len() >= 4 {
                    let n = b.len();
                    b[..2].copy_from_slice(&[0xFF, 0xD8]);
                    b[n - 2..].copy_from_slice(&[0xFF, 0xD9]);
                }
                b
            }
            // a real frame with a few bytes changed, so the decoder gets past the header
            _ => {
                let mut b = jpegs[i % 2].clone();
                for _ in 0..1 + rng.below(6) {
                    let at = 2 + rng.below(b.len() - 4);
                    b[at] = rng.next() as u8;
                }
                if rng.below(4) == 0 {
                    b.truncate(2 + rng.below(b.len() - 2));
                    b.extend([0xFF, 0xD9]);
                }
                b
            }
        };
        if rng.below(10) == 0 {
            let n = rng.below(64);
            buf.extend(rng.bytes(n));
        }
        let (w, h) = if rng.below(4) == 0 {
            (rng.below(100), rng.below(100))
        } else {
            (W, H)
        };
        let used = match rng.below(3) {
            0 => buf.len(),
            1 => rng.below(buf.len() + 10),
            _ => usize::MAX,
        };
        match mjpeg_to_frame(&buf, used, w, h) {
            Ok(f) => {
                decoded += 1;
                assert_eq!((f.width, f.height, f.data.len()), (w, h, 3 * w * h));
            }
            Err(e) => assert!(!e.to_string().contains('\n'), "{e:?}"),
        }
    }
    assert!(decoded > 50, "only {decoded} frames decoded");
}

fn write_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb))
        .save(path)
        .unwrap();
}

fn write_jpeg(path: &Path, rgb: [u8; 3]) {
    image::RgbImage::from_pixel(64, 64, image::Rgb(rgb))
        .save_with_format(path, image::ImageFormat::Jpeg)
        .unwrap();
}

/// The dominant channel of a solid frame: 0 red, 1 green, 2 blue.
fn colour(data: &[f32]) -> usize {
    let n = data.len() / 3;
    let mean = |c: usize| data[c * n..(c + 1) * n].iter().sum::<f32>() / n as f32;
    (0..3).max_by(|&a, &b| mean(a).total_cmp(&mean(b))).unwrap()
}

/// red a.png, green b.PNG, blue c.jpg, and files that are not images.
fn three_frames() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    write_png(&p.join("b.PNG"), 64, 64, [0, 200, 0]);
    write_jpeg(&p.join("c.jpg"), [0, 0, 200]);
    write_png(&p.join("a.png"), 64, 64, [200, 0, 0]);
    std::fs::write(p.join("notes.txt"), "not a frame").unwrap();
    std::fs::create_dir(p.join("sub.png")).unwrap();
    dir
}

#[test]
fn dir_source_replays_in_name_order_and_loops() {
    let dir = three_frames();
    let mut src = DirSource::new(dir.path(), true, ImageLimits::default()).unwrap();
    let names: Vec<PathBuf> = src
        .files()
        .iter()
        .map(|p| p.file_name().unwrap().into())
        .collect();
    assert_eq!(names, ["a.png", "b.PNG", "c.jpg"].map(PathBuf::from));
    let seen: Vec<usize> = (0..7)
        .map(|_| colour(&src.next_frame().unwrap().data))
        .collect();
    assert_eq!(seen, [0, 1, 2, 0, 1, 2, 0]);
    assert!(src.describe().contains("3 images"), "{}", src.describe());
}

#[test]
fn dir_source_once_then_exhausted() {
    let dir = three_frames();
    let mut src = DirSource::new(dir.path(), false, ImageLimits::default()).unwrap();
    for want in 0..3 {
        let f = src.next_frame().unwrap();
        assert_eq!((f.width, f.height), (64, 64));
        assert_eq!(colour(&f.data), want);
    }
    for _ in 0..2 {
        assert!(matches!(src.next_frame(), Err(CaptureError::Exhausted)));
    }
}

#[test]
fn dir_source_skips_past_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    write_png(&p.join("1.png"), 64, 64, [200, 0, 0]);
    std::fs::write(p.join("2.png"), b"\x89PNG\r\n\x1a\n this is not a PNG").unwrap();
    // declares a size over the 3840x2160 limit: refused from its header
    write_png(&p.join("3.png"), 4000, 64, [0, 200, 0]);
    write_png(&p.join("4.png"), 64, 64, [0, 0, 200]);
    let mut src = DirSource::new(p, true, ImageLimits::default()).unwrap();
    for _ in 0..2 {
        assert_eq!(colour(&src.next_frame().unwrap().data), 0);
        match src.next_frame() {
            Err(CaptureError::Format(msg)) => assert!(msg.contains("2.png"), "{msg}"),
            other => panic!("expected Format, got {other:?}"),
        }
        match src.next_frame() {
            Err(CaptureError::Format(msg)) => {
                assert!(msg.contains("3.png") && msg.contains("4000x64"), "{msg}")
            }
            other => panic!("expected Format, got {other:?}"),
        }
        assert_eq!(colour(&src.next_frame().unwrap().data), 2);
    }
    // a file removed after the listing is an error for its frame only
    std::fs::remove_file(p.join("1.png")).unwrap();
    assert!(matches!(src.next_frame(), Err(CaptureError::Io { .. })));
    assert!(src.next_frame().is_err());
    assert!(src.next_frame().is_err());
    assert_eq!(colour(&src.next_frame().unwrap().data), 2);
}

#[test]
fn dir_source_needs_a_folder_with_images() {
    let missing = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/no-such-folder");
    assert!(matches!(
        DirSource::new(&missing, true, ImageLimits::default()),
        Err(CaptureError::Io { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("readme.txt"), "x").unwrap();
    assert!(matches!(
        DirSource::new(dir.path(), true, ImageLimits::default()),
        Err(CaptureError::Format(_))
    ));
}

#[test]
fn synthetic_source_moves_and_repeats() {
    let lim = ImageLimits::default();
    let mut a = SyntheticSource::new(320, 240, &lim).unwrap();
    let mut b = SyntheticSource::new(320, 240, &lim).unwrap();
    let frames: Vec<_> = (0..5).map(|_| a.next_frame().unwrap()).collect();
    for f in &frames {
        assert_eq!((f.width, f.height, f.data.len()), (320, 240, 3 * 320 * 240));
        assert!(f.data.iter().all(|v| (0.0..=1.0).contains(v)));
    }
    for pair in frames.windows(2) {
        assert_ne!(pair[0], pair[1]);
    }
    // deterministic: a second source gives the same sequence
    for f in &frames {
        assert_eq!(&b.next_frame().unwrap(), f);
    }
    // colour bars on top: the first bar is 75% grey, the sixth is red
    let top = frames[0].to_rgb8();
    assert_eq!(pixel(&top, 320, 10, 10), [191, 191, 191]);
    assert_eq!(pixel(&top, 320, 5 * 40 + 10, 10), [191, 0, 0]);
    let mut small = SyntheticSource::new(64, 64, &lim).unwrap();
    assert_eq!(small.next_frame().unwrap().data.len(), 3 * 64 * 64);
    // the same limits as every image: frames the engine could never apply are refused
    for (w, h) in [(0, 10), (1, 1), (63, 64), (10_000, 10)] {
        assert!(SyntheticSource::new(w, h, &lim).is_err(), "{w}x{h}");
    }
}

#[test]
fn config_parses_from_toml() {
    let parse = |s: &str| toml::from_str::<SourceConfig>(s);
    assert_eq!(
        parse("kind = \"dir\"\npath = \"frames\"").unwrap(),
        SourceConfig::Dir {
            path: "frames".into(),
            looping: true
        }
    );
    assert_eq!(
        parse("kind = \"dir\"\npath = \"f\"\nlooping = false").unwrap(),
        SourceConfig::Dir {
            path: "f".into(),
            looping: false
        }
    );
    assert_eq!(
        parse("kind = \"synthetic\"\nwidth = 640\nheight = 480").unwrap(),
        SourceConfig::Synthetic {
            width: 640,
            height: 480
        }
    );
    assert_eq!(
        parse("kind = \"v4l\"\nformat = \"mjpeg\"\nwidth = 1280\nheight = 720\nfps = 30").unwrap(),
        SourceConfig::V4l {
            device: "/dev/video0".into(),
            format: PixelFormat::Mjpeg,
            width: 1280,
            height: 720,
            fps: 30,
            buffers: 4
        }
    );
    let full = "kind = \"v4l\"\ndevice = \"/dev/video2\"\nformat = \"yuyv\"\n\
                width = 640\nheight = 480\nfps = 15\nbuffers = 2";
    assert!(matches!(
        parse(full).unwrap(),
        SourceConfig::V4l {
            format: PixelFormat::Yuyv,
            buffers: 2,
            ..
        }
    ));
}

#[test]
fn config_refuses_unknown_and_missing_keys() {
    let parse = |s: &str| toml::from_str::<SourceConfig>(s);
    for bad in [
        "kind = \"dir\"\npath = \"f\"\nloop = false",
        "kind = \"synthetic\"\nwidth = 64\nheight = 48\nfps = 30",
        "kind = \"v4l\"\nformat = \"yuyv\"\nwidth = 64\nheight = 48\nfps = 30\nexposure = 3",
        "kind = \"v4l\"\nformat = \"h264\"\nwidth = 64\nheight = 48\nfps = 30",
        "kind = \"v4l\"\nformat = \"yuyv\"\nwidth = 64\nfps = 30",
        "kind = \"camera\"\npath = \"f\"",
        "path = \"f\"",
    ] {
        assert!(parse(bad).is_err(), "accepted:\n{bad}");
    }
}

#[test]
fn open_builds_each_kind() {
    let dir = three_frames();
    let lim = ImageLimits::default();
    let mut src = open(
        &SourceConfig::Dir {
            path: dir.path().into(),
            looping: false,
        },
        &lim,
    )
    .unwrap();
    assert!(src.describe().contains("once"));
    assert_eq!(colour(&src.next_frame().unwrap().data), 0);

    let mut syn = open(
        &SourceConfig::Synthetic {
            width: 96,
            height: 64,
        },
        &lim,
    )
    .unwrap();
    let f = syn.next_frame().unwrap();
    assert_eq!((f.width, f.height), (96, 64));

    let cam = SourceConfig::V4l {
        device: "/nonexistent/video99".into(),
        format: PixelFormat::Yuyv,
        width: 640,
        height: 480,
        fps: 30,
        buffers: 4,
    };
    match open(&cam, &lim) {
        Err(CaptureError::Device(msg)) => {
            assert!(msg.contains("/nonexistent/video99"), "{msg}");
            #[cfg(not(feature = "v4l"))]
            assert!(msg.contains("without the `v4l` feature"), "{msg}");
        }
        Err(other) => panic!("expected Device, got {other:?}"),
        Ok(_) => panic!("opened a camera that does not exist"),
    }
}

#[test]
fn open_checks_values_before_the_device() {
    let cam = |format, width, fps, buffers| SourceConfig::V4l {
        device: "/nonexistent/video99".into(),
        format,
        width,
        height: 480,
        fps,
        buffers,
    };
    for cfg in [
        cam(PixelFormat::Yuyv, 641, 30, 4),
        cam(PixelFormat::Mjpeg, 640, 0, 4),
        cam(PixelFormat::Mjpeg, 640, 30, 0),
        cam(PixelFormat::Mjpeg, 5000, 30, 4),
        SourceConfig::Synthetic {
            width: 0,
            height: 48,
        },
        SourceConfig::Synthetic {
            width: 1,
            height: 1,
        },
    ] {
        match open(&cfg, &ImageLimits::default()) {
            Err(CaptureError::Format(msg)) => assert!(!msg.contains('\n'), "{msg}"),
            Err(other) => panic!("{cfg:?}: expected Format, got {other:?}"),
            Ok(_) => panic!("{cfg:?}: accepted"),
        }
    }
    let lim = ImageLimits::default();
    assert!(cam(PixelFormat::Mjpeg, 641, 30, 4).validate(&lim).is_ok());
}

#[test]
fn error_messages_are_one_line() {
    let errors = [
        CaptureError::Truncated {
            expected: 10,
            got: 5,
        },
        CaptureError::WrongSize {
            expected: (64, 48),
            got: (80, 60),
        },
        CaptureError::Format("bad".into()),
        CaptureError::Io {
            path: "x.png".into(),
            cause: std::io::Error::other("gone"),
        },
        CaptureError::Device("/dev/video0: gone".into()),
        CaptureError::Exhausted,
    ];
    for e in errors {
        let msg = e.to_string();
        assert!(!msg.is_empty() && !msg.contains('\n'), "{msg:?}");
    }
    let size = CaptureError::WrongSize {
        expected: (64, 48),
        got: (80, 60),
    };
    assert_eq!(size.to_string(), "frame is 80x60, expected 64x48");
}

/// A PNG whose palette is not a whole number of RGB entries: png 0.18.1 panics on it
/// (image-rs/image-png#694; found by fuzz/ image_decode), so it must be refused before decoding.
#[test]
fn a_ragged_png_palette_is_refused_not_panicked_on() {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        c.extend_from_slice(&[0; 4]); // CRC: the check comes before the decoder reads it
        c
    };
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    // 64x64, 8-bit, colour type 3 (palette)
    png.extend(chunk(b"IHDR", &[0, 0, 0, 64, 0, 0, 0, 64, 8, 3, 0, 0, 0]));
    png.extend(chunk(b"PLTE", &[1, 2, 3, 4]));
    png.extend(chunk(b"IDAT", &[0; 8]));
    png.extend(chunk(b"IEND", &[]));
    let err = takumi::capture::file::decode_image(&png, &ImageLimits::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("palette"), "{err}");
}

fn png_bytes(img: &image::DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// What a PNG holds besides RGB comes back out of `encode_image` as it went in: 8-bit alpha,
/// 16-bit samples (exactly: the frame's f32 holds every 16-bit level), and both; a JPEG names
/// what it drops.
#[test]
fn alpha_and_16_bits_survive_a_read_and_a_png_write() {
    use takumi::capture::file::{Depth, decode};
    use takumi::publish::file::{ImageKind, encode_image, lost_in};
    let (w, h) = (80u32, 64u32);
    let rgba8 = image::DynamicImage::ImageRgba8(image::RgbaImage::from_fn(w, h, |x, y| {
        image::Rgba([x as u8 * 3, y as u8 * 4, 200, (x + y) as u8])
    }));
    let rgb16 = image::DynamicImage::ImageRgb16(image::ImageBuffer::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 800 + y) as u16,
            (y * 1000 + 7) as u16,
            65535 - x as u16,
        ])
    }));
    let rgba16 = image::DynamicImage::ImageRgba16(image::ImageBuffer::from_fn(w, h, |x, y| {
        image::Rgba([(x * 811) as u16, 3, (y * 997) as u16, (x * y * 13) as u16])
    }));
    for (img, depth, alpha) in [
        (&rgba8, Depth::Eight, true),
        (&rgb16, Depth::Sixteen, false),
        (&rgba16, Depth::Sixteen, true),
    ] {
        let read = decode(&png_bytes(img), &ImageLimits::default()).unwrap();
        assert_eq!(
            (read.depth, read.alpha.is_some()),
            (depth, alpha),
            "{:?}",
            img.color()
        );
        let back = image::load_from_memory(&encode_image(&read, ImageKind::Png).unwrap()).unwrap();
        assert_eq!(back.color(), img.color());
        assert_eq!(back.as_bytes(), img.as_bytes(), "{:?}", img.color());
        let lost = lost_in(&read, ImageKind::Jpeg).unwrap_or_default();
        assert_eq!(lost.contains("alpha"), alpha, "{lost}");
        assert_eq!(lost.contains("16-bit"), depth == Depth::Sixteen, "{lost}");
        assert_eq!(lost_in(&read, ImageKind::Png), None);
    }
}

/// `learn` reads an image of any size its pixels fit, downscaled by area to the pixels asked
/// for and keeping the file's size; one whose pixels would not fit is refused before decoding.
#[test]
fn learn_reads_large_images_downscaled_and_refuses_what_it_cannot_hold() {
    use takumi::capture::file::decode_scaled;
    let big = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(4000, 400, |x, _| {
        // stripes 2 px wide: an area average gives their mean, grey
        let v = if x % 4 < 2 { 255 } else { 0 };
        image::Rgb([v, v, v])
    }));
    let s = decode_scaled(&png_bytes(&big), &ImageLimits::default(), 1000 * 100).unwrap();
    assert_eq!(s.original, (4000, 400));
    assert_eq!((s.frame.width, s.frame.height), (1000, 100));
    let mean = s.frame.data.iter().sum::<f32>() / s.frame.data.len() as f32;
    let spread = s
        .frame
        .data
        .iter()
        .map(|v| (v - mean).abs())
        .fold(0.0, f32::max);
    assert!(
        (mean - 0.5).abs() < 0.01 && spread < 0.01,
        "{mean} {spread}"
    );

    // 20000 x 20000 RGBA at 16 bits is 3 GB of pixels: refused from its header, before the
    // (empty) image data
    let chunk = |body: Vec<u8>| {
        let mut c = u32::try_from(body.len() - 4)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        c.extend(&body);
        c.extend(crc32fast::hash(&body).to_be_bytes());
        c
    };
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(20_000u32.to_be_bytes());
    ihdr.extend(20_000u32.to_be_bytes());
    ihdr.extend([16, 6, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(ihdr));
    png.extend(chunk(b"IDAT".to_vec()));
    png.extend(chunk(b"IEND".to_vec()));
    let err = decode_scaled(&png, &ImageLimits::default(), 1 << 20)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("20000x20000") && err.contains("200 MB"),
        "{err}"
    );
}
