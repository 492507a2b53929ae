//! The chart of cost against the number of Services: per-packet cost in the kernel on
//! the left, connect latency end to end on the right, both on a logarithmic Services axis.
//! Text is drawn with ab_glyph from DejaVu Sans (Debian's fonts-dejavu-core, installed by
//! `cargo xtask setup`), so no fontconfig is needed.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::connections::{ConnectionResult, VARIANTS};
use crate::packet::PacketCosts;

const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT: &str = "sans-serif";
const COLORS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

/// One line of a panel: a label and (Services, value) points.
struct Line {
    label: String,
    points: Vec<(f64, f64)>,
}

pub fn draw(path: &Path, packet: &[PacketCosts], connections: &[ConnectionResult]) -> Result<()> {
    let font = std::fs::read(FONT_FILE)
        .with_context(|| format!("reading {FONT_FILE} (`cargo xtask setup` installs it)"))?;
    plotters::style::register_font(FONT, FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow!("{FONT_FILE} is not a usable font"))?;

    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let per_packet = [
        (
            "new flow, random Service",
            packet.iter().map(|c| c.new_flow.median).collect::<Vec<_>>(),
        ),
        (
            "new flow, one Service",
            packet
                .iter()
                .map(|c| c.new_flow_one_service.median)
                .collect(),
        ),
        (
            "established",
            packet.iter().map(|c| c.established.median).collect(),
        ),
        (
            "pass-through",
            packet.iter().map(|c| c.pass_through.median).collect(),
        ),
    ]
    .map(|(label, values)| Line {
        label: label.to_owned(),
        points: packet
            .iter()
            .map(|c| c.services as f64)
            .zip(values)
            .collect(),
    });
    panel(
        &left,
        "Per-packet cost in the kernel (ebpf-proxy)",
        "ns per packet",
        &per_packet,
    )?;
    let latency = VARIANTS.map(|variant| Line {
        label: variant.label().to_owned(),
        points: connections
            .iter()
            .filter(|result| result.variant == variant)
            .map(|result| (result.services as f64, result.p50_us.median))
            .collect(),
    });
    panel(
        &right,
        "New TCP connection through a ClusterIP",
        "p50 connect latency (µs)",
        &latency,
    )?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    y_description: &str,
    lines: &[Line],
) -> Result<()> {
    let points = || lines.iter().flat_map(|line| &line.points);
    let max_services = points().map(|(x, _)| *x).fold(10.0, f64::max);
    let max_value = points().map(|(_, y)| *y).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((1.0..max_services * 2.0).log_scale(), 0.0..max_value * 1.2)?;
    chart
        .configure_mesh()
        .x_desc("Services (10 endpoints each), log scale")
        .y_desc(y_description)
        .x_label_formatter(&|services| format!("{services:.0}"))
        .y_label_formatter(&|value| format!("{value:.0}"))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;
    for (line, color) in lines.iter().zip(COLORS) {
        chart
            .draw_series(LineSeries::new(line.points.clone(), color.stroke_width(2)).point_size(4))?
            .label(&line.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
