//! Attribute mappings and conditions come from the provider (Google), not from the cluster: any
//! expression must evaluate or fail cleanly, never panic.
#![no_main]

use std::collections::BTreeMap;

use authprobe::engine::stage::provider::{check_condition, claims_for, map_attributes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str)| {
    let (mapping, condition) = input;
    let claims = claims_for("https://127.0.0.1:6443", "//iam.googleapis.com/x", "checkout", "app", "uid", 1_700_000_000);
    let rules = BTreeMap::from([("google.subject".to_string(), mapping.to_string())]);
    if let Ok(mapped) = map_attributes(&rules, &claims) {
        let _ = check_condition(condition, &claims, &mapped);
    }
});
