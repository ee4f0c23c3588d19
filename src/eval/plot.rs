//! Perplexity against test-time recurrence r, drawn as a PNG with plotters.
//!
//! r goes on a log2 axis (labelled 1, 2, 4, ...), since recurrences are swept in powers of two;
//! perplexity goes on a log axis when the values span more than 10x (an unhealed model at large
//! r would otherwise flatten every other point), else on a linear one. Both axes are drawn in
//! transformed coordinates (log2 r, log10 perplexity) with tick positions chosen here, so that
//! the labels are round numbers in the original units.
//!
//! Text is rendered by plotters' `ab_glyph` feature from DejaVu Sans, embedded in the binary from
//! fixtures/fonts/ (license beside it): the default `ttf` feature finds fonts through
//! fontconfig, which a fresh machine or container may not have. The image is drawn into an RGB
//! buffer, encoded by the `png` crate, written to `PATH.partial` and renamed over `PATH`.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// DejaVu Sans 2.37 (Bitstream Vera license: fixtures/fonts/DejaVuSans.LICENSE).
const FONT: &[u8] = include_bytes!("../../fixtures/fonts/DejaVuSans.ttf");

const SIZE: (u32, u32) = (960, 600);

/// Tableau 10: distinguishable, and readable by most colour-blind viewers.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Why a plot could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// No series, or only empty ones.
    #[error("nothing to plot: no perplexity values")]
    Empty,
    /// r = 0 has no place on a log axis.
    #[error("series `{series}`: r = 0 cannot be placed on a log2 axis")]
    ZeroRecurrence { series: String },
    /// A perplexity that is not a finite positive number.
    #[error("series `{series}`: perplexity at r = {r} is {value}, not a finite positive number")]
    BadPerplexity { series: String, r: u32, value: f64 },
    /// The embedded font does not parse (a broken build, not bad input).
    #[error("the embedded font fixtures/fonts/DejaVuSans.ttf does not load")]
    Font,
    /// plotters failed while drawing.
    #[error("drawing the plot failed: {0}")]
    Draw(String),
    /// The PNG encoder failed.
    #[error("{path}: encoding the PNG failed: {source}")]
    Png {
        path: PathBuf,
        source: png::EncodingError,
    },
    /// Writing or renaming the file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One axis in transformed coordinates: the drawn range and where ticks go.
#[derive(Debug, Clone, PartialEq)]
struct Axis {
    range: Range<f64>,
    ticks: Vec<f64>,
}

/// A linear f64 axis with the ticks given. plotters 0.3.7's own `WithKeyPoints<RangedCoordf64>`
/// cannot be used: it implements no `ValueFormatter`, so its mesh cannot be drawn.
struct Ticked {
    inner: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Ticked {
    fn new(axis: &Axis) -> Ticked {
        Ticked {
            inner: axis.range.clone().into(),
            ticks: axis.ticks.clone(),
        }
    }
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    /// The ticks are the bold mesh lines; no light lines between them.
    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.inner.range()
    }
}

/// Writes a PNG of perplexity against r, one line with markers per series and a legend.
/// `series` holds `(name, [(r, perplexity)])`; points are drawn in order of r.
pub fn plot_perplexity(
    path: &Path,
    title: &str,
    series: &[(String, Vec<(u32, f64)>)],
) -> Result<(), PlotError> {
    check(series)?;
    register_font()?;
    let rs = series.iter().flat_map(|(_, p)| p.iter().map(|&(r, _)| r));
    let ppls = series.iter().flat_map(|(_, p)| p.iter().map(|&(_, v)| v));
    let x = x_axis(rs.clone().min().unwrap_or(1), rs.max().unwrap_or(1));
    let lo = ppls.clone().fold(f64::INFINITY, f64::min);
    let hi = ppls.fold(0.0, f64::max);
    let log_y = hi > 10.0 * lo;
    let y = if log_y {
        log_axis(lo, hi)
    } else {
        linear_axis(lo, hi)
    };
    let ty = |v: f64| if log_y { v.log10() } else { v };
    let lines: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, points)| {
            let mut points = points.clone();
            points.sort_by_key(|&(r, _)| r);
            let xy = points.iter().map(|&(r, v)| (f64::from(r).log2(), ty(v)));
            (name.as_str(), xy.collect())
        })
        .collect();

    let (w, h) = SIZE;
    let mut rgb = vec![0u8; (w as usize) * (h as usize) * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        let x_label = |v: &f64| format!("{}", 2f64.powf(*v).round());
        let y_step = (!log_y).then(|| match y.ticks.as_slice() {
            [a, b, ..] => b - a,
            _ => 1.0,
        });
        let y_label = |v: &f64| label(if log_y { 10f64.powf(*v) } else { *v }, y_step);
        let labels = Labels {
            x_desc: "test-time recurrence r",
            y_desc: if log_y {
                "perplexity (log scale)"
            } else {
                "perplexity"
            },
            x: &x_label,
            y: &y_label,
        };
        draw(&root, title, &lines, (&x, &y), &labels)
            .map_err(|e| PlotError::Draw(e.to_string()))?;
        root.present().map_err(|e| PlotError::Draw(e.to_string()))?;
    }
    write_png(path, &rgb)
}

