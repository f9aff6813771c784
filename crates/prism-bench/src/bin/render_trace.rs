//! Draws a prism Chrome trace (`Timeline::write_chrome_trace`) as an SVG
//! timeline: one row per thread of the trace (the GPU's streams, the host's
//! staging copies and waits), one bar per span, in the trace's own order;
//! a multi-GPU trace (one process per GPU) gets each GPU's rows in turn.
//!
//! ```text
//! cargo run --release -p prism-bench --bin render_trace -- TRACE.json OUT.svg
//! ```
//! No GPU needed: it reads the JSON a GPU run wrote.

use std::collections::BTreeMap;
use std::process::ExitCode;

use plotters::prelude::*;

type BoxError = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        eprintln!("usage: render_trace TRACE.json OUT.svg");
        return ExitCode::FAILURE;
    };
    match render(input, output) {
        Ok(n) => {
            println!("render_trace: {n} spans from {input} drawn to {output}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("render_trace: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A row of the picture: (process, sort index, name).
type Row = (i64, i64, String);
/// A thread of the trace: (pid, tid).
type Thread = (i64, i64);

fn render(input: &str, output: &str) -> Result<usize, BoxError> {
    let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(input)?)?;
    let events = trace["traceEvents"]
        .as_array()
        .ok_or("no traceEvents array")?;
    let mut names: BTreeMap<Thread, String> = BTreeMap::new();
    let mut order: BTreeMap<Thread, i64> = BTreeMap::new();
    let mut processes: BTreeMap<i64, String> = BTreeMap::new();
    let mut spans = Vec::new();
    for e in events {
        let tid = (
            e["pid"].as_i64().unwrap_or(1),
            e["tid"].as_i64().unwrap_or(0),
        );
        match (e["ph"].as_str(), e["name"].as_str()) {
            (Some("M"), Some("thread_name")) => {
                names.insert(tid, e["args"]["name"].as_str().unwrap_or("").to_owned());
            }
            (Some("M"), Some("thread_sort_index")) => {
                order.insert(tid, e["args"]["sort_index"].as_i64().unwrap_or(tid.1));
            }
            (Some("M"), Some("process_name")) => {
                let name = e["args"]["name"].as_str().unwrap_or("prism").to_owned();
                processes.insert(tid.0, name);
            }
            (Some("X"), Some(name)) => {
                let start = e["ts"].as_f64().unwrap_or(0.0) / 1000.0;
                let end = start + e["dur"].as_f64().unwrap_or(0.0) / 1000.0;
                spans.push((tid, name.to_owned(), start, end));
            }
            _ => {}
        }
    }
    if spans.is_empty() {
        return Err("the trace has no spans".into());
    }
    // Rows in the trace's sort order; only threads that have spans.
    let several = processes.len() > 1;
    let mut rows: Vec<(Row, Thread)> = names
        .iter()
        .filter(|(tid, _)| spans.iter().any(|s| s.0 == **tid))
        .map(|(tid, name)| {
            let label = match processes.get(&tid.0) {
                Some(p) if several => format!("{}: {name}", p.trim_start_matches("prism on ")),
                _ => name.clone(),
            };
            (
                (tid.0, order.get(tid).copied().unwrap_or(tid.1), label),
                *tid,
            )
        })
        .collect();
    rows.sort();
    let row_of = |tid: Thread| rows.iter().position(|(_, t)| *t == tid);
    let title = if several {
        format!("prism on {} GPUs", processes.len())
    } else {
        processes
            .values()
            .next()
            .cloned()
            .unwrap_or_else(|| "prism".to_owned())
    };
    let t_end = spans.iter().map(|s| s.3).fold(0.0, f64::max);
    let root = SVGBackend::new(output, (1400, 80 + 56 * rows.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title}: {} spans, {t_end:.2} ms", spans.len()),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(if several { 330 } else { 190 })
        .build_cartesian_2d(0f64..t_end, 0f64..rows.len() as f64)?;
    let labels: Vec<String> = rows.iter().map(|((_, _, n), _)| n.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("ms since the run's first upload")
        .y_labels(rows.len() + 1)
        .y_label_formatter(&|y| {
            let i = y.floor() as usize;
            let top = labels.len().saturating_sub(1 + i);
            if (*y - y.floor()).abs() < 1e-9 && i < labels.len() {
                labels[top].clone()
            } else {
                String::new()
            }
        })
        .draw()?;
    let n = rows.len();
    chart.draw_series(spans.iter().filter_map(|(tid, name, start, end)| {
        let row = row_of(*tid)?;
        // First row at the top.
        let y = (n - 1 - row) as f64;
        let colour = if name.contains("wait") {
            RGBColor(200, 60, 60)
        } else if name.contains("staging") {
            RGBColor(230, 150, 30)
        } else if name.contains("upload") || name.contains("download") {
            RGBColor(60, 110, 200)
        } else {
            RGBColor(60, 160, 90)
        };
        Some(Rectangle::new(
            [
                (*start, y + 0.15),
                (end.max(start + t_end * 1e-4), y + 0.85),
            ],
            colour.filled(),
        ))
    }))?;
    root.present()?;
    Ok(spans.len())
}
