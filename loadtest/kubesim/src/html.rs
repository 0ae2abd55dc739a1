//! The HTML report of a chaos run (`fleet` on kubesim, or the chaos test on the real control
//! plane): one self-contained page (inline SVG and CSS, no scripts, nothing fetched) that a
//! user can open from disk or attach to a ticket.
//!
//! Each figure is a `<section class="figure" id="…">` whose heading starts with a small square
//! in the figure's own marker colour ([`MARKERS`]); no chart uses those colours, so a screenshot
//! shows which figures were drawn (the screenshot test looks for them).

use std::fmt::Write as _;

/// One colour per figure, used only for its marker square, in figure order.
pub const MARKERS: [(&str, [u8; 3]); 8] = [
    ("failover-latency", [0xd6, 0x27, 0x28]),
    ("writer-timeline", [0x17, 0xbe, 0xcf]),
    ("ownership", [0xbc, 0xbd, 0x22]),
    ("renewal-lateness", [0x94, 0x67, 0xbd]),
    ("api-writes", [0x8c, 0x56, 0x4b]),
    ("memory", [0xe3, 0x77, 0xc2]),
    ("faults", [0x7f, 0x7f, 0x7f]),
    ("summary", [0x2c, 0xa0, 0x2c]),
];

/// The `p` quantile of sorted values (nearest rank); 0 for none.
pub fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// Series colours (never a marker colour).
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#3b3b98", "#e15759", "#76b7b2", "#59a14f", "#edc948",
    "#b07aa1", "#ff9da7",
];
const DUAL: &str = "#ff0000";
const WRITERLESS: &str = "#222222";

const W: f64 = 1000.0;
const H: f64 = 260.0;
const LEFT: f64 = 112.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 40.0;

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One row of a timeline: labelled segments [start, end) in seconds, each with a colour index
/// into the palette (`None`: drawn as `special`).
pub struct Row {
    pub label: String,
    pub segments: Vec<Segment>,
}

pub struct Segment {
    pub start: f64,
    pub end: f64,
    pub fill: Fill,
    pub title: String,
}

#[derive(Clone, Copy)]
pub enum Fill {
    Series(usize),
    DualWriter,
    Writerless,
}

impl Fill {
    fn colour(self) -> &'static str {
        match self {
            Fill::Series(i) => PALETTE[i % PALETTE.len()],
            Fill::DualWriter => DUAL,
            Fill::Writerless => WRITERLESS,
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn hex([r, g, b]: [u8; 3]) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

fn marker(id: &str) -> String {
    let c = MARKERS
        .iter()
        .find(|(m, _)| *m == id)
        .map_or_else(|| "#000000".to_string(), |(_, c)| hex(*c));
    format!(
        r#"<svg class="marker" width="14" height="14" aria-hidden="true"><rect width="14" height="14" fill="{c}"/></svg>"#
    )
}

/// A figure: heading with marker, the SVG, a caption.
fn section(id: &str, title: &str, caption: &str, body: &str) -> String {
    format!(
        "<section class=\"figure\" id=\"{id}\"><h2>{}{}</h2>{body}<p class=\"caption\">{}</p></section>\n",
        marker(id),
        esc(title),
        esc(caption)
    )
}

/// "Nice" tick step for a range.
fn step(span: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let n = raw / mag;
    mag * if n < 1.5 {
        1.0
    } else if n < 3.5 {
        2.0
    } else if n < 7.5 {
        5.0
    } else {
        10.0
    }
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

struct Frame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
    height: f64,
}

impl Frame {
    fn x(&self, v: f64) -> f64 {
        LEFT + (v - self.x0) / (self.x1 - self.x0).max(f64::EPSILON) * (W - LEFT - RIGHT)
    }
    fn y(&self, v: f64) -> f64 {
        self.height
            - BOTTOM
            - (v - self.y0) / (self.y1 - self.y0).max(f64::EPSILON) * (self.height - TOP - BOTTOM)
    }

    /// Axes, grid and tick labels.
    fn axes(&self, out: &mut String, x_label: &str, y_label: &str, y_ticks: bool) {
        let (l, r, t, b) = (LEFT, W - RIGHT, TOP, self.height - BOTTOM);
        let _ = write!(
            out,
            r##"<rect x="{l}" y="{t}" width="{}" height="{}" fill="#fafafa" stroke="#999"/>"##,
            r - l,
            b - t
        );
        let sx = step(self.x1 - self.x0);
        let mut v = (self.x0 / sx).ceil() * sx;
        while v <= self.x1 + sx * 1e-9 {
            let x = self.x(v);
            let _ = write!(
                out,
                r##"<line x1="{x:.1}" y1="{t}" x2="{x:.1}" y2="{b}" stroke="#e3e3e3"/><text x="{x:.1}" y="{}" text-anchor="middle" class="tick">{}</text>"##,
                b + 14.0,
                fmt_num(v)
            );
            v += sx;
        }
        if y_ticks {
            let sy = step(self.y1 - self.y0);
            let mut v = (self.y0 / sy).ceil() * sy;
            while v <= self.y1 + sy * 1e-9 {
                let y = self.y(v);
                let _ = write!(
                    out,
                    r##"<line x1="{l}" y1="{y:.1}" x2="{r}" y2="{y:.1}" stroke="#e3e3e3"/><text x="{}" y="{:.1}" text-anchor="end" class="tick">{}</text>"##,
                    l - 4.0,
                    y + 4.0,
                    fmt_num(v)
                );
                v += sy;
            }
        }
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle" class="axis">{}</text><text x="14" y="{}" text-anchor="middle" class="axis" transform="rotate(-90 14 {})">{}</text>"#,
            (l + r) / 2.0,
            self.height - 6.0,
            esc(x_label),
            (t + b) / 2.0,
            (t + b) / 2.0,
            esc(y_label)
        );
    }
}

fn legend(out: &mut String, names: &[(String, &str)]) {
    out.push_str("<div class=\"legend\">");
    for (name, colour) in names {
        let _ = write!(
            out,
            r#"<span><svg width="12" height="12"><rect width="12" height="12" fill="{colour}"/></svg> {}</span>"#,
            esc(name)
        );
    }
    out.push_str("</div>");
}

fn svg_open(out: &mut String, height: f64, label: &str) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {height}" width="{W}" height="{height}" role="img" aria-label="{}">"#,
        esc(label)
    );
}

