//! The SVG plot: for a sweep, throughput and latency percentiles against the swept value (one
//! panel each, so every curve has a readable scale); for a single point, the latency
//! distributions as CDFs.
//!
//! SVG because its text is left to the viewer: a PNG would need a font rasterizer and, through
//! plotters, the system's font libraries.

use std::path::Path;

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::metrics::{PointMetrics, PointRun};
use super::report::Settings;
use super::stats::Summary;

const FONT: &str = "sans-serif";
type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// A curve: legend label, colour, and one y value per point (`None`: no data at that point).
struct Curve {
    label: &'static str,
    color: RGBColor,
    ys: Vec<Option<f64>>,
}

const P50: RGBColor = RGBColor(31, 119, 180);
const P99: RGBColor = RGBColor(214, 39, 40);
const TOTAL: RGBColor = RGBColor(44, 160, 44);

pub fn draw(
    path: &Path,
    settings: &Settings,
    runs: &[PointRun],
    points: &[PointMetrics],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1280, 860)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let title = format!(
        "{} {} on {}: {} x {} turn(s), input {} / output {} tokens",
        settings.model,
        settings.mode,
        settings.endpoint,
        settings.num_prompts,
        settings.turns,
        settings.input_len,
        settings.output_len
    );
    let body = root.titled(&title, (FONT, 22)).map_err(plot_err)?;
    if points.len() > 1 {
        sweep(&body, runs, points)?;
    } else if let Some(run) = runs.first() {
        cdfs(&body, run)?;
    }
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn plot_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the plot: {e}")
}

fn pick(s: &Option<Summary>, f: fn(&Summary) -> f64) -> Option<f64> {
    s.as_ref().map(f)
}

/// Four panels sharing the swept value as x: throughput, TTFT, ITL and end-to-end latency.
fn sweep(area: &Area<'_>, runs: &[PointRun], points: &[PointMetrics]) -> anyhow::Result<()> {
    let ticks: Vec<String> = runs.iter().map(|r| r.load.value()).collect();
    let x_desc = runs[0].load.axis();
    let panels = area.split_evenly((2, 2));
    let series = |f: &dyn Fn(&PointMetrics) -> Option<f64>| points.iter().map(f).collect();
    let percentiles = |s: fn(&PointMetrics) -> &Option<Summary>| {
        vec![
            Curve {
                label: "p50",
                color: P50,
                ys: series(&|m| pick(s(m), |s| s.median)),
            },
            Curve {
                label: "p99",
                color: P99,
                ys: series(&|m| pick(s(m), |s| s.p99)),
            },
        ]
    };
    panel(
        &panels[0],
        "Token throughput",
        x_desc,
        "tokens/s",
        &ticks,
        &[
            Curve {
                label: "output tok/s",
                color: P50,
                ys: series(&|m| Some(m.output_throughput)),
            },
            Curve {
                label: "total (input+output) tok/s",
                color: TOTAL,
                ys: series(&|m| Some(m.total_token_throughput)),
            },
        ],
    )?;
    panel(
        &panels[1],
        "Time to first token",
        x_desc,
        "TTFT (ms)",
        &ticks,
        &percentiles(|m| &m.ttft_ms),
    )?;
    panel(
        &panels[2],
        "Inter-token latency",
        x_desc,
        "ITL (ms)",
        &ticks,
        &percentiles(|m| &m.itl_ms),
    )?;
    panel(
        &panels[3],
        "End-to-end request latency",
        x_desc,
        "latency (ms)",
        &ticks,
        &percentiles(|m| &m.e2e_ms),
    )?;
    Ok(())
}

/// One line chart with the points at evenly spaced, labelled x positions: sweeps are usually
/// geometric (1, 2, 4, 16) and may end at `inf`, which no numeric axis can show.
fn panel(
    area: &Area<'_>,
    caption: &str,
    x_desc: &str,
    y_desc: &str,
    ticks: &[String],
    curves: &[Curve],
) -> anyhow::Result<()> {
    let n = ticks.len();
    let y_max = curves
        .iter()
        .flat_map(|c| c.ys.iter().flatten())
        .fold(0.0f64, |a, &b| a.max(b));
    let y_max = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 18))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..y_max)
        .map_err(plot_err)?;
    let tick = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
            ticks[i as usize].clone()
        } else {
            String::new()
        }
    };
    let y_tick = |y: &f64| axis_number(*y, y_max);
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&tick)
        .y_labels(6)
        .y_label_formatter(&y_tick)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(WHITE)
        .draw()
        .map_err(plot_err)?;
    for curve in curves {
        let pts: Vec<(f64, f64)> = curve
            .ys
            .iter()
            .enumerate()
            .filter_map(|(i, y)| y.map(|y| (i as f64, y)))
            .collect();
        let color = curve.color;
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(curve.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// A tick label with no more digits than an axis reaching `max` needs (`200`, not `200.0`).
fn axis_number(v: f64, max: f64) -> String {
    if max >= 20.0 {
        format!("{v:.0}")
    } else if max >= 2.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// `(value, fraction of samples <= value)` as a step line.
fn cdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let mut pts = Vec::with_capacity(2 * sorted.len());
    for (i, &v) in sorted.iter().enumerate() {
        pts.push((v, i as f64 / n));
        pts.push((v, (i + 1) as f64 / n));
    }
    pts
}

/// Two CDF panels for a single point: per-request latencies (TTFT, end-to-end), and per-token
/// latencies (ITL, TPOT), whose scales differ by orders of magnitude.
fn cdfs(area: &Area<'_>, run: &PointRun) -> anyhow::Result<()> {
    let lat = run.latencies_ms();
    let panels = area.split_evenly((1, 2));
    let caption = format!("Request latency CDF ({})", run.load.label());
    cdf_panel(
        &panels[0],
        &caption,
        &[("TTFT", P50, &lat.ttft), ("end-to-end", P99, &lat.e2e)],
    )?;
    cdf_panel(
        &panels[1],
        "Per-token latency CDF",
        &[("ITL", P50, &lat.itl), ("TPOT", TOTAL, &lat.tpot)],
    )?;
    Ok(())
}

fn cdf_panel(
    area: &Area<'_>,
    caption: &str,
    curves: &[(&'static str, RGBColor, &Vec<f64>)],
) -> anyhow::Result<()> {
    let x_max = curves
        .iter()
        .flat_map(|c| c.2.iter())
        .fold(0.0f64, |a, &b| a.max(b));
    let x_max = if x_max > 0.0 { x_max * 1.05 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 18))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, 0f64..1.0)
        .map_err(plot_err)?;
    let x_tick = |x: &f64| axis_number(*x, x_max);
    chart
        .configure_mesh()
        .x_label_formatter(&x_tick)
        .x_desc("latency (ms)")
        .y_desc("fraction of samples <= x")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(WHITE)
        .draw()
        .map_err(plot_err)?;
    for &(label, color, values) in curves {
        if values.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(cdf(values), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(format!("{label} (n={})", values.len()))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}
