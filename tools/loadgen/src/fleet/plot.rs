//! The fleet benchmark's charts, as SVG (plotters' SVG backend: text is left to the viewer's
//! fonts, so nothing here needs fontconfig or any system library): acknowledged against offered
//! rate, and p50/p99 latency against offered rate, every target on the same axes, a panel per
//! connection mode (MQTT's among them).

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use plotters::prelude::*;

use super::send::ConnectionMode;
use super::{Report, StepResult};

type Drawn = Result<(), Box<dyn std::error::Error>>;

/// Writes both charts into `dir`; returns their paths.
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let [throughput, latency] = super::chart_paths(dir, &report.modes());
    draw_throughput(report, &throughput)
        .map_err(|e| anyhow!("drawing {}: {e}", throughput.display()))?;
    draw_latency(report, &latency).map_err(|e| anyhow!("drawing {}: {e}", latency.display()))?;
    Ok(vec![throughput, latency])
}

/// A target's steps in one mode, in rate order.
fn series<'a>(report: &'a Report, target: &str, mode: ConnectionMode) -> Vec<&'a StepResult> {
    let mut steps: Vec<&StepResult> = report
        .steps
        .iter()
        .filter(|s| s.target == target && s.mode == mode)
        .collect();
    steps.sort_by(|a, b| a.offered.total_cmp(&b.offered));
    steps
}

/// The offered rates' span, widened a little so the end points are not on the frame.
fn rate_span(report: &Report) -> (f64, f64) {
    let lo = report
        .steps
        .iter()
        .map(|s| s.offered)
        .fold(f64::MAX, f64::min);
    let hi = report.steps.iter().map(|s| s.offered).fold(0.0, f64::max);
    if lo > hi {
        (100.0, 10_000.0)
    } else {
        (lo / 1.3, hi * 1.3)
    }
}

fn draw_throughput(report: &Report, path: &Path) -> Drawn {
    let modes = report.modes();
    let root = SVGBackend::new(path, (640 * modes.len().max(1) as u32, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (lo, hi) = rate_span(report);
    for (panel, mode) in root
        .split_evenly((1, modes.len().max(1)))
        .iter()
        .zip(&modes)
    {
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("Acknowledged vs offered: {}", mode.label()),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d((lo..hi).log_scale(), (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("offered readings/s (open loop)")
            .y_desc("acknowledged readings/s")
            .draw()?;
        // what a target that keeps up draws: acknowledged = offered
        chart
            .draw_series(LineSeries::new(
                [(lo, lo), (hi, hi)],
                BLACK.mix(0.3).stroke_width(1),
            ))?
            .label("offered")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.3)));
        for (i, target) in report.targets.iter().enumerate() {
            let points: Vec<(f64, f64)> = series(report, &target.name, *mode)
                .iter()
                .map(|s| (s.offered, s.achieved.max(lo)))
                .collect();
            if points.is_empty() {
                continue;
            }
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(target.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn draw_latency(report: &Report, path: &Path) -> Drawn {
    let modes = report.modes();
    let root = SVGBackend::new(path, (640 * modes.len().max(1) as u32, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (lo, hi) = rate_span(report);
    let slowest = report
        .steps
        .iter()
        .filter_map(|s| s.p99_ms)
        .fold(report.p99_bound_ms, f64::max);
    let (fastest, slowest) = (0.1, slowest * 1.5);
    for (panel, mode) in root
        .split_evenly((1, modes.len().max(1)))
        .iter()
        .zip(&modes)
    {
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("Ack latency p99 (line) and p50 (dots): {}", mode.label()),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d((lo..hi).log_scale(), (fastest..slowest).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("offered readings/s (open loop)")
            .y_desc("ms from the scheduled send")
            .draw()?;
        let bound = report.p99_bound_ms;
        chart
            .draw_series(LineSeries::new(
                [(lo, bound), (hi, bound)],
                RED.mix(0.4).stroke_width(1),
            ))?
            .label(format!("bound: p99 < {bound} ms"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.mix(0.4)));
        for (i, target) in report.targets.iter().enumerate() {
            let steps = series(report, &target.name, *mode);
            let p99: Vec<(f64, f64)> = steps
                .iter()
                .filter_map(|s| Some((s.offered, s.p99_ms?.max(fastest))))
                .collect();
            let p50: Vec<(f64, f64)> = steps
                .iter()
                .filter_map(|s| Some((s.offered, s.p50_ms?.max(fastest))))
                .collect();
            if p99.is_empty() {
                continue;
            }
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(p99, color.stroke_width(2)))?
                .label(target.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(p50.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
