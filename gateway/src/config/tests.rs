use std::time::Duration;

use super::units::parse_byte_size;
use super::*;
use hubgate_privacy::Severity;

#[test]
fn the_default_config_is_valid() {
    let (config, warnings) =
        parse(DEFAULT_CONFIG).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(config.policy.streams().len(), 4);
}

#[test]
fn a_typo_is_reported_at_its_line_and_column() {
    let src = format!("[mqtt]\nhost = \"broker\"\n  precison = 7\n\n{DEFAULT_CONFIG}").replacen(
        "[mqtt]\nhost = \"127.0.0.1\"",
        "",
        1,
    );
    let err = parse(&src).unwrap_err();
    let errors: Vec<_> = err
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].message.starts_with("unknown field 'precison'"),
        "{}",
        errors[0].message
    );
    assert_eq!(errors[0].position(&src), (3, 3));
}

#[test]
fn store_sizes_take_units() {
    assert_eq!(parse_byte_size("512MiB"), Some(512 << 20));
    assert_eq!(parse_byte_size("2GB"), Some(2_000_000_000));
    assert_eq!(parse_byte_size("4096"), Some(4096));
    assert_eq!(parse_byte_size("1 GiB"), Some(1 << 30));
    assert_eq!(parse_byte_size("1.5GB"), None);
    assert_eq!(parse_byte_size("12parsecs"), None);
    let src = format!("[store]\nmax_bytes = \"8MiB\"\non_full = \"stop_acking\"\n{DEFAULT_CONFIG}");
    let (config, _) = parse(&src).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
    assert_eq!(config.store.max_bytes, 8 << 20);
    assert_eq!(config.store.on_full, OnFull::StopAcking);
    let src = format!("[store]\nmax_bytes = \"lots\"\n{DEFAULT_CONFIG}");
    let err = parse(&src).unwrap_err();
    assert_eq!(
        err.diagnostics[0].position(&src),
        (2, 13),
        "{:?}",
        err.diagnostics
    );
    assert!(err.diagnostics[0].message.contains("invalid size 'lots'"));
}

#[test]
fn commit_interval_is_a_duration_of_at_most_a_second() {
    let (config, _) = parse(DEFAULT_CONFIG).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
    assert_eq!(config.store.commit_interval, Duration::from_millis(1));
    let src = format!("[store]\ncommit_interval = \"10ms\"\n{DEFAULT_CONFIG}");
    let (config, _) = parse(&src).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
    assert_eq!(config.store.commit_interval, Duration::from_millis(10));
    assert_eq!(config.store.commit_interval_max, Duration::from_millis(10));
    let src = format!("[store]\ncommit_interval_max = \"2s\"\n{DEFAULT_CONFIG}");
    let err = parse(&src).unwrap_err();
    assert!(
        err.diagnostics[0]
            .message
            .contains("commit_interval_max must be at most 1s"),
        "{:?}",
        err.diagnostics
    );
    let src = format!("[store]\ncommit_interval = \"5s\"\n{DEFAULT_CONFIG}");
    let err = parse(&src).unwrap_err();
    assert!(
        err.diagnostics[0].message.contains("at most 1s"),
        "{:?}",
        err.diagnostics
    );
}

#[test]
fn footprint_settings_are_checked() {
    let (config, _) = parse(DEFAULT_CONFIG).unwrap();
    assert_eq!(config.footprint.grid_intensity_g_per_kwh, None);
    assert_eq!(config.footprint.embodied_kg, 30.0);
    let src = format!(
        "[footprint]\ngrid_intensity_g_per_kwh = 250.0\nembodied_kg = 4000.0\n{DEFAULT_CONFIG}"
    );
    let (config, _) = parse(&src).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
    assert_eq!(config.footprint.grid_intensity_g_per_kwh, Some(250.0));
    let src = format!(
        "[footprint]\nlifetime_years = 0.0\nhardware_share = 2.0\nidle_watts_per_vcpu = 5.0\n\
         sample_every = \"100ms\"\ngrid_zone = \"DE\"\n{DEFAULT_CONFIG}"
    );
    let err = parse(&src).unwrap_err();
    let messages: Vec<&str> = err.diagnostics.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(messages.len(), 5, "{messages:?}");
    assert!(messages.iter().any(|m| m.contains("sample_every")));
    assert!(
        messages
            .iter()
            .any(|m| m.contains("grid_zone names a zone"))
    );
    // Each error points at the key it is about.
    for d in &err.diagnostics {
        let key = &src[d.span.clone()];
        assert!(d.message.contains(key), "{d:?} points at '{key}'");
        assert_eq!(d.position(&src).1, 1, "{d:?}");
    }
    let lines: Vec<usize> = err.diagnostics.iter().map(|d| d.position(&src).0).collect();
    assert_eq!(lines, [2, 3, 4, 5, 6], "{messages:?}");
}

