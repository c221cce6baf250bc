//! V4L2 cameras through the `v4l` crate: MMAP streaming, each buffer converted as it is dequeued.

use std::time::Duration;

use v4l::buffer::{Flags, Type};
use v4l::io::mmap::Stream;
use v4l::io::traits::CaptureStream;
use v4l::video::Capture;
use v4l::video::capture::Parameters;
use v4l::{Device, Format, FourCC};

use super::convert::{CaptureError, mjpeg_to_frame, yuyv_to_frame};
use super::source::{FrameSource, PixelFormat};
use crate::frame::Frame;

pub struct V4lSource {
    // owns the device handle and the mapped buffers; stops streaming when dropped
    stream: Stream<'static>,
    device: String,
    format: PixelFormat,
    width: usize,
    height: usize,
    stride: usize,
    fps: f64,
    buffers: usize,
}

impl V4lSource {
    /// Opens `device` and sets it to `format` at `width` x `height` and `fps`. Refuses a driver
    /// that substitutes another size or pixel format; a different frame rate is only reported.
    pub fn open(
        device: &str,
        format: PixelFormat,
        width: usize,
        height: usize,
        fps: u32,
        buffers: u32,
    ) -> Result<Self, CaptureError> {
        let fail =
            |what: &str, e: std::io::Error| CaptureError::Device(format!("{device}: {what}: {e}"));
        let size = |v: usize| {
            u32::try_from(v)
                .map_err(|_| CaptureError::Format(format!("{device}: size {v} is too large")))
        };
        let (w, h) = (size(width)?, size(height)?);
        let fourcc = match format {
            PixelFormat::Yuyv => FourCC::new(b"YUYV"),
            PixelFormat::Mjpeg => FourCC::new(b"MJPG"),
        };

        let dev = Device::with_path(device).map_err(|e| fail("cannot open", e))?;
        let got = dev
            .set_format(&Format::new(w, h, fourcc))
            .map_err(|e| fail("cannot set the format", e))?;
        if got.fourcc != fourcc || got.width != w || got.height != h {
            return Err(CaptureError::Device(format!(
                "{device}: asked for {fourcc} {w}x{h}, the driver chose {} {}x{}",
                got.fourcc, got.width, got.height
            )));
        }
        let params = dev
            .set_params(&Parameters::with_fps(fps))
            .map_err(|e| fail("cannot set the frame rate", e))?;
        let interval = params.interval;
        let actual_fps = if interval.numerator == 0 {
            0.0
        } else {
            f64::from(interval.denominator) / f64::from(interval.numerator)
        };

        let mut stream = Stream::with_buffers(&dev, Type::VideoCapture, buffers)
            .map_err(|e| fail("cannot map the capture buffers", e))?;
        // a camera that stops sending must show up as an error, not a hung line
        stream.set_timeout(Duration::from_millis(2000 + 5000 / u64::from(fps.max(1))));
        // some drivers leave bytesperline at 0 for packed formats
        let line = width * 2;
        let stride = if (got.stride as usize) < line {
            line
        } else {
            got.stride as usize
        };

        Ok(V4lSource {
            stream,
            device: device.to_string(),
            format,
            width,
            height,
            stride,
            fps: actual_fps,
            buffers: buffers as usize,
        })
    }
}

impl FrameSource for V4lSource {
    fn next_frame(&mut self) -> Result<Frame, CaptureError> {
        let (buf, meta) = CaptureStream::next(&mut self.stream)
            .map_err(|e| CaptureError::Device(format!("{}: capture failed: {e}", self.device)))?;
        if meta.flags.contains(Flags::ERROR) {
            return Err(CaptureError::Device(format!(
                "{}: the driver marked frame {} as corrupted",
                self.device, meta.sequence
            )));
        }
        let used = meta.bytesused as usize;
        match self.format {
            PixelFormat::Yuyv => yuyv_to_frame(buf, self.width, self.height, self.stride, used),
            PixelFormat::Mjpeg => mjpeg_to_frame(buf, used, self.width, self.height),
        }
    }

    fn describe(&self) -> String {
        format!(
            "camera {} ({:?} {}x{} at {:.1} fps, {} buffers)",
            self.device, self.format, self.width, self.height, self.fps, self.buffers
        )
    }
}
