//! The bench's figures: medians over rounds, ratios to direct in the same round, the markdown
//! table and the chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use plotters::prelude::*;

use super::load::{Kind, Outcome};

/// What carries the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    Direct,
    Iptables,
    Nftables,
    Ours,
    OursWithoutFastPath,
}

impl Mode {
    /// One round's order.
    pub const ALL: [Mode; 5] = [
        Mode::Direct,
        Mode::Iptables,
        Mode::Nftables,
        Mode::Ours,
        Mode::OursWithoutFastPath,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct (no proxy)",
            Mode::Iptables => "kube-proxy iptables",
            Mode::Nftables => "kube-proxy nftables",
            Mode::Ours => "ours",
            Mode::OursWithoutFastPath => "ours, --fast-path off",
        }
    }
}

/// Where the backend is: 0 on the client's node, 1 on the other node.
pub type Placement = u8;

/// One figure of one mode in one round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    Rate(Kind, Placement),
    P50(Kind, Placement),
    P99(Kind, Placement),
    ProgramNs,
    ColdStart,
    RssMib,
    MapMib,
    Failed,
}

/// The rows of a table, in order.
const LOADS: [(Kind, Placement); 5] = [
    (Kind::TcpCrr, 0),
    (Kind::TcpRr, 0),
    (Kind::TcpCrr, 1),
    (Kind::TcpRr, 1),
    (Kind::UdpRr, 0),
];

fn load_label(kind: Kind, placement: Placement) -> String {
    let name = match kind {
        Kind::TcpCrr => "TCP_CRR",
        Kind::TcpRr => "TCP_RR",
        Kind::UdpRr => "UDP_RR",
    };
    let place = if placement == 0 {
        "backend on the same node"
    } else {
        "backend on another node"
    };
    format!("{name}, {place}")
}

/// A change whose first connection did not come within the bound.
const NOT_APPLIED: Duration = Duration::MAX;

#[derive(Default)]
pub struct Results {
    /// (Services, mode, metric) → (round, value).
    values: BTreeMap<(usize, Mode, Metric), Vec<(usize, f64)>>,
    /// (Services, mode) → each change's time to the first connection ([`NOT_APPLIED`]: not
    /// within the bound).
    changes: BTreeMap<(usize, Mode), Vec<Duration>>,
}

/// Where one mode's figures of one round go.
pub struct Round<'a> {
    results: &'a mut Results,
    services: usize,
    index: usize,
    mode: Mode,
}

impl Results {
    pub fn round(&mut self, services: usize, round: usize, mode: Mode) -> Round<'_> {
        Round {
            results: self,
            services,
            index: round,
            mode,
        }
    }

    fn median(&self, services: usize, mode: Mode, metric: Metric) -> Option<f64> {
        let values: Vec<f64> = self
            .values
            .get(&(services, mode, metric))?
            .iter()
            .map(|(_, v)| *v)
            .collect();
        median(values)
    }

    /// The median over rounds of this mode's value divided by direct's in the same round.
    fn ratio(&self, services: usize, mode: Mode, metric: Metric) -> Option<f64> {
        let direct = self.values.get(&(services, Mode::Direct, metric))?;
        let ratios = self
            .values
            .get(&(services, mode, metric))?
            .iter()
            .filter_map(|(round, v)| {
                let (_, d) = direct.iter().find(|(r, _)| r == round)?;
                (*d > 0.0).then(|| v / d)
            })
            .collect();
        median(ratios)
    }

    fn service_counts(&self) -> Vec<usize> {
        let mut counts: Vec<usize> = self.values.keys().map(|(n, _, _)| *n).collect();
        counts.dedup();
        counts
    }

    /// The `q` percentile of the changes' times ([`NOT_APPLIED`] sorts last).
    fn change_percentile(&self, services: usize, mode: Mode, q: f64) -> Option<Duration> {
        let mut samples = self.changes.get(&(services, mode))?.clone();
        samples.sort();
        percentile(&samples, q).copied()
    }
}

impl Round<'_> {
    pub fn put(&mut self, metric: Metric, value: f64) {
        self.results
            .values
            .entry((self.services, self.mode, metric))
            .or_default()
            .push((self.index, value));
    }

    pub fn put_load(&mut self, kind: Kind, placement: Placement, outcome: &Outcome) {
        let mut latencies = outcome.latencies.clone();
        latencies.sort();
        self.put(Metric::Rate(kind, placement), outcome.rate());
        // No latency when every transaction failed (the failed row says so).
        for (metric, q) in [
            (Metric::P50(kind, placement), 0.50),
            (Metric::P99(kind, placement), 0.99),
        ] {
            if let Some(latency) = percentile(&latencies, q) {
                self.put(metric, latency.as_secs_f64() * 1e6);
            }
        }
        // Counts stay far below 2^52.
        #[allow(clippy::cast_precision_loss)]
        let failed = outcome.failures as f64;
        let key = (self.services, self.mode, Metric::Failed);
        let rounds = self.results.values.entry(key).or_default();
        match rounds.iter_mut().find(|(r, _)| *r == self.index) {
            Some((_, total)) => *total += failed,
            None => rounds.push((self.index, failed)),
        }
    }

    pub fn put_change(&mut self, took: Option<Duration>) {
        self.results
            .changes
            .entry((self.services, self.mode))
            .or_default()
            .push(took.unwrap_or(NOT_APPLIED));
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    percentile(&values, 0.5).copied()
}