#[test]
fn a_shared_group_is_a_plain_name() {
    let with = |group: &str| {
        DEFAULT_CONFIG.replacen(
            "[mqtt]\n",
            &format!("[mqtt]\nshared_group = {group:?}\n"),
            1,
        )
    };
    let (config, _) = parse(&with("hubgate")).unwrap();
    assert_eq!(config.mqtt.shared_group.as_deref(), Some("hubgate"));
    for bad in ["", "a/b", "g+", "#"] {
        let e = parse(&with(bad)).unwrap_err().diagnostics;
        assert!(
            e.iter().any(|d| d.message.contains("mqtt.shared_group")),
            "{bad}"
        );
    }
}

#[test]
fn nats_settings_are_checked() {
    let with = |nats: &str| format!("[nats]\n{nats}\n{DEFAULT_CONFIG}");
    let (config, _) = parse(&with("url = \"nats://127.0.0.1:4222\"")).unwrap();
    let nats = config.nats.unwrap();
    assert_eq!(
        (nats.subject_prefix.as_str(), nats.jetstream.as_str()),
        ("hubgate", "HUBGATE")
    );
    assert!(nats.create_jetstream);
    let errors = |src: &str| -> Vec<String> {
        parse(&with(src))
            .unwrap_err()
            .diagnostics
            .into_iter()
            .map(|d| d.message)
            .collect()
    };
    let e = errors(
        "url = \"http://x:4222\"\nsubject_prefix = \"city.>\"\njetstream = \"a.b\"\nwindow = 0\nstreams = [\"nope\"]",
    );
    for expected in [
        "nats.url 'http://x:4222'",
        "nats.subject_prefix",
        "nats.jetstream",
        "nats.window",
        "nats.streams names 'nope'",
    ] {
        assert!(e.iter().any(|m| m.contains(expected)), "{expected}: {e:?}");
    }
    let e = errors("url = \"nats://x:4222\"\nca_file = \"/ca.pem\"");
    assert!(
        e.iter()
            .any(|m| m.contains("nats.ca_file needs a tls:// url"))
    );
    let e = errors("url = \"nats://user:secret@x:4222\"");
    assert!(e.iter().any(|m| m.contains("must not hold credentials")));
}

#[test]
fn upstream_settings_are_checked() {
    let with = |upstream: &str| format!("[upstream]\n{upstream}\n{DEFAULT_CONFIG}");
    let ok =
        with("endpoint = \"http://hub:50051\"\norigin = \"district-1\"\nstreams = [\"noise\"]");
    let (config, _) = parse(&ok).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
    let up = config.upstream.unwrap();
    assert_eq!((up.batch, up.window), (256, 4096));
    let errors = |src: &str| -> Vec<String> {
        parse(src)
            .unwrap_err()
            .diagnostics
            .into_iter()
            .map(|d| d.message)
            .collect()
    };
    let e = errors(&with(
        "endpoint = \"ftp://hub\"\norigin = \"district 1\"\nstreams = [\"weather\"]\nbatch = 0\n\
         cert_file = \"gw.crt\"",
    ));
    assert_eq!(e.len(), 6, "{e:?}");
    assert!(e.iter().any(|m| m.contains("must be https://host:port")));
    assert!(e.iter().any(|m| m.contains("need an https:// endpoint")));
    assert!(
        e.iter()
            .any(|m| m.contains("cert_file and upstream.key_file go together"))
    );
    assert!(e.iter().any(|m| m.contains("upstream.origin")));
    assert!(e.iter().any(|m| m.contains("'weather'")));
    assert!(e.iter().any(|m| m.contains("upstream.batch")));
    // Credentials in the endpoint would be printed by `explain`, the register and the log.
    let e = errors(&with(
        "endpoint = \"http://user:s3cret@hub:50051\"\norigin = \"district-1\"\nstreams = [\"noise\"]",
    ));
    assert!(
        e.iter().any(|m| m.contains("must not hold credentials")),
        "{e:?}"
    );
    assert!(e.iter().all(|m| !m.contains("s3cret")), "{e:?}");
}

