//! Errors and warnings about a configuration file, each with its line and column.
//!
//! Configuration is parsed in two steps: TOML into plain serde types (which reports syntax errors,
//! unknown fields and wrong types), then validation into runtime types (which reports semantic
//! errors). Both steps collect every problem they can find instead of stopping at the first, and
//! each problem keeps the byte span it refers to, so `hubgate check` can point at it.

use std::fmt;
use std::ops::Range;

use serde::de::{DeserializeOwned, IntoDeserializer};
use toml::Spanned;
use toml::de::DeValue;

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The configuration is accepted, but a setting is weak or suspicious.
    Warning,
    /// The configuration is rejected.
    Error,
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Byte range in the source the problem refers to (empty when unknown).
    pub span: Range<usize>,
    pub message: String,
}

impl Diagnostic {
    pub fn error(span: Range<usize>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            span,
            message: message.into(),
        }
    }

    pub fn warning(span: Range<usize>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            span,
            message: message.into(),
        }
    }

    /// Builds a diagnostic from a TOML parse or deserialisation error.
    pub fn from_toml(err: &toml::de::Error, fallback: Range<usize>) -> Self {
        // serde quotes names with backticks; operators read single quotes more easily.
        let message = err.message().trim().replace('`', "'");
        Self::error(err.span().unwrap_or(fallback), message)
    }

    /// Line and column (both 1-based, column in characters) of the start of the span.
    pub fn position(&self, source: &str) -> (usize, usize) {
        line_column(source, self.span.start)
    }

    /// Renders as `FILE:LINE:COLUMN: error: MESSAGE`.
    pub fn render(&self, file: &str, source: &str) -> String {
        let (line, column) = self.position(source);
        format!(
            "{file}:{line}:{column}: {}: {}",
            self.severity, self.message
        )
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// Line and column (1-based; column counted in characters) of a byte offset in `source`.
pub fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// A list of problems found so far.
#[derive(Debug, Default, Clone)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.0.push(Diagnostic::error(span, message));
    }

    pub fn warning(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.0.push(Diagnostic::warning(span, message));
    }

    pub fn has_errors(&self) -> bool {
        self.0.iter().any(|d| d.severity == Severity::Error)
    }

    /// Deserialises one section of the document; on failure records the error and returns `None`.
    pub fn section<T: DeserializeOwned>(&mut self, value: Spanned<DeValue<'_>>) -> Option<T> {
        let span = value.span();
        let mut value = value;
        value.get_mut().make_owned();
        match T::deserialize(value.into_deserializer()) {
            Ok(parsed) => Some(parsed),
            Err(err) => {
                self.0.push(Diagnostic::from_toml(&err, span));
                None
            }
        }
    }

    /// Sorts by position, errors and warnings interleaved as they appear in the file.
    pub fn into_sorted(mut self) -> Vec<Diagnostic> {
        self.0.sort_by_key(|d| (d.span.start, d.severity));
        self.0
    }
}

/// Parses a TOML document, reporting every syntax error it can recover from.
pub fn parse_document(source: &str) -> Result<toml::de::DeTable<'_>, Diagnostics> {
    let (table, errors) = toml::de::DeTable::parse_recoverable(source);
    if errors.is_empty() {
        return Ok(table.into_inner());
    }
    let mut diags = Diagnostics::default();
    for err in &errors {
        diags.0.push(Diagnostic::from_toml(err, 0..0));
    }
    Err(diags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_from_one_and_in_characters() {
        let src = "a = 1\nbé = 2\n";
        assert_eq!(line_column(src, 0), (1, 1));
        assert_eq!(line_column(src, 6), (2, 1));
        // 'é' is two bytes but one column.
        assert_eq!(line_column(src, 9), (2, 3));
        assert_eq!(line_column(src, 1000), (3, 1));
    }

    #[test]
    fn syntax_errors_have_positions() {
        let src = "a = 1\nb = = 2\n";
        let diags = parse_document(src).unwrap_err();
        let first = &diags.0[0];
        assert_eq!(first.severity, Severity::Error);
        assert_eq!(first.position(src).0, 2, "{first:?}");
    }
}
