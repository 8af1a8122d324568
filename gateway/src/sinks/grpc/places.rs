//! Places for long-lived calls (Subscribe and WatchFootprint; Push apart), shared fairly.
//!
//! A kind of call has `max` places. With tokens, each token may hold at most its own limit
//! (`[[grpc.token]] max_calls`, by default a quarter of the places), and some places stay
//! reserved for every other token that could make such a call (`max / (2 × tokens)`, at least
//! one, at most the token's limit): a token may take a place only while the places left still
//! cover what the others have not yet used of their reserve. So no token, however many calls it
//! opens, can keep another from opening its reserved share. Without tokens every caller is the
//! same holder and only `max` applies.
//!
//! Refusals are `RESOURCE_EXHAUSTED`, counted in `hubgate_grpc_refused_total{reason}`: `token`
//! when the token holds its limit, `capacity` when no place is free for it.

use std::sync::{Arc, Mutex, PoisonError};

use hubgate_exporters::catalogue;
use tonic::Status;

use super::auth::{Grant, Tokens};

/// Which calls the places are for: a token counts where its scopes let it make such calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Subscribe and WatchFootprint.
    Reading,
    /// Push, from origin gateways.
    Pushing,
}

/// A bounded number of places for long-lived calls of one kind, with a gauge of those open.
#[derive(Debug, Clone)]
pub struct Places {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    max: usize,
    gauge: &'static str,
    /// Per token (by its index in the configuration): the most it may hold, and its reserve.
    limits: Vec<usize>,
    reserves: Vec<usize>,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_token: Vec<usize>,
}

impl Places {
    pub fn new(max: usize, gauge: &'static str, tokens: &Tokens, kind: Kind) -> Self {
        let list = tokens.list();
        let can = |grant: &Grant| match kind {
            Kind::Reading => grant.reads_anything(),
            Kind::Pushing => grant.has(super::auth::Scope::Push),
        };
        let entitled = list.iter().filter(|t| can(t)).count().max(1);
        let default_limit = (max / 4).max(1);
        let share = (max / (2 * entitled)).max(1);
        let mut limits = Vec::with_capacity(list.len());
        let mut reserves = Vec::with_capacity(list.len());
        for grant in &list {
            let limit = grant
                .max_calls()
                .unwrap_or(default_limit)
                .clamp(1, max.max(1));
            limits.push(limit);
            reserves.push(if can(grant) { share.min(limit) } else { 0 });
        }
        Self {
            shared: Arc::new(Shared {
                max,
                gauge,
                open: Mutex::new(Open {
                    total: 0,
                    per_token: vec![0; list.len()],
                }),
                limits,
                reserves,
            }),
        }
    }

    /// A place for a call under `grant`, held until the guard is dropped (when the call's last
    /// task ends), or `RESOURCE_EXHAUSTED` (counted).
    pub fn take(&self, grant: &Grant) -> Result<Place, Status> {
        let shared = &self.shared;
        let mut open = shared.open.lock().unwrap_or_else(PoisonError::into_inner);
        let token = grant.index();
        if let Some(i) = token {
            let limit = shared.limits.get(i).copied().unwrap_or(shared.max);
            if open.per_token.get(i).copied().unwrap_or(0) >= limit {
                return Err(refused(
                    "token",
                    format!("this token holds its {limit} open calls; close one first"),
                ));
            }
        }
        // What the other tokens have not yet used of their reserve stays free for them.
        let owed: usize = (0..shared.reserves.len())
            .filter(|&j| Some(j) != token)
            .map(|j| shared.reserves[j].saturating_sub(open.per_token[j]))
            .sum();
        if open.total + 1 + owed > shared.max {
            return Err(refused(
                "capacity",
                "too many open calls; try again later".to_owned(),
            ));
        }
        open.total += 1;
        if let Some(i) = token {
            open.per_token[i] += 1;
        }
        metrics::gauge!(shared.gauge).increment(1.0);
        Ok(Place {
            places: Arc::clone(shared),
            token,
        })
    }
}

fn refused(reason: &'static str, message: String) -> Status {
    metrics::counter!(catalogue::GRPC_REFUSED, "reason" => reason).increment(1);
    Status::resource_exhausted(message)
}

/// One place taken from [`Places`].
#[derive(Debug)]
pub struct Place {
    places: Arc<Shared>,
    token: Option<usize>,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self
            .places
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.total -= 1;
        if let Some(i) = self.token {
            open.per_token[i] -= 1;
        }
        metrics::gauge!(self.places.gauge).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenConfig;

    fn token(name: &str, max_calls: Option<usize>, push: bool) -> TokenConfig {
        TokenConfig {
            name: name.into(),
            sha256: super::super::auth::digest_hex(name),
            streams: vec!["*".into()],
            policy: false,
            footprint: false,
            push,
            origins: vec![],
            max_calls,
        }
    }

    fn grant(tokens: &Tokens, name: &str) -> Grant {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("authorization", format!("Bearer {name}").parse().unwrap());
        tokens.check(&metadata).unwrap()
    }

    #[test]
    fn one_token_cannot_take_the_places_of_the_others() {
        let tokens = Tokens::new(&[
            token("a", Some(1000), false),
            token("b", None, false),
            token("c", None, false),
        ]);
        let places = Places::new(12, "test_places", &tokens, Kind::Reading);
        let a = grant(&tokens, "a");
        // a may hold up to what b's and c's reserves (12 / 6 = 2 each) leave.
        let held: Vec<Place> = (0..8).map(|_| places.take(&a).unwrap()).collect();
        let refused = places.take(&a).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let b = grant(&tokens, "b");
        let c = grant(&tokens, "c");
        let _b = [places.take(&b).unwrap(), places.take(&b).unwrap()];
        let _c = [places.take(&c).unwrap(), places.take(&c).unwrap()];
        // Every place is taken now.
        assert!(places.take(&b).is_err());
        drop(held);
        // b's own limit: a quarter of the places.
        let _third = places.take(&b).unwrap();
        let err = places.take(&b).unwrap_err();
        assert!(err.message().contains("holds its 3 open calls"), "{err:?}");
    }

    #[test]
    fn without_tokens_only_the_total_counts() {
        let tokens = Tokens::new(&[]);
        let places = Places::new(3, "test_places", &tokens, Kind::Reading);
        let held: Vec<Place> = (0..3).map(|_| places.take(&Grant::Open).unwrap()).collect();
        assert!(places.take(&Grant::Open).is_err());
        drop(held);
        assert!(places.take(&Grant::Open).is_ok());
    }

    #[test]
    fn tokens_that_cannot_push_reserve_no_push_places() {
        let tokens = Tokens::new(&[token("origin", None, true), token("reader", None, false)]);
        let places = Places::new(8, "test_places", &tokens, Kind::Pushing);
        let origin = grant(&tokens, "origin");
        // The default limit is a quarter of the places; nothing is reserved for the reader.
        let held: Vec<Place> = (0..2).map(|_| places.take(&origin).unwrap()).collect();
        assert!(places.take(&origin).is_err());
        assert_eq!(held.len(), 2);
    }
}