fn check(series: &[(String, Vec<(u32, f64)>)]) -> Result<(), PlotError> {
    if series.iter().all(|(_, p)| p.is_empty()) {
        return Err(PlotError::Empty);
    }
    for (name, points) in series {
        for &(r, value) in points {
            if r == 0 {
                return Err(PlotError::ZeroRecurrence {
                    series: name.clone(),
                });
            }
            if !(value.is_finite() && value > 0.0) {
                return Err(PlotError::BadPerplexity {
                    series: name.clone(),
                    r,
                    value,
                });
            }
        }
    }
    Ok(())
}

/// plotters keeps registered fonts in a process-wide table: register once.
fn register_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    ok.then_some(()).ok_or(PlotError::Font)
}

/// log2 r from just below the smallest r to just above the largest, ticked at the powers of
/// two (r >= 1) that the data spans.
fn x_axis(min_r: u32, max_r: u32) -> Axis {
    let (lo, hi) = (f64::from(min_r).log2(), f64::from(max_r).log2());
    let pad = if hi - lo < 1.0 { 1.0 } else { 0.3 };
    let range = (lo - pad)..(hi + pad);
    // Only the powers of two next to the data: a lone r = 1 gets the tick "1", not "1" and "2".
    let first = lo.floor().max(range.start.ceil()).max(0.0) as i32;
    let last = hi.ceil().min(range.end.floor()) as i32;
    Axis {
        range,
        ticks: (first..=last).map(f64::from).collect(),
    }
}

/// log10 perplexity, ticked at 1, 2, 5 times powers of ten over up to three decades, at powers
/// of ten beyond that (every few when there are many).
fn log_axis(lo: f64, hi: f64) -> Axis {
    let (a, b) = (lo.log10(), hi.log10());
    let pad = 0.05 * (b - a);
    let range = (a - pad)..(b + pad);
    let mantissas: &[f64] = if b - a <= 3.0 {
        &[1.0, 2.0, 5.0]
    } else {
        &[1.0]
    };
    let decades = (range.start.floor() as i32)..=(range.end.ceil() as i32);
    let mut ticks: Vec<f64> = decades
        .flat_map(|e| mantissas.iter().map(move |m| (m * 10f64.powi(e)).log10()))
        .filter(|t| range.contains(t))
        .collect();
    let every = ticks.len().div_ceil(10).max(1);
    ticks = ticks.into_iter().step_by(every).collect();
    Axis { range, ticks }
}

/// Perplexity as is, ticked at a round step (1, 2 or 5 times a power of ten), about 6 ticks.
fn linear_axis(lo: f64, hi: f64) -> Axis {
    let span = hi - lo;
    let pad = if span > 0.0 { 0.08 * span } else { 0.1 * lo };
    let range = (lo - pad).max(0.0)..(hi + pad);
    let step = nice_step((range.end - range.start) / 6.0);
    let first = (range.start / step).ceil() as i64;
    let last = (range.end / step).floor() as i64;
    Axis {
        ticks: (first..=last).map(|k| k as f64 * step).collect(),
        range,
    }
}

/// The smallest of 1, 2, 5 times a power of ten that is at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let base = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * base)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * base)
}

/// A tick label: as many decimals as the value's magnitude (or the step) needs, no more.
fn label(value: f64, step: Option<f64>) -> String {
    let scale = step.unwrap_or(value).abs();
    if value >= 1e5 {
        return format!("{value:.0e}");
    }
    let decimals = if scale > 0.0 {
        (-scale.log10().floor()).clamp(0.0, 6.0) as usize
    } else {
        0
    };
    format!("{value:.decimals$}")
}

