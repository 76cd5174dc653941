//! The fleet protocol, version 1, between `box-updater` and `update-server`: the headers a box
//! sends on every request, and the report it posts after each update attempt. Both sides use
//! these types, so what one writes the other reads. README.md ("The fleet protocol") is its
//! description for people.
//!
//! Everything is optional for the server: a request without the headers is an old box's, and a
//! server that does not know `/report` answers 404, after which a box stops sending reports to it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::updater::status::Step;

/// The report format's version; a server refuses others with 400.
pub const PROTOCOL_VERSION: u32 = 1;
/// The box's id (see [`valid_id`]).
pub const HEADER_ID: &str = "X-OPQ-Box-Id";
/// The version the box runs, or `none`.
pub const HEADER_VERSION: &str = "X-OPQ-Box-Version";
/// The box's update step, as `box-updater status` names it (`idle`, `downloading`, ...).
pub const HEADER_STATE: &str = "X-OPQ-Box-State";
/// Where reports go: `POST <updates_ep>/report`.
pub const REPORT_PATH: &str = "/report";
/// The largest report body taken; a larger one is refused unread (413).
pub const MAX_REPORT_BYTES: u64 = 4096;
/// The longest id.
pub const MAX_ID_LEN: usize = 64;
/// The longest message, in characters; a box shortens longer ones before sending.
pub const MAX_MESSAGE_CHARS: usize = 1000;
/// Durations a report may carry: one per step, each below 30 days.
const MAX_DURATION_MS: u64 = 30 * 24 * 3600 * 1000;

/// Whether `id` can name a box: 1 to 64 characters of `A-Z a-z 0-9 . _ : -`. Ids travel in a
/// header and a URL-less JSON string, are shown on the operator's page and stored in a database:
/// a narrow alphabet keeps every one of those trivially safe.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// A step by its protocol name.
pub fn parse_step(name: &str) -> Option<Step> {
    Step::ALL.into_iter().find(|s| s.name() == name)
}

/// What a box says about itself in its request headers. Values that do not parse are taken as
/// absent: a request is never refused for them, the box is then only less well known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BoxHeaders<'a> {
    pub id: Option<&'a str>,
    pub version: Option<u64>,
    pub state: Option<Step>,
}

impl<'a> BoxHeaders<'a> {
    /// Reads the headers through `get` (a request's header lookup).
    pub fn parse(get: impl Fn(&str) -> Option<&'a str>) -> Self {
        BoxHeaders {
            id: get(HEADER_ID).filter(|id| valid_id(id)),
            version: get(HEADER_VERSION)
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|&v| v > 0),
            state: get(HEADER_STATE).and_then(parse_step),
        }
    }
}

/// How an update attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The new release came up healthy after the reboot and is kept.
    Committed,
    /// The attempt stopped before or at the switch; the box runs what it ran before.
    Failed,
    /// The new release did not come up (or was rolled back by hand); the box went back.
    RolledBack,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::Failed => "failed",
            Outcome::RolledBack => "rolled_back",
        }
    }

    pub fn parse(name: &str) -> Option<Outcome> {
        [Outcome::Committed, Outcome::Failed, Outcome::RolledBack]
            .into_iter()
            .find(|o| o.name() == name)
    }

    /// Whether it counts against a rollout.
    pub fn is_bad(self) -> bool {
        self != Outcome::Committed
    }
}

/// One update attempt's outcome, as a box posts it to `/report`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// [`PROTOCOL_VERSION`].
    pub v: u32,
    pub box_id: String,
    pub outcome: Outcome,
    /// The version the attempt was about: the one installed, failed, or rolled back from.
    pub target_version: Option<u64>,
    /// What the box runs after it.
    pub running_version: Option<u64>,
    /// What the box ran before it.
    #[serde(default)]
    pub previous_version: Option<u64>,
    /// The step that failed, for a failure.
    #[serde(default)]
    pub step: Option<Step>,
    #[serde(default)]
    pub message: String,
    /// The box's clock (which may be wrong on a Raspberry Pi without a clock battery until NTP
    /// has run): shown, never used to order anything.
    #[serde(default)]
    pub started_at: Option<u64>,
    #[serde(default)]
    pub finished_at: Option<u64>,
    /// Milliseconds spent in each step, by step name.
    #[serde(default)]
    pub durations_ms: BTreeMap<String, u64>,
}

/// Why a report is refused; each says what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("the report is not valid JSON of protocol {PROTOCOL_VERSION}: {0}")]
    Malformed(String),
    #[error("report version {0} is not supported; this server speaks version {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("{0}")]
    Invalid(String),
}

impl Report {
    /// Parses and checks a report body; anything out of bounds is refused, not trimmed.
    pub fn parse(body: &[u8]) -> Result<Report, ReportError> {
        // The version first, so that a future format gets the right refusal.
        #[derive(Deserialize)]
        struct Versioned {
            v: Option<u32>,
        }
        match serde_json::from_slice::<Versioned>(body) {
            Ok(Versioned { v: Some(v) }) if v != PROTOCOL_VERSION => {
                return Err(ReportError::Version(v));
            }
            Ok(Versioned { v: None }) => {
                return Err(ReportError::Malformed("missing field `v`".into()));
            }
            _ => {}
        }
        let report: Report =
            serde_json::from_slice(body).map_err(|e| ReportError::Malformed(e.to_string()))?;
        report.check()?;
        Ok(report)
    }