/// A line chart of one or more series (x in seconds).
pub fn line_chart(
    id: &str,
    title: &str,
    caption: &str,
    (x_label, y_label): (&str, &str),
    series: &[Series],
) -> String {
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    let f = Frame {
        x0,
        x1: x1.max(x0 + 1.0),
        y0: 0.0,
        y1: if y1 > 0.0 { y1 * 1.08 } else { 1.0 },
        height: H,
    };
    let mut out = String::new();
    svg_open(&mut out, H, title);
    f.axes(&mut out, x_label, y_label, true);
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", f.x(x), f.y(y)))
            .collect();
        let _ = write!(
            out,
            r#"<polyline class="series" data-series="{}" fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"#,
            esc(&s.name),
            PALETTE[i % PALETTE.len()],
            pts.join(" ")
        );
    }
    out.push_str("</svg>");
    let names: Vec<(String, &str)> = series
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), PALETTE[i % PALETTE.len()]))
        .collect();
    legend(&mut out, &names);
    section(id, title, caption, &out)
}

/// A histogram of millisecond values: 30 bins up to the 99th percentile, the rest in an
/// overflow bin at the right.
pub fn histogram(id: &str, title: &str, caption: &str, values: &[u64]) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let bins = 30usize;
    let top = pct(&sorted, 0.99).max(1) as f64;
    let width = (top / bins as f64).max(1.0);
    let mut counts = vec![0u64; bins + 1];
    for &v in &sorted {
        let b = ((v as f64 / width) as usize).min(bins);
        counts[b] += 1;
    }
    let max = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let f = Frame {
        x0: 0.0,
        x1: width * (bins + 1) as f64,
        y0: 0.0,
        y1: max * 1.08,
        height: H,
    };
    let mut out = String::new();
    svg_open(&mut out, H, title);
    f.axes(&mut out, "milliseconds", "count", true);
    for (b, &c) in counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let (x, x2) = (f.x(b as f64 * width), f.x((b + 1) as f64 * width));
        let y = f.y(c as f64);
        let overflow = b == bins;
        let _ = write!(
            out,
            r#"<rect class="bar" x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {c}</title></rect>"#,
            (x2 - x - 1.0).max(1.0),
            f.y(0.0) - y,
            if overflow { PALETTE[1] } else { PALETTE[0] },
            if overflow {
                format!("over {} ms", fmt_num(top))
            } else {
                format!(
                    "{}–{} ms",
                    fmt_num(b as f64 * width),
                    fmt_num((b + 1) as f64 * width)
                )
            }
        );
    }
    out.push_str("</svg>");
    let summary = if sorted.is_empty() {
        "no samples".to_string()
    } else {
        format!(
            "n={}, p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
            sorted.len(),
            pct(&sorted, 0.5),
            pct(&sorted, 0.9),
            pct(&sorted, 0.99),
            sorted[sorted.len() - 1]
        )
    };
    let _ = write!(out, "<p class=\"stats\">{}</p>", esc(&summary));
    section(id, title, caption, &out)
}

