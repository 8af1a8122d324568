use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::budget::PoolBudget;
use crate::noise::SeededRandom;
use crate::policy::{StreamPolicy, from_toml};

const MIN: i64 = 60_000;
/// 2026-11-25T00:00:00Z.
const T0: i64 = 1_795_564_800_000;

fn policy(aggregate: &str) -> StreamPolicy {
    let src = format!(
        r#"
[[stream]]
name = "footfall"
topics = ["city/footfall/+/probe"]
purpose = "Measure how busy public spaces are"
legal_basis = "public task"
principles = ["community_participation"]
retention = "7d"

[stream.fields]
counter_id = "keep"
mac = "pseudonymise"
rssi = "keep"
zone = "keep"

{aggregate}
"#
    );
    let (policy, _) = from_toml(&src).unwrap_or_else(|d| panic!("{d:?}"));
    policy.streams()[0].clone()
}

const PLAIN: &str = r#"
[stream.aggregate]
window = "1m"
allowed_lateness = "30s"
group_by = ["counter_id"]
contributor = "mac"
min_group_size = 3

[stream.aggregate.measures]
readings = "count"
devices = "contributors"
zones = { fn = "distinct", field = "zone" }
rssi_sum = { fn = "sum", field = "rssi" }
rssi_mean = { fn = "mean", field = "rssi" }
rssi_min = { fn = "min", field = "rssi" }
rssi_max = { fn = "max", field = "rssi" }
"#;

const NOISY: &str = r#"
[stream.aggregate]
window = "1m"
group_by = ["counter_id"]
contributor = "mac"
min_group_size = 3

[stream.aggregate.measures]
readings = "count"
devices = "contributors"

[stream.aggregate.noise]
epsilon = 5.0
daily_budget = 10.0
max_contributions = 2
"#;

/// Devices per group enough to clear NOISY's release threshold (15) all but surely.
const CROWD: i64 = 40;

fn noising<'a>(pool: &'a mut PoolBudget, random: &'a mut SeededRandom) -> Option<Noising<'a>> {
    Some(Noising {
        pool,
        stream: "footfall",
        random,
    })
}

fn reading(t: i64, counter: &str, mac: &str, rssi: i64, zone: &str) -> Record {
    Record {
        event_time_ms: t,
        fields: vec![
            ("counter_id".into(), Value::Str(counter.into())),
            ("mac".into(), Value::Str(mac.into())),
            ("rssi".into(), Value::Int(rssi)),
            ("zone".into(), Value::Str(zone.into())),
        ],
    }
}

fn get<'a>(record: &'a Record, name: &str) -> &'a Value {
    field(record, name).unwrap_or_else(|| panic!("no field {name} in {record:?}"))
}

fn agg(p: &StreamPolicy) -> &Aggregation {
    p.aggregate.as_ref().unwrap()
}

#[test]
fn measures_are_computed_per_group_and_small_groups_are_suppressed() {
    let p = policy(PLAIN);
    let spec = agg(&p);
    let mut state = WindowState::default();
    let input = [
        ("c-1", "aa", -40, "north"),
        ("c-1", "bb", -60, "north"),
        ("c-1", "cc", -80, "south"),
        ("c-1", "aa", -50, "north"),
        // Two contributors only: below k = 3.
        ("c-2", "aa", -70, "east"),
        ("c-2", "dd", -70, "east"),
    ];
    for (i, (c, mac, rssi, zone)) in input.iter().enumerate() {
        let r = reading(T0 + i as i64 * 1000, c, mac, *rssi, zone);
        assert_eq!(state.absorb(spec, &r, T0), Absorbed::Counted);
    }
    // Not yet: the window ends at T0 + 1 min, and waits 30 s for late readings.
    assert!(
        state
            .release(spec, T0 + MIN + 29_999, None)
            .records
            .is_empty()
    );
    let release = state.release(spec, T0 + MIN + 30_000, None);
    assert_eq!(release.windows, 1);
    assert_eq!(release.groups_suppressed, 1);
    assert_eq!(release.range_ms, Some((T0, T0 + MIN)));
    assert_eq!(release.records.len(), 1);
    let r = &release.records[0];
    assert_eq!(r.event_time_ms, T0);
    assert_eq!(get(r, "counter_id"), &Value::Str("c-1".into()));
    assert_eq!(get(r, "readings"), &Value::Int(4));
    assert_eq!(get(r, "devices"), &Value::Int(3));
    assert_eq!(get(r, "zones"), &Value::Int(2));
    assert_eq!(get(r, "rssi_sum"), &Value::Float(-230.0));
    assert_eq!(get(r, "rssi_mean"), &Value::Float(-57.5));
    assert_eq!(get(r, "rssi_min"), &Value::Float(-80.0));
    assert_eq!(get(r, "rssi_max"), &Value::Float(-40.0));
    // The contributor field itself never leaves.
    assert!(field(r, "mac").is_none());
    assert_eq!(state.open_windows(), 0);
    assert_eq!(state.entries(), 0);
}