#[test]
fn the_broker_packet_limit_is_asked_for() {
    let src = DEFAULT_CONFIG.replace("broker_max_packet_bytes = 262144", "");
    let (_, warnings) = parse(&src).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
    assert!(
        warnings
            .iter()
            .any(|w| w.message.contains("packet size limit is not declared")
                && w.message.contains("16777216")),
        "{warnings:?}"
    );
    let src = DEFAULT_CONFIG.replace(
        "broker_max_packet_bytes = 262144",
        "broker_max_packet_bytes = 268435455",
    );
    let (_, warnings) = parse(&src).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
    assert!(
        warnings
            .iter()
            .any(|w| w.message.contains("above what the gateway reads")),
        "{warnings:?}"
    );
}

#[test]
fn register_settings_are_checked() {
    let src = format!(
        "[register]\npublic_url = \"example.city/t\"\nend_date = \"31/12/2030\"\n{}",
        DEFAULT_CONFIG.replace("[register]", "[register_unused]")
    );
    // (The default's own [register] is renamed, so the one above is the only one.)
    let err = parse(&src).unwrap_err();
    let messages: Vec<&str> = err
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| d.message.as_str())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("public_url 'example.city/t'")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("end_date '31/12/2030'")),
        "{messages:?}"
    );
    // Every published string is scanned for URLs with credentials.
    let src = DEFAULT_CONFIG.replace(
        "contact = \"privacy@example.city\"",
        "contact = \"see https://ops:s3cret@city.example/contact\"",
    );
    let err = parse(&src).unwrap_err();
    assert!(
        err.diagnostics.iter().any(|d| d
            .message
            .contains("register.contact must not hold credentials")),
        "{:?}",
        err.diagnostics
    );
    assert!(
        err.diagnostics
            .iter()
            .all(|d| !d.message.contains("s3cret"))
    );
    // Without a controller: a warning, not an error.
    let src = DEFAULT_CONFIG.replace("controller = ", "# controller = ");
    let (config, warnings) = parse(&src).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
    assert_eq!(config.register.controller, None);
    assert!(
        warnings
            .iter()
            .any(|w| w.message.contains("names no controller"))
    );
}

#[test]
fn the_audit_retention_is_read_and_checked() {
    let (config, _) = parse(DEFAULT_CONFIG).unwrap();
    assert_eq!(config.audit.retention, DEFAULT_AUDIT_RETENTION);
    let (config, _) = parse(&format!("[audit]\nretention = \"400d\"\n{DEFAULT_CONFIG}")).unwrap();
    assert_eq!(config.audit.retention.as_secs(), 400 * 86_400);
    let src = format!("[audit]\nretention = \"2h\"\n{DEFAULT_CONFIG}");
    let err = parse(&src).unwrap_err();
    assert!(err.diagnostics.iter().any(|d| {
        d.message.contains("audit.retention must be at least 1 day")
            && d.position(&src) == (2, 1)
            && &src[d.span.clone()] == "retention"
    }));
}