/// Rows of coloured segments over time (x in seconds).
pub fn timeline(
    id: &str,
    title: &str,
    caption: &str,
    (x0, x1): (f64, f64),
    rows: &[Row],
    legend_names: &[(String, Fill)],
) -> String {
    let row_h = 16.0;
    let height = TOP + BOTTOM + row_h * rows.len().max(1) as f64;
    let f = Frame {
        x0,
        x1: x1.max(x0 + 1.0),
        y0: 0.0,
        y1: 1.0,
        height,
    };
    let mut out = String::new();
    svg_open(&mut out, height, title);
    f.axes(&mut out, "seconds", "", false);
    for (r, row) in rows.iter().enumerate() {
        let y = TOP + r as f64 * row_h;
        let _ = write!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end" class="rowlabel">{}</text>"#,
            LEFT - 4.0,
            y + row_h - 4.0,
            esc(&row.label)
        );
        for s in &row.segments {
            let (a, b) = (f.x(s.start.max(x0)), f.x(s.end.min(f.x1)));
            if b <= a {
                continue;
            }
            let (h, dy) = match s.fill {
                Fill::Series(_) => (row_h - 4.0, 2.0),
                // Overlays: thinner, on top of the writer's colour.
                _ => (row_h / 2.0, row_h / 4.0),
            };
            let _ = write!(
                out,
                r#"<rect class="seg" x="{a:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{}</title></rect>"#,
                y + dy,
                (b - a).max(0.8),
                s.fill.colour(),
                esc(&s.title)
            );
        }
    }
    out.push_str("</svg>");
    let names: Vec<(String, &str)> = legend_names
        .iter()
        .map(|(n, f)| (n.clone(), f.colour()))
        .collect();
    legend(&mut out, &names);
    section(id, title, caption, &out)
}

/// The key figures as a table; `judged` says what the verdict rests on.
pub fn summary(verdict: &str, pass: bool, rows: &[(String, String)], judged: &str) -> String {
    let mut out = format!(
        "<p class=\"verdict {}\">{}</p><table>",
        if pass { "pass" } else { "fail" },
        esc(verdict)
    );
    for (k, v) in rows {
        let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
    }
    out.push_str("</table>");
    section("summary", "Summary", judged, &out)
}