#[test]
fn late_readings_are_dropped() {
    let p = policy(PLAIN);
    let spec = agg(&p);
    let mut state = WindowState::default();
    // Within the lateness, a reading for the previous window still counts.
    let r = reading(T0 + 59_000, "c-1", "aa", -50, "n");
    assert_eq!(state.absorb(spec, &r, T0 + MIN + 29_000), Absorbed::Counted);
    // Beyond it, it is late even though no release ran yet.
    assert_eq!(state.absorb(spec, &r, T0 + MIN + 30_000), Absorbed::Late);
    state.release(spec, T0 + MIN + 30_000, None);
    // After the release, the closed window stays closed whatever the clock says.
    assert_eq!(state.absorb(spec, &r, T0), Absorbed::Late);
    // And a window that never held anything but ended long ago is closed too.
    let old = reading(T0 - 10 * MIN, "c-1", "aa", -50, "n");
    assert_eq!(state.absorb(spec, &old, T0 + MIN + 30_000), Absorbed::Late);
    // A reading from well in the future is refused.
    let future = reading(T0 + 10 * MIN, "c-1", "aa", -50, "n");
    assert_eq!(state.absorb(spec, &future, T0 + MIN), Absorbed::Early);
}

#[test]
fn readings_without_contributor_or_group_key_are_dropped() {
    let p = policy(PLAIN);
    let spec = agg(&p);
    let mut state = WindowState::default();
    let mut r = reading(T0, "c-1", "aa", -50, "n");
    r.fields.retain(|(p, _)| p != "mac");
    assert_eq!(state.absorb(spec, &r, T0), Absorbed::NoContributor);
    let mut r = reading(T0, "c-1", "aa", -50, "n");
    r.fields[0].1 = Value::Float(1.5);
    assert_eq!(state.absorb(spec, &r, T0), Absorbed::NoGroupKey);
    r.fields.remove(0);
    assert_eq!(state.absorb(spec, &r, T0), Absorbed::NoGroupKey);
    assert_eq!(state.entries(), 0);
}

#[test]
fn the_state_is_bounded() {
    let p = policy(&PLAIN.replace(
        "min_group_size = 3",
        "min_group_size = 3\nmax_state_entries = 50",
    ));
    let spec = agg(&p);
    let mut state = WindowState::default();
    let mut full = 0;
    for i in 0..1000 {
        let r = reading(T0, &format!("c-{i}"), &format!("m-{i}"), -50, "n");
        if state.absorb(spec, &r, T0) == Absorbed::Full {
            full += 1;
        }
    }
    assert!(full > 900, "{full}");
    // Each reading adds at most group + contributor + distinct value: the cap holds within that.
    assert!(state.entries() <= 50 + 3, "{}", state.entries());
}

#[test]
fn a_checkpointed_state_resumes_where_it_stopped() {
    let p = policy(PLAIN);
    let spec = agg(&p);
    let input: Vec<Record> = (0..200)
        .map(|i| {
            reading(
                T0 + (i * 7_919) % (3 * MIN),
                &format!("c-{}", i % 4),
                &format!("m-{}", i % 23),
                -(i % 90),
                &format!("z-{}", i % 5),
            )
        })
        .collect();
    let mut straight = WindowState::default();
    let mut resumed = WindowState::default();
    for (i, r) in input.iter().enumerate() {
        assert_eq!(straight.absorb(spec, r, T0 + MIN), Absorbed::Counted);
        resumed.absorb(spec, r, T0 + MIN);
        if i == 120 {
            resumed = roundtrip(&resumed);
        }
    }
    assert_eq!(straight, resumed);
    let end = T0 + 4 * MIN;
    let a = straight.release(spec, end, None);
    let b = resumed.release(spec, end, None);
    assert_eq!(a.windows, 3);
    assert!(!a.records.is_empty());
    assert_eq!(a, b);
}

