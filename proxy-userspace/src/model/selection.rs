//! How a frontend chooses a new flow's backend: at random (kube-proxy's `statistic`
//! chain, the default) or by Maglev consistent hashing, which every node computes alike
//! (see `plan::maglev`). The node's flags set the default (`--lb-algorithm`,
//! `--maglev-table-size`); a Service's annotations choose its own.

use std::fmt;
use std::str::FromStr;

use proxy_common::maglev::{DEFAULT_TABLE_SIZE, TABLE_SIZES, valid_table_size};

use super::{Problem, ProblemKind};

/// `ebpf-proxy.io/lb-algorithm: random | maglev`.
pub const ALGORITHM_ANNOTATION: &str = "ebpf-proxy.io/lb-algorithm";
/// `ebpf-proxy.io/maglev-table-size: <prime>`.
pub const TABLE_SIZE_ANNOTATION: &str = "ebpf-proxy.io/maglev-table-size";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Random,
    Maglev,
}

impl Algorithm {
    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::Maglev => "maglev",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Algorithm {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "random" => Ok(Algorithm::Random),
            "maglev" => Ok(Algorithm::Maglev),
            other => Err(format!("{other:?} is no algorithm: random or maglev")),
        }
    }
}

/// A Maglev table size: one of the listed primes (`--maglev-table-size`, the annotation).
pub fn parse_table_size(text: &str) -> Result<u32, String> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|&size| valid_table_size(size))
        .ok_or_else(|| format!("{text:?} is no Maglev table size: one of {TABLE_SIZES:?}"))
}

/// A frontend's selection, as the datapath gets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Selection {
    Random,
    Maglev { table_size: u32 },
}

impl Selection {
    pub const fn algorithm(self) -> Algorithm {
        match self {
            Selection::Random => Algorithm::Random,
            Selection::Maglev { .. } => Algorithm::Maglev,
        }
    }
}

/// The node's defaults (its flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectionDefaults {
    pub algorithm: Algorithm,
    pub table_size: u32,
}

impl Default for SelectionDefaults {
    /// kube-proxy's random choice; a table of [`DEFAULT_TABLE_SIZE`] when Maglev is asked for.
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Random,
            table_size: DEFAULT_TABLE_SIZE,
        }
    }
}

/// What a Service's annotations ask for; what they leave unset the node's flags decide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelectionRequest {
    pub algorithm: Option<Algorithm>,
    pub table_size: Option<u32>,
}

impl SelectionRequest {
    /// Reads the annotations; an invalid value is reported (as a skipped field of `key`)
    /// and left to the node's default.
    pub fn from_annotations(
        key: &super::ObjectKey,
        annotation: impl Fn(&str) -> Option<String>,
        problems: &mut Vec<Problem>,
    ) -> Self {
        let mut read = |name: &str, parse: &dyn Fn(&str) -> Result<(), String>| {
            let value = annotation(name)?;
            match parse(&value) {
                Ok(()) => Some(value),
                Err(reason) => {
                    problems.push(Problem::new(
                        ProblemKind::Service,
                        "skipped_field",
                        format!("{key}: annotation {name}: {reason}; the node's default applies"),
                    ));
                    None
                }
            }
        };
        let algorithm = read(ALGORITHM_ANNOTATION, &|value| {
            value.parse::<Algorithm>().map(drop)
        });
        let table_size = read(TABLE_SIZE_ANNOTATION, &|value| {
            parse_table_size(value).map(drop)
        });
        Self {
            algorithm: algorithm.and_then(|value| value.parse().ok()),
            table_size: table_size.and_then(|value| parse_table_size(&value).ok()),
        }
    }

    /// The selection this request and the node's `defaults` give an external frontend.
    pub fn resolve(self, defaults: SelectionDefaults) -> Selection {
        match self.algorithm.unwrap_or(defaults.algorithm) {
            Algorithm::Random => Selection::Random,
            Algorithm::Maglev => Selection::Maglev {
                table_size: self.table_size.unwrap_or(defaults.table_size),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectKey;

    fn request(pairs: &[(&str, &str)]) -> (SelectionRequest, Vec<Problem>) {
        let mut problems = Vec::new();
        let request = SelectionRequest::from_annotations(
            &ObjectKey::new("default", "web"),
            |name| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| (*value).to_owned())
            },
            &mut problems,
        );
        (request, problems)
    }

    #[test]
    fn annotations_choose_and_the_node_fills_in() {
        let defaults = SelectionDefaults::default();
        let maglev = SelectionDefaults {
            algorithm: Algorithm::Maglev,
            table_size: 4093,
        };
        let (none, problems) = request(&[]);
        assert!(problems.is_empty());
        assert_eq!(none.resolve(defaults), Selection::Random);
        assert_eq!(none.resolve(maglev), Selection::Maglev { table_size: 4093 });

        let (asked, _) = request(&[(ALGORITHM_ANNOTATION, "maglev")]);
        assert_eq!(
            asked.resolve(defaults),
            Selection::Maglev {
                table_size: DEFAULT_TABLE_SIZE
            }
        );
        let (sized, _) = request(&[
            (ALGORITHM_ANNOTATION, "maglev"),
            (TABLE_SIZE_ANNOTATION, "1021"),
        ]);
        assert_eq!(
            sized.resolve(defaults),
            Selection::Maglev { table_size: 1021 }
        );
        let (random, _) = request(&[(ALGORITHM_ANNOTATION, "random")]);
        assert_eq!(random.resolve(maglev), Selection::Random);
    }

    #[test]
    fn invalid_annotations_are_reported_and_left_to_the_node() {
        let (request, problems) = request(&[
            (ALGORITHM_ANNOTATION, "round-robin"),
            (TABLE_SIZE_ANNOTATION, "16384"),
        ]);
        assert_eq!(request, SelectionRequest::default());
        assert_eq!(problems.len(), 2);
        assert!(
            problems[0]
                .message
                .contains("\"round-robin\" is no algorithm"),
            "{problems:?}"
        );
        assert!(
            problems[1].message.contains("one of [251, 509, 1021,"),
            "{problems:?}"
        );
    }

    #[test]
    fn table_sizes_parse_only_as_primes() {
        assert_eq!(parse_table_size("16381"), Ok(16_381));
        assert_eq!(parse_table_size(" 251 "), Ok(251));
        for bad in ["16384", "0", "x", "131101", "-1", "1031"] {
            assert!(parse_table_size(bad).is_err(), "{bad}");
        }
    }
}
