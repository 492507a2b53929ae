//! Summaries of repeated measurements, and the random numbers that pick targets.

/// One measurement repeated over runs: the median run and the range of all runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// The summary of `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Self {
            median: median_of_sorted(&sorted)?,
            min: *sorted.first()?,
            max: *sorted.last()?,
        })
    }

    /// `median (min–max)` with `decimals` digits after the point.
    pub fn display(&self, decimals: usize) -> String {
        format!(
            "{:.decimals$} ({:.decimals$}–{:.decimals$})",
            self.median, self.min, self.max
        )
    }
}

/// The median of already sorted values (the mean of the middle two for an even count).
pub fn median_of_sorted(sorted: &[f64]) -> Option<f64> {
    let middle = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        len if len % 2 == 1 => Some(sorted[middle]),
        _ => Some((sorted[middle - 1] + sorted[middle]) / 2.0),
    }
}

/// The median of unsorted values.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    median_of_sorted(&sorted)
}

/// The nearest-rank percentile `p` (0–100) of already sorted values.
pub fn percentile_of_sorted(sorted: &[f64], p: f64) -> Option<f64> {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

/// The seedable generator the lab's load generator uses too.
pub use proxy_lab::Rng;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_take_the_middle_and_the_range() {
        let summary = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((summary.median, summary.min, summary.max), (3.0, 1.0, 5.0));
        assert_eq!(Summary::of(&[4.0, 2.0]).unwrap().median, 3.0);
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(summary.display(1), "3.0 (1.0–5.0)");
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile_of_sorted(&sorted, 50.0), Some(50.0));
        assert_eq!(percentile_of_sorted(&sorted, 99.0), Some(99.0));
        assert_eq!(percentile_of_sorted(&sorted, 100.0), Some(100.0));
        assert_eq!(percentile_of_sorted(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile_of_sorted(&[], 50.0), None);
    }
}
