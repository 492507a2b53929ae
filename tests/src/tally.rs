//! Counting which backend served each request, and testing that the spread is uniform.

use std::collections::BTreeMap;
use std::fmt;

/// Critical values of the chi-square distribution at p = 0.001, for 1..=5 degrees of
/// freedom: a uniform selector exceeds them in one run out of a thousand.
pub const CHI_SQUARE_CRITICAL_P001: [f64; 5] = [10.828, 13.816, 16.266, 18.467, 20.515];

/// Requests per backend name, over a fixed set of expected backends (so a backend that
/// never answered counts as 0), plus anything unexpected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tally {
    counts: BTreeMap<String, u64>,
    expected: Vec<String>,
}

impl Tally {
    /// A tally over `expected` backend names.
    pub fn new<S: AsRef<str>>(expected: impl IntoIterator<Item = S>) -> Self {
        let expected: Vec<String> = expected
            .into_iter()
            .map(|name| name.as_ref().to_owned())
            .collect();
        let counts = expected.iter().map(|name| (name.clone(), 0)).collect();
        Self { counts, expected }
    }

    pub fn record(&mut self, backend: &str) {
        *self.counts.entry(backend.to_owned()).or_default() += 1;
    }

    pub fn count(&self, backend: &str) -> u64 {
        self.counts.get(backend).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Names that answered but were not expected.
    pub fn unexpected(&self) -> Vec<&str> {
        self.counts
            .keys()
            .filter(|name| !self.expected.contains(name))
            .map(String::as_str)
            .collect()
    }

    /// Pearson's chi-square statistic of the expected backends' counts against a uniform
    /// spread; compare with [`Tally::chi_square_critical`].
    pub fn chi_square(&self) -> f64 {
        let observed: Vec<f64> = self
            .expected
            .iter()
            .map(|name| self.count(name) as f64)
            .collect();
        let mean = observed.iter().sum::<f64>() / observed.len() as f64;
        if mean == 0.0 {
            return 0.0;
        }
        observed.iter().map(|o| (o - mean).powi(2) / mean).sum()
    }

    /// The p = 0.001 critical value for this tally's degrees of freedom (backends − 1).
    pub fn chi_square_critical(&self) -> f64 {
        let degrees_of_freedom = self.expected.len().saturating_sub(1);
        assert!(
            (1..=CHI_SQUARE_CRITICAL_P001.len()).contains(&degrees_of_freedom),
            "chi-square table covers 2..=6 backends, not {}",
            self.expected.len()
        );
        CHI_SQUARE_CRITICAL_P001[degrees_of_freedom - 1]
    }

    /// True when a uniform spread is not rejected at p = 0.001.
    pub fn looks_uniform(&self) -> bool {
        self.chi_square() < self.chi_square_critical()
    }
}

/// One line per backend: name, count, share.
impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.total().max(1) as f64;
        for (name, count) in &self.counts {
            writeln!(
                f,
                "  {name:<12} {count:>6}  {:>5.1}%",
                100.0 * *count as f64 / total
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(counts: &[(&str, u64)]) -> Tally {
        let mut tally = Tally::new(counts.iter().map(|(name, _)| *name));
        for (name, count) in counts {
            for _ in 0..*count {
                tally.record(name);
            }
        }
        tally
    }

    #[test]
    fn even_spread_is_uniform() {
        let even = tally(&[("pod-1", 200), ("pod-2", 200), ("pod-3", 200)]);
        assert_eq!(even.chi_square(), 0.0);
        assert!(even.looks_uniform());
    }

    #[test]
    fn chi_square_matches_hand_computation() {
        // expected 200 each: (30² + 10² + 40²) / 200 = 13.0, just under 13.816.
        let skewed = tally(&[("pod-1", 230), ("pod-2", 210), ("pod-3", 160)]);
        assert!((skewed.chi_square() - 13.0).abs() < 1e-9);
        assert!(skewed.looks_uniform());
        let worse = tally(&[("pod-1", 240), ("pod-2", 210), ("pod-3", 150)]);
        assert!(!worse.looks_uniform(), "chi² = {}", worse.chi_square());
    }

    #[test]
    fn silent_and_unexpected_backends_are_visible() {
        let mut partial = Tally::new(["pod-1", "pod-2"]);
        partial.record("pod-1");
        partial.record("pod-9");
        assert_eq!(partial.count("pod-2"), 0);
        assert_eq!(partial.unexpected(), ["pod-9"]);
        assert_eq!(partial.total(), 2);
    }
}
