//! What the start-up benchmarks share: the run count and the summary line.

use std::time::Duration;

/// `BENCH_RUNS`, else `default`.
pub fn runs(default: usize) -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

/// Prints the median and the 10th and 90th percentiles of `samples`; returns the median in ms.
pub fn report(name: &str, mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    let median = percentile(&samples, 0.5);
    println!(
        "{name:<34} median {median:7.2} ms   p10 {:7.2} ms   p90 {:7.2} ms   ({} runs)",
        percentile(&samples, 0.1),
        percentile(&samples, 0.9),
        samples.len()
    );
    median
}
