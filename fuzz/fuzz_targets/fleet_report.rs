//! The fleet's report and header parsing (what any client may post to update-server): never a
//! panic; an accepted report is within its bounds and serializes back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use opq_update::fleet::protocol::{BoxHeaders, MAX_MESSAGE_CHARS, Report, valid_id};

fuzz_target!(|data: &[u8]| {
    if let Ok(report) = Report::parse(data) {
        assert!(valid_id(&report.box_id));
        assert!(report.message.chars().count() <= MAX_MESSAGE_CHARS);
        let again = serde_json::to_vec(&report).unwrap();
        assert_eq!(Report::parse(&again).unwrap(), report);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let h = BoxHeaders::parse(|_| Some(text));
        if let Some(id) = h.id {
            assert!(valid_id(id));
        }
    }
});
