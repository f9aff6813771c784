//! The SVG bar chart of a benchmark run (plotters).

use plotters::prelude::*;

/// One bar group per workload, one bar per implementation: bound / measured.
pub fn write_svg(
    path: &str,
    workloads: &[String],
    impls: &[String],
    efficiency: &[Vec<Option<f64>>],
) -> Result<(), String> {
    let root = SVGBackend::new(path, (160 + 200 * workloads.len() as u32, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let ymax = efficiency
        .iter()
        .flatten()
        .flatten()
        .fold(1.1f64, |m, v| m.max(*v * 1.1));
    let groups = workloads.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "prism benchmark: bound / measured time (1.0 = at the hardware bound)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(10)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..groups, 0f64..ymax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("bound / measured")
        .draw()
        .map_err(|e| e.to_string())?;
    // Workload names above each group (numeric x labels would not line up with the groups).
    chart
        .draw_series(workloads.iter().enumerate().map(|(w, name)| {
            Text::new(
                name.clone(),
                (w as f64 + 0.4, ymax * 0.96),
                ("sans-serif", 16).into_font(),
            )
        }))
        .map_err(|e| e.to_string())?;
    let width = 0.8 / impls.len().max(1) as f64;
    for (k, name) in impls.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let points: Vec<(usize, f64)> = efficiency
            .iter()
            .enumerate()
            .filter_map(|(w, row)| row.get(k).copied().flatten().map(|v| (w, v)))
            .collect();
        let x0 = |w: usize| w as f64 + 0.1 + k as f64 * width;
        chart
            .draw_series(points.iter().map(|&(w, v)| {
                Text::new(
                    format!("{v:.2}"),
                    (x0(w), v + ymax * 0.03),
                    ("sans-serif", 11).into_font(),
                )
            }))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(points.iter().map(|&(w, v)| {
                Rectangle::new([(x0(w), 0.0), (x0(w) + width * 0.9, v)], color.filled())
            }))
            .map_err(|e| e.to_string())?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn chart_renders_to_svg() {
        let path = std::env::temp_dir().join("prism-bench-chart-test.svg");
        let p = path.to_str().unwrap();
        super::write_svg(
            p,
            &["S1".into(), "S3".into()],
            &["a".into(), "b".into()],
            &[vec![Some(0.9), Some(0.5)], vec![None, Some(1.2)]],
        )
        .unwrap();
        let svg = std::fs::read_to_string(p).unwrap();
        assert!(
            svg.contains("<svg")
                && svg.contains("<rect")
                && svg.contains("S3")
                && svg.contains("1.20"),
            "{svg}"
        );
    }
}
