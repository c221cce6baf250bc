//! Screen layout and drawing, generic over any Rgb888 [`DrawTarget`].

use embedded_graphics::draw_target::DrawTargetExt;
use embedded_graphics::mono_font::ascii::{FONT_6X10, FONT_8X13, FONT_10X20};
use embedded_graphics::mono_font::{MonoFont, MonoTextStyle};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{Circle, PrimitiveStyle, Rectangle};
use embedded_graphics::text::{Baseline, Text};

use super::{DisplayState, MAX_SIDE, RgbImage8, nearest};

/// The colours the screen uses; public so that tests and callers can look for them.
pub mod palette {
    use embedded_graphics::pixelcolor::Rgb888;

    pub const BACKGROUND: Rgb888 = Rgb888::new(12, 12, 16);
    pub const BAR: Rgb888 = Rgb888::new(36, 38, 46);
    pub const PANEL: Rgb888 = Rgb888::new(26, 27, 32);
    pub const TEXT: Rgb888 = Rgb888::new(230, 230, 230);
    pub const DIM: Rgb888 = Rgb888::new(140, 140, 150);
    pub const CONNECTED: Rgb888 = Rgb888::new(40, 200, 90);
    pub const DISCONNECTED: Rgb888 = Rgb888::new(230, 50, 50);
    pub const ARMED: Rgb888 = Rgb888::new(60, 170, 255);
    /// Used only for "needs review".
    pub const AMBER: Rgb888 = Rgb888::new(255, 176, 0);
}

/// Shown in place of the images when there is no valid approved result.
pub const PLACEHOLDER: &str = "no approved result yet";

/// Where each part of the screen goes for a given target area.
#[derive(Clone, Copy)]
pub struct Layout {
    pub header: Rectangle,
    pub body: Rectangle,
    pub footer: Rectangle,
    /// Areas the before and after images are fitted into (inside `body`).
    pub before: Rectangle,
    pub after: Rectangle,
    font: &'static MonoFont<'static>,
    pad: u32,
}

// Hand-written: the derived one would print the font's whole glyph bitmap.
impl std::fmt::Debug for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layout")
            .field("header", &self.header)
            .field("body", &self.body)
            .field("footer", &self.footer)
            .field("before", &self.before)
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

/// Computes the layout for a target whose bounding box is `area`.
pub fn layout(area: Rectangle) -> Layout {
    // Clamping keeps every coordinate sum below far from i32 overflow.
    let w = area.size.width.min(MAX_SIDE);
    let h = area.size.height.min(MAX_SIDE);
    let font: &'static MonoFont<'static> = if w >= 1280 && h >= 720 {
        &FONT_10X20
    } else if w >= 640 && h >= 400 {
        &FONT_8X13
    } else {
        &FONT_6X10
    };
    let ch = font.character_size.height;
    let pad = (ch / 2).max(1);

    let header_h = (ch + 2 * pad).min(h);
    let footer_h = (2 * ch + 3 * pad).min(h - header_h);
    let body_h = h - header_h - footer_h;
    let origin = area.top_left;
    let header = Rectangle::new(origin, Size::new(w, header_h));
    let body = Rectangle::new(origin + Point::new(0, px(header_h)), Size::new(w, body_h));
    let footer = Rectangle::new(
        origin + Point::new(0, px(header_h + body_h)),
        Size::new(w, footer_h),
    );

    // Body: a label row, then two panels side by side with `pad` gaps around them.
    let label_h = ch + pad;
    let panel_w = w.saturating_sub(3 * pad) / 2;
    let panel_h = body_h.saturating_sub(label_h + 2 * pad);
    let panel_y = body.top_left.y + px(pad + label_h);
    let before = Rectangle::new(
        Point::new(origin.x + px(pad), panel_y),
        Size::new(panel_w, panel_h),
    );
    let after = Rectangle::new(
        Point::new(origin.x + px(2 * pad + panel_w), panel_y),
        Size::new(panel_w, panel_h),
    );
    Layout {
        header,
        body,
        footer,
        before,
        after,
        font,
        pad,
    }
}

