//! The register as an HTML page (`/transparency`): a layered notice (EDPB Guidelines 3/2019): key
//! facts first, with a QR code to the page itself, then each stream's details. It is one
//! self-contained document (no script, no external resource), readable on a phone, navigable
//! with a screen reader (landmarks, headings, captioned tables), and printed it becomes a sign:
//! the key facts and the QR code, large.

use std::fmt::Write as _;

use qrcode::QrCode;
use qrcode::render::svg;

use super::{Element, NOT_DECLARED, Register, StreamEntry, plain_duration};

/// Escapes text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An inline SVG QR code of `url`, or nothing if it is too long to encode.
fn qr_svg(url: &str) -> Option<String> {
    let code = QrCode::new(url.as_bytes()).ok()?;
    let image = code
        .render::<svg::Color<'_>>()
        .min_dimensions(180, 180)
        .quiet_zone(true)
        .build();
    // Inline in the page: without the XML declaration.
    Some(match image.find("<svg") {
        Some(start) => image[start..].to_owned(),
        None => image,
    })
}

const STYLE: &str = r#"
:root { --ink: #1a1a1a; --muted: #4a4a4a; --line: #c8c8c8; --accent: #0b5394; --soft: #f3f6fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 1.05rem/1.55 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); background: #fff; }
header, main, footer { max-width: 56rem; margin: 0 auto; padding: 0 1rem; }
header { padding-top: 1.5rem; }
h1 { font-size: 1.7rem; line-height: 1.25; margin: 0 0 .5rem; }
h2 { font-size: 1.35rem; margin: 2rem 0 .5rem; border-bottom: 2px solid var(--accent); padding-bottom: .2rem; }
h3 { font-size: 1.1rem; margin: 1.2rem 0 .4rem; }
a { color: var(--accent); }
a:focus, summary:focus { outline: 3px solid #f0a500; outline-offset: 2px; }
.lead { color: var(--muted); margin-top: 0; }
.sign { background: var(--soft); border: 1px solid var(--line); border-radius: .5rem; padding: 1rem; display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
.sign h2 { margin-top: 0; width: 100%; }
.facts { flex: 1 1 20rem; margin: 0; padding-left: 1.2rem; }
.facts li { margin-bottom: .6rem; }
.qr { flex: 0 0 auto; margin: 0; text-align: center; max-width: 12rem; }
.qr svg { width: 11rem; height: 11rem; }
.qr figcaption { font-size: .85rem; word-break: break-all; }
dl { display: grid; grid-template-columns: minmax(8rem, 14rem) 1fr; gap: .3rem 1rem; margin: .5rem 0; }
dt { font-weight: 600; }
dd { margin: 0; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0; }
caption { text-align: left; color: var(--muted); font-size: .9rem; padding-bottom: .3rem; }
th, td { border: 1px solid var(--line); padding: .4rem .5rem; text-align: left; vertical-align: top; }
th { background: var(--soft); }
code { font-size: .9em; overflow-wrap: anywhere; }
.nowrap { white-space: nowrap; }
.badge { display: inline-block; border: 1px solid var(--ink); border-radius: .3rem; padding: 0 .35rem; font-size: .85rem; font-weight: 600; }
footer { color: var(--muted); font-size: .9rem; border-top: 1px solid var(--line); margin-top: 2.5rem; padding-top: 1rem; padding-bottom: 2rem; }
@media (max-width: 40rem) {
  dl { grid-template-columns: 1fr; }
  dt { margin-top: .4rem; }
  .qr { margin: 0 auto; }
}
@media print {
  @page { margin: 1.5cm; }
  body { font-size: 15pt; }
  .details, footer nav { display: none; }
  h1 { font-size: 28pt; }
  .sign { border: 3px solid #000; background: none; }
  .qr svg { width: 6cm; height: 6cm; }
  a { color: #000; text-decoration: none; }
}
"#;

/// Renders the register as a page whose QR code and canonical link point to `page_url`.
pub fn render(register: &Register, page_url: &str) -> String {
    let mut out = String::with_capacity(16 * 1024);
    head(&mut out, register, page_url);
    key_facts(&mut out, register, page_url);
    accountable(&mut out, register);
    for s in &register.streams {
        stream_details(&mut out, s);
    }
    let _ = write!(out, "</div>\n</main>\n");
    let _ = write!(
        out,
        "<footer>\n<p>Generated from policy <code>{hash}</code>, loaded {loaded}, by {software}. \
         The same hash is on every published record and in the hub's audit log.</p>\n\
         <nav aria-label=\"Other formats\"><a href=\"/transparency.json\">Machine-readable register (JSON)</a> · \
         <a href=\"/processing-record\">Record of processing activities (GDPR Art. 30)</a></nav>\n</footer>\n</body>\n</html>\n",
        hash = esc(&register.policy_hash),
        loaded = esc(&register.loaded_at),
        software = esc(&register.software),
    );
    out
}

/// A fact the configuration may leave out, escaped.
fn or_not(o: Option<&str>) -> String {
    esc(o.unwrap_or(NOT_DECLARED))
}

/// The document's head and the page's header.
fn head(out: &mut String, register: &Register, page_url: &str) {
    let place = register.location.as_deref().unwrap_or("this place");
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"policy-hash\" content=\"{hash}\">\n\
         <title>Sensors and data at {place}: transparency notice</title>\n\
         <link rel=\"canonical\" href=\"{url}\">\n\
         <link rel=\"alternate\" type=\"application/json\" href=\"/transparency.json\">\n\
         <style>{STYLE}</style>\n</head>\n<body>\n",
        hash = esc(&register.policy_hash),
        place = esc(place),
        url = esc(page_url),
    );
    let _ = write!(
        out,
        "<header>\n<h1>Sensors and data at {}</h1>\n<p class=\"lead\">What the sensors here \
         collect, why, what is done to protect your privacy, who receives it and how long it is \
         kept. Run by {}. This notice is generated from the rules the hub is running.</p>\n</header>\n<main>\n",
        esc(place),
        or_not(register.accountable.controller.as_deref()),
    );
}

/// Layer one: the key facts, with the QR code (this is what a printed sign shows).
fn key_facts(out: &mut String, register: &Register, page_url: &str) {
    let _ = write!(
        out,
        "<section class=\"sign\" aria-labelledby=\"key-facts\">\n<h2 id=\"key-facts\">Key facts</h2>\n<ul class=\"facts\">\n"
    );
    for s in &register.streams {
        let _ = writeln!(
            out,
            "<li><strong>{tech}</strong> ({name}): {purpose}. <span class=\"nowrap\">Personal data: <span class=\"badge\">{personal}</span>.</span> Kept for {kept}.</li>",
            tech = esc(&s.technology.title),
            name = esc(&s.name),
            purpose = esc(s.purpose.trim_end_matches('.')),
            personal = if s.personal_data { "yes" } else { "no" },
            kept = esc(&plain_duration(std::time::Duration::from_secs(
                s.retention_seconds
            ))),
        );
    }
    let _ = writeln!(
        out,
        "<li>Questions or objections: {}</li>\n</ul>",
        or_not(register.accountable.contact.as_deref())
    );
    let _ = writeln!(out, "<figure class=\"qr\">");
    if let Some(svg) = qr_svg(page_url) {
        let _ = writeln!(
            out,
            "<div role=\"img\" aria-label=\"QR code linking to this notice\">{svg}</div>"
        );
    }
    let _ = write!(
        out,
        "<figcaption>Full notice: <a href=\"{url}\">{url}</a></figcaption>\n</figure>\n</section>\n",
        url = esc(page_url)
    );
}

/// Layer two opens with who is accountable.
fn accountable(out: &mut String, register: &Register) {
    let _ = write!(
        out,
        "<div class=\"details\">\n<section aria-labelledby=\"accountable\">\n<h2 id=\"accountable\">Who is accountable</h2>\n<dl>\n\
         <dt>Controller</dt><dd>{}</dd>\n<dt>Contact</dt><dd>{}</dd>\n<dt>Data protection officer</dt><dd>{}</dd>\n\
         <dt>Location</dt><dd>{}</dd>\n<dt>Planned end</dt><dd>{}</dd>\n</dl>\n</section>\n",
        or_not(register.accountable.controller.as_deref()),
        or_not(register.accountable.contact.as_deref()),
        or_not(register.accountable.dpo_contact.as_deref()),
        or_not(register.location.as_deref()),
        esc(register.end_date.as_deref().unwrap_or("none planned")),
    );
}

/// One stream's section of layer two: its facts, the data it collects, and the DTPR elements.
fn stream_details(out: &mut String, s: &StreamEntry) {
    let id = format!("stream-{}", s.name);
    let _ = write!(
        out,
        "<section aria-labelledby=\"{id}\">\n<h2 id=\"{id}\">{} <small>({})</small></h2>\n<dl>\n",
        esc(&s.technology.title),
        esc(&s.name),
    );
    let mut dd = |k: &str, v: &str| {
        let _ = writeln!(out, "<dt>{k}</dt><dd>{v}</dd>");
    };
    dd("Technology", &technology_text(&s.technology));
    dd("Purpose", &esc(&s.purpose));
    dd("Legal basis", &esc(&s.legal_basis));
    let principles: Vec<String> = s.principles.iter().map(|p| esc(&p.title)).collect();
    dd("Guideline principles", &principles.join("; "));
    dd(
        "Personal data",
        &format!(
            "<span class=\"badge\">{}</span> {}",
            if s.personal_data { "yes" } else { "no" },
            esc(&s.personal_data_note)
        ),
    );
    dd("Time", &esc(&s.time));
    dd("Release", &esc(&s.release));
    let _ = writeln!(out, "</dl>");
    data_collected(out, s);
    for (heading, elements) in [
        ("How it is processed", &s.processing),
        ("Where it is stored", &s.storage),
        ("Who can see it", &s.access),
    ] {
        let _ = write!(out, "<h3>{heading}</h3>\n<ul>\n");
        for e in elements {
            let _ = writeln!(out, "<li>{}</li>", element_text(e));
        }
        let _ = writeln!(out, "</ul>");
    }
    let _ = write!(
        out,
        "<h3>How long it is kept</h3>\n<p>{}</p>\n</section>\n",
        element_text(&s.retention)
    );
}

/// The table of the fields a stream reads, and the fields it publishes.
fn data_collected(out: &mut String, s: &StreamEntry) {
    let _ = write!(
        out,
        "<h3>Data collected</h3>\n<table>\n<caption>Fields read from each reading of {name}. {dropped}</caption>\n\
         <thead><tr><th scope=\"col\">Field</th><th scope=\"col\">What happens to it</th></tr></thead>\n<tbody>\n",
        name = esc(&s.name),
        dropped = esc(&s.data_dropped),
    );
    for f in &s.data_collected {
        let _ = writeln!(
            out,
            "<tr><th scope=\"row\"><code>{}</code></th><td>{}</td></tr>",
            esc(&f.field),
            esc(&f.description)
        );
    }
    let published: Vec<String> = s
        .data_published
        .iter()
        .map(|f| format!("<code>{}</code>", esc(f)))
        .collect();
    let _ = write!(
        out,
        "</tbody>\n</table>\n<p>Published fields: {}.</p>\n",
        published.join(", ")
    );
}

fn element_text(e: &Element) -> String {
    let id = e
        .dtpr
        .as_ref()
        .map(|d| format!(" <code>{}</code>", esc(d)))
        .unwrap_or_default();
    format!(
        "<strong>{}</strong>{id}: {}",
        esc(&e.title),
        esc(&e.description)
    )
}

fn technology_text(e: &Element) -> String {
    let id = e
        .dtpr
        .as_ref()
        .map(|d| format!(" <code>{}</code>", esc(d)))
        .unwrap_or_default();
    format!("{}{id}. {}", esc(&e.title), esc(&e.description))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_CONFIG, parse};

    #[test]
    fn the_page_is_escaped_and_carries_the_hash_and_a_qr_code() {
        let (mut config, _) = parse(DEFAULT_CONFIG).unwrap();
        config.register.location = Some("Square <script>alert(1)</script> & Co".to_owned());
        let register = Register::new(&config, "2026-11-25T09:00:00Z");
        let page = render(&register, "https://example.city/t?a=1&b=<2>");
        assert!(page.starts_with("<!doctype html>\n<html lang=\"en\">"));
        assert!(!page.contains("<script>"), "text must be escaped");
        assert!(page.contains("Square &lt;script&gt;alert(1)&lt;/script&gt; &amp; Co"));
        assert!(page.contains(&format!("content=\"{}\"", register.policy_hash)));
        assert!(page.contains("https://example.city/t?a=1&amp;b=&lt;2&gt;"));
        assert!(
            page.contains("<svg") && page.contains("aria-label=\"QR code linking to this notice\"")
        );
        assert!(page.contains("name=\"viewport\""));
        assert!(page.contains("@media print"));
        for s in &register.streams {
            assert!(page.contains(&format!("id=\"stream-{}\"", s.name)));
        }
    }
}