/// Nearest-rank percentile of sorted `values`.
fn percentile<T>(values: &[T], q: f64) -> Option<&T> {
    if values.is_empty() {
        return None;
    }
    // Lengths stay far below 2^52; the rank is within 1..=len.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values.get(rank - 1)
}

/// A row: its label, the metric, and how a value is written.
type Row = (String, Metric, fn(f64) -> String);

fn rows() -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for (kind, placement) in LOADS {
        let label = load_label(kind, placement);
        let unit = if kind == Kind::TcpCrr {
            "conn/s"
        } else {
            "trans/s"
        };
        rows.push((
            format!("{label}: {unit}"),
            Metric::Rate(kind, placement),
            |v| format!("{v:.0}"),
        ));
        rows.push((
            format!("{label}: p50"),
            Metric::P50(kind, placement),
            micros,
        ));
        rows.push((
            format!("{label}: p99"),
            Metric::P99(kind, placement),
            micros,
        ));
    }
    rows.push((
        "tc program cost per packet (bpf_stats run_time_ns / run_cnt)".to_owned(),
        Metric::ProgramNs,
        |v| format!("{v:.0} ns"),
    ));
    rows.push((
        "cold start to first connection".to_owned(),
        Metric::ColdStart,
        |v| format!("{v:.0} ms"),
    ));
    rows.push(("RSS".to_owned(), Metric::RssMib, mib));
    rows.push(("BPF map memory".to_owned(), Metric::MapMib, mib));
    rows.push(("failed transactions".to_owned(), Metric::Failed, |v| {
        format!("{v:.0}")
    }));
    rows
}

fn micros(v: f64) -> String {
    format!("{v:.0} µs")
}

fn mib(v: f64) -> String {
    format!("{v:.1} MiB")
}

fn change_cell(took: Option<Duration>) -> String {
    match took {
        None => "–".to_owned(),
        Some(NOT_APPLIED) => format!("> {} s", super::CHANGE_BOUND.as_secs()),
        Some(d) => format!("{:.1} ms", d.as_secs_f64() * 1e3),
    }
}

/// The markdown report: one table per Service count.
pub fn markdown(results: &Results, command: &str, took: Duration) -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let date = jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC");
    let mut text = format!(
        "`{command}` ({date}, Linux {}, {cpus} CPUs, {:.1} min)\n\n",
        kernel.trim(),
        took.as_secs_f64() / 60.0
    );
    text.push_str(
        "Each cell: the median over the interleaved rounds and, in parentheses, the median ratio \
         to direct in the same round (rates: higher is better; latencies: lower is better). One \
         stream at a time (netperf-style, 1-byte messages) from a client pod on node1 to a \
         ClusterIP whose backend pod is on node1 or node2; the two measured Services sit in the \
         middle of the Service list. Changes: a new Service (file, iptables-restore --noflush, \
         nft -f) until its first connection, polled with a 20 ms connect timeout, pooled over \
         the rounds (n: how many; at most 30 s of changes per mode and round); ours runs with \
         `--iptables-min-sync-period 0s`, as the kube-proxy modes apply their rules without kube-proxy's \
         pacing (its default 1 s would hold a change that follows another within a second). The netfilter \
         rulesets are loaded once per Service count (their cold start) and made dormant while \
         the other modes run. The machine is shared by other developers: the absolute numbers are noisy, \
         compare the ratios within one run.\n",
    );
    for services in results.service_counts() {
        let _ = write!(text, "\n### {services} Services\n\n| figure |");
        for mode in Mode::ALL {
            let _ = write!(text, " {} |", mode.label());
        }
        text.push_str("\n|---|");
        text.push_str(&"---|".repeat(Mode::ALL.len()));
        text.push('\n');
        for (label, metric, format) in rows() {
            if Mode::ALL
                .iter()
                .all(|m| results.median(services, *m, metric).is_none())
            {
                continue;
            }
            let _ = write!(text, "| {label} |");
            for mode in Mode::ALL {
                let cell = match results.median(services, mode, metric) {
                    None => "–".to_owned(),
                    Some(v) => match results.ratio(services, mode, metric) {
                        Some(r) if mode != Mode::Direct && !matches!(metric, Metric::Failed) => {
                            format!("{} ({r:.2}×)", format(v))
                        }
                        _ => format(v),
                    },
                };
                let _ = write!(text, " {cell} |");
            }
            text.push('\n');
        }
        for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
            let _ = write!(text, "| one Service added → first connection, {label} |");
            for mode in Mode::ALL {
                let mut cell = change_cell(results.change_percentile(services, mode, q));
                if let Some(samples) = results.changes.get(&(services, mode)) {
                    let _ = write!(cell, " (n {})", samples.len());
                }
                let _ = write!(text, " {cell} |");
            }
            text.push('\n');
        }
    }
    text
}

