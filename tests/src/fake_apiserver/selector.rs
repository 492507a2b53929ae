//! Label and field selectors as kube-apiserver evaluates them, for the forms watchers send.

use serde_json::Value;

/// What a list or watch asked for with `labelSelector` and `fieldSelector`.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    labels: Vec<LabelRequirement>,
    fields: Vec<(String, String)>,
}

#[derive(Clone, Debug)]
enum LabelRequirement {
    Exists(String),
    DoesNotExist(String),
    Equals(String, String),
    NotEquals(String, String),
}

impl Filter {
    /// Parses the equality-based forms (`k`, `!k`, `k=v`, `k==v`, `k!=v`, comma separated)
    /// and `metadata.name` / `metadata.namespace` field selectors. Anything else panics: a
    /// test must not pass because the server misread a selector.
    pub fn parse(label_selector: Option<&str>, field_selector: Option<&str>) -> Self {
        let labels = requirements(label_selector)
            .map(|requirement| {
                assert!(
                    !requirement.contains(['(', ')']),
                    "set-based selector {requirement:?} is not supported by the test server"
                );
                if let Some(key) = requirement.strip_prefix('!') {
                    LabelRequirement::DoesNotExist(key.to_owned())
                } else if let Some((key, value)) = requirement.split_once("!=") {
                    LabelRequirement::NotEquals(key.to_owned(), value.to_owned())
                } else if let Some((key, value)) = requirement
                    .split_once("==")
                    .or_else(|| requirement.split_once('='))
                {
                    LabelRequirement::Equals(key.to_owned(), value.to_owned())
                } else {
                    LabelRequirement::Exists(requirement.to_owned())
                }
            })
            .collect();
        let fields = requirements(field_selector)
            .map(|requirement| {
                let (field, value) = requirement
                    .split_once("==")
                    .or_else(|| requirement.split_once('='))
                    .unwrap_or_else(|| panic!("field selector {requirement:?} is not field=value"));
                assert!(
                    ["metadata.name", "metadata.namespace"].contains(&field),
                    "field {field:?} is not supported by the test server"
                );
                (field.to_owned(), value.to_owned())
            })
            .collect();
        Filter { labels, fields }
    }

    pub fn matches(&self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        let label = |key: &str| metadata["labels"][key].as_str();
        let labels_match = self.labels.iter().all(|requirement| match requirement {
            LabelRequirement::Exists(key) => label(key).is_some(),
            LabelRequirement::DoesNotExist(key) => label(key).is_none(),
            LabelRequirement::Equals(key, value) => label(key) == Some(value.as_str()),
            LabelRequirement::NotEquals(key, value) => label(key) != Some(value.as_str()),
        });
        let fields_match = self.fields.iter().all(|(field, value)| {
            let field = field.strip_prefix("metadata.").expect("checked in parse");
            metadata[field].as_str().unwrap_or_default() == value
        });
        labels_match && fields_match
    }
}

fn requirements(selector: Option<&str>) -> impl Iterator<Item = &str> {
    selector
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|requirement| !requirement.is_empty())
}