/// Draws the whole screen for `state` onto `target`.
///
/// Never panics on any state: an image that is missing, empty or shorter than
/// `width * height * 3` bytes shows the "no approved result yet" placeholder.
pub fn render<D: DrawTarget<Color = Rgb888>>(
    target: &mut D,
    state: &DisplayState,
) -> Result<(), D::Error> {
    let l = layout(target.bounding_box());
    target.fill_solid(&target.bounding_box(), palette::BACKGROUND)?;
    draw_header(&mut target.clipped(&l.header), &l, state)?;
    draw_body(&mut target.clipped(&l.body), &l, state)?;
    draw_footer(&mut target.clipped(&l.footer), &l, state)
}

fn draw_header<D: DrawTarget<Color = Rgb888>>(
    t: &mut D,
    l: &Layout,
    s: &DisplayState,
) -> Result<(), D::Error> {
    t.fill_solid(&l.header, palette::BAR)?;
    let ch = l.font.character_size.height;
    let mut pos = l.header.top_left + Point::new(px(l.pad), px(l.pad));

    let (link_color, link) = if s.connected {
        (palette::CONNECTED, "CONNECTED")
    } else {
        (palette::DISCONNECTED, "DISCONNECTED")
    };
    let dot = ch.saturating_sub(2).max(1);
    Circle::new(pos + Point::new(0, 1), dot)
        .into_styled(PrimitiveStyle::with_fill(link_color))
        .draw(t)?;
    pos.x += px(dot + l.pad);
    pos = text(t, l.font, link, pos, link_color)?;
    pos.x += px(2 * advance(l.font));

    let (arm_color, arm) = if s.armed {
        (palette::ARMED, "ARMED")
    } else {
        (palette::DIM, "idle")
    };
    pos = text(t, l.font, arm, pos, arm_color)?;
    pos.x += px(2 * advance(l.font));

    text(
        t,
        l.font,
        &format!("queue {}", s.queue_depth),
        pos,
        palette::TEXT,
    )?;
    Ok(())
}

fn draw_body<D: DrawTarget<Color = Rgb888>>(
    t: &mut D,
    l: &Layout,
    s: &DisplayState,
) -> Result<(), D::Error> {
    let images = match (&s.before, &s.after) {
        (Some(b), Some(a)) => b.pixel_bytes().zip(a.pixel_bytes()).map(|_| (b, a)),
        _ => None,
    };
    let Some((before, after)) = images else {
        // A result is a pair; half of one is not worth showing.
        let w = text_width(l.font, PLACEHOLDER);
        let pos = l.body.center() - Point::new(px(w / 2), px(l.font.character_size.height / 2));
        text(t, l.font, PLACEHOLDER, pos, palette::DIM)?;
        return Ok(());
    };
    for (panel, label, img) in [(l.before, "before", before), (l.after, "after", after)] {
        let label_w = text_width(l.font, label);
        let label_pos = Point::new(
            panel.top_left.x + px(panel.size.width.saturating_sub(label_w) / 2),
            l.body.top_left.y + px(l.pad),
        );
        text(t, l.font, label, label_pos, palette::DIM)?;
        t.fill_solid(&panel, palette::PANEL)?;
        draw_image(t, img, panel)?;
    }
    Ok(())
}

fn draw_footer<D: DrawTarget<Color = Rgb888>>(
    t: &mut D,
    l: &Layout,
    s: &DisplayState,
) -> Result<(), D::Error> {
    t.fill_solid(&l.footer, palette::BAR)?;
    let adv = advance(l.font);
    let line2 = px(l.font.character_size.height + l.pad);
    let left = l.footer.top_left + Point::new(px(l.pad), px(l.pad));
    let inner_w = l.footer.size.width.saturating_sub(2 * l.pad);

    // Line 1: template name on the left, time on the right; the name gives way to the time.
    let time = clean(&s.time, (inner_w / adv) as usize);
    let time_w = text_width(l.font, &time);
    let time_pos = left + Point::new(px(inner_w.saturating_sub(time_w)), 0);
    text(t, l.font, &time, time_pos, palette::TEXT)?;
    let label = "template ";
    let name_chars = inner_w.saturating_sub(time_w + 2 * adv) / adv;
    let name = clean(
        &s.template,
        (name_chars as usize).saturating_sub(label.len()),
    );
    let pos = text(t, l.font, label, left, palette::DIM)?;
    text(t, l.font, &name, pos, palette::TEXT)?;

    // Line 2: quality score, flagged in amber when it needs review.
    let pos = text(
        t,
        l.font,
        "score ",
        left + Point::new(0, line2),
        palette::DIM,
    )?;
    let score = format!("{:.3}", s.score);
    let score_color = if s.needs_review {
        palette::AMBER
    } else {
        palette::TEXT
    };
    let mut pos = text(t, l.font, &score, pos, score_color)?;
    if s.needs_review {
        pos.x += px(2 * adv);
        text(t, l.font, "needs review", pos, palette::AMBER)?;
    }
    Ok(())
}

