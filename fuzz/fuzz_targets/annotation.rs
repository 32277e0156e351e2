//! KSA annotation values: never a panic; what parses is a well-formed service-account email.
#![no_main]

use authprobe::engine::annotation::{is_project_id, parse_gsa};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|value: &str| {
    match parse_gsa(value) {
        Ok(gsa) => {
            assert_eq!(gsa.as_str(), value);
            assert!(gsa.project().is_none_or(is_project_id));
            assert!(value.ends_with(".gserviceaccount.com") && value.is_ascii());
        }
        Err(why) => assert!(!why.contains('\n') && why.len() < 512),
    }
});
