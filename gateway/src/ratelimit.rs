//! Per-topic rate limits: a token bucket for each MQTT topic, so that one device (city topics name
//! the device: `city/air/<station>/reading`) flooding its topic cannot crowd out the others.
//! Messages over the limit are dropped before they are decoded, acknowledged, and counted in
//! `hubgate_mqtt_messages_rate_limited_total`.
//!
//! The buckets are bounded: at most [`MAX_TOPICS`] topics are tracked. When that many are, the
//! buckets that have refilled (their topics went quiet) are let go, at most once a second; until
//! then, and while all are in use, the topics not yet tracked share one bucket, so a flood of new
//! topic names grows neither memory nor work.

use std::collections::HashMap;

/// Most topics tracked at once.
pub const MAX_TOPICS: usize = 65_536;

/// The limit: a sustained rate and a burst, per topic.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Messages per second each topic may sustain.
    pub per_second: f64,
    /// Messages a topic may send at once after a quiet spell.
    pub burst: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

impl Bucket {
    fn take(&mut self, limit: Limit, now_ms: i64) -> bool {
        let elapsed = (now_ms - self.at_ms).max(0) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * limit.per_second).min(limit.burst);
        self.at_ms = now_ms.max(self.at_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn full(&self, limit: Limit, now_ms: i64) -> bool {
        let elapsed = (now_ms - self.at_ms).max(0) as f64 / 1000.0;
        self.tokens + elapsed * limit.per_second >= limit.burst
    }
}

/// The buckets of every topic.
#[derive(Debug)]
pub struct TopicLimiter {
    limit: Limit,
    buckets: HashMap<String, Bucket>,
    /// Shared by the topics not tracked while the table is full.
    overflow: Bucket,
    max_topics: usize,
    /// When the table was last swept for quiet topics: at most once a second, so that a flood
    /// of new topic names costs one sweep a second, not one per message.
    swept_ms: i64,
}

impl TopicLimiter {
    pub fn new(limit: Limit) -> Self {
        Self::with_capacity(limit, MAX_TOPICS)
    }

    fn with_capacity(limit: Limit, max_topics: usize) -> Self {
        let fresh = Bucket {
            tokens: limit.burst,
            at_ms: i64::MIN / 2,
        };
        Self {
            limit,
            buckets: HashMap::new(),
            overflow: fresh,
            max_topics,
            swept_ms: i64::MIN / 2,
        }
    }

    /// Whether a message on `topic` at `now_ms` is within the limit (and takes its token).
    pub fn allow(&mut self, topic: &str, now_ms: i64) -> bool {
        let limit = self.limit;
        if let Some(bucket) = self.buckets.get_mut(topic) {
            return bucket.take(limit, now_ms);
        }
        if self.buckets.len() >= self.max_topics && now_ms - self.swept_ms >= 1_000 {
            self.swept_ms = now_ms;
            self.buckets.retain(|_, b| !b.full(limit, now_ms));
        }
        if self.buckets.len() >= self.max_topics {
            return self.overflow.take(limit, now_ms);
        }
        let mut bucket = Bucket {
            tokens: limit.burst,
            at_ms: now_ms,
        };
        let allowed = bucket.take(limit, now_ms);
        self.buckets.insert(topic.to_owned(), bucket);
        allowed
    }

    /// Topics tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit {
        per_second: 2.0,
        burst: 5.0,
    };

    #[test]
    fn a_topic_gets_its_burst_then_its_rate_and_others_are_not_affected() {
        let mut limiter = TopicLimiter::new(LIMIT);
        let allowed = (0..20).filter(|_| limiter.allow("city/a", 0)).count();
        assert_eq!(allowed, 5, "the burst");
        // Another topic is untouched by the first one's flood.
        assert!(limiter.allow("city/b", 0));
        // Two tokens a second come back: 10 more over 5 s.
        let later = (1..=50)
            .filter(|i| limiter.allow("city/a", i * 100))
            .count();
        assert_eq!(later, 10);
    }

    #[test]
    fn the_table_is_bounded_and_quiet_topics_are_let_go() {
        let mut limiter = TopicLimiter::with_capacity(LIMIT, 4);
        for t in 0..4 {
            assert!(limiter.allow(&format!("t{t}"), 0));
        }
        // Full, and every bucket in use: new topics share the overflow bucket (burst 5).
        let shared = (0..10)
            .filter(|i| limiter.allow(&format!("new{i}"), 0))
            .count();
        assert_eq!(shared, 5);
        assert_eq!(limiter.tracked(), 4);
        // A second later the old buckets have refilled: they are let go for new topics.
        assert!(limiter.allow("fresh", 1_000));
        assert_eq!(limiter.tracked(), 1);
    }
}