/// Fits `img` (already validated) into `panel`, keeping its aspect ratio, centred, with
/// nearest-neighbour sampling.
fn draw_image<D: DrawTarget<Color = Rgb888>>(
    t: &mut D,
    img: &RgbImage8,
    panel: Rectangle,
) -> Result<(), D::Error> {
    let Some(rgb) = img.pixel_bytes() else {
        return Ok(());
    };
    let (iw, ih) = (u64::from(img.width), u64::from(img.height));
    let (pw, ph) = (u64::from(panel.size.width), u64::from(panel.size.height));
    if pw == 0 || ph == 0 {
        return Ok(());
    }
    // Cross-multiplying in u64 cannot overflow: every factor is at most u32::MAX.
    let (dw, dh) = if iw * ph <= ih * pw {
        ((iw * ph / ih).max(1), ph)
    } else {
        (pw, (ih * pw / iw).max(1))
    };
    let xs: Vec<usize> = (0..dw)
        .map(|dx| (nearest(dx, dw, iw) * 3) as usize)
        .collect();
    let row_bytes = (iw * 3) as usize;
    let colors = (0..dh).flat_map(|dy| {
        let row = (nearest(dy, dh, ih) as usize) * row_bytes;
        xs.iter()
            .map(move |&x| Rgb888::new(rgb[row + x], rgb[row + x + 1], rgb[row + x + 2]))
    });
    let origin = panel.top_left + Point::new(((pw - dw) / 2) as i32, ((ph - dh) / 2) as i32);
    t.fill_contiguous(
        &Rectangle::new(origin, Size::new(dw as u32, dh as u32)),
        colors,
    )
}

fn text<D: DrawTarget<Color = Rgb888>>(
    t: &mut D,
    font: &MonoFont<'_>,
    s: &str,
    pos: Point,
    color: Rgb888,
) -> Result<Point, D::Error> {
    Text::with_baseline(s, pos, MonoTextStyle::new(font, color), Baseline::Top).draw(t)
}

fn advance(font: &MonoFont<'_>) -> u32 {
    font.character_size.width + font.character_spacing
}

fn text_width(font: &MonoFont<'_>, s: &str) -> u32 {
    let n = u32::try_from(s.chars().count()).unwrap_or(u32::MAX);
    n.saturating_mul(advance(font))
}

/// One line of at most `max` characters: control characters (a newline would start a
/// second line over the next row) become spaces, and a cut is marked with "...".
fn clean(s: &str, max: usize) -> String {
    let one_line = s.chars().map(|c| if c.is_control() { ' ' } else { c });
    if s.chars().count() <= max {
        return one_line.collect();
    }
    if max < 4 {
        return one_line.take(max).collect();
    }
    let mut out: String = one_line.take(max - 3).collect();
    out.push_str("...");
    out
}

/// A layout length as a coordinate; layout lengths are clamped to `MAX_SIDE` scale, so the
/// saturation never triggers in practice.
fn px(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::clean;

    #[test]
    fn clean_truncates_by_chars_and_flattens_control_characters() {
        assert_eq!(clean("abc", 3), "abc");
        assert_eq!(clean("a\nb", 10), "a b");
        assert_eq!(clean("abcdefgh", 6), "abc...");
        assert_eq!(clean("ééééé", 4), "é...");
        assert_eq!(clean("abcdef", 2), "ab");
        assert_eq!(clean("abcdef", 0), "");
    }
}
