//! Loss curves as SVG strings, drawn with plotters' SVG backend. Without a font feature
//! plotters writes text as SVG `<text>` elements and the browser picks the font, so no system
//! fonts are needed.

use plotters::prelude::*;

/// Colors for series, one per group (Tableau 10).
pub const PALETTE: [RGBColor; 10] = [
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

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text; series sharing a label get one legend entry.
    pub label: String,
    pub color: usize,
    /// Draw a marker at each point (for sparse curves such as validation loss).
    pub markers: bool,
    pub points: Vec<(f64, f64)>,
}

/// A line chart of `series` (loss against step); `None` when no series has a point.
pub fn line_chart(title: &str, y_label: &str, series: &[Series]) -> Option<String> {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if pts.is_empty() {
        return None;
    }
    let (mut x0, mut x1) = min_max(pts.iter().map(|p| p.0));
    let (mut y0, mut y1) = min_max(pts.iter().map(|p| p.1));
    if x1 <= x0 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    let pad = if y1 > y0 {
        (y1 - y0) * 0.05
    } else {
        y0.abs().max(1.0) * 0.05
    };
    y0 -= pad;
    y1 += pad;

    let mut out = String::new();
    draw(&mut out, title, y_label, series, (x0, x1), (y0, y1)).ok()?;
    Some(out)
}

fn draw(
    out: &mut String,
    title: &str,
    y_label: &str,
    series: &[Series],
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
) -> Result<(), Box<dyn std::error::Error>> {
    {
        let root = SVGBackend::with_string(out, (720, 360)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(y_label)
            .light_line_style(RGBColor(235, 235, 235))
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .y_label_formatter(&|v| format!("{v:.3}"))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        let mut labelled: Vec<String> = Vec::new();
        for s in series {
            let color = PALETTE[s.color % PALETTE.len()];
            let points: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            if points.is_empty() {
                continue;
            }
            let anno = chart.draw_series(LineSeries::new(
                points.clone(),
                ShapeStyle::from(&color).stroke_width(2),
            ))?;
            if !labelled.contains(&s.label) {
                labelled.push(s.label.clone());
                anno.label(s.label.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
                });
            }
            if s.markers {
                chart.draw_series(
                    points
                        .iter()
                        .map(|p| Circle::new(*p, 3, ShapeStyle::from(&color).filled())),
                )?;
            }
        }
        if !labelled.is_empty() {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(200, 200, 200))
                .label_font(("sans-serif", 12))
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
        root.present()?;
    }
    Ok(())
}

fn min_max(it: impl Iterator<Item = f64>) -> (f64, f64) {
    it.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    })
}
