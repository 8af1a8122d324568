//! `hubgate check` on real files.

use std::path::Path;
use std::process::Command;

use hubgate::decode::PayloadFormat;
use hubgate_tests::gateway_bin;

#[test]
fn check_reports_each_error_with_line_and_column_and_fails() {
    let fixture = hubgate_tests::repo().join("tests/fixtures/broken.toml");
    let out = Command::new(gateway_bin!())
        .arg("check")
        .arg(&fixture)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a broken config must fail the check");
    let text = String::from_utf8(out.stdout).unwrap();
    let name = fixture.display().to_string();
    for expected in [
        format!("{name}:4:1: error: unknown field 'precison'"),
        format!("{name}:11:15: error: unknown variant 'sustainability'"),
        format!("{name}:16:8: error: unknown variant 'blur'"),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }
    assert!(text.contains("rejected: 3 errors"), "{text}");
}

/// Every configuration shipped: `deploy/*.toml`, `examples/*/*.toml`, the one in the Kubernetes
/// ConfigMap, and the embedded default. The files they name under `/etc/hubgate/` are made for
/// the check.
#[test]
fn every_shipped_config_passes_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let repo = hubgate_tests::repo();
    let mut folders = vec![repo.join("deploy")];
    for entry in std::fs::read_dir(repo.join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            folders.push(path);
        }
    }
    let mut sources: Vec<(String, String)> = folders
        .iter()
        .flat_map(|folder| std::fs::read_dir(folder).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    assert!(sources.iter().any(|(name, _)| name == "senml.toml"));
    let manifest =
        std::fs::read_to_string(hubgate_tests::repo().join("deploy/kubernetes/hubgate.yaml"))
            .unwrap();
    sources.push((
        "configmap.toml".into(),
        configmap_file(&manifest, "hubgate.toml"),
    ));
    sources.push((
        "default_config.toml".into(),
        std::fs::read_to_string(hubgate_tests::repo().join("gateway/src/config/default.toml"))
            .unwrap(),
    ));
    assert!(sources.len() >= 3, "{sources:?}");
    let files: Vec<_> = sources
        .iter()
        .map(|(name, text)| {
            let path = dir.path().join(name);
            let secrets = dir.path().join(format!("{name}.secrets"));
            std::fs::write(&path, hubgate_tests::with_secret_files(text, &secrets)).unwrap();
            path
        })
        .collect();
    let out = Command::new(gateway_bin!())
        .args(["check", "--environment"])
        .args(&files)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches(": ok:").count(), files.len(), "{text}");
    assert!(!text.contains("not checked"), "{text}");
    // The space the outbox needs: the deployment's 2 GiB cap, its 8 MiB log and the overhead.
    assert!(
        text.contains(
            "hubgate.toml: the outbox needs up to 2568 MiB on the volume of /var/lib/hubgate"
        ),
        "{text}"
    );
}

/// The README's `check`, `dry-run` and `explain` commands, run as the README gives them from a
/// checkout (as `cargo run -- …` would run them), succeed: `check` validates the configuration
/// and its policy without the hub's files and names what it left out.
#[test]
fn the_readmes_commands_work_on_a_checkout() {
    let repo = hubgate_tests::repo();
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let mut ran = Vec::new();
    for line in readme.lines() {
        let Some(command) = line.strip_prefix("cargo run -- ") else {
            continue;
        };
        let args: Vec<&str> = command
            .split('#')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        if !["check", "dry-run", "explain"].contains(&args[0]) {
            continue;
        }
        // Commands that name a file of the reader's own (new.toml) are examples, not runnable.
        let named = args[1..].iter().filter(|a| !a.starts_with('-'));
        if !named.clone().all(|a| repo.join(a).exists()) {
            continue;
        }
        let out = Command::new(gateway_bin!())
            .args(&args)
            .current_dir(repo)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "`{command}` failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if args[0] == "check" {
            assert!(text.contains(": ok: "), "{text}");
            assert!(
                text.contains("not checked without --environment (run it on the hub): the files mqtt.password_file (/etc/hubgate/mqtt-password)"),
                "{text}"
            );
        }
        ran.push(args[0]);
    }
    ran.sort_unstable();
    ran.dedup();
    assert_eq!(ran, ["check", "dry-run", "explain"]);
}