/// How the axes of a chart are described and labelled.
struct Labels<'a> {
    x_desc: &'a str,
    y_desc: &'a str,
    x: &'a dyn Fn(&f64) -> String,
    y: &'a dyn Fn(&f64) -> String,
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    lines: &[(&str, Vec<(f64, f64)>)],
    (x, y): (&Axis, &Axis),
    labels: &Labels,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(Ticked::new(x), Ticked::new(y))?;
    chart
        .configure_mesh()
        .x_desc(labels.x_desc)
        .y_desc(labels.y_desc)
        .x_label_formatter(labels.x)
        .y_label_formatter(labels.y)
        .label_style(("sans-serif", 18))
        .axis_desc_style(("sans-serif", 20))
        .bold_line_style(RGBColor(220, 220, 220))
        .draw()?;
    for (i, (name, points)) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(
                LineSeries::new(points.iter().copied(), color.filled().stroke_width(2))
                    .point_size(5),
            )?
            .label(*name)
            .legend(move |(lx, ly)| {
                PathElement::new(vec![(lx, ly), (lx + 24, ly)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 18))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Writes a PNG of curves on linear axes: `series` holds `(name, [(x, y)])` (e.g. training and
/// held-out loss against the step). Non-finite points are left out.
pub(crate) fn plot_curves(
    path: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<(), PlotError> {
    register_font()?;
    let lines: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, p)| {
            (
                n.as_str(),
                p.iter()
                    .copied()
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .collect(),
            )
        })
        .collect();
    let all = || lines.iter().flat_map(|(_, p)| p.iter().copied());
    if all().next().is_none() {
        return Err(PlotError::Empty);
    }
    let (x0, x1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (x, _)| {
        (a.min(x), b.max(x))
    });
    let (y0, y1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (_, y)| {
        (a.min(y), b.max(y))
    });
    let x = linear_axis(x0, x1.max(x0 + 1.0));
    let y = linear_axis(y0, y1.max(y0 + 1e-3));
    let step = |a: &Axis| match a.ticks.as_slice() {
        [a, b, ..] => Some(b - a),
        _ => None,
    };
    let (xs, ys) = (step(&x), step(&y));
    let x_label = move |v: &f64| label(*v, xs);
    let y_label = move |v: &f64| label(*v, ys);
    let labels = Labels {
        x_desc,
        y_desc,
        x: &x_label,
        y: &y_label,
    };
    let (w, h) = SIZE;
    let mut rgb = vec![0u8; (w as usize) * (h as usize) * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        draw(&root, title, &lines, (&x, &y), &labels)
            .map_err(|e| PlotError::Draw(e.to_string()))?;
        root.present().map_err(|e| PlotError::Draw(e.to_string()))?;
    }
    write_png(path, &rgb)
}

/// Encodes the RGB buffer and moves it into place, leaving nothing at `PATH.partial-<pid>`.
fn write_png(path: &Path, rgb: &[u8]) -> Result<(), PlotError> {
    let partial = crate::atomic::partial_file(path);
    let result = encode(&partial, rgb).and_then(|()| {
        std::fs::rename(&partial, path).map_err(|source| PlotError::Io {
            path: path.to_path_buf(),
            source,
        })
    });
    if result.is_err() {
        // Best effort: the error being reported is the one that matters.
        let _ = std::fs::remove_file(&partial);
    }
    result
}

fn encode(partial: &Path, rgb: &[u8]) -> Result<(), PlotError> {
    let io = |source| PlotError::Io {
        path: partial.to_path_buf(),
        source,
    };
    let png_err = |source| PlotError::Png {
        path: partial.to_path_buf(),
        source,
    };
    let file = std::fs::File::create(partial).map_err(io)?;
    let mut out = std::io::BufWriter::new(file);
    let mut encoder = png::Encoder::new(&mut out, SIZE.0, SIZE.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(png_err)?;
    writer.write_image_data(rgb).map_err(png_err)?;
    writer.finish().map_err(png_err)?;
    out.flush().map_err(io)?;
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_ticks_are_the_powers_of_two_in_range() {
        assert_eq!(x_axis(1, 32).ticks, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(x_axis(1, 1).ticks, [0.0]);
        assert_eq!(x_axis(3, 3).ticks, [1.0, 2.0]);
    }

    #[test]
    fn log_ticks_are_round_numbers() {
        let ticks: Vec<String> = log_axis(12.0, 300.0)
            .ticks
            .iter()
            .map(|t| label(10f64.powf(*t), None))
            .collect();
        assert_eq!(ticks, ["20", "50", "100", "200"]);
    }

    #[test]
    fn linear_ticks_use_a_round_step() {
        assert_eq!(
            linear_axis(14.2, 17.9).ticks,
            [14.0, 15.0, 16.0, 17.0, 18.0]
        );
        assert_eq!(linear_axis(14.2, 15.9).ticks, [14.5, 15.0, 15.5, 16.0]);
        assert_eq!(label(15.5, Some(0.5)), "15.5");
        assert_eq!(label(16.0, Some(0.5)), "16.0");
    }

    #[test]
    fn bad_values_are_refused() {
        let s = |v: f64, r: u32| vec![("a".to_string(), vec![(r, v)])];
        assert!(matches!(
            check(&s(f64::NAN, 1)),
            Err(PlotError::BadPerplexity { .. })
        ));
        assert!(matches!(
            check(&s(0.0, 1)),
            Err(PlotError::BadPerplexity { .. })
        ));
        assert!(matches!(
            check(&s(2.0, 0)),
            Err(PlotError::ZeroRecurrence { .. })
        ));
        assert!(matches!(check(&[]), Err(PlotError::Empty)));
    }
}
