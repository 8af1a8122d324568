//! The policy reference (`docs/policy-reference.md`) against the parser: every key and value the
//! parser accepts is in the reference, and the reference lists nothing the parser refuses. The
//! parser's own lists come from its error messages ("unknown field 'zzz', expected one of …"), so
//! this test needs no copy of them.

use std::collections::BTreeSet;

/// A stream with every required key; `{header}` adds keys, `{tables}` adds tables after it.
fn stream(header: &str, tables: &str) -> String {
    format!(
        "[[stream]]\nname = \"a\"\ntopics = [\"x/#\"]\npurpose = \"p\"\nlegal_basis = \"l\"\n\
         principles = [\"sustainability_resilience\"]\nretention = \"1d\"\n{header}\n\n\
         [stream.fields]\nv = \"keep\"\nw = \"pseudonymise\"\n\n{tables}"
    )
}

/// What the parser says it expected instead of `zzz` in `source`.
fn expected(source: &str) -> BTreeSet<String> {
    let rejected = hubgate::config::parse(source).expect_err("zzz is refused");
    let message = rejected
        .diagnostics
        .iter()
        .map(|d| d.message.as_str())
        .find(|m| m.contains("'zzz'"))
        .unwrap_or_else(|| panic!("no message about zzz in {:?}", rejected.diagnostics));
    let list = message
        .split_once("expected")
        .unwrap_or_else(|| panic!("no list in {message:?}"))
        .1;
    let names: BTreeSet<String> = list
        .split('\'')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert!(!names.is_empty(), "{message}");
    names
}

/// The backquoted first cells of the tables under `heading` in the reference, up to the next
/// heading.
fn documented(reference: &str, heading: &str) -> BTreeSet<String> {
    let mut lines = reference.lines().skip_while(|l| l.trim() != heading);
    assert!(lines.next().is_some(), "no {heading:?} in the reference");
    lines
        .take_while(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with("| `"))
        .map(|l| l[3..].split('`').next().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn the_policy_reference_lists_exactly_what_the_parser_accepts() {
    let reference =
        std::fs::read_to_string(hubgate_tests::repo().join("docs/policy-reference.md")).unwrap();
    let aggregate = "[stream.aggregate]\nwindow = \"1h\"\ncontributor = \"w\"\n";
    let measures = "[stream.aggregate.measures]\nn = \"count\"\n";
    let cases: Vec<(&str, String)> = vec![
        ("## `[[stream]]`", stream("zzz = 1", "")),
        (
            "## `[stream.identifiers]`",
            stream("", "[stream.identifiers]\nzzz = 1\n"),
        ),
        (
            "## `[stream.aggregate]`",
            stream("", &format!("{aggregate}zzz = 1\n{measures}")),
        ),
        (
            "### `[stream.aggregate.measures]`",
            stream(
                "",
                &format!(
                    "{aggregate}[stream.aggregate.measures]\nn = {{ fn = \"count\", zzz = 1 }}\n"
                ),
            ),
        ),
        (
            "### `[stream.aggregate.noise]`",
            stream(
                "",
                &format!("{aggregate}{measures}[stream.aggregate.noise]\nzzz = 1\n"),
            ),
        ),
        ("### `format`", stream("format = \"zzz\"", "")),
        (
            "### `principles`",
            stream("", "").replace("[\"sustainability_resilience\"]", "[\"zzz\"]"),
        ),
        (
            "### `identifiers.action`",
            stream("", "[stream.identifiers]\naction = \"zzz\"\n"),
        ),
        (
            "### `identifiers.detect`",
            stream("", "[stream.identifiers]\ndetect = [\"zzz\"]\n"),
        ),
        (
            "### `fn`",
            stream(
                "",
                &format!("{aggregate}[stream.aggregate.measures]\nn = \"zzz\"\n"),
            ),
        ),
    ];
    for (heading, source) in &cases {
        let parser = expected(source);
        let docs = documented(&reference, heading);
        let undocumented: Vec<&String> = parser.difference(&docs).collect();
        let unknown: Vec<&String> = docs.difference(&parser).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "{heading}: accepted but not in the reference: {undocumented:?}; in the reference but refused: {unknown:?}"
        );
    }

    // Treatments: the first table of [stream.fields] names them, and each table form's keys.
    let fields = documented(&reference, "## `[stream.fields]`");
    let treatment = expected(&stream("", "").replace("v = \"keep\"", "v = \"zzz\""));
    let h3 = expected(&stream("", "").replace("v = \"keep\"", "v = { h3 = { zzz = 1 } }"));
    let grid = expected(&stream("", "").replace("v = \"keep\"", "v = { grid = { zzz = 1 } }"));
    for name in treatment.iter().chain(&h3).chain(&grid) {
        assert!(
            fields.contains(name),
            "'{name}' is not in [stream.fields]'s tables"
        );
    }
    let all: BTreeSet<&String> = treatment.iter().chain(&h3).chain(&grid).collect();
    for name in &fields {
        assert!(
            all.contains(name),
            "[stream.fields] lists '{name}', which the parser refuses"
        );
    }
}

/// The blocks of `lang` in a Markdown text.
fn blocks<'a>(text: &'a str, lang: &str) -> Vec<&'a str> {
    let fence = format!("```{lang}\n");
    text.split(fence.as_str())
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap_or_default())
        .collect()
}

/// The getting-started guide's configuration passes the check, and its sample does in a dry run
/// what the guide says.
#[test]
fn the_getting_started_guide_does_what_it_says() {
    let guide =
        std::fs::read_to_string(hubgate_tests::repo().join("docs/getting-started.md")).unwrap();
    let configs = blocks(&guide, "toml");
    assert_eq!(configs.len(), 1);
    let (config, warnings) = hubgate::config::parse(configs[0])
        .unwrap_or_else(|r| panic!("the guide's configuration: {:?}", r.diagnostics));
    // Tokens come in step 5.
    let warnings: Vec<&str> = warnings.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(
        warnings,
        ["the gRPC API is open to anyone who can reach it: give clients tokens ([[grpc.token]])"]
    );
    let sample = blocks(&guide, "json")
        .into_iter()
        .find(|b| b.contains("\"topic\""))
        .expect("a dry-run sample");
    let report = hubgate::tools::dry_run::run(&config.policy, sample.as_bytes()).unwrap();
    for expected in [
        "firmware                 not declared: dropped",
        "operator                 not declared: dropped",
        "location.lat             generalised into the cell at 'neighbourhood', not passed",
        "summary: 1 samples, 1 records out",
    ] {
        assert!(
            report.contains(expected),
            "missing {expected:?} in:\n{report}"
        );
    }
    assert!(!report.contains("ana.silva"), "{report}");
}
