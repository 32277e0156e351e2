//! IAM member strings: never a panic, and a member that names another namespace never covers the KSA.
#![no_main]

use std::collections::BTreeMap;

use authprobe::engine::principal::{KsaIdentity, PoolRef, parse_member};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &str| {
    let identity = KsaIdentity {
        pool: PoolRef { project_number: Some("123456789012".into()), pool_id: "acme-prod.svc.id.goog".into() },
        gke_project_id: Some("acme-prod".into()),
        namespace: "checkout".into(),
        name: "app".into(),
        uid: Some("uid-1".into()),
        subject: "ns/checkout/sa/app".into(),
        attributes: BTreeMap::new(),
        groups: vec![],
        cluster: None,
    };
    let parsed = parse_member(raw);
    if identity.covered_by(&parsed.member) {
        assert!(raw.contains("checkout") || raw.contains("uid-1") || raw.ends_with("/*"), "{raw}");
    }
    let _ = identity.near_miss(&parsed.member);
});
