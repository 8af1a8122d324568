//! End to end: the outbox under faults. A full disk freed again without a restart, and each of
//! the outbox's files damaged at random offsets (a byte flipped, a page zeroed, the file cut
//! short), on both engines: the gateway either
//! serves every record it serves correctly, with a Gap for whatever it cannot, or refuses to
//! start naming the file; it never truncates silently and never hands out a sequence twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hubgate_tests::durable::{durable_config, replay};
use hubgate_tests::{Gateway, Mosquitto, Publisher, gateway_bin, sequence_stream, wait_for};

/// Taken by each test of this file for its whole run: they load both cores (a flood of
/// messages onto a full disk, dozens of gateway starts), and one at a time each sees the timing
/// it waits for.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A small filesystem mounted for one test, unmounted when dropped.
struct SmallVolume(tempfile::TempDir);

impl SmallVolume {
    /// A tmpfs of `size` (e.g. "24m"), or `None` when this process may not mount (not root).
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mounted = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .is_ok_and(|out| out.status.success());
        mounted.then_some(Self(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for SmallVolume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// A full disk: commits fail, `/readyz` says why, nothing more is acknowledged; once space is
/// freed the gateway goes on by itself (the engine reopened), and every message is kept. Needs to
/// mount a small filesystem, so it runs as root (as `.ci/run` does) and says it skipped otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_recovered_without_a_restart_on_redb() {
    full_disk("engine = \"redb\"\nlog_bytes = \"1MiB\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_recovered_without_a_restart_on_sled() {
    full_disk("engine = \"sled\"").await;
}

async fn full_disk(store: &str) {
    const N: u64 = 60_000;
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(volume) = SmallVolume::mount("32m") else {
        eprintln!("SKIPPED a full disk test ({store}): mounting a tmpfs needs root");
        return;
    };
    let broker = Mosquitto::start();
    let data = volume.path().join("data");
    let cfg = durable_config(
        broker.port,
        "gw-full-disk",
        &data,
        &format!("{store}\nmax_bytes = \"64MiB\""),
        &sequence_stream("1d"),
    );
    let gw = Gateway::start(gateway_bin!(), &cfg);
    gw.wait_ready();
    let mut publisher = Publisher::connect(broker.port, "pub-full-disk");
    publisher.publish_numbers("test/seq", N / 3).await;
    // Fill the volume to the last byte.
    let filler = volume.path().join("filler");
    {
        use std::io::Write as _;
        let mut file = std::fs::File::create(&filler).expect("make the filler");
        let chunk = vec![0u8; 1 << 16];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
    }
    let more = tokio::spawn(async move {
        publisher.publish_numbers("test/seq", N).await;
        publisher
    });
    let mut reason = String::new();
    wait_for(
        "commits to fail on the full disk",
        Duration::from_secs(60),
        || {
            let (status, body) = hubgate_tests::http_get(gw.admin, "/readyz");
            reason = body;
            status == 503 && reason.contains("outbox commits are failing")
        },
    );
    eprintln!("full disk: /readyz said {reason:?}");
    std::fs::remove_file(&filler).expect("remove the filler");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while hubgate_tests::http_get(gw.admin, "/readyz").0 != 200 {
        let log = gw.log();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        assert!(
            std::time::Instant::now() < deadline,
            "{store}: the gateway did not go on after space was freed; its log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _publisher = more.await.expect("the publisher");
    let seen = replay(&gw, "seq", Duration::from_secs(30), |s| {
        s.numbers.len() as u64 == N
    })
    .await;
    let missing: Vec<u64> = (1..=N).filter(|n| !seen.numbers.contains_key(n)).collect();
    assert!(
        missing.is_empty(),
        "lost {} numbers, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(
        gw.metric(
            "hubgate_outbox_commit_failures_total",
            &[("reason", "error")]
        ) > 0.0
    );
    assert_eq!(gw.metric("hubgate_outbox_failing", &[]), 0.0);
    drop(gw);
}

/// A small xorshift generator: offsets vary from run to run, and the seed is printed so a failing
/// run can be replayed (`HUBGATE_FLIP_SEED`).
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let seed = std::env::var("HUBGATE_FLIP_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
                    | 1
            });
        eprintln!("damage: HUBGATE_FLIP_SEED={seed}");
        Self(seed)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// Every file under `dir` that holds at least one byte, relative to `dir`, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(at) = todo.pop() {
        for entry in std::fs::read_dir(&at).expect("read a directory").flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if entry.metadata().is_ok_and(|m| m.len() > 0) {
                out.push(path.strip_prefix(dir).expect("under dir").to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// Copies the directory tree `from` to `to` (created 0700).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("make a directory");
    std::fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("chmod");
    for entry in std::fs::read_dir(from).expect("read a directory").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// Damages `file` in one of three ways, by `round`: one byte flipped (half the time one of its
/// non-zero bytes, where data is, else any), a 4 KiB page written with zeros, or the file cut
/// short. Returns what was done.
fn damage(file: &Path, round: usize, rng: &mut Rng) -> String {
    let mut bytes = std::fs::read(file).expect("read the file");
    let what = match round % 3 {
        0 => {
            let data: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i] != 0).collect();
            let offset = if !data.is_empty() && rng.below(2) == 0 {
                data[rng.below(data.len())]
            } else {
                rng.below(bytes.len())
            };
            bytes[offset] ^= 1 + rng.below(255) as u8;
            format!("a byte flipped at offset {offset}")
        }
        1 => {
            let page = rng.below(bytes.len().div_ceil(4096)) * 4096;
            let end = (page + 4096).min(bytes.len());
            bytes[page..end].fill(0);
            format!("the page at offset {page} zeroed")
        }
        _ => {
            let len = rng.below(bytes.len());
            bytes.truncate(len);
            format!("cut to {len} bytes")
        }
    };
    std::fs::write(file, bytes).expect("write the file");
    what
}

/// What one damaged copy of the data directory did.
#[derive(Debug, Default)]
struct Outcomes {
    refused: u32,
    served_all: u32,
    served_with_gaps: u32,
}

/// Checks a gateway started on a damaged copy of a data directory (`data`): each record it serves
/// is the one stored under that sequence, every sequence up to `last` is served or inside a Gap,
/// none twice, a Gap is counted as damage and audited, and new records get sequences after
/// `last`. Returns whether there were gaps.
async fn check_served(
    gw: &Gateway,
    data: &Path,
    truth: &BTreeMap<u64, u64>,
    publisher: &mut Publisher,
    next_number: &mut u64,
    case: &str,
) -> bool {
    let last = *truth.keys().last().expect("records stored");
    gw.wait_ready();
    let seen = replay(gw, "seq", Duration::from_secs(5), |s| s.reached() >= last).await;
    let mut sorted = seen.sequences.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        seen.sequences.len(),
        "{case}: a sequence served twice"
    );
    for (sequence, n) in &seen.by_sequence {
        assert_eq!(
            truth.get(sequence),
            Some(n),
            "{case}: sequence {sequence} is not what was stored"
        );
    }
    let covered = |s: u64| {
        seen.by_sequence.contains_key(&s) || seen.gaps.iter().any(|g| g.0 <= s && s <= g.1)
    };
    let uncovered: Vec<u64> = (1..=last).filter(|s| !covered(*s)).collect();
    assert!(
        uncovered.is_empty(),
        "{case}: {} sequences neither served nor in a Gap (silent truncation), first {:?}; gaps {:?}\n{}",
        uncovered.len(),
        &uncovered[..uncovered.len().min(5)],
        seen.gaps,
        gw.log()
    );
    let lost = !seen.gaps.is_empty();
    if lost {
        assert!(
            gw.metrics()
                .contains("hubgate_outbox_records_damaged_total{"),
            "{case}: records lost without being counted as damaged; gaps {:?}",
            seen.gaps
        );
        let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap_or_default();
        assert!(
            audit.contains("\"outbox_records_lost\"") || audit.contains("\"outbox_damage_found\""),
            "{case}: records lost without an audit entry; gaps {:?}",
            seen.gaps
        );
    }
    // New records continue the numbering: no sequence handed out before comes again.
    let from = *next_number;
    for n in from..from + 3 {
        publisher
            .publish("test/seq", format!("{{\"n\": {n}}}"))
            .await;
    }
    *next_number += 3;
    let seen = replay(gw, "seq", Duration::from_secs(10), |s| {
        (from..from + 3).all(|n| s.numbers.contains_key(&n))
    })
    .await;
    for (sequence, n) in &seen.by_sequence {
        if *n >= from {
            assert!(
                *sequence > last,
                "{case}: new record {n} got sequence {sequence}, not after {last}"
            );
        }
    }
    assert!(
        (from..from + 3).all(|n| seen.numbers.contains_key(&n)),
        "{case}: new records were not served"
    );
    lost
}

/// A broker, and a gateway's data directory holding `n` numbered records of stream `seq` on
/// `engine`, the gateway killed (SIGKILL) once they were all served.
struct Stored {
    broker: Mosquitto,
    publisher: Publisher,
    client: String,
    store: String,
    /// The number each sequence carries.
    truth: BTreeMap<u64, u64>,
}

impl Stored {
    async fn make(engine: &str, n: u64, data: &Path) -> Self {
        let broker = Mosquitto::start();
        let stored = Self {
            publisher: Publisher::connect(broker.port, &format!("pub-{engine}")),
            client: format!("gw-{engine}"),
            store: format!("engine = {engine:?}"),
            broker,
            truth: BTreeMap::new(),
        };
        let gw = Gateway::start(gateway_bin!(), &stored.config(data));
        gw.wait_ready();
        let mut stored = stored;
        stored.publisher.publish_numbers("test/seq", n).await;
        let seen = replay(&gw, "seq", Duration::from_secs(30), |s| {
            s.numbers.len() as u64 == n
        })
        .await;
        assert_eq!(
            seen.numbers.len() as u64,
            n,
            "{engine}: every record stored"
        );
        gw.kill();
        stored.truth = seen.by_sequence;
        stored
    }

    /// The configuration of a gateway on the data directory `data`.
    fn config(&self, data: &Path) -> String {
        durable_config(
            self.broker.port,
            &self.client,
            data,
            &self.store,
            &sequence_stream("1d"),
        )
    }

    /// The last sequence stored.
    fn last(&self) -> u64 {
        *self.truth.keys().last().expect("records stored")
    }
}

/// Each file of the outbox damaged 6 times (or `HUBGATE_FLIPS`): a byte flipped, a page zeroed or
/// the file cut short, at random offsets, each on a fresh copy of a data directory left by a
/// SIGKILL (redb's log holds entries not yet folded) or by a clean stop.
async fn damaged_copies(engine: &str) {
    let _turn = ONE_AT_A_TIME.lock().await;
    const N: u64 = 2_000;
    let flips: usize = std::env::var("HUBGATE_FLIPS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(6);
    let mut rng = Rng::seeded();
    let home = hubgate_tests::private_dir();
    let pristine = home.path().join("pristine");
    let mut stored = Stored::make(engine, N, &pristine).await;
    // The same records after a clean stop (redb's log folded, sled flushed).
    let stopped = home.path().join("stopped");
    copy_tree(&pristine, &stopped);
    let gw = Gateway::start(gateway_bin!(), &stored.config(&stopped));
    gw.wait_ready();
    gw.stop();
    let mut next_number = N + 1;
    let mut outcomes = Outcomes::default();
    for (left, after) in [(&pristine, "a SIGKILL"), (&stopped, "a clean stop")] {
        for (index, file) in files_under(&left.join("outbox")).into_iter().enumerate() {
            for round in 0..flips {
                let data = home.path().join(format!("case-{index}-{round}"));
                copy_tree(left, &data);
                let what = damage(&data.join("outbox").join(&file), round, &mut rng);
                let case = format!("{engine}, after {after}: {} {what}", file.display());
                match Gateway::try_start(gateway_bin!(), &stored.config(&data)) {
                    Err(log) => {
                        let name = Path::new("outbox").join(&file);
                        let why = log
                            .lines()
                            .find(|l| l.starts_with("hubgate: error:"))
                            .unwrap_or_default();
                        assert!(
                            why.contains(&*name.to_string_lossy()),
                            "{case}: the gateway refused to start without naming the file:\n{log}"
                        );
                        eprintln!("{case}: refused: {why}");
                        outcomes.refused += 1;
                    }
                    Ok(gw) => {
                        if check_served(
                            &gw,
                            &data,
                            &stored.truth,
                            &mut stored.publisher,
                            &mut next_number,
                            &case,
                        )
                        .await
                        {
                            outcomes.served_with_gaps += 1;
                        } else {
                            outcomes.served_all += 1;
                        }
                    }
                }
                let _ = std::fs::remove_dir_all(&data);
            }
        }
    }
    eprintln!("damaged copies on {engine}: {outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_to_a_redb_outbox_gives_gaps_or_a_refusal_naming_the_file() {
    damaged_copies("redb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_to_a_sled_outbox_gives_gaps_or_a_refusal_naming_the_file() {
    damaged_copies("sled").await;
}

/// Runs `hubgate outbox ARGS`; its exit code and standard output.
fn outbox_tool(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let out = std::process::Command::new(gateway_bin!())
        .arg("outbox")
        .args(args)
        .output()
        .expect("run hubgate outbox");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_under(dir)
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(dir.join(&f)).expect("read a file");
            (f, bytes)
        })
        .collect()
}

/// `hubgate outbox verify` finds nothing in an intact outbox and names a damaged key slot and
/// the sequences it lost, leaving the directory as it was; `salvage` makes a data directory on
/// which a gateway serves the lost records as a Gap and numbers new ones after every sequence
/// handed out; an outbox that cannot be opened is exit code 2, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_salvage_a_damaged_outbox() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const N: u64 = 300;
    for engine in ["redb", "sled"] {
        let home = hubgate_tests::private_dir();
        let data = home.path().join("data");
        let stored = Stored::make(engine, N, &data).await;
        let last = stored.last();

        let (code, report) = outbox_tool(&["verify".as_ref(), data.as_os_str()]);
        assert_eq!(code, 0, "{engine}: an intact outbox: {report}");
        assert!(
            report.contains(&format!("{last} records readable")),
            "{report}"
        );

        // One byte of each data key held (64-byte slots, the key in the last 32 bytes).
        let keys = data.join("outbox/keys");
        let mut bytes = std::fs::read(&keys).unwrap();
        for slot in bytes.chunks_exact_mut(64).filter(|s| s[0] == 1) {
            slot[40] ^= 0x20;
        }
        std::fs::write(&keys, bytes).unwrap();
        let before = snapshot(&data);
        let (code, report) = outbox_tool(&["verify".as_ref(), data.as_os_str()]);
        assert_eq!(code, 1, "{engine}: {report}");
        assert!(report.contains("outbox/keys: slot "), "{report}");
        assert!(
            report.contains(&format!("sequences 1-{last} ({last} records) lost")),
            "{report}"
        );
        assert_eq!(
            snapshot(&data),
            before,
            "{engine}: verify changed the directory"
        );

        let salvaged = home.path().join("salvaged");
        let (code, report) = outbox_tool(&[
            "salvage".as_ref(),
            data.as_os_str(),
            "--into".as_ref(),
            salvaged.as_os_str(),
        ]);
        assert_eq!(code, 1, "{engine}: {report}");
        assert!(report.contains("salvaged into"), "{report}");
        let gw = Gateway::start(gateway_bin!(), &stored.config(&salvaged));
        gw.wait_ready();
        let seen = replay(&gw, "seq", Duration::from_secs(5), |s| s.reached() >= last).await;
        assert!(seen.by_sequence.is_empty(), "{engine}: {seen:?}");
        assert_eq!(seen.gaps, vec![(1, last)], "{engine}");
        stored
            .publisher
            .publish("test/seq", "{\"n\": 100000}")
            .await;
        let seen = replay(&gw, "seq", Duration::from_secs(10), |s| {
            s.numbers.contains_key(&100_000)
        })
        .await;
        let new = seen.by_sequence.iter().find(|(_, n)| **n == 100_000);
        assert!(
            new.is_some_and(|(sequence, _)| *sequence > last),
            "{engine}: a new record after salvage: {seen:?}"
        );
        drop(gw);
    }
    // An outbox redb cannot open: exit code 2, naming the file.
    let home = hubgate_tests::private_dir();
    let data = home.path().join("data");
    for dir in [&data, &data.join("outbox")] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    }
    std::fs::write(data.join("outbox/outbox.redb"), vec![0x5a; 64 << 10]).unwrap();
    let (code, report) = outbox_tool(&["verify".as_ref(), data.as_os_str()]);
    assert_eq!(code, 2, "{report}");
    assert!(report.contains("outbox/outbox.redb"), "{report}");
}