#[test]
fn rate_limits_are_read_and_checked() {
    let with = |mqtt: &str| DEFAULT_CONFIG.replacen("[mqtt]\n", &format!("[mqtt]\n{mqtt}\n"), 1);
    let (config, _) = parse(&with(
        "rate_limit = { per_second = 2.0, burst = 20.0 }\n\
         device_rate_limit = { field = \"sensor.id\", per_second = 0.5, burst = 5.0 }",
    ))
    .unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
    let device = config.mqtt.device_rate_limit.unwrap();
    assert_eq!(device.field, "sensor.id");
    assert_eq!(config.mqtt.rate_limit.unwrap().burst, 20.0);
    let src = with(
        "rate_limit = { per_second = 0.0, burst = 20.0 }\n\
         device_rate_limit = { field = \"\", per_second = 1.0, burst = 0.5 }",
    );
    let messages: Vec<_> = parse(&src)
        .unwrap_err()
        .diagnostics
        .into_iter()
        .map(|d| d.message)
        .collect();
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("mqtt.rate_limit needs"))
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("mqtt.device_rate_limit needs"))
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("device_rate_limit.field"))
    );
    let src = with("device_rate_limit = { per_second = 1.0, burst = 5.0 }");
    assert!(parse(&src).is_err(), "the field is required");
}

#[test]
fn errors_in_several_sections_are_all_reported() {
    let src = "[grpc]\nlisten = \"nowhere\"\n[admin]\nport = 1\n[telemetry]\n";
    let err = parse(src).unwrap_err();
    let lines: Vec<_> = err
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| d.position(src).0)
        .collect();
    assert_eq!(lines, [1, 2, 4, 5], "{:?}", err.diagnostics);
    assert!(
        err.diagnostics
            .iter()
            .any(|d| d.message.contains("no [[stream]] is declared"))
    );
}

mod mangled {
    use super::*;
    use proptest::prelude::*;

    fn boundary(s: &str, at: usize) -> usize {
        let mut at = at.min(s.len());
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        at
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        /// A valid configuration with a piece cut off and a few characters inserted
        /// anywhere: the parser answers, never panics, and every diagnostic points inside
        /// the text.
        #[test]
        fn mangled_configurations_get_an_answer(
            insert in "[a-z0-9\\[\\]{}=\"', .#\n\t-]{0,12}",
            at in 0usize..6000,
            keep in 0usize..6000,
        ) {
            let mut src = DEFAULT_CONFIG.to_owned();
            let at = boundary(&src, at);
            src.insert_str(at, &insert);
            let keep = boundary(&src, keep.max(at));
            src.truncate(keep);
            let diagnostics = match parse(&src) {
                Ok((_, warnings)) => warnings,
                Err(rejected) => rejected.diagnostics,
            };
            let lines = src.lines().count().max(1);
            for d in &diagnostics {
                let (line, column) = d.position(&src);
                prop_assert!((1..=lines + 1).contains(&line) && column >= 1, "{line}:{column}");
            }
        }
    }
}

/// Errors found after parsing (values out of range, names the policy does not know) point at the
/// key that holds the value, in every section, not at the section's header.
#[test]
fn semantic_errors_point_at_their_key() {
    let streams = &DEFAULT_CONFIG[DEFAULT_CONFIG.find("[[stream]]").unwrap()..];
    let src = format!(
        "[mqtt]\nhost = \"broker\"\nqueue_capacity = 0\n\
         [store]\nmax_bytes = 1024\n\
         [grpc]\nmax_subscribers = 0\n\
         [[grpc.token]]\nname = \"ok\"\nsha256 = \"not-a-digest\"\nstreams = [\"air_quality\", \"nope\"]\n\
         [upstream]\nendpoint = \"ftp://hub\"\norigin = \"d1\"\n\
         [nats]\nurl = \"nats://n:4222\"\nwindow = 0\n\
         [register]\npublic_url = \"gopher://x\"\n\
         {streams}"
    );
    let err = parse(&src).unwrap_err();
    let at: Vec<(usize, usize, &str)> = err
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| {
            let (line, column) = d.position(&src);
            (line, column, &src[d.span.clone()])
        })
        .collect();
    assert_eq!(
        at,
        [
            (3, 1, "queue_capacity"),
            (5, 1, "max_bytes"),
            (7, 1, "max_subscribers"),
            (10, 1, "sha256"),
            (11, 27, "\"nope\""),
            (13, 1, "endpoint"),
            (17, 1, "window"),
            (19, 1, "public_url"),
        ],
        "{:?}",
        err.diagnostics
    );
}
