//! The Linux framebuffer target (/dev/fbN), 16 or 32 bits per pixel.

use std::convert::Infallible;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;

use super::{Display, DisplayError, DisplayState, MAX_SIDE, render};

// From <linux/fb.h>; libc does not carry the framebuffer ABI.
const FBIOGET_VSCREENINFO: u32 = 0x4600;
const FBIOGET_FSCREENINFO: u32 = 0x4602;
const FB_TYPE_PACKED_PIXELS: u32 = 0;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct FbBitfield {
    offset: u32,
    length: u32,
    msb_right: u32,
}

#[repr(C)]
#[derive(Debug, Default)]
struct FbVarScreeninfo {
    xres: u32,
    yres: u32,
    xres_virtual: u32,
    yres_virtual: u32,
    xoffset: u32,
    yoffset: u32,
    bits_per_pixel: u32,
    grayscale: u32,
    red: FbBitfield,
    green: FbBitfield,
    blue: FbBitfield,
    transp: FbBitfield,
    nonstd: u32,
    activate: u32,
    height: u32,
    width: u32,
    accel_flags: u32,
    pixclock: u32,
    left_margin: u32,
    right_margin: u32,
    upper_margin: u32,
    lower_margin: u32,
    hsync_len: u32,
    vsync_len: u32,
    sync: u32,
    vmode: u32,
    rotate: u32,
    colorspace: u32,
    reserved: [u32; 4],
}

#[repr(C)]
#[derive(Debug, Default)]
struct FbFixScreeninfo {
    id: [u8; 16],
    smem_start: libc::c_ulong,
    smem_len: u32,
    type_: u32,
    type_aux: u32,
    visual: u32,
    xpanstep: u16,
    ypanstep: u16,
    ywrapstep: u16,
    line_length: u32,
    mmio_start: libc::c_ulong,
    mmio_len: u32,
    accel: u32,
    capabilities: u16,
    reserved: [u16; 2],
}

// The kernel copies exactly these sizes; a wrong struct would corrupt the stack.
const _: () = assert!(size_of::<FbVarScreeninfo>() == 160);
#[cfg(target_pointer_width = "64")]
const _: () = assert!(size_of::<FbFixScreeninfo>() == 80);
#[cfg(target_pointer_width = "32")]
const _: () = assert!(size_of::<FbFixScreeninfo>() == 68);

/// Where one colour channel sits in a pixel word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Channel {
    offset: u32,
    length: u32,
}

/// A packed true-colour pixel format of 2 or 4 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PixelFormat {
    bytes: usize,
    red: Channel,
    green: Channel,
    blue: Channel,
    /// Bits set to all ones so that ARGB modes do not show the image as transparent.
    opaque: u32,
}

impl PixelFormat {
    const RGB565: Self = Self {
        bytes: 2,
        red: Channel {
            offset: 11,
            length: 5,
        },
        green: Channel {
            offset: 5,
            length: 6,
        },
        blue: Channel {
            offset: 0,
            length: 5,
        },
        opaque: 0,
    };
    const XRGB8888: Self = Self {
        bytes: 4,
        red: Channel {
            offset: 16,
            length: 8,
        },
        green: Channel {
            offset: 8,
            length: 8,
        },
        blue: Channel {
            offset: 0,
            length: 8,
        },
        opaque: 0,
    };

    /// The format the driver reports; falls back to RGB565 / XRGB8888 when its bitfields
    /// are unusable (some drivers leave them zero).
    fn from_var(var: &FbVarScreeninfo) -> Result<Self, String> {
        if var.grayscale != 0 {
            return Err(format!("grayscale/FOURCC mode {}", var.grayscale));
        }
        let base = match var.bits_per_pixel {
            16 => Self::RGB565,
            32 => Self::XRGB8888,
            bpp => {
                return Err(format!(
                    "{bpp} bits per pixel; only 16 and 32 are supported"
                ));
            }
        };
        let bits = var.bits_per_pixel;
        let channel = |f: &FbBitfield| {
            (f.msb_right == 0 && (1..=8).contains(&f.length) && f.offset + f.length <= bits)
                .then_some(Channel {
                    offset: f.offset,
                    length: f.length,
                })
        };
        let rgb = (channel(&var.red), channel(&var.green), channel(&var.blue));
        let (Some(red), Some(green), Some(blue)) = rgb else {
            return Ok(base);
        };
        let opaque = channel(&var.transp).map_or(0, |a| ((1 << a.length) - 1) << a.offset);
        Ok(Self {
            bytes: base.bytes,
            red,
            green,
            blue,
            opaque,
        })
    }