/// `check --environment` on a machine that lacks what the configuration names: the missing
/// file, a data directory others can enter are errors; an address in use is a warning. Without
/// `--environment`, the same configuration passes and names what was not checked.
#[test]
fn check_environment_reports_what_the_hub_lacks() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = format!(
        "[mqtt]\nhost = \"127.0.0.1\"\nclient_id = \"env\"\nusername = \"hub\"\npassword_file = \"{missing}\"\n\n\
         [grpc]\nlisten = \"{busy}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [store]\ndata_dir = \"{data}\"\n\n\
         [[stream]]\nname = \"noise\"\ntopics = [\"city/noise/+\"]\npurpose = \"Map noise\"\n\
         legal_basis = \"legal obligation\"\nprinciples = [\"human_rights_equity_inclusion\"]\n\
         technology = \"tech__sound_level_meter\"\nretention = \"1d\"\n[stream.fields]\nlaeq_db = \"keep\"\n",
        missing = dir.path().join("absent-password").display(),
        busy = busy.local_addr().unwrap(),
        data = data.display(),
    );
    let path = dir.path().join("hub.toml");
    std::fs::write(&path, text).unwrap();

    let out = Command::new(gateway_bin!())
        .args(["check", "--environment"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("absent-password: No such file"), "{text}");
    assert!(text.contains("is open to others (mode 755)"), "{text}");
    assert!(
        text.contains(&format!(
            "warning: grpc.listen {} is in use",
            busy.local_addr().unwrap()
        )),
        "{text}"
    );
    assert!(text.contains(": rejected: 2 errors, "), "{text}");

    let out = Command::new(gateway_bin!())
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("the files mqtt.password_file ("), "{text}");
    assert!(
        text.contains(&format!("the data directory {}", data.display())),
        "{text}"
    );
    assert!(text.contains(": ok: 1 streams"), "{text}");
}

