//! SVG plots (plotters, SVG backend only): throughput over time and latency CDFs, one series
//! per labelled run so compare mode can overlay its arms.

use std::path::Path;

use plotters::prelude::*;

use crate::error::LoadgenError;
use crate::runner::TimelinePoint;

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn out_err(path: &Path) -> impl Fn(String) -> LoadgenError + '_ {
    move |reason| LoadgenError::Output {
        path: path.to_owned(),
        reason,
    }
}

/// Replies per second (solid) and sends per second (thin) over time, one pair per series.
pub fn throughput_svg(
    path: &Path,
    series: &[(&str, &[TimelinePoint])],
) -> Result<(), LoadgenError> {
    let err = out_err(path);
    let xmax = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.t))
        .fold(1.0f64, f64::max);
    let ymax = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.completed_rps.max(p.sent_rps)))
        .fold(1.0f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Throughput over time", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("time since start (s, warm-up included)")
        .y_desc("requests per second")
        .y_label_formatter(&|v| crate::report::rate(*v))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.t, p.completed_rps)),
                color.stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(format!("{label} replies/s"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.t, p.sent_rps)),
                color.mix(0.4).stroke_width(1),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(format!("{label} sent/s"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.mix(0.4)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Latency CDFs (x: latency in µs, log scale; y: fraction of requests).
pub fn cdf_svg(path: &Path, series: &[(&str, &[(f64, f64)])]) -> Result<(), LoadgenError> {
    let err = out_err(path);
    let pts = || series.iter().flat_map(|(_, s)| s.iter());
    let xmin = pts().map(|p| p.0).fold(f64::INFINITY, f64::min).max(0.1);
    let xmax = pts().map(|p| p.0).fold(1.0f64, f64::max) * 1.2;
    let xmin = if xmin.is_finite() && xmin < xmax {
        xmin * 0.8
    } else {
        0.1
    };
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Latency CDF", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale(), 0f64..1.0)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("latency (µs, log scale)")
        .y_desc("fraction of requests")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|&(x, y)| (x.max(xmin), y)),
                color.stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(label.to_string())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_svgs() {
        let dir = std::env::temp_dir().join(format!("lg-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tl: Vec<TimelinePoint> = (0..50)
            .map(|i| TimelinePoint {
                t: i as f64 * 0.1,
                sent_rps: 1000.0,
                completed_rps: 990.0 + i as f64,
                timeouts_ps: 0.0,
            })
            .collect();
        let p = dir.join("tp.svg");
        throughput_svg(&p, &[("run", &tl)]).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("<svg") && text.contains("polyline"));
        let cdf = vec![(10.0, 0.0), (20.0, 0.5), (100.0, 0.99), (400.0, 1.0)];
        let p = dir.join("cdf.svg");
        cdf_svg(&p, &[("a", &cdf), ("b", &cdf)]).unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().contains("Latency CDF"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