    fn pack(&self, c: Rgb888) -> u32 {
        let put = |v: u8, ch: Channel| (u32::from(v) >> (8 - ch.length)) << ch.offset;
        put(c.r(), self.red) | put(c.g(), self.green) | put(c.b(), self.blue) | self.opaque
    }
}

/// Off-screen copy of the visible area in the device's pixel format; drawing here and
/// copying in [`FbDisplay::flush`] keeps the screen from flickering through the redraw.
struct FbCanvas {
    width: u32,
    height: u32,
    format: PixelFormat,
    buf: Vec<u8>,
}

impl FbCanvas {
    fn new(width: u32, height: u32, format: PixelFormat) -> Self {
        let len = width as usize * height as usize * format.bytes;
        Self {
            width,
            height,
            format,
            buf: vec![0; len],
        }
    }

    fn row_bytes(&self) -> usize {
        self.width as usize * self.format.bytes
    }
}

impl OriginDimensions for FbCanvas {
    fn size(&self) -> Size {
        Size::new(self.width, self.height)
    }
}

impl DrawTarget for FbCanvas {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        let bytes = self.format.bytes;
        for Pixel(p, c) in pixels {
            let (Ok(x), Ok(y)) = (u32::try_from(p.x), u32::try_from(p.y)) else {
                continue;
            };
            if x >= self.width || y >= self.height {
                continue;
            }
            let i = (y as usize * self.width as usize + x as usize) * bytes;
            let v = self.format.pack(c);
            match bytes {
                2 => self.buf[i..i + 2].copy_from_slice(&(v as u16).to_ne_bytes()),
                _ => self.buf[i..i + 4].copy_from_slice(&v.to_ne_bytes()),
            }
        }
        Ok(())
    }
}

/// A shared read-write mapping of the framebuffer memory, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// The mapping is owned by exactly one FbDisplay and only touched through `&mut self`.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(file: &File, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of an open fd; the kernel validates fd and len.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Self { ptr, len })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is mapped read-write for the life of self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; nothing borrows it past `&mut self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// The Linux framebuffer (e.g. /dev/fb0) as a display and as an embedded-graphics
/// [`DrawTarget`] of its visible area.
///
/// Drawing goes to an off-screen buffer; [`FbDisplay::flush`] (called by
/// [`Display::show`]) copies it to the screen.
pub struct FbDisplay {
    path: PathBuf,
    canvas: FbCanvas,
    map: Mapping,
    line_length: usize,
    /// Byte offset of the visible area's first pixel (panning offsets included).
    origin: usize,
    _file: File,
}

impl FbDisplay {
    /// Opens a framebuffer device and maps its memory.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DisplayError> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|cause| DisplayError::FbOpen {
                path: path.clone(),
                cause,
            })?;
        let not_fb = |cause| DisplayError::NotFramebuffer {
            path: path.clone(),
            cause,
        };
        let mut var = FbVarScreeninfo::default();
        let mut fix = FbFixScreeninfo::default();
        // SAFETY: each ioctl writes one struct of the repr(C) layout asserted above.
        unsafe {
            if libc::ioctl(file.as_raw_fd(), FBIOGET_VSCREENINFO as _, &raw mut var) < 0 {
                return Err(not_fb(io::Error::last_os_error()));
            }
            if libc::ioctl(file.as_raw_fd(), FBIOGET_FSCREENINFO as _, &raw mut fix) < 0 {
                return Err(not_fb(io::Error::last_os_error()));
            }
        }
        let bad = |reason: String| DisplayError::FbFormat {
            path: path.clone(),
            reason,
        };
        if fix.type_ != FB_TYPE_PACKED_PIXELS {
            return Err(bad(format!("type {} is not packed pixels", fix.type_)));
        }
        let format = PixelFormat::from_var(&var).map_err(bad)?;
        let (w, h) = (var.xres, var.yres);
        if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
            return Err(bad(format!("visible size {w}x{h}")));
        }
        // The visible area must lie inside the device memory, or flush would write past it.
        let bytes = format.bytes as u64;
        let line = u64::from(fix.line_length);
        let row_end = (u64::from(var.xoffset) + u64::from(w)) * bytes;
        let end = (u64::from(var.yoffset) + u64::from(h) - 1) * line + row_end;
        if line < row_end || end > u64::from(fix.smem_len) {
            return Err(bad(format!(
                "{w}x{h} at ({}, {}) with {line}-byte lines does not fit {} bytes of memory",
                var.xoffset, var.yoffset, fix.smem_len
            )));
        }
        let map =
            Mapping::new(&file, fix.smem_len as usize).map_err(|cause| DisplayError::FbMap {
                path: path.clone(),
                cause,
            })?;
        Ok(Self {
            canvas: FbCanvas::new(w, h, format),
            map,
            line_length: fix.line_length as usize,
            origin: (u64::from(var.yoffset) * line + u64::from(var.xoffset) * bytes) as usize,
            _file: file,
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bits per pixel of the device (16 or 32).
    pub fn bits_per_pixel(&self) -> u32 {
        self.canvas.format.bytes as u32 * 8
    }

    /// Copies everything drawn so far to the screen.
    pub fn flush(&mut self) {
        let row = self.canvas.row_bytes();
        let (line, origin) = (self.line_length, self.origin);
        let screen = self.map.as_mut_slice();
        // `open` checked that every row lies inside the mapping.
        for (y, src) in self.canvas.buf.chunks_exact(row).enumerate() {
            let at = origin + y * line;
            screen[at..at + row].copy_from_slice(src);
        }
    }
}

// Hand-written: the derived one would print the whole off-screen buffer.
impl std::fmt::Debug for FbDisplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FbDisplay")
            .field("path", &self.path)
            .field("size", &self.canvas.size())
            .field("format", &self.canvas.format)
            .finish_non_exhaustive()
    }
}