#[test]
fn the_state_holds_digests_not_values() {
    let p = policy(PLAIN);
    let spec = agg(&p);
    let mut state = WindowState::default();
    for mac in [
        "3c:22:fb:00:11:22",
        "3c:22:fb:00:11:23",
        "3c:22:fb:00:11:24",
    ] {
        state.absorb(spec, &reading(T0, "c-1", mac, -50, "north-gate"), T0);
    }
    let json = serde_json::to_string(&state).unwrap();
    assert!(!json.contains("3c:22"), "{json}");
    assert!(!json.contains("north-gate"), "{json}");
    let mut binary = Vec::new();
    state.encode(&mut binary);
    for raw in ["3c:22", "north-gate"] {
        assert!(!binary.windows(raw.len()).any(|w| w == raw.as_bytes()));
    }
}

/// The state through its binary form.
fn roundtrip(state: &WindowState) -> WindowState {
    let mut bytes = Vec::new();
    state.encode(&mut bytes);
    WindowState::decode(&bytes).expect("decodes")
}

#[test]
fn the_binary_form_keeps_every_part_of_the_state_and_refuses_damage() {
    let p = policy(NOISY);
    let spec = agg(&p);
    let mut state = WindowState::default();
    for i in 0..40 {
        state.absorb(
            spec,
            &reading(
                T0 + (i % 3) * MIN,
                &format!("c-{}", i % 4),
                &format!("m-{}", i % 7),
                -50,
                "z",
            ),
            T0 + MIN,
        );
        if i == 20 {
            state.rekey(T0 + MIN);
        }
    }
    let plain = policy(PLAIN);
    let mut numbers = WindowState::default();
    for i in 0..30 {
        let r = Record {
            event_time_ms: T0,
            fields: vec![
                (
                    "counter_id".into(),
                    Value::Str(compact_str::format_compact!("c-{}", i % 2)),
                ),
                (
                    "mac".into(),
                    Value::Str(compact_str::format_compact!("m-{i}")),
                ),
                ("rssi".into(), Value::Float(-40.5 - f64::from(i))),
                (
                    "zone".into(),
                    Value::Str(compact_str::format_compact!("z-{}", i % 3)),
                ),
            ],
        };
        numbers.absorb(agg(&plain), &r, T0);
    }
    for state in [&state, &numbers, &WindowState::default()] {
        assert_eq!(&roundtrip(state), state);
    }
    assert!(state.windows.values().any(|w| !w.contributions.is_empty()));
    assert!(!state.rekeys_ms.is_empty());
    let mut bytes = Vec::new();
    numbers.encode(&mut bytes);
    for cut in 0..bytes.len() {
        assert!(WindowState::decode(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    bytes.push(0);
    assert!(WindowState::decode(&bytes).is_err(), "trailing bytes");
    bytes.pop();
    // A count of entries that is not what the state holds would let it outgrow its bound.
    let mut miscounted = bytes.clone();
    miscounted[8] ^= 1;
    assert!(WindowState::decode(&miscounted).is_err(), "entries");
    assert!(WindowState::decode(&bytes).is_ok());
    // A count larger than the input can hold is refused before anything is allocated for it.
    let mut huge = vec![0u8; 20];
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(WindowState::decode(&huge).is_err());
}

/// The changes since a whole state, applied to that state read back, give the state they were
/// taken from: across new and old groups, contributions under noise, a rekey and a closed window.
#[test]
fn changes_applied_to_the_last_whole_state_give_the_state() {
    for aggregate in [PLAIN, NOISY] {
        let p = policy(aggregate);
        let spec = agg(&p);
        let mut state = WindowState::default();
        for i in 0..200 {
            let r = reading(
                T0 + (i % 2) * MIN,
                &format!("c-{}", i % 50),
                &format!("m-{}", i % 30),
                -50 - i % 7,
                &format!("z-{}", i % 3),
            );
            state.absorb(spec, &r, T0 + MIN - 1);
        }
        let mut whole = Vec::new();
        state.encode(&mut whole);
        state.forget_changes();
        let base = WindowState::decode(&whole).expect("decodes");
        let groups = state.groups().count();
        assert_eq!(state.changed_groups(), (0, groups));
        assert!(groups > 40, "{aggregate}: {groups} groups");

        // Two groups change, one of them new.
        for (counter, mac) in [("c-1", "m-100"), ("c-1", "m-101"), ("c-new", "m-102")] {
            let r = reading(T0 + MIN + 5, counter, mac, -70, "z-9");
            assert_eq!(state.absorb(spec, &r, T0 + MIN), Absorbed::Counted);
        }
        assert_eq!(state.changed_groups(), (2, groups + 1));
        let mut changes = Vec::new();
        state.encode_changes(&mut changes);
        assert!(changes.len() * 10 < whole.len(), "{aggregate}");
        let mut resumed = base.clone();
        assert_eq!(resumed.apply_changes(&changes), Ok(2));
        assert_eq!(resumed, state, "{aggregate}");

        // A rekey, a reading under the new key, and the first window closes.
        state.rekey(T0 + MIN + 10);
        let r = reading(T0 + MIN + 20, "c-2", "m-3", -60, "z");
        assert_eq!(state.absorb(spec, &r, T0 + MIN + 20), Absorbed::Counted);
        let release = state.release(spec, T0 + 2 * MIN - 1, None);
        assert_eq!(release.windows, 1, "{aggregate}");
        changes.clear();
        state.encode_changes(&mut changes);
        let mut resumed = base.clone();
        assert_eq!(resumed.apply_changes(&changes), Ok(3));
        assert_eq!(resumed, state, "{aggregate}");

        // Damaged changes, or changes applied to another state, leave the state as it was.
        for cut in 0..changes.len() {
            let mut b = base.clone();
            assert!(b.apply_changes(&changes[..cut]).is_err(), "cut at {cut}");
            assert_eq!(b, base);
        }
        let mut other = WindowState::default();
        assert!(other.apply_changes(&changes).is_err());
        assert_eq!(other, WindowState::default());
    }
}

#[test]
fn noise_is_paid_for_once_and_refused_over_the_budget() {
    let p = policy(NOISY);
    let spec = agg(&p);
    let mut budget = PoolBudget::default();
    let mut rng = SeededRandom::new(7);
    let mut state = WindowState::default();
    // Three windows, each with a releasable group; the budget pays for two.
    for w in 0..3 {
        for d in 0..CROWD {
            let r = reading(T0 + w * MIN, "c-1", &format!("m-{d}"), -50, "n");
            assert_eq!(state.absorb(spec, &r, T0 + w * MIN), Absorbed::Counted);
        }
    }
    let checkpoint = state.clone();
    let release = state.release(spec, T0 + 3 * MIN, noising(&mut budget, &mut rng));
    assert_eq!(release.windows, 3);
    assert_eq!(release.records.len(), 2);
    assert_eq!(release.windows_refused, 1);
    assert!(matches!(
        release.last_refusal,
        Some(Refusal::OverBudget { .. })
    ));
    assert_eq!(release.epsilon_spent_micro, 10_000_000);
    assert_eq!(budget.spent_on_day_of(T0), 10_000_000);

    // A crash before the records were kept, and a restart from the checkpoint: the windows
    // already settled are not released again with fresh noise, nor paid for again.
    let mut state = checkpoint;
    let again = state.release(spec, T0 + 3 * MIN, noising(&mut budget, &mut rng));
    assert!(again.records.is_empty());
    assert_eq!((again.windows, again.groups_suppressed), (3, 3));
    assert_eq!((again.windows_refused, again.epsilon_spent_micro), (0, 0));

    // The clock goes on without readings: every window that closes is refused while the day's
    // budget is spent, each once.
    let later = state.release(spec, T0 + 10 * MIN, noising(&mut budget, &mut rng));
    assert_eq!(later.windows_refused, 7);
    assert_eq!(
        later.last_refusal,
        Some(Refusal::OverBudget {
            spent_micro: 10_000_000,
            cap_micro: 10_000_000
        })
    );
    let same = state.release(spec, T0 + 10 * MIN, noising(&mut budget, &mut rng));
    assert_eq!((same.windows_refused, same.last_refusal), (0, None));

    // Without a random source, a noisy stream releases nothing.
    let mut state = WindowState::default();
    for d in 0..CROWD {
        state.absorb(
            spec,
            &reading(T0 + 5 * MIN, "c-1", &format!("m-{d}"), -50, "n"),
            T0 + 5 * MIN,
        );
    }
    assert!(state.release(spec, T0 + 6 * MIN, None).records.is_empty());
}

/// What a noisy stream spends depends on its clock alone: empty windows cost what full ones do.
#[test]
fn every_window_on_the_clock_is_paid_for_readings_or_not() {
    let p = policy(&NOISY.replace("daily_budget = 10.0", "daily_budget = 1000.0"));
    let spec = agg(&p);
    let spent = |with_readings: bool| {
        let mut budget = PoolBudget::default();
        let mut rng = SeededRandom::new(5);
        let mut state = WindowState::default();
        let mut spent = Vec::new();
        for minute in 1..=6 {
            let now = T0 + minute * MIN;
            if with_readings && minute % 2 == 0 {
                for d in 0..CROWD {
                    let r = reading(now, "c-1", &format!("m-{d}"), -50, "n");
                    assert_eq!(state.absorb(spec, &r, now), Absorbed::Counted);
                }
            }
            // Releases at uneven times: two windows may close at once.
            if minute != 3 {
                let release = state.release(spec, now, noising(&mut budget, &mut rng));
                spent.push((release.epsilon_spent_micro, release.range_ms));
            }
        }
        (spent, budget.spent_on_day_of(T0))
    };
    let (with, total) = spent(true);
    assert_eq!((with.clone(), total), spent(false));
    assert_eq!(total, 6 * 5_000_000);
    assert_eq!(with[2].0, 10_000_000, "{with:?}");
}

#[test]
fn a_released_window_is_not_released_twice() {
    let p = policy(NOISY);
    let spec = agg(&p);
    let mut budget = PoolBudget::default();
    let mut rng = SeededRandom::new(1);
    let mut state = WindowState::default();
    for d in 0..CROWD {
        state.absorb(spec, &reading(T0, "c-1", &format!("m-{d}"), -50, "n"), T0);
    }
    let checkpoint = state.clone();
    assert_eq!(
        state
            .release(spec, T0 + MIN, noising(&mut budget, &mut rng))
            .records
            .len(),
        1
    );
    let mut state = checkpoint;
    let again = state.release(spec, T0 + MIN, noising(&mut budget, &mut rng));
    assert!(again.records.is_empty());
    assert_eq!((again.groups_suppressed, again.epsilon_spent_micro), (1, 0));
}

#[test]
fn contributions_are_bounded_under_noise() {
    let p = policy(NOISY);
    let spec = agg(&p);
    let mut state = WindowState::default();
    let r = reading(T0, "c-1", "m-1", -50, "n");
    assert_eq!(state.absorb(spec, &r, T0), Absorbed::Counted);
    assert_eq!(state.absorb(spec, &r, T0), Absorbed::Counted);
    // max_contributions = 2, across groups of the window.
    assert_eq!(state.absorb(spec, &r, T0), Absorbed::Bounded);
    let other_group = reading(T0, "c-2", "m-1", -50, "n");
    assert_eq!(state.absorb(spec, &other_group, T0), Absorbed::Bounded);
    // The next window starts afresh.
    assert_eq!(
        state.absorb(spec, &reading(T0 + MIN, "c-1", "m-1", -50, "n"), T0),
        Absorbed::Counted
    );
}

#[test]
fn a_device_under_two_keys_is_not_counted_twice() {
    let p = policy(PLAIN);
    let spec = agg(&p);
    let mut state = WindowState::default();
    // Two devices, then a new key (a restart): the same two devices under new pseudonyms.
    for d in ["a", "b"] {
        state.absorb(spec, &reading(T0, "c-1", &format!("m-{d}@0"), -50, "n"), T0);
    }
    state.rekey(T0 + 1);
    for d in ["a", "b"] {
        state.absorb(
            spec,
            &reading(T0, "c-1", &format!("m-{d}@1"), -50, "n"),
            T0 + 1,
        );
    }
    assert_eq!(state.groups().next().map(|g| g.2), Some(2));
    // k = 3: two devices are not enough, however many pseudonyms they had.
    let release = state.release(spec, T0 + 2 * MIN, None);
    assert_eq!((release.records.len(), release.groups_suppressed), (0, 1));
    // A checkpoint keeps the generation: resumed state does not match new pseudonyms to old ones.
    let mut state = WindowState::default();
    state.rekey(T0);
    state.absorb(spec, &reading(T0, "c-1", "m-a", -50, "n"), T0);
    assert_eq!(roundtrip(&state), state);
}

#[test]
fn noise_sensitivity_counts_the_key_generations_a_window_can_see() {
    let p = policy(NOISY);
    let spec = agg(&p);
    let mut state = WindowState::default();
    assert_eq!(state.generations(spec, T0), 1);
    // Readings for the window [T0, T0 + 1m) arrive from T0 - 1m (early) to T0 + 1m (no lateness).
    state.rekey(T0 - 2 * MIN);
    assert_eq!(state.generations(spec, T0), 1);
    state.rekey(T0 + 30_000);
    assert_eq!(state.generations(spec, T0), 2);
    assert_eq!(state.generations(spec, T0 + 5 * MIN), 1);
    // Under max_contributions = 2, a device gives two readings per generation.
    let r = |mac: &str| reading(T0, "c-1", mac, -50, "n");
    assert_eq!(
        state.absorb(spec, &r("m-a@1"), T0 + 30_000),
        Absorbed::Counted
    );
    state.rekey(T0 + 40_000);
    assert_eq!(
        state.absorb(spec, &r("m-a@1"), T0 + 40_000),
        Absorbed::Counted
    );
    assert_eq!(
        state.absorb(spec, &r("m-a@1"), T0 + 40_000),
        Absorbed::Counted
    );
    assert_eq!(
        state.absorb(spec, &r("m-a@1"), T0 + 40_000),
        Absorbed::Bounded
    );
    // Old rekeys are forgotten once no window can see them.
    state.release(spec, T0 + 10 * MIN, None);
    assert!(state.rekeys_ms.is_empty());
}

#[test]
fn noisy_counts_scatter_around_the_true_count() {
    let p = policy(&NOISY.replace("daily_budget = 10.0", "daily_budget = 100000.0"));
    let spec = agg(&p);
    let mut budget = PoolBudget::default();
    let mut rng = SeededRandom::new(42);
    let mut values = Vec::new();
    for w in 0..2000 {
        let mut state = WindowState::default();
        let t = T0 + w * MIN;
        for d in 0..CROWD {
            state.absorb(spec, &reading(t, "c-1", &format!("m-{d}"), -50, "n"), t);
        }
        let release = state.release(spec, t + MIN, noising(&mut budget, &mut rng));
        let Value::Int(n) = get(&release.records[0], "devices") else {
            panic!()
        };
        values.push(*n);
    }
    let distinct: BTreeSet<i64> = values.iter().copied().collect();
    assert!(distinct.len() > 5, "noise must vary: {distinct:?}");
    let mean = values.iter().sum::<i64>() as f64 / values.len() as f64;
    // Each of the two quantities gets epsilon 2.5 with sensitivity 2: sd about 1.1, so the mean
    // of 2000 draws is within 0.5 of the true count with overwhelming probability.
    assert!((mean - CROWD as f64).abs() < 0.5, "{mean}");
}

/// The release decision under noise: a group of k contributors, which one contributor less
/// would suppress for certain, is released with probability at most the per-group delta; above
/// k, one contributor more multiplies the probability of release by at most
/// e^(epsilon / sensitivity); and the threshold is the least that keeps the first bound. Checked
/// from the formula, and the formula against draws of the noise the gateway uses.
#[test]
fn the_release_decision_is_differentially_private() {
    for (epsilon_micro, sensitivity, delta) in [
        (500_000, 1, 1e-5),
        (2_500_000, 2, 1e-6),
        (100_000, 3, 1e-6),
        (1_000_000, 1, 1e-9),
        (8_000_000, 1, 1e-3),
    ] {
        for k in [1u64, 3, 10] {
            let s = Selection {
                sensitivity,
                epsilon_micro,
                delta,
                k,
            };
            let group_delta = s.group_delta();
            assert!(group_delta <= delta && group_delta >= delta / sensitivity as f64 * 0.999);
            let ratio = (epsilon_micro as f64 / 1e6 / sensitivity as f64).exp();
            let t = s.threshold();
            assert!(t >= k as i64);
            let p = |n: u64| s.release_probability(n);
            assert_eq!(p(k - 1), 0.0);
            assert!(p(k) <= group_delta * (1.0 + 1e-9), "{s:?} t={t}");
            if t > k as i64 {
                let lower = Selection { k: k - 1, ..s };
                // The same noise against t - 1 would release a group of k too often.
                assert_eq!(lower.threshold(), t - 1);
                assert!(lower.release_probability(k) > group_delta, "{s:?} t={t}");
            }
            for n in k + 1..(t as u64 + 30) {
                assert!(p(n) <= ratio * p(n - 1) + group_delta, "{s:?} n={n} t={t}");
                assert!(p(n) >= p(n - 1));
            }
        }
        // The formula against 100 000 draws near the threshold.
        let s = Selection {
            sensitivity,
            epsilon_micro,
            delta,
            k: 1,
        };
        let t = s.threshold();
        let mut rng = SeededRandom::new(epsilon_micro ^ sensitivity);
        let draws: Vec<i64> = (0..100_000)
            .map(|_| discrete_laplace(&mut rng, sensitivity, epsilon_micro))
            .collect();
        for n in [t - 3, t - 1, t, t + 2].into_iter().filter(|n| *n >= 1) {
            let released = draws
                .iter()
                .filter(|z| s.releases(n as u64, n + **z))
                .count() as f64
                / 1e5;
            let expected = s.release_probability(n as u64);
            let sd = (expected * (1.0 - expected) / 1e5).sqrt();
            assert!(
                (released - expected).abs() <= 5.0 * sd + 1e-4,
                "{s:?} n={n}: {released} drawn, {expected} expected"
            );
        }
    }
}

/// The release decision as the windows make it, measured: groups of k - 1, k, and around the
/// threshold, in 400 windows of 50 groups of each size. Groups below k never leave; groups of k
/// leave at most with the group delta; around the threshold, the measured rates match the formula
/// and one contributor more multiplies them by at most e^epsilon. Prints the figures:
/// `cargo test -p hubgate-privacy --release release_rates_measured -- --nocapture`.
#[test]
fn release_rates_measured_through_the_windows_match_the_guarantee() {
    let p = policy(
        r#"
[stream.aggregate]
window = "1m"
group_by = ["counter_id"]
contributor = "mac"
min_group_size = 3

[stream.aggregate.measures]
devices = "contributors"

[stream.aggregate.noise]
epsilon = 1.0
delta = 1e-3
daily_budget = 1000.0
max_contributions = 1
"#,
    );
    let spec = agg(&p);
    let noise = spec.noise.as_ref().unwrap();
    let selection = Selection::new(spec, noise, 1);
    let t = selection.threshold();
    assert_eq!(t, 10);
    let sizes = [2, 3, t - 1, t, t + 1];
    let (windows, per_window) = (400, 50);
    let mut released = BTreeMap::new();
    let mut budget = PoolBudget::default();
    let mut rng = SeededRandom::new(11);
    for w in 0..windows {
        let start = T0 + w * MIN;
        let mut state = WindowState::default();
        for size in sizes {
            for g in 0..per_window {
                for d in 0..size {
                    let (counter, mac) = (format!("{size}-{g}"), format!("m-{size}-{g}-{d}"));
                    let r = reading(start, &counter, &mac, -50, "n");
                    assert_eq!(state.absorb(spec, &r, start), Absorbed::Counted);
                }
            }
        }
        for r in state
            .release(spec, start + MIN, noising(&mut budget, &mut rng))
            .records
        {
            let Value::Str(counter) = get(&r, "counter_id") else {
                panic!()
            };
            let size: i64 = counter.split('-').next().unwrap().parse().unwrap();
            *released.entry(size).or_insert(0u64) += 1;
        }
    }
    let trials = (windows * per_window) as f64;
    let rate = |size: i64| released.get(&size).copied().unwrap_or(0) as f64 / trials;
    let group_delta = selection.group_delta();
    for size in sizes {
        let expected = selection.release_probability(size as u64);
        let sd = (expected * (1.0 - expected) / trials).sqrt();
        eprintln!(
            "contributors {size:>2}: released {:.5} of {trials} groups, formula {expected:.5}",
            rate(size)
        );
        assert!((rate(size) - expected).abs() <= 5.0 * sd, "size {size}");
    }
    assert_eq!(rate(2), 0.0);
    assert!(rate(3) <= group_delta + 5.0 * (group_delta / trials).sqrt());
    let e = (noise.epsilon_micro as f64 / 1e6).exp();
    for size in [t, t + 1] {
        let ratio = rate(size) / rate(size - 1);
        eprintln!(
            "rate({size}) / rate({}) = {ratio:.3} (e^epsilon = {e:.3})",
            size - 1
        );
        assert!(ratio <= e * 1.1, "{ratio}");
    }
}

fn arb_reading() -> impl Strategy<Value = (i64, u8, u8, i64)> {
    // (offset in ms over five windows, counter, contributor, rssi)
    (0..5 * MIN, 0u8..6, 0u8..12, -100i64..0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever is absorbed, released and rekeyed after a whole state was written, the whole
    /// state and the changes give the live state back.
    #[test]
    fn a_whole_state_and_its_changes_give_the_state(
        before in prop::collection::vec(arb_reading(), 0..150),
        after in prop::collection::vec(arb_reading(), 0..150),
        noisy in any::<bool>(),
        release_at in 0..6 * MIN,
        rekey in any::<bool>(),
    ) {
        let p = policy(if noisy { NOISY } else { PLAIN });
        let spec = agg(&p);
        let mut state = WindowState::default();
        let absorb = |state: &mut WindowState, (offset, counter, mac, rssi): (i64, u8, u8, i64)| {
            let r = reading(T0 + offset, &format!("c-{counter}"), &format!("m-{mac}"), rssi, "z");
            state.absorb(spec, &r, T0 + offset);
        };
        for r in before {
            absorb(&mut state, r);
        }
        let mut whole = Vec::new();
        state.encode(&mut whole);
        state.forget_changes();
        for (i, r) in after.into_iter().enumerate() {
            absorb(&mut state, r);
            if i == 50 {
                state.release(spec, T0 + release_at, None);
                if rekey {
                    state.rekey(T0 + release_at);
                }
            }
        }
        let mut changes = Vec::new();
        state.encode_changes(&mut changes);
        let mut resumed = WindowState::decode(&whole).unwrap();
        resumed.apply_changes(&changes).unwrap();
        prop_assert_eq!(resumed, state);
    }

    /// Whatever the input, however often the windows are released and the pseudonymisation key
    /// changes, no group with fewer than k distinct contributors leaves, with or without noise.
    #[test]
    fn no_released_group_has_fewer_than_k_contributors(
        input in prop::collection::vec(arb_reading(), 0..300),
        k in 1u32..8,
        noisy in any::<bool>(),
        releases in prop::collection::vec(0..6 * MIN, 1..6),
        rekeys in prop::collection::vec(0..6 * MIN, 0..4),
    ) {
        let base = if noisy {
            NOISY.replace("daily_budget = 10.0", "daily_budget = 10000.0")
        } else {
            PLAIN.to_owned()
        };
        let p = policy(&base.replace("min_group_size = 3", &format!("min_group_size = {k}")));
        let spec = agg(&p);
        let mut state = WindowState::default();
        let mut budget = PoolBudget::default();
        let mut rng = SeededRandom::new(3);
        // The true contributors of each (window, counter), computed independently.
        let mut truth: BTreeMap<(i64, String), BTreeSet<u8>> = BTreeMap::new();
        let mut releases = releases;
        releases.sort_unstable();
        let mut released = Vec::new();
        let mut next = releases.into_iter().peekable();
        let mut rekeys = rekeys;
        rekeys.sort_unstable();
        let mut next_rekey = rekeys.into_iter().peekable();
        // Each rekey gives every device a new pseudonym.
        let mut generation = 0;
        for (i, (offset, counter, contributor, rssi)) in input.iter().enumerate() {
            let now = T0 + i as i64 * (6 * MIN) / 300;
            while let Some(at) = next.peek().copied().filter(|at| T0 + at <= now) {
                next.next();
                released.extend(state.release(spec, T0 + at, noising(&mut budget, &mut rng)).records);
            }
            while next_rekey.next_if(|at| T0 + at <= now).is_some() {
                state.rekey(now);
                generation += 1;
            }
            let t = T0 + offset;
            let pseudonym = format!("m-{contributor}@{generation}");
            let r = reading(t, &format!("c-{counter}"), &pseudonym, *rssi, "z");
            if state.absorb(spec, &r, now) == Absorbed::Counted {
                truth
                    .entry((t - t.rem_euclid(MIN), format!("c-{counter}")))
                    .or_default()
                    .insert(*contributor);
            }
        }
        released.extend(state.release(spec, T0 + 100 * MIN, noising(&mut budget, &mut rng)).records);
        for r in &released {
            let Value::Str(counter) = get(r, "counter_id") else { panic!() };
            let n = truth.get(&(r.event_time_ms, counter.to_string())).map_or(0, BTreeSet::len);
            prop_assert!(n >= k as usize, "group of {n} < k = {k} released: {r:?}");
        }
    }

    /// Arrival order within the allowed lateness does not change what is released.
    #[test]
    fn arrival_order_does_not_change_the_release(
        input in prop::collection::vec(arb_reading(), 0..200),
        seed in any::<u64>(),
    ) {
        let p = policy(&PLAIN.replace("allowed_lateness = \"30s\"", "allowed_lateness = \"10m\""));
        let spec = agg(&p);
        let records: Vec<Record> = input
            .iter()
            .map(|(o, c, m, rssi)| reading(T0 + o, &format!("c-{c}"), &format!("m-{m}"), *rssi, "z"))
            .collect();
        let mut shuffled = records.clone();
        // Fisher-Yates with a small deterministic generator.
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let run = |rs: &[Record]| {
            let mut s = WindowState::default();
            for r in rs {
                prop_assert_eq!(s.absorb(spec, r, T0 + 5 * MIN), Absorbed::Counted);
            }
            Ok(s.release(spec, T0 + 100 * MIN, None))
        };
        let a = run(&records)?;
        let b = run(&shuffled)?;
        prop_assert_eq!(a.records.len(), b.records.len());
        for (x, y) in a.records.iter().zip(&b.records) {
            prop_assert_eq!(x.event_time_ms, y.event_time_ms);
            for (name, v) in &x.fields {
                let w = get(y, name);
                match (v, w) {
                    // Sums of floats may differ in the last bits with the order.
                    (Value::Float(p), Value::Float(q)) => prop_assert!((p - q).abs() < 1e-9),
                    _ => prop_assert_eq!(v, w),
                }
            }
        }
    }
}