    pub fn check(&self) -> Result<(), ReportError> {
        let bad = |m: String| Err(ReportError::Invalid(m));
        if !valid_id(&self.box_id) {
            return bad(format!(
                "box_id {:?} is not 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 . _ : -",
                self.box_id
            ));
        }
        for (what, v) in [
            ("target_version", self.target_version),
            ("running_version", self.running_version),
            ("previous_version", self.previous_version),
        ] {
            if v == Some(0) {
                return bad(format!("{what} must be a positive version number"));
            }
        }
        if self.outcome != Outcome::Failed && self.target_version.is_none() {
            return bad(format!(
                "a {} report needs target_version",
                self.outcome.name()
            ));
        }
        if self.message.chars().count() > MAX_MESSAGE_CHARS {
            return bad(format!(
                "message is longer than {MAX_MESSAGE_CHARS} characters"
            ));
        }
        if self.message.chars().any(|c| c.is_control() && c != '\n') {
            return bad("message holds control characters".into());
        }
        for (step, &ms) in &self.durations_ms {
            if parse_step(step).is_none() {
                return bad(format!("durations_ms names no step: {step:?}"));
            }
            if ms > MAX_DURATION_MS {
                return bad(format!("durations_ms.{step} is over 30 days"));
            }
        }
        Ok(())
    }
}

/// Shortens `message` to what a report may carry, on a character boundary, and drops control
/// characters other than newlines.
pub fn bounded_message(message: &str) -> String {
    let clean: String = message
        .chars()
        .map(|c| if c.is_control() && c != '\n' { ' ' } else { c })
        .collect();
    if clean.chars().count() <= MAX_MESSAGE_CHARS {
        return clean;
    }
    let mut out: String = clean.chars().take(MAX_MESSAGE_CHARS - 3).collect();
    out.push_str("...");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            v: 1,
            box_id: "7".into(),
            outcome: Outcome::Failed,
            target_version: Some(1_700_000_100),
            running_version: Some(1_700_000_000),
            previous_version: Some(1_700_000_000),
            step: Some(Step::Installing),
            message: "update failed while installing: exit code 7".into(),
            started_at: Some(10),
            finished_at: Some(20),
            durations_ms: [("downloading".to_string(), 1200)].into(),
        }
    }

    #[test]
    fn reports_round_trip_and_bad_ones_say_why() {
        let r = report();
        let body = serde_json::to_vec(&r).unwrap();
        assert!(body.len() < 512);
        assert_eq!(Report::parse(&body).unwrap(), r);
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains(r#""outcome":"failed""#), "{text}");
        assert!(text.contains(r#""step":"installing""#), "{text}");

        let cases: Vec<(String, &str)> = vec![
            ("{".into(), "not valid JSON"),
            ("[]".into(), "not valid JSON"),
            (
                text.replace(r#""v":1"#, r#""v":2"#),
                "version 2 is not supported",
            ),
            (text.replace(r#""v":1,"#, ""), "missing field `v`"),
            (
                text.replace(r#""box_id":"7""#, r#""box_id":"a b""#),
                "box_id",
            ),
            (text.replace(r#""box_id":"7""#, r#""box_id":"""#), "box_id"),
            (
                text.replace("\"failed\"", "\"exploded\""),
                "unknown variant",
            ),
            (
                text.replace("\"installing\"", "\"dancing\""),
                "unknown variant",
            ),
            (text.replace("downloading", "napping"), "names no step"),
            (text.replace("1200", "99999999999999"), "over 30 days"),
            (text.replace("1700000100", "0"), "positive version"),
            (text.replace("1700000100", "-1"), "not valid JSON"),
            (
                text.replace("exit code 7", &"x".repeat(1001)),
                "longer than",
            ),
            (
                text.replace("exit code 7", "a\\u0000b"),
                "control characters",
            ),
            (
                text.replace("\"failed\"", "\"committed\"")
                    .replace(r#""target_version":1700000100"#, r#""target_version":null"#),
                "needs target_version",
            ),
        ];
        for (body, want) in cases {
            let err = Report::parse(body.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{body}: {err}");
        }
        // Fields a later version 1 adds are ignored by this one.
        let more = text.replacen('{', r#"{"hardware":"pi4","#, 1);
        assert_eq!(Report::parse(more.as_bytes()).unwrap(), r);
    }

    #[test]
    fn headers_that_do_not_parse_are_absent() {
        let h = |id: &'static str, v: &'static str, s: &'static str| {
            BoxHeaders::parse(move |name| match name {
                HEADER_ID => Some(id),
                HEADER_VERSION => Some(v),
                HEADER_STATE => Some(s),
                _ => None,
            })
        };
        assert_eq!(
            h("box-7", "1700000000", "rolling_back"),
            BoxHeaders {
                id: Some("box-7"),
                version: Some(1_700_000_000),
                state: Some(Step::RollingBack)
            }
        );
        assert_eq!(h("a b", "none", "sleeping"), BoxHeaders::default());
        let long: &'static str = Box::leak("x".repeat(65).into_boxed_str());
        assert_eq!(h(long, "0", "").id, None);
        assert!(valid_id(&"x".repeat(64)) && valid_id("auto-0f3a:b_c.d"));
        assert!(!valid_id("é") && !valid_id("<b>") && !valid_id("a/b"));
    }

    #[test]
    fn messages_are_bounded_on_a_character_boundary() {
        let long = "é".repeat(2000);
        let m = bounded_message(&long);
        assert_eq!(m.chars().count(), MAX_MESSAGE_CHARS);
        assert!(m.ends_with("..."));
        assert_eq!(bounded_message("a\u{0}b\nc"), "a b\nc");
    }
}
