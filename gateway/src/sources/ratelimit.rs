//! Rate limits: a token bucket per MQTT topic (city topics name the device:
//! `city/air/<station>/reading`) and, when the configuration names the field, per device id inside
//! the payload on each topic, so that one device flooding cannot crowd out the others. Messages
//! over a limit are dropped, acknowledged, and counted in
//! `hubgate_mqtt_messages_rate_limited_total{by}`.
//!
//! The id in a payload is the sender's word: the per-device limit holds back faulty devices that
//! share a topic, not hostile ones, which could claim another id on the same topic. The per-topic
//! limit and the broker's ACL (`deploy/mosquitto.acl`) bound those.
//!
//! Buckets are keyed by a keyed 64-bit hash of the topic or id (a per-process random key), so the
//! table holds no topic name or device id. It is bounded: at most [`MAX_KEYS`] keys are tracked.
//! When that many are, the buckets that have refilled (their devices went quiet) are let go, at
//! most once a second; until then, and while all are in use, the keys not yet tracked share one
//! bucket, so a flood of new topic names or ids grows neither memory nor work.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};

use hubgate_privacy::value::Value;

pub use crate::config::{DeviceLimit, Limit};

/// Most topics, or device ids, tracked at once.
pub const MAX_KEYS: usize = 65_536;

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

/// The buckets of every topic, or of every device.
#[derive(Debug)]
pub struct Limiter {
    limit: Limit,
    hasher: RandomState,
    buckets: HashMap<u64, Bucket>,
    /// Shared by the keys not tracked while the table is full.
    overflow: Bucket,
    max_keys: usize,
    /// When the table was last swept for quiet keys: at most once a second, so that a flood of
    /// new names costs one sweep a second, not one per message.
    swept_ms: i64,
}

impl Limiter {
    pub fn new(limit: Limit) -> Self {
        Self::with_capacity(limit, MAX_KEYS)
    }

    fn with_capacity(limit: Limit, max_keys: usize) -> Self {
        let fresh = Bucket {
            tokens: limit.burst,
            at_ms: i64::MIN / 2,
        };
        Self {
            limit,
            hasher: RandomState::new(),
            buckets: HashMap::new(),
            overflow: fresh,
            max_keys,
            swept_ms: i64::MIN / 2,
        }
    }

    /// Whether a message on `topic` from the device named `id` at `now_ms` is within the limit
    /// (and takes its token). The bucket is the pair's: a device that puts another's id in its
    /// payload on its own topic spends its own allowance, not the other's.
    pub fn allow_device(&mut self, topic: &str, id: &Value, now_ms: i64) -> bool {
        match id {
            Value::Str(s) => self.allow(&(topic, 0u8, s.as_str()), now_ms),
            Value::Int(i) => self.allow(&(topic, 1u8, i), now_ms),
            Value::Float(f) => self.allow(&(topic, 2u8, f.to_bits()), now_ms),
            Value::Bool(b) => self.allow(&(topic, 3u8, b), now_ms),
        }
    }

    /// Whether a message from `key` (a topic, say) at `now_ms` is within the limit (and takes
    /// its token).
    pub fn allow<K: Hash + ?Sized>(&mut self, key: &K, now_ms: i64) -> bool {
        let limit = self.limit;
        let key = self.hasher.hash_one(key);
        if let Some(bucket) = self.buckets.get_mut(&key) {
            return bucket.take(limit, now_ms);
        }
        if self.buckets.len() >= self.max_keys && now_ms - self.swept_ms >= 1_000 {
            self.swept_ms = now_ms;
            self.buckets.retain(|_, b| !b.full(limit, now_ms));
        }
        if self.buckets.len() >= self.max_keys {
            return self.overflow.take(limit, now_ms);
        }
        let mut bucket = Bucket {
            tokens: limit.burst,
            at_ms: now_ms,
        };
        let allowed = bucket.take(limit, now_ms);
        self.buckets.insert(key, bucket);
        allowed
    }

    /// Keys tracked now.
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
    fn a_key_gets_its_burst_then_its_rate_and_others_are_not_affected() {
        let mut limiter = Limiter::new(LIMIT);
        let allowed = (0..20).filter(|_| limiter.allow("city/a", 0)).count();
        assert_eq!(allowed, 5, "the burst");
        // Another key is untouched by the first one's flood.
        assert!(limiter.allow("city/b", 0));
        // Two tokens a second come back: 10 more over 5 s.
        let later = (1..=50)
            .filter(|i| limiter.allow("city/a", i * 100))
            .count();
        assert_eq!(later, 10);
    }

    #[test]
    fn the_table_is_bounded_and_quiet_keys_are_let_go() {
        let mut limiter = Limiter::with_capacity(LIMIT, 4);
        for t in 0..4 {
            assert!(limiter.allow(&format!("t{t}"), 0));
        }
        // Full, and every bucket in use: new keys share the overflow bucket (burst 5).
        let shared = (0..10)
            .filter(|i| limiter.allow(&format!("new{i}"), 0))
            .count();
        assert_eq!(shared, 5);
        assert_eq!(limiter.tracked(), 4);
        // A second later the old buckets have refilled: they are let go for new keys.
        assert!(limiter.allow("fresh", 1_000));
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn devices_are_told_apart_by_topic_and_id_of_any_type() {
        let mut limiter = Limiter::new(LIMIT);
        let ids = [
            Value::Str("meter-7".into()),
            Value::Int(7),
            // The same bits as the integer 7: a bucket of its own all the same.
            Value::Float(f64::from_bits(7)),
            Value::Bool(true),
        ];
        for id in &ids {
            let allowed = (0..10)
                .filter(|_| limiter.allow_device("city/shared", id, 0))
                .count();
            assert_eq!(allowed, 5, "{id:?} has its own bucket");
        }
        // The same id on another topic (another device claiming it) has its own bucket too.
        assert!(limiter.allow_device("city/other", &ids[0], 0));
        assert_eq!(limiter.tracked(), 5);
    }

    #[test]
    fn limits_must_be_positive_and_finite() {
        assert!(LIMIT.is_valid());
        for (per_second, burst) in [
            (0.0, 5.0),
            (f64::NAN, 5.0),
            (f64::INFINITY, 5.0),
            (1.0, 0.5),
        ] {
            assert!(
                !Limit { per_second, burst }.is_valid(),
                "{per_second} {burst}"
            );
        }
    }
}