/// A chart panel: its title and the value of a mode at a Service count.
type Panel<'a> = (&'a str, Box<dyn Fn(usize, Mode) -> Option<f64> + 'a>);

/// A 2×2 PNG: TCP_CRR and TCP_RR rates as ratios to direct (backend on the same node), cold
/// start, and the p99 of a change to the first connection, against the Service count.
pub fn chart(results: &Results, path: &Path) -> anyhow::Result<()> {
    let counts = results.service_counts();
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 2));
    let change_p99 = |n: usize, mode: Mode| {
        results
            .change_percentile(n, mode, 0.99)
            .map(|d| d.min(super::CHANGE_BOUND).as_secs_f64() * 1e3)
    };
    let series: [Panel<'_>; 4] = [
        (
            "TCP_CRR rate / direct (same node)",
            Box::new(|n, m| results.ratio(n, m, Metric::Rate(Kind::TcpCrr, 0))),
        ),
        (
            "TCP_RR rate / direct (same node)",
            Box::new(|n, m| results.ratio(n, m, Metric::Rate(Kind::TcpRr, 0))),
        ),
        (
            "cold start to first connection (ms)",
            Box::new(|n, m| results.median(n, m, Metric::ColdStart)),
        ),
        (
            "one change → first connection p99 (ms)",
            Box::new(change_p99),
        ),
    ];
    for (panel, (title, value)) in panels.iter().zip(series.iter()) {
        let points: Vec<(Mode, Vec<(usize, f64)>)> = Mode::ALL
            .iter()
            .map(|mode| {
                let line = counts
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| Some((i, value(*n, *mode)?)))
                    .collect();
                (*mode, line)
            })
            .collect();
        let top = points
            .iter()
            .flat_map(|(_, line)| line.iter().map(|(_, v)| *v))
            .fold(0.0_f64, f64::max)
            * 1.15;
        // Few Service counts: exact as f64.
        #[allow(clippy::cast_precision_loss)]
        let right = counts.len() as f64 - 0.5;
        let mut chart = ChartBuilder::on(panel)
            .caption(*title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5_f64..right, 0.0..top.max(1e-3))?;
        chart
            .configure_mesh()
            .x_labels(counts.len())
            .x_label_formatter(&|x| {
                // Only whole positions name a Service count.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let i = x.round() as usize;
                if (x - x.round()).abs() < 1e-6 {
                    counts
                        .get(i)
                        .map_or(String::new(), |n| format!("{n} Services"))
                } else {
                    String::new()
                }
            })
            .draw()?;
        for (i, (mode, line)) in points.iter().enumerate() {
            if line.is_empty() {
                continue;
            }
            let color = Palette99::pick(i).to_rgba();
            #[allow(clippy::cast_precision_loss)]
            let line: Vec<(f64, f64)> = line.iter().map(|(x, y)| (*x as f64, *y)).collect();
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
                .label(mode.label())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(line.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()
        .with_context(|| format!("writing the chart {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_pair_each_round_with_direct_in_the_same_round() {
        let mut results = Results::default();
        let metric = Metric::Rate(Kind::TcpCrr, 0);
        for (round, direct, ours) in [(0, 100.0, 50.0), (1, 200.0, 180.0), (2, 100.0, 80.0)] {
            results.round(10, round, Mode::Direct).put(metric, direct);
            results.round(10, round, Mode::Ours).put(metric, ours);
        }
        assert_eq!(results.median(10, Mode::Ours, metric), Some(80.0));
        // Ratios 0.5, 0.9, 0.8: median 0.8 (not 80 / 100).
        assert_eq!(results.ratio(10, Mode::Ours, metric), Some(0.8));
        let table = markdown(&results, "cargo xtask bench", Duration::from_mins(1));
        assert!(
            table.contains("| TCP_CRR, backend on the same node: conn/s | 100 |"),
            "{table}"
        );
        assert!(table.contains("80 (0.80×)"), "{table}");
    }

    #[test]
    fn percentiles_are_nearest_rank_and_a_missed_change_sorts_last() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.5), Some(&50));
        assert_eq!(percentile(&values, 0.99), Some(&99));
        let mut results = Results::default();
        let mut round = results.round(10, 0, Mode::Ours);
        round.put_change(None);
        round.put_change(Some(Duration::from_millis(3)));
        assert_eq!(
            results.change_percentile(10, Mode::Ours, 0.5),
            Some(Duration::from_millis(3))
        );
        assert_eq!(
            results.change_percentile(10, Mode::Ours, 0.99),
            Some(NOT_APPLIED)
        );
    }
}