/// The text of `key` in the ConfigMap of a manifest: the block under `  key: |`, dedented.
fn configmap_file(manifest: &str, key: &str) -> String {
    let mut lines = manifest
        .lines()
        .skip_while(|l| l.trim() != format!("{key}: |"));
    assert!(lines.next().is_some(), "no {key} in the ConfigMap");
    let block: Vec<&str> = lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .collect();
    assert!(block.len() > 10, "{block:?}");
    block
        .iter()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn dry_run_explains_every_field_and_is_deterministic() {
    let run = || {
        Command::new(gateway_bin!())
            .arg("dry-run")
            .arg("--config")
            .arg(hubgate_tests::repo().join("deploy/hubgate.toml"))
            .arg("--input")
            .arg(hubgate_tests::repo().join("deploy/samples.jsonl"))
            .output()
            .unwrap()
    };
    let out = run();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text,
        String::from_utf8(run().stdout).unwrap(),
        "the same samples give the same output"
    );

    // No raw identifier from the samples is echoed.
    for raw in [
        "3C:22:FB:12:34:56",
        "3c22.fb12.3456",
        "ana.silva@example.org",
        "AB-123-CD",
        "52.3731",
        "/9j/",
    ] {
        assert!(!text.contains(raw), "{raw} appears in:\n{text}");
    }
    // The two notations of one MAC address give one pseudonym.
    let pseudonyms: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"mac\":\""))
        .map(|l| {
            l.split("\"mac\":\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(pseudonyms.len(), 2, "{text}");
    assert_eq!(pseudonyms[0], pseudonyms[1]);
    // Shown by a label, made under a key of that run alone: no one can recompute them from a
    // guessed address, neither under a well-known key nor under another run's.
    assert_eq!(pseudonyms[0], "pseudonym-1", "{text}");
    for mac in ["3C:22:FB:12:34:56", "3c:22:fb:12:34:56"] {
        let zero_key = hubgate_privacy::pseudonym::pseudonymise(
            &hubgate_privacy::pseudonym::Key::new([0; 32]),
            mac,
        );
        assert!(!text.contains(&zero_key[..12]), "{text}");
    }
    for expected in [
        "location.lat             generalised into the cell at 'cell', not passed",
        "firmware                 not declared: dropped",
        "mac                      pseudonymised",
        "vehicle_class            holds an identifier (plate): dropped",
        "payload is not valid JSON",
        "city/cctv/cam-7/frame → no stream takes this topic: dropped",
        // One device counted once per window, however its address is spelt.
        "left out of the windows (Bounded)",
        "summary: 7 samples, 3 records out, 1 into windows, 1 unrouted, 1 rejected whole",
        "into the window from 2024-01-01T00:00:00.000Z",
        "[counter_id=\"pc-01\"]: fewer than 10 contributors: suppressed",
        "windows: 0 groups released, 1 suppressed below the minimum group size",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

/// `hubgate dry-run` of `examples/formats/<name>.toml` over its samples: the report.
fn dry_run_example(name: &str) -> String {
    let dir = hubgate_tests::repo().join("examples/formats");
    let out = Command::new(gateway_bin!())
        .arg("dry-run")
        .arg("--config")
        .arg(dir.join(format!("{name}.toml")))
        .arg("--input")
        .arg(dir.join(format!("{name}-samples.jsonl")))
        .output()
        .expect("hubgate dry-run runs");
    let text = String::from_utf8(out.stdout).expect("the report is UTF-8");
    assert!(out.status.success(), "{text}");
    text
}

/// The records a dry-run report says would go out.
fn records_out(report: &str) -> Vec<&str> {
    report
        .lines()
        .filter_map(|l| l.trim().strip_prefix("out: "))
        .collect()
}

/// The SenML example: a JSON pack gives a reading per time, its device URN is pseudonymised, an
/// undeclared string is dropped unseen; a CBOR pack given in hex decodes; a bad pack is refused.
#[test]
fn dry_run_of_the_senml_example() {
    let text = dry_run_example("senml");
    for raw in ["0024befffe804ff", "ana.silva@example.org"] {
        assert!(!text.contains(raw), "{raw} appears in:\n{text}");
    }
    for expected in [
        "stream indoor_climate: reading 1 of 2, in: bn, t, temperature.v, temperature.u, humidity.v, humidity.u, occupant.vs",
        "occupant.vs              not declared: dropped",
        "\"temperature.v\":21.6} at 2024-01-01T00:01:00.000Z",
        "invalid SenML: v must be a number: dropped",
        "out: {\"bn\":\"cabinet-17:\",\"energy.s\":15234.5,\"energy.u\":\"Wh\",\"power.v\":412.0} at 2024-01-01T00:00:00.000Z",
        "in: t, <a name holding an identifier (eui64)>, <a name holding an identifier (eui64)>",
        "summary: 4 samples, 4 records out, 0 into windows, 0 unrouted, 1 rejected whole",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

/// The NGSI example over the Smart Data Models' own examples: the key-values and normalised
/// forms of one entity give the same record, locations leave only as cells, and a payload that is
/// not an entity is refused.
#[test]
fn dry_run_of_the_ngsi_example() {
    let text = dry_run_example("ngsi");
    let outputs = records_out(&text);
    assert_eq!(outputs.len(), 5, "{text}");
    assert_eq!(outputs[0], outputs[1], "key-values and normalised alike");
    assert!(outputs[0].contains("\"temperature\":12.2"), "{text}");
    assert!(
        outputs[2].contains("\"LAeq\":67.8") && outputs[2].ends_with("at 2016-12-28T11:00:00.000Z")
    );
    assert!(outputs[3].contains("\"intensity\":197"), "{text}");
    assert!(outputs[4].contains("\"status\":\"free\""), "{text}");
    for raw in ["40.4238", "-3.7122", "42.8491", "Plaza de Espa"] {
        assert!(!text.contains(raw), "{raw} appears in:\n{text}");
    }
    for expected in [
        "stream parking: in: id, type, location.lat, location.lon, name, refParkingSite, status",
        "payload is not an NGSI entity",
        "summary: 6 samples, 5 records out",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

/// The LoRaWAN example: the network servers' documented uplinks decode; the DevEUI and device id
/// leave only as pseudonyms, one per device; positions only as cells; the radio metadata only
/// where declared; the event time is the network server's; the wrong server's payload is refused.
#[test]
fn dry_run_of_the_lorawan_example() {
    let text = dry_run_example("lorawan");
    for raw in [
        "0101010101010101",
        "0004A30B001C0530",
        "00189440",
        "Test device",
        "\"dev1\"",
        "52.3731",
        "37.9715",
        "0016c001f153a14c",
    ] {
        assert!(!text.contains(raw), "{raw} appears in:\n{text}");
    }
    let outputs = records_out(&text);
    assert_eq!(outputs.len(), 4, "{text}");
    assert!(
        outputs[1].starts_with("{\"area\":\"881969c9b3fffff\",\"fillLevel\":73,\"lorawan.dev_eui\":\"pseudonym-1\",\"temperature\":18.5} at 2022-07-18T09:45:00.000Z"),
        "{text}"
    );
    assert!(
        outputs[0].contains("\"lorawan.dev_eui\":\"pseudonym-1\""),
        "{text}"
    );
    assert!(
        outputs[2].starts_with("{\"area\":\"37.97,23.72\",\"lorawan.device_id\":\"pseudonym-2\",\"lorawan.rssi\":-35,\"luminosity\":0.64,\"temperature\":1.0} at 2020-02-12T15:15:00.000Z"),
        "{text}"
    );
    assert!(
        outputs[3].contains("\"lorawan.device_id\":\"pseudonym-2\""),
        "{text}"
    );
    for expected in [
        "lorawan.f_cnt            not declared: dropped",
        "lorawan.gateway.lat      generalised into the cell at 'area', not passed",
        "lorawan.time             event time",
        "payload is not a LoRaWAN uplink event of the declared network server",
        "summary: 5 samples, 4 records out, 0 into windows, 0 unrouted, 1 rejected whole",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

/// The Sparkplug B example: the birth names the metrics, data by alias is read under the names,
/// a metric kept in the birth only as an e-mail never passes, and a node whose birth was never
/// seen gives no level.
#[test]
fn dry_run_of_the_sparkplug_example() {
    let text = dry_run_example("sparkplug");
    let outputs = records_out(&text);
    assert_eq!(
        outputs,
        [
            r#"{"Reservoir/Level":3.42,"edge_node":"pumping-station-3"} at 2024-01-01T00:00:00.000Z"#,
            r#"{"Reservoir/Level":3.39,"edge_node":"pumping-station-3"} at 2024-01-01T00:01:00.000Z"#,
            r#"{"Reservoir/Level":3.35,"edge_node":"pumping-station-3"} at 2024-01-01T00:02:00.000Z"#,
            r#"{"edge_node":"pumping-station-4"} at 2024-01-01T00:02:00.000Z"#,
        ],
        "{text}"
    );
    assert!(!text.contains("ana.silva"), "{text}");
    assert!(
        text.contains("Operator                 not declared: dropped"),
        "{text}"
    );
}

#[test]
fn dry_run_against_the_running_policy_shows_only_what_a_change_changes() {
    let old = hubgate_tests::repo().join("deploy/hubgate.toml");
    let dir = tempfile::tempdir().unwrap();
    let new = dir.path().join("new.toml");
    let source = std::fs::read_to_string(&old).unwrap();
    // The change: air quality now passes the firmware version, and footfall releases exact
    // counts of groups of any size.
    let noise = source.find("[stream.aggregate.noise]").unwrap();
    let noise_end = noise + source[noise..].find("\n\n").unwrap();
    let changed = format!("{}{}", &source[..noise], &source[noise_end..])
        .replacen("pm25 = \"keep\"", "pm25 = \"keep\"\nfirmware = \"keep\"", 1)
        .replace("min_group_size = 10 ", "min_group_size = 1 ");
    assert_ne!(changed, source);
    std::fs::write(&new, changed).unwrap();
    let run = |config: &Path, against: &Path| {
        let out = Command::new(gateway_bin!())
            .args(["dry-run", "--config"])
            .arg(config)
            .arg("--input")
            .arg(hubgate_tests::repo().join("deploy/samples.jsonl"))
            .arg("--against")
            .arg(against)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "{text}");
        text
    };
    let text = run(&new, &old);
    assert!(
        text.contains("sample 1, stream air_quality: newly passed: firmware"),
        "{text}"
    );
    assert!(text.contains("stream footfall, window"), "{text}");
    assert!(
        text.contains("[counter_id=\"pc-01\"]: newly released"),
        "{text}"
    );
    assert!(
        text.contains("1 fields newly passed, 0 newly dropped")
            && text.contains("1 groups newly released"),
        "{text}"
    );
    // Back the other way, the same changes reversed; against itself, none.
    let back = run(&old, &new);
    assert!(
        back.contains("newly dropped: firmware") && back.contains("newly suppressed"),
        "{back}"
    );
    assert!(run(&old, &old).contains("no difference in the output"));
    for raw in [
        "3C:22:FB:12:34:56",
        "ana.silva@example.org",
        "AB-123-CD",
        "2.4.1",
    ] {
        assert!(
            !text.contains(raw) && !back.contains(raw),
            "{raw} was echoed"
        );
    }
}

/// The committed corpus of hostile inputs (`tests/corpus/`) replayed through the payload decoder
/// and the configuration parser, called as library functions: every input gets an answer, never
/// a panic; the payloads that cannot be a reading are refused; every configuration error points
/// inside its file. (Run continuously by the property tests of `gateway/src/decode/mod.rs` and
/// `gateway/src/config/`; new crashers found there belong in this corpus.)
#[test]
fn the_hostile_corpus_is_answered_without_a_panic() {
    let corpus = hubgate_tests::repo().join("tests/corpus");
    let mut refused = Vec::new();
    let mut payloads: Vec<_> = std::fs::read_dir(corpus.join("payloads"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    payloads.sort();
    assert!(payloads.len() >= 20);
    for path in &payloads {
        let bytes = std::fs::read(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // Every decoder answers every input, whatever format it was written for.
        for format in [
            PayloadFormat::SenmlJson,
            PayloadFormat::SenmlCbor,
            PayloadFormat::Ngsi,
            PayloadFormat::SparkplugB,
        ] {
            let outcome = std::panic::catch_unwind(|| {
                hubgate::decode::Decoder::default().decode(format, "spBv1.0/g/NDATA/e", &bytes, 0)
            });
            let decoded = outcome.unwrap_or_else(|_| panic!("{format:?} panicked on {name}"));
            if let Err(err) = decoded {
                assert!(err.to_string().len() < 120, "{name}: {err}");
            }
        }
        let outcome = std::panic::catch_unwind(|| hubgate::decode::json(&bytes));
        let decoded = outcome.unwrap_or_else(|_| panic!("the decoder panicked on {name}"));
        if let Err(err) = decoded {
            // The error never quotes the payload.
            assert!(err.to_string().len() < 120, "{name}: {err}");
            refused.push(name);
        }
    }
    for must in [
        "bom.bin",
        "deep_objects.json",
        "duplicate_after_flatten.json",
        "empty.json",
        "invalid_utf8.bin",
        "jpeg_magic.bin",
        "lone_surrogate.json",
        "many_members.json",
        "nan_literal.json",
        "nul_bytes.bin",
        "png_magic.bin",
        "top_level_array.json",
        "top_level_string.json",
        "trailing_garbage.json",
        "unterminated.json",
        "utf16.bin",
        "whitespace_only.json",
    ] {
        assert!(refused.contains(&must.to_owned()), "{must} was accepted");
    }

    let mut configs: Vec<_> = std::fs::read_dir(corpus.join("configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    configs.sort();
    for path in &configs {
        let source = String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let outcome = std::panic::catch_unwind(|| hubgate::config::parse(&source));
        let parsed = outcome.unwrap_or_else(|_| panic!("the parser panicked on {name}"));
        let diagnostics = match parsed {
            Ok((_, warnings)) => warnings,
            Err(rejected) => rejected.diagnostics,
        };
        let lines = source.lines().count().max(1);
        for d in &diagnostics {
            let (line, column) = d.position(&source);
            assert!(
                (1..=lines + 1).contains(&line) && column >= 1,
                "{name}: {line}:{column} is outside the file"
            );
        }
        assert!(
            name == "crlf_and_tabs.toml" || !diagnostics.is_empty(),
            "{name} was taken without a word"
        );
    }
}

#[test]
fn run_reads_its_worker_threads_from_the_environment_and_refuses_zero() {
    let out = Command::new(gateway_bin!())
        // Were the variable not read, the run would stop at the missing file instead.
        .args(["run", "--config", "/nonexistent/hubgate.toml"])
        .env("HUBGATE_WORKER_THREADS", "0")
        .output()
        .expect("run hubgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("invalid value '0' for '--worker-threads"),
        "{stderr}"
    );
}

/// `hubgate dry-run` echoes no identifier from a sample's topic, and says only on which side of
/// k a group's number of contributors is.
#[test]
fn dry_run_masks_identifiers_in_topics_and_hides_exact_counts() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples.jsonl");
    std::fs::write(
        &samples,
        "{\"topic\": \"city/footfall/3C-22-FB-12-34-56/probe\", \"payload\": {\"counter_id\": \"pc-01\", \"mac\": \"3c:22:fb:12:34:56\", \"rssi\": -60, \"ts\": 1704067200}}\n\
         {\"topic\": \"city/footfall/pc-01/probe\", \"payload\": {\"counter_id\": \"pc-01\", \"mac\": \"3c:22:fb:12:34:57\", \"rssi\": -61, \"ts\": 1704067201}}\n",
    )
    .unwrap();
    let out = Command::new(gateway_bin!())
        .arg("dry-run")
        .arg("--config")
        .arg(hubgate_tests::repo().join("deploy/hubgate.toml"))
        .arg("--input")
        .arg(&samples)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert!(!text.to_lowercase().contains("3c-22-fb"), "{text}");
    assert!(
        text.contains("sample 1: city/footfall/<a name holding an identifier (mac)>/probe"),
        "{text}"
    );
    assert!(
        text.contains("fewer than 10 contributors: suppressed"),
        "{text}"
    );
    assert!(!text.contains("2 contributor"), "{text}");
}
