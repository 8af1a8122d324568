//! MQTT topic filters (MQTT 3.1.1 §4.7): validation and matching.
//!
//! A stream declares the topic filters it takes. A message whose topic no stream's filter matches
//! is dropped (fail closed). Topics often carry device identifiers, so a topic is never logged or
//! used as a metric label; only the stream it routes to is.

use serde::Serialize;

/// A validated topic filter, such as `city/air/+/reading` or `city/noise/#`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct TopicFilter(String);

/// Why a topic filter is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicFilterError {
    #[error("topic filter is empty")]
    Empty,
    #[error("'#' must be the last level of a topic filter and stand alone in its level")]
    MisplacedMultiLevel,
    #[error("'+' must stand alone in its level")]
    MisplacedSingleLevel,
    #[error("topic filter contains a NUL character")]
    Nul,
    #[error("topic filter is longer than 65535 bytes")]
    TooLong,
}

impl TopicFilter {
    pub fn new(filter: &str) -> Result<Self, TopicFilterError> {
        if filter.is_empty() {
            return Err(TopicFilterError::Empty);
        }
        if filter.len() > usize::from(u16::MAX) {
            return Err(TopicFilterError::TooLong);
        }
        if filter.contains('\0') {
            return Err(TopicFilterError::Nul);
        }
        let levels: Vec<&str> = filter.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
                return Err(TopicFilterError::MisplacedMultiLevel);
            }
            if level.contains('+') && *level != "+" {
                return Err(TopicFilterError::MisplacedSingleLevel);
            }
        }
        Ok(Self(filter.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether some topic matches both this filter and `other`.
    pub fn overlaps(&self, other: &TopicFilter) -> bool {
        let (mut a, mut b) = (self.0.split('/'), other.0.split('/'));
        loop {
            match (a.next(), b.next()) {
                (Some("#"), _) | (_, Some("#")) => return true,
                (None, None) => return true,
                (Some(x), Some(y)) if x == y || x == "+" || y == "+" => {}
                _ => return false,
            }
        }
    }

    /// Whether a topic name (no wildcards) matches this filter.
    ///
    /// As the standard requires, filters starting with a wildcard do not match topics starting with
    /// `$` (broker-internal topics such as `$SYS/...`).
    pub fn matches(&self, topic: &str) -> bool {
        let (filter, name) = (self.0.as_bytes(), topic.as_bytes());
        if name.first() == Some(&b'$') && matches!(filter.first(), Some(b'+' | b'#')) {
            return false;
        }
        // Level by level, `f` and `n` at the start of a level of each. Byte by byte rather than
        // with `split`: every message is routed, and its topic's levels are short.
        let (mut f, mut n) = (0, 0);
        loop {
            match filter.get(f) {
                // Validated: '#' stands alone in the last level.
                Some(b'#') => return true,
                // Validated: '+' stands alone in its level, and takes one level of the name.
                Some(b'+') => {
                    f += 1;
                    while n < name.len() && name[n] != b'/' {
                        n += 1;
                    }
                }
                _ => {
                    while f < filter.len() && filter[f] != b'/' {
                        if name.get(n) != Some(&filter[f]) {
                            return false;
                        }
                        f += 1;
                        n += 1;
                    }
                    if n < name.len() && name[n] != b'/' {
                        return false;
                    }
                }
            }
            // Both at the end of a level: at a '/' or at the end.
            match (f < filter.len(), n < name.len()) {
                (false, false) => return true,
                (true, true) => (f, n) = (f + 1, n + 1),
                // `a/#` matches `a` too: '#' also matches the parent level.
                (true, false) => return &filter[f..] == b"/#",
                (false, true) => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }

    #[test]
    fn validation_follows_the_standard() {
        for ok in ["a", "a/b", "+", "#", "a/+/c", "a/#", "+/+", "/", "a//b"] {
            assert!(TopicFilter::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(TopicFilter::new(""), Err(TopicFilterError::Empty));
        assert_eq!(
            TopicFilter::new("a/#/b"),
            Err(TopicFilterError::MisplacedMultiLevel)
        );
        assert_eq!(
            TopicFilter::new("a#"),
            Err(TopicFilterError::MisplacedMultiLevel)
        );
        assert_eq!(
            TopicFilter::new("a/b+"),
            Err(TopicFilterError::MisplacedSingleLevel)
        );
        assert_eq!(TopicFilter::new("a\0"), Err(TopicFilterError::Nul));
    }

    #[test]
    fn matching_follows_the_standard() {
        assert!(f("city/air/+/reading").matches("city/air/st-1/reading"));
        assert!(!f("city/air/+/reading").matches("city/air/st-1/status"));
        assert!(!f("city/air/+/reading").matches("city/air/reading"));
        assert!(f("city/#").matches("city"));
        assert!(f("city/#").matches("city/a/b/c"));
        assert!(!f("city/#").matches("town/a"));
        assert!(f("+").matches("a"));
        assert!(!f("+").matches("a/b"));
        assert!(f("+/+").matches("/x"));
        assert!(f("a//b").matches("a//b"));
        assert!(!f("#").matches("$SYS/broker/load"));
        assert!(!f("+/broker").matches("$SYS/broker"));
        assert!(f("$SYS/#").matches("$SYS/broker/load"));
        assert!(f("exact/topic").matches("exact/topic"));
        assert!(!f("exact/topic").matches("exact/topic/more"));
        assert!(!f("exact/topic").matches("exact/top"));
        assert!(!f("exact/top").matches("exact/topic"));
        assert!(!f("a/+").matches("a"));
        assert!(f("a/+").matches("a/"));
        assert!(f("+").matches(""));
        assert!(f("#").matches(""));
    }

    /// Matching as the standard words it: level by level, over the split levels.
    fn matches_by_levels(filter: &str, topic: &str) -> bool {
        if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
            return false;
        }
        let mut filter = filter.split('/');
        let mut name = topic.split('/');
        loop {
            match (filter.next(), name.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(f), Some(n)) if f == n => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    fn levels(alphabet: &'static [&'static str]) -> impl Strategy<Value = String> {
        proptest::collection::vec(proptest::sample::select(alphabet), 1..6)
            .prop_map(|levels| levels.join("/"))
    }

    proptest! {
        #[test]
        fn matching_agrees_with_matching_level_by_level(
            filter in levels(&["a", "ab", "b", "", "+", "#", "$S"]),
            topic in levels(&["a", "ab", "b", "", "$S", "a/b"]),
        ) {
            if let Ok(compiled) = TopicFilter::new(&filter) {
                prop_assert_eq!(compiled.matches(&topic), matches_by_levels(&filter, &topic));
            }
        }
    }
}
