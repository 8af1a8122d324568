//! Where each key of a section is written, so that a problem found after parsing points at the
//! key's line and column, not at the section's header.

use std::collections::HashMap;
use std::ops::Range;

use toml::Spanned;
use toml::de::DeValue;

/// The positions of one section's keys: `client_id`, `tls.cert_file`, `token.0.sha256`.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    /// The section's header (or the start of the file when the section is not written).
    header: Range<usize>,
    spans: HashMap<String, Range<usize>>,
}

impl Keys {
    /// The keys of `value`, the section whose header is at `header`.
    pub fn of(header: Range<usize>, value: &Spanned<DeValue<'_>>) -> Self {
        let mut keys = Self {
            header,
            spans: HashMap::new(),
        };
        keys.walk("", value);
        keys
    }

    /// A section that is not written: every key points at `at`.
    pub fn absent(at: Range<usize>) -> Self {
        Self {
            header: at,
            spans: HashMap::new(),
        }
    }

    fn walk(&mut self, prefix: &str, value: &Spanned<DeValue<'_>>) {
        match value.get_ref() {
            DeValue::Table(table) => {
                for (key, value) in table {
                    let path = format!("{prefix}{}", key.get_ref());
                    self.spans.insert(path.clone(), key.span());
                    self.walk(&format!("{path}."), value);
                }
            }
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let path = format!("{prefix}{i}");
                    self.spans.insert(path.clone(), item.span());
                    self.walk(&format!("{path}."), item);
                }
            }
            _ => {}
        }
    }

    /// Where `key` is written; the nearest enclosing key that is, or the section's header.
    pub fn at(&self, key: &str) -> Range<usize> {
        let mut path = key;
        loop {
            if let Some(span) = self.spans.get(path) {
                return span.clone();
            }
            match path.rfind('.') {
                Some(dot) => path = &path[..dot],
                None => return self.header.clone(),
            }
        }
    }

    /// Where the first of `keys` that is written is; else as [`Keys::at`] for the first.
    pub fn written(&self, keys: &[&str]) -> Range<usize> {
        keys.iter()
            .find_map(|k| self.spans.get(*k).cloned())
            .unwrap_or_else(|| self.at(keys.first().copied().unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_nested_and_in_arrays_and_fall_back_to_the_header() {
        let src =
            "[grpc]\nlisten = \"x\"\n[grpc.tls]\ncert_file = \"c\"\n[[grpc.token]]\nname = \"a\"\n";
        let doc = hubgate_privacy::diagnostics::parse_document(src).unwrap();
        let (key, value) = doc.into_iter().next().unwrap();
        let keys = Keys::of(key.span(), &value);
        let at = |k: &str| &src[keys.at(k)];
        assert_eq!(at("listen"), "listen");
        assert_eq!(at("tls.cert_file"), "cert_file");
        assert_eq!(at("token.0.name"), "name");
        assert_eq!(
            at("tls.key_file"),
            "tls",
            "an absent key points at its table"
        );
        assert_eq!(at("max_subscribers"), "grpc", "or at the section");
    }
}