/// The whole page.
pub fn page(title: &str, sections: &[String]) -> String {
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{t}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #222; background: #fff; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 16px; margin: 18px 0 6px; }}
.marker {{ vertical-align: -1px; margin-right: 6px; }}
.tick {{ font-size: 10px; fill: #555; }} .axis {{ font-size: 11px; fill: #333; }}
.rowlabel {{ font-size: 10px; fill: #333; }}
.legend span {{ margin-right: 14px; font-size: 12px; }}
.caption, .stats {{ font-size: 12px; color: #555; max-width: 960px; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ text-align: left; padding: 2px 10px 2px 0; border-bottom: 1px solid #eee; }}
.verdict {{ font-weight: bold; font-size: 15px; }} .pass {{ color: #1a7f37; }} .fail {{ color: #cf222e; }}
</style></head><body><h1>{t}</h1>
{body}</body></html>
"#,
        t = esc(title),
        body = sections.join("")
    )
}

/// Events (name, ms) in `[from_ms, to_ms]` counted per second and per name: one series per
/// name, every second of the span present (0 where none), x in seconds from `from_ms`.
pub fn per_second(
    events: impl IntoIterator<Item = (String, u64)>,
    from_ms: u64,
    to_ms: u64,
) -> Vec<Series> {
    let mut per: std::collections::BTreeMap<String, std::collections::BTreeMap<u64, u64>> =
        Default::default();
    for (name, at) in events {
        if (from_ms..=to_ms).contains(&at) {
            *per.entry(name)
                .or_default()
                .entry((at - from_ms) / 1000)
                .or_default() += 1;
        }
    }
    let last_s = to_ms.saturating_sub(from_ms) / 1000;
    per.into_iter()
        .map(|(name, m)| Series {
            name,
            points: (0..=last_s)
                .map(|s| (s as f64, m.get(&s).copied().unwrap_or(0) as f64))
                .collect(),
        })
        .collect()
}

/// The writer-timeline segments of one StatefulSet's invariant intervals that began at or
/// after `from_ms`: without a Ready writer (dark) and with two writers (red); `secs` maps a
/// time to the chart's seconds.
pub fn invariant_segments(
    s: &crate::recorder::SetReport,
    from_ms: u64,
    now_ms: u64,
    secs: &dyn Fn(u64) -> f64,
) -> Vec<Segment> {
    let mut segments = vec![];
    for (list, fill, what) in [
        (&s.no_ready_writer, Fill::Writerless, "no Ready writer"),
        (&s.dual_writer, Fill::DualWriter, "TWO WRITERS"),
    ] {
        for i in list.iter().filter(|i| i.start_ms >= from_ms) {
            let end = i.end_ms.unwrap_or(now_ms);
            segments.push(Segment {
                start: secs(i.start_ms),
                end: secs(end),
                fill,
                title: format!("{what} for {} ms", end - i.start_ms),
            });
        }
    }
    segments
}

/// The writer timeline's legend: pods of ordinals `0..pods`, then the two invariant fills.
pub fn writer_legend(pods: usize) -> Vec<(String, Fill)> {
    let mut legend: Vec<(String, Fill)> = (0..pods)
        .map(|o| (format!("pod -{o} is writer"), Fill::Series(o)))
        .collect();
    legend.push(("no Ready writer".into(), Fill::Writerless));
    legend.push(("two writers".into(), Fill::DualWriter));
    legend
}

/// A process's resident set in KiB (`VmRSS` of `/proc/<pid>/status`; `self` for this one),
/// for the memory figure; `None` where /proc does not say.
pub fn rss_kib(pid: &str) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// One KiB figure of `/proc/<pid>/status` (`VmRSS`, `RssAnon`: the private part, `RssFile`:
/// mapped files such as the binary, shared by every process that maps them).
pub fn status_kib(pid: &str, field: &str) -> Option<u64> {
    proc_kib(pid, "status", field)
}

/// A process's proportional set size in KiB (`Pss` of `/proc/<pid>/smaps_rollup`): its private
/// pages plus each shared page divided by the number of processes mapping it, so the Pss of
/// processes that run one binary adds up to what they use together (the binary counted once).
pub fn pss_kib(pid: &str) -> Option<u64> {
    proc_kib(pid, "smaps_rollup", "Pss")
}

fn proc_kib(pid: &str, file: &str, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Each figure's id and the colour of its marker square, as a page declares them.
pub fn markers(page: &str) -> Vec<(String, [u8; 3])> {
    page.split("<section class=\"figure\" id=\"")
        .skip(1)
        .filter_map(|s| {
            let id = s.split('"').next()?.to_string();
            let fill = s
                .split("class=\"marker\"")
                .nth(1)?
                .split("fill=\"#")
                .nth(1)?
                .get(..6)?;
            let c = |i: usize| u8::from_str_radix(fill.get(i..i + 2)?, 16).ok();
            Some((id, [c(0)?, c(2)?, c(4)?]))
        })
        .collect()
}

/// Render a page with headless Chromium (Debian's `chromium`; `make browser-deps` installs it)
/// into `png` at `width`×`height` and return the screenshot's pixels (RGB).
#[cfg(feature = "screenshot")]
pub fn screenshot(
    page: &std::path::Path,
    png_path: &std::path::Path,
    (width, height): (u32, u32),
) -> Result<Vec<[u8; 3]>, String> {
    use std::process::Command;
    let browser = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .ok_or("headless Chromium is needed to render the report: `make browser-deps` installs Debian's chromium")?;
    let shot = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            &format!("--window-size={width},{height}"),
        ])
        .arg(format!("--screenshot={}", png_path.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .map_err(|e| format!("running {browser}: {e}"))?;
    if !shot.status.success() || !png_path.exists() {
        return Err(format!(
            "{browser} failed: {}",
            String::from_utf8_lossy(&shot.stderr)
        ));
    }
    let file = std::fs::File::open(png_path).map_err(|e| format!("{}: {e}", png_path.display()))?;
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(|e| format!("decoding the screenshot: {e}"))?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("decoding the screenshot: {e}"))?;
    let channels = info.color_type.samples();
    if channels < 3 {
        return Err(format!("not a colour screenshot: {:?}", info.color_type));
    }
    Ok(buf[..info.buffer_size()]
        .chunks(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_charts_scale_into_the_frame() {
        assert_eq!(step(100.0), 20.0);
        assert_eq!(step(7.0), 1.0);
        assert_eq!(step(12.0), 2.0);
        assert_eq!(step(0.0), 1.0);
        let html = line_chart(
            "memory",
            "t",
            "c",
            ("s", "MiB"),
            &[Series {
                name: "a".into(),
                points: vec![(0.0, 0.0), (10.0, 5.0)],
            }],
        );
        // Both points inside the plotting area.
        assert!(html.contains(&format!("points=\"{LEFT:.1},{:.1}", H - BOTTOM)));
        assert!(html.contains("id=\"memory\""));
        assert!(html.contains("#e377c2"));
        let mut values: Vec<u64> = (1..=200).collect();
        values.push(10_000);
        let h = histogram("failover-latency", "t", "c", &values);
        assert!(h.contains("n=201"), "{h}");
        assert!(
            h.contains("over "),
            "the largest value goes to the overflow bin: {h}"
        );
    }

    #[test]
    fn text_is_escaped() {
        let s = summary("<b>", true, &[("a&b".into(), "\"x\"".into())], "judged");
        assert!(s.contains("&lt;b&gt;") && s.contains("a&amp;b") && s.contains("&quot;x&quot;"));
    }
}
