//! Google answers of any status and body: decoded into a fact or a failure, never a panic, and
//! nothing shaped like a token survives into what users see.
#![no_main]

use authprobe::{
    engine::{
        facts::{GoogleServiceAccount, Policy, Pool, Provider},
        stage::chain,
    },
    google::{
        classify_read,
        client::{Answer, Api, parse_retry_after},
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
    let day = std::time::Duration::from_secs(86_400);
    let now = k8s_openapi::jiff::Timestamp::now();
    for issued in [chain::exchanged_token(body, day), chain::generated_token(body, now)] {
        match issued {
            Ok(i) => assert!(i.lifetime <= chain::MAX_TOKEN_LIFETIME),
            Err(e) => assert!(e.len() <= redact::MAX_UPSTREAM_BYTES && !e.contains("ya29."), "{e}"),
        }
    }
    if let Err(e) = chain::held_permissions(body) {
        assert!(e.len() <= redact::MAX_UPSTREAM_BYTES && !e.contains("eyJ"), "{e}");
    }
    if let Some(wait) = std::str::from_utf8(body).ok().and_then(parse_retry_after) {
        // The retry loop compares now + wait with its deadline: checked, so any value is safe.
        let _ = std::time::Instant::now().checked_add(wait);
    }
    let shown = describe(&answer);
    assert!(!shown.contains("eyJ") && !shown.contains("ya29."), "{shown}");
    assert!(shown.len() <= redact::MAX_UPSTREAM_BYTES);
});
