//! Google answers of any status and body: decoded into a fact or a failure, never a panic, and
//! nothing shaped like a token survives into what users see.
#![no_main]

use authprobe::{
    engine::facts::{GoogleServiceAccount, Policy, Pool, Provider},
    google::{
        classify_read,
        client::{Answer, Api},
        describe,
    },
    redact,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u16, &[u8])| {
    let (status, body) = input;
    let Ok(status) = reqwest::StatusCode::from_u16(100 + status % 500) else { return };
    let answer = Answer { status, body: body.to_vec(), date: None, retry_after: None };
    let _ = classify_read::<Policy>(Api::GetIamPolicy, Ok(answer.clone()));
    let _ = classify_read::<GoogleServiceAccount>(Api::GetServiceAccount, Ok(answer.clone()));
    let _ = classify_read::<Pool>(Api::GetPool, Ok(answer.clone()));
    let _ = classify_read::<Provider>(Api::GetProvider, Ok(answer.clone()));
    let shown = describe(&answer);
    assert!(!shown.contains("eyJ") && !shown.contains("ya29."), "{shown}");
    assert!(shown.len() <= redact::MAX_UPSTREAM_BYTES);
});
