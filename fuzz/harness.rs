//! What each fuzz target does with one input, shared by the fuzz targets (nightly, libFuzzer)
//! and by `tests/fuzz_corpus.rs` (stable), which replays the committed corpus through the very
//! same functions, so CI checks every input the fuzzer kept without needing nightly.
//!
//! Every function here takes arbitrary bytes and must return normally: takumi's rule is that
//! nothing from outside may panic. Beyond "no panic", each checks what a caller relies on when
//! the parse succeeds, so a fuzzer can also find wrong answers, not only crashes.

use takumi::appliance::protocol::{
    Command, Op, ProtocolError, is_status_request, parse_command, request_id,
};
use takumi::capture::file::{ImageLimits, decode_image};
use takumi::capture::{PixelFormat, SourceConfig, mjpeg_to_frame, yuyv_to_frame};
use takumi::frame::Frame;
use takumi::store::{CHECKSUM_LEN, Template};

/// What a fuzz target does with one input.
pub type Target = fn(&[u8]);

/// The fuzz targets, by the name of their corpus folder (`fuzz/corpus/<name>/`).
pub const TARGETS: [(&str, Target); 4] = [
    ("command_json", command_json),
    ("template_file", template_file),
    ("image_decode", image_decode),
    ("camera_frame", camera_frame),
];

/// An MQTT command payload, as the station's service and pipeline parse it (docs/mqtt.md).
pub fn command_json(data: &[u8]) {
    let parsed = parse_command(data);
    let rid = request_id(data);
    // the service answers what this picks before the pipeline parses anything (and the link
    // lets it pass a flood): it must be exactly what the pipeline would read as `status`
    if is_status_request(data) {
        assert!(
            matches!(&parsed, Ok(Command { op: Op::Status, .. })),
            "a status request the pipeline reads otherwise: {parsed:?}"
        );
    }
    match &parsed {
        // an error event is tied to the request only through `request_id`: a command that parses
        // must yield the same id there, or its events would go unanswered
        Ok(Command { id, op }) => {
            assert_eq!(rid.as_deref(), Some(id.as_str()), "request_id disagrees");
            if let Op::Apply { mode, image, .. } = op {
                use takumi::appliance::protocol::ApplyMode;
                assert_eq!(*mode == ApplyMode::Image, image.is_some());
            }
        }
        Err(ProtocolError::UnknownOp(op)) => {
            // echoed into an event: cut, whatever the sender wrote
            assert!(op.chars().count() <= 40, "unknown op echoed uncut");
        }
        Err(_) => {}
    }
    if let Err(e) = parsed {
        let _ = e.to_string();
    }
}

/// A template file, as `templates install`, the fleet topic and the store read one.
///
/// The file ends in a BLAKE3 checksum of the rest, which a mutated input almost never matches,
/// so the input is used twice: as a whole file (the checksum path), and as the body of a file
/// whose checksum is appended here, so that the fuzzer reaches the container, header and value
/// checks behind it, as a crafted file with a recomputed checksum would.
pub fn template_file(data: &[u8]) {
    let _ = Template::from_bytes(data);
    let mut file = Vec::with_capacity(data.len() + CHECKSUM_LEN);
    file.extend_from_slice(data);
    file.extend_from_slice(blake3::hash(data).as_bytes());
    let Ok(t) = Template::from_bytes(&file) else {
        return;
    };
    // what was read passed every check, so it must save, and read back as the same template
    t.validate().expect("a template that loaded fails validate");
    let again = t
        .encode()
        .expect("a template that loaded cannot be encoded");
    let back = Template::from_bytes(&again).expect("a re-encoded template does not load");
    assert_eq!(back, t, "a template changed on a save and load round trip");
    // what `takumi templates show` prints of it
    let _ = t.card.validation_summary();
    let _ = format!("{t:?}");
}

/// A PNG or JPEG image from outside: a file on the command line or in a camera folder, or the
/// image of an MQTT `apply`/`learn` command. The station decodes them all with its configured
/// limits; the defaults are used here.
pub fn image_decode(data: &[u8]) {
    let limits = ImageLimits::default();
    if let Ok(f) = decode_image(data, &limits) {
        assert!(f.width >= limits.min_side as usize && f.height >= limits.min_side as usize);
        assert!(f.width <= limits.max_width as usize && f.height <= limits.max_height as usize);
        check_frame(&f, f.width, f.height);
    }
}

/// A camera buffer as a V4L2 driver hands it over. The first byte picks the pixel format; then
/// come the sizes. YUYV sizes come from the driver's format (width, height, bytes per line) and
/// are taken as they come, up to `usize` with bit 1 of the first byte, to reach the overflow
/// checks. MJPEG sizes come from the station's config, so only sizes its check accepts are
/// used: any other is refused at start-up, before a frame is read.
pub fn camera_frame(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mut r = Reader(rest);
    if sel & 1 == 0 {
        let (width, height, stride, bytesused) = if sel & 2 == 0 {
            (r.u16(), r.u16(), r.u32(), r.u32())
        } else {
            (r.usize(), r.usize(), r.usize(), r.usize())
        };
        if let Ok(f) = yuyv_to_frame(r.0, width, height, stride, bytesused) {
            check_frame(&f, width, height);
        }
    } else {
        let (width, height, bytesused) = (r.u16(), r.u16(), r.u32());
        let cfg = SourceConfig::V4l {
            device: String::new(),
            format: PixelFormat::Mjpeg,
            width,
            height,
            fps: 30,
            buffers: 4,
        };
        if cfg.validate(&ImageLimits::default()).is_err() {
            return;
        }
        if let Ok(f) = mjpeg_to_frame(r.0, bytesused, width, height) {
            check_frame(&f, width, height);
        }
    }
}

/// A decoded frame is what the engine assumes: the asked size, and every value a colour in
/// [0, 1] (never NaN).
fn check_frame(f: &Frame, width: usize, height: usize) {
    assert_eq!(
        (f.width, f.height),
        (width, height),
        "frame of another size"
    );
    assert_eq!(
        f.data.len(),
        3 * width * height,
        "frame buffer of the wrong length"
    );
    assert!(
        f.data.iter().all(|v| (0.0..=1.0).contains(v)),
        "a pixel value outside [0, 1]"
    );
}

/// Little-endian integers off the front of the input; missing bytes read as zero.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }

    fn u16(&mut self) -> usize {
        u16::from_le_bytes(self.take()).into()
    }

    fn u32(&mut self) -> usize {
        u32::from_le_bytes(self.take()) as usize
    }

    fn usize(&mut self) -> usize {
        u64::from_le_bytes(self.take()) as usize
    }
}