impl OriginDimensions for FbDisplay {
    fn size(&self) -> Size {
        self.canvas.size()
    }
}

impl DrawTarget for FbDisplay {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        self.canvas.draw_iter(pixels)
    }
}

impl Display for FbDisplay {
    fn show(&mut self, state: &DisplayState) -> Result<(), DisplayError> {
        let Ok(()) = render(&mut self.canvas, state);
        self.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(bpp: u32, r: (u32, u32), g: (u32, u32), b: (u32, u32)) -> FbVarScreeninfo {
        let f = |(offset, length)| FbBitfield {
            offset,
            length,
            msb_right: 0,
        };
        FbVarScreeninfo {
            xres: 4,
            yres: 2,
            bits_per_pixel: bpp,
            red: f(r),
            green: f(g),
            blue: f(b),
            ..Default::default()
        }
    }

    fn drawn(format: PixelFormat, c: Rgb888) -> Vec<u8> {
        let mut canvas = FbCanvas::new(4, 2, format);
        let Ok(()) = canvas.draw_iter([Pixel(Point::new(3, 1), c)]);
        let at = (4 + 3) * format.bytes;
        assert!(
            canvas.buf[..at].iter().all(|&b| b == 0),
            "wrote before the pixel"
        );
        canvas.buf[at..].to_vec()
    }

    #[test]
    fn packs_rgb565() {
        let f = PixelFormat::from_var(&var(16, (11, 5), (5, 6), (0, 5))).unwrap();
        assert_eq!(f, PixelFormat::RGB565);
        let px = drawn(f, Rgb888::new(0xFF, 0x80, 0x08));
        let v = u16::from_ne_bytes([px[0], px[1]]);
        assert_eq!(v, (0x1F << 11) | (0x20 << 5) | 0x01);
    }

    #[test]
    fn packs_xrgb8888_and_honours_bgr_order() {
        let xrgb = PixelFormat::from_var(&var(32, (16, 8), (8, 8), (0, 8))).unwrap();
        let px = drawn(xrgb, Rgb888::new(1, 2, 3));
        assert_eq!(u32::from_ne_bytes(px.try_into().unwrap()), 0x0001_0203);

        let xbgr = PixelFormat::from_var(&var(32, (0, 8), (8, 8), (16, 8))).unwrap();
        let px = drawn(xbgr, Rgb888::new(1, 2, 3));
        assert_eq!(u32::from_ne_bytes(px.try_into().unwrap()), 0x0003_0201);
    }

    #[test]
    fn argb_alpha_is_opaque_and_zero_bitfields_fall_back() {
        let mut v = var(32, (16, 8), (8, 8), (0, 8));
        v.transp = FbBitfield {
            offset: 24,
            length: 8,
            msb_right: 0,
        };
        let f = PixelFormat::from_var(&v).unwrap();
        assert_eq!(f.pack(Rgb888::new(0, 0, 0)), 0xFF00_0000);

        let f = PixelFormat::from_var(&var(32, (0, 0), (0, 0), (0, 0))).unwrap();
        assert_eq!(f, PixelFormat::XRGB8888);
    }

    #[test]
    fn rejects_other_depths_and_grayscale() {
        for bpp in [0, 1, 8, 24, 64] {
            let err = PixelFormat::from_var(&var(bpp, (0, 8), (8, 8), (16, 8))).unwrap_err();
            assert!(err.contains(&bpp.to_string()), "{err}");
        }
        let mut v = var(16, (11, 5), (5, 6), (0, 5));
        v.grayscale = 1;
        assert!(PixelFormat::from_var(&v).is_err());
    }
}
