//! REDbot (PyPI `redbot`, "lint for HTTP") against every endpoint of both servers: no note of
//! level WARN or BAD, except the ones README.md ("What REDbot says") explains. scripts/test.sh
//! installs REDbot into `target/redbot-venv` when it is missing.

use std::path::PathBuf;
use std::process::Command;

use crate::util::*;
use crate::web_api::start_serve;

/// Notes REDbot may give, each explained in README.md ("What REDbot says"): (path, note id).
const EXPLAINED: &[(&str, &str)] = &[];

fn redbot() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/redbot-venv/bin/redbot");
    assert!(
        bin.is_file(),
        "REDbot is missing ({}): run scripts/test.sh, which installs it (python3 -m venv \
         target/redbot-venv && target/redbot-venv/bin/pip install redbot)",
        bin.display()
    );
    bin
}

/// One URL through REDbot: the status it got and its WARN and BAD notes.
fn lint(redbot: &PathBuf, url: &str) -> (u64, Vec<(String, String)>) {
    let out = Command::new(redbot)
        .args(["-o", "har", url])
        .env("NO_PROXY", "127.0.0.1")
        .env("no_proxy", "127.0.0.1")
        .output()
        .expect("running redbot");
    let har: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "REDbot gave no HAR for {url} ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let entry = &har["log"]["entries"][0];
    let status = entry["response"]["status"].as_u64().unwrap_or(0);
    let notes = entry["_red_messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| matches!(m["level"].as_str(), Some("WARN" | "BAD")))
        .map(|m| {
            (
                m["note_id"].as_str().unwrap_or("?").to_string(),
                m["summary"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    (status, notes)
}

#[test]
fn redbot_finds_nothing_unexplained_on_either_server() {
    let redbot = redbot();
    let d = Dir::new();
    let updates = d.mkdir("updates");
    keygen(&d, "fleet");
    sample_payload(&d, "redbot");
    let image = build_image(
        &d,
        &updates,
        1_700_000_401,
        &["payload/box-config-daemon"],
        &["--sign-key", d.join("fleet.key").to_str().unwrap()],
    );
    let name = image.file_name().unwrap().to_string_lossy().into_owned();
    let server = start_update_server(&updates);
    wait_listed(server.port, 1_700_000_401);
    let b = BoxUnderTest::new(&d, "box", &server.url(""));
    let web = start_serve(&b, free_port(), &[]);

    let s = |p: &str| {
        (
            format!("http://127.0.0.1:{}{p}", server.port),
            p.to_string(),
        )
    };
    let w = |p: &str| {
        (
            format!("http://127.0.0.1:{}{p}", web.port),
            format!("box {p}"),
        )
    };
    // (url, label, the status it must get)
    let cases: Vec<((String, String), u64)> = vec![
        (s("/"), 200),
        (s("/ls"), 200),
        (s("/version"), 200),
        (s("/latest"), 303),
        (s(&format!("/update/{name}")), 200),
        (s(&format!("/update/{name}.sha256")), 200),
        (s(&format!("/update/{name}.minisig")), 200),
        (s("/update/opq-box-update-1.tar.bz2"), 404),
        (w("/"), 200),
        (w("/version"), 200),
        (w("/box_config"), 200),
        (w("/box_update/status"), 200),
        (w("/box_update/check"), 200),
        (w("/box_update"), 405),
        (w("/box_update/upload"), 405),
        (w("/no-such-page"), 404),
    ];
    // A few at a time: REDbot takes seconds per URL (it sends the request again conditionally,
    // ranged and compressed).
    let results: Vec<_> = std::thread::scope(|scope| {
        let cases = &cases;
        let redbot = &redbot;
        let handles: Vec<_> = (0..4)
            .map(|t| {
                scope.spawn(move || {
                    cases
                        .iter()
                        .skip(t)
                        .step_by(4)
                        .map(|((url, label), want)| (label.clone(), *want, lint(redbot, url)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut unexplained = Vec::new();
    for (label, want, (status, notes)) in &results {
        assert_eq!(status, want, "{label}: REDbot got {status}");
        for (id, summary) in notes {
            let path = label.split_whitespace().last().unwrap_or(label);
            if !EXPLAINED.iter().any(|(p, n)| *p == path && n == id) {
                unexplained.push(format!("{label}: {id}: {summary}"));
            }
        }
    }
    assert!(
        unexplained.is_empty(),
        "REDbot notes not explained in README.md:\n{}",
        unexplained.join("\n")
    );
    assert_eq!(results.len(), cases.len());
}
